#include "prefix_cache.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>

namespace rexrag {

namespace {

std::string str(int64_t v) { return std::to_string(v); }

std::atomic<int32_t> g_next_cache_id{0};

// splitmix64 finaliser: a cheap full-avalanche mix of 64 bits.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

}  // namespace

PrefixCache::PrefixCache(int64_t block_size, std::shared_ptr<BlockAllocator> allocator, int hash_bits)
    : block_size_(block_size),
      alloc_(std::move(allocator)),
      hash_mask_(hash_bits >= 64 ? ~0ULL : ((1ULL << (hash_bits > 0 ? hash_bits : 0)) - 1)),
      id_(g_next_cache_id.fetch_add(1)) {
  if (block_size < 1 || block_size > (1 << 20)) {
    throw CacheError("PrefixCache: block_size=" + str(block_size) + " must be in [1, 1048576]");
  }
  if (!alloc_) throw CacheError("PrefixCache: allocator must be a BlockAllocator, got None");
  if (hash_bits < 0 || hash_bits > 64) {
    throw CacheError("PrefixCache: hash_bits=" + str(hash_bits) + " must be in [0, 64]");
  }
}

PrefixCache::~PrefixCache() {
  // Give every block back even if sequences still hold locks: the cache is gone, so its handles are too.
  std::lock_guard<std::mutex> g(mu_);
  std::lock_guard<std::mutex> ga(alloc_->mutex());
  for (const Node& n : nodes_) {
    if (!n.live || n.is_root) continue;
    for (int32_t b : n.blocks) {
      if (alloc_->owner_locked(b) == id_) alloc_->release_cache_ref_locked(b, id_);
    }
  }
}

// ---------------------------------------------------------------- node bookkeeping

uint64_t PrefixCache::hash_block(const int32_t* t) const {
  // Multiply-xorshift over the block's token ids, two at a time; exact comparison guards collisions.
  uint64_t h = 0x9e3779b97f4a7c15ULL ^ static_cast<uint64_t>(block_size_);
  int64_t i = 0;
  for (; i + 1 < block_size_; i += 2) {
    const uint64_t w = static_cast<uint64_t>(static_cast<uint32_t>(t[i])) |
                       (static_cast<uint64_t>(static_cast<uint32_t>(t[i + 1])) << 32);
    h = (h ^ w) * 0xff51afd7ed558ccdULL;
    h ^= h >> 29;
  }
  if (i < block_size_) h = (h ^ static_cast<uint32_t>(t[i])) * 0xc4ceb9fe1a85ec53ULL;
  return mix64(h) & hash_mask_;
}

uint64_t PrefixCache::child_key(int32_t parent, uint64_t first_hash) {
  return mix64(first_hash ^ (static_cast<uint64_t>(static_cast<uint32_t>(parent)) * 0x9e3779b97f4a7c15ULL));
}

int32_t PrefixCache::find_child(int32_t parent, uint64_t h, const int32_t* block_tokens) const {
  auto it = children_.find(child_key(parent, h));
  if (it == children_.end()) return -1;
  const size_t bytes = static_cast<size_t>(block_size_) * sizeof(int32_t);
  for (int32_t c = it->second; c >= 0; c = nodes_[c].chain_next) {
    const Node& n = nodes_[c];
    if (n.parent == parent && n.first_hash == h && std::memcmp(n.tokens.data(), block_tokens, bytes) == 0) return c;
  }
  return -1;
}

void PrefixCache::link_child(int32_t node) {
  Node& n = nodes_[node];
  auto [it, inserted] = children_.try_emplace(child_key(n.parent, n.first_hash), node);
  n.chain_next = inserted ? -1 : it->second;
  if (!inserted) it->second = node;
  ++nodes_[n.parent].num_children;
}

void PrefixCache::unlink_child(int32_t node) {
  Node& n = nodes_[node];
  auto it = children_.find(child_key(n.parent, n.first_hash));
  if (it == children_.end()) throw CacheError("internal: node " + str(node) + " missing from the child map");
  if (it->second == node) {
    if (n.chain_next < 0) {
      children_.erase(it);
    } else {
      it->second = n.chain_next;
    }
  } else {
    int32_t prev = it->second;
    while (prev >= 0 && nodes_[prev].chain_next != node) prev = nodes_[prev].chain_next;
    if (prev < 0) throw CacheError("internal: node " + str(node) + " missing from its hash chain");
    nodes_[prev].chain_next = n.chain_next;
  }
  n.chain_next = -1;
  --nodes_[n.parent].num_children;
}

int32_t PrefixCache::new_node() {
  int32_t idx;
  if (!free_nodes_.empty()) {
    idx = free_nodes_.back();
    free_nodes_.pop_back();
  } else {
    idx = static_cast<int32_t>(nodes_.size());
    nodes_.emplace_back();
  }
  Node& n = nodes_[idx];
  n.live = true;
  n.parent = -1;
  n.lock = 0;
  n.pins = 0;
  n.num_children = 0;
  n.chain_next = -1;
  n.is_root = false;
  n.in_lru = false;
  n.tick = clock_;
  return idx;
}

void PrefixCache::free_node(int32_t node) {
  Node& n = nodes_[node];
  n.live = false;
  ++n.generation;
  n.tokens.clear();
  n.blocks.clear();
  free_nodes_.push_back(node);
}

int32_t PrefixCache::root_for(int64_t ns) {
  auto it = roots_.find(ns);
  if (it != roots_.end()) return it->second;
  const int32_t r = new_node();
  nodes_[r].is_root = true;
  nodes_[r].ns = ns;
  roots_.emplace(ns, r);
  return r;
}

int64_t PrefixCache::handle_of(int32_t node) const {
  return (static_cast<int64_t>(nodes_[node].generation) << 32) | static_cast<int64_t>(node);
}

int32_t PrefixCache::resolve(int64_t handle, const char* what) const {
  const int64_t idx = handle & 0xffffffffLL;
  const int64_t gen = handle >> 32;
  if (handle < 0 || idx >= static_cast<int64_t>(nodes_.size()) || !nodes_[idx].live ||
      static_cast<int64_t>(nodes_[idx].generation) != gen) {
    throw CacheError(std::string(what) + ": unknown handle " + str(handle) +
                     " (expected a handle from match_prefix whose node is still cached; it may have been "
                     "evicted or reset)");
  }
  return static_cast<int32_t>(idx);
}

void PrefixCache::lru_push(int32_t node) {
  Node& n = nodes_[node];
  lru_heap_.push_back({n.tick, node, ++n.lru_seq});
  std::push_heap(lru_heap_.begin(), lru_heap_.end());
}

bool PrefixCache::lru_entry_valid(const LruEntry& e) const {
  const Node& n = nodes_[e.node];
  return n.live && n.in_lru && n.lru_seq == e.seq;
}

void PrefixCache::lru_remove(int32_t node) {
  Node& n = nodes_[node];
  if (n.in_lru) {
    n.in_lru = false;  // its heap entry is now stale
    --lru_live_;
  }
}

void PrefixCache::lru_add_if_evictable(int32_t node) {
  Node& n = nodes_[node];
  if (!n.in_lru && evictable_leaf(n)) {
    n.in_lru = true;
    ++lru_live_;
    lru_push(node);
  }
}

void PrefixCache::lru_settle() {
  if (lru_heap_.size() > 2 * lru_live_ + 1024) {
    lru_heap_.clear();
    for (size_t i = 0; i < nodes_.size(); ++i) {
      Node& n = nodes_[i];
      if (n.live && n.in_lru) lru_heap_.push_back({n.tick, static_cast<int32_t>(i), ++n.lru_seq});
    }
    std::make_heap(lru_heap_.begin(), lru_heap_.end());
  }
  while (!lru_heap_.empty() && !lru_entry_valid(lru_heap_.front())) {
    std::pop_heap(lru_heap_.begin(), lru_heap_.end());
    lru_heap_.pop_back();
  }
}

void PrefixCache::touch_path(int32_t node) {
  const uint64_t now = ++clock_;
  for (int32_t x = node; x >= 0; x = nodes_[x].parent) {
    Node& n = nodes_[x];
    n.tick = now;
    if (n.in_lru) lru_push(x);  // re-stamped: the old entry goes stale
  }
  lru_settle();
}

// ---------------------------------------------------------------- match / insert

size_t PrefixCache::matching_blocks(const int32_t* a, const int32_t* b, size_t max_blocks) const {
  // One memcmp over the whole run is the common case (an edge matched to its end); only a mismatch pays
  // for the block-by-block scan that locates it.
  const size_t bytes = static_cast<size_t>(block_size_) * sizeof(int32_t);
  if (max_blocks == 0 || std::memcmp(a, b, max_blocks * bytes) == 0) return max_blocks;
  size_t j = 0;
  while (std::memcmp(a + j * block_size_, b + j * block_size_, bytes) == 0) ++j;
  return j;
}

std::pair<int32_t, size_t> PrefixCache::walk(int32_t root, const int32_t* tokens, size_t nb,
                                             std::pair<int32_t, size_t>* partial) const {
  const size_t bs = static_cast<size_t>(block_size_);
  int32_t cur = root;
  size_t pos = 0;
  *partial = {-1, 0};
  while (pos < nb) {
    const int32_t* blk = tokens + pos * bs;
    const int32_t c = find_child(cur, hash_block(blk), blk);
    if (c < 0) break;
    const Node& child = nodes_[c];
    const size_t k = child.blocks.size();
    const size_t j = 1 + matching_blocks(child.tokens.data() + bs, tokens + (pos + 1) * bs,
                                         std::min(k, nb - pos) - 1);
    if (j < k) {
      *partial = {c, j};
      pos += j;
      break;
    }
    cur = c;
    pos += k;
  }
  return {cur, pos};
}

int32_t PrefixCache::split(int32_t node, size_t k) {
  const size_t bs = static_cast<size_t>(block_size_);
  const int32_t p = new_node();  // may reallocate nodes_: take references only after this
  Node& top = nodes_[p];
  Node& child = nodes_[node];
  top.parent = child.parent;
  top.ns = child.ns;
  top.lock = child.lock;
  top.tick = child.tick;
  top.first_hash = child.first_hash;
  top.tokens.assign(child.tokens.begin(), child.tokens.begin() + static_cast<std::ptrdiff_t>(k * bs));
  top.blocks.assign(child.blocks.begin(), child.blocks.begin() + static_cast<std::ptrdiff_t>(k));

  // `top` takes the child's place in its parent's chain (same parent, same first block).
  auto it = children_.find(child_key(child.parent, child.first_hash));
  if (it->second == node) {
    it->second = p;
  } else {
    int32_t prev = it->second;
    while (nodes_[prev].chain_next != node) prev = nodes_[prev].chain_next;
    nodes_[prev].chain_next = p;
  }
  top.chain_next = child.chain_next;
  top.num_children = 0;

  child.tokens.erase(child.tokens.begin(), child.tokens.begin() + static_cast<std::ptrdiff_t>(k * bs));
  child.blocks.erase(child.blocks.begin(), child.blocks.begin() + static_cast<std::ptrdiff_t>(k));
  child.parent = p;
  child.first_hash = hash_block(child.tokens.data());
  child.chain_next = -1;
  link_child(node);
  return p;
}

int64_t PrefixCache::match_prefix(const int32_t* tokens, size_t n, int64_t ns, std::vector<int32_t>* out) {
  std::lock_guard<std::mutex> g(mu_);
  const size_t nb = n / static_cast<size_t>(block_size_);
  const int32_t root = root_for(ns);
  std::pair<int32_t, size_t> partial;
  auto [cur, pos] = walk(root, tokens, nb, &partial);
  if (partial.first >= 0) cur = split(partial.first, partial.second);

  out->resize(pos);
  size_t w = pos;
  for (int32_t x = cur; !nodes_[x].is_root; x = nodes_[x].parent) {
    const auto& b = nodes_[x].blocks;
    w -= b.size();
    std::memcpy(out->data() + w, b.data(), b.size() * sizeof(int32_t));
  }
  touch_path(cur);
  if (pos > 0) {
    ++hits_;
  } else {
    ++misses_;
  }
  return handle_of(cur);
}

int64_t PrefixCache::insert(const int32_t* tokens, size_t n, const int32_t* ids, size_t num_ids, int64_t ns) {
  std::lock_guard<std::mutex> g(mu_);
  std::lock_guard<std::mutex> ga(alloc_->mutex());
  const size_t bs = static_cast<size_t>(block_size_);
  const size_t nb = n / bs;
  if (num_ids != nb) {
    throw CacheError("insert: got " + str(static_cast<int64_t>(num_ids)) + " block ids for " +
                     str(static_cast<int64_t>(n)) + " tokens; expected len(tokens) // block_size = " +
                     str(static_cast<int64_t>(nb)) + " (block_size " + str(block_size_) + ")");
  }
  alloc_->check_distinct_allocated_locked(ids, nb, "insert");

  const int32_t root = root_for(ns);
  std::pair<int32_t, size_t> partial;
  auto [cur, pos] = walk(root, tokens, nb, &partial);
  // Validate the blocks the tree will take over before changing anything.
  for (size_t i = pos; i < nb; ++i) {
    const int32_t owner = alloc_->owner_locked(ids[i]);
    if (owner != BlockAllocator::kNoOwner) {
      throw CacheError("insert: block " + str(ids[i]) + " at position " + str(static_cast<int64_t>(i)) +
                       " is already held by a prefix cache (cache id " + str(owner) +
                       "); new positions need blocks the caller owns");
    }
  }

  if (partial.first >= 0) cur = split(partial.first, partial.second);
  if (pos < nb) {
    const int32_t leaf = new_node();
    Node& L = nodes_[leaf];
    L.parent = cur;
    L.ns = ns;
    L.tokens.assign(tokens + pos * bs, tokens + nb * bs);
    L.blocks.assign(ids + pos, ids + nb);
    L.first_hash = hash_block(L.tokens.data());
    for (int32_t b : L.blocks) alloc_->transfer_to_cache_locked(b, id_);
    lru_remove(cur);  // cur gains a child, so it is no longer a leaf
    link_child(leaf);
    evictable_blocks_ += static_cast<int64_t>(nb - pos);
    cur = leaf;
  }
  touch_path(cur);
  lru_add_if_evictable(cur);
  return static_cast<int64_t>(pos * bs);
}

// ---------------------------------------------------------------- locks, eviction, reset

void PrefixCache::lock(int64_t handle) {
  std::lock_guard<std::mutex> g(mu_);
  const int32_t node = resolve(handle, "lock");
  if (!nodes_[node].is_root) ++nodes_[node].pins;
  for (int32_t x = node; !nodes_[x].is_root; x = nodes_[x].parent) {
    Node& n = nodes_[x];
    if (n.lock == 0) {
      const auto k = static_cast<int64_t>(n.blocks.size());
      evictable_blocks_ -= k;
      locked_blocks_ += k;
      lru_remove(x);
    }
    ++n.lock;
  }
}

void PrefixCache::unlock(int64_t handle) {
  std::lock_guard<std::mutex> g(mu_);
  const int32_t node = resolve(handle, "unlock");
  if (!nodes_[node].is_root && nodes_[node].pins < 1) {
    throw CacheError("unlock: handle " + str(handle) + " is not locked (no lock() on this handle is pending; lock " +
                     "count " + str(nodes_[node].lock) + " comes from deeper nodes); expected a matching lock()");
  }
  if (!nodes_[node].is_root) --nodes_[node].pins;
  for (int32_t x = node; !nodes_[x].is_root; x = nodes_[x].parent) {
    Node& n = nodes_[x];
    if (--n.lock == 0) {
      const auto k = static_cast<int64_t>(n.blocks.size());
      evictable_blocks_ += k;
      locked_blocks_ -= k;
      lru_add_if_evictable(x);
    }
  }
  lru_settle();  // bounds the stale entries that repeated lock/unlock cycles leave in the heap
}

int64_t PrefixCache::evict(int64_t num_blocks) {
  std::lock_guard<std::mutex> g(mu_);
  std::lock_guard<std::mutex> ga(alloc_->mutex());
  if (num_blocks < 0) throw CacheError("evict: num_blocks=" + str(num_blocks) + " must be >= 0");
  return evict_locked(num_blocks);
}

int64_t PrefixCache::evict_locked(int64_t num_blocks) {
  const size_t bs = static_cast<size_t>(block_size_);
  int64_t freed = 0;
  lru_settle();
  while (freed < num_blocks && !lru_heap_.empty()) {
    const int32_t leaf = lru_heap_.front().node;
    Node& L = nodes_[leaf];
    const auto k = static_cast<int64_t>(L.blocks.size());
    const int64_t take = std::min(k, num_blocks - freed);
    // Deepest blocks first: the tail of a sequence is the part least likely to be shared again.
    for (int64_t i = k - 1; i >= k - take; --i) alloc_->release_cache_ref_locked(L.blocks[i], id_);
    evictable_blocks_ -= take;
    freed += take;
    if (take < k) {
      L.blocks.resize(static_cast<size_t>(k - take));
      L.tokens.resize(static_cast<size_t>(k - take) * bs);
      continue;
    }
    const int32_t parent = L.parent;
    lru_remove(leaf);
    unlink_child(leaf);
    free_node(leaf);
    lru_add_if_evictable(parent);
    lru_settle();
  }
  return freed;
}

void PrefixCache::reset() {
  std::lock_guard<std::mutex> g(mu_);
  std::lock_guard<std::mutex> ga(alloc_->mutex());
  if (locked_blocks_ > 0) {
    throw CacheError("reset: " + str(locked_blocks_) + " blocks are locked; unlock every handle before reset()");
  }
  evict_locked(evictable_blocks_);
  for (const auto& [ns, r] : roots_) free_node(r);
  roots_.clear();
  children_.clear();
  lru_heap_.clear();
  lru_live_ = 0;
  hits_ = 0;
  misses_ = 0;
}

// ---------------------------------------------------------------- counters and invariants

int64_t PrefixCache::evictable_blocks() const {
  std::lock_guard<std::mutex> g(mu_);
  return evictable_blocks_;
}
int64_t PrefixCache::locked_blocks() const {
  std::lock_guard<std::mutex> g(mu_);
  return locked_blocks_;
}
int64_t PrefixCache::cached_tokens() const {
  std::lock_guard<std::mutex> g(mu_);
  return (evictable_blocks_ + locked_blocks_) * block_size_;
}
int64_t PrefixCache::hits() const {
  std::lock_guard<std::mutex> g(mu_);
  return hits_;
}
int64_t PrefixCache::misses() const {
  std::lock_guard<std::mutex> g(mu_);
  return misses_;
}

void PrefixCache::check_invariants() const {
  std::lock_guard<std::mutex> g(mu_);
  std::lock_guard<std::mutex> ga(alloc_->mutex());
  alloc_->check_invariants_locked();
  check_invariants_locked();
}

void PrefixCache::check_invariants_locked() const {
  const size_t bs = static_cast<size_t>(block_size_);
  auto fail = [](int32_t node, const std::string& what) {
    throw CacheError("invariant: node " + str(node) + ": " + what);
  };
  std::vector<int32_t> child_count(nodes_.size(), 0);
  std::vector<int64_t> child_locks(nodes_.size(), 0);
  int64_t evictable = 0, locked = 0, tree_blocks = 0, live_children = 0;
  size_t lru_members = 0;
  for (size_t i = 0; i < nodes_.size(); ++i) {
    const Node& n = nodes_[i];
    const auto id = static_cast<int32_t>(i);
    if (!n.live) continue;
    if (n.lock < 0) fail(id, "negative lock count " + str(n.lock));
    if (n.is_root) {
      auto it = roots_.find(n.ns);
      if (it == roots_.end() || it->second != id) fail(id, "root not registered for namespace " + str(n.ns));
      continue;
    }
    ++live_children;
    if (n.parent < 0 || static_cast<size_t>(n.parent) >= nodes_.size() || !nodes_[n.parent].live) {
      fail(id, "parent " + str(n.parent) + " is not a live node");
    }
    const Node& p = nodes_[n.parent];
    ++child_count[n.parent];
    child_locks[n.parent] += n.lock;
    if (n.pins < 0 || n.pins > n.lock) fail(id, "pins " + str(n.pins) + " outside [0, lock " + str(n.lock) + "]");
    if (p.ns != n.ns) fail(id, "namespace " + str(n.ns) + " differs from its parent's " + str(p.ns));
    if (n.blocks.empty() || n.tokens.size() != n.blocks.size() * bs) {
      fail(id, str(static_cast<int64_t>(n.blocks.size())) + " blocks but " + str(static_cast<int64_t>(n.tokens.size())) +
                   " tokens (block_size " + str(block_size_) + ")");
    }
    if (!p.is_root && p.lock < n.lock) {
      fail(id, "lock " + str(n.lock) + " exceeds its parent's lock " + str(p.lock));
    }
    if (n.first_hash != hash_block(n.tokens.data())) fail(id, "stale first-block hash");
    if (find_child(n.parent, n.first_hash, n.tokens.data()) != id) {
      fail(id, "not reachable from its parent by its first block (missing from the child map, or a sibling "
               "starts with the same block)");
    }
    for (int32_t b : n.blocks) {
      if (b < 0 || b >= alloc_->num_blocks()) fail(id, "holds bad block id " + str(b));
      if (alloc_->owner_locked(b) != id_) fail(id, "block " + str(b) + " is not owned by this cache in the allocator");
      if (alloc_->refcount_locked(b) < 1) fail(id, "block " + str(b) + " is referenced by the tree but free");
    }
    const auto k = static_cast<int64_t>(n.blocks.size());
    tree_blocks += k;
    (n.lock > 0 ? locked : evictable) += k;
    if (n.in_lru) ++lru_members;
  }
  for (size_t i = 0; i < nodes_.size(); ++i) {
    const Node& n = nodes_[i];
    if (!n.live) continue;
    const auto id = static_cast<int32_t>(i);
    if (n.num_children != child_count[i]) {
      fail(id, "num_children " + str(n.num_children) + " but " + str(child_count[i]) + " live children");
    }
    if (!n.is_root && n.lock != n.pins + child_locks[i]) {
      fail(id, "lock " + str(n.lock) + " != pins " + str(n.pins) + " + children's locks " + str(child_locks[i]));
    }
    if (n.in_lru != evictable_leaf(n)) {
      fail(id, n.in_lru ? "in the LRU set but not an unlocked leaf" : "an unlocked leaf missing from the LRU set");
    }
  }
  std::vector<int32_t> valid_entries(nodes_.size(), 0);
  for (const LruEntry& e : lru_heap_) {
    if (e.node < 0 || static_cast<size_t>(e.node) >= nodes_.size()) {
      throw CacheError("invariant: LRU heap entry names node " + str(e.node) + " outside the node table");
    }
    if (!lru_entry_valid(e)) continue;
    if (++valid_entries[e.node] > 1) fail(e.node, "has two valid LRU heap entries");
    if (e.tick != nodes_[e.node].tick) fail(e.node, "LRU heap entry carries a stale tick");
  }
  for (size_t i = 0; i < nodes_.size(); ++i) {
    if (nodes_[i].live && nodes_[i].in_lru && valid_entries[i] != 1) {
      fail(static_cast<int32_t>(i), "marked evictable but has no valid LRU heap entry");
    }
  }
  if (lru_members != lru_live_) {
    throw CacheError("invariant: " + str(static_cast<int64_t>(lru_members)) + " nodes are marked evictable " +
                     "leaves but the LRU counter says " + str(static_cast<int64_t>(lru_live_)));
  }
  if (!std::is_heap(lru_heap_.begin(), lru_heap_.end())) throw CacheError("invariant: LRU heap order broken");
  size_t chained = 0;
  for (const auto& [key, head] : children_) {
    for (int32_t c = head; c >= 0; c = nodes_[c].chain_next) {
      if (!nodes_[c].live || nodes_[c].is_root || child_key(nodes_[c].parent, nodes_[c].first_hash) != key) {
        fail(c, "wrong entry in the child map");
      }
      if (++chained > nodes_.size()) throw CacheError("invariant: cycle in a child-map chain");
    }
  }
  if (static_cast<int64_t>(chained) != live_children) {
    throw CacheError("invariant: child map lists " + str(static_cast<int64_t>(chained)) + " nodes but " +
                     str(live_children) + " non-root nodes are live");
  }
  if (evictable != evictable_blocks_ || locked != locked_blocks_) {
    throw CacheError("invariant: counters say evictable=" + str(evictable_blocks_) + " locked=" + str(locked_blocks_) +
                     " but a walk finds evictable=" + str(evictable) + " locked=" + str(locked));
  }
  int64_t owned = 0;
  for (int64_t b = 0; b < alloc_->num_blocks(); ++b) owned += alloc_->owner_locked(static_cast<int32_t>(b)) == id_;
  if (owned != tree_blocks) {
    throw CacheError("invariant: allocator records " + str(owned) + " blocks owned by this cache but the tree holds " +
                     str(tree_blocks) + " (a block appears twice in the tree, or a reference leaked)");
  }
}

}  // namespace rexrag
