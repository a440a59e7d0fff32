// Plans and the run-time ISA dispatch of the CPU paged attention (see paged_attention_cpu.h).
#include "paged_attention_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_isa.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rexrag {

namespace attn_generic {
#include "paged_attention_cpu_kernel.inc"
}  // namespace attn_generic

#ifdef REXRAG_HAVE_AVX512_BUILD
#define REXRAG_AVX512_CODE 1  // AVX-512 intrinsics in the shared helpers (cpu_vec.inc) of the next two builds
REXRAG_AVX512_BEGIN
namespace attn_avx512 {
#include "paged_attention_cpu_kernel.inc"
}  // namespace attn_avx512
REXRAG_AVX512_END
REXRAG_AVX512_BF16_BEGIN
#define REXRAG_BF16_DOT 1
namespace attn_avx512_bf16 {
#include "paged_attention_cpu_kernel.inc"
}  // namespace attn_avx512_bf16
#undef REXRAG_BF16_DOT
REXRAG_AVX512_END
#undef REXRAG_AVX512_CODE
#endif

namespace {

void check_table(const int32_t* block_tables, int32_t batch, int32_t max_blocks, const int32_t* context_lens,
                 int32_t block_size) {
  if (batch < 0 || max_blocks < 1 || block_size < 1) {
    throw std::invalid_argument("paged attention plan: expected batch >= 0, max_blocks >= 1, block_size >= 1; got " +
                                std::to_string(batch) + ", " + std::to_string(max_blocks) + ", " +
                                std::to_string(block_size));
  }
  for (int32_t b = 0; b < batch; ++b) {
    const int64_t c = context_lens[b];
    if (c < 1 || c > static_cast<int64_t>(max_blocks) * block_size) {
      throw std::invalid_argument("paged attention plan: context_lens[" + std::to_string(b) + "] = " +
                                  std::to_string(c) + ", expected 1.." +
                                  std::to_string(static_cast<int64_t>(max_blocks) * block_size) +
                                  " (max_blocks * block_size)");
    }
    const int32_t* row = block_tables + static_cast<int64_t>(b) * max_blocks;
    const int32_t n = static_cast<int32_t>((c + block_size - 1) / block_size);
    for (int32_t i = 0; i < n; ++i) {
      if (row[i] < 0) {
        throw std::invalid_argument("paged attention plan: block_tables[" + std::to_string(b) + ", " +
                                    std::to_string(i) + "] = " + std::to_string(row[i]) + " is negative");
      }
    }
  }
}

// Appends items for the span [begin, end) of table_row's blocks, in pieces of at most chunk blocks, each over
// the query rows `rows`.
void add_span(AttnPlan& plan, int32_t table_row, int32_t begin, int32_t end, int32_t chunk,
              const std::vector<int32_t>& rows) {
  for (int32_t b = begin; b < end; b += chunk) {
    AttnItem it;
    it.table_row = table_row;
    it.block_begin = b;
    it.block_end = std::min(end, b + chunk);
    it.rows_begin = static_cast<int32_t>(plan.item_rows.size());
    plan.item_rows.insert(plan.item_rows.end(), rows.begin(), rows.end());
    it.rows_end = static_cast<int32_t>(plan.item_rows.size());
    it.partial_begin = plan.num_partials;
    plan.num_partials += static_cast<int32_t>(rows.size());
    plan.items.push_back(it);
    plan.blocks_read += it.block_end - it.block_begin;
  }
}

// The members that have a block at column d, grouped by that block's id, groups in first-seen order.
std::vector<std::vector<int32_t>> group_by_block(const AttnPlan& plan, const std::vector<int32_t>& members,
                                                 int32_t d, const std::vector<int32_t>& num_blocks) {
  std::vector<int32_t> keys;
  std::vector<std::vector<int32_t>> groups;
  for (int32_t s : members) {
    if (d >= num_blocks[s]) continue;
    const int32_t id = plan.block_tables[static_cast<int64_t>(s) * plan.max_blocks + d];
    auto k = std::find(keys.begin(), keys.end(), id);
    if (k == keys.end()) {
      keys.push_back(id);
      groups.push_back({s});
    } else {
      groups[k - keys.begin()].push_back(s);
    }
  }
  return groups;
}

// Trie walk over the block tables of `members`, all equal on blocks [0, depth): extend the common run of
// blocks that are full for every member, emit it once for all of them, then split by the next block id.
void plan_shared(AttnPlan& plan, const std::vector<int32_t>& members, int32_t depth, int32_t chunk,
                 const std::vector<int32_t>& full_blocks, const std::vector<int32_t>& num_blocks) {
  const int32_t mb = plan.max_blocks;
  const int32_t* bt = plan.block_tables.data();
  if (members.size() == 1) {
    const int32_t s = members[0];
    add_span(plan, s, depth, num_blocks[s], chunk, members);
    return;
  }
  int32_t d = depth;
  for (;; ++d) {
    bool common = true;
    const int32_t id = bt[static_cast<int64_t>(members[0]) * mb + d];
    for (int32_t s : members) {
      if (d >= full_blocks[s] || bt[static_cast<int64_t>(s) * mb + d] != id) {
        common = false;
        break;
      }
    }
    if (!common) break;
  }
  if (d > depth) add_span(plan, members[0], depth, d, chunk, members);
  const std::vector<std::vector<int32_t>> groups = group_by_block(plan, members, d, num_blocks);
  for (const auto& g : groups) {
    if (d == depth && g.size() == members.size()) {
      // the same block at d but not full for every member (cannot be shared): each reads its own rest
      for (int32_t s : g) add_span(plan, s, d, num_blocks[s], chunk, {s});
    } else {
      plan_shared(plan, g, d, chunk, full_blocks, num_blocks);
    }
  }
}

void finish_merge_lists(AttnPlan& plan) {
  std::vector<int32_t> count(plan.num_rows + 1, 0);
  for (const AttnItem& it : plan.items) {
    for (int32_t i = it.rows_begin; i < it.rows_end; ++i) ++count[plan.item_rows[i] + 1];
  }
  for (int32_t r = 0; r < plan.num_rows; ++r) count[r + 1] += count[r];
  plan.merge_offsets = count;
  plan.merge_slots.assign(count[plan.num_rows], 0);
  std::vector<int32_t> fill(count.begin(), count.end() - 1);
  for (const AttnItem& it : plan.items) {
    for (int32_t i = it.rows_begin; i < it.rows_end; ++i) {
      plan.merge_slots[fill[plan.item_rows[i]]++] = it.partial_begin + (i - it.rows_begin);
    }
  }
}

AttnPlan plan_header(const int32_t* block_tables, int32_t batch, int32_t max_blocks, int32_t block_size) {
  AttnPlan plan;
  plan.block_size = block_size;
  plan.max_blocks = max_blocks;
  plan.block_tables.assign(block_tables, block_tables + static_cast<int64_t>(batch) * max_blocks);
  return plan;
}

}  // namespace

