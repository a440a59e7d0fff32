"""Attention over the paged KV pool: write new K/V into their slots, then attend.

Layout of one layer's cache: k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim]; token t of a
sequence lives in slot block_table[t // block_size] * block_size + t % block_size.

Prefill (varlen): sequence i brings n_i new tokens after c_i - n_i cached ones (c_i = context length); new
token r attends to keys j <= c_i - n_i + r. Decode: one new token per sequence, attending to all c_i keys.
softmax scale 1/sqrt(head_dim); query head h reads KV head h // (heads / kv_heads) (GQA).

Backends: "torch" (scaled_dot_product_attention on gathered blocks; CPU and CUDA) and "flash_attn"
(flash_attn_varlen_func / flash_attn_with_kvcache with block_table; CUDA, block_size a multiple of 256).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

FLASH_ATTN_BLOCK_MULTIPLE = 256  # flash-attn's paged-KV kernels need pages of a multiple of 256 tokens
_logged: set[str] = set()


@dataclasses.dataclass
class AttentionMetadata:
    """Per-forward batch description shared by all layers.

    slot_mapping [T] int64: pool slot of each new token. block_tables [B, max_blocks] int32 (padding 0),
    context_lens [B] int32: keys per sequence after this step. Prefill also has cu_seqlens_q [B+1] int32
    (new tokens per sequence, prefix sums), cu_seqlens_k [B+1] int32, and the Python lists that the PyTorch
    path loops over.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 1
    max_seqlen_k: int = 1
    query_lens_list: list[int] = dataclasses.field(default_factory=list)
    context_lens_list: list[int] = dataclasses.field(default_factory=list)
    no_cached_prefix: bool = False
    # built by the first layer that needs them, reused by the others
    prefill_masks: list[torch.Tensor | None] | None = None
    decode_mask: torch.Tensor | None = None


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(requested: str, device: torch.device, block_size: int, dtype: torch.dtype) -> str:
    """'flash_attn' or 'torch' for this device, block size and dtype; each distinct choice is logged once.

    flash-attn needs CUDA, fp16/bf16 and pages of a multiple of 256 tokens; "auto" falls back to the PyTorch
    path when any of these is missing.
    """
    if requested not in ("auto", "flash_attn", "torch"):
        raise ValueError(f"attention_backend: expected 'auto', 'flash_attn' or 'torch', got {requested!r}")
    problems = []
    if device.type != "cuda":
        problems.append(f"device {device} is not CUDA")
    if dtype not in (torch.float16, torch.bfloat16):
        problems.append(f"dtype {dtype} is not fp16/bf16")
    if block_size % FLASH_ATTN_BLOCK_MULTIPLE:
        problems.append(f"block_size {block_size} is not a multiple of {FLASH_ATTN_BLOCK_MULTIPLE}")
    if not problems and not _flash_attn_importable():
        problems.append("flash-attn is not importable (pip install flash-attn)")
    if requested == "flash_attn" and problems:
        raise RuntimeError("attention_backend='flash_attn' cannot run: " + "; ".join(problems))
    backend = "flash_attn" if not problems and requested != "torch" else "torch"
    why = f" ({'; '.join(problems)})" if backend == "torch" and device.type == "cuda" and requested == "auto" else ""
    message = f"rollout engine attention backend: {backend} on {device}{why}"
    if message not in _logged:
        _logged.add(message)
        logger.info(message)
    return backend


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, kv_heads, head_dim] at slots slot_mapping [T] of the layer's cache (in place)."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """[length, kv_heads, head_dim] keys (or values) of one sequence, from its block table [n_blocks]."""
    n = -(-length // cache.shape[1])
    return cache[block_table[:n]].flatten(0, 1)[:length]


def _prefill_masks(meta: AttentionMetadata, device: torch.device) -> list[torch.Tensor | None]:
    """Per sequence: None (nothing cached: plain causal) or the [n, c] mask key j <= c - n + row."""
    masks: list[torch.Tensor | None] = []
    for n, c in zip(meta.query_lens_list, meta.context_lens_list):
        if n == c:
            masks.append(None)
        else:
            rows = torch.arange(n, device=device).unsqueeze(1) + (c - n)
            masks.append(torch.arange(c, device=device).unsqueeze(0) <= rows)
    return masks


def _prefill_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    if meta.prefill_masks is None:
        meta.prefill_masks = _prefill_masks(meta, q.device)
    out = torch.empty_like(q)
    start = 0
    for i, (n, c) in enumerate(zip(meta.query_lens_list, meta.context_lens_list)):
        qi = q[start:start + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        mask = meta.prefill_masks[i]
        if mask is None:  # nothing cached: the new keys are all the keys
            ki, vi = k[start:start + n], v[start:start + n]
        else:
            ki = _gather(k_cache, meta.block_tables[i], c)
            vi = _gather(v_cache, meta.block_tables[i], c)
        o = F.scaled_dot_product_attention(
            qi, ki.transpose(0, 1).unsqueeze(0), vi.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, is_causal=mask is None, enable_gqa=True,
        )
        out[start:start + n] = o[0].transpose(0, 1)
        start += n
    return out


def _decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata) -> torch.Tensor:
    bsz = q.shape[0]
    max_len = meta.block_tables.shape[1] * k_cache.shape[1]
    if meta.decode_mask is None:
        valid = torch.arange(max_len, device=q.device).unsqueeze(0) < meta.context_lens.unsqueeze(1)
        meta.decode_mask = valid.view(bsz, 1, 1, max_len)
    # [B, max_blocks, block, KV, D] -> [B, KV, S, D]
    keys = k_cache[meta.block_tables].flatten(1, 2).transpose(1, 2)
    values = v_cache[meta.block_tables].flatten(1, 2).transpose(1, 2)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=meta.decode_mask, enable_gqa=True)
    return o.squeeze(2)


def _prefill_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    if meta.no_cached_prefix:
        return flash_attn_varlen_func(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_q,
                                      meta.max_seqlen_q, meta.max_seqlen_q, causal=True)
    return flash_attn_varlen_func(q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k,
                                  meta.max_seqlen_q, meta.max_seqlen_k, causal=True,
                                  block_table=meta.block_tables)


def _decode_flash(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata) -> torch.Tensor:
    from flash_attn import flash_attn_with_kvcache

    o = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
                                block_table=meta.block_tables, causal=True)
    return o.squeeze(1)


def paged_attention(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Write k, v [T, KV, D] into the cache, then attend: q [T, H, D] -> [T, H, D].

    For decode T = B (one token per sequence).
    """
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    if backend == "flash_attn":
        return (_prefill_flash(q, k, v, k_cache, v_cache, meta) if meta.is_prefill
                else _decode_flash(q, k_cache, v_cache, meta))
    return (_prefill_torch(q, k, v, k_cache, v_cache, meta) if meta.is_prefill
            else _decode_torch(q, k_cache, v_cache, meta))
