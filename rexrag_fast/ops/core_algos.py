"""verl-compatible reference functions for GRPO-family training: advantages, PPO clip loss, KL estimators,
loss aggregation, and REX-RAG's mixed behaviour log-prob.

Names, arguments and return values follow verl's `verl/trainer/ppo/core_algos.py`, so a verl user can swap
these in. Every function is plain eager PyTorch, one formula each, written for clarity; the fused op in
`rexrag_fast.ops.policy_loss` is tested against them.

Advantage estimators and policy losses are registered by name, as in verl (`register_adv_est`,
`register_policy_loss`; `get_adv_estimator_fn`, `get_policy_loss_fn`): `algorithm.adv_estimator` is checked
against this registry, so a new estimator is one decorated function here (plus its branch in the fused
kernel's launcher, kernels/policy_loss.py, when the fused op should run it).

Shapes: `[B, L]` = (sequences, padded response length). Masks are 0/1 (bool, int or float).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
# "+" variants: forward value of the named estimator, gradient of k2 (straight-through).
KL_TYPES_ALL = KL_TYPES + tuple(k + "+" for k in KL_TYPES)

# verl's numerical guards.
LOG_RATIO_CLAMP = 20.0  # |log pi - log pi_old| clamped before exp
K3_LOG_RATIO_CLAMP = 20.0  # |log ref - log pi| clamped before exp in k3
K3_VALUE_CLAMP = 10.0  # k3 clamped to [-10, 10]
MASKED_MEAN_EPS = 1e-8  # denominator guard of masked_mean

ADV_ESTIMATOR_REGISTRY: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}
POLICY_LOSS_REGISTRY: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {}


def _register(registry: dict[str, Callable], kind: str, name: str) -> Callable[[Callable], Callable]:
    def decorator(fn: Callable) -> Callable:
        if registry.get(name, fn) is not fn:
            raise ValueError(f"{kind} {name!r} is already registered (to {registry[name]!r})")
        registry[name] = fn
        return fn

    return decorator


def _lookup(registry: dict[str, Callable], kind: str, name: str) -> Callable:
    if name not in registry:
        raise ValueError(f"{kind}: expected one of {sorted(registry)}, got {name!r}")
    return registry[name]


def register_adv_est(name: str) -> Callable[[Callable], Callable]:
    """Decorator: register an outcome advantage estimator `fn(token_level_rewards [B, L], response_mask [B, L],
    index [B], epsilon, ...) -> (advantages [B, L], returns [B, L])` under `name`."""
    return _register(ADV_ESTIMATOR_REGISTRY, "advantage estimator", name)


def get_adv_estimator_fn(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The estimator registered as `name` (ValueError naming the registered ones otherwise)."""
    return _lookup(ADV_ESTIMATOR_REGISTRY, "adv_estimator", name)


def register_policy_loss(name: str) -> Callable[[Callable], Callable]:
    """Decorator: register a policy loss `fn(old_log_prob, log_prob, advantages, response_mask, ...)` under `name`."""
    return _register(POLICY_LOSS_REGISTRY, "policy loss", name)


