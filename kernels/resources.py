"""The kernels compiled for a GPU architecture without a GPU, and what they use of it.

Triton's wheel carries the CUDA back end (ptxas, cuobjdump), so `triton.compile` builds the real cubin
for sm_80 / sm_90 on a CPU machine. For every launch configuration the launchers can choose
(`launch_specs()`: each kernel x dtype x tile configuration x id masking x integer variant, "aligned"
and "unaligned": the specialisations Triton's JIT compiles for integer arguments that are or are not
multiples of 16, with every pointer 16-byte aligned as the launchers guarantee) this reports registers per
thread, stack bytes per thread (spills: > 0 means the kernel spills registers to local memory) and
shared memory per block, and whether that fits the architecture. What it cannot tell: speed, races,
numerics on the device (tests/unit/kernels/test_kernels.py and benchmarks/gpu_check.py do those).

Must run with TRITON_INTERPRET unset (the interpreter replaces the kernels with Python functions):
    python -m sclslt_kernels.resources [--arch 90 80] [--json]
tests/e2e/test_kernel_compile.py runs it in a subprocess; benchmarks/kernel_resources.py prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# shared memory a block may use (opt-in maximum), by compute capability
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def signature(fn, types: dict, constexprs: dict, divisible) -> tuple[dict, dict]:
    """Triton signature (every argument: constexpr, the given pointer/scalar type, else i32) and the
    divisibility attributes the JIT specialises at run time: every pointer (16-byte aligned) and the
    integer arguments named in `divisible` (multiples of 16 in this variant)."""
    sig, attrs = {}, {}
    unknown = set(divisible) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{fn.__name__}: no arguments {sorted(unknown)}")
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
        if sig[name].startswith("*") or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _cuobjdump() -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(tool) if tool.exists() else "cuobjdump"


def _module(name: str):
    """kernels/<name>.py (the package namespace holds the functions of the same names)."""
    import importlib

    return importlib.import_module(f"{__package__}.{name}")


def compile_one(spec: dict) -> dict:
    """Compile one launch spec for spec['arch']; registers, stack (spills) and shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(_module(spec["module"]), spec["kernel"])
    sig, attrs = signature(fn, spec["types"], spec["constexprs"], spec["divisible"])
    row = {k: spec[k] for k in ("module", "kernel", "dtype", "arch", "variant", "config")}
    try:
        k = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=spec["constexprs"], attrs=attrs),
            target=GPUTarget("cuda", spec["arch"], 32),
            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
        )
    except Exception as e:  # CompilationError, OutOfResources, ...: a row, not a crash
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    shared = int(k.metadata.shared)
    return {
        **row,
        "registers": int(usage["REG"]),
        "stack": int(usage["STACK"]),
        "shared": shared,
        "fits": shared <= SHARED_LIMIT[spec["arch"]] and int(usage["STACK"]) == 0,
    }


def launch_specs(archs=(90, 80)) -> list[dict]:
    """Every (kernel, dtype, configuration, integer variant) the launchers of infonce.py and cico.py can
    launch (their `launch_variants()`), for each architecture."""
    from ._dispatch import TRITON_TYPES

    specs = []
    for module in (_module(m) for m in ("infonce", "cico")):
        for v in module.launch_variants():
            const, opts = v["constexprs"], v["options"]
            cfg = (
                ", ".join(f"{k}={x}" for k, x in const.items() if k.startswith("BLOCK"))
                + f", warps={opts['num_warps']}, stages={opts['num_stages']}"
            )
            cfg += "".join(f", {k}" for k, x in const.items() if x is True)
            for arch in archs:
                specs.append(
                    {
                        "module": module.__name__.rsplit(".", 1)[-1],
                        "kernel": v["kernel"],
                        "dtype": TRITON_TYPES[v["dtype"]],
                        "arch": arch,
                        "variant": v["variant"],
                        "config": cfg,
                        "types": v["types"],
                        "constexprs": const,
                        "divisible": list(v["divisible"]),
                        **opts,
                    }
                )
    return specs


def measure(archs=(90, 80), workers: int | None = None) -> list[dict]:
    specs = launch_specs(archs)
    with ProcessPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(compile_one, specs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter has no compiler to measure")
    rows = measure(tuple(args.arch))
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(r)
    return 0 if all(r.get("fits") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
