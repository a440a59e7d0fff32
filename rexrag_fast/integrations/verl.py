"""rexrag-fast's fused kernels inside verl, turned on by one config value each.

    import rexrag_fast.integrations.verl   # registers into verl's registries when verl is installed
    # in verl's own config, so that every Ray worker imports it too:
    actor_rollout_ref.model.external_lib=rexrag_fast.integrations.verl

    actor_rollout_ref.actor.policy_loss.loss_mode=rexrag_fast      the fused PPO clip loss (`fused_policy_loss`)
    algorithm.adv_estimator=rexrag_fast_grpo | rexrag_fast_dr_grpo | rexrag_fast_rloo   group advantages
                                                                   without a host sync (one sort + segment sums)

The policy loss follows verl's registry contract (verl/trainer/ppo/core_algos.py, `PolicyLossFn`):
`fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)` ->
`(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})`, reading clip_ratio,
clip_ratio_low / _high / _c and global_batch_info (dp_size, batch_num_tokens, global_batch_size) from the actor
config, so the value equals verl's `compute_policy_loss_vanilla`. The estimators follow verl's
`adv_estimator_fn(token_level_rewards, response_mask, config, index)` -> (advantages, returns).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import torch

from rexrag_fast.ops import core_algos
from rexrag_fast.ops.policy_loss import fused_policy_loss, group_advantages

POLICY_LOSS_NAME = "rexrag_fast"
ADV_ESTIMATOR_NAMES = {"rexrag_fast_grpo": "grpo", "rexrag_fast_dr_grpo": "dr_grpo", "rexrag_fast_rloo": "rloo"}


def _get(config: Any, name: str, default: Any = None) -> Any:
    """config.name for verl's ActorConfig / AlgoConfig dataclasses and OmegaConf DictConfigs alike."""
    if config is None:
        return default
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def verl_fused_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    **_unused: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's vanilla PPO policy loss computed by `fused_policy_loss` (all tensors [B, L]).

    global_batch_info in the config rescales the per-micro-batch mean to verl's global normalisation:
        token-mean: x (sum m) / batch_num_tokens * dp_size;  seq-mean-*: x S / global_batch_size * dp_size
    rollout_is_weights (per-token importance weights of verl's rollout correction) are not fused: an error,
    not a silently different loss."""
    if rollout_is_weights is not None:
        raise NotImplementedError("rollout_is_weights: the fused loss has no per-token weight input; turn "
                                  "verl's algorithm.rollout_is off or use loss_mode=vanilla")
    clip = _get(config, "clip_ratio", 0.2)
    info = dict(_get(config, "global_batch_info", {}) or {})
    loss, m = fused_policy_loss(
        log_prob, old_log_prob, response_mask, advantages=advantages, clip_ratio=clip,
        clip_ratio_low=_get(config, "clip_ratio_low", clip), clip_ratio_high=_get(config, "clip_ratio_high", clip),
        clip_ratio_c=_get(config, "clip_ratio_c", 3.0), loss_agg_mode=loss_agg_mode,
        loss_scale_factor=_get(config, "loss_scale_factor", None))
    dp = info.get("dp_size", 1)
    if loss_agg_mode == "token-mean" and info.get("batch_num_tokens") is not None:
        loss = loss * (response_mask.sum() / info["batch_num_tokens"] * dp)
    elif loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean") and info.get("global_batch_size") is not None:
        loss = loss * ((response_mask.sum(dim=-1) > 0).sum() / info["global_batch_size"] * dp)
    metrics = {f"actor/{k}": m[k].detach().item() for k in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")}
    return loss, metrics


def _estimator(kind: str):
    def estimate(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any = None,
                 epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True, config: Any = None,
                 **_unused: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if index is None:
            raise ValueError("index: group labels (verl's uid) are required for group advantages")
        rewards = token_level_rewards.sum(dim=-1).float()
        groups = core_algos._dense_group_index(np.asarray(index, dtype=object), rewards.shape[0]).to(rewards.device)
        norm = bool(_get(config, "norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo))
        with torch.no_grad():
            adv = group_advantages(rewards, groups, kind, norm_adv_by_std=norm, epsilon=epsilon)
            adv = adv.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
        return adv, adv

    estimate.__name__ = f"verl_{kind}_advantage"
    estimate.__doc__ = (f"{kind} outcome advantage [B, L] for verl's registry, from token_level_rewards [B, L], "
                        "response_mask [B, L] and index [B] (fused group statistics, no host sync).")
    return estimate


ESTIMATORS = {name: _estimator(kind) for name, kind in ADV_ESTIMATOR_NAMES.items()}


def register() -> None:
    """Register the policy loss and the estimators in verl's registries (idempotent). ImportError saying
    what to install when verl is missing."""
    try:
        from verl.trainer.ppo import core_algos as verl_core_algos
    except ImportError as e:
        raise ImportError(f"rexrag_fast.integrations.verl needs verl (pip install verl): {e}") from e
    verl_core_algos.register_policy_loss(POLICY_LOSS_NAME)(verl_fused_policy_loss)
    for name, fn in ESTIMATORS.items():
        if verl_core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is not fn:
            verl_core_algos.register_adv_est(name)(fn)


if importlib.util.find_spec("verl") is not None:
    register()
