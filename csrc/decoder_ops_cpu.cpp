// Elementwise parts of a decoder step fused for the CPU engine (rexrag_fast/engine/cpu_fused.py): per layer
// rope + K/V write and residual add + RMSNorm replace ~20 small torch ops, whose dispatch dominated a decode
// step once the matmuls and attention were fast; per step the sampler replaces log_softmax, argmax, the
// top-k / top-p sort and torch.multinomial over the vocabulary (in torch ~1 ms a row at 49k tokens, ~4 ms
// with top-p). Rounding follows the torch composition they replace: every bf16 result is the fp32 result
// rounded to nearest even where the torch ops round (each product and sum of rope); this file is built
// with -ffp-contract=off so that no product and sum fuse into one FMA rounding.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cpu_isa.h"

namespace py = pybind11;

namespace rexrag {

// Top-k / top-p truncation of one row for sample_row (scalar code, shared by both builds). Order the tokens
// by descending probability, equal ones by ascending index (the order of a stable descending sort; torch.sort
// leaves the order of ties unspecified). Both rules keep a prefix of that order, so the two together keep the
// shorter prefix, which is what top-p on the top-k-truncated (unrenormalised) probabilities keeps:
//   top-k: the tokens with p >= the k-th largest p (all its ties);
//   top-p: a token stays iff the mass of the tokens before it is < top_p (the first always stays).
// The prefix is given by its last token: i is kept iff e[i] > value, or e[i] == value and i <= index.
struct Cut {
  float value;
  int64_t index;
};

// Per-thread buffers of sample_row.
struct SampleScratch {
  std::vector<float> e;                          // exp((x - max) / T) of the row [V]
  std::vector<uint32_t> count;                   // tokens per bucket of e
  std::vector<double> mass;                      // sum of e per bucket
  std::vector<std::pair<float, int64_t>> bucket;  // (e, index) of the bucket holding the cut
};

// Buckets of e in [0, 1] by its float bits (8 exponent bits, 4 mantissa bits): monotone in e, 1/16 of an
// octave wide; bucket 0 holds exactly the zeros (the kernel flushes terms below e^-87, a normal float).
constexpr int kBucketShift = 19;
constexpr uint32_t kBuckets = (0x3f800000u >> kBucketShift) + 1;

inline uint32_t bucket_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits >> kBucketShift;
}

// e [V] with maximum 1; p = e / sum(e). Instead of sorting the vocabulary: one pass counts tokens and mass
// (in double) per bucket, the scan from the top stops at the first bucket where either rule has what it keeps
// (every token above it is kept by both), and only that bucket is sorted to place the cut.
// Returns value -1 when nothing drawable is cut.
inline Cut truncation_cut(const float* e, int64_t V, int64_t top_k, float top_p, SampleScratch& s) {
  const bool by_k = top_k > 0 && top_k < V;
  const bool by_p = top_p < 1.0f;
  if (!by_k && !by_p) return {-1.0f, V};
  s.count.assign(kBuckets, 0);
  s.mass.assign(kBuckets, 0.0);
  for (int64_t i = 0; i < V; ++i) {
    const uint32_t b = bucket_of(e[i]);
    ++s.count[b];
    s.mass[b] += e[i];
  }
  double total = 0.0;
  for (uint32_t j = 1; j < kBuckets; ++j) total += s.mass[j];
  const double target = static_cast<double>(top_p) * total;  // top_p in units of e
  int64_t above = 0;
  double mass_above = 0.0;
  uint32_t b = kBuckets - 1;
  for (; b > 0; --b) {
    if ((by_k && above + s.count[b] >= top_k) || (by_p && mass_above + s.mass[b] >= target)) break;
    above += s.count[b];
    mass_above += s.mass[b];
  }
  if (b == 0) return {-1.0f, V};  // fewer than k nonzero terms, or rounding kept the mass below top_p
  s.bucket.clear();
  for (int64_t i = 0; i < V; ++i) {
    if (bucket_of(e[i]) == b) s.bucket.emplace_back(e[i], i);
  }
  std::sort(s.bucket.begin(), s.bucket.end(), [](const std::pair<float, int64_t>& a,
                                                  const std::pair<float, int64_t>& c) {
    return a.first > c.first || (a.first == c.first && a.second < c.second);
  });
  const int64_t n = static_cast<int64_t>(s.bucket.size());
  int64_t last = n - 1;
  if (by_k && above + n >= top_k) {
    last = top_k - above - 1;  // the k-th largest, then its ties
    while (last + 1 < n && s.bucket[last + 1].first == s.bucket[last].first) ++last;
  }
  if (by_p) {
    double mass = mass_above;  // the last kept token is the first whose inclusive mass reaches top_p
    for (int64_t j = 0; j < last; ++j) {
      mass += s.bucket[j].first;
      if (mass >= target) {
        last = j;
        break;
      }
    }
  }
  return {s.bucket[last].first, s.bucket[last].second};
}

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
      [](uintptr_t logits, int64_t rows, int64_t vocab, uintptr_t temps, uintptr_t uniforms, uintptr_t top_ks,
         uintptr_t top_ps, uintptr_t tokens, uintptr_t logprobs, uintptr_t kept) {
        py::gil_scoped_release nogil;
        const float* x = cptr<float>(logits);
        const float* t = cptr<float>(temps);
        const float* u = cptr<float>(uniforms);
        const int64_t* k = cptr<int64_t>(top_ks);
        const float* p = cptr<float>(top_ps);
        int64_t* tok = mptr<int64_t>(tokens);
        float* lp = mptr<float>(logprobs);
        float* kp = mptr<float>(kept);  // null: not asked for
        const bool avx512 = cpu_has_avx512();
#pragma omp parallel if (rows > 1)
        {
          static thread_local SampleScratch scratch;
          if (static_cast<int64_t>(scratch.e.size()) < vocab) scratch.e.resize(vocab);
#pragma omp for schedule(static)
          for (int64_t r = 0; r < rows; ++r) {
            float* kr = kp == nullptr ? nullptr : kp + r * vocab;
#ifdef REXRAG_HAVE_AVX512_BUILD
            if (avx512) {
              tok[r] = ops_avx512::sample_row(x + r * vocab, vocab, t[r], u[r], k[r], p[r], scratch, kr, lp + r);
              continue;
            }
#endif
            tok[r] = ops_generic::sample_row(x + r * vocab, vocab, t[r], u[r], k[r], p[r], scratch, kr, lp + r);
          }
        }
      },
      "Unchecked data pointers: call it through rexrag_fast.engine.cpu_fused.sample_rows.");
}

}  // namespace rexrag
