"""bf16 linear layers on AMX tiles for the CPU engine's small batches (csrc/linear_amx.cpp).

y = x W^T (+ b) with W packed once (`PackedLinear`) into the tiles' operand layout: [N/16][K/32] tiles of 16 K-pairs by
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


class PackedLinear:
    """y = x W^T + b through the AMX kernel, W [N, K] (fits(); CPU bf16) packed once into [N/16, K/32, 16, 32]
    and bias [N] (bf16) checked once, so that a call checks only x: [M, K] CPU bf16 -> [M, N] bf16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not fits(weight):
            raise ValueError(f"PackedLinear: expected a CPU bf16 weight [N, K] with N % 16 == 0 and K % 32 == 0, "
                             f"got {weight.dtype} {tuple(weight.shape)} on {weight.device}")
        n, k = weight.shape
        if bias is not None and (bias.shape != (n,) or bias.dtype != torch.bfloat16 or bias.device.type != "cpu"):
            raise ValueError(f"PackedLinear: expected bias [{n}] CPU bf16, got {bias.dtype} {tuple(bias.shape)} on "
                             f"{bias.device}")
        self.out_features, self.in_features = n, k
        self.packed = torch.empty(n // 16, k // 32, 16, 32, dtype=torch.bfloat16)
        extension().pack_linear_amx(weight.contiguous().data_ptr(), self.packed.data_ptr(), n, k)
        self.bias = None if bias is None else bias.contiguous()
        self._bias_ptr = 0 if self.bias is None else self.bias.data_ptr()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] CPU bf16 -> [M, N] bf16."""
        if x.dim() != 2 or x.shape[1] != self.in_features or x.dtype != torch.bfloat16 or x.device.type != "cpu":
            raise ValueError(f"PackedLinear: expected x [M, {self.in_features}] CPU bf16, got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")
        x = x.contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.bfloat16)
        if x.shape[0]:
            extension().linear_amx(x.data_ptr(), x.shape[0], self.in_features, self.packed.data_ptr(),
                                   self.out_features, self._bias_ptr, y.data_ptr())
        return y
