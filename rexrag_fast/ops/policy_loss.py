"""`fused_policy_loss`: GRPO/PPO policy loss with REX-RAG policy correction as one autograd op.

Per token t of sequence s (only tokens with response_mask = 1 count):

    A_s   = group-normalised advantage of sequence s (grpo / dr_grpo / rloo, from rewards and group_ids),
            or the given per-token `advantages`
    beh_t = log((1 - alpha) exp(old_t) + alpha exp(probe_t))
          = logaddexp(old_t + log(1 - alpha), probe_t + log(alpha))      (beh_t = old_t when alpha = 0)
    d_t   = clamp(lp_t - beh_t, -20, 20),   r_t = exp(d_t)
    l_t   = dual-clipped PPO loss of (r_t, A_s) with [1 - clip_ratio_low, 1 + clip_ratio_high] and c
    k_t   = KL estimate of (lp_t, ref_t) (kl_type), only with ref_logprobs
    loss  = agg(l) + kl_coef * agg(k)                                     (verl's use_kl_loss)

REX-RAG (MiliLab/REX-RAG, dp_actor.update_policy) replaces old_log_prob by this mixture for every token
before calling the unchanged PPO loss: originals and probes share one clip. On original trajectories
probe_t = -inf, so beh_t = old_t + log(1 - alpha); on probe trajectories probe_t = log mu_t.

Backends: "triton" runs kernels/policy_loss.py: a one-launch per-sequence pre-pass for the group
advantages, one pass over the tokens forward plus a one-program finalize (loss, metrics, backward
weights), and one pass backward, with no host sync. "torch" runs the same fused formulas with PyTorch
tensor ops and a closed-form backward (the CPU path). Neither keeps [T]-sized float intermediates for backward: backward
recomputes from the inputs. The input check (`check_inputs`) reads three flags back to the host.
`policy_loss_reference` is the clarity-first composition of the verl-compatible functions in
`core_algos`, differentiated by autograd; tests compare all three.

One file over 500 lines on purpose: it is one formula (the loss above) in its three forms, forward and
closed-form backward side by side, so that a change to the formula is made in one place in all of them.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from rexrag_fast.ops import core_algos
from rexrag_fast.ops._checks import check_tensor, resolve_backend

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
METRIC_NAMES = ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower", "kl", "ratio_mean", "is_weight_mean",
                "pg_loss", "kl_loss")
_KL_KIND = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
_EPS = core_algos.MASKED_MEAN_EPS
# Columns of the per-token sum table (same order as kernels.policy_loss.PARTIAL_NAMES).
_PG, _KL, _TOKENS, _CLIPPED, _CLIPPED_LOWER, _NEG_LOG_RATIO, _RATIO, _IS_WEIGHT = range(8)


@dataclasses.dataclass(frozen=True)
class _LossConfig:
    """Scalar settings of one call, already validated."""

    lo_bound: float  # 1 - clip_ratio_low
    hi_bound: float  # 1 + clip_ratio_high
    clip_c: float
    log1m_alpha: float  # log(1 - alpha)
    log_alpha: float  # log(alpha)
    kl_coef: float
    kl_kind: str  # k1 | abs | k2 | k3
    kl_straight: bool  # "+" variant: gradient of k2
    agg_mode: str


# --------------------------------------------------------------------------------------------------
# advantages: the per-sequence pre-pass


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    adv_estimator: str = "grpo",
    norm_adv_by_std: bool = True,
    epsilon: float = 1e-6,
) -> torch.Tensor:
    """Outcome advantage per sequence, without a host sync (sort + segment sums).

    With group G(i) of sequence i (same group id), n = |G|, m = mean_G(r), s = unbiased std_G(r):
        grpo    : (r_i - m) / (s + epsilon)      (norm_adv_by_std=False: r_i - m)
        dr_grpo : r_i - m
        rloo    : r_i * n / (n - 1) - m * n / (n - 1)
    A group of one has m = 0 (and s = 1), as verl: grpo r_i / (1 + epsilon), dr_grpo and rloo r_i.

    Any other registered estimator (core_algos.register_adv_est) runs its verl-style function on [B, 1].

    Args: rewards [B] float, group_ids [B] integer labels (any values). Returns: [B] fp32.
    """
    if adv_estimator not in ("grpo", "dr_grpo", "rloo"):
        return _registered_advantages(rewards, group_ids, adv_estimator, norm_adv_by_std, epsilon)
    r = rewards.float()
    B = r.numel()
    sorted_ids, order = torch.sort(group_ids, stable=True)
    starts = torch.ones(B, dtype=torch.bool, device=r.device)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group = torch.empty_like(order)
    group[order] = torch.cumsum(starts, 0) - 1
    count = torch.zeros(B, device=r.device).index_add_(0, group, torch.ones_like(r))
    mean = (torch.zeros(B, device=r.device).index_add_(0, group, r) / count.clamp(min=1))[group]
    dev = r - mean
    var = torch.zeros(B, device=r.device).index_add_(0, group, dev * dev) / (count - 1).clamp(min=1)
    n = count[group]
    several = n > 1
    if adv_estimator == "grpo" and norm_adv_by_std:
        return torch.where(several, dev / (var.sqrt()[group] + epsilon), r / (1.0 + epsilon))
    if adv_estimator in ("grpo", "dr_grpo"):
        return torch.where(several, dev, r)
    scale = n / (n - 1).clamp(min=1)
    return torch.where(several, r * scale - mean * scale, r)


def _registered_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, adv_estimator: str,
                           norm_adv_by_std: bool, epsilon: float) -> torch.Tensor:
    """[B] fp32 advantages from the verl-style estimator registered as `adv_estimator`, on one-token rows."""
    token_rewards = rewards.float()[:, None]
    index = group_ids.detach().cpu().numpy()
    if adv_estimator == "grpo":
        adv, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, torch.ones_like(token_rewards), index,
                                                           epsilon, norm_adv_by_std)
    else:
        adv, _ = core_algos.get_adv_estimator_fn(adv_estimator)(token_rewards, torch.ones_like(token_rewards),
                                                                index, epsilon)
    return adv[:, 0]


# --------------------------------------------------------------------------------------------------
# the "torch" backend: the fused formulas with tensor ops and a closed-form backward


def _per_token(values: torch.Tensor, cu: torch.Tensor, width: int | None, T: int) -> torch.Tensor:
    """[B] per-sequence values -> [T] per-token values (a broadcast for the padded layout)."""
    if width is not None:
        return values[:, None].expand(-1, width).reshape(-1)
    return torch.repeat_interleave(values, (cu[1:] - cu[:-1]).long(), output_size=T)


def _per_seq_sum(x: torch.Tensor, cu: torch.Tensor, width: int | None) -> torch.Tensor:
    """[T] per-token values -> [B] per-sequence sums."""
    if width is not None:
        return x.view(-1, width).sum(dim=1)
    return torch.segment_reduce(x, "sum", lengths=(cu[1:] - cu[:-1]).long())


def _token_inputs(lp, old, cu, width, adv_seq, adv_tok, ref, probe, clip_c: float):
    """fp32 per-token inputs (lp, old, probe, adv, bound, ref), all [T].

    bound = -A * c where A < 0 and +inf elsewhere: the dual-clip ceiling, so that the dual clip is a plain
    minimum and [lc > bound] is the pg_clipfrac_lower event.
    """
    if adv_tok is None:
        adv = _per_token(adv_seq, cu, width, lp.numel())
        bound = _per_token(torch.where(adv_seq < 0, -adv_seq * clip_c, torch.inf), cu, width, lp.numel())
    else:
        adv = adv_tok.float()
        bound = torch.where(adv < 0, -adv * clip_c, torch.inf)
    f = lambda t: None if t is None else t.float()  # noqa: E731
    return lp.float(), old.float(), f(probe), adv, bound, f(ref)


def _log_ratio(lp, old, probe, cfg: _LossConfig):
    """(beh, d_raw, d, ratio); d = clamp(lp - beh, -20, 20), ratio = exp(d)."""
    beh = old if probe is None else torch.logaddexp(old + cfg.log1m_alpha, probe + cfg.log_alpha)
    d_raw = lp - beh
    d = d_raw.clamp(-core_algos.LOG_RATIO_CLAMP, core_algos.LOG_RATIO_CLAMP)
    return beh, d_raw, d, torch.exp(d)


def _kl_value(x, kind: str):
    """(KL estimate, k3 before its clamp or None) from x = lp - ref."""
    if kind == "k3":
        y = (-x).clamp(-core_algos.K3_LOG_RATIO_CLAMP, core_algos.K3_LOG_RATIO_CLAMP)
        raw = torch.exp(y) - y - 1
        return raw.clamp(-core_algos.K3_VALUE_CLAMP, core_algos.K3_VALUE_CLAMP), raw
    return {"k1": x, "abs": x.abs(), "k2": 0.5 * x * x}[kind], None


def _torch_forward(lp, old, mask, cu, width, adv_seq, adv_tok, ref, probe, cfg: _LossConfig, per_seq: bool):
    """Token sums [8] (kernels.policy_loss.PARTIAL_NAMES order) and per-sequence (sum l, sum k, count) [B, 3].

    Mirrors kernels.policy_loss._token_terms with tensor ops. Float arithmetic (clamp, minimum, sign)
    stands in for masks and torch.where where it can: on CPU those are several times slower.
    """
    lp, old, probe, adv, bound, ref = _token_inputs(lp, old, cu, width, adv_seq, adv_tok, ref, probe, cfg.clip_c)
    beh, _, d, ratio = _log_ratio(lp, old, probe, cfg)
    neg_adv = -adv
    pg1 = neg_adv * ratio
    pg2 = neg_adv * ratio.clamp(cfg.lo_bound, cfg.hi_bound)
    lc = torch.maximum(pg1, pg2)
    masked = lambda x: torch.where(mask, x, 0.0)  # noqa: E731  (masked-out garbage, even NaN, gives 0)
    loss = masked(torch.minimum(lc, bound))
    kl = masked(_kl_value(lp - ref, cfg.kl_kind)[0]) if ref is not None else torch.zeros_like(loss)
    live = mask.float()
    tokens = live.sum()
    is_weight = masked(torch.exp(old - beh)).sum() if probe is not None else tokens
    totals = torch.stack([loss.sum(), kl.sum(), tokens, (mask & (pg2 > pg1)).sum().float(),
                          (mask & (lc > bound)).sum().float(), -masked(d).sum(), masked(ratio).sum(), is_weight])
    seq_sums = None
    if per_seq:
        seq_sums = torch.stack([_per_seq_sum(x, cu, width) for x in (loss, kl, live)], dim=1)
    return totals, seq_sums


def _torch_backward(lp, old, mask, cu, width, adv_seq, adv_tok, ref, probe, grad_loss, weight, cfg: _LossConfig,
                    weight_per_seq: bool):
    """d loss / d lp [T] in lp's dtype, recomputed from the inputs, with torch.autograd's conventions:
    clamp passes the gradient on its closed interval, max/min split it in half on ties, d|x|/dx = sign(x).

        d lc / d lp = -A * ratio * [|lp - beh| <= 20] * (w1 + w2 * [lo <= ratio <= hi]),
        w1 = (1 + s) / 2, w2 = (1 - s) / 2, s = sign(l1 - l2)
        d l / d lp  = d lc / d lp * (1 - sign(lc - bound)) / 2        (1 where A >= 0: bound = +inf)
    """
    lpf, old, probe, adv, bound, ref = _token_inputs(lp, old, cu, width, adv_seq, adv_tok, ref, probe, cfg.clip_c)
    _, d_raw, d, ratio = _log_ratio(lpf, old, probe, cfg)
    neg_adv = -adv
    clipped_ratio = ratio.clamp(cfg.lo_bound, cfg.hi_bound)
    pg1 = neg_adv * ratio
    pg2 = neg_adv * clipped_ratio
    lc = torch.maximum(pg1, pg2)
    s = torch.sign(pg1 - pg2)
    in_clip = (clipped_ratio == ratio).float()
    dlc = neg_adv * ratio * (d_raw == d).float() * ((1 + s) + (1 - s) * in_clip) * 0.5
    grad = dlc * (1 - torch.sign(lc - bound)) * 0.5
    if ref is not None:
        x = lpf - ref
        if cfg.kl_straight or cfg.kl_kind == "k2":
            dkl = x
        elif cfg.kl_kind == "k1":
            dkl = torch.ones_like(x)
        elif cfg.kl_kind == "abs":
            dkl = torch.sign(x)
        else:
            k3, raw = _kl_value(x, "k3")
            y = (-x).clamp(-core_algos.K3_LOG_RATIO_CLAMP, core_algos.K3_LOG_RATIO_CLAMP)
            dkl = (1 - torch.exp(y)) * ((y == -x) & (k3 == raw)).float()
        grad = grad + cfg.kl_coef * dkl
    w = _per_token(weight, cu, width, lp.numel()) if weight_per_seq else weight
    return torch.where(mask, grad_loss * w * grad, 0.0).to(lp.dtype)


# --------------------------------------------------------------------------------------------------
# the torch epilogue (O(B)) and the autograd op


def _aggregate(totals: torch.Tensor, seq_sums: torch.Tensor | None, cu: torch.Tensor, scale: float | None,
               cfg: _LossConfig, has_ref: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, aggregation weight(s) for backward, and the metric vector from the token sums (the torch
    twin of kernels.policy_loss._policy_loss_finalize_kernel); scale None = the longest sequence.

    Returns: loss 0-d fp32; weight [1] (one weight for every token) or [B] (seq-mean-token-mean);
    metrics [len(METRIC_NAMES)] fp32.
    """
    tokens = totals[_TOKENS]
    mode = cfg.agg_mode
    if mode == "token-mean":
        weight = (1.0 / (tokens + _EPS)).reshape(1)
    elif mode == "seq-mean-token-sum-norm":
        if scale is None:
            weight = (1.0 / (cu[1:] - cu[:-1]).max().clamp(min=1).float()).reshape(1)
        else:
            weight = torch.full((1,), 1.0 / scale, device=totals.device)
    else:
        n_s = seq_sums[:, 2]
        n_seqs = (n_s > 0).sum().float()
        if mode == "seq-mean-token-sum":
            weight = (1.0 / (n_seqs + _EPS)).reshape(1)
        else:
            weight = torch.where(n_s > 0, 1.0 / (n_s + _EPS) / (n_seqs + _EPS), 0.0)
    if weight.numel() == 1:
        pg_loss, kl_loss = totals[_PG] * weight[0], totals[_KL] * weight[0]
    else:
        pg_loss, kl_loss = (seq_sums[:, 0] * weight).sum(), (seq_sums[:, 1] * weight).sum()
    loss = pg_loss + cfg.kl_coef * kl_loss if has_ref else pg_loss
    mean = totals / (tokens + _EPS)
    metrics = torch.stack([mean[_CLIPPED], mean[_NEG_LOG_RATIO], mean[_CLIPPED_LOWER], mean[_KL],
                           mean[_RATIO], mean[_IS_WEIGHT], pg_loss, kl_loss])
    return loss, weight, metrics


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lp, old, mask, cu, width, adv_seq, adv_tok, ref, probe, scale, cfg: _LossConfig, backend: str):
        if backend == "triton":
            from rexrag_fast.kernels import policy_loss as kernels

            loss, weight, metrics = kernels.policy_loss_forward(
                lp, old, mask, cu, adv_seq=adv_seq, adv_tok=adv_tok, ref=ref, probe=probe,
                lo_bound=cfg.lo_bound, hi_bound=cfg.hi_bound, clip_c=cfg.clip_c, log1m_alpha=cfg.log1m_alpha,
                log_alpha=cfg.log_alpha, kl_kind=cfg.kl_kind, kl_coef=cfg.kl_coef,
                agg_mode=cfg.agg_mode, scale=scale)
        else:
            per_seq = cfg.agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean")
            totals, seq_sums = _torch_forward(lp, old, mask, cu, width, adv_seq, adv_tok, ref, probe, cfg, per_seq)
            loss, weight, metrics = _aggregate(totals, seq_sums, cu, scale, cfg, ref is not None)
        ctx.save_for_backward(lp, old, mask, cu, adv_seq, adv_tok, ref, probe, weight)
        ctx.cfg, ctx.backend, ctx.width = cfg, backend, width
        ctx.weight_per_seq = cfg.agg_mode == "seq-mean-token-mean"
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        lp, old, mask, cu, adv_seq, adv_tok, ref, probe, weight = ctx.saved_tensors
        cfg = ctx.cfg
        grad_loss = grad_loss.float().contiguous()
        if ctx.backend == "triton":
            from rexrag_fast.kernels import policy_loss as kernels

            dlp = kernels.policy_loss_backward(
                lp, old, mask, cu, grad_loss, weight.contiguous(), adv_seq=adv_seq, adv_tok=adv_tok, ref=ref,
                probe=probe, lo_bound=cfg.lo_bound, hi_bound=cfg.hi_bound, clip_c=cfg.clip_c,
                log1m_alpha=cfg.log1m_alpha, log_alpha=cfg.log_alpha, kl_coef=cfg.kl_coef,
                kl_kind=cfg.kl_kind, kl_straight=cfg.kl_straight, weight_per_seq=ctx.weight_per_seq)
        else:
            dlp = _torch_backward(lp, old, mask, cu, ctx.width, adv_seq, adv_tok, ref, probe, grad_loss, weight, cfg,
                                  ctx.weight_per_seq)
        return (dlp,) + (None,) * 11


