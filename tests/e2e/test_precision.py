"""bf16, the default on GPUs, on CPU ranks: BatchNorm's running statistics stay fp32 beside bf16 parameters
(DeepSpeed casts parameters only; a 0.1-momentum update would vanish in bf16), the fp32 master weights are what a
checkpoint hands to the next stage, and a
bf16 run resumes at another world size."""

import subprocess
import sys
from pathlib import Path

import torch

from sclslt.runtime.checkpoints import latest_tag, load_module_state, safe_load
from tests.helpers import ROOT


def test_bf16_trains_both_stages_hands_over_fp32_masters_and_resumes_elsewhere(cfg_path, train_env, tmp_path):
    run, env = tmp_path / "run", train_env
    args = [
        "launch/train.py",
        "--deepspeed",
        "configs/zero2.json",
        "--config",
        str(cfg_path),
        "--train.run_dir",
        str(run),
        "--train.precision",
        "bf16",
    ]
    deepspeed = Path(sys.executable).with_name("deepspeed")
    two = subprocess.run(
        [
            str(deepspeed) if deepspeed.exists() else "deepspeed",
            "--num_accelerators",
            "2",
            "--master_port",
            "29661",
            *args,
            "--stage2.enabled",
            "false",
            "--train.max_steps",
            "3",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, *args, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "written by 2 ranks, now 1" in one.stdout and (run / "results.json").is_file()

    ckpt = run / "stage1" / "checkpoints"
    module = safe_load(ckpt / latest_tag(ckpt) / "mp_rank_00_model_states.pt")["module"]
    assert module["video_proj.weight"].dtype == torch.bfloat16
    assert module["temporal.0.bn.running_var"].dtype == torch.float32  # buffers stay fp32
    assert module["backbone.embedder.embedder.normalization.running_mean"].dtype == torch.float32
    masters = load_module_state(ckpt)
    assert set(masters) == set(module) and masters["video_proj.weight"].dtype == torch.float32
    gap = (masters["video_proj.weight"] - module["video_proj.weight"].float()).abs().max().item()
    assert 0 < gap < 1e-2  # the fp32 masters, not the bf16-rounded module weights
    assert all(v.isfinite().all() for v in masters.values() if v.is_floating_point())
