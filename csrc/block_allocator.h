// KV block allocator: a fixed pool of block ids with reference counts and a LIFO free list.
//
// A block is free (refcount 0, on the free list exactly once) or referenced (refcount >= 1). References
// are held by callers (allocate / incref) and, at most one per block, by a PrefixCache that took the
// block over in insert(); owner(b) names that cache. Callers may only drop references they hold: free()
// of a block whose only reference is a cache's raises, so a cached block can never be freed behind the
// cache's back.
//
// Locking: every public method takes mu_. PrefixCache takes its own mutex first and then this one (and
// calls the *_locked methods while holding both); the allocator never calls back into a cache, so the
// lock order cache -> allocator cannot deadlock. No method touches Python objects, so callers may release
// the GIL around any of them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace rexrag {

// Every misuse of the allocator or the cache throws this; the bindings map it to rexrag_fast.cache.CacheError.
class CacheError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class BlockAllocator {
 public:
  static constexpr int32_t kNoOwner = -1;

  explicit BlockAllocator(int64_t num_blocks);

  // n free blocks, refcount 1 each, in free-list pop order (fresh allocator: 0, 1, 2, ...).
  std::vector<int32_t> allocate(int64_t n);
  // One more caller reference on each listed block (repeats count repeatedly); blocks must be allocated.
  void incref(const int32_t* ids, size_t n);
  // Drop one caller reference per listed id; a block reaching refcount 0 goes back on the free list.
  void free(const int32_t* ids, size_t n);

  int32_t refcount(int64_t block) const;
  int64_t num_free() const;
  int64_t num_blocks() const { return static_cast<int64_t>(refcount_.size()); }
  // Throws CacheError describing the first broken invariant.
  void check_invariants() const;

  std::mutex& mutex() const { return mu_; }

  // ---- used by PrefixCache while it holds mutex() ----
  void check_id_locked(int64_t block, const char* what) const {
    if (block < 0 || block >= num_blocks()) throw_bad_id(block, what);
  }
  int32_t refcount_locked(int32_t block) const { return refcount_[block]; }
  int32_t owner_locked(int32_t block) const { return owner_[block]; }
  // The caller's reference on `block` becomes cache `owner`'s reference (refcount unchanged).
  void transfer_to_cache_locked(int32_t block, int32_t owner) { owner_[block] = owner; }
  // Drop cache `owner`'s reference on `block`.
  void release_cache_ref_locked(int32_t block, int32_t owner);
  // Throws unless ids [n] are distinct, in range and allocated (refcount >= 1); `what` prefixes the message.
  void check_distinct_allocated_locked(const int32_t* ids, size_t n, const char* what);
  void check_invariants_locked() const;

 private:
  void push_free(int32_t block) { free_.push_back(block); }
  [[noreturn]] void throw_bad_id(int64_t block, const char* what) const;

  std::vector<int32_t> refcount_;
  std::vector<int32_t> owner_;    // cache id holding one of the references, or kNoOwner
  std::vector<int32_t> free_;     // LIFO stack of free block ids
  std::vector<int32_t> scratch_;  // per-block counters for duplicate checks; all zero between calls
  mutable std::mutex mu_;
};

}  // namespace rexrag
