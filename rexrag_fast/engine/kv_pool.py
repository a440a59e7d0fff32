"""The paged KV pool: one tensor of every layer's K and V, allocated once, addressed by block id."""

from __future__ import annotations

import torch


class KVPool:
    """K and V of every layer, in fixed-size blocks addressed by block id (the BlockAllocator's ids).

    V of a layer is [num_blocks, block_size, kv_heads, head_dim]. K has the same layout, or with
    k_by_dim [num_blocks, kv_heads, head_dim, block_size]: the C++ CPU attention's layout, where one
    dimension of a block's keys is contiguous, so a vector of 16 keys' values is one load (no transpose).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, k_by_dim: bool = False) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.k_by_dim = num_kv_heads, head_dim, k_by_dim
        # [layers, 2, num_blocks, block_size, kv_heads, head_dim]; with k_by_dim, K's block is viewed as
        # [kv_heads, head_dim, block_size] (the same bytes per block, so the slots stay block-addressed)
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer i (views; shapes in the class docstring)."""
        n, bs, kv, d = self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim
        k_shape = (n, kv, d, bs) if self.k_by_dim else (n, bs, kv, d)
        return self.data[i, 0].view(k_shape), self.data[i, 1].view(n, bs, kv, d)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Pool slots of token positions [start, end) of a sequence with this block table."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]
