"""Blocks of each sequence: prefix reuse on admission, growth while decoding, hand-back on finish.

Built on rexrag_fast.cache: the BlockAllocator owns the block ids of the KV pool and the PrefixCache (radix
tree, one namespace per weights version) owns the blocks of cached prefixes. A sequence's block table starts
with the blocks matched in the tree (no reference of its own; the matched node is locked while it runs) and
continues with blocks it allocated. On release its computed full blocks are inserted into the tree, which
takes over the references it did not already have.
"""

from __future__ import annotations

from rexrag_fast.cache import BlockAllocator, PrefixCache
from rexrag_fast.engine.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    """ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Allocates, shares and releases the KV blocks of sequences."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.cache = PrefixCache(block_size, self.allocator)
        self.enable_prefix_caching = enable_prefix_caching
        self.namespace = 0

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def _reserve(self, n: int) -> bool:
        """Make n blocks free, evicting unlocked cached prefixes (least recently used first) if needed."""
        short = n - self.allocator.num_free
        if short > 0 and self.cache.evictable_blocks > 0:
            self.cache.evict(short)
        return self.allocator.num_free >= n

    def cached_prefix_blocks(self, seq: Sequence) -> int:
        """Full blocks of seq's prompt (all but its last token) the prefix cache holds now."""
        if not self.enable_prefix_caching or len(seq) <= 1:
            return 0
        return len(self.cache.match_prefix(seq.token_ids[:-1], self.namespace).block_ids)

    def admit(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing the longest cached prefix.

        The match covers at most len(seq) - 1 tokens, so at least the last token is computed and yields logits.
        Returns False (and changes nothing) when the blocks cannot be found even after eviction.
        """
        assert not seq.block_table
        shared: list[int] = []
        handle = None
        if self.enable_prefix_caching and len(seq) > 1:
            m = self.cache.match_prefix(seq.token_ids[:-1], self.namespace)
            shared = m.block_ids.tolist()
            if shared:
                handle = m.handle
                self.cache.lock(handle)  # before any evict, which could otherwise drop the match
        need = blocks_for(len(seq), self.block_size) - len(shared)
        if not self._reserve(need):
            if handle is not None:
                self.cache.unlock(handle)
            return False
        seq.block_table = shared + self.allocator.allocate(need).tolist()
        seq.num_shared_blocks = len(shared)
        seq.cache_handle = handle
        seq.num_computed = len(shared) * self.block_size
        return True

    def ensure_slot(self, seq: Sequence) -> bool:
        """Make sure the block of position len(seq) - 1 (the token decoded next) exists."""
        if len(seq.block_table) * self.block_size >= len(seq):
            return True
        if not self._reserve(1):
            return False
        seq.block_table.append(int(self.allocator.allocate(1)[0]))
        return True

    def publish(self, seq: Sequence) -> None:
        """Put a running sequence's computed full blocks into the prefix cache now, not only on release, so
        that sequences admitted after it reuse them while it still runs (and read them as one shared block).

        The sequence keeps using them: the tree takes over its references and it locks the new, deeper node.
        Done only when the tree held no more of this prefix than the sequence matched on admission, so the
        table stays "tree's blocks, then its own" (release relies on that); otherwise nothing changes.
        """
        if not self.enable_prefix_caching:
            return
        n_full = seq.num_computed // self.block_size
        if n_full <= seq.num_shared_blocks:
            return
        tokens = seq.token_ids[: n_full * self.block_size]
        m = self.cache.match_prefix(tokens, self.namespace)
        if len(m.block_ids) > seq.num_shared_blocks:
            return  # another sequence cached more of this prefix first: keep ours private until release
        n_cached = self.cache.insert(tokens, seq.block_table[:n_full], self.namespace)
        assert n_cached == seq.num_shared_blocks * self.block_size
        m = self.cache.match_prefix(tokens, self.namespace)
        self.cache.lock(m.handle)
        if seq.cache_handle is not None:
            self.cache.unlock(seq.cache_handle)
        seq.cache_handle = m.handle
        seq.num_shared_blocks = n_full

    def release(self, seq: Sequence) -> None:
        """Return a finished or preempted sequence's blocks: computed full blocks go to the prefix cache.

        insert's contract: positions the tree already had keep the tree's blocks (ours are freed unless they
        are the very same ids, i.e. our matched ones); the tree takes over our reference on the others.
        """
        table = seq.block_table
        own_from = seq.num_shared_blocks
        to_free: list[int] = []
        if self.enable_prefix_caching:
            n_full = seq.num_computed // self.block_size
            n_cached = self.cache.insert(seq.token_ids[: n_full * self.block_size], table[:n_full], self.namespace)
            n_tree = n_cached // self.block_size
            to_free += table[own_from:n_tree]  # duplicates of blocks the tree already had
            to_free += table[max(n_full, own_from):]  # partial or not-yet-computed blocks
        else:
            to_free += table[own_from:]
        if to_free:
            self.allocator.free(to_free)
        if seq.cache_handle is not None:
            self.cache.unlock(seq.cache_handle)
        seq.block_table = []
        seq.num_shared_blocks = 0
        seq.cache_handle = None
        seq.num_computed = 0

    def new_namespace(self) -> None:
        """Start a fresh cache namespace (new weights) and drop every evictable block of the old ones."""
        self.namespace += 1
        if self.cache.evictable_blocks:
            self.cache.evict(self.cache.evictable_blocks)
