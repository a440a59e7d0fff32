"""Microbenchmarks of single prefix-cache calls (pytest-benchmark): `pytest bench --benchmark-only`.

Not part of the default test run (pytest's testpaths is tests/). Each benchmark pairs the C++ call with the
same call on the pure-Python baseline, on a 2k-token sequence in 16-token blocks.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.baselines.radix_cache import PyBlockAllocator, PyRadixCache
from rexrag_fast.cache import BlockAllocator, PrefixCache

BS = 16
SEQ_LEN = 2048


def populated(impl: str, num_seqs: int = 64):
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 32000, SEQ_LEN // 2, dtype=np.int32)
    seqs = [np.concatenate([prompt, rng.integers(0, 32000, SEQ_LEN // 2, dtype=np.int32)]) for _ in range(num_seqs)]
    if impl == "cpp":
        alloc = BlockAllocator(num_seqs * SEQ_LEN // BS)
        cache = PrefixCache(BS, alloc)
        for s in seqs:
            m = cache.match_prefix(s)
            cache.insert(s, np.concatenate([m.block_ids, alloc.allocate(SEQ_LEN // BS - len(m.block_ids))]))
        return cache, alloc, seqs
    alloc = PyBlockAllocator(num_seqs * SEQ_LEN // BS)
    cache = PyRadixCache(BS, alloc)
    lists = [s.tolist() for s in seqs]
    for s in lists:
        blocks, _ = cache.match_prefix(s)
        cache.insert(s, blocks + alloc.allocate(SEQ_LEN // BS - len(blocks)))
    return cache, alloc, lists


@pytest.mark.parametrize("impl", ["cpp", "python"])
def test_match_prefix_hit(benchmark, impl: str) -> None:
    cache, _, seqs = populated(impl)
    result = benchmark(cache.match_prefix, seqs[7])
    matched = result.num_matched_tokens if impl == "cpp" else len(result[0]) * BS
    assert matched == SEQ_LEN


@pytest.mark.parametrize("impl", ["cpp", "python"])
def test_insert_already_cached(benchmark, impl: str) -> None:
    cache, _, seqs = populated(impl)
    if impl == "cpp":
        ids = cache.match_prefix(seqs[3]).block_ids
    else:
        ids = cache.match_prefix(seqs[3])[0]
    assert benchmark(cache.insert, seqs[3], ids) == SEQ_LEN


@pytest.mark.parametrize("impl", ["cpp", "python"])
def test_insert_then_evict_new_branch(benchmark, impl: str) -> None:
    """Insert a sequence that branches off a cached prompt, then evict its new blocks again."""
    cache, alloc, seqs = populated(impl, num_seqs=8)
    branch = np.concatenate([np.asarray(seqs[0][: SEQ_LEN // 2]), np.arange(SEQ_LEN // 2, dtype=np.int32)])
    if impl == "python":
        branch = branch.tolist()

    def round_trip() -> int:
        if impl == "cpp":
            m = cache.match_prefix(branch)
            ids = np.concatenate([m.block_ids, alloc.allocate(SEQ_LEN // BS - len(m.block_ids))])
            cache.insert(branch, ids)
        else:
            blocks, _ = cache.match_prefix(branch)
            cache.insert(branch, blocks + alloc.allocate(SEQ_LEN // BS - len(blocks)))
        return cache.evict(SEQ_LEN // BS // 2)

    assert benchmark(round_trip) == SEQ_LEN // BS // 2


@pytest.mark.parametrize("impl", ["cpp", "python"])
def test_lock_unlock(benchmark, impl: str) -> None:
    cache, _, seqs = populated(impl)
    m = cache.match_prefix(seqs[5])
    node = m.handle if impl == "cpp" else m[1]

    def lock_unlock() -> None:
        cache.lock(node)
        cache.unlock(node)

    benchmark(lock_unlock)
    assert cache.locked_blocks == 0
