"""Which path a kernel call takes: the Triton kernel or the plain-PyTorch reference.

`SCLSLT_KERNELS` = `auto` (default): Triton for CUDA tensors, and for CPU tensors when the Triton
interpreter is on (`TRITON_INTERPRET=1`, set before this package is imported); the reference
otherwise, and always for dtypes other than fp32/fp16/bf16 (fp64 gradient checks). `triton`: always Triton (an error where it cannot run). `reference`: always the reference.
"""
from __future__ import annotations

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
        raise RuntimeError("SCLSLT_KERNELS=triton but Triton cannot run here: CUDA tensors are needed, or "
                           "TRITON_INTERPRET=1 set before importing sclslt_kernels for CPU tensors")
    return possible


def describe(device: torch.device) -> dict:
    """Which path this job's kernel calls take on `device` (recorded in results.json): "triton" (native,
    or the interpreter on CPU) or "reference", with the triton version and the SCLSLT_KERNELS mode."""
    x = torch.empty(0, device=device)
    return {"path": "triton" if use_triton(x) else "reference", "interpreter": interpreting() and x.device.type == "cpu",
            "mode": os.environ.get("SCLSLT_KERNELS", "auto").lower(),
            "triton": getattr(triton, "__version__", None) if triton is not None else None}


TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}   # Triton's names


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
