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

Shared prefix (Hydragen, arXiv 2402.05099): when sequences of a group start with the same p_g cached keys,
their keys split into the prefix [0, p_g), read through the group's prefix block table by one program per
(group, KV head, tile of member query rows) so each prefix tile is loaded once for the whole group (a
matrix-matrix product instead of one matrix-vector product per member), and the suffix [p_g, c), read through
the sequence's own table. Both write (m, l, a) partials into the same table, and the merge above combines them.

Entry point: `paged_decode_attention`; it validates its arguments (this kernel is called directly by the
engine's attention dispatch, not through rexrag_fast.ops).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import can_launch, cdiv, dot_options, interpreting

KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Fewest keys worth a split of their own (its partial write and the merge cost a fixed amount); a guess until
# measured on a GPU (vLLM's split-K decode uses 512-key partitions).
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 16
LOG2E = 1.4426950408889634


@triton.jit
def _split_range(lo, hi, split, num_splits, BLOCK_N: tl.constexpr):
    # Keys [lo, hi) cut into num_splits ranges of whole BLOCK_N tiles: the range of `split` (maybe empty).
    per_split = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    return start, tl.minimum(start + per_split, hi)


@triton.jit
def _attend_range(
    q, k_ptr, v_ptr, table_ptr, lo, hi, kv_off_k, kv_off_v, stride_kb, stride_kt, stride_vb, stride_vt, scale_log2,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax of the query rows q [BLOCK_M, BLOCK_D] over keys [lo, hi) of the block-table row at
    table_ptr, in base 2: (m [BLOCK_M], l [BLOCK_M], acc [BLOCK_M, BLOCK_D]), fp32."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        page = tl.load(table_ptr + n // PAGE, mask=n_ok, other=0).to(tl.int64)
        row = n % PAGE
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + (page * stride_kb + row * stride_kt + kv_off_k)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + (page * stride_vb + row * stride_vt + kv_off_v)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _store_partials(m_ptr, l_ptr, acc_ptr, part, row_ok, m_i, l_i, acc,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # part [BLOCK_M]: flat (sequence, head, split) index of each row in the [B, H, S] partial tables.
    d = tl.arange(0, BLOCK_D)
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)
    tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, starts_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
    scale_log2, num_splits, total_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb,
    stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_STARTS: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program: sequence b, KV head kvh (its GROUP query heads), key range `split` of [start_b, ctx_b)
    # (start_b = 0, or the length of a shared prefix attended by _prefix_partial_kernel).
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    if HAS_STARTS:
        first = tl.load(starts_ptr + b)
    else:
        first = 0
    lo, hi = _split_range(first, ctx, split, num_splits, BLOCK_N)

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
    m_i, l_i, acc = _attend_range(
        q, k_ptr, v_ptr, tables_ptr + b * stride_tb, lo, hi, kvh * stride_kh, kvh * stride_vh,
        stride_kb, stride_kt, stride_vb, stride_vt, scale_log2,
        PAGE, BLOCK_G, BLOCK_D, BLOCK_N, HEAD_DIM, DOT_IN_FP32, DOT_PRECISION,
    )
    if SINGLE_SPLIT:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        part = (b * NUM_HEADS + heads) * total_splits + split
        _store_partials(m_ptr, l_ptr, acc_ptr, part, g_ok, m_i, l_i, acc, HEAD_DIM, BLOCK_D)


@triton.jit
def _prefix_partial_kernel(
    q_ptr, k_ptr, v_ptr, ptables_ptr, plens_ptr, group_starts_ptr, members_ptr, m_ptr, l_ptr, acc_ptr,
    scale_log2, prefix_splits, split_base, total_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_pb,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program: prefix group pg, KV head kvh, a tile of BLOCK_M (member, head) query rows, key range
    # `split` of the shared prefix [0, prefix_len): each prefix tile is loaded once for all members' queries.
    pg = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2) // prefix_splits
    split = tl.program_id(2) % prefix_splits
    first_member = tl.load(group_starts_ptr + pg)
    n_members = tl.load(group_starts_ptr + pg + 1) - first_member
    if tile * BLOCK_M >= n_members * GROUP:
        return
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < n_members * GROUP
    seq = tl.load(members_ptr + first_member + r // GROUP, mask=row_ok, other=0)
    heads = kvh * GROUP + r % GROUP
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + seq[:, None] * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    else:
        q = q.to(k_ptr.dtype.element_ty)
    lo, hi = _split_range(0, tl.load(plens_ptr + pg), split, prefix_splits, BLOCK_N)
    m_i, l_i, acc = _attend_range(
        q, k_ptr, v_ptr, ptables_ptr + pg * stride_pb, lo, hi, kvh * stride_kh, kvh * stride_vh,
        stride_kb, stride_kt, stride_vb, stride_vt, scale_log2,
        PAGE, BLOCK_M, BLOCK_D, BLOCK_N, HEAD_DIM, DOT_IN_FP32, DOT_PRECISION,
    )
    part = (seq * NUM_HEADS + heads) * total_splits + split_base + split
    _store_partials(m_ptr, l_ptr, acc_ptr, part, row_ok, m_i, l_i, acc, HEAD_DIM, BLOCK_D)


@triton.jit
def _merge_splits_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, num_splits, stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: sequence b, query head h; log-sum-exp merge of its num_splits partials. A partial no kernel
    # wrote (the prefix splits of a sequence outside every prefix group) holds m = -inf (pre-filled) and
    # arbitrary l, acc: its weight is 0 and l, acc are never multiplied by it.
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
    live = w > 0
    total = tl.sum(tl.where(live, w * l, 0.0), 0)
    o = tl.sum(tl.where(live[:, None], w[:, None] * acc, 0.0), 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def choose_num_splits(batch: int, kv_heads: int, max_keys: int, sm_count: int) -> int:
    """Split-K factor: enough (sequence, KV head, split) programs for ~2 per SM, never a split under
    MIN_TOKENS_PER_SPLIT keys of the longest possible context `max_keys`, at most MAX_SPLITS."""
    programs = max(1, batch * kv_heads)
    wanted = cdiv(2 * max(1, sm_count), programs)
    return max(1, min(wanted, max_keys // MIN_TOKENS_PER_SPLIT, MAX_SPLITS))


def _config(dtype: torch.dtype, head_dim: int, group: int) -> dict[str, int]:
    """Tile sizes and launch options: BLOCK_G heads of one sequence (decode), BLOCK_M (member, head) rows of a
    prefix group, BLOCK_N keys per step. tl.dot needs every dimension >= 16, hence the padded head group."""
    tiles = {"BLOCK_G": max(16, triton.next_power_of_2(group)), "BLOCK_D": max(16, triton.next_power_of_2(head_dim))}
    if interpreting():
        # The interpreter costs ~1 ms per program per loop step: few, mid-sized tiles.
        return {**tiles, "BLOCK_N": 16, "BLOCK_M": 16, "num_warps": 1, "num_stages": 1}
    if dtype == torch.float32:
        return {**tiles, "BLOCK_N": 32, "BLOCK_M": 32, "num_warps": 4, "num_stages": 2}
    return {**tiles, "BLOCK_N": 64 if head_dim <= 128 else 32, "BLOCK_M": 64, "num_warps": 4, "num_stages": 2}


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


def _check_prefix_arguments(batch: int, device: torch.device, prefix_block_tables: torch.Tensor | None,
                            prefix_lens: torch.Tensor | None, prefix_groups: torch.Tensor | None) -> None:
    given = [name for name, t in (("prefix_block_tables", prefix_block_tables), ("prefix_lens", prefix_lens),
                                  ("prefix_groups", prefix_groups)) if t is not None]
    if len(given) not in (0, 3):
        raise ValueError(f"shared prefix: pass prefix_block_tables, prefix_lens and prefix_groups together, got only "
                         f"{', '.join(given)}")
    if not given:
        return
    _check_tensor("prefix_block_tables", prefix_block_tables, 2, (torch.int32,), device)
    _check_tensor("prefix_lens", prefix_lens, 1, (torch.int32,), device)
    _check_tensor("prefix_groups", prefix_groups, 1, (torch.int32,), device)
    n_groups = prefix_block_tables.shape[0]
    if prefix_lens.shape[0] != n_groups:
        raise ValueError(f"prefix_lens: expected shape [{n_groups}] (one per prefix_block_tables row), "
                         f"got {list(prefix_lens.shape)}")
    if prefix_groups.shape[0] != batch:
        raise ValueError(f"prefix_groups: expected shape [{batch}] (q's batch), got {list(prefix_groups.shape)}")


def _check_lengths(lens_name: str, lens: torch.Tensor, tables_name: str, tables: torch.Tensor, num_blocks: int,
                   page: int) -> None:
    """Each length within its table row, and every block id a key lives in within the cache (a device sync)."""
    capacity = tables.shape[1] * page
    lens = lens.long()
    bad = ((lens < 0) | (lens > capacity)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"{lens_name}[{i}] = {int(lens[i])}: expected 0 <= length <= {capacity} "
                         f"({tables_name} width {tables.shape[1]} x block_size {page})")
    used = torch.arange(tables.shape[1], device=lens.device).unsqueeze(0) < (-(-lens // page)).unsqueeze(1)
    bad = (used & ((tables < 0) | (tables >= num_blocks))).nonzero()
    if bad.numel():
        i, j = int(bad[0, 0]), int(bad[0, 1])
        raise ValueError(f"{tables_name}[{i}, {j}] = {int(tables[i, j])}: expected a block id in "
                         f"[0, {num_blocks}) (it holds keys of {lens_name}[{i}] = {int(lens[i])})")


def _check_prefix_groups(prefix_groups: torch.Tensor, prefix_lens: torch.Tensor, context_lens: torch.Tensor) -> None:
    """Group ids in [-1, G) and every member's context at least as long as its group's prefix (a device sync)."""
    n_groups = prefix_lens.shape[0]
    groups = prefix_groups.long()
    bad = ((groups < -1) | (groups >= n_groups)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"prefix_groups[{i}] = {int(groups[i])}: expected -1 (no shared prefix) or a group in "
                         f"[0, {n_groups})")
    member = groups >= 0
    needed = torch.where(member, prefix_lens.long()[groups.clamp(min=0)] if n_groups else 0, 0)
    bad = (context_lens.long() < needed).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"context_lens[{i}] = {int(context_lens[i])} is shorter than the shared prefix of its group "
                         f"{int(groups[i])} (prefix_lens = {int(needed[i])})")


def _group_members(prefix_groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(members [B] int32: sequence ids sorted by group, non-members last; group_starts [G + 1] int32: CSR
    offsets of each group's members), computed on the device without a sync."""
    groups = prefix_groups.long()
    key = torch.where(groups >= 0, groups, n_groups)
    members = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.zeros(n_groups + 1, dtype=torch.int64, device=key.device).scatter_add_(0, key, torch.ones_like(key))
    starts = torch.zeros(n_groups + 1, dtype=torch.int32, device=key.device)
    starts[1:] = counts[:n_groups].cumsum(0)
    return members, starts


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    prefix_block_tables: torch.Tensor | None = None,
    prefix_lens: torch.Tensor | None = None,
    prefix_groups: torch.Tensor | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """Decode attention over a paged KV cache: q [B, H, D] -> [B, H, D] in q's dtype (see the module docstring).

    k_cache, v_cache [num_blocks, block_size, kv_heads, D] (q's dtype: fp32, bf16 or fp16; head_dim axis
    contiguous), block_tables [B, max_blocks] int32, context_lens [B] int32 (keys per sequence, 0 allowed:
    output 0). `num_splits` None picks a split-K factor from the batch, the table width and the SM count.

    Shared prefix (Hydragen-style, all three or none): prefix_block_tables [G, max_prefix_blocks] int32 and
    prefix_lens [G] int32 describe G prefixes; prefix_groups [B] int32 puts sequence b in group g (or -1).
    A member's first prefix_lens[g] keys are the prefix's: they are attended once per group and KV head for all
    its members' query heads (one KV read instead of one per member), the member's remaining keys through its
    own block table; both parts are partial softmaxes merged by log-sum-exp.

    `check_values` reads lengths, tables and groups back to the host to check them (a device sync): callers
    that built them (the engine) pass False; it is skipped while a CUDA graph is being captured.
    """
    _check_arguments(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)
    _check_prefix_arguments(q.shape[0], q.device, prefix_block_tables, prefix_lens, prefix_groups)
    batch, heads, head_dim = q.shape
    num_blocks, page, kv_heads, _ = k_cache.shape
    has_prefix = prefix_block_tables is not None and prefix_block_tables.shape[0] > 0
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if check_values and not capturing:
        _check_lengths("context_lens", context_lens, "block_tables", block_tables, num_blocks, page)
        if prefix_block_tables is not None:
            _check_lengths("prefix_lens", prefix_lens, "prefix_block_tables", prefix_block_tables, num_blocks, page)
            _check_prefix_groups(prefix_groups, prefix_lens, context_lens)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0 or heads == 0:
        return out
    q = q.contiguous()
    block_tables = block_tables.contiguous()
    group = heads // kv_heads
    cfg = _config(q.dtype, head_dim, group)
    block_m = cfg.pop("BLOCK_M")
    table_keys = block_tables.shape[1] * page
    splits = num_splits or choose_num_splits(batch, kv_heads, table_keys, _sm_count(q.device))
    splits = max(1, min(splits, cdiv(table_keys, cfg["BLOCK_N"])))  # more would all be empty
    prefix_splits = 0
    if has_prefix:
        prefix_block_tables = prefix_block_tables.contiguous()
        n_groups = prefix_block_tables.shape[0]
        prefix_keys = prefix_block_tables.shape[1] * page
        prefix_splits = num_splits or choose_num_splits(n_groups, kv_heads, prefix_keys, _sm_count(q.device))
        prefix_splits = max(1, min(prefix_splits, cdiv(prefix_keys, cfg["BLOCK_N"])))
        members, group_starts = _group_members(prefix_groups, n_groups)
        groups = prefix_groups.long()
        starts = torch.where(groups >= 0, prefix_lens[groups.clamp(min=0)], 0).to(torch.int32)
    total_splits = splits + prefix_splits
    single = total_splits == 1
    if single:
        m = l = acc = out  # unused by the kernels
    else:
        # -inf marks a partial that no kernel writes (the prefix splits of a sequence outside every group)
        m = torch.full((batch, heads, total_splits), float("-inf"), device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
        acc = torch.empty(batch, heads, total_splits, head_dim, device=q.device, dtype=torch.float32)
    kv_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                  v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    dot = dot_options(q.dtype)
    _decode_partial_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, starts if has_prefix else context_lens, out, m, l, acc,
        float(scale) * LOG2E, splits, total_splits,
        q.stride(0), q.stride(1), *kv_strides, block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_HEADS=heads, GROUP=group, HEAD_DIM=head_dim, PAGE=page, HAS_STARTS=has_prefix, SINGLE_SPLIT=single,
        **dot, **cfg,
    )
    if has_prefix:
        member_tiles = cdiv(batch * group, block_m)  # enough for one group holding every sequence
        _prefix_partial_kernel[(n_groups, kv_heads, member_tiles * prefix_splits)](
            q, k_cache, v_cache, prefix_block_tables, prefix_lens, group_starts, members, m, l, acc,
            float(scale) * LOG2E, prefix_splits, splits, total_splits,
            q.stride(0), q.stride(1), *kv_strides, prefix_block_tables.stride(0),
            NUM_HEADS=heads, GROUP=group, HEAD_DIM=head_dim, PAGE=page, BLOCK_M=block_m,
            BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            **dot,
        )
    if not single:
        _merge_splits_kernel[(batch, heads)](
            m, l, acc, out, total_splits, out.stride(0), out.stride(1),
            NUM_HEADS=heads, HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(total_splits),
            BLOCK_D=triton.next_power_of_2(head_dim), num_warps=1 if interpreting() else 4,
        )
    return out
