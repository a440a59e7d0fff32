// Python face of the CPU paged attention (rexrag_fast._C.AttentionPlan, make_*_plan, paged_attention).
// The extension does not link torch: tensors arrive as data pointers with their dtype, shapes and the pool
// size, which rexrag_fast/engine/cpu_attention.py checks (contiguity, dtypes, shapes) before calling.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "paged_attention_cpu.h"

namespace py = pybind11;

namespace rexrag {

namespace {

using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

void check_dims(const IntArray& a, int ndim, const char* name) {
  if (a.ndim() != ndim) {
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(ndim) + " dimensions, got " +
                                std::to_string(a.ndim()));
  }
}

AttnDtype dtype_code(int code, const char* name) {
  if (code != 0 && code != 1) {
    throw std::invalid_argument(std::string(name) + ": expected 0 (float32) or 1 (bfloat16), got " +
                                std::to_string(code));
  }
  return static_cast<AttnDtype>(code);
}

}  // namespace

void bind_paged_attention(py::module_& m) {
  py::class_<AttnPlan>(m, "AttentionPlan",
                       "Work items of one engine step's paged attention, shared by every layer (see "
                       "paged_attention_cpu.h).")
      .def_property_readonly("num_rows", [](const AttnPlan& p) { return p.num_rows; })
      .def_property_readonly("num_items", [](const AttnPlan& p) { return p.items.size(); })
      .def_property_readonly("num_partials", [](const AttnPlan& p) { return p.num_partials; })
      .def_property_readonly("blocks_read", [](const AttnPlan& p) { return p.blocks_read; },
                             "Blocks read per layer and KV head (each of K and V).");

  m.def(
      "make_decode_plan",
      [](const IntArray& block_tables, const IntArray& context_lens, int32_t block_size, int32_t chunk_blocks,
         bool share_prefixes) {
        check_dims(block_tables, 2, "block_tables");
        check_dims(context_lens, 1, "context_lens");
        if (context_lens.shape(0) != block_tables.shape(0)) {
          throw std::invalid_argument("context_lens: expected " + std::to_string(block_tables.shape(0)) +
                                      " entries (one per block table row), got " +
                                      std::to_string(context_lens.shape(0)));
        }
        py::gil_scoped_release nogil;
        return make_decode_plan(block_tables.data(), static_cast<int32_t>(block_tables.shape(0)),
                                static_cast<int32_t>(block_tables.shape(1)), context_lens.data(), block_size,
                                chunk_blocks, share_prefixes);
      },
      py::arg("block_tables"), py::arg("context_lens"), py::arg("block_size"), py::arg("chunk_blocks") = 8,
      py::arg("share_prefixes") = true,
      "Plan of a decode step: block_tables int32 [B, max_blocks], context_lens int32 [B]; full blocks that "
      "several sequences share (same ids) are read once.");

  m.def(
      "make_prefill_plan",
      [](const IntArray& block_tables, const IntArray& context_lens, const IntArray& cu_seqlens_q,
         int32_t block_size, int32_t chunk_blocks, int32_t row_tile) {
        check_dims(block_tables, 2, "block_tables");
        check_dims(context_lens, 1, "context_lens");
        check_dims(cu_seqlens_q, 1, "cu_seqlens_q");
        const auto b = block_tables.shape(0);
        if (context_lens.shape(0) != b || cu_seqlens_q.shape(0) != b + 1) {
          throw std::invalid_argument("make_prefill_plan: expected context_lens [" + std::to_string(b) +
                                      "] and cu_seqlens_q [" + std::to_string(b + 1) + "], got [" +
                                      std::to_string(context_lens.shape(0)) + "] and [" +
                                      std::to_string(cu_seqlens_q.shape(0)) + "]");
        }
        py::gil_scoped_release nogil;
        return make_prefill_plan(block_tables.data(), static_cast<int32_t>(b),
                                 static_cast<int32_t>(block_tables.shape(1)), context_lens.data(),
                                 cu_seqlens_q.data(), block_size, chunk_blocks, row_tile);
      },
      py::arg("block_tables"), py::arg("context_lens"), py::arg("cu_seqlens_q"), py::arg("block_size"),
      py::arg("chunk_blocks") = 1 << 20, py::arg("row_tile") = 16,
      "Plan of a varlen prefill over cached context + new tokens: cu_seqlens_q int32 [B + 1].");

  m.def(
      "paged_attention",
      [](const AttnPlan& plan, uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t out, int q_dtype,
         int kv_dtype, int heads, int kv_heads, int head_dim, int64_t num_blocks, float scale) {
        AttnTensors t{reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(k_cache),
                      reinterpret_cast<const void*>(v_cache), reinterpret_cast<void*>(out),
                      dtype_code(q_dtype, "q_dtype"), dtype_code(kv_dtype, "kv_dtype"), heads, kv_heads,
                      head_dim, num_blocks, scale};
        py::gil_scoped_release nogil;
        run_attention_plan(plan, t);
      },
      py::arg("plan"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("out"), py::arg("q_dtype"),
      py::arg("kv_dtype"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("num_blocks"),
      py::arg("scale"),
      "out[T, heads, head_dim] = attention of q over the paged pool as the plan describes (data pointers of "
      "contiguous tensors; dtype codes 0 float32, 1 bfloat16). Unchecked pointers: call it through "
      "rexrag_fast.engine.cpu_attention.");
  m.def("paged_attention_isa", &attention_isa,
        "'amx_bf16', 'avx512_bf16', 'avx512' or 'generic': the code path the kernel takes now.");
  m.def("paged_attention_isas", &attention_isas, "The code paths this CPU runs, slowest first.");
  m.def("set_paged_attention_isa", &set_attention_isa, py::arg("name"),
        "Cap the code path at name (one of paged_attention_isas()); ValueError otherwise.");
}

}  // namespace rexrag
