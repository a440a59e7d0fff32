"""Elementwise parts of a decoder step fused in C++ (csrc/decoder_ops_cpu.cpp) for the CPU engine.

In a bf16 decode step of SmolLM2 at batch 16 the ~20 small torch ops per layer (norms, rotary embedding,
the K/V write, copies) cost more than the attention once both were fast; two calls per layer replace them.
Rounding is that of the torch composition they replace (bf16: each product and sum rounded where the torch
op rounds), so rope_write_kv is bit-identical to it and add_rms_norm differs only in the order of its fp32
sum of squares. sample_rows replaces log_softmax + argmax + top-k / top-p truncation + torch.multinomial
over the vocabulary (at 49k tokens in torch on this CPU ~0.2 ms a greedy row, ~1 ms a sampled one, ~4 ms a
top-p one); it places the top-k / top-p cut without sorting the vocabulary (a histogram of the
probabilities, then a sort of the one bucket the cut falls in).
"""

from __future__ import annotations

import torch

from rexrag_fast.engine.config import check_top_k, check_top_p
from rexrag_fast.engine.cpu_attention import DTYPE_CODE, extension, extension_has


def available() -> bool:
    """True when the built extension has the fused ops."""
    return extension_has("rope_write_kv", "add_rms_norm", "sample_rows")


def _check(name: str, dtype: torch.dtype, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name}: expected contiguous CPU {dtype} tensors, got {t.dtype} on {t.device} "
                             f"(contiguous: {t.is_contiguous()})")


def rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  heads: int) -> torch.Tensor:
    """Rotary embedding of q and k from qkv [T, (H + 2 KV) * D], K and V written into the pool, q returned.

    positions, slot_mapping [T] int64; cos, sin [P, D]; k_cache [num_blocks, KV, D, block_size] and
    v_cache [num_blocks, block_size, KV, D] (the "cpp" layout of KVPool). Returns q [T, H, D] (contiguous).
    rope(x) = x * cos + rotate_half(x) * sin, rotate_half(a, b) = (-b, a).
    """
    num_blocks, kv_heads, head_dim, block_size = k_cache.shape
    tokens = qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (heads + 2 * kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"rope_write_kv: qkv {tuple(qkv.shape)} does not fit {heads} heads, {kv_heads} KV heads "
                         f"of even size {head_dim}")
    if v_cache.shape != (num_blocks, block_size, kv_heads, head_dim) or cos.shape[1] != head_dim:
        raise ValueError(f"rope_write_kv: caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} and tables "
                         f"{tuple(cos.shape)} do not fit")
    _check("rope_write_kv", qkv.dtype, qkv, cos, sin, k_cache, v_cache)
    _check("rope_write_kv", torch.int64, positions, slot_mapping)
    q = torch.empty(tokens, heads, head_dim, dtype=qkv.dtype)
    extension().rope_write_kv(qkv.data_ptr(), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                              slot_mapping.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                              DTYPE_CODE[qkv.dtype], tokens, heads, kv_heads, head_dim, block_size)
    return q


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, hidden] += delta (in place, when given); returns weight * rms_norm(x) [T, hidden].

    rms_norm(x) = x / sqrt(mean(x^2) + eps), in fp32, rounded to x's dtype before the weight multiplies it.
    """
    tokens, hidden = x.shape
    if weight.shape != (hidden,) or (delta is not None and delta.shape != x.shape):
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)}, delta {None if delta is None else tuple(delta.shape)}"
                         f" and weight {tuple(weight.shape)} do not fit")
    _check("add_rms_norm", x.dtype, x, weight, *(() if delta is None else (delta,)))
    out = torch.empty_like(x)
    extension().add_rms_norm(x.data_ptr(), 0 if delta is None else delta.data_ptr(), weight.data_ptr(),
                             out.data_ptr(), DTYPE_CODE[x.dtype], tokens, hidden, float(eps))
    return out


def sample_rows(logits: torch.Tensor, temperatures: list[float], uniforms: list[float],
                top_ks: list[int] | None = None, top_ps: list[float] | None = None,
                kept: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
    """Greedy or truncated temperature draws from logits [B, V] (fp32): (tokens [B], log-probs [B]).

    Row i: temperatures[i] <= 0 takes the first argmax with logprob log_softmax(logits[i])[token] (top-k /
    top-p ignored). Otherwise p = softmax(logits[i] / T) is truncated as sampling.truncate_probs does with
    top_ks[i] (-1 = off, the default) and top_ps[i] (1.0 = off, the default); ties at the top-p cut go to the
    lower token index. The token is where the CDF of the kept terms, in vocabulary order, first exceeds
    uniforms[i] (in [0, 1)) times their sum; its logprob is the untruncated log_softmax(logits[i] / T)[token].
    kept [B, V] (fp32), when given, receives the kept p of the sampled rows (cut terms 0, not renormalised;
    greedy rows are left as they were).
    A row without a finite maximum, or with a NaN, raises ValueError.
    """
    rows, vocab = logits.shape
    top_ks = [-1] * rows if top_ks is None else top_ks
    top_ps = [1.0] * rows if top_ps is None else top_ps
    if not len(temperatures) == len(uniforms) == len(top_ks) == len(top_ps) == rows:
        raise ValueError(f"sample_rows: {rows} rows, {len(temperatures)} temperatures, {len(uniforms)} uniforms, "
                         f"{len(top_ks)} top_ks, {len(top_ps)} top_ps")
    for i, (k, p) in enumerate(zip(top_ks, top_ps)):
        check_top_k(k, f"sample_rows: top_ks[{i}]")
        check_top_p(p, f"sample_rows: top_ps[{i}]")
    _check("sample_rows", torch.float32, logits, *(() if kept is None else (kept,)))
    if kept is not None and kept.shape != logits.shape:
        raise ValueError(f"sample_rows: kept {tuple(kept.shape)} is not logits' {tuple(logits.shape)}")
    temps = torch.tensor(temperatures, dtype=torch.float32)
    draws = torch.tensor(uniforms, dtype=torch.float32)
    ks = torch.tensor(top_ks, dtype=torch.int64)
    ps = torch.tensor(top_ps, dtype=torch.float32)
    tokens = torch.empty(rows, dtype=torch.int64)
    logprobs = torch.empty(rows, dtype=torch.float32)
    extension().sample_rows(logits.data_ptr(), rows, vocab, temps.data_ptr(), draws.data_ptr(), ks.data_ptr(),
                            ps.data_ptr(), tokens.data_ptr(), logprobs.data_ptr(),
                            0 if kept is None else kept.data_ptr())
    bad = (tokens < 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"sample_rows: logits of rows {bad[:8]} hold a NaN or no finite value")
    return tokens.tolist(), logprobs.tolist()
