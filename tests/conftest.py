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

import torch
import yaml

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers import ROOT, TINY, TRAIN_ENV, frame_folder, tracker_env, write_video  # noqa: E402


def pytest_collection_modifyitems(items):
    """The lane is the folder: everything under tests/e2e/ is `slow` (launchers and ranks, Slurm, faults, chaos,
    export, demo, trackers, the GPU compiler), so `-m "not slow"` and plain `pytest` (tests/unit/) agree."""
    e2e = ROOT / "tests" / "e2e"
    for item in items:
        if e2e in item.path.parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    d = Path(os.environ.get("SCLSLT_TEST_CACHE", tmp_path_factory.mktemp("cache")))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def tiny_cfg_dict(cache_dir) -> dict:
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
    """`tests.helpers.TRAIN_ENV`, a copy a test may change."""
    return dict(TRAIN_ENV)


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
    p = subprocess.run(
        [sys.executable, "launch/train.py", "--config", str(tmp / "tiny.yaml"), "--train.run_dir", str(run)],
        cwd=ROOT,
        env=tracker_env(tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "hypotheses.test.jsonl").read_text().splitlines()]
    return run, {r["key"]: r["hyp"] for r in rows}


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
        assert frames.shape[0] >= 10  # images10.png exists: the order is tested
        res.append(
            {
                "key": k,
                "frames": frames,
                "folder": frame_folder(out / k, frames),
                "mkv": write_video(out / f"{k}.mkv", frames, "ffv1", "bgr0"),
            }
        )
    res[0]["mp4"] = write_video(out / f"{keys[0]}.mp4", res[0]["frames"], "libx264", "yuv444p", {"qp": "0"})
    return res
