"""Which path a kernel call takes: the Triton kernel or the plain-PyTorch reference.

`SCLSLT_KERNELS` = `auto` (default): Triton for CUDA tensors, and for CPU tensors when the Triton
interpreter is on (`TRITON_INTERPRET=1`, set before this package is imported); the reference
otherwise, and always for dtypes other than fp32/fp16/bf16 (fp64 gradient checks). `triton`: always Triton (an
error where it cannot run). `reference`: always the reference.
"""

from __future__ import annotations

import inspect
import os

import torch

_MODES = ("auto", "triton", "reference")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_available() -> bool:
    return triton is not None


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the kernels run for these inputs; other dtypes (fp64: tests, gradient checks) take the reference."""
    mode = os.environ.get("SCLSLT_KERNELS", "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"SCLSLT_KERNELS={mode!r}: use one of {_MODES}")
    if mode == "reference" or any(t.dtype not in KERNEL_DTYPES for t in tensors):
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    possible = _triton_available() and (on_cuda or (interpreting() and not any(t.is_cuda for t in tensors)))
    if mode == "triton" and not possible:
        raise RuntimeError(
            "SCLSLT_KERNELS=triton but Triton cannot run here: CUDA tensors are needed, or "
            "TRITON_INTERPRET=1 set before importing sclslt_kernels for CPU tensors"
        )
    return possible


def describe(device: torch.device) -> dict:
    """Which path this job's kernel calls take on `device` (recorded in results.json): "triton" (native,
    or the interpreter on CPU) or "reference", with the triton version and the SCLSLT_KERNELS mode."""
    x = torch.empty(0, device=device)
    return {
        "path": "triton" if use_triton(x) else "reference",
        "interpreter": interpreting() and x.device.type == "cpu",
        "mode": os.environ.get("SCLSLT_KERNELS", "auto").lower(),
        "triton": getattr(triton, "__version__", None) if triton is not None else None,
    }


TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # Triton's names

GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's largest grid, axes x, y, z
ALIGN = 16  # bytes: the pointer alignment Triton's JIT specialises on


def aligned(x: torch.Tensor) -> torch.Tensor:
    """x, or a copy where its data pointer is not 16-byte aligned (a view at an odd offset): the kernels are
    only ever launched, and compiled offline by resources.py, with every pointer aligned."""
    return x if x.data_ptr() % ALIGN == 0 else x.clone(memory_format=torch.contiguous_format)


def mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 for fp32/fp16/bf16 a, b: a 16-bit product is not rounded to
    16 bits (the backward's chunk products are summed and partly cancel). On CUDA one GEMM with
    out_dtype=fp32 (no fp32 copy of the operands); elsewhere (torch has no CPU kernel for mm's out_dtype)
    the operands are up-cast, which costs an fp32 copy of each: the interpreter's tests, not a GPU's memory."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def dot_meta(dtype: torch.dtype) -> dict:
    """The constexprs every kernel here takes for how its tl.dot multiplies inputs of `dtype`."""
    return dict(FP32_DOT=fp32_dot(dtype), DOT_PREC=dot_precision(dtype))


def fp32_dot(dtype: torch.dtype) -> bool:
    """The interpreter's bf16 tl.dot returns garbage: up-cast to fp32 inside the kernel there."""
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 ("ieee"); 16-bit inputs (and the fp32 gradient factors they
    meet) use TF32 tensor cores, whose 10-bit mantissa is finer than the inputs' own."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


try:
    import triton  # noqa: F401
except ImportError:
    triton = None


def int_variants(fn, types: dict, constexprs: dict, always: tuple) -> list[tuple[str, tuple]]:
    """The integer specialisations of kernel `fn` a launcher can hit, as (name, arguments divisible by 16):
    Triton's JIT compiles a variant per pattern of integer arguments divisible by 16. "aligned": every
    integer argument (those neither in `types` nor constexprs) divisible; "unaligned": only `always`, the
    ones the launcher guarantees."""
    names = getattr(fn, "arg_names", None) or list(inspect.signature(fn.fn).parameters)
    ints = tuple(a for a in names if a not in types and a not in constexprs)
    missing = set(always) - set(ints)
    if missing:
        raise ValueError(f"{fn.__name__}: {sorted(missing)} are not integer arguments")
    return [("aligned", ints), ("unaligned", tuple(a for a in ints if a in always))]
