#include "block_allocator.h"

#include <limits>

namespace rexrag {

namespace {

std::string str(int64_t v) { return std::to_string(v); }

}  // namespace

BlockAllocator::BlockAllocator(int64_t num_blocks) {
  if (num_blocks < 0 || num_blocks > std::numeric_limits<int32_t>::max()) {
    throw CacheError("BlockAllocator: num_blocks=" + str(num_blocks) + " must be in [0, 2147483647]");
  }
  refcount_.assign(static_cast<size_t>(num_blocks), 0);
  owner_.assign(static_cast<size_t>(num_blocks), kNoOwner);
  scratch_.assign(static_cast<size_t>(num_blocks), 0);
  free_.reserve(static_cast<size_t>(num_blocks));
  // Stack order so that a fresh allocator hands out 0, 1, 2, ...
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

void BlockAllocator::throw_bad_id(int64_t block, const char* what) const {
  throw CacheError(std::string(what) + ": block id " + str(block) + " out of range [0, " + str(num_blocks()) + ")");
}

std::vector<int32_t> BlockAllocator::allocate(int64_t n) {
  std::lock_guard<std::mutex> g(mu_);
  if (n < 0) throw CacheError("allocate: n=" + str(n) + " must be >= 0");
  if (n > static_cast<int64_t>(free_.size())) {
    throw CacheError("allocate: asked for " + str(n) + " blocks but only " + str(free_.size()) + " of " +
                     str(num_blocks()) + " are free");
  }
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (auto& b : out) {
    b = free_.back();
    free_.pop_back();
    refcount_[b] = 1;
  }
  return out;
}

void BlockAllocator::incref(const int32_t* ids, size_t n) {
  std::lock_guard<std::mutex> g(mu_);
  for (size_t i = 0; i < n; ++i) {
    check_id_locked(ids[i], "incref");
    if (refcount_[ids[i]] == 0) {
      throw CacheError("incref: block " + str(ids[i]) + " is free (refcount 0); only allocated blocks can be shared");
    }
  }
  for (size_t i = 0; i < n; ++i) ++refcount_[ids[i]];
}

void BlockAllocator::free(const int32_t* ids, size_t n) {
  std::lock_guard<std::mutex> g(mu_);
  for (size_t i = 0; i < n; ++i) check_id_locked(ids[i], "free");
  // Validate everything before changing anything: each id may be dropped at most as many times as callers
  // hold references on it (refcount minus the cache's reference, if any).
  for (size_t i = 0; i < n; ++i) {
    const int32_t b = ids[i];
    const int32_t caller_refs = refcount_[b] - (owner_[b] != kNoOwner ? 1 : 0);
    if (++scratch_[b] > caller_refs) {
      const int32_t times = scratch_[b];
      for (size_t j = 0; j <= i; ++j) scratch_[ids[j]] = 0;
      std::string why;
      if (refcount_[b] == 0) {
        why = "it is already free (double free)";
      } else if (caller_refs == 0) {
        why = "its only reference belongs to the prefix cache (drop it with evict(), not free())";
      } else {
        why = "it is freed " + str(times) + " times but callers hold only " + str(caller_refs) + " reference(s)";
      }
      throw CacheError("free: cannot free block " + str(b) + ": " + why);
    }
  }
  for (size_t i = 0; i < n; ++i) {
    const int32_t b = ids[i];
    scratch_[b] = 0;
    if (--refcount_[b] == 0) push_free(b);
  }
}

int32_t BlockAllocator::refcount(int64_t block) const {
  std::lock_guard<std::mutex> g(mu_);
  check_id_locked(block, "refcount");
  return refcount_[block];
}

int64_t BlockAllocator::num_free() const {
  std::lock_guard<std::mutex> g(mu_);
  return static_cast<int64_t>(free_.size());
}

void BlockAllocator::release_cache_ref_locked(int32_t block, int32_t owner) {
  if (owner_[block] != owner || refcount_[block] < 1) {
    throw CacheError("internal: cache " + str(owner) + " releases block " + str(block) + " that it does not own");
  }
  owner_[block] = kNoOwner;
  if (--refcount_[block] == 0) push_free(block);
}

void BlockAllocator::check_distinct_allocated_locked(const int32_t* ids, size_t n, const char* what) {
  size_t i = 0;
  std::string error;
  for (; i < n; ++i) {
    const int32_t b = ids[i];
    if (b < 0 || b >= num_blocks()) {
      error = std::string(what) + ": block id " + str(b) + " out of range [0, " + str(num_blocks()) + ")";
      break;
    }
    if (refcount_[b] == 0) {
      error = std::string(what) + ": block " + str(b) + " at position " + str(static_cast<int64_t>(i)) +
              " is free (refcount 0); expected an allocated block";
      break;
    }
    if (++scratch_[b] > 1) {
      error = std::string(what) + ": block " + str(b) + " appears more than once in block_ids; expected distinct ids";
      ++i;
      break;
    }
  }
  for (size_t j = 0; j < i; ++j) scratch_[ids[j]] = 0;
  if (!error.empty()) throw CacheError(error);
}

void BlockAllocator::check_invariants() const {
  std::lock_guard<std::mutex> g(mu_);
  check_invariants_locked();
}

void BlockAllocator::check_invariants_locked() const {
  const size_t nb = refcount_.size();
  std::vector<char> on_free_list(nb, 0);
  for (int32_t b : free_) {
    if (b < 0 || static_cast<size_t>(b) >= nb) throw CacheError("invariant: free list holds bad id " + str(b));
    if (on_free_list[b]) throw CacheError("invariant: block " + str(b) + " is on the free list twice");
    on_free_list[b] = 1;
  }
  for (size_t b = 0; b < nb; ++b) {
    if (refcount_[b] < 0) {
      throw CacheError("invariant: block " + str(b) + " has negative refcount " + str(refcount_[b]));
    }
    if ((refcount_[b] == 0) != (on_free_list[b] != 0)) {
      throw CacheError("invariant: block " + str(b) + " has refcount " + str(refcount_[b]) +
                       (on_free_list[b] ? " but is on the free list" : " but is not on the free list"));
    }
    if (owner_[b] != kNoOwner && refcount_[b] < 1) {
      throw CacheError("invariant: block " + str(b) + " is owned by cache " + str(owner_[b]) + " but has refcount " +
                       str(refcount_[b]));
    }
    if (scratch_[b] != 0) throw CacheError("invariant: scratch counter of block " + str(b) + " not reset");
  }
}

}  // namespace rexrag
