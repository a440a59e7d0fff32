"""Triton paged-attention decode: one new query token per sequence against its paged KV, read in place.

Cache layout (the engine's, rexrag_fast/engine/attention.py): k_cache, v_cache [num_blocks, PAGE, kv_heads, D];
key t of sequence b lives at page block_tables[b, t // PAGE], row t % PAGE. Query head h reads KV head
h // G with G = H // kv_heads (GQA), so one program loads a KV tile once for all G heads of its group.

For sequence b (c = context_lens[b] keys), head h, with s_t = scale * q_h . k_t:

    out_h = sum_{t < c} softmax(s)_t v_t

Split-K: the c keys are cut into `num_splits` ranges of whole BLOCK_N tiles. Split i keeps, in base 2
(s2_t = s_t log2 e), the online-softmax state over its range R_i:

    m_i = max_{t in R_i} s2_t,  l_i = sum_{t in R_i} 2^(s2_t - m_i),  a_i = sum_{t in R_i} 2^(s2_t - m_i) v_t

(an empty range keeps m_i = -inf, l_i = 0, a_i = 0). A second kernel merges them with log-sum-exp weights:

    M = max_i m_i,  w_i = 2^(m_i - M),  out = (sum_i w_i a_i) / (sum_i w_i l_i)

With one split the first kernel normalises and writes `out` itself. A sequence with no keys (c = 0, the
padded rows of a CUDA-graph batch) gets out = 0. Scores and accumulators are fp32 whatever the KV dtype.

Entry point: `paged_decode_attention`; it validates its arguments (this kernel is called directly by the
engine's attention dispatch, not through rexrag_fast.ops).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import can_launch, cdiv, interpreting

KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A split below this many keys costs more in its partial write and merge than it gains in parallelism.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 16
LOG2E = 1.4426950408889634


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
    scale_log2, num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb,
    stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program: sequence b, KV head kvh (its GROUP query heads), key range `split`.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    else:
        q = q.to(k_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        page = tl.load(tables_ptr + b * stride_tb + n // PAGE, mask=n_ok, other=0).to(tl.int64)
        row = n % PAGE
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + (page * stride_kb + row * stride_kt + kvh * stride_kh)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + (page * stride_vb + row * stride_vt + kvh * stride_vh)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_G, BLOCK_N]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SINGLE_SPLIT:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        part = (b * NUM_HEADS + heads) * num_splits + split  # [BLOCK_G] row of the [B, H, S] partial tables
        tl.store(m_ptr + part, m_i, mask=g_ok)
        tl.store(l_ptr + part, l_i, mask=g_ok)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, num_splits, stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: sequence b, query head h; log-sum-exp merge of its num_splits partials.
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    part = (b * NUM_HEADS + h) * num_splits + s
    m = tl.load(m_ptr + part, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=s_ok, other=0.0)
    acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & (d < HEAD_DIM)[None, :],
                  other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all splits empty: every weight below is 0
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    total = tl.sum(w * l, 0)
    o = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def choose_num_splits(batch: int, kv_heads: int, max_keys: int, sm_count: int) -> int:
    """Split-K factor: enough (sequence, KV head, split) programs for ~2 per SM, never a split under
    MIN_TOKENS_PER_SPLIT keys of the longest possible context `max_keys`, at most MAX_SPLITS."""
    programs = max(1, batch * kv_heads)
    wanted = cdiv(2 * max(1, sm_count), programs)
    return max(1, min(wanted, max_keys // MIN_TOKENS_PER_SPLIT, MAX_SPLITS))


def _config(dtype: torch.dtype, head_dim: int, group: int) -> dict[str, int]:
    """Tile sizes and launch options. tl.dot needs every dimension >= 16, hence the padded head group."""
    tiles = {"BLOCK_G": max(16, triton.next_power_of_2(group)), "BLOCK_D": max(16, triton.next_power_of_2(head_dim))}
    if interpreting():
        # The interpreter costs ~1 ms per program per loop step: few, mid-sized tiles.
        return {**tiles, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    if dtype == torch.float32:
        return {**tiles, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    return {**tiles, "BLOCK_N": 64 if head_dim <= 128 else 32, "num_warps": 4, "num_stages": 2}


def _dot_options(dtype: torch.dtype) -> dict[str, object]:
    """fp32 KV takes the exact dot path, fp16/bf16 the tensor-core one. The interpreter (triton 3.7) returns
    garbage for a bf16 tl.dot, so there half-precision tiles are widened to fp32 first (exact)."""
    widen = dtype != torch.float32 and interpreting()
    return {"DOT_PRECISION": "tf32" if dtype != torch.float32 and not widen else "ieee", "DOT_IN_FP32": widen}


def _check_tensor(name: str, t: object, ndim: int, dtypes: tuple[torch.dtype, ...],
                  device: torch.device | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {list(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (q's device), got one on {t.device}")


def _check_arguments(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, num_splits: int | None) -> None:
    """Shapes, dtypes and devices: host-side only, never a device sync."""
    _check_tensor("q", q, 3, KV_DTYPES, None)
    _check_tensor("k_cache", k_cache, 4, (q.dtype,), q.device)
    _check_tensor("v_cache", v_cache, 4, (q.dtype,), q.device)
    _check_tensor("block_tables", block_tables, 2, (torch.int32,), q.device)
    _check_tensor("context_lens", context_lens, 1, (torch.int32,), q.device)
    batch, heads, head_dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache: expected the shape of k_cache {list(k_cache.shape)}, got {list(v_cache.shape)}")
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache: expected head_dim {head_dim} (q's last dimension) in its last dimension, "
                         f"got shape {list(k_cache.shape)}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q has {heads} heads, not a multiple of k_cache's {kv_heads} KV heads")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(3) != 1:
            raise ValueError(f"{name}: expected its head_dim axis contiguous (stride 1), got strides {cache.stride()}")
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables: expected {batch} rows (q's batch), got shape {list(block_tables.shape)}")
    if context_lens.shape[0] != batch:
        raise ValueError(f"context_lens: expected shape [{batch}] (q's batch), got {list(context_lens.shape)}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits: expected None or an int >= 1, got {num_splits!r}")
    if not can_launch(q.device):
        raise RuntimeError(f"paged_decode_attention cannot run on {q.device}: Triton kernels need a CUDA tensor, "
                           "or TRITON_INTERPRET=1 set before rexrag_fast.kernels is imported")


def _check_values(block_tables: torch.Tensor, context_lens: torch.Tensor, num_blocks: int, page: int) -> None:
    """context_lens within the table and every block id a key lives in within the cache (one device sync)."""
    capacity = block_tables.shape[1] * page
    lens = context_lens.long()
    bad = ((lens < 0) | (lens > capacity)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"context_lens[{i}] = {int(lens[i])}: expected 0 <= length <= {capacity} "
                         f"(block_tables width {block_tables.shape[1]} x block_size {page})")
    used = torch.arange(block_tables.shape[1], device=lens.device).unsqueeze(0) < (-(-lens // page)).unsqueeze(1)
    bad = (used & ((block_tables < 0) | (block_tables >= num_blocks))).nonzero()
    if bad.numel():
        i, j = int(bad[0, 0]), int(bad[0, 1])
        raise ValueError(f"block_tables[{i}, {j}] = {int(block_tables[i, j])}: expected a block id in "
                         f"[0, {num_blocks}) (it holds keys of context_lens[{i}] = {int(lens[i])})")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """Decode attention over a paged KV cache: q [B, H, D] -> [B, H, D] in q's dtype (see the module docstring).

    k_cache, v_cache [num_blocks, block_size, kv_heads, D] (q's dtype: fp32, bf16 or fp16; head_dim axis
    contiguous), block_tables [B, max_blocks] int32, context_lens [B] int32 (keys per sequence, 0 allowed:
    output 0). `num_splits` None picks a split-K factor from the batch, the table width and the SM count.
    `check_values` reads context_lens and block_tables back to the host to check them against the table and
    the cache (a device sync): callers that built them (the engine) pass False; it is skipped while a CUDA
    graph is being captured.
    """
    _check_arguments(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)
    batch, heads, head_dim = q.shape
    num_blocks, page, kv_heads, _ = k_cache.shape
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if check_values and not capturing:
        _check_values(block_tables, context_lens, num_blocks, page)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0 or heads == 0:
        return out
    q = q.contiguous()
    block_tables = block_tables.contiguous()
    group = heads // kv_heads
    cfg = _config(q.dtype, head_dim, group)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        num_splits = choose_num_splits(batch, kv_heads, block_tables.shape[1] * page, sms)
    # Splits beyond the table's tiles would all be empty.
    num_splits = max(1, min(num_splits, cdiv(block_tables.shape[1] * page, cfg["BLOCK_N"])))
    single = num_splits == 1
    if single:
        m = l = acc = out  # unused by the kernel
    else:
        m = torch.empty(batch, heads, num_splits, device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
        acc = torch.empty(batch, heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
    _decode_partial_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, m, l, acc,
        float(scale) * LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_HEADS=heads, GROUP=group, HEAD_DIM=head_dim, PAGE=page, SINGLE_SPLIT=single,
        **_dot_options(q.dtype), **cfg,
    )
    if not single:
        _merge_splits_kernel[(batch, heads)](
            m, l, acc, out, num_splits, out.stride(0), out.stride(1),
            NUM_HEADS=heads, HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=triton.next_power_of_2(head_dim), num_warps=1 if interpreting() else 4,
        )
    return out
