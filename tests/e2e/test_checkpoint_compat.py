"""Runs written before the package took its data-flow layout (sclslt/trainer.py, commit 47b55e6) still
load: checkpoints hold no sclslt classes, only DeepSpeed's state and plain records, and this keeps it so.

tests/fixtures/run_before_layout_move: a 1-rank stage-1 run of the tiny config (48 clips, 2 steps),
as that commit wrote it (tokenizer, config, metrics, the step-2 checkpoint)."""

import shutil
import subprocess
import sys

from tests.helpers import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "run_before_layout_move"


def test_a_run_from_before_the_layout_move_resumes_and_loads(tmp_path, tiny_cfg_dict, train_env):
    from sclslt.config import load_config
    from sclslt.data.text import load_tokenizer
    from sclslt.model.slt import SLTModel
    from sclslt.runtime.checkpoints import load_module_state

    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    model = SLTModel(load_config(run / "config.yaml").model, load_tokenizer(run / "tokenizer"))
    model.load_state_dict(load_module_state(run / "stage1" / "checkpoints"), strict=True)
    proc = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            str(run / "config.yaml"),
            "--train.run_dir",
            str(run),
            "--data.cache_dir",
            tiny_cfg_dict["data"]["cache_dir"],
            "--train.max_steps",
            "3",
            "--resume",
        ],
        cwd=ROOT,
        env=train_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage1: resumed at step 2" in proc.stdout
    import csv

    with open(run / "stage1" / "metrics.csv") as f:
        steps = [r["step"] for r in csv.DictReader(f)]
    assert steps == ["1", "2", "3"]
    import json

    kernels = json.loads((run / "results.json").read_text())["kernels"]  # the path the run took is recorded
    assert kernels["path"] == "triton" and kernels["interpreter"] is True and kernels["triton"]


def test_model_init_from_starts_the_first_stage_from_another_runs_weights(tmp_path, tiny_cfg_dict, train_env):
    """model.init_from (a pretrained VLP model: the whole-model pretrained start of docs/paper.md): the first stage's
    epoch-0 checkpoint is exactly the source run's weights; a missing source is a clear error."""
    import torch

    from sclslt.runtime.checkpoints import load_module_state

    run = tmp_path / "run"
    common = [
        "--config",
        str(FIXTURE / "config.yaml"),
        "--data.cache_dir",
        tiny_cfg_dict["data"]["cache_dir"],
        "--model.tokenizer",
        str(FIXTURE / "tokenizer"),
        "--model.trim_vocab",
        "false",
        "--train.max_steps",
        "1",
        "--stage2.enabled",
        "false",
        "--checkpoint.every_epochs",
        "1",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            *common,
            "--train.run_dir",
            str(run),
            "--model.init_from",
            str(FIXTURE / "stage1" / "checkpoints"),
        ],
        cwd=ROOT,
        env=train_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 newly initialised, 0 ignored, 0 shape mismatches" in proc.stdout
    want = load_module_state(FIXTURE / "stage1" / "checkpoints")
    got = load_module_state(run / "stage1" / "checkpoints", "epoch0000")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    proc = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            *common,
            "--train.run_dir",
            str(tmp_path / "r2"),
            "--model.init_from",
            str(tmp_path / "nowhere"),
        ],
        cwd=ROOT,
        env=train_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0 and "no checkpoint to start from in" in proc.stdout + proc.stderr
