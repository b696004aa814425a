"""The kernels as the GPU compiler builds them, without a GPU (kernels/resources.py).

Every variant the launchers can launch (each kernel x dtype x tile configuration x id masking x integer
variant: "aligned", every integer argument a multiple of 16, and "unaligned", as the JIT specialises
them) is compiled by Triton's real back end for sm_90 (Hopper) and sm_80 (Ampere): it must build, use no
stack (no register spills) and fit the architecture's shared memory. The interpreter, which runs the
numerics tests on CPU, would hide all of that. Runs in a subprocess because the interpreter
(TRITON_INTERPRET=1, set by conftest) replaces the kernels with Python functions.
"""

import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_every_launch_configuration_compiles_for_sm90_and_sm80_without_spills():
    """Both integer variants of every configuration, zero stack everywhere. Catches: a configuration or
    variant left out of launch_variants (e.g. only "aligned": the set of (row, variant) pairs differs), and
    InfoNCE's d compiled unaligned (remove "d" from infonce.ALWAYS_ALIGNED, what launching an unpadded d
    would need: 8 unaligned _infonce_fwd bf16/fp16 rows spill)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default; silences triton 3.9's notice
    proc = subprocess.run(
        [sys.executable, "-m", "sclslt_kernels.resources", "--arch", "90", "80", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {(r["module"], r["kernel"]) for r in rows}
    assert kernels == {
        ("infonce", "_infonce_fwd"),
        ("infonce", "_infonce_dlogits"),
        ("cico", "_cico_fwd"),
        ("cico", "_cico_grad"),
    }
    assert {r["arch"] for r in rows} == {90, 80} and {r["dtype"] for r in rows} == {"bf16", "fp16", "fp32"}
    by_variant = {}
    for r in rows:
        by_variant.setdefault(r["variant"], set()).add((r["kernel"], r["dtype"], r["arch"], r["config"]))
    assert set(by_variant) == {"aligned", "unaligned"} and by_variant["aligned"] == by_variant["unaligned"]
    assert len(rows) == 2 * len(by_variant["aligned"])
    bad = [r for r in rows if not r.get("fits")]
    assert not bad, "\n".join(
        f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['variant']} {r['config']}: "
        f"{r.get('error') or (r['registers'], r['stack'], r['shared'])}"
        for r in bad
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
