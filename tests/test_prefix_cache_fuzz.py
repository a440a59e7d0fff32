"""Differential fuzzing of the C++ cache against tests/cache_model.py.

Random sequences of allocate / incref / free / match / insert / lock / unlock / evict / reset (valid and
invalid) run on both; every result, every error and every observable counter must agree, and
check_invariants() must pass after each step. Tokens come from a tiny alphabet so that prefixes are
shared, nodes split and (with hash_bits=2) child-map hashes collide.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from cache_model import ModelAllocator, ModelCache, ModelError, ModelNode
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rexrag_fast.cache import BlockAllocator, CacheError, PrefixCache

NAMESPACES = (0, 1)


class Pair:
    """The C++ cache and the model side by side, plus what a well-behaved caller would remember."""

    def __init__(self, num_blocks: int, block_size: int, hash_bits: int) -> None:
        self.bs = block_size
        self.alloc = BlockAllocator(num_blocks)
        self.cache = PrefixCache(block_size, self.alloc, hash_bits=hash_bits)
        self.malloc = ModelAllocator(num_blocks)
        self.model = ModelCache(block_size, self.malloc)
        self.handles: dict[int, ModelNode] = {}  # C++ handle -> model node, kept across splits
        self.locked: list[int] = []  # handles this caller locked (one entry per lock)
        self.held: list[int] = []  # caller references (one entry per reference)
        self.sequences: list[list[int]] = []

    def both(self, cpp: Callable[[], Any], model: Callable[[], Any]) -> tuple[Any, Any] | None:
        """Runs both; they must fail together (then None) or succeed together."""
        try:
            got = cpp()
        except CacheError as e:
            with pytest.raises(ModelError):
                model()
            assert str(e)
            return None
        try:
            want = model()
        except ModelError as e:
            raise AssertionError(f"the model raised {e!r} but the C++ cache returned {got!r}") from e
        return got, want

    def record_handle(self, handle: int, node: ModelNode) -> None:
        known = self.handles.setdefault(handle, node)
        assert known is node, f"handle {handle} now names a different node"

    # ---------------------------------------------------------------- operations
    def allocate(self, n: int) -> None:
        r = self.both(lambda: self.alloc.allocate(n), lambda: self.malloc.allocate(n))
        if r:
            assert r[0].tolist() == r[1]
            self.held += r[1]

    def free(self, ids: list[int]) -> None:
        if self.both(lambda: self.alloc.free(ids), lambda: self.malloc.free(ids)):
            for b in ids:
                self.held.remove(b)

    def incref(self, ids: list[int]) -> None:
        if self.both(lambda: self.alloc.incref(ids), lambda: self.malloc.incref(ids)):
            self.held += ids

    def match(self, tokens: list[int], ns: int) -> tuple[int, list[int]] | None:
        r = self.both(lambda: self.cache.match_prefix(tokens, namespace=ns),
                      lambda: self.model.match_prefix(tokens, ns))
        assert r is not None, "match_prefix never fails on valid tokens"
        got, (blocks, n_tokens, node) = r
        assert got.block_ids.tolist() == blocks
        assert got.num_matched_tokens == n_tokens == len(blocks) * self.bs
        self.record_handle(got.handle, node)
        return got.handle, blocks

    def insert(self, tokens: list[int], ids: list[int], ns: int) -> int | None:
        r = self.both(lambda: self.cache.insert(tokens, ids, namespace=ns), lambda: self.model.insert(tokens, ids, ns))
        if r is None:
            return None
        assert r[0] == r[1]
        n_blocks = len(tokens) // self.bs
        # references at positions the tree took over now belong to the tree
        for b in ids[r[0] // self.bs:n_blocks]:
            self.held.remove(b)
        return r[0]

    def engine_insert(self, tokens: list[int], ns: int, naive: bool) -> None:
        """The engine's protocol: match, allocate the rest, insert, free duplicates (naive: allocate all)."""
        self.sequences.append(tokens)
        handle, matched = self.match(tokens, ns)
        nb = len(tokens) // self.bs
        need = nb if naive else nb - len(matched)
        if need > self.malloc.num_free:
            self.evict(need - self.malloc.num_free)
        if need > self.malloc.num_free:
            return
        start = len(self.held)
        self.allocate(need)
        new = self.held[start:]
        ids = new if naive else matched + new
        n_cached = self.insert(tokens, ids, ns)
        if n_cached is None:  # a stale match after eviction: give the blocks back
            self.free(new)
            return
        dups = [b for b in ids[: n_cached // self.bs] if b in new]
        if dups:
            self.free(dups)

    def lock(self, handle: int) -> None:
        if self.both(lambda: self.cache.lock(handle), lambda: self.model.lock(self.handles[handle])):
            self.locked.append(handle)

    def unlock(self, handle: int) -> None:
        done = self.both(lambda: self.cache.unlock(handle), lambda: self.model.unlock(self.handles[handle]))
        if done and handle in self.locked:
            self.locked.remove(handle)

    def evict(self, n: int) -> None:
        r = self.both(lambda: self.cache.evict(n), lambda: self.model.evict(n))
        if r:
            assert r[0] == r[1]

    def reset(self) -> None:
        self.both(self.cache.reset, self.model.reset)

    def check(self) -> None:
        self.cache.check_invariants()
        assert self.alloc.num_free == self.malloc.num_free
        assert [self.alloc.refcount(b) for b in range(self.alloc.num_blocks)] == self.malloc.refcount
        assert self.cache.evictable_blocks == self.model.evictable_blocks
        assert self.cache.locked_blocks == self.model.locked_blocks
        assert self.cache.cached_tokens == self.model.cached_tokens
        assert (self.cache.hits, self.cache.misses) == (self.model.hits, self.model.misses)


tokens_st = st.lists(st.integers(0, 2), max_size=14)


class CacheMachine(RuleBasedStateMachine):
    block_size = 2
    hash_bits = 2
    num_blocks = 24

    @initialize()
    def setup(self) -> None:
        self.p = Pair(self.num_blocks, self.block_size, self.hash_bits)

    @rule(tokens=tokens_st, ns=st.sampled_from(NAMESPACES), naive=st.booleans())
    def insert_sequence(self, tokens: list[int], ns: int, naive: bool) -> None:
        self.p.engine_insert(tokens, ns, naive)

    @precondition(lambda self: self.p.sequences)
    @rule(data=st.data(), ns=st.sampled_from(NAMESPACES), naive=st.booleans())
    def branch_from_known_sequence(self, data: st.DataObject, ns: int, naive: bool) -> None:
        base = data.draw(st.sampled_from(self.p.sequences))
        cut = data.draw(st.integers(0, len(base)))
        self.p.engine_insert(base[:cut] + data.draw(tokens_st), ns, naive)

    @rule(tokens=tokens_st, ns=st.sampled_from(NAMESPACES), lock=st.booleans())
    def match(self, tokens: list[int], ns: int, lock: bool) -> None:
        handle, _ = self.p.match(tokens, ns)
        if lock:
            self.p.lock(handle)

    @precondition(lambda self: self.p.locked)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        self.p.unlock(data.draw(st.sampled_from(self.p.locked)))

    @precondition(lambda self: self.p.handles)
    @rule(data=st.data(), lock=st.booleans())
    def lock_or_unlock_any_handle(self, data: st.DataObject, lock: bool) -> None:
        """Includes stale handles and unlocks without a lock: both sides must raise alike."""
        handle = data.draw(st.sampled_from(sorted(self.p.handles)))
        (self.p.lock if lock else self.p.unlock)(handle)

    @rule(n=st.integers(-1, 10))
    def evict(self, n: int) -> None:
        self.p.evict(n)

    @rule(n=st.integers(-1, 6))
    def allocate(self, n: int) -> None:
        self.p.allocate(n)

    @rule(ids=st.lists(st.integers(-1, 24), max_size=4))
    def free_arbitrary(self, ids: list[int]) -> None:
        self.p.free(ids)

    @precondition(lambda self: self.p.held)
    @rule(data=st.data())
    def free_held(self, data: st.DataObject) -> None:
        self.p.free([data.draw(st.sampled_from(self.p.held))])

    @rule(ids=st.lists(st.integers(-1, 24), max_size=3))
    def incref_arbitrary(self, ids: list[int]) -> None:
        self.p.incref(ids)

    @rule(tokens=tokens_st, ids=st.lists(st.integers(-1, 24), max_size=8), ns=st.sampled_from(NAMESPACES))
    def insert_arbitrary_ids(self, tokens: list[int], ids: list[int], ns: int) -> None:
        self.p.insert(tokens, ids, ns)

    @rule()
    def reset(self) -> None:
        self.p.reset()

    @invariant()
    def agrees_with_model(self) -> None:
        if hasattr(self, "p"):
            self.p.check()


class CacheMachineBlock4FullHash(CacheMachine):
    block_size = 4
    hash_bits = 64
    num_blocks = 16


_settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = _settings
TestCacheMachineBlock4FullHash = CacheMachineBlock4FullHash.TestCase
TestCacheMachineBlock4FullHash.settings = _settings


def random_run(num_ops: int, seed: int, block_size: int, hash_bits: int, num_blocks: int, check_every: int) -> Pair:
    """num_ops random operations with the same mix as the state machine."""
    rng = random.Random(seed)
    p = Pair(num_blocks, block_size, hash_bits)

    def toks() -> list[int]:
        if p.sequences and rng.random() < 0.6:
            base = rng.choice(p.sequences)
            return base[: rng.randint(0, len(base))] + [rng.randint(0, 3) for _ in range(rng.randint(0, 12))]
        return [rng.randint(0, 3) for _ in range(rng.randint(0, 40))]

    for i in range(num_ops):
        r = rng.random()
        ns = rng.choice(NAMESPACES)
        if r < 0.30:
            p.engine_insert(toks(), ns, naive=rng.random() < 0.3)
            if len(p.sequences) > 200:
                p.sequences = p.sequences[-100:]
        elif r < 0.50:
            handle, _ = p.match(toks(), ns)
            if rng.random() < 0.5:
                p.lock(handle)
        elif r < 0.62 and p.locked:
            p.unlock(rng.choice(p.locked))
        elif r < 0.66 and p.handles:
            handle = rng.choice(list(p.handles))
            (p.lock if rng.random() < 0.5 else p.unlock)(handle)
        elif r < 0.76:
            p.evict(rng.randint(-1, 12))
        elif r < 0.80:
            p.allocate(rng.randint(0, 4))
        elif r < 0.86 and p.held:
            p.free([rng.choice(p.held)])
        elif r < 0.88:
            p.free([rng.randint(-1, num_blocks) for _ in range(rng.randint(1, 3))])
        elif r < 0.90:
            p.incref([rng.randint(-1, num_blocks)])
        elif r < 0.93:
            t = toks()
            p.insert(t, [rng.randint(-1, num_blocks) for _ in range(len(t) // block_size + rng.choice((-1, 0, 0)))],
                     ns)
        elif r < 0.935:
            for h in list(p.locked):
                p.unlock(h)
            p.reset()
            p.handles.clear()
        if len(p.handles) > 500:
            p.handles = {h: n for h, n in p.handles.items() if n.alive}
        if i % check_every == 0:
            p.check()
    p.check()
    return p


@pytest.mark.parametrize(("block_size", "hash_bits"), [(2, 3), (4, 64)])
def test_random_run_short(block_size: int, hash_bits: int, seed: int) -> None:
    p = random_run(3000, seed, block_size, hash_bits, num_blocks=48, check_every=1)
    assert p.cache.hits > 0 and p.cache.misses > 0


@pytest.mark.slow
@pytest.mark.parametrize(("block_size", "hash_bits"), [(2, 3), (4, 64)])
def test_random_run_100k_operations(block_size: int, hash_bits: int, seed: int) -> None:
    p = random_run(100_000, seed, block_size, hash_bits, num_blocks=96, check_every=7)
    assert p.cache.hits > 0 and p.cache.misses > 0
