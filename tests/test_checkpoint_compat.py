"""Runs written before the package took its data-flow layout (sclslt/trainer.py, commit 47b55e6) still
load: checkpoints hold no sclslt classes, only DeepSpeed's state and plain records, and this keeps it so.

tests/fixtures/run_before_layout_move: a 1-rank stage-1 run of the tiny config (48 clips, 2 steps),
as that commit wrote it (tokenizer, config, metrics, the step-2 checkpoint)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "run_before_layout_move"

pytestmark = pytest.mark.slow


def test_a_run_from_before_the_layout_move_resumes_and_loads(tmp_path, tiny_cfg_dict, train_env):
    from sclslt.config import load_config
    from sclslt.data.text import load_tokenizer
    from sclslt.model.slt import SLTModel
    from sclslt.train.engine import load_module_state
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    model = SLTModel(load_config(run / "config.yaml").model, load_tokenizer(run / "tokenizer"))
    model.load_state_dict(load_module_state(run / "stage1" / "checkpoints"), strict=True)
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", str(run / "config.yaml"),
                           "--train.run_dir", str(run), "--data.cache_dir", tiny_cfg_dict["data"]["cache_dir"],
                           "--train.max_steps", "3", "--resume"], cwd=ROOT, env=train_env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage1: resumed at step 2" in proc.stdout
    import csv
    with open(run / "stage1" / "metrics.csv") as f:
        steps = [r["step"] for r in csv.DictReader(f)]
    assert steps == ["1", "2", "3"]
    import json
    kernels = json.loads((run / "results.json").read_text())["kernels"]      # the path the run took is recorded
    assert kernels["path"] == "triton" and kernels["interpreter"] is True and kernels["triton"]
