"""What the tests share besides fixtures: the checkout's root, the one environment trainer subprocesses run
in, the tiny experiment, and writers of videos and frame folders. Tests import it as `tests.helpers`
(the test folders are packages, so pytest puts the checkout's root on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# A trainer subprocess on CPU ranks: DeepSpeed's CPU accelerator, plain log lines, one thread per rank
TRAIN_ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "SCLSLT_PLAIN_LOG": "1", "OMP_NUM_THREADS": "1"}

TINY = {
    "data": {
        "synthetic": {"n_train": 96, "n_dev": 16, "n_test": 16, "frame_size": 16, "n_templates": 40, "n_signers": 3},
        "samples_per_shard": 20,
    },
    "model": {
        "backbone_embedding": 8,
        "backbone_hidden": [8, 16],
        "backbone_depths": [1, 1],
        "d_model": 32,
        "layers": 1,
        "heads": 2,
        "ffn": 64,
        "dropout": 0.0,
        "embed_dim": 16,
        "max_positions": 64,
    },
    "stage1": {"epochs": 1, "global_batch": 8, "lr": 3e-3, "warmup_steps": 2},
    "stage2": {"epochs": 1, "global_batch": 8, "lr": 3e-3, "warmup_steps": 2},
    "train": {"grad_clip": 0.5, "log_every": 1},
    "eval": {"beam": 2, "max_len": 12, "batch_size": 8},
}


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
