"""Paged-KV block allocator and radix prefix cache (C++ in csrc/, compiled into rexrag_fast._C).

    alloc = BlockAllocator(num_blocks)
    alloc.allocate(n) -> np.ndarray[int32] [n]   # n free blocks, refcount 1 each
    alloc.incref(blocks); alloc.free(blocks)      # share / drop one reference per listed id
    alloc.refcount(block), alloc.num_free, alloc.num_blocks

    cache = PrefixCache(block_size, alloc)
    m = cache.match_prefix(tokens, namespace=0)   # MatchResult(block_ids [n] int32, num_matched_tokens, handle)
    cache.lock(m.handle) ... cache.unlock(m.handle)
    n_cached = cache.insert(tokens, block_ids, namespace=0)
    cache.evict(num_blocks) -> blocks removed from the cache
    cache.evictable_blocks, cache.locked_blocks, cache.cached_tokens, cache.hits, cache.misses
    cache.reset(); cache.check_invariants()

Semantics (the behaviour of SGLang's RadixCache, storing only full blocks like vLLM):
- Tokens and block ids: a Python list/tuple of ints or a 1-D integer numpy array (int32 is read in place).
- match_prefix returns the blocks of the longest cached prefix made of whole blocks: with n matched blocks,
  num_matched_tokens = n * block_size. The caller gets no reference on them; it locks `handle` while a
  sequence uses them (locked nodes and their ancestors are never evicted) and unlocks it when done. Lock
  right after matching: an unlocked match may be evicted by the next evict(). MatchResult is a struct
  sequence: `ids, n_tokens, handle = m` unpacks it. unlock(h) undoes one lock(h) of that same handle.
- insert(tokens, block_ids): block_ids [len(tokens) // block_size] cover the full blocks (a trailing partial
  block is ignored), all distinct and allocated. Returns n_cached, the tokens already in the tree. For the
  first n_cached // block_size positions the tree keeps its own blocks and the caller frees its own ids
  there unless they are the tree's (e.g. they came from match_prefix). For the other positions the
  caller's reference is transferred to the tree: the caller must not free those blocks afterwards.
- evict(k) drops the tree's reference on k blocks (fewer if fewer are evictable), least recently used
  unlocked leaves first and a leaf's deepest blocks first; a block returns to the free list once no caller
  holds it either. "Recently used" is a logical clock advanced by each match_prefix/insert.
- hits / misses count match_prefix calls that matched at least one block / none.
- Namespaces (an int, e.g. a weights version) are separate trees: nothing matches across them.
- Children are found by a 64-bit hash of their first block and then compared token by token, so a hash
  collision never produces a wrong match; PrefixCache(..., hash_bits=k) truncates the hash (tests use it to
  force collisions).
- Every misuse (unknown or stale handle, unlock without lock, bad or free block ids, double free, freeing a
  block only the cache holds, wrong block count, negative counts, reset while locked) raises CacheError,
  a subclass of both ValueError and RuntimeError, and leaves the state unchanged.
- Thread safety: each cache and each allocator has its own mutex (cache first, then allocator); the GIL is
  released around long calls (>= rexrag_fast._C.GIL_RELEASE_MIN_ITEMS tokens or ids, evict, reset), so
  several Python threads may share one cache. Short calls keep the GIL: they take about a microsecond.
"""

from __future__ import annotations

from rexrag_fast._C import BlockAllocator, CacheError, MatchResult, PrefixCache

__all__ = ["BlockAllocator", "CacheError", "MatchResult", "PrefixCache"]
