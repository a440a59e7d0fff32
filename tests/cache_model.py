"""A pure-Python model of rexrag_fast.cache (BlockAllocator + PrefixCache) for differential tests.

It is written for obviousness, not speed: children in dicts keyed by the first block's token tuple, eviction
by scanning every node for the least recently used unlocked leaf. It mirrors the documented behaviour
exactly, including the order in which blocks come back from allocate() (a LIFO free list, fresh pool
0, 1, 2, ...), so tests can compare every result of the C++ cache with it for equality.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


class ModelError(Exception):
    """The model's counterpart of CacheError: the same call must fail in both."""


class ModelAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ModelError(f"num_blocks={num_blocks}")
        self.refcount = [0] * num_blocks
        self.cached = [False] * num_blocks  # one of the references belongs to the cache
        self.free_list = list(range(num_blocks - 1, -1, -1))

    @property
    def num_blocks(self) -> int:
        return len(self.refcount)

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    def _check_ids(self, ids: Sequence[int]) -> None:
        for b in ids:
            if not 0 <= b < self.num_blocks:
                raise ModelError(f"block id {b} out of range")

    def allocate(self, n: int) -> list[int]:
        if n < 0 or n > len(self.free_list):
            raise ModelError(f"allocate({n}) with {len(self.free_list)} free")
        out = [self.free_list.pop() for _ in range(n)]
        for b in out:
            self.refcount[b] = 1
        return out

    def incref(self, ids: Sequence[int]) -> None:
        self._check_ids(ids)
        if any(self.refcount[b] == 0 for b in ids):
            raise ModelError("incref of a free block")
        for b in ids:
            self.refcount[b] += 1

    def free(self, ids: Sequence[int]) -> None:
        self._check_ids(ids)
        for b, times in Counter(ids).items():
            if times > self.refcount[b] - int(self.cached[b]):
                raise ModelError(f"free of block {b} x{times}: caller refs {self.refcount[b] - self.cached[b]}")
        for b in ids:
            self._drop(b)

    def release_cached(self, b: int) -> None:
        assert self.cached[b] and self.refcount[b] >= 1
        self.cached[b] = False
        self._drop(b)

    def _drop(self, b: int) -> None:
        self.refcount[b] -= 1
        if self.refcount[b] == 0:
            self.free_list.append(b)


class ModelNode:
    def __init__(self, parent: ModelNode | None, tokens: tuple[int, ...], blocks: list[int], tick: int) -> None:
        self.parent = parent
        self.tokens = tokens
        self.blocks = blocks
        self.children: dict[tuple[int, ...], ModelNode] = {}
        self.lock = 0  # pins + children's locks
        self.pins = 0  # lock() calls on this node's own handle not yet undone
        self.tick = tick
        self.alive = True

    @property
    def is_root(self) -> bool:
        return self.parent is None