# --------------------------------------------------------------------------------------------------
# argument checks and layouts


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_options(kl_type, alpha, clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c, adv_estimator,
                   loss_agg_mode, kl_coef, epsilon) -> _LossConfig:
    if kl_type not in core_algos.KL_TYPES_ALL:
        raise ValueError(f"kl_type: expected one of {core_algos.KL_TYPES_ALL}, got {kl_type!r}")
    core_algos.get_adv_estimator_fn(adv_estimator)  # ValueError naming the registered estimators
    if loss_agg_mode not in core_algos.LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: expected one of {core_algos.LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha < 1.0):
        raise ValueError(f"alpha: expected a probe share in [0, 1), got {alpha!r}")
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    for name, value in (("clip_ratio_low", low), ("clip_ratio_high", high)):
        if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name}: expected a finite clip range >= 0, got {value!r}")
    if not (_is_number(clip_ratio_c) and 1.0 < clip_ratio_c < math.inf):
        raise ValueError(f"clip_ratio_c: the dual-clip bound must be a finite number > 1.0, got {clip_ratio_c!r}")
    if not (_is_number(kl_coef) and math.isfinite(kl_coef)):
        raise ValueError(f"kl_coef: expected a finite number, got {kl_coef!r}")
    # epsilon divides the advantage of a group whose rewards are all equal (std 0): 0 or NaN gives 0/0.
    if not (_is_number(epsilon) and 0.0 < epsilon < math.inf):
        raise ValueError(f"epsilon: expected a finite number > 0 (the GRPO std guard), got {epsilon!r}")
    return _LossConfig(
        lo_bound=1 - low, hi_bound=1 + high, clip_c=float(clip_ratio_c),
        log1m_alpha=math.log1p(-alpha), log_alpha=math.log(alpha) if alpha > 0 else -math.inf,
        kl_coef=float(kl_coef), kl_kind=_KL_KIND[kl_type.removesuffix("+")], kl_straight=kl_type.endswith("+"),
        agg_mode=loss_agg_mode)


