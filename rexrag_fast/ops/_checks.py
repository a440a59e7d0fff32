"""Argument checks at the op boundary, with errors that name the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rexrag_fast.kernels.launch import can_launch

BACKENDS = ("auto", "triton", "torch")


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Validate one tensor argument; `None` entries in `shape` match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and (
        t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape))
    ):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    return t


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick 'triton' or 'torch' for tensors on `device`.

    auto -> Triton on CUDA tensors, the PyTorch path on CPU tensors (the interpreter is far too slow to
    be chosen automatically; tests ask for backend='triton' explicitly under TRITON_INTERPRET=1).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and can_launch(device) else "torch"
    if backend == "triton" and not can_launch(device):
        raise RuntimeError(
            f"backend='triton' cannot run on {device}: Triton kernels need a CUDA tensor, "
            "or TRITON_INTERPRET=1 set before rexrag_fast is imported to interpret them on the CPU"
        )
    return backend
