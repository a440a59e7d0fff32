"""bf16 linear layers on AMX tiles for the CPU engine's small batches (csrc/linear_amx.cpp).

y = x W^T (+ b) with W packed once (`pack`) into the tiles' operand layout: [N/16][K/32] tiles of 16 K-pairs by
16 columns, a column block's tiles contiguous, so a call streams W in order. It serves decode steps (rows
<= MAX_ROWS), where a step reads every weight once and oneDNN's packed linear spent ~17 us a call before any
work on a 2-core Xeon (120 calls a SmolLM2 step; this kernel: one OpenMP region, 7-31 us for SmolLM2's layers
at 16 rows against oneDNN's 22-69 us). Larger batches (prefill) go to torch's matmul on the unpacked W.
Results are the fp32 accumulation rounded once to bf16 (as a bf16 matmul's), in another summation order.
"""

from __future__ import annotations

import torch

from rexrag_fast.engine.cpu_attention import extension, extension_has

MAX_ROWS = 64  # rows a call takes through the tiles; above it torch's matmul is as fast and needs no packing


def available() -> bool:
    """True when the extension has the kernel and this CPU and OS run AMX-BF16."""
    return extension_has("linear_amx", "pack_linear_amx", "cpu_has_amx_bf16") and extension().cpu_has_amx_bf16()


def fits(weight: torch.Tensor) -> bool:
    """True when weight [N, K] has the kernel's shape: N % 16 == 0 and K % 32 == 0."""
    return weight.dim() == 2 and weight.shape[0] % 16 == 0 and weight.shape[1] % 32 == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] (contiguous CPU bf16, fits()) -> the packed copy [N/16, K/32, 16, 32] that linear reads."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not fits(weight):
        raise ValueError(f"cpu_linear.pack: expected a CPU bf16 weight [N, K] with N % 16 == 0 and K % 32 == 0, "
                         f"got {weight.dtype} {tuple(weight.shape)} on {weight.device}")
    weight = weight.contiguous()
    n, k = weight.shape
    packed = torch.empty(n // 16, k // 32, 16, 32, dtype=torch.bfloat16)
    extension().pack_linear_amx(weight.data_ptr(), packed.data_ptr(), n, k)
    return packed


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bf16 -> x W^T + bias [M, N] bf16, W as pack() left it ([N/16, K/32, 16, 32]), bias [N] bf16."""
    if packed.dim() != 4 or packed.shape[2:] != (16, 32) or packed.dtype != torch.bfloat16:
        raise ValueError(f"cpu_linear.linear: expected a packed weight [N/16, K/32, 16, 32] bf16 from pack(), got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    n, k = packed.shape[0] * 16, packed.shape[1] * 32
    if x.dim() != 2 or x.shape[1] != k or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError(f"cpu_linear.linear: expected x [M, {k}] CPU bf16, got {x.dtype} {tuple(x.shape)} on "
                         f"{x.device}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
        raise ValueError(f"cpu_linear.linear: expected bias [{n}] contiguous bf16, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    if x.shape[0]:
        extension().linear_amx(x.data_ptr(), x.shape[0], k, packed.data_ptr(), n,
                               0 if bias is None else bias.data_ptr(), y.data_ptr())
    return y