def _bad_cu_seqlens(cu: torch.Tensor, T: int) -> torch.Tensor:
    """0-d bool: offsets that do not run non-decreasing from 0 to T (a negative length makes the torch path's
    repeat_interleave write out of bounds)."""
    return (cu[0] != 0) | (cu[-1] != T) | (cu[1:] < cu[:-1]).any()


def _raise_bad_cu_seqlens(cu: torch.Tensor, T: int) -> None:
    raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to T={T}, "
                     f"got {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}")


def _check_values(logprobs: torch.Tensor, mask: torch.Tensor, cu: torch.Tensor, rewards: torch.Tensor | None,
                  packed: bool) -> None:
    """The one host sync of the op: reject non-finite rewards, a non-bool mask with values other than 0 and 1,
    and malformed cu_seqlens."""
    dev = logprobs.device
    none = torch.zeros((), dtype=torch.bool, device=dev)
    bad_rewards = (~torch.isfinite(rewards)).any().to(dev) if rewards is not None else none
    bad_mask = ((mask != 0) & (mask != 1)).any() if mask.dtype != torch.bool else none
    bad_cu = _bad_cu_seqlens(cu, logprobs.numel()) if packed else none
    flags = torch.stack([bad_rewards, bad_mask, bad_cu]).tolist()
    if flags[0]:
        bad = rewards[~torch.isfinite(rewards)][:4].tolist()
        raise ValueError(f"rewards: expected finite values, got non-finite rewards such as {bad}")
    if flags[1]:
        bad = mask[(mask != 0) & (mask != 1)][:4].tolist()
        raise ValueError(f"response_mask: expected 0/1 values (a {mask.dtype} mask selects tokens, it does not "
                         f"weight them), got values such as {bad}")
    if flags[2]:
        _raise_bad_cu_seqlens(cu, logprobs.numel())


