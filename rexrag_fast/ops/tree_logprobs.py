"""Log-probs of a transformers causal LM over a token tree: every shared prefix token computed once.

A token tree (train/token_tree.py's TokenTree) holds N nodes in depth-first preorder: node i has a token, a depth
(its position id in every sequence through it), a parent (-1 at roots) and a subtree [i, subtree_end[i]).
Running the model's own layers over the N nodes with

    position_ids = depth,    attention(i -> j) allowed iff j is an ancestor-or-self of i iff j <= i < end[j]

gives every node exactly the hidden state it has in each flat sequence through it (same tokens before it, same
positions, same causal mask), so only attention and positions change. transformers (>= 4.53, 5.x) passes a
4-D mask through untouched (`masking_utils._preprocess_mask_arguments`): an additive [1, 1, N, N] mask in the
model's dtype for sdpa and eager (ops/attention_masks.py says why additive), and a FlexAttention BlockMask
(O(N) memory, block-sparse) when the model runs attn_implementation="flex_attention" or TREE_ATTENTION. The
dense mask holds N^2 entries: fine for CPU-sized packs. TREE_ATTENTION (`enable_flex_tree_attention`, what
the actor uses on CUDA) is sdpa for everything a BlockMask is not, so flat packs run exactly as under sdpa
and tree packs get FlexAttention.

The next-token convention follows the tree: a node's log-prob is that of its token given its parent's hidden
state, log p(x_i | ancestors of i) = linear_logprobs(h[parent(i)], x_i). A shared node with several children
thus yields a different log-prob for each child, and the lm head runs once per tree edge (N - roots rows),
not once per flat token. Roots have nothing predicting them: log-prob 0, entropy 0, no gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from rexrag_fast.ops._checks import check_tensor
from rexrag_fast.ops.attention_masks import TREE_ATTENTION, additive_mask, tree_attention_mask
from rexrag_fast.ops.causal_lm import head_logprobs, split_causal_lm

MASK_KINDS = ("auto", "additive", "bool", "flex")


def _sdpa_or_flex_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    impl = flex_attention_forward if isinstance(attention_mask, BlockMask) else sdpa_attention_forward
    return impl(module, query, key, value, attention_mask, **kwargs)


def enable_flex_tree_attention(model: torch.nn.Module) -> None:
    """Switch an sdpa transformers model to TREE_ATTENTION: flat packs keep sdpa (and transformers' sdpa masks),
    tree packs get a FlexAttention BlockMask instead of a dense [N, N] one. Other implementations are left
    as they are (eager and flex_attention already take tree masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(TREE_ATTENTION, _sdpa_or_flex_attention)
    AttentionMaskInterface.register(TREE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(TREE_ATTENTION)


def tree_block_mask(subtree_end: torch.Tensor) -> Any:
    """The same mask as a FlexAttention BlockMask [1, 1, N, N] (blocks outside every ancestor range skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    end = subtree_end.long()
    n = end.numel()

    def ancestor(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (kv <= q) & (q < end[kv])

    return create_block_mask(ancestor, B=1, H=1, Q_LEN=n, KV_LEN=n, device=end.device)


def _model_mask(model: torch.nn.Module, subtree_end: torch.Tensor, kind: str, dtype: torch.dtype) -> Any:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
    if kind == "auto":
        kind = {"sdpa": "additive", "eager": "additive", "flex_attention": "flex", TREE_ATTENTION: "flex"}.get(impl, "")
        if not kind:
            raise ValueError(
                f"model: attn_implementation {impl!r} takes no custom attention mask; tree packing needs "
                "'sdpa', 'eager' or 'flex_attention' (or actor.tree_packing=off)")
    if kind == "flex":
        return tree_block_mask(subtree_end)
    allowed = tree_attention_mask(subtree_end)
    return allowed[None, None] if kind == "bool" else additive_mask(allowed, dtype)


def tree_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    parent: torch.Tensor,
    subtree_end: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    fused: bool = True,
    mask: str = "auto",
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-node log-probs (and entropies) of a token tree under a transformers causal LM.

    Args:
        model: a transformers *ForCausalLM (backbone + Linear lm head), attn_implementation sdpa / eager /
            flex_attention.
        input_ids: [N] node tokens, nodes in depth-first preorder.
        position_ids: [N] node depths (0 at roots).
        parent: [N] int64 parent node (< the node), -1 at roots.
        subtree_end: [N] int64 exclusive end of each node's subtree.
        temperature, backend: passed to the lm-head log-probs (`linear_logprobs`).
        return_entropy: also return, per node, the entropy of the distribution that predicts it.
        fused: False materialises the fp32 logits of the N - roots edges (the eager path).
        mask: 'auto' (from the model's attn_implementation: additive for sdpa and eager, flex for
            flex_attention), 'additive' (float, the model's dtype), 'bool' or 'flex' (BlockMask).

    Returns:
        logprobs [N] fp32: log p(input_ids[i] | ancestors of i), 0 at roots; with `return_entropy`, entropy
        [N] fp32 (0 at roots). Differentiable w.r.t. the model's parameters.
    """
    check_tensor("input_ids", input_ids, ndim=1, dtypes=(torch.int64, torch.int32))
    n = input_ids.shape[0]
    for name, t in (("position_ids", position_ids), ("parent", parent), ("subtree_end", subtree_end)):
        check_tensor(name, t, shape=(n,), dtypes=(torch.int64, torch.int32), device=input_ids.device)
    if mask not in MASK_KINDS:
        raise ValueError(f"mask: expected one of {MASK_KINDS}, got {mask!r}")
    backbone, head = split_causal_lm(model)
    dtype = head.weight.dtype
    attn = _model_mask(model, subtree_end, mask, dtype)
    out = backbone(input_ids=input_ids[None].long(), position_ids=position_ids[None].long(), attention_mask=attn,
                   use_cache=False)
    hidden = out.last_hidden_state[0]
    child = torch.nonzero(parent >= 0).squeeze(1)
    res = head_logprobs(hidden[parent[child].long()], head, input_ids[child].long(), temperature=temperature,
                        return_entropy=return_entropy, backend=backend, fused=fused)
    per_edge = res if isinstance(res, tuple) else (res,)
    per_node = tuple(torch.zeros(n, dtype=torch.float32, device=hidden.device).index_copy(0, child, v.float())
                     for v in per_edge)
    return per_node if return_entropy else per_node[0]
