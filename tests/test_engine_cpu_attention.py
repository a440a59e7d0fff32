"""The C++ CPU paged attention against the PyTorch path (gathered blocks + SDPA), decode and prefill."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import one_thread  # noqa: F401

from rexrag_fast.engine import cpu_attention
from rexrag_fast.engine.attention import AttentionMetadata, _decode_torch, _prefill_torch
from rexrag_fast.testing import assert_close

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="rexrag_fast._C built without paged attention")
ISAS = ["generic", "avx512", "avx512_bf16", "amx_bf16"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Each code path of the kernel that this CPU runs (the fastest is the default)."""
    if request.param not in cpu_attention.isas():
        pytest.skip(f"this CPU does not run the {request.param} path (it runs {cpu_attention.isas()})")
    cpu_attention.set_isa(request.param)
    try:
        yield request.param
    finally:
        cpu_attention.set_isa(cpu_attention.isas()[-1])


def make_pool(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def shared_tables(prefix_lens_in_blocks: list[list[int]], tail_tokens: list[int], block_size: int,
                  num_blocks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables where sequence i starts with the blocks of a chain of shared prefixes, then owns its tail.

    prefix_lens_in_blocks[i] = cumulative shared-block counts along i's chain, e.g. [2, 5]: the first 2 blocks
    are those of every sequence whose chain starts with 2, blocks 2..4 those of sequences with [2, 5].
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(num_blocks, generator=g).tolist()
    shared: dict[tuple[int, ...], list[int]] = {}
    tables, lens = [], []
    for chain, tail in zip(prefix_lens_in_blocks, tail_tokens):
        table: list[int] = []
        for depth in range(len(chain)):
            key = tuple(chain[:depth + 1])
            if key not in shared:
                shared[key] = [ids.pop() for _ in range(chain[depth] - len(table))]
            table += shared[key]
        table += [ids.pop() for _ in range(-(-tail // block_size))]
        tables.append(table)
        lens.append(len(table) * block_size - (-tail % block_size))
    width = max(len(t) for t in tables) + 1  # a padding column, as the engine's tables have
    padded = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(padded, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)


def decode_meta(tables: torch.Tensor, lens: torch.Tensor) -> AttentionMetadata:
    return AttentionMetadata(is_prefill=False, slot_mapping=torch.zeros(0, dtype=torch.int64), block_tables=tables,
                             context_lens=lens, context_lens_list=lens.tolist())


def poison_unused_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor):
    """NaN into every pool slot [blocks, block_size, ...] that no sequence's context covers (the rest of a
    partly filled last block, free blocks): the kernel may load them but must not let them into the result."""
    used = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    block_size = k_cache.shape[1]
    for table, n in zip(tables.tolist(), lens.tolist()):
        for pos in range(n):
            used[table[pos // block_size], pos % block_size] = True
    k_cache[~used] = float("nan")
    v_cache[~used] = float("nan")


# (16, 9, 3, 64) is SmolLM2's shape; the kernel reads K/V straight from the pool for items of up to 16 query
# heads when block_size and head_dim are multiples of 16 and converts them to scratch otherwise: G = 8 sends
# the 5-row shared prefix (40 query heads) to scratch (bf16 pairs, AMX tiles where head_dim % 32 == 0), the
# other shapes cover block and head sizes it cannot read straight
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,heads,kv_heads,head_dim", [(16, 9, 3, 64), (4, 4, 4, 32), (32, 6, 2, 40),
                                                                 (16, 16, 2, 64), (32, 8, 2, 32)])
def test_decode_matches_torch(dtype, block_size, heads, kv_heads, head_dim, isa):
    chains = [[3], [3], [3, 5], [3, 5], [3, 5], [], [1], [1]]
    tails = [1, 17, 5, block_size, 40, 23, 2, 9]
    tables, lens = shared_tables(chains, tails, block_size, 80, seed=block_size)
    k_cache, v_cache = make_pool(80, block_size, kv_heads, head_dim, dtype, seed=1)
    q = torch.randn(len(tails), heads, head_dim).to(dtype)
    expected = _decode_torch(q.float(), k_cache.float(), v_cache.float(), decode_meta(tables, lens))
    poison_unused_slots(k_cache, v_cache, tables, lens)
    for share in (True, False):
        plan = cpu_attention.decode_plan(tables, lens, block_size, share_prefixes=share)
        out = cpu_attention.paged_attention_cpu(plan, q, cpu_attention.k_by_dim(k_cache), v_cache)
        assert out.dtype == dtype
        # bf16: the fp32 result rounded once to bf16 (2^-8 relative) plus fp32 reordering
        assert_close(out.float(), expected, atol=1e-5 if dtype == torch.float32 else 4e-3,
                     rtol=1e-4 if dtype == torch.float32 else 8e-3, name=f"decode share={share}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_over_long_contexts_merges_chunks(dtype, isa):
    """Contexts of several decode work items each (a shared 40-block prefix, then 3-9 own blocks): each row's
    partial softmax states are merged across items."""
    tables, lens = shared_tables([[40], [40], [40], []], [100, 37, 130, 700], 16, 160, seed=9)
    k_cache, v_cache = make_pool(160, 16, 2, 64, dtype, seed=2)
    q = torch.randn(4, 8, 64).to(dtype)
    expected = _decode_torch(q.float(), k_cache.float(), v_cache.float(), decode_meta(tables, lens))
    poison_unused_slots(k_cache, v_cache, tables, lens)
    plan = cpu_attention.decode_plan(tables, lens, 16)
    out = cpu_attention.paged_attention_cpu(plan, q, cpu_attention.k_by_dim(k_cache), v_cache)
    assert_close(out.float(), expected, atol=1e-5 if dtype == torch.float32 else 4e-3,
                 rtol=1e-4 if dtype == torch.float32 else 8e-3, name="decode")


def test_decode_reads_shared_blocks_once():
    # 4 sequences on the same 3 full blocks, then 2 own blocks each; 2 of them share 2 more blocks first
    tables, lens = shared_tables([[3], [3], [3, 5], [3, 5]], [20, 20, 20, 20], 16, 64, seed=0)
    shared = cpu_attention.decode_plan(tables, lens, 16, share_prefixes=True)
    private = cpu_attention.decode_plan(tables, lens, 16, share_prefixes=False)
    assert private.blocks_read == 2 * (3 + 2) + 2 * (5 + 2)
    assert shared.blocks_read == 3 + 2 + 4 * 2


def test_decode_partial_last_block_is_not_shared():
    """Two rows on the same block ids whose last block is only partly filled for one of them."""
    tables = torch.tensor([[5, 6, 0], [5, 6, 0]], dtype=torch.int32)
    lens = torch.tensor([32, 20], dtype=torch.int32)
    k_cache, v_cache = make_pool(8, 16, 2, 16, torch.float32, seed=3)
    q = torch.randn(2, 4, 16)
    plan = cpu_attention.decode_plan(tables, lens, 16)
    assert plan.blocks_read == 1 + 2  # block 5 once; block 6 by each (row 1 sees only part of it)
    expected = _decode_torch(q, k_cache, v_cache, decode_meta(tables, lens))
    out = cpu_attention.paged_attention_cpu(plan, q, cpu_attention.k_by_dim(k_cache), v_cache)
    assert_close(out, expected, name="decode")


# head_dim 32 and 128 take AMX tiles (one and two 64-column passes of P.V), 48 the pairs' path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,heads,kv_heads,head_dim", [(16, 6, 2, 32), (8, 6, 2, 32), (16, 4, 1, 128),
                                                                 (16, 6, 3, 48)])
def test_prefill_over_cached_context_matches_torch(dtype, block_size, heads, kv_heads, head_dim, isa):
    new_tokens = [37, 1, 16, 50, 40]
    cached = [0, 31, block_size * 2, 5, 200]  # the last context spans two of the kernel's 128-key chunks
    g = torch.Generator().manual_seed(4)
    ids = torch.randperm(64, generator=g).tolist()
    ctx = [n + c for n, c in zip(new_tokens, cached)]
    tables = [[ids.pop() for _ in range(-(-c // block_size))] for c in ctx]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    k_cache, v_cache = make_pool(64, block_size, kv_heads, head_dim, dtype, seed=5)
    total = sum(new_tokens)
    q = torch.randn(total, heads, head_dim).to(dtype)
    k_new = torch.randn(total, kv_heads, head_dim).to(dtype)
    v_new = torch.randn(total, kv_heads, head_dim).to(dtype)
    # the new tokens' K/V go to their slots first, as paged_attention does before attending
    start = 0
    for table, n, c in zip(tables, new_tokens, ctx):
        for r, pos in enumerate(range(c - n, c)):
            k_cache[table[pos // block_size], pos % block_size] = k_new[start + r]
            v_cache[table[pos // block_size], pos % block_size] = v_new[start + r]
        start += n
    cu = torch.tensor([0] + torch.tensor(new_tokens).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.tensor(ctx, dtype=torch.int32)
    meta = AttentionMetadata(is_prefill=True, slot_mapping=torch.zeros(0, dtype=torch.int64), block_tables=bt,
                             context_lens=lens, cu_seqlens_q=cu, query_lens_list=new_tokens, context_lens_list=ctx)
    expected = _prefill_torch(q.float(), k_new.float(), v_new.float(), k_cache.float(), v_cache.float(), meta)
    poison_unused_slots(k_cache, v_cache, bt, lens)
    plan = cpu_attention.prefill_plan(bt, lens, cu, block_size)
    out = cpu_attention.paged_attention_cpu(plan, q, cpu_attention.k_by_dim(k_cache), v_cache)
    assert_close(out.float(), expected, atol=1e-5 if dtype == torch.float32 else 4e-3,
                 rtol=1e-4 if dtype == torch.float32 else 8e-3, name="prefill")


def test_bad_inputs_are_refused():
    tables = torch.tensor([[1, 2]], dtype=torch.int32)
    k_cache, v_cache = make_pool(4, 16, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="context_lens"):
        cpu_attention.decode_plan(tables, torch.tensor([33], dtype=torch.int32), 16)  # more than 2 blocks hold
    plan = cpu_attention.decode_plan(tables, torch.tensor([20], dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="rows"):
        cpu_attention.paged_attention_cpu(plan, torch.randn(2, 4, 16), cpu_attention.k_by_dim(k_cache), v_cache)
    with pytest.raises(ValueError, match="dtypes"):
        cpu_attention.paged_attention_cpu(plan, torch.randn(1, 4, 16).half(), cpu_attention.k_by_dim(k_cache), v_cache)
    far = cpu_attention.decode_plan(torch.tensor([[1, 9]], dtype=torch.int32), torch.tensor([20], dtype=torch.int32),
                                    16)
    with pytest.raises(ValueError, match="outside the pool"):
        cpu_attention.paged_attention_cpu(far, torch.randn(1, 4, 16), cpu_attention.k_by_dim(k_cache), v_cache)


def test_code_path_choice():
    paths = cpu_attention.isas()
    assert paths[0] == "generic" and set(paths) <= set(ISAS) and cpu_attention.isa() == paths[-1]
    missing = [p for p in ISAS if p not in paths] or ["avx1024"]
    with pytest.raises(ValueError, match=f"'{missing[0]}' is not one this CPU runs"):
        cpu_attention.set_isa(missing[0])
    assert cpu_attention.isa() == paths[-1]  # a refused cap changes nothing
    assert cpu_attention.set_isa("generic") == paths[-1]
    try:
        assert cpu_attention.isa() == "generic"
    finally:
        cpu_attention.set_isa(paths[-1])