def _to_packed(logprobs, old_logprobs, response_mask, cu_seqlens, advantages, ref_logprobs, probe_logprobs,
               rewards, group_ids, loss_scale_factor, check_inputs, backend):
    """Validate tensors; return flat [T] views, cu_seqlens int32 [B+1], the sequence width (padded layout
    only) and the sum-norm divisor (a float, or None for the longest sequence of a packed batch)."""
    check_tensor("logprobs", logprobs, dtypes=FLOAT_DTYPES)
    dev, dtype = logprobs.device, logprobs.dtype
    if logprobs.dim() == 2:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens: only for the packed [T] layout; logprobs is padded [B, L]")
        B, L = logprobs.shape
        cu = torch.arange(B + 1, device=dev, dtype=torch.int32) * L
    elif logprobs.dim() == 1:
        if cu_seqlens is None:
            raise ValueError("cu_seqlens: required with packed logprobs [T] (int32 [B+1] sequence offsets)")
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=dev)
        if cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected [B+1] offsets with B >= 1, got {list(cu_seqlens.shape)}")
        B, L = cu_seqlens.numel() - 1, None
        cu = cu_seqlens.contiguous()
    else:
        raise ValueError(f"logprobs: expected [T] (packed) or [B, L] (padded), got shape {list(logprobs.shape)}")
    shape = list(logprobs.shape)
    check_tensor("old_logprobs", old_logprobs, shape=shape, dtypes=(dtype,), device=dev)
    check_tensor("response_mask", response_mask, shape=shape, device=dev)
    if response_mask.dtype != torch.bool and response_mask.dtype not in INT_DTYPES + FLOAT_DTYPES:
        raise TypeError(f"response_mask: expected a bool, integer or float 0/1 mask, got {response_mask.dtype}")
    for name, t in (("advantages", advantages), ("ref_logprobs", ref_logprobs), ("probe_logprobs", probe_logprobs)):
        if t is not None:
            check_tensor(name, t, shape=shape, dtypes=(dtype,), device=dev)
    if (rewards is None) == (advantages is None):
        raise ValueError("rewards/advantages: give either per-sequence rewards (with group_ids) or per-token "
                         "advantages, not both and not neither")
    if rewards is not None:
        check_tensor("rewards", rewards, shape=[B], dtypes=FLOAT_DTYPES + (torch.float64,), device=dev)
        if group_ids is None:
            raise ValueError("group_ids: required with rewards (one group label per sequence, [B] integer)")
        check_tensor("group_ids", group_ids, shape=[B], dtypes=INT_DTYPES, device=dev)
    elif group_ids is not None:
        raise ValueError("group_ids: only used with rewards; advantages were given precomputed")

    if check_inputs:
        _check_values(logprobs, response_mask, cu, rewards, packed=L is None)
    # Unchecked, cu_seqlens is still checked where that is cheap (no device sync on CPU tensors) or needed
    # (the torch path indexes with the lengths); only the Triton kernels on a GPU, which clamp every index
    # to the batch, go without.
    elif L is None and (cu.device.type == "cpu" or backend == "torch") and bool(_bad_cu_seqlens(cu, logprobs.numel())):
        _raise_bad_cu_seqlens(cu, logprobs.numel())
    if loss_scale_factor is not None:
        if not (_is_number(loss_scale_factor) and 0 < loss_scale_factor < math.inf):
            raise ValueError(f"loss_scale_factor: expected a finite number > 0, got {loss_scale_factor!r}")
        scale = float(loss_scale_factor)
    else:
        scale = None if L is None else float(max(L, 1))

    flat = lambda t: None if t is None else t.reshape(-1).contiguous()  # noqa: E731
    mask = response_mask.reshape(-1)
    mask = (mask if mask.dtype == torch.bool else mask != 0).contiguous()
    width = L or None  # equal-length sequences: per-sequence gathers and sums become reshapes
    return (flat(logprobs), flat(old_logprobs), mask, cu, width, flat(advantages), flat(ref_logprobs),
            flat(probe_logprobs), scale)


