"""Pure-Python paged radix prefix cache, built the way SGLang's radix_cache.py works: the baseline that the
`prefix_cache` stage compares rexrag_fast.cache against.

Same structure as SGLang's paged RadixCache: a node's children are a dict keyed by the tuple of the child's
first page (block) of token ids; an edge holds a token list and its block ids; a partial edge match splits
the node at a block boundary; lock_ref counts are propagated to the root; eviction collects the unlocked
leaves into a heap ordered by last access and pops them, pushing a parent once it becomes a leaf. Block ids
come from a Python refcounted allocator with a LIFO free list.

It is written to be as fast as plain Python reasonably allows (a whole-edge list comparison before the
per-block one, slots, a logical clock instead of time.monotonic(), no per-token Python loops), and it keeps
the same semantics as the C++ cache, including trimming a leaf's tail when fewer blocks are needed than
it holds, so both do the same work on the same workload.
"""

from __future__ import annotations

import heapq


class PyBlockAllocator:
    """Refcounted block pool: a list of refcounts and a LIFO free list."""

    __slots__ = ("refcount", "free_list")

    def __init__(self, num_blocks: int) -> None:
        self.refcount = [0] * num_blocks
        self.free_list = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_list):
            raise RuntimeError(f"allocate: {n} blocks requested, {len(self.free_list)} free")
        fl = self.free_list
        out = fl[len(fl) - n:][::-1]
        del fl[len(fl) - n:]
        rc = self.refcount
        for b in out:
            rc[b] = 1
        return out

    def free(self, blocks: list[int]) -> None:
        rc, fl = self.refcount, self.free_list
        for b in blocks:
            if rc[b] <= 0:
                raise RuntimeError(f"free: block {b} is already free")
            rc[b] -= 1
            if rc[b] == 0:
                fl.append(b)


class PyTreeNode:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(self, parent: PyTreeNode | None, key: list[int], value: list[int], last_access: int) -> None:
        self.children: dict[tuple[int, ...], PyTreeNode] = {}
        self.parent = parent
        self.key = key  # token ids [len(value) * block_size]
        self.value = value  # block ids
        self.lock_ref = 0
        self.last_access = last_access

    def __lt__(self, other: PyTreeNode) -> bool:
        return self.last_access < other.last_access


class PyRadixCache:
    """match_prefix / insert / lock / unlock / evict over full blocks of `block_size` tokens."""

    def __init__(self, block_size: int, allocator: PyBlockAllocator) -> None:
        self.bs = block_size
        self.alloc = allocator
        self.clock = 0
        self.reset()

    def reset(self) -> None:
        self.root = PyTreeNode(None, [], [], 0)
        self.root.lock_ref = 1
        self.evictable_blocks = 0
        self.locked_blocks = 0

    def _match_blocks(self, key: list[int], node_key: list[int]) -> int:
        """Number of leading whole blocks equal in key and node_key."""
        bs = self.bs
        n = min(len(key), len(node_key)) // bs * bs
        if key[:n] == node_key[:n]:
            return n // bs
        i = bs  # the first block is known to match (it is the child's dict key)
        while i < n and key[i:i + bs] == node_key[i:i + bs]:
            i += bs
        return i // bs

    def _split(self, child: PyTreeNode, k: int) -> PyTreeNode:
        bs = self.bs
        top = PyTreeNode(child.parent, child.key[:k * bs], child.value[:k], child.last_access)
        top.lock_ref = child.lock_ref
        top.children[tuple(child.key[k * bs:(k + 1) * bs])] = child
        child.parent.children[tuple(top.key[:bs])] = top
        child.parent = top
        child.key = child.key[k * bs:]
        child.value = child.value[k:]
        return top

    def match_prefix(self, tokens: list[int]) -> tuple[list[int], PyTreeNode]:
        """(block ids of the longest cached full-block prefix, deepest matched node)."""
        bs = self.bs
        self.clock += 1
        now = self.clock
        key = tokens[: len(tokens) // bs * bs]
        node = self.root
        node.last_access = now
        blocks: list[int] = []
        while key:
            child = node.children.get(tuple(key[:bs]))
            if child is None:
                break
            k = self._match_blocks(key, child.key)
            split = k < len(child.value)
            if split:
                child = self._split(child, k)  # the unmatched suffix keeps its last access time
            child.last_access = now
            blocks += child.value
            node = child
            if split:
                break
            key = key[k * bs:]
        return blocks, node

    def insert(self, tokens: list[int], block_ids: list[int]) -> int:
        """Caches the full blocks of tokens; returns how many tokens were already cached."""
        bs = self.bs
        self.clock += 1
        now = self.clock
        nb = len(tokens) // bs
        if len(block_ids) != nb:
            raise ValueError(f"insert: {len(block_ids)} block ids for {nb} full blocks")
        key = tokens[: nb * bs]
        node = self.root
        node.last_access = now
        matched = 0
        while key:
            child = node.children.get(tuple(key[:bs]))
            if child is None:
                break
            k = self._match_blocks(key, child.key)
            matched += k
            split = k < len(child.value)
            if split:
                child = self._split(child, k)
            child.last_access = now
            node = child
            key = key[k * bs:]
            if split:
                break
        if key:
            leaf = PyTreeNode(node, key, list(block_ids[matched:]), now)
            node.children[tuple(key[:bs])] = leaf
            self.evictable_blocks += len(leaf.value)
        return matched * bs

    def lock(self, node: PyTreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_blocks -= len(node.value)
                self.locked_blocks += len(node.value)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: PyTreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 1:
                self.evictable_blocks += len(node.value)
                self.locked_blocks -= len(node.value)
            node.lock_ref -= 1
            node = node.parent

    def _collect_leaves(self) -> list[PyTreeNode]:
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.lock_ref == 0:
                leaves.append(node)
        return leaves

    def evict(self, num_blocks: int) -> int:
        """Drops the tree's reference on up to num_blocks blocks, least recently used leaves first."""
        bs = self.bs
        heap = self._collect_leaves()
        heapq.heapify(heap)
        freed = 0
        while freed < num_blocks and heap:
            leaf = heapq.heappop(heap)
            k = len(leaf.value)
            take = min(k, num_blocks - freed)
            self.alloc.free(leaf.value[k - take:][::-1])
            self.evictable_blocks -= take
            freed += take
            if take < k:
                del leaf.value[k - take:]
                del leaf.key[(k - take) * bs:]
                break
            parent = leaf.parent
            del parent.children[tuple(leaf.key[:bs])]
            if not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
        return freed

    @property
    def cached_tokens(self) -> int:
        return (self.evictable_blocks + self.locked_blocks) * self.bs
