"""The kernels as the GPU compiler builds them, without a GPU (kernels/resources.py).

Every configuration the launchers can choose (each kernel x dtype x tile configuration x id masking)
is compiled by Triton's real back end for sm_90 (Hopper) and sm_80 (Ampere): it must build, use no
stack (no register spills) and fit the architecture's shared memory. The interpreter, which runs the
numerics tests on CPU, would hide all of that. Runs in a subprocess because the interpreter
(TRITON_INTERPRET=1, set by conftest) replaces the kernels with Python functions.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow     # end to end: the fast lane is -m "not slow"

ROOT = Path(__file__).resolve().parents[1]


def test_every_launch_configuration_compiles_for_sm90_and_sm80_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"                 # the default; silences triton 3.9's notice
    proc = subprocess.run([sys.executable, "-m", "sclslt_kernels.resources", "--arch", "90", "80", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {(r["module"], r["kernel"]) for r in rows}
    assert kernels == {("infonce", "_infonce_fwd"), ("infonce", "_infonce_dlogits"), ("cico", "_cico_fwd"),
                       ("cico", "_cico_grad")}
    assert {r["arch"] for r in rows} == {90, 80} and {r["dtype"] for r in rows} == {"bf16", "fp16", "fp32"}
    bad = [r for r in rows if not r.get("fits")]
    assert not bad, "\n".join(f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['config']}: "
                              f"{r.get('error') or (r['registers'], r['stack'], r['shared'])}" for r in bad)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_gpu_check_runs_every_part_and_writes_one_json(tmp_path):
    """benchmarks/gpu_check.py --quick on this CPU: each part runs (kernels in the interpreter) and
    reports; one tagged JSON comes out. On a GPU the same script, without --quick, is the device check."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    files = list(tmp_path.glob("gpu-check-*.json"))
    assert len(files) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(files[0].read_text())
    assert set(report["parts"]) == {"kernels", "determinism", "sweep_infonce", "sweep_cico", "smoke", "decode",
                                    "loader", "planner"}
    failed = {k: v for k, v in report["parts"].items() if not v["ok"]}
    assert not failed and proc.returncode == 0, json.dumps(failed, indent=1)[-4000:]
    assert report["parts"]["kernels"]["cases"]["infonce_bf16"]["ok"] and "triton" in report["versions"]
    assert report["parts"]["decode"]["max_abs_diff"] == 0          # the CPU backend: Pillow's pixels
