"""The paged KV pool: one tensor [layers, 2, num_blocks, block_size, kv_heads, head_dim] allocated once."""

from __future__ import annotations

import torch


class KVPool:
    """K and V of every layer, in fixed-size blocks addressed by block id (the BlockAllocator's ids)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer i, each [num_blocks, block_size, kv_heads, head_dim] (views)."""
        return self.data[i, 0], self.data[i, 1]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Pool slots of token positions [start, end) of a sequence with this block table."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]
