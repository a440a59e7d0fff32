"""Trajectory filter: keep every original and the most plausible probes, with an adaptive budget.

As in MiliLab/REX-RAG (verl/trainer/ppo/ray_trainer.py `reorder_batch` and the training loop):

- budget: keep_num = int(train_batch_size * n_agent * keep_ratio), rounded down to a multiple of the
  data-parallel world size (`multiple_of`; the reference uses trainer.n_gpus_per_node);
- rank probes by the mean old log-prob over their inserted prompt tokens (the tokens marked as revision or
  action prompts; a probe without such tokens scores 0), highest first, and keep the first keep_num;
- the kept batch is the originals in their order followed by the kept probes, best first;
- keep_ratio follows an exponential moving average of probe accuracy,
  r_0 = keep_ratio (config, 0.08), r_t = (1 - w) * r_{t-1} + w * acc_t with w = 0.1 (pandas
  ewm(alpha=0.1, adjust=False)); acc_t is the share of kept probes with reward >= 1 at step t, 0 when no
  probe was kept. Step t filters with r_{t-1}, before its own accuracy is known.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from rexrag_fast.ops._checks import check_tensor

KEEP_RATIO_EMA_WEIGHT = 0.1
DEFAULT_KEEP_RATIO = 0.08


def keep_probe_count(keep_ratio: float, train_batch_size: int, n_agent: int, multiple_of: int = 1) -> int:
    """Most probes kept: int(train_batch_size * n_agent * keep_ratio) rounded down to a multiple of multiple_of."""
    if not (isinstance(keep_ratio, (int, float)) and math.isfinite(keep_ratio) and keep_ratio >= 0):
        raise ValueError(f"keep_ratio: expected a finite value >= 0, got {keep_ratio!r}")
    for name, value in (("train_batch_size", train_batch_size), ("n_agent", n_agent), ("multiple_of", multiple_of)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    keep = int(train_batch_size * n_agent * keep_ratio)
    return keep - keep % multiple_of


def prompt_mean_logprobs(old_logprobs: Any, cu_seqlens: Any, explore_mask: Any) -> np.ndarray:
    """Mean old log-prob over each trajectory's inserted prompt tokens -> float64 [B] (0 without any).

    old_logprobs [T], cu_seqlens [B+1], explore_mask [T] bool.
        score_b = sum_{t in b, explore} old_t / max(#explore tokens in b, 1)
    """
    old = old_logprobs if isinstance(old_logprobs, torch.Tensor) else torch.as_tensor(np.asarray(old_logprobs))
    check_tensor("old_logprobs", old, ndim=1)
    if not old.is_floating_point():
        raise TypeError(f"old_logprobs: expected a floating dtype, got {old.dtype}")
    mask = explore_mask if isinstance(explore_mask, torch.Tensor) else torch.as_tensor(np.asarray(explore_mask))
    check_tensor("explore_mask", mask, shape=(old.numel(),), dtypes=(torch.bool,))
    cu = cu_seqlens if isinstance(cu_seqlens, torch.Tensor) else torch.as_tensor(np.asarray(cu_seqlens))
    check_tensor("cu_seqlens", cu, ndim=1, dtypes=(torch.int32, torch.int64))
    cu = cu.cpu().to(torch.int64)
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != old.numel() or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens: expected [B+1] non-decreasing offsets from 0 to the token count {old.numel()}, "
            f"got {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}"
        )
    seq = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])
    m = mask.cpu()
    values = torch.where(m, old.detach().cpu().double(), torch.zeros((), dtype=torch.float64))
    sums = torch.zeros(cu.numel() - 1, dtype=torch.float64).index_add_(0, seq, values)
    counts = torch.zeros(cu.numel() - 1, dtype=torch.float64).index_add_(0, seq, m.double())
    return (sums / counts.clamp(min=1)).numpy()


def select_trajectories(is_probe: Any, scores: Any, max_probes: int) -> np.ndarray:
    """Indices of the kept trajectories -> int64 [K]: all originals in order, then <= max_probes probes.

    is_probe [B] bool, scores [B] (probe ranking key, e.g. `prompt_mean_logprobs`; ignored for originals).
    Probes are taken highest score first; equal scores keep batch order (stable sort).
    """
    probe = is_probe.detach().cpu().numpy() if isinstance(is_probe, torch.Tensor) else np.asarray(is_probe)
    if probe.ndim != 1 or probe.dtype != np.bool_:
        raise ValueError(f"is_probe: expected a 1-D bool array, got shape {probe.shape} dtype {probe.dtype}")
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    s = s.astype(np.float64)
    if s.shape != probe.shape:
        raise ValueError(f"scores: expected shape {list(probe.shape)}, got {list(s.shape)}")
    if np.isnan(s[probe]).any():
        raise ValueError("scores: NaN score for a probe; expected finite mean prompt log-probs")
    if not isinstance(max_probes, (int, np.integer)) or max_probes < 0:
        raise ValueError(f"max_probes: expected a non-negative integer, got {max_probes!r}")
    probes = np.flatnonzero(probe)
    ranked = probes[np.argsort(-s[probes], kind="stable")][:max_probes]
    return np.concatenate([np.flatnonzero(~probe), ranked]).astype(np.int64)


def probe_accuracy(rewards: Any, is_probe: Any) -> float:
    """Share of probes with reward >= 1 among the kept batch; 0.0 when it holds no probe (as the reference)."""
    probe = is_probe.detach().cpu().numpy() if isinstance(is_probe, torch.Tensor) else np.asarray(is_probe)
    r = rewards.detach().cpu().double().numpy() if isinstance(rewards, torch.Tensor) else np.asarray(rewards)
    r = r.astype(np.float64)
    if probe.ndim != 1 or probe.dtype != np.bool_ or r.shape != probe.shape:
        raise ValueError(
            f"rewards [B] and is_probe [B] bool expected, got shapes {list(r.shape)} and {list(probe.shape)} "
            f"(is_probe dtype {probe.dtype})"
        )
    if not probe.any():
        return 0.0
    return float((r[probe] >= 1.0).mean())


class KeepRatio:
    """Exponential moving average of probe accuracy that sets the probe budget.

    value starts at `initial`; update(acc): value <- (1 - weight) * value + weight * acc.
    """

    def __init__(self, initial: float = DEFAULT_KEEP_RATIO, weight: float = KEEP_RATIO_EMA_WEIGHT) -> None:
        if not (isinstance(initial, (int, float)) and math.isfinite(initial) and 0 <= initial <= 1):
            raise ValueError(f"keep_ratio: expected an initial value in [0, 1], got {initial!r}")
        if not (isinstance(weight, (int, float)) and 0 < weight <= 1):
            raise ValueError(f"weight: expected an EMA weight in (0, 1], got {weight!r}")
        self.value = float(initial)
        self.weight = float(weight)

    def update(self, accuracy: float) -> float:
        """Fold one step's probe accuracy into the average; returns the new keep ratio."""
        acc = float(accuracy)
        if not 0.0 <= acc <= 1.0:
            raise ValueError(f"accuracy: expected a probe accuracy in [0, 1], got {accuracy!r}")
        self.value = (1.0 - self.weight) * self.value + self.weight * acc
        return self.value

    def state_dict(self) -> dict[str, float]:
        """Checkpointable state."""
        return {"value": self.value, "weight": self.weight}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from `state_dict()`."""
        restored = KeepRatio(state["value"], state["weight"])
        self.value, self.weight = restored.value, restored.weight
