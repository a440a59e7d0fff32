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
