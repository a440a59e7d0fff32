"""CPU paged attention through the C++ kernel (csrc/paged_attention_cpu.*): K/V are read in place from the pool.

A plan (work items over block spans, built once per engine step and shared by every layer) decides what each
thread reads; in a decode plan, a run of full blocks that several sequences share (the same block ids, as
the prefix cache hands out) is one item for all of them, so those blocks are read once per step. The kernel
accumulates in fp32 (online softmax, partials merged per row), reads bf16 or fp32 K/V, and takes the AVX-512
build on CPUs that have it, with bf16 pair products (vdpbf16ps) where the CPU has AVX-512-BF16 and AMX tiles
where it has AMX-BF16 (`isa()`), the portable build otherwise.
"""

from __future__ import annotations

import math

import torch

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}  # the extension's dtype codes
# blocks per work item in decode: enough items to keep every thread busy, few enough that an item's setup is
# small against its reads (SmolLM2 at batch 16-64 on a 2-core Xeon: 16 blocks read 10-15% faster than 8)
DECODE_CHUNK_BLOCKS = 16


def extension():
    """The C++ extension rexrag_fast._C (ImportError when it was not built)."""
    from rexrag_fast import _C

    return _C


def extension_has(*names: str) -> bool:
    """True when the built extension has all of `names` (an older build may lack newer ones)."""
    try:
        ext = extension()
    except ImportError:
        return False
    return all(hasattr(ext, n) for n in names)


def available() -> bool:
    """True when the built extension has the CPU paged attention."""
    return extension_has("paged_attention", "make_decode_plan", "make_prefill_plan")


def isa() -> str:
    """'amx_bf16', 'avx512_bf16', 'avx512' or 'generic': the code path the kernel takes now."""
    return extension().paged_attention_isa()


def isas() -> list[str]:
    """The code paths this CPU runs, slowest first (the last is the default)."""
    return list(extension().paged_attention_isas())


def set_isa(name: str) -> str:
    """Cap the kernel's code path at `name` (one of isas(); ValueError naming them otherwise), so that tests
    and benchmarks run each path this CPU has. Returns the path taken before."""
    before = isa()
    extension().set_paged_attention_isa(name)
    return before


def _int32_array(t: torch.Tensor):
    return t.detach().to(device="cpu", dtype=torch.int32).contiguous().numpy()


def decode_plan(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                share_prefixes: bool = True):
    """Plan of a decode step: block_tables [B, max_blocks] int32, context_lens [B] int32 (keys per sequence)."""
    return extension().make_decode_plan(_int32_array(block_tables), _int32_array(context_lens), block_size,
                                        DECODE_CHUNK_BLOCKS, share_prefixes)


def prefill_plan(block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 block_size: int):
    """Plan of a varlen prefill: sequence b's new tokens are rows cu_seqlens_q[b]:cu_seqlens_q[b+1] and come
    after context_lens[b] - (new tokens) cached ones; block_tables [B, max_blocks], cu_seqlens_q [B + 1]."""
    return extension().make_prefill_plan(_int32_array(block_tables), _int32_array(context_lens),
                                         _int32_array(cu_seqlens_q), block_size)


def k_by_dim(k_cache: torch.Tensor) -> torch.Tensor:
    """A K cache [num_blocks, block_size, KV, D] in the kernel's layout [num_blocks, KV, D, block_size]."""
    return k_cache.permute(0, 2, 3, 1).contiguous()


def paged_attention_cpu(plan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:
    """q [T, H, D] (T = plan.num_rows) over k_cache [num_blocks, KV, D, block_size] (k_by_dim's layout) and
    v_cache [num_blocks, block_size, KV, D] -> [T, H, D].

    scale defaults to 1/sqrt(D); query head h reads KV head h // (H / KV). q and the caches are float32 or
    bfloat16 CPU tensors (the output has q's dtype).
    """
    if q.device.type != "cpu" or k_cache.device.type != "cpu" or v_cache.device.type != "cpu":
        raise ValueError(f"paged_attention_cpu: expected CPU tensors, got q on {q.device}, cache on {k_cache.device}")
    if (q.dim() != 3 or v_cache.dim() != 4 or k_cache.dim() != 4
            or k_cache.shape != (v_cache.shape[0], v_cache.shape[2], v_cache.shape[3], v_cache.shape[1])):
        raise ValueError(f"paged_attention_cpu: expected q [T, H, D], k_cache [blocks, KV, D, block_size] and "
                         f"v_cache [blocks, block_size, KV, D], got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    t, heads, head_dim = q.shape
    num_blocks, _, kv_heads, cache_dim = v_cache.shape
    if cache_dim != head_dim or heads % kv_heads:
        raise ValueError(f"paged_attention_cpu: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} "
                         "(same head_dim, heads a multiple of kv_heads)")
    if t != plan.num_rows:
        raise ValueError(f"paged_attention_cpu: q has {t} rows, the plan {plan.num_rows}")
    if q.dtype not in DTYPE_CODE or k_cache.dtype not in DTYPE_CODE or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"paged_attention_cpu: dtypes must be float32 or bfloat16, got q {q.dtype}, "
                         f"k {k_cache.dtype}, v {v_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged_attention_cpu: the caches must be contiguous")
    q = q.contiguous()
    out = torch.empty_like(q)
    extension().paged_attention(plan, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                                DTYPE_CODE[q.dtype], DTYPE_CODE[k_cache.dtype], heads, kv_heads, head_dim,
                                num_blocks, 1.0 / math.sqrt(head_dim) if scale is None else float(scale))
    return out