AttnPlan make_decode_plan(const int32_t* block_tables, int32_t batch, int32_t max_blocks,
                          const int32_t* context_lens, int32_t block_size, int32_t chunk_blocks,
                          bool share_prefixes) {
  check_table(block_tables, batch, max_blocks, context_lens, block_size);
  chunk_blocks = std::max(chunk_blocks, 1);
  AttnPlan plan = plan_header(block_tables, batch, max_blocks, block_size);
  plan.num_rows = batch;
  plan.limit.assign(context_lens, context_lens + batch);
  std::vector<int32_t> full(batch), nblocks(batch);
  for (int32_t b = 0; b < batch; ++b) {
    full[b] = context_lens[b] / block_size;
    nblocks[b] = (context_lens[b] + block_size - 1) / block_size;
  }
  if (share_prefixes) {
    std::vector<int32_t> all(batch);
    for (int32_t b = 0; b < batch; ++b) all[b] = b;
    // top level: group by first block id (plan_shared expects members equal on [0, depth))
    for (const auto& g : group_by_block(plan, all, 0, nblocks)) {
      plan_shared(plan, g, 0, chunk_blocks, full, nblocks);
    }
  } else {
    for (int32_t b = 0; b < batch; ++b) add_span(plan, b, 0, nblocks[b], chunk_blocks, {b});
  }
  finish_merge_lists(plan);
  return plan;
}

AttnPlan make_prefill_plan(const int32_t* block_tables, int32_t batch, int32_t max_blocks,
                           const int32_t* context_lens, const int32_t* cu_q, int32_t block_size,
                           int32_t chunk_blocks, int32_t row_tile) {
  check_table(block_tables, batch, max_blocks, context_lens, block_size);
  chunk_blocks = std::max(chunk_blocks, 1);
  row_tile = std::max(row_tile, 1);
  AttnPlan plan = plan_header(block_tables, batch, max_blocks, block_size);
  if (cu_q[0] != 0) throw std::invalid_argument("paged attention plan: cu_seqlens_q[0] must be 0");
  plan.num_rows = cu_q[batch];
  plan.limit.assign(plan.num_rows, 0);
  std::vector<int32_t> rows;
  for (int32_t b = 0; b < batch; ++b) {
    const int32_t n = cu_q[b + 1] - cu_q[b], c = context_lens[b];
    if (n < 1 || n > c) {
      throw std::invalid_argument("paged attention plan: sequence " + std::to_string(b) + " has " +
                                  std::to_string(n) + " new tokens, expected 1.." + std::to_string(c) +
                                  " (its context length)");
    }
    for (int32_t r = 0; r < n; ++r) plan.limit[cu_q[b] + r] = c - n + r + 1;
    for (int32_t r0 = 0; r0 < n; r0 += row_tile) {
      const int32_t r1 = std::min(n, r0 + row_tile);
      rows.clear();
      for (int32_t r = r0; r < r1; ++r) rows.push_back(cu_q[b] + r);
      const int32_t last = c - n + r1;  // keys seen by the tile's last row
      add_span(plan, b, 0, (last + block_size - 1) / block_size, chunk_blocks, rows);
    }
  }
  finish_merge_lists(plan);
  return plan;
}

