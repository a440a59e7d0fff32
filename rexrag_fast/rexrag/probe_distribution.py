"""REX-RAG's probe distribution mu and the policy-correction inputs of the loss.

A probe is an original dead-end trajectory cut at its answer, with an exploratory prompt appended and then
continued by the policy. The loss treats the whole batch as drawn from the mixture

    behaviour(token) = (1 - alpha) * pi_old(token) + alpha * mu(token),    alpha = kept probes / batch size

and divides the current policy by it. This module computes log mu per token, aligned with the packed
trajectory tokens (`probe_logprobs [T]`, the DESIGN.md contract), and alpha; the mixture itself is formed
inside `rexrag_fast.ops.fused_policy_loss(probe_logprobs=..., alpha=...)`.

mu per token (as in MiliLab/REX-RAG, verl/workers/actor/dp_actor.py `update_policy`):

- originals: mu = 0 everywhere (log mu = -inf), so their behaviour is (1 - alpha) * pi_old;
- probes, tokens of the question prompt (not trained): mu = pi_old;
- probes, the j response-side tokens before the branch point (model tokens and retrieved information alike,
  j = branch position counted from the first token after the question prompt):
  mu = pi_old / err^(1/j), i.e. log mu = log pi_old - log(err) / j, so that the product over the prefix is
  pi_old(prefix) / err, with err = 1 - accuracy of the originals in the batch;
- probes, the inserted prompt tokens: mu = 1 for the first one; for the k-th (k >= 1) the empirical
  frequency, over the tokenised pool, of that token following the first k inserted tokens
  (`PromptTrie.next_token_frequency`);
- probes, tokens after the inserted prompt: mu = pi_old.

The reference has no clamp on err (err = 0 would give mu = inf); here err is floored at `min_error_rate`.
err = 0 with probes in the batch cannot happen when the same rewards pick the dead ends and measure the
accuracy (every probe comes from a failed original, and every original is kept by the filter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rexrag_fast.ops._checks import check_tensor

MIN_ERROR_RATE = 1e-6

_INT_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Node:
    __slots__ = ("children", "count", "continuing")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        # count: pool sequences having this node's prefix; continuing: those with a token after it.
        self.count = 0
        self.continuing = 0


class PromptTrie:
    """Prefix trie over the tokenised prompt pool, with how many pool prompts pass through each node.

    freq(t | p) = #{pool prompts starting with p + [t]} / #{pool prompts starting with p and longer than p}
    (prompts that end exactly at p do not count, as in the reference's PrefixIndex).
    """

    def __init__(self, token_seqs: Sequence[Sequence[int]]) -> None:
        if isinstance(token_seqs, (str, bytes)) or not isinstance(token_seqs, Sequence) or not token_seqs:
            raise ValueError("token_seqs: expected a non-empty list of token-id lists")
        self._root = _Node()
        self.num_prompts = 0
        self._probs_cache: dict[tuple[int, ...], np.ndarray] = {}
        for i, seq in enumerate(token_seqs):
            ids = [int(t) for t in seq]
            if not ids:
                raise ValueError(f"token_seqs[{i}]: expected at least one token, got an empty sequence")
            if min(ids) < 0:
                raise ValueError(f"token_seqs[{i}]: expected non-negative token ids, got {ids}")
            self._insert(ids)

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], tokenizer: Any) -> PromptTrie:
        """Build the trie from prompt texts tokenised as a probe appends them (no special tokens)."""
        from rexrag_fast.rexrag.prompts import tokenize_prompts

        return cls(tokenize_prompts(prompts, tokenizer))

    def _insert(self, ids: list[int]) -> None:
        self.num_prompts += 1
        node = self._root
        node.count += 1
        for t in ids:
            node.continuing += 1
            node = node.children.setdefault(t, _Node())
            node.count += 1

    def _walk(self, prefix: Sequence[int]) -> _Node | None:
        node = self._root
        for t in prefix:
            node = node.children.get(int(t))
            if node is None:
                return None
        return node

    def next_token_frequency(self, prefix: Sequence[int], token: int) -> float:
        """freq(token | prefix) over the pool; 0.0 when `token` never follows `prefix`.

        Raises ValueError when no pool prompt continues past `prefix` (the reference raises KeyError).
        """
        node = self._walk(prefix)
        if node is None or node.continuing == 0:
            raise ValueError(f"prefix {list(prefix)}: no prompt of the pool starts with it and continues")
        child = node.children.get(int(token))
        return 0.0 if child is None else child.count / node.continuing

    def inserted_token_probs(self, tokens: Sequence[int]) -> np.ndarray:
        """mu of each inserted prompt token -> float64 [P].

        mu[0] = 1; mu[k] = freq(tokens[k] | tokens[:k]) for k >= 1. `tokens` must be a path of the trie
        (a pool prompt or a prefix of one); anything else means the probe's span is not a pool prompt.
        """
        key = tuple(int(t) for t in tokens)
        cached = self._probs_cache.get(key)
        if cached is not None:
            return cached
        if not key:
            raise ValueError("tokens: expected at least one inserted token, got none")
        node = self._root.children.get(key[0])
        if node is None:
            raise ValueError(f"inserted tokens {list(key)}: first token {key[0]} starts no prompt of the pool")
        probs = np.ones(len(key), dtype=np.float64)
        for k in range(1, len(key)):
            child = node.children.get(key[k])
            if child is None:
                raise ValueError(
                    f"inserted tokens {list(key)}: token {key[k]} at offset {k} never follows "
                    f"{list(key[:k])} in the pool; the span is not a pool prompt"
                )
            probs[k] = child.count / node.continuing
            node = child
        self._probs_cache[key] = probs
        return probs


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _bool_array(name: str, x: Any) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if a.dtype != np.bool_:
        raise TypeError(f"{name}: expected booleans, got dtype {a.dtype}")
    return a


def _reward_array(name: str, x: Any, size: int) -> np.ndarray:
    a = x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.shape != (size,):
        raise ValueError(f"{name}: expected shape [{size}], got {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: expected finite rewards, got {a[~np.isfinite(a)][:4].tolist()}")
    return a


def original_accuracy(rewards: Any, is_probe: Any) -> float:
    """Share of original trajectories answered correctly: mean over originals of [reward >= 1].

    rewards [B] (exact match), is_probe [B] bool.
    """
    probe = _bool_array("is_probe", is_probe)
    r = _reward_array("rewards", rewards, probe.shape[0])
    originals = ~probe
    if not originals.any():
        raise ValueError("is_probe: the batch has no original trajectory, so their accuracy is undefined")
    return float((r[originals] >= 1.0).mean())


def error_rate(rewards: Any, is_probe: Any, min_error_rate: float = MIN_ERROR_RATE) -> float:
    """err = max(1 - original_accuracy(rewards, is_probe), min_error_rate)."""
    if not 0.0 < min_error_rate <= 1.0:
        raise ValueError(f"min_error_rate: expected a value in (0, 1], got {min_error_rate}")
    return max(1.0 - original_accuracy(rewards, is_probe), min_error_rate)


def probe_share(is_probe: Any) -> float:
    """alpha = (number of probes) / (number of trajectories) in the (filtered) batch. is_probe [B] bool."""
    probe = _bool_array("is_probe", is_probe)
    if probe.size == 0:
        raise ValueError("is_probe: expected at least one trajectory, got an empty batch")
    return float(probe.mean())


@dataclass(frozen=True)
class ExploreSpans:
    """Where each trajectory's inserted prompt lies, from a packed explore mask.

    is_probe [B] bool; start [B] (offset of the first inserted token inside its trajectory, -1 for
    originals); length [B] (number of inserted tokens, 0 for originals). Integer arrays are int64 numpy.
    """

    is_probe: np.ndarray
    start: np.ndarray
    length: np.ndarray


def _check_packed(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=_INT_DTYPES)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected [B+1] offsets with B >= 1, got {cu_seqlens.numel()} entries")
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    first, last = int(cu[0]), int(cu[-1])
    if first != 0 or last != total or bool((lengths < 0).any()):
        raise ValueError(
            f"cu_seqlens: expected non-decreasing offsets from 0 to the token count {total}, "
            f"got start {first}, end {last}"
        )
    return cu


def explore_spans(explore_mask: Any, cu_seqlens: Any) -> ExploreSpans:
    """Locate the inserted prompt of every trajectory.

    explore_mask [T] bool (True on inserted exploratory-prompt tokens, e.g. component == EXPLORE_PROMPT),
    cu_seqlens [B+1]. A trajectory is a probe when it has inserted tokens; they must be contiguous.
    """
    mask = _as_tensor(explore_mask)
    check_tensor("explore_mask", mask, ndim=1, dtypes=(torch.bool,))
    cu = _check_packed(_as_tensor(cu_seqlens), mask.numel()).cpu()
    b = cu.numel() - 1
    idx = mask.cpu().nonzero().squeeze(1)
    seq = torch.searchsorted(cu, idx, right=True) - 1
    count = torch.zeros(b, dtype=torch.int64).scatter_add_(0, seq, torch.ones_like(idx))
    first = torch.full((b,), mask.numel(), dtype=torch.int64).scatter_reduce_(0, seq, idx, "amin")
    last = torch.full((b,), -1, dtype=torch.int64).scatter_reduce_(0, seq, idx, "amax")
    is_probe = count > 0
    gaps = is_probe & (last - first + 1 != count)
    if bool(gaps.any()):
        i = int(gaps.nonzero()[0])
        raise ValueError(
            f"explore_mask: trajectory {i} has {int(count[i])} inserted tokens spread over offsets "
            f"{int(first[i] - cu[i])}..{int(last[i] - cu[i])}; expected one contiguous inserted prompt"
        )
    start = torch.where(is_probe, first - cu[:-1], torch.full_like(first, -1))
    return ExploreSpans(is_probe=is_probe.numpy(), start=start.numpy(), length=count.numpy())


def probe_logprobs(
    old_logprobs: Any,
    cu_seqlens: Any,
    input_ids: Any,
    explore_mask: Any,
    prompt_lens: Any,
    trie: PromptTrie,
    error_rate: float,
) -> Any:
    """log mu per token of a packed batch -> [T], same type (torch or numpy), dtype and device as old_logprobs.

    old_logprobs [T] (log pi_old of each token), cu_seqlens [B+1], input_ids [T], explore_mask [T] bool,
    prompt_lens [B] (question-prompt tokens at the start of each trajectory; the response side starts
    there), trie over the tokenised pool, error_rate = err in (0, 1].

        originals:                             log mu = -inf
        probes, question prompt:               log mu = old
        probes, response side before branch:  log mu = old - log(err) / j,   j = branch - prompt_len
        probes, inserted prompt token k:       log mu = log freq(t_k | t_0..t_{k-1}),  log mu_0 = 0
        probes, after the inserted prompt:     log mu = old
    """
    as_numpy = not isinstance(old_logprobs, torch.Tensor)
    old = _as_tensor(old_logprobs)
    check_tensor("old_logprobs", old, ndim=1, dtypes=_FLOAT_DTYPES)
    total = old.numel()
    ids = _as_tensor(input_ids)
    check_tensor("input_ids", ids, shape=(total,), dtypes=_INT_DTYPES)
    cu = _check_packed(_as_tensor(cu_seqlens), total).cpu()
    b = cu.numel() - 1
    plens = _as_tensor(prompt_lens)
    check_tensor("prompt_lens", plens, shape=(b,), dtypes=_INT_DTYPES)
    plens = plens.cpu().to(torch.int64)
    seqlens = cu[1:] - cu[:-1]
    if bool(((plens < 0) | (plens > seqlens)).any()):
        i = int(((plens < 0) | (plens > seqlens)).nonzero()[0])
        raise ValueError(f"prompt_lens[{i}] = {int(plens[i])}: expected 0..{int(seqlens[i])} (its length)")
    if not (isinstance(error_rate, (int, float)) and 0.0 < error_rate <= 1.0 and math.isfinite(error_rate)):
        raise ValueError(f"error_rate: expected err = 1 - original accuracy in (0, 1], got {error_rate!r}")
    mask = _as_tensor(explore_mask)
    check_tensor("explore_mask", mask, shape=(total,), dtypes=(torch.bool,))
    spans = explore_spans(mask, cu)
    start = torch.from_numpy(spans.start)
    early = torch.from_numpy(spans.is_probe) & (start < plens)
    if bool(early.any()):
        i = int(early.nonzero()[0])
        raise ValueError(
            f"explore_mask: trajectory {i} has its inserted prompt at offset {int(start[i])}, inside its "
            f"question prompt of {int(plens[i])} tokens; expected it on the response side"
        )

    device = old.device
    work_dtype = torch.float64 if old.dtype == torch.float64 else torch.float32
    is_probe = torch.from_numpy(spans.is_probe)
    seq = torch.repeat_interleave(torch.arange(b), seqlens)
    pos = torch.arange(total) - cu[:-1][seq]
    j = (start - plens).clamp(min=1).to(torch.float64)
    shift_per_seq = torch.where(is_probe, -math.log(error_rate) / j, torch.zeros_like(j))
    in_prefix = is_probe[seq] & (pos >= plens[seq]) & (pos < start[seq])
    shift = torch.where(in_prefix, shift_per_seq[seq], torch.zeros(total, dtype=torch.float64))

    out = old.to(work_dtype) + shift.to(device=device, dtype=work_dtype)
    out = torch.where(is_probe[seq].to(device), out, torch.full_like(out, -math.inf))

    explore_idx = mask.nonzero().squeeze(1)
    if explore_idx.numel():
        tokens = ids[explore_idx].cpu().tolist()
        values, offset = [], 0
        for n in spans.length[spans.is_probe].tolist():
            values.append(trie.inserted_token_probs(tokens[offset : offset + n]))
            offset += n
        log_mu = torch.from_numpy(np.log(np.concatenate(values)))
        out[explore_idx] = log_mu.to(device=device, dtype=work_dtype)

    out = out.to(old.dtype)
    return out.numpy() if as_numpy else out


@dataclass(frozen=True)
class PolicyCorrection:
    """What the loss needs: probe_logprobs [T] (log mu), alpha (share of probes), and the err used."""

    probe_logprobs: Any
    alpha: float
    error_rate: float


def policy_correction(
    old_logprobs: Any,
    cu_seqlens: Any,
    input_ids: Any,
    explore_mask: Any,
    prompt_lens: Any,
    rewards: Any,
    trie: PromptTrie,
    min_error_rate: float = MIN_ERROR_RATE,
) -> PolicyCorrection:
    """The whole correction for a filtered, packed batch (see `probe_logprobs` for the shapes).

    rewards [B] (exact match of each trajectory) give err = 1 - accuracy of the originals; probes are the
    trajectories with inserted tokens in explore_mask; alpha = probes / B.
    """
    spans = explore_spans(explore_mask, cu_seqlens)
    err = error_rate(rewards, spans.is_probe, min_error_rate)
    logmu = probe_logprobs(old_logprobs, cu_seqlens, input_ids, explore_mask, prompt_lens, trie, err)
    return PolicyCorrection(probe_logprobs=logmu, alpha=probe_share(spans.is_probe), error_rate=err)
