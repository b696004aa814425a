"""Shared fixtures: tiny configs and a tiny synthetic corpus (sharded once per session).

Without a GPU the whole session runs the Triton kernels in the interpreter (`TRITON_INTERPRET=1`,
set here before anything imports sclslt_kernels; subprocesses inherit it), so the trainer's
single-process and multi-rank paths exercise the kernels, not only their reference. With a GPU
they run natively.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN_ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "SCLSLT_PLAIN_LOG": "1", "OMP_NUM_THREADS": "1"}

TINY = {
    "data": {"synthetic": {"n_train": 96, "n_dev": 16, "n_test": 16, "frame_size": 16, "n_templates": 40,
                           "n_signers": 3},
             "samples_per_shard": 20},
    "model": {"backbone_embedding": 8, "backbone_hidden": [8, 16], "backbone_depths": [1, 1], "d_model": 32,
              "layers": 1, "heads": 2, "ffn": 64, "dropout": 0.0, "embed_dim": 16, "max_positions": 64},
    "stage1": {"epochs": 1, "global_batch": 8, "lr": 3e-3, "warmup_steps": 2},
    "stage2": {"epochs": 1, "global_batch": 8, "lr": 3e-3, "warmup_steps": 2},
    "train": {"grad_clip": 0.5, "log_every": 1},
    "eval": {"beam": 2, "max_len": 12, "batch_size": 8},
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    d = Path(os.environ.get("SCLSLT_TEST_CACHE", tmp_path_factory.mktemp("cache")))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def tiny_cfg_dict(cache_dir) -> dict:
    import copy
    d = copy.deepcopy(TINY)
    d["data"]["cache_dir"] = str(cache_dir)
    return d


@pytest.fixture(scope="session")
def tiny_shards(tiny_cfg_dict) -> Path:
    from sclslt.config import from_dict
    from sclslt.data.corpus import synthetic_shards_dir
    return synthetic_shards_dir(from_dict(tiny_cfg_dict).data)


@pytest.fixture
def cfg_path(tiny_cfg_dict, tmp_path) -> Path:
    """The tiny experiment with 48 training clips (6 global batches of 8), as a YAML file."""
    import yaml
    cfg = yaml.safe_load(yaml.safe_dump(tiny_cfg_dict))
    cfg["data"]["synthetic"]["n_train"] = 48
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture
def train_env() -> dict:
    """Environment for a trainer subprocess on CPU ranks: plain log lines, one thread per rank."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "SCLSLT_PLAIN_LOG": "1", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------
# a tiny trained run, and some of its test clips as frame folders and videos (translate, export, demo)

@pytest.fixture(scope="session")
def tiny_run(tiny_cfg_dict, tiny_shards, tmp_path_factory):
    """A run trained long enough to say different things for different clips (~20 s on 2 cores), logged to
    every tracker in its local mode (wandb offline into <run>/wandb, trackio into <tmp>/trackio:
    `tracker_env`)."""
    d = copy.deepcopy(tiny_cfg_dict)
    d["stage1"]["epochs"], d["stage2"]["epochs"], d["train"]["log_every"] = 2, 10, 1000
    d["train"]["report_to"] = ["tensorboard", "wandb", "trackio"]
    tmp = tmp_path_factory.mktemp("translate")
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(d))
    run = tmp / "run"
    p = subprocess.run([sys.executable, "launch/train.py", "--config", str(tmp / "tiny.yaml"),
                        "--train.run_dir", str(run)], cwd=ROOT, env=tracker_env(tmp), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "hypotheses.test.jsonl").read_text().splitlines()]
    return run, {r["key"]: r["hyp"] for r in rows}


def tracker_env(tmp: Path) -> dict:
    """The trainer's environment with the trackers in their local modes, under `tmp`."""
    return {**TRAIN_ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp / "trackio")}


def write_video(path: Path, frames: np.ndarray, codec: str, pix_fmt: str, options=None) -> Path:
    import av
    with av.open(str(path), "w") as c:
        st = c.add_stream(codec, rate=25)
        st.width, st.height, st.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        st.options = options or {}
        for f in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    return path


def frame_folder(folder: Path, frames: np.ndarray) -> Path:
    """images1.png ... images16.png: unpadded numbers, so only a natural sort gets the order right."""
    from PIL import Image
    folder.mkdir(parents=True)
    for i, f in enumerate(frames, 1):
        Image.fromarray(f).save(folder / f"images{i}.png")
    return folder


@pytest.fixture(scope="session")
def clips(tiny_run, tiny_shards, tmp_path_factory):
    """3 test clips with different hypotheses (non-empty first): PNG folder, ffv1 .mkv (lossless), and
    for the first an .mp4 (H.264 4:4:4 qp 0, near-lossless after RGB -> YUV)."""
    run, hyps = tiny_run
    keys, seen = [], set()
    for k in sorted(hyps, key=lambda k: (hyps[k] == "", k)):
        if hyps[k] not in seen:
            keys.append(k)
            seen.add(hyps[k])
        if len(keys) == 3:
            break
    assert keys and hyps[keys[0]], f"the tiny run translated nothing: {hyps}"
    from sclslt.data.shards import ShardIndex, read_manifest
    index = ShardIndex(tiny_shards, read_manifest(tiny_shards, "test"))
    out = tmp_path_factory.mktemp("clips")
    res = []
    for k in keys:
        frames = index.read(k)["frames"]
        assert frames.shape[0] >= 10                       # images10.png exists: the order is tested
        res.append({"key": k, "frames": frames, "folder": frame_folder(out / k, frames),
                    "mkv": write_video(out / f"{k}.mkv", frames, "ffv1", "bgr0")})
    res[0]["mp4"] = write_video(out / f"{keys[0]}.mp4", res[0]["frames"], "libx264", "yuv444p", {"qp": "0"})
    return res