def fused_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    rewards: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "low_var_kl",
    probe_logprobs: torch.Tensor | None = None,
    alpha: float = 0.0,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float = 3.0,
    adv_estimator: str = "grpo",
    norm_adv_by_std: bool = True,
    epsilon: float = 1e-6,
    loss_agg_mode: str = "token-mean",
    loss_scale_factor: float | None = None,
    backend: str = "auto",
    check_inputs: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO/PPO clipped policy loss with group advantages, KL loss and REX-RAG policy correction, fused.

    Formulas: see the module docstring; each piece equals its verl function in `core_algos`
    (compute_grpo_outcome_advantage / compute_rloo_outcome_advantage, compute_policy_loss with
    old_log_prob := beh, kl_penalty, agg_loss).

    Layouts: packed `logprobs` [T] with `cu_seqlens` [B+1] int32, or padded [B, L] (viewed as packed with
    B sequences of L tokens; no copy). Every per-token tensor has logprobs' shape and dtype; bf16/fp16
    inputs are computed and accumulated in fp32.

    Args:
        logprobs: log pi(token) of the policy being trained, [T] or [B, L]; the only input that gets a gradient.
        old_logprobs: log-probs of the sampling policy, same shape.
        response_mask: 1 on policy-generated tokens (bool, integer or float 0/1), same shape.
        rewards, group_ids: outcome reward [B] and group label [B] per sequence (advantage from
            `adv_estimator`: "grpo" (norm_adv_by_std=False gives Dr. GRPO), "dr_grpo", "rloo"), or
        advantages: precomputed per-token advantages, same shape as logprobs.
        ref_logprobs, kl_coef, kl_type: KL loss term kl_coef * agg(k(lp, ref)); kl_type in
            k1/kl, abs, k2/mse, k3/low_var_kl, or any of those with "+" (value of the estimator, gradient of k2).
        probe_logprobs, alpha: REX-RAG correction, log mu per token (-inf on originals), probe share alpha
            in [0, 1). alpha = 0 ignores probe_logprobs and is exactly the plain PPO/GRPO loss.
        clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c: ratio clipped to
            [1 - low, 1 + high] (both default to clip_ratio); dual clip at c > 1 for negative advantages.
        epsilon: GRPO std guard, finite and > 0 (grpo divides by std + epsilon; std is 0 in a group of
            equal rewards).
        loss_agg_mode: token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm.
        loss_scale_factor: divisor of seq-mean-token-sum-norm; default L (padded) or the longest sequence
            (packed), i.e. the L of the equivalent padded batch.
        backend: "auto" (Triton on CUDA tensors, PyTorch on CPU), "triton" or "torch".
        check_inputs: check values: finite rewards, 0/1 values in a non-bool response_mask, well-formed
            cu_seqlens; this reads three flags back to the host, the op's only sync. False skips those reads;
            then a non-bool mask counts every non-zero value as 1 and, on the Triton path with CUDA tensors
            only, malformed cu_seqlens give a wrong loss instead of an error. Always checked, whatever the
            flag: shapes, dtypes, devices, options and every scalar (finite, in range), and cu_seqlens on CPU
            tensors or the torch path (no sync there, and malformed offsets would corrupt memory).
            Neither setting looks at the log-probs: NaN or inf there gives a non-finite loss (the trainer
            skips such updates, see rexrag_fast.train.finite_guard).

    Returns:
        loss: 0-d fp32 tensor, differentiable w.r.t. logprobs.
        metrics: 0-d fp32 tensors, masked means over response tokens (0 when no token counts):
            pg_clipfrac   mean [l2 > l1] (the ratio clip was active)
            ppo_kl        mean of -d = beh - lp (clamped log-ratio)
            pg_clipfrac_lower  mean [lc > l3 and A < 0] (the dual clip was active)
            kl            mean KL estimate k (0 without ref_logprobs)
            ratio_mean    mean r = exp(d), the ratio the clip sees
            is_weight_mean  mean exp(old - beh) = pi_old / pi_beh, the correction's rescaling of the
                          plain PPO ratio (1 when alpha = 0; 1 / (1 - alpha) on originals)
            pg_loss, kl_loss  the two aggregated terms of the loss.
        Nothing here reads a value back to the host except validation (see below).

    Raises: ValueError/TypeError naming the argument for wrong shapes, dtypes, devices, options, non-finite or
    out-of-range scalars, malformed cu_seqlens, and (with check_inputs) non-finite rewards or a mask that is
    not 0/1.
    """
    cfg = _check_options(kl_type, alpha, clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c,
                         adv_estimator, loss_agg_mode, kl_coef, epsilon)
    if alpha > 0 and probe_logprobs is None:
        raise ValueError("probe_logprobs: required when alpha > 0 (log mu per token, -inf on original tokens)")
    check_tensor("logprobs", logprobs, dtypes=FLOAT_DTYPES)
    backend = resolve_backend(backend, logprobs.device)
    lp, old, mask, cu, width, adv_tok, ref, probe, scale = _to_packed(
        logprobs, old_logprobs, response_mask, cu_seqlens, advantages, ref_logprobs, probe_logprobs,
        rewards, group_ids, loss_scale_factor, check_inputs, backend)
    if alpha == 0:
        probe = None
    adv_seq = None
    if rewards is not None:
        if backend == "triton":
            from rexrag_fast.kernels import policy_loss as kernels

            estimator = "dr_grpo" if adv_estimator == "grpo" and not norm_adv_by_std else adv_estimator
            if estimator in kernels.ESTIMATORS:
                adv_seq = kernels.group_advantages(rewards.contiguous(), group_ids.contiguous(), estimator, epsilon)
            else:
                adv_seq = _registered_advantages(rewards, group_ids, adv_estimator, norm_adv_by_std, epsilon)
        else:
            adv_seq = group_advantages(rewards, group_ids, adv_estimator, norm_adv_by_std, epsilon)
    loss, metric_vec = _FusedPolicyLoss.apply(lp, old, mask, cu, width, adv_seq, adv_tok, ref, probe, scale, cfg,
                                              backend)
    return loss, dict(zip(METRIC_NAMES, metric_vec.unbind(0)))


# --------------------------------------------------------------------------------------------------
# plain-PyTorch reference


def _padded(t: torch.Tensor | None, lengths: list[int], width: int, fill: float) -> torch.Tensor | None:
    """[T] packed -> [B, width] padded with `fill`."""
    if t is None:
        return None
    out = t.new_full((len(lengths), width), fill)
    for s, piece in enumerate(torch.split(t, lengths)):
        out[s, : piece.numel()] = piece
    return out


def policy_loss_reference(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    rewards: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "low_var_kl",
    probe_logprobs: torch.Tensor | None = None,
    alpha: float = 0.0,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float = 3.0,
    adv_estimator: str = "grpo",
    norm_adv_by_std: bool = True,
    epsilon: float = 1e-6,
    loss_agg_mode: str = "token-mean",
    loss_scale_factor: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`fused_policy_loss` as verl computes it: padded [B, L] tensors and the eager `core_algos` functions,
    in fp32, differentiated by autograd. Same arguments (no backend) and return values; for tests."""
    if logprobs.dim() == 1:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        width = max(lengths) if lengths else 0
        pad = lambda t, fill=0.0: _padded(t, lengths, width, fill)  # noqa: E731
        if loss_scale_factor is None:
            loss_scale_factor = max(width, 1)
    else:
        pad = lambda t, fill=0.0: t  # noqa: E731
    lp = pad(logprobs).float()
    old = pad(old_logprobs).float()
    mask = pad(response_mask.float()).float()
    if rewards is not None:
        token_rewards = torch.zeros_like(mask)
        token_rewards[:, 0] = rewards.float()
        index = group_ids.cpu().numpy() if isinstance(group_ids, torch.Tensor) else np.asarray(group_ids)
        if adv_estimator == "grpo":
            adv, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask, index, epsilon, norm_adv_by_std)
        else:
            adv, _ = core_algos.get_adv_estimator_fn(adv_estimator)(token_rewards, mask, index, epsilon)
    else:
        adv = pad(advantages).float()
    probe = pad(probe_logprobs, -math.inf).float() if probe_logprobs is not None else None
    beh = core_algos.behaviour_log_prob(old, probe, alpha) if alpha > 0 else old

    pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower = core_algos.compute_policy_loss(
        beh, lp, adv, mask, cliprange=clip_ratio, cliprange_low=clip_ratio_low, cliprange_high=clip_ratio_high,
        clip_ratio_c=clip_ratio_c, loss_agg_mode=loss_agg_mode, loss_scale_factor=loss_scale_factor)
    with torch.no_grad():
        log_ratio = torch.clamp(lp - beh, -core_algos.LOG_RATIO_CLAMP, core_algos.LOG_RATIO_CLAMP)
        ratio_mean = core_algos.masked_mean(torch.exp(log_ratio), mask)
        is_weight_mean = core_algos.masked_mean(torch.exp(old - beh), mask)
    loss = pg_loss
    kl_loss = kl_mean = torch.zeros((), device=lp.device)
    if ref_logprobs is not None:
        kld = core_algos.kl_penalty(lp, pad(ref_logprobs).float(), kl_type)
        kl_loss = core_algos.agg_loss(kld, mask, loss_agg_mode, loss_scale_factor=loss_scale_factor)
        loss = pg_loss + kl_loss * kl_coef
        kl_mean = core_algos.masked_mean(kld.detach(), mask)
    metrics = {"pg_clipfrac": pg_clipfrac, "ppo_kl": ppo_kl, "pg_clipfrac_lower": pg_clipfrac_lower,
               "kl": kl_mean, "ratio_mean": ratio_mean, "is_weight_mean": is_weight_mean,
               "pg_loss": pg_loss, "kl_loss": kl_loss}
    return loss, {k: v.detach().float() for k, v in metrics.items()}