def get_policy_loss_fn(name: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The policy loss registered as `name` (ValueError naming the registered ones otherwise)."""
    return _lookup(POLICY_LOSS_REGISTRY, "policy_loss", name)


def adv_estimator_names() -> tuple[str, ...]:
    """Names of the registered advantage estimators, in registration order."""
    return tuple(ADV_ESTIMATOR_REGISTRY)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """sum(values * mask) over `axis` (all if None); masked-out NaN/inf values contribute 0."""
    return (torch.where(mask.bool(), values, 0.0) * mask).sum(dim=axis)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """sum(values * mask) / (sum(mask) + 1e-8), as verl: an all-masked input gives 0, not NaN."""
    return masked_sum(values, mask, axis) / (mask.sum(dim=axis) + MASKED_MEAN_EPS)


def _dense_group_index(index: Sequence | np.ndarray | torch.Tensor, batch: int) -> torch.Tensor:
    """Map arbitrary hashable group labels (verl passes an np.ndarray of uid strings) to 0..G-1, [B]."""
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    labels = np.asarray(index)
    if labels.shape != (batch,):
        raise ValueError(f"index: expected {batch} group labels (one per sequence), got shape {labels.shape}")
    _, dense = np.unique(labels, return_inverse=True)
    return torch.as_tensor(dense.reshape(-1), dtype=torch.long)


def _group_mean_std_count(scores: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sequence (group mean, unbiased group std, group size) of `scores` [B], each [B]."""
    n_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, group, torch.ones_like(scores))
    total = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(0, group, scores)
    mean = (total / count)[group]
    sq_dev = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, group, (scores - mean) ** 2)
    std = (sq_dev / (count - 1).clamp(min=1)).sqrt()[group]
    return mean, std, count[group]


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence | np.ndarray | torch.Tensor,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome advantage (Dr. GRPO when `norm_adv_by_std_in_grpo=False`).

    `config` (verl's AlgoConfig, which verl's registry passes to every estimator) is accepted and unused, as
    in verl's own function: the std normalisation is the explicit argument.

    With r_i = sum_t token_level_rewards[i, t] and G(i) the sequences sharing `index[i]`:
        A_i = (r_i - mean_G(r)) / (std_G(r) + epsilon)   (GRPO; std unbiased, as torch.std)
        A_i =  r_i - mean_G(r)                           (Dr. GRPO, no std)
    A group of one uses mean 0 and std 1 (so A_i = r_i / (1 + epsilon), or r_i). The advantage is broadcast
    to every token: advantages[i, t] = A_i * response_mask[i, t].

    Args: token_level_rewards [B, L], response_mask [B, L], index [B] group labels (any hashable values).
    Returns: (advantages [B, L], returns [B, L]), the same tensor twice, as verl.
    """
    del config
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        group = _dense_group_index(index, scores.shape[0]).to(scores.device)
        mean, std, count = _group_mean_std_count(scores, group)
        single = count == 1
        mean = torch.where(single, torch.zeros_like(mean), mean)
        std = torch.where(single, torch.ones_like(std), std)
        adv = (scores - mean) / (std + epsilon) if norm_adv_by_std_in_grpo else scores - mean
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence | np.ndarray | torch.Tensor,
    epsilon: float = 1e-6,
    config: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (leave-one-out) outcome advantage, arXiv 2402.14740.

    For a group of n > 1 sequences with outcome rewards r:
        A_i = r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean_G(r))
    A group of one keeps A_i = r_i, as verl. `epsilon` and `config` are accepted for verl's signature and unused.

    Args: token_level_rewards [B, L], response_mask [B, L], index [B].
    Returns: (advantages [B, L], returns [B, L]).
    """
    del epsilon, config
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        group = _dense_group_index(index, scores.shape[0]).to(scores.device)
        mean, _, count = _group_mean_std_count(scores, group)
        scale = count / (count - 1).clamp(min=1)
        adv = torch.where(count > 1, scores * scale - mean * scale, scores)
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def behaviour_log_prob(old_log_prob: torch.Tensor, probe_log_prob: torch.Tensor, alpha: float) -> torch.Tensor:
    """REX-RAG's mixed behaviour log-prob, elementwise, any shape.

        log pi_b = log((1 - alpha) * exp(old) + alpha * exp(probe))
                 = logaddexp(log(1 - alpha) + old, log(alpha) + probe)

    `probe` is log mu of the probe distribution, -inf where a token was not produced by a probe (then
    log pi_b = old + log(1 - alpha)). alpha = 0 returns `old_log_prob` itself (exactly plain PPO).
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha: expected a probe share in [0, 1), got {alpha}")
    if alpha == 0.0:
        return old_log_prob
    return torch.logaddexp(old_log_prob + float(np.log1p(-alpha)), probe_log_prob + float(np.log(alpha)))


def compute_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float | None = None,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    clip_ratio_c: float | None = 3.0,
    loss_agg_mode: str = "token-mean",
    loss_scale_factor: float | None = None,
    log_ratio_clamp: float | None = LOG_RATIO_CLAMP,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vanilla PPO clipped policy loss with dual clip (verl `compute_policy_loss`).

        d      = clamp(log_prob - old_log_prob, -m, m),   ratio = exp(d)    (m = log_ratio_clamp, None: d unclamped)
        l1     = -A * ratio,   l2 = -A * clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
        lclip  = max(l1, l2)
        l3     = -A * clip_ratio_c
        loss_t = min(l3, lclip) if A < 0 else lclip          (dual clip, arXiv 1912.09729; clip_ratio_c None:
                                                              loss_t = lclip, the older verl loss REX-RAG uses)
        pg_loss          = agg_loss(loss_t, response_mask, loss_agg_mode)
        pg_clipfrac      = masked_mean(l2 > l1)
        ppo_kl           = masked_mean(-d)
        pg_clipfrac_lower = masked_mean((lclip > l3) & (A < 0))

    Args: old_log_prob, log_prob, advantages, response_mask: [B, L]; cliprange_low/high default to cliprange.
    Returns: (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), 0-d tensors.
    """
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c: the dual-clip bound must be > 1.0 (or None: no dual clip), got {clip_ratio_c}")
    cliprange_low = cliprange if cliprange_low is None else cliprange_low
    cliprange_high = cliprange if cliprange_high is None else cliprange_high
    if cliprange_low is None or cliprange_high is None:
        raise ValueError("cliprange: give cliprange, or both cliprange_low and cliprange_high")

    negative_approx_kl = log_prob - old_log_prob
    if log_ratio_clamp is not None:
        negative_approx_kl = torch.clamp(negative_approx_kl, min=-log_ratio_clamp, max=log_ratio_clamp)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)

    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)

    if clip_ratio_c is None:
        pg_loss = agg_loss(clip_pg_losses1, response_mask, loss_agg_mode, loss_scale_factor=loss_scale_factor)
        return pg_loss, pg_clipfrac, ppo_kl, torch.zeros_like(pg_clipfrac)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean(
        (torch.gt(clip_pg_losses1, pg_losses3) & (advantages < 0)).float(), response_mask)

    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode, loss_scale_factor=loss_scale_factor)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def _check_kl_type(kl_type: str) -> None:
    if kl_type == "full":
        raise NotImplementedError("kl_penalty='full' needs the whole vocabulary distribution; not supported")
    if kl_type not in KL_TYPES_ALL:
        raise ValueError(f"kl_penalty: expected one of {KL_TYPES_ALL}, got {kl_type!r}")


