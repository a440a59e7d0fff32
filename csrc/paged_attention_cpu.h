// Paged attention on the CPU, reading K/V in place from the engine's paged pool (no per-step gather).
//
// Pool layout of one layer (bf16 or fp32): k_cache [num_blocks, kv_heads, head_dim, block_size] (a block's
// keys of one dimension adjacent: 16 of them are one vector load, no transpose), v_cache [num_blocks,
// block_size, kv_heads, head_dim]; token t of a sequence lives in block block_table[t / block_size], row
// t % block_size.
//
// A plan (built once per engine step, reused by every layer) lists work items. An item is one span of
// blocks of one block table and a set of query rows that all attend to that span; row r sees keys at
// positions < limit[r] (decode: the context length; prefill: causal). Each item runs once per KV head, over
// the G = heads / kv_heads query heads of that KV head, with the online softmax in fp32, and leaves a
// partial state (running max m, sum l, unnormalised output acc) per (row, head); a merge pass combines the
// partials of each row: out = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i, M = max_i m_i.
//
// Shared prefixes: the decode plan walks the block tables as a trie; a run of full blocks that several
// sequences have in common (the same block ids, hence the same K/V) becomes one item whose rows are all those
// sequences, so each shared block is read once per step instead of once per sequence (Hydragen / cascade).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rexrag {

struct AttnItem {
  int32_t table_row;    // row of block_tables whose block ids the span reads
  int32_t block_begin;  // span [block_begin, block_end) of that row's blocks
  int32_t block_end;
  int32_t rows_begin;   // query rows: item_rows[rows_begin, rows_end)
  int32_t rows_end;
  int32_t partial_begin;  // partial slots partial_begin + (i - rows_begin) for item_rows[i]
};

struct AttnPlan {
  int32_t num_rows = 0;              // query rows (tokens) of the batch
  int32_t block_size = 0;
  int32_t max_blocks = 0;            // columns of block_tables
  std::vector<int32_t> block_tables;  // [rows of the table, max_blocks] copy
  std::vector<int32_t> limit;         // [num_rows] keys visible to each row
  std::vector<AttnItem> items;
  std::vector<int32_t> item_rows;     // concatenated query rows of the items
  std::vector<int32_t> merge_offsets;  // [num_rows + 1] CSR over merge_slots
  std::vector<int32_t> merge_slots;    // partial slots of each row
  int32_t num_partials = 0;
  int64_t blocks_read = 0;  // block reads per layer and KV head (K and V each): the plan's memory traffic
};

// Decode: one query row per sequence (row b = sequence b), limit = context_lens[b]. Runs of at least one full
// block shared by two or more sequences are read once. chunk_blocks bounds an item's span (parallelism).
AttnPlan make_decode_plan(const int32_t* block_tables, int32_t batch, int32_t max_blocks,
                          const int32_t* context_lens, int32_t block_size, int32_t chunk_blocks, bool share_prefixes);

// Prefill (varlen): sequence b owns query rows [cu_q[b], cu_q[b+1]); its row r (0-based within it) sees keys
// < context_lens[b] - n_b + r + 1 with n_b its number of new tokens. Rows are tiled by row_tile.
AttnPlan make_prefill_plan(const int32_t* block_tables, int32_t batch, int32_t max_blocks,
                           const int32_t* context_lens, const int32_t* cu_q, int32_t block_size,
                           int32_t chunk_blocks, int32_t row_tile);

enum class AttnDtype : int { kFloat32 = 0, kBFloat16 = 1 };

struct AttnTensors {
  const void* q;     // [num_rows, heads, head_dim], contiguous
  const void* k_cache;  // [num_blocks, kv_heads, head_dim, block_size], contiguous
  const void* v_cache;  // [num_blocks, block_size, kv_heads, head_dim], contiguous
  void* out;         // [num_rows, heads, head_dim], contiguous, dtype of q
  AttnDtype q_dtype;
  AttnDtype kv_dtype;
  int32_t heads;
  int32_t kv_heads;
  int32_t head_dim;
  int64_t num_blocks;
  float scale;
};

// Runs the plan (OpenMP over items x KV heads, then over rows for the merge). Uses the AVX-512 code when the
// CPU has AVX-512F/BW/VL/DQ (cpu_isa.h), with vdpbf16ps for bf16 K/V where it also has AVX-512-BF16 and AMX
// tiles where it has AMX-BF16, else the portable build of the same code.
void run_attention_plan(const AttnPlan& plan, const AttnTensors& t);

// "amx_bf16", "avx512_bf16", "avx512" or "generic": the code path run_attention_plan takes now.
const char* attention_isa();

// The code paths this CPU runs, slowest first ("generic" ... attention_isa() before any cap).
std::vector<std::string> attention_isas();

// Caps the code path at `name` (one of attention_isas(); std::invalid_argument otherwise), so that tests and
// benchmarks run every path this CPU has; the fastest one is the default.
void set_attention_isa(const std::string& name);

}  // namespace rexrag
