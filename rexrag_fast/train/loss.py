"""The actor's policy loss from config: `rexrag_fast.ops.fused_policy_loss` (fused path) or the verl-style
eager composition `policy_loss_reference` (use_fused_kernels: false), plus verl's entropy bonus.

Advantages are computed once per RL step over the whole (rank-local) batch, where every group is complete,
and travel with the packed micro-batches as per-token arrays; the loss of one micro-batch is aggregated over
that micro-batch alone (the actor re-weights micro-batches, see actor.py):

    loss_mb = agg(l_pg) + kl_coef * agg(k) - entropy_coeff * agg(H)        (agg = loss_agg_mode)

Micro-batch per_token keys read: response_mask, old_logprobs, advantages, and when used ref_logprobs
(algorithm.use_kl_loss) and probe_logprobs (REX-RAG, alpha > 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from rexrag_fast.train.actor import LossFn
from rexrag_fast.train.config import AlgorithmConfig
from rexrag_fast.train.packing import PackedBatch


def sequence_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, algo: AlgorithmConfig) -> torch.Tensor:
    """Outcome advantage per sequence [N] from rewards [N] and group ids [N] (grpo / dr_grpo / rloo).

    grpo: (r - mean_G) / (std_G + eps) (norm_adv_by_std) or r - mean_G; dr_grpo: r - mean_G;
    rloo: (r - mean of the other members of G). Same numbers as verl's core_algos estimators.
    """
    from rexrag_fast.ops.policy_loss import group_advantages

    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards and group_ids: expected two [N] tensors, got {list(rewards.shape)} and "
                         f"{list(group_ids.shape)}")
    return group_advantages(rewards, group_ids, algo.adv_estimator, algo.norm_adv_by_std, algo.norm_adv_eps)


def _segment_agg(values: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
    """agg of per-token values [T] over response tokens: token-mean, seq-mean-token-sum, seq-mean-token-mean."""
    m = mask.to(values.dtype)
    if mode == "token-mean":
        return (values * m).sum() / m.sum().clamp_min(1.0)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    sums = torch.zeros(lengths.numel(), dtype=values.dtype, device=values.device).index_add_(0, seq, values * m)
    if mode == "seq-mean-token-sum":
        return sums.mean()
    counts = torch.zeros_like(sums).index_add_(0, seq, m)
    return (sums / counts.clamp_min(1.0)).mean()


def make_policy_loss_fn(algo: AlgorithmConfig, *, fused: bool, alpha: float = 0.0) -> LossFn:
    """A `loss_fn(logprobs [T], entropy [T] | None, batch) -> (loss, metrics)` for `ZeroActor.update`.

    fused: `fused_policy_loss` (Triton on CUDA, its PyTorch path on the CPU); else `policy_loss_reference`.
    alpha: this step's REX-RAG probe share (0 for GRPO or a batch without probes).
    """
    from rexrag_fast.ops.policy_loss import fused_policy_loss, policy_loss_reference

    if algo.name == "grpo" and alpha != 0.0:
        raise ValueError(f"alpha: algorithm.name is grpo, so the probe share must be 0, got {alpha}")
    impl = fused_policy_loss if fused else policy_loss_reference

    def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor | None, batch: PackedBatch
                ) -> tuple[torch.Tensor, Mapping[str, Any]]:
        t = batch.per_token
        kwargs: dict[str, Any] = {}
        if fused:
            kwargs["backend"] = "auto"
        use_probe = alpha > 0
        loss, metrics = impl(
            logprobs, t["old_logprobs"].to(logprobs.dtype), t["response_mask"],
            advantages=t["advantages"].to(logprobs.dtype), cu_seqlens=batch.cu_seqlens,
            ref_logprobs=t["ref_logprobs"].to(logprobs.dtype) if algo.use_kl_loss else None,
            kl_coef=algo.kl_coef if algo.use_kl_loss else 0.0, kl_type=algo.kl_type,
            probe_logprobs=t["probe_logprobs"].to(logprobs.dtype) if use_probe else None, alpha=alpha,
            clip_ratio_low=algo.clip_ratio_low, clip_ratio_high=algo.clip_ratio_high,
            clip_ratio_c=algo.clip_ratio_c, log_ratio_clamp=algo.log_ratio_clamp, loss_agg_mode=algo.loss_agg_mode,
            **kwargs,
        )
        if algo.entropy_coeff > 0:
            if entropy is None:
                raise ValueError("algorithm.entropy_coeff > 0 needs entropy: build the actor with compute_entropy")
            loss = loss - algo.entropy_coeff * _segment_agg(entropy, t["response_mask"], batch.cu_seqlens,
                                                            algo.loss_agg_mode)
        return loss, metrics

    return loss_fn
