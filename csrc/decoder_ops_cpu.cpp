// Elementwise parts of a decoder step fused for the CPU engine (rexrag_fast/engine/cpu_fused.py): per layer
// rope + K/V write and residual add + RMSNorm replace ~20 small torch ops, whose dispatch dominated a decode
// step once the matmuls and attention were fast; per step the sampler replaces log_softmax, argmax and
// torch.multinomial over the vocabulary (~1 ms a row at 49k tokens). Rounding follows the torch
// composition they replace: every bf16 result is the fp32 result rounded to nearest even where the torch
// ops round (each product and sum of rope); this file is built with -ffp-contract=off so that no product
// and sum fuse into one FMA rounding.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_isa.h"

namespace py = pybind11;

namespace rexrag {

namespace ops_generic {
#include "decoder_ops_cpu_kernel.inc"
}  // namespace ops_generic

#ifdef REXRAG_HAVE_AVX512_BUILD
REXRAG_AVX512_BEGIN
namespace ops_avx512 {
#include "decoder_ops_cpu_kernel.inc"
}  // namespace ops_avx512
REXRAG_AVX512_END
#endif

namespace {

bool is_bf16(int code) {
  if (code != 0 && code != 1) {
    throw std::invalid_argument("dtype: expected 0 (float32) or 1 (bfloat16), got " + std::to_string(code));
  }
  return code == 1;
}

template <typename T>
const T* cptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}
template <typename T>
T* mptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

template <typename T>
void rope_write_kv(uintptr_t qkv, uintptr_t positions, uintptr_t cos, uintptr_t sin, uintptr_t slots, uintptr_t q_out,
                   uintptr_t k_cache, uintptr_t v_cache, int64_t tokens, int heads, int kv_heads, int head_dim,
                   int block_size) {
#ifdef REXRAG_HAVE_AVX512_BUILD
  if (cpu_has_avx512()) {
    ops_avx512::rope_write_kv_typed(cptr<T>(qkv), cptr<int64_t>(positions), cptr<T>(cos), cptr<T>(sin),
                                    cptr<int64_t>(slots), mptr<T>(q_out), mptr<T>(k_cache), mptr<T>(v_cache),
                                    tokens, heads, kv_heads, head_dim, block_size);
    return;
  }
#endif
  ops_generic::rope_write_kv_typed(cptr<T>(qkv), cptr<int64_t>(positions), cptr<T>(cos), cptr<T>(sin),
                                   cptr<int64_t>(slots), mptr<T>(q_out), mptr<T>(k_cache), mptr<T>(v_cache),
                                   tokens, heads, kv_heads, head_dim, block_size);
}

template <typename T>
void add_rms_norm(uintptr_t x, uintptr_t delta, uintptr_t w, uintptr_t out, int64_t tokens, int hidden, float eps) {
#ifdef REXRAG_HAVE_AVX512_BUILD
  if (cpu_has_avx512()) {
    ops_avx512::add_rms_norm_typed(mptr<T>(x), cptr<T>(delta), cptr<T>(w), mptr<T>(out), tokens, hidden, eps);
    return;
  }
#endif
  ops_generic::add_rms_norm_typed(mptr<T>(x), cptr<T>(delta), cptr<T>(w), mptr<T>(out), tokens, hidden, eps);
}

}  // namespace

void bind_decoder_ops(py::module_& m) {
  m.def(
      "rope_write_kv",
      [](uintptr_t qkv, uintptr_t positions, uintptr_t cos, uintptr_t sin, uintptr_t slots, uintptr_t q_out,
         uintptr_t k_cache, uintptr_t v_cache, int dtype, int64_t tokens, int heads, int kv_heads, int head_dim,
         int block_size) {
        if (head_dim > 512) throw std::invalid_argument("rope_write_kv: head_dim " + std::to_string(head_dim) +
                                                        " above 512");
        const bool bf16 = is_bf16(dtype);
        py::gil_scoped_release nogil;
        (bf16 ? rope_write_kv<uint16_t> : rope_write_kv<float>)(qkv, positions, cos, sin, slots, q_out, k_cache,
                                                                v_cache, tokens, heads, kv_heads, head_dim,
                                                                block_size);
      },
      "Unchecked data pointers: call it through rexrag_fast.engine.cpu_fused.rope_write_kv.");
  m.def(
      "add_rms_norm",
      [](uintptr_t x, uintptr_t delta, uintptr_t w, uintptr_t out, int dtype, int64_t tokens, int hidden,
         float eps) {
        if (hidden > 8192) throw std::invalid_argument("add_rms_norm: hidden " + std::to_string(hidden) +
                                                       " above 8192");
        const bool bf16 = is_bf16(dtype);
        py::gil_scoped_release nogil;
        (bf16 ? add_rms_norm<uint16_t> : add_rms_norm<float>)(x, delta, w, out, tokens, hidden, eps);
      },
      "Unchecked data pointers: call it through rexrag_fast.engine.cpu_fused.add_rms_norm.");
  m.def(
      "sample_rows",
      [](uintptr_t logits, int64_t rows, int64_t vocab, uintptr_t temps, uintptr_t uniforms, uintptr_t tokens,
         uintptr_t logprobs) {
        py::gil_scoped_release nogil;
        const float* x = cptr<float>(logits);
        const float* t = cptr<float>(temps);
        const float* u = cptr<float>(uniforms);
        int64_t* tok = mptr<int64_t>(tokens);
        float* lp = mptr<float>(logprobs);
        const bool avx512 = cpu_has_avx512();
#pragma omp parallel if (rows > 1)
        {
          static thread_local std::vector<float> scratch;
          if (static_cast<int64_t>(scratch.size()) < vocab) scratch.resize(vocab);
#pragma omp for schedule(static)
          for (int64_t r = 0; r < rows; ++r) {
#ifdef REXRAG_HAVE_AVX512_BUILD
            if (avx512) {
              tok[r] = ops_avx512::sample_row(x + r * vocab, vocab, t[r], u[r], scratch.data(), lp + r);
              continue;
            }
#endif
            tok[r] = ops_generic::sample_row(x + r * vocab, vocab, t[r], u[r], scratch.data(), lp + r);
          }
        }
      },
      "Unchecked data pointers: call it through rexrag_fast.engine.cpu_fused.sample_rows.");
}

}  // namespace rexrag
