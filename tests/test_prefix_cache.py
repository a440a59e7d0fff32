"""PrefixCache: match/insert/lock/evict semantics, reference accounting, errors, namespaces, threads."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from rexrag_fast import _C
from rexrag_fast.cache import BlockAllocator, CacheError, MatchResult, PrefixCache


def seq(*parts: tuple[int, int]) -> list[int]:
    """Concatenation of token runs (start, length): seq((0, 8), (100, 4)) = 0..7, 100..103."""
    return [t for start, n in parts for t in range(start, start + n)]


def cache_and_insert(block_size: int, tokens: list[int], num_blocks: int = 64, **kw):
    alloc = BlockAllocator(num_blocks)
    cache = PrefixCache(block_size, alloc, **kw)
    blocks = alloc.allocate(len(tokens) // block_size)
    assert cache.insert(tokens, blocks) == 0
    return alloc, cache, blocks


def observable(alloc: BlockAllocator, cache: PrefixCache) -> tuple:
    return (alloc.num_free, [alloc.refcount(b) for b in range(alloc.num_blocks)], cache.evictable_blocks,
            cache.locked_blocks, cache.cached_tokens, cache.hits, cache.misses)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("as_array", [False, True])
def test_insert_then_match_full_blocks_only(block_size: int, as_array: bool) -> None:
    tokens = seq((0, 3 * block_size + block_size // 2))  # three full blocks and a partial one
    alloc, cache, blocks = cache_and_insert(block_size, tokens)
    assert len(blocks) == 3 and cache.cached_tokens == 3 * block_size
    query = np.array(tokens, dtype=np.int64) if as_array else tokens
    m = cache.match_prefix(query)
    assert isinstance(m, MatchResult)
    assert m.block_ids.dtype == np.int32 and m.block_ids.tolist() == blocks.tolist()
    assert m.num_matched_tokens == 3 * block_size
    ids, n, handle = m  # unpacks like a tuple
    assert n == m.num_matched_tokens and handle == m.handle
    # a query that diverges inside block 2 matches blocks 0 and 1 only
    diverged = tokens[: 2 * block_size] + [10**6] * block_size
    m2 = cache.match_prefix(diverged)
    assert m2.block_ids.tolist() == blocks[:2].tolist() and m2.num_matched_tokens == 2 * block_size
    # shorter than a block: nothing to match
    assert cache.match_prefix(tokens[: block_size - 1]).num_matched_tokens == 0
    assert (cache.hits, cache.misses) == (2, 1)
    cache.check_invariants()


def test_match_inside_an_edge_splits_and_its_handle_locks_exactly_the_matched_blocks() -> None:
    tokens = seq((0, 20))
    alloc, cache, blocks = cache_and_insert(4, tokens)  # one node with 5 blocks
    m = cache.match_prefix(tokens[:8] + [999] * 4)
    assert m.block_ids.tolist() == blocks[:2].tolist()
    cache.lock(m.handle)
    assert (cache.locked_blocks, cache.evictable_blocks) == (2, 3)
    assert cache.evict(100) == 3  # the unlocked tail goes, the locked prefix stays
    assert alloc.num_free == 64 - 2
    cache.unlock(m.handle)
    assert (cache.locked_blocks, cache.evictable_blocks) == (0, 2)
    cache.check_invariants()


def test_handle_of_a_deep_node_survives_a_split_above_it() -> None:
    tokens = seq((0, 16))
    alloc, cache, blocks = cache_and_insert(4, tokens)
    deep = cache.match_prefix(tokens)
    cache.lock(deep.handle)
    branch = tokens[:4] + [500] * 8
    assert cache.insert(branch, [blocks[0], *alloc.allocate(2)]) == 4  # splits the locked node after block 0
    assert cache.locked_blocks == 4 and cache.evictable_blocks == 2
    cache.unlock(deep.handle)
    assert cache.locked_blocks == 0 and cache.evictable_blocks == 6
    cache.check_invariants()


def test_insert_reports_cached_tokens_and_takes_over_only_new_blocks() -> None:
    alloc = BlockAllocator(32)
    cache = PrefixCache(4, alloc)
    prompt = seq((0, 8))
    a = prompt + seq((100, 8))
    b = prompt + seq((200, 9))  # 4 full blocks + 1 token
    ba = alloc.allocate(4)
    assert cache.insert(a, ba) == 0
    assert [alloc.refcount(x) for x in ba] == [1] * 4  # the caller's references became the tree's
    bb = alloc.allocate(4)  # a naive caller allocated its own blocks for the shared prompt too
    assert cache.insert(b, bb) == 8
    alloc.free(bb[:2])  # its duplicates of the two cached prompt blocks
    assert alloc.num_free == 32 - 6
    assert cache.cached_tokens == 6 * 4
    m = cache.match_prefix(b)
    assert m.block_ids.tolist() == [*ba[:2], *bb[2:]]
    # the engine's way: match first, allocate only the rest, pass the matched ids back
    c = prompt + seq((300, 4))
    mc = cache.match_prefix(c)
    new = alloc.allocate(1)
    assert cache.insert(c, np.concatenate([mc.block_ids, new])) == 8
    assert alloc.refcount(int(ba[0])) == 1
    cache.check_invariants()


def test_insert_of_an_already_cached_sequence_changes_nothing_but_recency() -> None:
    tokens = seq((0, 12))
    alloc, cache, blocks = cache_and_insert(4, tokens)
    before = observable(alloc, cache)
    assert cache.insert(tokens, blocks) == 12
    assert observable(alloc, cache) == before
    cache.check_invariants()


def test_evict_takes_least_recently_used_leaves_and_their_deepest_blocks_first() -> None:
    alloc = BlockAllocator(32)
    cache = PrefixCache(2, alloc)
    prompt = seq((0, 4))
    seqs = [prompt + seq((100 * (i + 1), 6)) for i in range(3)]  # shared 2 blocks, 3 leaves of 3 blocks
    leaf_blocks = []
    for s in seqs:
        m = cache.match_prefix(s)
        new = alloc.allocate(len(s) // 2 - len(m.block_ids))
        cache.insert(s, np.concatenate([m.block_ids, new]))
        leaf_blocks.append(new[-3:].tolist())
    cache.match_prefix(seqs[0])  # seqs[0] becomes the most recent; seqs[1] the least
    assert cache.evict(4) == 4
    assert alloc.refcount(leaf_blocks[1][0]) == 0 and alloc.refcount(leaf_blocks[2][-1]) == 0
    assert [alloc.refcount(b) for b in leaf_blocks[2]] == [1, 1, 0]
    assert cache.match_prefix(seqs[2]).num_matched_tokens == 4 + 4  # prompt + two surviving blocks
    assert cache.match_prefix(seqs[1]).num_matched_tokens == 4
    # an emptied branch makes its parent a leaf again: everything can go
    remaining = cache.cached_tokens // 2
    assert remaining == 2 + 3 + 2  # prompt, seqs[0], trimmed seqs[2]
    assert cache.evict(100) == remaining
    assert cache.cached_tokens == 0 and alloc.num_free == 32
    cache.check_invariants()


def test_locked_node_and_its_ancestors_are_never_evicted() -> None:
    alloc = BlockAllocator(32)
    cache = PrefixCache(2, alloc)
    a = seq((0, 4), (10, 4))
    b = seq((0, 4), (20, 4))
    for s in (a, b):
        m = cache.match_prefix(s)
        cache.insert(s, np.concatenate([m.block_ids, alloc.allocate(4 - len(m.block_ids))]))
    m = cache.match_prefix(a)
    cache.lock(m.handle)
    cache.lock(m.handle)
    assert cache.locked_blocks == 4 and cache.evictable_blocks == 2
    assert cache.evict(100) == 2
    assert cache.match_prefix(a).num_matched_tokens == 8
    cache.unlock(m.handle)
    assert cache.evict(100) == 0  # still locked once
    cache.unlock(m.handle)
    assert cache.evict(100) == 4 and cache.cached_tokens == 0
    cache.check_invariants()


def test_unlocking_an_ancestor_locked_only_through_a_descendant_raises() -> None:
    tokens = seq((0, 16))
    alloc, cache, _ = cache_and_insert(4, tokens)
    upper = cache.match_prefix(tokens[:8])  # splits: the upper node holds blocks 0-1
    deep = cache.match_prefix(tokens)
    cache.lock(deep.handle)
    with pytest.raises(CacheError, match="is not locked .*lock count 1 comes from deeper nodes"):
        cache.unlock(upper.handle)
    cache.lock(upper.handle)
    cache.unlock(deep.handle)
    assert cache.locked_blocks == 2
    cache.unlock(upper.handle)
    assert cache.locked_blocks == 0
    cache.check_invariants()


def test_root_handle_lock_and_unlock_are_no_ops() -> None:
    alloc, cache, _ = cache_and_insert(4, seq((0, 8)))
    miss = cache.match_prefix([7, 7, 7, 7])
    assert miss.num_matched_tokens == 0
    cache.lock(miss.handle)
    cache.unlock(miss.handle)
    cache.unlock(miss.handle)
    assert cache.locked_blocks == 0
    cache.check_invariants()


def test_namespaces_never_share_nodes() -> None:
    alloc = BlockAllocator(16)
    cache = PrefixCache(4, alloc)
    tokens = seq((0, 8))
    b0 = alloc.allocate(2)
    cache.insert(tokens, b0, namespace=0)
    assert cache.match_prefix(tokens, namespace=1).num_matched_tokens == 0
    b1 = alloc.allocate(2)
    assert cache.insert(tokens, b1, namespace=1) == 0
    assert cache.match_prefix(tokens, namespace=1).block_ids.tolist() == b1.tolist()
    assert cache.match_prefix(tokens, namespace=0).block_ids.tolist() == b0.tolist()
    assert cache.cached_tokens == 16
    cache.check_invariants()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c, a, t, h: c.insert(t, [0, 1, 2]), r"got 3 block ids for 20 tokens; expected .* = 5"),
        (lambda c, a, t, h: c.insert(t[:8], [0]), r"got 1 block ids for 8 tokens; expected .* = 2"),
        (lambda c, a, t, h: c.insert(t, [0, 1, 2, 3, 99]), r"block id 99 out of range \[0, 16\)"),
        (lambda c, a, t, h: c.insert(t, [0, 1, 2, 3, 15]), r"block 15 at position 4 is free"),
        (lambda c, a, t, h: c.insert(t, [6, 7, 8, 6, 9]), r"block 6 appears more than once"),
        (lambda c, a, t, h: c.insert(t[:12] + [9] * 8, [6, 7, 8, 2, 9]), r"block 2 at position 3 is already held"),
        (lambda c, a, t, h: c.insert(t, [0, 1, 2, 3, 4], namespace=5), r"block 0 at position 0 is already held"),
        (lambda c, a, t, h: c.insert([1.5] * 4, [6]), r"tokens\[0\] must be an int"),
        (lambda c, a, t, h: c.insert(np.array([2**33] * 4), [6]), r"tokens\[0\] = 8589934592 does not fit"),
        (lambda c, a, t, h: c.match_prefix(np.zeros((2, 4), np.int32)), r"tokens must be 1-D"),
        (lambda c, a, t, h: c.lock(h + (1 << 32)), r"lock: unknown handle"),
        (lambda c, a, t, h: c.lock(-5), r"lock: unknown handle -5"),
        (lambda c, a, t, h: c.unlock(12345), r"unlock: unknown handle 12345"),
        (lambda c, a, t, h: c.unlock(h), r"unlock: handle .* is not locked"),
        (lambda c, a, t, h: c.evict(-1), r"evict: num_blocks=-1 must be >= 0"),
        (lambda c, a, t, h: a.free([2]), r"only reference belongs to the prefix cache"),
        (lambda c, a, t, h: (c.lock(h), c.reset()), r"reset: 5 blocks are locked"),
    ],
)
def test_misuse_raises_and_changes_nothing(call, match: str) -> None:
    alloc = BlockAllocator(16)
    cache = PrefixCache(4, alloc)
    tokens = seq((0, 20))
    cache.insert(tokens, alloc.allocate(5))
    alloc.allocate(10)  # blocks 5..14 held by the caller, block 15 free
    handle = cache.match_prefix(tokens).handle
    before = observable(alloc, cache)
    with pytest.raises(CacheError, match=match):
        call(cache, alloc, tokens, handle)
    after = observable(alloc, cache)
    if "reset" in match:  # the lock before the failing reset is part of the call
        cache.unlock(handle)
        after = observable(alloc, cache)
    assert after == before
    cache.check_invariants()


def test_stale_handle_after_eviction_is_rejected() -> None:
    tokens = seq((0, 8))
    alloc, cache, _ = cache_and_insert(4, tokens)
    h = cache.match_prefix(tokens).handle
    cache.evict(2)
    with pytest.raises(CacheError, match="unknown handle"):
        cache.lock(h)
    # the freed slot is reused by a new node under a new generation: the old handle stays invalid
    h2 = cache.match_prefix(tokens).handle
    cache.insert(tokens, alloc.allocate(2))
    h3 = cache.match_prefix(tokens).handle
    assert h3 != h and h2 != h
    with pytest.raises(CacheError, match="unknown handle"):
        cache.unlock(h)
    cache.check_invariants()


def test_reset_frees_everything_and_zeroes_counters() -> None:
    alloc, cache, _ = cache_and_insert(4, seq((0, 40)), num_blocks=16)
    cache.insert(seq((0, 8), (50, 8)), [0, 1, *alloc.allocate(2)])
    cache.match_prefix(seq((0, 40)))
    cache.reset()
    assert (cache.cached_tokens, cache.evictable_blocks, cache.hits, cache.misses) == (0, 0, 0, 0)
    assert alloc.num_free == 16
    assert cache.match_prefix(seq((0, 40))).num_matched_tokens == 0
    cache.check_invariants()


@pytest.mark.parametrize("hash_bits", [0, 1, 64])
def test_hash_collisions_never_produce_wrong_matches(hash_bits: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    alloc = BlockAllocator(400)
    cache = PrefixCache(2, alloc, hash_bits=hash_bits)
    seqs = [rng.integers(0, 4, size=int(rng.integers(2, 12))).astype(np.int32) for _ in range(60)]
    for s in seqs:
        m = cache.match_prefix(s)
        new = alloc.allocate(len(s) // 2 - len(m.block_ids))
        assert cache.insert(s, np.concatenate([m.block_ids, new])) == m.num_matched_tokens
    for s in seqs:  # everything fits, nothing was evicted: every full-block prefix is found exactly
        m = cache.match_prefix(s)
        assert m.num_matched_tokens == len(s) // 2 * 2
    cache.check_invariants()
    assert cache.match_prefix(np.array([9, 9], np.int32)).num_matched_tokens == 0


def test_dropping_the_cache_returns_its_blocks() -> None:
    alloc, cache, _ = cache_and_insert(4, seq((0, 32)), num_blocks=10)
    cache.lock(cache.match_prefix(seq((0, 32))).handle)
    assert alloc.num_free == 2
    del cache
    gc.collect()
    assert alloc.num_free == 10
    alloc.check_invariants()


def test_cache_keeps_its_allocator_alive() -> None:
    cache = PrefixCache(4, BlockAllocator(8))
    gc.collect()
    cache.insert(seq((0, 8)), cache.allocator.allocate(2))
    assert cache.allocator.num_free == 6
    cache.check_invariants()


@pytest.mark.parametrize(("block_size", "hash_bits"), [(0, 64), (-3, 64), (4, 65), (4, -1)])
def test_bad_construction_raises(block_size: int, hash_bits: int) -> None:
    with pytest.raises(CacheError, match="block_size|hash_bits"):
        PrefixCache(block_size, BlockAllocator(4), hash_bits=hash_bits)


def test_concurrent_threads_keep_the_cache_consistent(seed: int) -> None:
    """Four threads run the engine protocol (match, lock, allocate, insert, unlock, evict) on one cache; one
    prompt is long enough that match/insert release the GIL, so C++ calls really overlap."""
    bs = 16
    alloc = BlockAllocator(2048)
    cache = PrefixCache(bs, alloc)
    long_len = _C.GIL_RELEASE_MIN_ITEMS + 64
    prompts = [np.arange(p * 100_000, p * 100_000 + n, dtype=np.int32) for p, n in enumerate([64, 128, long_len])]
    errors: list[BaseException] = []

    def worker(tid: int) -> None:
        rng = np.random.default_rng(seed + tid)
        try:
            for _ in range(80):
                prompt = prompts[int(rng.integers(len(prompts)))]
                s = np.concatenate([prompt, rng.integers(0, 3, size=int(rng.integers(0, 96)), dtype=np.int32)])
                ns = tid % 2
                m = cache.match_prefix(s, namespace=ns)
                cache.lock(m.handle)
                need = len(s) // bs - len(m.block_ids)
                try:
                    new = alloc.allocate(need)
                except CacheError:
                    cache.unlock(m.handle)
                    cache.evict(need)
                    continue
                n_cached = cache.insert(s, np.concatenate([m.block_ids, new]), namespace=ns)
                # another thread may have cached more of s in the meantime: free our duplicates
                dup = n_cached // bs - len(m.block_ids)
                if dup > 0:
                    alloc.free(new[:dup])
                cache.unlock(m.handle)
                if alloc.num_free < 700:
                    cache.evict(400)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    cache.check_invariants()
    assert cache.locked_blocks == 0
    assert alloc.num_free + cache.cached_tokens // bs == 2048


def test_two_caches_can_share_an_allocator_but_never_a_block() -> None:
    alloc = BlockAllocator(8)
    first, second = PrefixCache(4, alloc), PrefixCache(4, alloc)
    tokens = seq((0, 8))
    blocks = alloc.allocate(2)
    first.insert(tokens, blocks)
    with pytest.raises(CacheError, match=r"block \d at position 0 is already held by a prefix cache"):
        second.insert(tokens, blocks)
    second.insert(tokens, alloc.allocate(2))
    first.check_invariants()
    second.check_invariants()
    assert first.evict(8) == 2 and alloc.num_free == 6
    second.check_invariants()


def test_a_caller_reference_keeps_an_evicted_block_allocated() -> None:
    """A fork that increfs matched blocks keeps them after the cache drops its own reference."""
    tokens = seq((0, 8))
    alloc, cache, blocks = cache_and_insert(4, tokens, num_blocks=4)
    m = cache.match_prefix(tokens)
    alloc.incref(m.block_ids)
    assert cache.evict(2) == 2
    assert [alloc.refcount(int(b)) for b in blocks] == [1, 1] and alloc.num_free == 2
    alloc.free(m.block_ids)
    assert alloc.num_free == 4
    cache.check_invariants()


@pytest.mark.parametrize("block_size", [3, 5])
def test_odd_block_sizes(block_size: int) -> None:
    tokens = seq((0, 4 * block_size + 1))
    alloc, cache, blocks = cache_and_insert(block_size, tokens)
    assert cache.match_prefix(tokens[: 3 * block_size + 2]).block_ids.tolist() == blocks[:3].tolist()
    cache.check_invariants()


def test_many_lock_unlock_cycles_keep_lru_order() -> None:
    """Each unlock re-queues the leaf; thousands of cycles exercise the LRU heap's compaction."""
    alloc = BlockAllocator(16)
    cache = PrefixCache(2, alloc)
    old, new = seq((0, 4)), seq((100, 4))
    cache.insert(old, alloc.allocate(2))
    cache.insert(new, alloc.allocate(2))
    h = cache.match_prefix(old).handle  # old becomes the most recently used
    for _ in range(3000):
        cache.lock(h)
        cache.unlock(h)
    cache.check_invariants()
    assert cache.evict(2) == 2
    assert cache.match_prefix(new).num_matched_tokens == 0 and cache.match_prefix(old).num_matched_tokens == 4
    cache.check_invariants()
