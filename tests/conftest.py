"""Shared fixtures: tiny configs and a tiny synthetic corpus (sharded once per session).

Without a GPU the whole session runs the Triton kernels in the interpreter (`TRITON_INTERPRET=1`,
set here before anything imports sclslt_kernels; subprocesses inherit it), so the trainer's
single-process and multi-rank paths exercise the kernels, not only their reference. With a GPU
they run natively.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
