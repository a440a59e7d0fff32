"""The one kernel-launch helper shared by every kernel module in kernels/."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when `import triton` works (Linux wheels only)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - platform dependent
        return False
    return True


def can_launch(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of `device`: CUDA, or any device under the interpreter."""
    if not triton_available():
        return False
    return device.type == "cuda" or interpreting()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def dot_options(dtype: torch.dtype) -> dict[str, object]:
    """tl.dot options for operands of `dtype`: fp32 takes the exact ("ieee") path, bf16/fp16 the tensor-core one.
    The interpreter (triton 3.7) returns garbage for a bf16 tl.dot, so there half-precision operands are widened
    to fp32 first (exact): kernels take DOT_PRECISION and DOT_IN_FP32 as constexprs."""
    widen = dtype != torch.float32 and interpreting()
    return {"DOT_PRECISION": "tf32" if dtype != torch.float32 and not widen else "ieee", "DOT_IN_FP32": widen}


def compile_for_gpu(fn: object, arg_types: dict[str, str], constexprs: dict[str, object], *, arch: int = 90,
                    num_warps: int = 4, num_stages: int = 2) -> None:
    """Compile a @triton.jit kernel down to a CUDA cubin for compute capability `arch` (ptxas included), no GPU
    needed: a kernel that only the interpreter accepts fails here. `arg_types` maps every non-constexpr argument
    to a Triton type ("*fp16", "i32", ...). Only in a process where TRITON_INTERPRET was unset at import time."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, values = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            values[(i,)] = constexprs[name]
        else:
            signature[name] = arg_types[name]
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=values), target=GPUTarget("cuda", arch, 32),
                   options={"num_warps": num_warps, "num_stages": num_stages})
