// Elementwise parts of a decoder layer fused for the CPU engine (rexrag_fast/engine/cpu_fused.py): per layer
// they replace ~20 small torch ops, whose dispatch dominated a decode step once the matmuls and attention
// were fast. Rounding follows the torch composition they replace: every bf16 result is the fp32 result
// rounded to nearest even, in the same places as the torch ops round (each product and sum of rope); this
// file is built with -ffp-contract=off so that no product and sum fuse into one FMA rounding.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace rexrag {

namespace {

inline float bf16_load(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t bf16_store(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Element access in the tensor's dtype; rnd(x) is x rounded to that dtype (identity for fp32).
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static float load(float v) { return v; }
  static float store(float v) { return v; }
  static float rnd(float v) { return v; }
};
template <>
struct Elem<uint16_t> {
  static float load(uint16_t v) { return bf16_load(v); }
  static uint16_t store(float v) { return bf16_store(v); }
  static float rnd(float v) { return bf16_load(bf16_store(v)); }
};

// qkv [T, (H + 2 KV) * D] -> q [T, H, D] roped; K roped into k_cache [blocks, KV, D, bs] and V into
// v_cache [blocks, bs, KV, D] at slots[t]. rope(x)_i = x_i cos_i - x_{i+D/2} sin_i for i < D/2,
// x_i cos_i + x_{i-D/2} sin_i above (cos, sin [P, D] tables, rows positions[t]).
template <typename T>
void rope_write_kv_typed(const T* qkv, const int64_t* positions, const T* cos, const T* sin, const int64_t* slots,
                         T* q_out, T* k_cache, T* v_cache, int64_t tokens, int heads, int kv_heads, int head_dim,
                         int block_size) {
  using E = Elem<T>;
  const int D = head_dim, half = D / 2, width = (heads + 2 * kv_heads) * D;
#pragma omp parallel for schedule(static) if (tokens >= 64)
  for (int64_t t = 0; t < tokens; ++t) {
    const T* row = qkv + t * width;
    const T* c = cos + positions[t] * D;
    const T* s = sin + positions[t] * D;
    const int64_t block = slots[t] / block_size, r = slots[t] % block_size;
    for (int h = 0; h < heads + kv_heads; ++h) {
      const T* x = row + h * D;
      for (int i = 0; i < D; ++i) {
        const float xi = E::load(x[i]);
        const float other = i < half ? -E::load(x[i + half]) : E::load(x[i - half]);
        const float y = E::rnd(E::rnd(xi * E::load(c[i])) + E::rnd(other * E::load(s[i])));
        if (h < heads) {
          q_out[(t * heads + h) * D + i] = E::store(y);
        } else {
          const int64_t kvh = h - heads;
          k_cache[((block * kv_heads + kvh) * D + i) * block_size + r] = E::store(y);
        }
      }
    }
    const T* v = row + (heads + kv_heads) * D;
    std::memcpy(v_cache + ((block * block_size + r) * kv_heads) * D, v, sizeof(T) * kv_heads * D);
  }
}

// x [T, hidden] (+= delta [T, hidden] first, rounded, when delta is given); out = w * rnd(x * rsqrt(mean(x^2)
// + eps)), the mean and the scaling in fp32.
template <typename T>
void add_rms_norm_typed(T* x, const T* delta, const T* w, T* out, int64_t tokens, int hidden, float eps) {
  using E = Elem<T>;
#pragma omp parallel for schedule(static) if (tokens >= 64)
  for (int64_t t = 0; t < tokens; ++t) {
    T* xr = x + t * hidden;
    if (delta != nullptr) {
      const T* dr = delta + t * hidden;
      for (int i = 0; i < hidden; ++i) xr[i] = E::store(E::load(xr[i]) + E::load(dr[i]));
    }
    float sq = 0.0f;
    for (int i = 0; i < hidden; ++i) {
      const float v = E::load(xr[i]);
      sq += v * v;
    }
    const float inv = 1.0f / std::sqrt(sq / static_cast<float>(hidden) + eps);
    T* o = out + t * hidden;
    for (int i = 0; i < hidden; ++i) o[i] = E::store(E::load(w[i]) * E::rnd(E::load(xr[i]) * inv));
  }
}

bool is_bf16(int code) {
  if (code != 0 && code != 1) {
    throw std::invalid_argument("dtype: expected 0 (float32) or 1 (bfloat16), got " + std::to_string(code));
  }
  return code == 1;
}

}  // namespace

void bind_decoder_ops(py::module_& m) {
  m.def(
      "rope_write_kv",
      [](uintptr_t qkv, uintptr_t positions, uintptr_t cos, uintptr_t sin, uintptr_t slots, uintptr_t q_out,
         uintptr_t k_cache, uintptr_t v_cache, int dtype, int64_t tokens, int heads, int kv_heads, int head_dim,
         int block_size) {
        py::gil_scoped_release nogil;
        auto p64 = [](uintptr_t p) { return reinterpret_cast<const int64_t*>(p); };
        if (is_bf16(dtype)) {
          using T = uint16_t;
          rope_write_kv_typed(reinterpret_cast<const T*>(qkv), p64(positions), reinterpret_cast<const T*>(cos),
                              reinterpret_cast<const T*>(sin), p64(slots), reinterpret_cast<T*>(q_out),
                              reinterpret_cast<T*>(k_cache), reinterpret_cast<T*>(v_cache), tokens, heads,
                              kv_heads, head_dim, block_size);
        } else {
          using T = float;
          rope_write_kv_typed(reinterpret_cast<const T*>(qkv), p64(positions), reinterpret_cast<const T*>(cos),
                              reinterpret_cast<const T*>(sin), p64(slots), reinterpret_cast<T*>(q_out),
                              reinterpret_cast<T*>(k_cache), reinterpret_cast<T*>(v_cache), tokens, heads,
                              kv_heads, head_dim, block_size);
        }
      },
      "Unchecked data pointers: call it through rexrag_fast.engine.cpu_fused.rope_write_kv.");
  m.def(
      "add_rms_norm",
      [](uintptr_t x, uintptr_t delta, uintptr_t w, uintptr_t out, int dtype, int64_t tokens, int hidden,
         float eps) {
        py::gil_scoped_release nogil;
        if (is_bf16(dtype)) {
          using T = uint16_t;
          add_rms_norm_typed(reinterpret_cast<T*>(x), reinterpret_cast<const T*>(delta),
                             reinterpret_cast<const T*>(w), reinterpret_cast<T*>(out), tokens, hidden, eps);
        } else {
          using T = float;
          add_rms_norm_typed(reinterpret_cast<T*>(x), reinterpret_cast<const T*>(delta),
                             reinterpret_cast<const T*>(w), reinterpret_cast<T*>(out), tokens, hidden, eps);
        }
      },
      "Unchecked data pointers: call it through rexrag_fast.engine.cpu_fused.add_rms_norm.");
}

}  // namespace rexrag
