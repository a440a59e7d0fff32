"""Dense attention masks for packed passes: the ancestor relation of a preorder token tree.

A pack of N tokens in depth-first preorder, where token i's subtree is [i, subtree_end[i]), allows
attention(i -> j) iff j is an ancestor-or-self of i iff j <= i < subtree_end[j]. A flat pack is a forest of
chains: subtree_end of every token is its sequence's end, which gives the block-diagonal causal mask.

The masks handed to a transformers model are additive ([1, 1, N, N], 0 or the dtype's minimum, in the
model's dtype), not bool: torch's sdpa turns a bool mask into an additive copy in every layer and keeps each
copy for the backward, so one additive mask shared by all layers saves (layers - 1) x N^2 x 4 bytes in fp32
(6 layers at N = 2048: 222 -> 142 MiB peak of a forward + backward).
"""

from __future__ import annotations

import torch

from rexrag_fast.ops._checks import check_tensor

# A transformers attention implementation (registered by ops.tree_logprobs.enable_flex_tree_attention): sdpa,
# or FlexAttention for a BlockMask.
TREE_ATTENTION = "rexrag_tree_flex"
# Implementations that take a dense 4-D mask as given and would otherwise get a bool one from transformers.
DENSE_MASK_ATTENTION = ("sdpa", TREE_ATTENTION)


def tree_attention_mask(subtree_end: torch.Tensor) -> torch.Tensor:
    """Ancestor-or-self mask of a preorder tree: mask[i, j] = j <= i < subtree_end[j]. [N] -> [N, N] bool."""
    check_tensor("subtree_end", subtree_end, ndim=1, dtypes=(torch.int64, torch.int32))
    node = torch.arange(subtree_end.numel(), device=subtree_end.device)
    return (node[None, :] <= node[:, None]) & (node[:, None] < subtree_end[None, :])


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """allowed [N, N] bool -> [1, 1, N, N] of `dtype`: 0 where allowed, the dtype's minimum elsewhere."""
    out = torch.zeros((1, 1, *allowed.shape), dtype=dtype, device=allowed.device)
    return out.masked_fill_(~allowed[None, None], torch.finfo(dtype).min)


def packed_sequence_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Block-diagonal causal mask of a flat pack whose positions restart at each sequence: [T] ->
    [1, 1, T, T] additive (`additive_mask`), or None when the pack holds one sequence (a plain causal pass
    needs no mask). A sequence starts wherever a position is not the previous + 1."""
    n = position_ids.numel()
    starts = torch.ones(n, dtype=torch.bool, device=position_ids.device)
    starts[1:] = position_ids[1:] != position_ids[:-1] + 1
    if not bool(starts[1:].any()):
        return None
    seq = torch.cumsum(starts.long(), 0) - 1
    ends = torch.cumsum(torch.bincount(seq), 0)[seq]
    return additive_mask(tree_attention_mask(ends), dtype)