namespace {

// Code paths from slowest to fastest; a path runs where the CPU has it and set_attention_isa has not capped it.
constexpr const char* kIsaNames[] = {"generic", "avx512", "avx512_bf16", "amx_bf16"};
constexpr int kNumIsas = 4;
std::atomic<int> isa_cap{kNumIsas - 1};

int best_isa() {
  return cpu_has_amx_bf16() ? 3 : cpu_has_avx512_bf16() ? 2 : cpu_has_avx512() ? 1 : 0;
}

int current_isa() { return std::min(best_isa(), isa_cap.load()); }

}  // namespace

const char* attention_isa() { return kIsaNames[current_isa()]; }

std::vector<std::string> attention_isas() {
  return std::vector<std::string>(kIsaNames, kIsaNames + best_isa() + 1);
}

void set_attention_isa(const std::string& name) {
  const int best = best_isa();
  for (int i = 0; i <= best; ++i) {
    if (name == kIsaNames[i]) {
      isa_cap.store(i);
      return;
    }
  }
  std::string have;
  for (int i = 0; i <= best; ++i) have += std::string(i ? ", " : "") + "'" + kIsaNames[i] + "'";
  throw std::invalid_argument("paged attention: code path '" + name + "' is not one this CPU runs (" + have + ")");
}

void run_attention_plan(const AttnPlan& plan, const AttnTensors& t) {
  if (t.heads < 1 || t.kv_heads < 1 || t.heads % t.kv_heads || t.head_dim < 1) {
    throw std::invalid_argument("paged attention: heads " + std::to_string(t.heads) + " must be a positive "
                                "multiple of kv_heads " + std::to_string(t.kv_heads) + ", head_dim >= 1");
  }
  for (int32_t id : plan.block_tables) {
    if (id >= t.num_blocks) {
      throw std::invalid_argument("paged attention: block id " + std::to_string(id) + " is outside the pool of " +
                                  std::to_string(t.num_blocks) + " blocks");
    }
  }
  const int H = t.heads, G = t.heads / t.kv_heads, D = t.head_dim;
  int32_t max_rows = 1;
  for (const AttnItem& it : plan.items) max_rows = std::max(max_rows, it.rows_end - it.rows_begin);
  const int64_t scratch_per_thread = attn_generic::scratch_floats(max_rows * G, D);
  const int64_t P = plan.num_partials;
  // reused across calls: the partials of a prefill can be tens of MB
  static thread_local std::vector<float> partial_buf;
  static thread_local std::vector<float> scratch_buf;
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  const size_t need = static_cast<size_t>(P * H * (D + 2));
  if (partial_buf.size() < need) partial_buf.resize(need);
  const size_t scratch_need = static_cast<size_t>(scratch_per_thread * threads);
  if (scratch_buf.size() < scratch_need) scratch_buf.resize(scratch_need);
  float* part_acc = partial_buf.data();
  float* part_m = part_acc + P * H * D;
  float* part_l = part_m + P * H;
  float* scratch = scratch_buf.data();
  const int isa = current_isa();
  const bool avx512 = isa >= 1, avx512_bf16 = isa >= 2, amx = isa >= 3;
  const int64_t work = static_cast<int64_t>(plan.items.size()) * t.kv_heads;

#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    float* mine = scratch + scratch_per_thread * omp_get_thread_num();
#else
    float* mine = scratch;
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < work; ++w) {
      const AttnItem& it = plan.items[w / t.kv_heads];
      const int kvh = static_cast<int>(w % t.kv_heads);
#ifdef REXRAG_HAVE_AVX512_BUILD
      if (avx512_bf16) {
        attn_avx512_bf16::run_item(plan, it, kvh, t, amx, mine, part_acc, part_m, part_l);
        continue;
      }
      if (avx512) {
        attn_avx512::run_item(plan, it, kvh, t, false, mine, part_acc, part_m, part_l);
        continue;
      }
#endif
      attn_generic::run_item(plan, it, kvh, t, false, mine, part_acc, part_m, part_l);
    }
#pragma omp for schedule(static)
    for (int32_t r = 0; r < plan.num_rows; ++r) {
#ifdef REXRAG_HAVE_AVX512_BUILD
      if (avx512) {
        attn_avx512::merge_row(plan, r, t, part_acc, part_m, part_l, mine);
        continue;
      }
#endif
      attn_generic::merge_row(plan, r, t, part_acc, part_m, part_l, mine);
    }
  }
}

}  // namespace rexrag