class ModelCache:
    def __init__(self, block_size: int, allocator: ModelAllocator) -> None:
        if block_size < 1:
            raise ModelError(f"block_size={block_size}")
        self.bs = block_size
        self.alloc = allocator
        self.roots: dict[int, ModelNode] = {}
        self.clock = 0
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ helpers
    def _root(self, ns: int) -> ModelNode:
        if ns not in self.roots:
            self.roots[ns] = ModelNode(None, (), [], self.clock)
        return self.roots[ns]

    def _block(self, tokens: Sequence[int], i: int) -> tuple[int, ...]:
        return tuple(tokens[i * self.bs:(i + 1) * self.bs])

    def _walk(self, root: ModelNode, tokens: Sequence[int], nb: int):
        cur, pos = root, 0
        while pos < nb:
            child = cur.children.get(self._block(tokens, pos))
            if child is None:
                break
            k, j = len(child.blocks), 1
            while j < k and pos + j < nb and self._block(child.tokens, j) == self._block(tokens, pos + j):
                j += 1
            if j < k:
                return cur, pos + j, (child, j)
            cur, pos = child, pos + k
        return cur, pos, None

    def _split(self, node: ModelNode, k: int) -> ModelNode:
        parent = node.parent
        top = ModelNode(parent, node.tokens[:k * self.bs], node.blocks[:k], node.tick)
        top.lock = node.lock
        parent.children[top.tokens[:self.bs]] = top
        node.tokens = node.tokens[k * self.bs:]
        node.blocks = node.blocks[k:]
        node.parent = top
        top.children[node.tokens[:self.bs]] = node
        return top

    def _touch(self, node: ModelNode) -> None:
        self.clock += 1
        x: ModelNode | None = node
        while x is not None:
            x.tick = self.clock
            x = x.parent

    def _path_blocks(self, node: ModelNode) -> list[int]:
        parts = []
        x = node
        while not x.is_root:
            parts.append(x.blocks)
            x = x.parent
        return [b for part in reversed(parts) for b in part]

    def nodes(self) -> list[ModelNode]:
        out, stack = [], list(self.roots.values())
        while stack:
            x = stack.pop()
            out.append(x)
            stack.extend(x.children.values())
        return out

    # ------------------------------------------------------------------ API
    def match_prefix(self, tokens: Sequence[int], ns: int = 0) -> tuple[list[int], int, ModelNode]:
        nb = len(tokens) // self.bs
        cur, pos, partial = self._walk(self._root(ns), tokens, nb)
        if partial is not None:
            cur = self._split(*partial)
        self._touch(cur)
        if pos > 0:
            self.hits += 1
        else:
            self.misses += 1
        return self._path_blocks(cur), pos * self.bs, cur

    def insert(self, tokens: Sequence[int], ids: Sequence[int], ns: int = 0) -> int:
        nb = len(tokens) // self.bs
        if len(ids) != nb:
            raise ModelError(f"{len(ids)} ids for {nb} blocks")
        self.alloc._check_ids(ids)
        if any(self.alloc.refcount[b] == 0 for b in ids):
            raise ModelError("insert of a free block")
        if len(set(ids)) != len(ids):
            raise ModelError("repeated block id")
        cur, pos, partial = self._walk(self._root(ns), tokens, nb)
        if any(self.alloc.cached[b] for b in ids[pos:]):
            raise ModelError("new position holds a cached block")
        if partial is not None:
            cur = self._split(*partial)
        if pos < nb:
            leaf = ModelNode(cur, tuple(tokens[pos * self.bs:nb * self.bs]), list(ids[pos:nb]), self.clock)
            cur.children[leaf.tokens[:self.bs]] = leaf
            for b in leaf.blocks:
                self.alloc.cached[b] = True
            cur = leaf
        self._touch(cur)
        return pos * self.bs

    def lock(self, node: ModelNode) -> None:
        if not node.alive:
            raise ModelError("stale handle")
        if not node.is_root:
            node.pins += 1
        x = node
        while not x.is_root:
            x.lock += 1
            x = x.parent

    def unlock(self, node: ModelNode) -> None:
        if not node.alive:
            raise ModelError("stale handle")
        if not node.is_root and node.pins < 1:
            raise ModelError("unlock without lock")
        if not node.is_root:
            node.pins -= 1
        x = node
        while not x.is_root:
            x.lock -= 1
            x = x.parent

    def evict(self, num_blocks: int) -> int:
        if num_blocks < 0:
            raise ModelError(f"evict({num_blocks})")
        freed = 0
        while freed < num_blocks:
            leaves = [x for x in self.nodes() if not x.is_root and x.lock == 0 and not x.children]
            if not leaves:
                break
            leaf = min(leaves, key=lambda x: x.tick)
            assert sum(x.tick == leaf.tick for x in leaves) == 1, "two evictable leaves share a tick"
            k = len(leaf.blocks)
            take = min(k, num_blocks - freed)
            for b in reversed(leaf.blocks[k - take:]):
                self.alloc.release_cached(b)
            freed += take
            if take < k:
                leaf.blocks = leaf.blocks[:k - take]
                leaf.tokens = leaf.tokens[:(k - take) * self.bs]
            else:
                del leaf.parent.children[leaf.tokens[:self.bs]]
                leaf.alive = False
        return freed

    def reset(self) -> None:
        if self.locked_blocks > 0:
            raise ModelError("reset while locked")
        self.evict(self.evictable_blocks)
        for root in self.roots.values():
            root.alive = False
        self.roots = {}
        self.hits = self.misses = 0

    @property
    def evictable_blocks(self) -> int:
        return sum(len(x.blocks) for x in self.nodes() if x.lock == 0)

    @property
    def locked_blocks(self) -> int:
        return sum(len(x.blocks) for x in self.nodes() if x.lock > 0)

    @property
    def cached_tokens(self) -> int:
        return sum(len(x.tokens) for x in self.nodes())
