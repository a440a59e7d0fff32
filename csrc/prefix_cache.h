// Radix prefix cache over paged KV blocks (the behaviour of SGLang's RadixCache, block-granular like vLLM).
//
// Tree: one root per namespace (e.g. a weights version; namespaces never share nodes). Every other node
// holds an edge of k >= 1 whole blocks: tokens [k * block_size] and the KV block ids [k] that store them.
// A child is found from its parent by the hash of its first block's tokens, then compared exactly, so a
// hash collision can cost a chain step but never a wrong match. Partial blocks are never stored.
//
// Handles: a node is named by handle = (generation << 32) | index; the generation changes whenever a
// node slot is freed, so a handle to an evicted or reset node is rejected, never silently reused. When a
// node is split, the original node keeps the deeper part, so a handle still ends at the same depth.
//
// Locks (reference counts on nodes, as SGLang's lock_ref): lock(h) pins h and increments the lock count of
// h and all its ancestors, unlock(h) undoes one pin of h; unlocking a handle with no pin of its own raises
// (even if descendants keep its lock count above 0). Invariant: lock = pins + sum of children's lock. Nodes with lock > 0 are never evicted. evict() removes blocks from the
// least recently used unlocked leaves (LRU by a logical clock that every match/insert advances, stamped on
// each node of the path it walks), taking blocks from a leaf's tail when fewer are needed than it holds.
//
// References: the tree holds exactly one allocator reference on each block it stores (it took the caller's
// reference over in insert()); evict/reset drop it. match_prefix() gives the caller no reference: the
// caller locks the returned handle while it uses the blocks (or increfs them to keep them past unlock).
//
// Thread safety: one std::mutex per cache (mu_) serialises every method; methods that change blocks also
// take the allocator's mutex, always after mu_. Nothing here touches Python objects, so the bindings
// release the GIL around long calls (long token lists, evict, reset); they never take the GIL while holding
// mu_, so a thread that holds the GIL and waits for mu_ cannot deadlock with the thread inside.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "block_allocator.h"

namespace rexrag {

struct LruEntry {
  uint64_t tick;
  int32_t node;
  uint32_t seq;
  // std heap functions build a max-heap; "less" here means later, so the top is the least recently used.
  bool operator<(const LruEntry& o) const { return tick != o.tick ? tick > o.tick : node > o.node; }
};

class PrefixCache {
 public:
  // hash_bits < 64 truncates block hashes (tests use it to force collisions; lookups stay exact).
  PrefixCache(int64_t block_size, std::shared_ptr<BlockAllocator> allocator, int hash_bits = 64);
  ~PrefixCache();
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  // Blocks of the longest cached full-block prefix of tokens [n] in `ns`, written to *blocks_out;
  // returns the handle of the deepest matched node (the namespace root when nothing matched).
  int64_t match_prefix(const int32_t* tokens, size_t n, int64_t ns, std::vector<int32_t>* blocks_out);
  // Caches the n / block_size full blocks of tokens [n] with block ids [num_ids] (num_ids must equal
  // n / block_size); returns the number of tokens that were already cached (a multiple of block_size).
  int64_t insert(const int32_t* tokens, size_t n, const int32_t* block_ids, size_t num_ids, int64_t ns);
  void lock(int64_t handle);
  void unlock(int64_t handle);
  // Drops the tree's reference on up to num_blocks blocks (LRU unlocked leaves first); returns how many.
  int64_t evict(int64_t num_blocks);
  // Empties the cache (every block's tree reference dropped, LRU order) and zeroes hits/misses.
  void reset();
  void check_invariants() const;

  int64_t block_size() const { return block_size_; }
  int64_t evictable_blocks() const;
  int64_t locked_blocks() const;
  int64_t cached_tokens() const;
  int64_t hits() const;
  int64_t misses() const;
  const std::shared_ptr<BlockAllocator>& allocator() const { return alloc_; }

 private:
  struct Node {
    int32_t parent = -1;
    uint32_t generation = 1;
    int32_t lock = 0;  // pins of this node + locks of its children (SGLang's lock_ref)
    int32_t pins = 0;  // lock() calls on this very node's handle not yet matched by unlock()
    int32_t num_children = 0;
    int32_t chain_next = -1;  // next node whose child-map key equals this one's (hash chain)
    bool live = false;
    bool is_root = false;
    bool in_lru = false;      // an evictable leaf, with exactly one valid entry in lru_heap_
    uint32_t lru_seq = 0;     // sequence number of that entry; never reset, so older entries go stale
    int64_t ns = 0;
    uint64_t first_hash = 0;  // (truncated) hash of the first block's tokens
    uint64_t tick = 0;        // logical time of last use
    std::vector<int32_t> tokens;  // [num_blocks * block_size]
    std::vector<int32_t> blocks;  // [num_blocks]
  };

  uint64_t hash_block(const int32_t* block_tokens) const;
  static uint64_t child_key(int32_t parent, uint64_t first_hash);
  int32_t find_child(int32_t parent, uint64_t h, const int32_t* block_tokens) const;
  void link_child(int32_t node);
  void unlink_child(int32_t node);
  int32_t new_node();
  void free_node(int32_t node);
  int32_t root_for(int64_t ns);
  int32_t resolve(int64_t handle, const char* what) const;
  int64_t handle_of(int32_t node) const;
  // Number of leading whole blocks (at most max_blocks) equal in token runs a and b.
  size_t matching_blocks(const int32_t* a, const int32_t* b, size_t max_blocks) const;
  // Walks the full-block prefix of tokens; returns {deepest fully matched node, blocks matched} and, if the
  // walk stopped inside a child's edge, that child and the number of its blocks matched in *partial.
  std::pair<int32_t, size_t> walk(int32_t root, const int32_t* tokens, size_t nb,
                                  std::pair<int32_t, size_t>* partial) const;
  // Splits `node` after `k` blocks; the new parent (returned) takes the first k blocks.
  int32_t split(int32_t node, size_t k);
  void touch_path(int32_t node);
  void lru_remove(int32_t node);
  void lru_add_if_evictable(int32_t node);
  void lru_push(int32_t node);
  bool lru_entry_valid(const LruEntry& e) const;
  // Drops stale entries from the top of lru_heap_; rebuilds the heap when stale entries dominate it.
  void lru_settle();
  bool evictable_leaf(const Node& n) const { return !n.is_root && n.lock == 0 && n.num_children == 0; }
  int64_t evict_locked(int64_t num_blocks);
  void check_invariants_locked() const;

  const int64_t block_size_;
  const std::shared_ptr<BlockAllocator> alloc_;
  const uint64_t hash_mask_;
  const int32_t id_;  // owner id recorded in the allocator for this cache's references

  std::vector<Node> nodes_;
  std::vector<int32_t> free_nodes_;
  std::unordered_map<uint64_t, int32_t> children_;  // child_key -> head of the chain of nodes with that key
  std::unordered_map<int64_t, int32_t> roots_;      // namespace -> root node
  // Evictable leaves as a lazy min-heap on (tick, node): removing a leaf or re-stamping its tick only
  // invalidates its entry (by lru_seq), so lock/unlock/touch never search the heap or allocate.
  std::vector<LruEntry> lru_heap_;
  size_t lru_live_ = 0;  // nodes with in_lru
  uint64_t clock_ = 0;
  int64_t evictable_blocks_ = 0;
  int64_t locked_blocks_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
  mutable std::mutex mu_;
};

}  // namespace rexrag
