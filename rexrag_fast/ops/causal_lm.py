"""Next-token log-probs of a Hugging Face causal LM on a packed batch, through linear_logprobs.

Replaces `log_softmax(model(...).logits)` in the trainer: the backbone (model.model) runs once on the packed
tokens, and the lm head is applied by the fused op, so no [T, V] logits are ever held.

Packing: sequences are concatenated into one row of T tokens; `position_ids` restart at 0 for every
sequence. transformers (>= 4.53, 5.x) turns such position ids into a block-diagonal causal mask for the
eager, sdpa and flex attention paths (and varlen kernels for flash-attention), so tokens never attend
across a sequence boundary; for sdpa the mask comes from here instead, additive and shared by all layers
(ops/attention_masks.py: a bool one costs an fp32 copy per layer).

Label convention (verl's rolled input ids): out[t] = log p(input_ids[t + 1] | input_ids[s .. t]) for a
token t of the sequence starting at s; the last token of each sequence has no next token, so its logprob
(and entropy) is 0 and it gets no gradient. The log-prob of token t + 1 therefore sits at position t.
"""

from __future__ import annotations

import torch

from rexrag_fast.ops._checks import check_tensor
from rexrag_fast.ops.attention_masks import DENSE_MASK_ATTENTION, packed_sequence_mask
from rexrag_fast.ops.linear_logprobs import linear_logprobs, linear_logprobs_reference

IGNORE_INDEX = -100


def _positions_from_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[T] position of each token inside its sequence, for cu_seqlens [B+1] = 0, l_0, l_0 + l_1, ..., T."""
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
    if cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n_tokens:
        raise ValueError(
            f"cu_seqlens: expected [0, ..., T={n_tokens}] with at least one sequence, got {cu_seqlens.tolist()}"
        )
    lengths = cu_seqlens.diff().long()
    if bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {cu_seqlens.tolist()}")
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    return torch.arange(n_tokens, device=cu_seqlens.device) - starts


def _labels_from_positions(input_ids: torch.Tensor, position_ids: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """labels[t] = input_ids[t + 1] where t + 1 continues t's sequence (position + 1), else ignore_index."""
    labels = torch.full_like(input_ids, ignore_index)
    continues = position_ids[1:] == position_ids[:-1] + 1
    labels[:-1] = torch.where(continues, input_ids[1:], ignore_index)
    return labels


def next_token_labels(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, ignore_index: int = IGNORE_INDEX
                      ) -> torch.Tensor:
    """labels[t] = input_ids[t+1] inside a sequence, `ignore_index` at each sequence's last token. [T] -> [T]."""
    positions = _positions_from_cu_seqlens(cu_seqlens.to(input_ids.device), input_ids.shape[0])
    return _labels_from_positions(input_ids, positions, ignore_index)


def causal_lm_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    fused: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token log-probs (and entropies) of a packed batch under a transformers causal LM.

    Args:
        model: a transformers *ForCausalLM (backbone at `model.model`, head from `get_output_embeddings()`).
        input_ids: [T] packed token ids of B sequences.
        cu_seqlens: [B+1] int32 (or int64) sequence offsets, 0 .. T. Give this or `position_ids`.
        position_ids: [T] positions restarting at 0 for each sequence (a new sequence starts wherever a
            position is not the previous one + 1, as transformers detects packing).
        temperature, backend: passed to `linear_logprobs`.
        return_entropy: also return each position's entropy.
        fused: False materialises the fp32 [T, V] logits (`linear_logprobs_reference`; verl's eager path).

    Returns:
        logprobs [T] fp32 with logprobs[t] = log p(input_ids[t+1] | its prefix), 0 at each sequence's last
        token; with `return_entropy`, entropy [T] fp32 (0 at each last token). Differentiable w.r.t. the
        model's parameters.
    """
    check_tensor("input_ids", input_ids, ndim=1, dtypes=(torch.int64, torch.int32))
    n_tokens = input_ids.shape[0]
    if (cu_seqlens is None) == (position_ids is None):
        raise ValueError("causal_lm_logprobs: give exactly one of cu_seqlens [B+1] or position_ids [T]")
    if cu_seqlens is not None:
        position_ids = _positions_from_cu_seqlens(cu_seqlens.to(input_ids.device), n_tokens)
    else:
        check_tensor("position_ids", position_ids, shape=(n_tokens,), dtypes=(torch.int64, torch.int32),
                     device=input_ids.device)
        position_ids = position_ids.long()
    backbone, head = split_causal_lm(model)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    mask = packed_sequence_mask(position_ids, head.weight.dtype) if impl in DENSE_MASK_ATTENTION else None
    out = backbone(input_ids=input_ids[None].long(), position_ids=position_ids[None], attention_mask=mask,
                   use_cache=False)
    labels = _labels_from_positions(input_ids.long(), position_ids, IGNORE_INDEX)
    return head_logprobs(out.last_hidden_state[0], head, labels, temperature=temperature,
                         return_entropy=return_entropy, backend=backend, fused=fused)


def split_causal_lm(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """(backbone, lm head) of a transformers causal LM whose logits are exactly hidden @ head.weight.T + bias."""
    config = getattr(model, "config", None)
    for unsupported in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, unsupported, None) is not None:
            raise ValueError(
                f"model: config.{unsupported}={getattr(config, unsupported)!r} rescales the logits, which "
                "linear_logprobs does not model; use model(...).logits for this architecture"
            )
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(backbone, torch.nn.Module) or not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"model: expected a transformers causal LM with a backbone (`base_model_prefix`) and a Linear lm "
            f"head, got {type(model).__name__}"
        )
    return backbone, head


def head_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, temperature: float = 1.0,
                  return_entropy: bool = False, backend: str = "auto", fused: bool = True
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(labels[r] | hidden[r]) under the lm head (and the entropy of each row's distribution).

    hidden [R, H], labels [R] (IGNORE_INDEX rows give 0) -> [R] fp32 (, [R] fp32). fused: `linear_logprobs`,
    else the materialised fp32 [R, V] logits (`linear_logprobs_reference`).
    """
    if hidden.dtype != head.weight.dtype:
        hidden = hidden.to(head.weight.dtype)
    if not fused:
        return linear_logprobs_reference(hidden.float(), head.weight.float(), labels, temperature=temperature,
                                         return_entropy=return_entropy,
                                         bias=None if head.bias is None else head.bias.float(),
                                         ignore_index=IGNORE_INDEX)
    return linear_logprobs(hidden, head.weight, labels, temperature=temperature, return_entropy=return_entropy,
                           bias=head.bias, backend=backend, ignore_index=IGNORE_INDEX)
