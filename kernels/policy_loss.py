"""Triton kernels for the fused GRPO/PPO policy loss: one pass over tokens forward, one pass backward.

Per token t of sequence s (packed layout, `cu_seqlens` [B+1]), with behaviour log-prob
    beh = logaddexp(old + log(1 - alpha), probe + log(alpha))   (beh = old without a probe input)
    d = clamp(lp - beh, -m, m), ratio = exp(d)      (m = ratio_clamp, +inf: no clamp)
    l1 = -A ratio, l2 = -A clamp(ratio, lo, hi), lc = max(l1, l2), l3 = -A c   (c = +inf: no dual clip)
    l = min(l3, lc) if A < 0 else lc
and a KL estimate k(lp, ref). The forward kernel writes per-block partial sums of the masked
(l, k, 1, [l2 > l1], [lc > l3 and A < 0], -d, ratio, exp(old - beh)) and, for the seq-mean modes, adds
per-sequence (sum l, sum k, count) with one atomic per sequence segment in the block (a segmented scan
over the sorted sequence ids). The backward kernel recomputes everything from the inputs and writes
    dlp = g * w_t * (dl/dlp + kl_coef * dk/dlp)
with w_t the aggregation weight of the token (one scalar, or one per sequence). Ties in max/min split
the gradient in half and clamps pass it on their closed interval, exactly as torch.autograd does.

Around that pass: `group_advantages` (one program per sequence: GRPO / Dr. GRPO / RLOO statistics of
its group) and a one-program finalize that reduces the partials into the loss, the metrics and the
backward weights, so one training step launches four kernels and never reads a value back to the host.
The launchers take already-validated contiguous tensors; rexrag_fast.ops.policy_loss checks arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, interpreting

# Columns of the forward partial-sum table, in order.
PARTIAL_NAMES = ("pg_sum", "kl_sum", "tokens", "clipped", "clipped_lower", "neg_log_ratio", "ratio", "is_weight")
N_PARTIALS = len(PARTIAL_NAMES)
# Columns of the per-sequence table: (sum l, sum k, count).
N_SEQ_COLS = 3
# Metrics written by the finalize kernel, in order.
METRIC_NAMES = ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower", "kl", "ratio_mean", "is_weight_mean", "pg_loss",
                "kl_loss")
KL_KINDS = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}


@triton.jit
def _segment_add(pg_a, kl_a, n_a, key_a, pg_b, kl_b, n_b, key_b):
    # Segmented sum over sorted keys: a range's value is the sum over its trailing run of equal keys.
    same = key_a == key_b
    return tl.where(same, pg_a + pg_b, pg_b), tl.where(same, kl_a + kl_b, kl_b), tl.where(same, n_a + n_b, n_b), key_b


@triton.jit
def _sequence_of(offs, cu_ptr, B, LOG2_B: tl.constexpr):
    # Largest s in [0, B) with cu[s] <= offs: a branch-free binary search over cu_seqlens.
    seq = tl.zeros(offs.shape, tl.int32)
    for i in tl.static_range(LOG2_B):
        cand = seq + (1 << (LOG2_B - 1 - i))
        start = tl.load(cu_ptr + cand, mask=cand < B, other=2147483647)
        seq = tl.where(start <= offs, cand, seq)
    return seq


@triton.jit
def _token_terms(lp, old, probe, adv, ref, lo_bound, hi_bound, clip_c, ratio_clamp, log1m_alpha, log_alpha,
                 HAS_PROBE: tl.constexpr, HAS_REF: tl.constexpr, KL_KIND: tl.constexpr,
                 KL_STRAIGHT: tl.constexpr, WANT_GRAD: tl.constexpr):
    """Per-token loss terms (fp32). Returns (loss, kl, clipped, clipped_lower, d, ratio, beh, dloss, dkl)."""
    if HAS_PROBE:
        a = old + log1m_alpha
        b = probe + log_alpha
        hi = tl.maximum(a, b)
        beh = hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))
    else:
        beh = old
    d_raw = lp - beh
    d = tl.minimum(tl.maximum(d_raw, -ratio_clamp), ratio_clamp)
    ratio = tl.exp(d)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, lo_bound), hi_bound)
    lc = tl.maximum(pg1, pg2)
    neg = adv < 0
    # c = +inf (no dual clip) gives pg3 = +inf where A < 0; elsewhere pg3 is unused (and 0 * inf is NaN).
    pg3 = tl.where(neg, -adv * clip_c, 0.0)
    loss = tl.where(neg, tl.minimum(pg3, lc), lc)
    clipped = pg2 > pg1
    clipped_lower = (lc > pg3) & neg

    if HAS_REF:
        x = lp - ref
        if KL_KIND == 0:
            kl = x
        elif KL_KIND == 1:
            kl = tl.abs(x)
        elif KL_KIND == 2:
            kl = 0.5 * x * x
        else:
            y = tl.minimum(tl.maximum(-x, -20.0), 20.0)
            k3_raw = tl.exp(y) - y - 1.0
            kl = tl.minimum(tl.maximum(k3_raw, -10.0), 10.0)
    else:
        kl = tl.zeros_like(lp)

    dloss = tl.zeros_like(lp)
    dkl = tl.zeros_like(lp)
    if WANT_GRAD:
        dratio = tl.where((d_raw >= -ratio_clamp) & (d_raw <= ratio_clamp), ratio, 0.0)
        in_clip = ((ratio >= lo_bound) & (ratio <= hi_bound)).to(tl.float32)
        tie = pg1 == pg2
        w1 = tl.where(pg1 > pg2, 1.0, tl.where(tie, 0.5, 0.0))
        w2 = tl.where(pg2 > pg1, 1.0, tl.where(tie, 0.5, 0.0))
        dlc = -adv * dratio * (w1 + w2 * in_clip)
        w_lower = tl.where(lc < pg3, 1.0, tl.where(lc == pg3, 0.5, 0.0))
        dloss = tl.where(neg, dlc * w_lower, dlc)
        if HAS_REF:
            if KL_STRAIGHT:
                dkl = x
            elif KL_KIND == 0:
                dkl = tl.full(lp.shape, 1.0, tl.float32)
            elif KL_KIND == 1:
                dkl = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
            elif KL_KIND == 2:
                dkl = x
            else:
                in_y = (-x >= -20.0) & (-x <= 20.0)
                in_k = (k3_raw >= -10.0) & (k3_raw <= 10.0)
                dkl = tl.where(in_y & in_k, 1.0 - tl.exp(y), 0.0)
    return loss, kl, clipped, clipped_lower, d, ratio, beh, dloss, dkl


@triton.jit
def _load_block_inputs(pid, T, B, cu_ptr, lp_ptr, old_ptr, mask_ptr, adv_ptr, ref_ptr, probe_ptr,
                       ADV_PER_TOKEN: tl.constexpr, HAS_REF: tl.constexpr, HAS_PROBE: tl.constexpr,
                       NEED_SEQ: tl.constexpr, LOG2_B: tl.constexpr, BLOCK: tl.constexpr):
    # Tokens [pid * BLOCK, pid * BLOCK + BLOCK) of the packed batch: their sequence ids and fp32 inputs
    # (forward and backward kernels read exactly the same things).
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < T
    if NEED_SEQ:
        seq = _sequence_of(offs, cu_ptr, B, LOG2_B)
    else:
        seq = tl.zeros([BLOCK], tl.int32)
    lp = tl.load(lp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    live = (tl.load(mask_ptr + offs, mask=valid, other=0) != 0) & valid
    if ADV_PER_TOKEN:
        adv = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        adv = tl.load(adv_ptr + seq, mask=valid, other=0.0).to(tl.float32)
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        ref = lp
    if HAS_PROBE:
        probe = tl.load(probe_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    else:
        probe = old
    return offs, valid, seq, lp, old, live, adv, ref, probe


@triton.jit
def _policy_loss_fwd_kernel(
    lp_ptr, old_ptr, mask_ptr, adv_ptr, ref_ptr, probe_ptr, cu_ptr, partial_ptr, seq_sum_ptr,
    T, B, lo_bound, hi_bound, clip_c, ratio_clamp, log1m_alpha, log_alpha,
    ADV_PER_TOKEN: tl.constexpr, HAS_REF: tl.constexpr, HAS_PROBE: tl.constexpr, KL_KIND: tl.constexpr,
    PER_SEQ: tl.constexpr, NEED_SEQ: tl.constexpr, LOG2_B: tl.constexpr, N_COLS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, valid, seq, lp, old, live, adv, ref, probe = _load_block_inputs(
        pid, T, B, cu_ptr, lp_ptr, old_ptr, mask_ptr, adv_ptr, ref_ptr, probe_ptr,
        ADV_PER_TOKEN, HAS_REF, HAS_PROBE, NEED_SEQ, LOG2_B, BLOCK)
    loss, kl, clipped, clipped_lower, d, ratio, beh, _, _ = _token_terms(
        lp, old, probe, adv, ref, lo_bound, hi_bound, clip_c, ratio_clamp, log1m_alpha, log_alpha,
        HAS_PROBE, HAS_REF, KL_KIND, False, False)

    loss = tl.where(live, loss, 0.0)
    kl = tl.where(live, kl, 0.0)
    ones = live.to(tl.float32)
    row = partial_ptr + pid * N_COLS
    tl.store(row + 0, tl.sum(loss, axis=0))
    tl.store(row + 1, tl.sum(kl, axis=0))
    tl.store(row + 2, tl.sum(ones, axis=0))
    tl.store(row + 3, tl.sum(tl.where(live & clipped, 1.0, 0.0), axis=0))
    tl.store(row + 4, tl.sum(tl.where(live & clipped_lower, 1.0, 0.0), axis=0))
    tl.store(row + 5, tl.sum(tl.where(live, -d, 0.0), axis=0))
    tl.store(row + 6, tl.sum(tl.where(live, ratio, 0.0), axis=0))
    if HAS_PROBE:
        tl.store(row + 7, tl.sum(tl.where(live, tl.exp(old - beh), 0.0), axis=0))
    else:
        tl.store(row + 7, tl.sum(ones, axis=0))

    if PER_SEQ:
        seg_loss, seg_kl, seg_n, _ = tl.associative_scan((loss, kl, ones, seq), 0, _segment_add)
        next_start = tl.load(cu_ptr + seq + 1, mask=valid, other=0)
        last = tl.minimum(pid * BLOCK + BLOCK, T) - 1
        seg_end = valid & ((offs + 1 == next_start) | (offs == last))
        dst = seq_sum_ptr + seq * 3
        tl.atomic_add(dst + 0, seg_loss, mask=seg_end)
        tl.atomic_add(dst + 1, seg_kl, mask=seg_end)
        tl.atomic_add(dst + 2, seg_n, mask=seg_end)


@triton.jit
def _policy_loss_bwd_kernel(
    lp_ptr, old_ptr, mask_ptr, adv_ptr, ref_ptr, probe_ptr, cu_ptr, grad_out_ptr, weight_ptr, dlp_ptr,
    T, B, lo_bound, hi_bound, clip_c, ratio_clamp, log1m_alpha, log_alpha, kl_coef,
    ADV_PER_TOKEN: tl.constexpr, HAS_REF: tl.constexpr, HAS_PROBE: tl.constexpr, KL_KIND: tl.constexpr,
    KL_STRAIGHT: tl.constexpr, WEIGHT_PER_SEQ: tl.constexpr, NEED_SEQ: tl.constexpr, LOG2_B: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, valid, seq, lp, old, live, adv, ref, probe = _load_block_inputs(
        pid, T, B, cu_ptr, lp_ptr, old_ptr, mask_ptr, adv_ptr, ref_ptr, probe_ptr,
        ADV_PER_TOKEN, HAS_REF, HAS_PROBE, NEED_SEQ, LOG2_B, BLOCK)
    _, _, _, _, _, _, _, dloss, dkl = _token_terms(
        lp, old, probe, adv, ref, lo_bound, hi_bound, clip_c, ratio_clamp, log1m_alpha, log_alpha,
        HAS_PROBE, HAS_REF, KL_KIND, KL_STRAIGHT, True)
    g = tl.load(grad_out_ptr)
    if WEIGHT_PER_SEQ:
        w = tl.load(weight_ptr + seq, mask=valid, other=0.0)
    else:
        w = tl.load(weight_ptr)
    grad = dloss
    if HAS_REF:
        grad = grad + kl_coef * dkl
    dlp = tl.where(live, g * w * grad, 0.0)
    tl.store(dlp_ptr + offs, dlp.to(dlp_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _group_advantage_kernel(r_ptr, gid_ptr, adv_ptr, B, epsilon, ESTIMATOR: tl.constexpr, BLOCK_B: tl.constexpr):
    # One program per sequence i: scan all B (reward, group id) pairs for i's group; O(B^2) work in all,
    # which for B in the thousands is far below one launch's cost and replaces ~30 small torch ops.
    i = tl.program_id(0)
    r_i = tl.load(r_ptr + i).to(tl.float32)
    g_i = tl.load(gid_ptr + i)
    n = 0.0
    total = 0.0
    for start in range(0, B, BLOCK_B):
        offs = start + tl.arange(0, BLOCK_B)
        inside = offs < B
        same = inside & (tl.load(gid_ptr + offs, mask=inside, other=0) == g_i)
        r = tl.load(r_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        n += tl.sum(same.to(tl.float32), axis=0)
        total += tl.sum(tl.where(same, r, 0.0), axis=0)
    mean = total / n
    if ESTIMATOR == 0:  # GRPO: (r - mean) / (std + eps), unbiased std
        sq = 0.0
        for start in range(0, B, BLOCK_B):
            offs = start + tl.arange(0, BLOCK_B)
            inside = offs < B
            same = inside & (tl.load(gid_ptr + offs, mask=inside, other=0) == g_i)
            dev = tl.where(same, tl.load(r_ptr + offs, mask=inside, other=0.0).to(tl.float32) - mean, 0.0)
            sq += tl.sum(dev * dev, axis=0)
        std = tl.sqrt(sq / tl.maximum(n - 1.0, 1.0))
        adv = tl.where(n > 1.0, (r_i - mean) / (std + epsilon), r_i / (1.0 + epsilon))
    elif ESTIMATOR == 1:  # Dr. GRPO: r - mean
        adv = tl.where(n > 1.0, r_i - mean, r_i)
    else:  # RLOO: r n/(n-1) - mean n/(n-1)
        scale = n / tl.maximum(n - 1.0, 1.0)
        adv = tl.where(n > 1.0, r_i * scale - mean * scale, r_i)
    tl.store(adv_ptr + i, adv)


@triton.jit
def _column(row, cols, k: tl.constexpr):
    return tl.sum(tl.where(cols == k, row, 0.0), axis=0)


@triton.jit
def _policy_loss_finalize_kernel(
    partial_ptr, n_rows, seq_sum_ptr, cu_ptr, B, scale, kl_coef, loss_ptr, weight_ptr, metric_ptr,
    AGG: tl.constexpr, SCALE_FROM_CU: tl.constexpr, HAS_REF: tl.constexpr, N_COLS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # One program: column sums of the per-block table, the aggregation (AGG 0 token-mean,
    # 1 seq-mean-token-sum, 2 seq-mean-token-mean, 3 seq-mean-token-sum-norm), the backward weights and
    # the metrics. Denominators carry verl's masked_mean guard of 1e-8.
    cols = tl.arange(0, N_COLS)
    acc = tl.zeros([N_COLS], tl.float32)
    for start in range(0, n_rows, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        tile = tl.load(partial_ptr + rows[:, None] * N_COLS + cols[None, :], mask=rows[:, None] < n_rows, other=0.0)
        acc += tl.sum(tile, axis=0)
    pg_sum = _column(acc, cols, 0)
    kl_sum = _column(acc, cols, 1)
    tokens = _column(acc, cols, 2)
    if AGG == 0:
        w = 1.0 / (tokens + 1e-8)
        pg = pg_sum * w
        kl = kl_sum * w
        tl.store(weight_ptr, w)
    elif AGG == 3:
        if SCALE_FROM_CU:
            longest = 1
            for start in range(0, B, BLOCK_B):
                offs = start + tl.arange(0, BLOCK_B)
                inside = offs < B
                n_s = tl.load(cu_ptr + offs + 1, mask=inside, other=0) - tl.load(cu_ptr + offs, mask=inside, other=0)
                longest = tl.maximum(longest, tl.max(n_s, axis=0))
            w = 1.0 / longest.to(tl.float32)
        else:
            w = 1.0 / scale
        pg = pg_sum * w
        kl = kl_sum * w
        tl.store(weight_ptr, w)
    else:
        n_seqs = 0.0
        for start in range(0, B, BLOCK_B):
            offs = start + tl.arange(0, BLOCK_B)
            n_s = tl.load(seq_sum_ptr + offs * 3 + 2, mask=offs < B, other=0.0)
            n_seqs += tl.sum(tl.where(n_s > 0, 1.0, 0.0), axis=0)
        if AGG == 1:
            w = 1.0 / (n_seqs + 1e-8)
            pg = pg_sum * w
            kl = kl_sum * w
            tl.store(weight_ptr, w)
        else:
            pg = 0.0
            kl = 0.0
            for start in range(0, B, BLOCK_B):
                offs = start + tl.arange(0, BLOCK_B)
                inside = offs < B
                n_s = tl.load(seq_sum_ptr + offs * 3 + 2, mask=inside, other=0.0)
                w_s = tl.where(n_s > 0, 1.0 / (n_s + 1e-8) / (n_seqs + 1e-8), 0.0)
                tl.store(weight_ptr + offs, w_s, mask=inside)
                pg += tl.sum(tl.load(seq_sum_ptr + offs * 3, mask=inside, other=0.0) * w_s, axis=0)
                kl += tl.sum(tl.load(seq_sum_ptr + offs * 3 + 1, mask=inside, other=0.0) * w_s, axis=0)
    if HAS_REF:
        tl.store(loss_ptr, pg + kl_coef * kl)
    else:
        tl.store(loss_ptr, pg)
    mean = acc / (tokens + 1e-8)
    # in the order of METRIC_NAMES
    tl.store(metric_ptr + 0, _column(mean, cols, 3))
    tl.store(metric_ptr + 1, _column(mean, cols, 5))
    tl.store(metric_ptr + 2, _column(mean, cols, 4))
    tl.store(metric_ptr + 3, _column(mean, cols, 1))
    tl.store(metric_ptr + 4, _column(mean, cols, 6))
    tl.store(metric_ptr + 5, _column(mean, cols, 7))
    tl.store(metric_ptr + 6, pg)
    tl.store(metric_ptr + 7, kl)


def _block_size(T: int) -> int:
    # The interpreter's cost is per program, so fewer, bigger blocks; on the GPU 1024 tokens per program.
    cap = 4096 if interpreting() else 1024
    return max(16, min(cap, triton.next_power_of_2(max(T, 1))))


def _common(lp: torch.Tensor, cu_seqlens: torch.Tensor, adv_seq, adv_tok, ref, probe):
    B = cu_seqlens.numel() - 1
    adv = adv_tok if adv_tok is not None else adv_seq
    return B, adv, (ref if ref is not None else lp), (probe if probe is not None else lp)


# The estimators the advantage kernel computes, and the code it branches on.
ESTIMATORS = {"grpo": 0, "dr_grpo": 1, "rloo": 2}


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str, epsilon: float) -> torch.Tensor:
    """Outcome advantage per sequence [B] fp32 from rewards [B] and group labels [B] (one launch).

    estimator (a key of ESTIMATORS): grpo (r - mean) / (std + eps), dr_grpo r - mean, rloo; a group of one
    gives r / (1 + eps), r, r respectively (verl's mean 0, std 1).
    """
    B = rewards.numel()
    adv = torch.empty(B, dtype=torch.float32, device=rewards.device)
    _group_advantage_kernel[(B,)](rewards, group_ids, adv, B, epsilon, ESTIMATOR=ESTIMATORS[estimator],
                                  BLOCK_B=max(16, min(1024, triton.next_power_of_2(B))))
    return adv


AGG_MODES = {"token-mean": 0, "seq-mean-token-sum": 1, "seq-mean-token-mean": 2, "seq-mean-token-sum-norm": 3}


def policy_loss_forward(
    lp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor, *,
    adv_seq: torch.Tensor | None, adv_tok: torch.Tensor | None, ref: torch.Tensor | None,
    probe: torch.Tensor | None, lo_bound: float, hi_bound: float, clip_c: float, ratio_clamp: float,
    log1m_alpha: float, log_alpha: float, kl_kind: str, kl_coef: float, agg_mode: str, scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward pass over T tokens and the one-program finalize.

    Args: lp, old, mask [T] (mask bool); cu_seqlens [B+1] int32; adv_seq [B] fp32 or adv_tok [T];
    ref, probe [T] or None (probe given only when alpha > 0); kl_kind a key of KL_KINDS, agg_mode a key of
    AGG_MODES (the launcher owns the codes the kernels branch on); scale: divisor of
    seq-mean-token-sum-norm, None for the longest sequence.
    Returns: loss 0-d fp32; weight fp32 [B] for seq-mean-token-mean else [1] (the d loss / d l_t factor of
    each token); metrics [len(METRIC_NAMES)] fp32.
    """
    T = lp.numel()
    B, adv, ref_t, probe_t = _common(lp, cu_seqlens, adv_seq, adv_tok, ref, probe)
    agg_mode, kl_code = AGG_MODES[agg_mode], KL_KINDS[kl_kind]
    per_seq = agg_mode in (1, 2)
    BLOCK = _block_size(T)
    n_blocks = max(1, cdiv(T, BLOCK))
    dev = lp.device
    partials = torch.empty(n_blocks, N_PARTIALS, dtype=torch.float32, device=dev)
    seq_sums = (torch.zeros if per_seq else torch.empty)(B if per_seq else 1, N_SEQ_COLS, dtype=torch.float32,
                                                         device=dev)
    if T > 0:
        _policy_loss_fwd_kernel[(n_blocks,)](
            lp, old, mask, adv, ref_t, probe_t, cu_seqlens, partials, seq_sums,
            T, B, lo_bound, hi_bound, clip_c, ratio_clamp, log1m_alpha, log_alpha,
            ADV_PER_TOKEN=adv_tok is not None, HAS_REF=ref is not None, HAS_PROBE=probe is not None,
            KL_KIND=kl_code, PER_SEQ=per_seq, NEED_SEQ=per_seq or adv_tok is None,
            LOG2_B=(B - 1).bit_length(), N_COLS=N_PARTIALS, BLOCK=BLOCK,
        )
    else:
        partials.zero_()
    loss = torch.empty((), dtype=torch.float32, device=dev)
    weight = torch.empty(B if agg_mode == 2 else 1, dtype=torch.float32, device=dev)
    metrics = torch.empty(len(METRIC_NAMES), dtype=torch.float32, device=dev)
    _policy_loss_finalize_kernel[(1,)](
        partials, n_blocks, seq_sums, cu_seqlens, B, 1.0 if scale is None else float(scale), kl_coef,
        loss, weight, metrics, AGG=agg_mode, SCALE_FROM_CU=scale is None, HAS_REF=ref is not None,
        N_COLS=N_PARTIALS, BLOCK_R=max(16, min(256, triton.next_power_of_2(n_blocks))),
        BLOCK_B=max(16, min(1024, triton.next_power_of_2(B))),
    )
    return loss, weight, metrics


def policy_loss_backward(
    lp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor, grad_out: torch.Tensor,
    weight: torch.Tensor, *, adv_seq: torch.Tensor | None, adv_tok: torch.Tensor | None,
    ref: torch.Tensor | None, probe: torch.Tensor | None, lo_bound: float, hi_bound: float, clip_c: float,
    ratio_clamp: float, log1m_alpha: float, log_alpha: float, kl_coef: float, kl_kind: str, kl_straight: bool,
    weight_per_seq: bool,
) -> torch.Tensor:
    """Launch the backward pass: dloss/dlp [T] in lp's dtype.

    Args: as `policy_loss_forward`; grad_out 0-d fp32 (d out / d loss); weight fp32: [B] one aggregation
    weight per sequence when `weight_per_seq`, else [1], one weight for all tokens.
    """
    T = lp.numel()
    B, adv, ref_t, probe_t = _common(lp, cu_seqlens, adv_seq, adv_tok, ref, probe)
    dlp = torch.empty_like(lp)
    if T == 0:
        return dlp
    BLOCK = _block_size(T)
    _policy_loss_bwd_kernel[(cdiv(T, BLOCK),)](
        lp, old, mask, adv, ref_t, probe_t, cu_seqlens, grad_out, weight, dlp,
        T, B, lo_bound, hi_bound, clip_c, ratio_clamp, log1m_alpha, log_alpha, kl_coef,
        ADV_PER_TOKEN=adv_tok is not None, HAS_REF=ref is not None, HAS_PROBE=probe is not None,
        KL_KIND=KL_KINDS[kl_kind], KL_STRAIGHT=kl_straight, WEIGHT_PER_SEQ=weight_per_seq,
        NEED_SEQ=weight_per_seq or adv_tok is None, LOG2_B=(B - 1).bit_length(), BLOCK=BLOCK,
    )
    return dlp
