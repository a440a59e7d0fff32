"""Triton kernels for the fused lm-head -> log-prob (+ entropy) op; math in rexrag_fast/ops/linear_logprobs.py.

Forward: a 2-D grid (token blocks x vocab splits). Each program walks its vocab range in BLOCK_V tiles,
computing the logits tile z = (h @ w.T + b) / temperature with tl.dot over BLOCK_H slices of H, and keeps
fp32 online statistics per token: running max m, s = sum exp(z - m), a = sum exp(z - m) (z - m) and the
label logit. The splits are merged on the host side ([splits, T] tensors, tiny).

Backward: for one vocab chunk [v0, v1) at a time, a kernel recomputes each logits tile and writes
d(h @ w.T + b) for the chunk into a [T, v1 - v0] buffer (in the input dtype); two matmuls then give that
chunk's contribution to d hidden (accumulated in fp32 across chunks) and the chunk's rows of d weight
(one matmul over all T, fp32 accumulation inside it). The buffer is bounded by DLOGITS_BUDGET elements,
so nothing of size [T, V] is ever allocated.

Block sizes: chosen for Hopper (H100/H200, 132 SMs, 228 KB shared memory per SM) with bf16 inputs:
128 x 128 logits tiles, 64-wide H slices, 8 warps, 3 pipeline stages. They are unmeasured on a GPU so far.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, dot_options, interpreting

# Largest [T, V_chunk] d-logits buffer of the backward, in elements (128 MiB in bf16).
DLOGITS_BUDGET = 1 << 26


def _config(dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes and launch options for inputs of `dtype` on the current platform."""
    if interpreting():
        # The interpreter costs ~1 ms per program per loop step: few, mid-sized tiles.
        return {"BLOCK_T": 16, "BLOCK_V": 32, "BLOCK_H": 16, "num_warps": 1, "num_stages": 1}
    if dtype == torch.float32:
        # fp32 uses the exact ("ieee") dot path: no tensor cores, smaller tiles.
        return {"BLOCK_T": 64, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_T": 128, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3}


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, T, V, H, stride_h, stride_w, temperature,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """z = (h[rows] @ w[cols].T + b[cols]) / temperature as an fp32 [BLOCK_T, BLOCK_V] tile."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    row_ok = rows < T
    col_ok = cols < V
    # int64 offsets: V * H passes 2^31 for large heads (e.g. H=8192, V=262144).
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    ks = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        k_ok = (k0 + ks) < H
        h = tl.load(h_rows + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + (k0 + ks)[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc / temperature


@triton.jit
def _forward_partials_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, m_ptr, s_ptr, a_ptr, zy_ptr,
    T, V, H, stride_h, stride_w, temperature, cols_per_split,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Per (token block, vocab split): m, s, a, label logit for the split's columns; outputs [splits, T]."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    v_start = pid_s * cols_per_split
    v_end = tl.minimum(V, v_start + cols_per_split)
    m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    a = tl.zeros((BLOCK_T,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, T, v_end, H, stride_h, stride_w, temperature,
                         HAS_BIAS, DOT_PRECISION, DOT_IN_FP32, BLOCK_T, BLOCK_V, BLOCK_H)
        zy += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(tl.where(col_ok[None, :], z, float("-inf")), axis=1))
        # Columns past the split's end contribute e = 0 and d = 0 (never 0 * inf).
        d = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(d), 0.0)
        scale = tl.exp(m - m_new)
        if WITH_ENTROPY:
            # a <- e^(m - m') (a + (m - m') s) + sum e d; the shift is 0 before the first tile (s == 0).
            shift = tl.where(s > 0, m - m_new, 0.0)
            a = scale * (a + shift * s) + tl.sum(e * d, axis=1)
        s = scale * s + tl.sum(e, axis=1)
        m = m_new
    out = pid_s * T + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(zy_ptr + out, zy, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(a_ptr + out, a, mask=row_ok)


@triton.jit
def _backward_dlogits_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, ez_ptr, glp_ptr, gh_ptr, dz_ptr,
    T, V, H, stride_h, stride_w, stride_dz, temperature, v0,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dz[t, j - v0] = (-p (g_lp + g_H (z - E)) + g_lp 1[j == y]) / temperature for columns j of the chunk."""
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v0 + local
    row_ok = rows < T
    col_ok = cols < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, T, V, H, stride_h, stride_w, temperature,
                     HAS_BIAS, DOT_PRECISION, DOT_IN_FP32, BLOCK_T, BLOCK_V, BLOCK_H)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp(z - lse[:, None])
    if WITH_ENTROPY:
        ez = tl.load(ez_ptr + rows, mask=row_ok, other=0.0)
        g_h = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
        dz = -p * (g_lp[:, None] + g_h[:, None] * (z - ez[:, None]))
    else:
        dz = -p * g_lp[:, None]
    dz += tl.where(cols[None, :] == labels[:, None], g_lp[:, None], 0.0)
    dz = dz / temperature
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + local[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _num_splits(n_token_blocks: int, n_col_blocks: int, device: torch.device) -> int:
    """Vocab splits so that the grid has ~2 programs per SM (1 under the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_col_blocks, cdiv(2 * sms, n_token_blocks)))


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(label logit [T], lse [T], E_p[z] [T] or None), fp32, for contiguous hidden [T, H], weight [V, H].

    Splits are merged with M = max_i m_i, s = sum_i s_i e^(m_i - M), a = sum_i e^(m_i - M) (a_i + (m_i - M) s_i);
    lse = M + log s, E_p[z] = M + a / s.
    """
    n_tokens, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    cfg = _config(hidden.dtype)
    block_t, block_v = cfg["BLOCK_T"], cfg["BLOCK_V"]
    n_token_blocks = cdiv(n_tokens, block_t)
    n_col_blocks = cdiv(n_vocab, block_v)
    splits = num_splits or _num_splits(n_token_blocks, n_col_blocks, hidden.device)
    splits = max(1, min(splits, n_col_blocks))
    cols_per_split = cdiv(n_col_blocks, splits) * block_v
    splits = cdiv(n_vocab, cols_per_split)  # every split owns at least one column
    stats = torch.empty(4 if with_entropy else 3, splits, n_tokens, device=hidden.device, dtype=torch.float32)
    m, s, zy = stats[0], stats[1], stats[2]
    a = stats[3] if with_entropy else stats[0]
    _forward_partials_kernel[(n_token_blocks, splits)](
        hidden, weight, bias if bias is not None else hidden, labels, m, s, a, zy,
        n_tokens, n_vocab, n_hidden, hidden.stride(0), weight.stride(0), temperature, cols_per_split,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, **dot_options(hidden.dtype),
        **cfg,
    )
    if splits == 1:
        m_all, s_all, a_all = m[0], s[0], a[0]
    else:
        m_all = m.amax(dim=0)
        shift = m - m_all
        scale = torch.exp(shift)
        s_all = (scale * s).sum(dim=0)
        a_all = (scale * (a + shift * s)).sum(dim=0) if with_entropy else None
    lse = m_all + torch.log(s_all)
    expected_z = m_all + a_all / s_all if with_entropy else None
    return zy.sum(dim=0), lse, expected_z


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result (cuBLAS out_dtype on CUDA, an fp32 copy elsewhere)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch < 2.8 has no out_dtype: widen (a [T, V_chunk] copy)
            pass
    return a.float() @ b.float()


def _matmul_out(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b accumulated in fp32, returned in `dtype` (one rounding)."""
    if a.is_cuda or a.dtype == torch.float32:
        return (a @ b).to(dtype)
    return (a.float() @ b.float()).to(dtype)


def linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    lse: torch.Tensor,
    expected_z: torch.Tensor | None,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    dlogits_budget: int = DLOGITS_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(d hidden [T, H], d weight [V, H], d bias [V] or None) in the input dtypes; see the module docstring.

    `grad_logprob` / `grad_entropy`: fp32 [T], zero on ignored rows (`grad_entropy` None: no entropy term).
    """
    n_tokens, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    cfg = _config(hidden.dtype)
    block_t, block_v = cfg["BLOCK_T"], cfg["BLOCK_V"]
    with_entropy = grad_entropy is not None
    v_chunk = max(block_v, (dlogits_budget // max(1, n_tokens)) // block_v * block_v)
    v_chunk = min(v_chunk, cdiv(n_vocab, block_v) * block_v)
    dz = torch.empty(n_tokens, v_chunk, device=hidden.device, dtype=hidden.dtype)
    grad_h = torch.zeros(n_tokens, n_hidden, device=hidden.device, dtype=torch.float32)
    grad_w = torch.empty_like(weight)
    grad_b = torch.empty(n_vocab, device=hidden.device, dtype=bias.dtype) if bias is not None else None
    for v0 in range(0, n_vocab, v_chunk):
        v1 = min(n_vocab, v0 + v_chunk)
        dz_chunk = dz[:, : v1 - v0]
        grid = (cdiv(n_tokens, block_t), cdiv(v1 - v0, block_v))
        _backward_dlogits_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, labels, lse,
            expected_z if with_entropy else lse, grad_logprob, grad_entropy if with_entropy else grad_logprob,
            dz_chunk, n_tokens, v1, n_hidden, hidden.stride(0), weight.stride(0), dz_chunk.stride(0),
            temperature, v0,
            HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, **dot_options(hidden.dtype),
            **cfg,
        )
        grad_h += _matmul_fp32(dz_chunk, weight[v0:v1])
        grad_w[v0:v1] = _matmul_out(dz_chunk.T, hidden, weight.dtype)
        if grad_b is not None:
            grad_b[v0:v1] = dz_chunk.sum(dim=0, dtype=torch.float32)
    return grad_h.to(hidden.dtype), grad_w, grad_b