def kl_penalty_forward(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """Per-token KL estimate of pi vs pi_ref (Schulman, "Approximating KL divergence", 2020), any shape.

        k1 / kl        : x = logprob - ref_logprob
        abs            : |x|
        k2 / mse       : x^2 / 2
        k3 / low_var_kl: clamp(exp(y) - y - 1, -10, 10),  y = clamp(ref_logprob - logprob, -20, 20)

    A trailing "+" is ignored here (it selects the gradient, see `kl_penalty`).
    """
    _check_kl_type(kl_penalty)
    kind = kl_penalty.removesuffix("+")
    if kind in ("kl", "k1"):
        return logprob - ref_logprob
    if kind == "abs":
        return (logprob - ref_logprob).abs()
    if kind in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    kl = torch.clamp(ref_logprob - logprob, min=-K3_LOG_RATIO_CLAMP, max=K3_LOG_RATIO_CLAMP)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-K3_VALUE_CLAMP, max=K3_VALUE_CLAMP)


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """KL estimate with verl's straight-through "+" variants, any shape.

    Without "+": `kl_penalty_forward`. With "+" (e.g. "k3+"): value of the named estimator, gradient of
    k2 = (logprob - ref_logprob)^2 / 2, whose expected gradient is the gradient of KL:
        out = k2 - stopgrad(k2) + stopgrad(k_named)
    (verl passes the suffixed name on to its forward function, which rejects it; we strip the "+".)
    """
    forward_score = kl_penalty_forward(logprob, ref_logprob, kl_penalty)
    if not kl_penalty.endswith("+"):
        return forward_score
    backward_score = 0.5 * (logprob - ref_logprob).square()
    return backward_score - backward_score.detach() + forward_score.detach()


def _need_global_count(dp_size: int, name: str) -> None:
    if dp_size > 1:
        raise ValueError(f"{name}: the global count is required when dp_size > 1 (got dp_size={dp_size}), as verl")


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: int | torch.Tensor | None = None,
    global_batch_size: int | torch.Tensor | None = None,
    loss_scale_factor: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate a per-token loss [B, L] into a scalar (verl `agg_loss`; arguments in verl's order).

    With m the mask, n_s = sum_t m[s, t] and S = #{s : n_s > 0} (fully masked sequences are excluded), on
    one data-parallel rank of dp_size:
        token-mean              : sum_{s,t} m l / N * dp_size,   N = batch_num_tokens (default sum m + 1e-8)
        seq-mean-token-sum      : sum_{s: n_s>0} (sum_t m l) / G * dp_size,   G = global_batch_size
                                  (default S + 1e-8)
        seq-mean-token-mean     : sum_{s: n_s>0} (sum_t m l) / (n_s + 1e-8) / G * dp_size
        seq-mean-token-sum-norm : sum_{s,t} m l / loss_scale_factor   (default: L = loss_mask.shape[-1])
    batch_num_tokens / global_batch_size are the counts over the whole global batch (all ranks), required
    when dp_size > 1 (ValueError otherwise, as verl); with the defaults the result is this batch's own mean.
    seq-mean-token-sum-norm is verl <= 0.8's form (the fused op implements it); verl 0.9 also divides it by
    the number of sequences. The 1e-8 guards are verl's masked_mean;
    they make an all-masked batch give 0 instead of NaN and are below fp32 resolution otherwise.
    """
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            _need_global_count(dp_size, "batch_num_tokens")
            return masked_mean(loss_mat, loss_mask)
        return masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        seq_losses = masked_sum(loss_mat, loss_mask, axis=-1)
        tokens = loss_mask.sum(dim=-1)
        if loss_agg_mode == "seq-mean-token-mean":
            seq_losses = seq_losses / (tokens + MASKED_MEAN_EPS)
        seq_mask = (tokens > 0).float()
        if global_batch_size is None:
            _need_global_count(dp_size, "global_batch_size")
            return masked_mean(seq_losses, seq_mask)
        return masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return masked_sum(loss_mat, loss_mask) / scale
    raise ValueError(f"loss_agg_mode: expected one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")


# The built-in entries of the registries (verl's names).
register_adv_est("grpo")(compute_grpo_outcome_advantage)
# Dr. GRPO (arXiv 2503.20783): A_i = r_i - mean_G(r), GRPO without the std normalisation.
compute_drgrpo_outcome_advantage = register_adv_est("dr_grpo")(
    functools.partial(compute_grpo_outcome_advantage, norm_adv_by_std_in_grpo=False))
register_adv_est("rloo")(compute_rloo_outcome_advantage)
register_policy_loss("vanilla")(compute_policy_loss)
