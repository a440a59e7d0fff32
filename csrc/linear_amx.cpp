// bf16 linear layers on AMX tiles for the CPU engine (rexrag_fast/engine/cpu_linear.py): y[M, N] = x[M, K] W^T
// (+ b) with W [N, K] packed once into the tiles' B layout. On a 2-core Xeon oneDNN's packed linear spends
// ~17 us a call before any work (dispatch, primitive lookup; 120 calls a SmolLM2 decode step), and at decode
// batch sizes the product is bound by reading W: this kernel streams W's packed tiles in order and costs one
// OpenMP region a call.
//
// Packed W: [N/16][K/32] tiles of 1 KB, tile (j, k) row i holding the pairs (W[16j + c, 32k + 2i],
// W[16j + c, 32k + 2i + 1]) for c = 0..15, so a column block's tiles are contiguous. N % 16 == 0 and
// K % 32 == 0 (callers fall back to oneDNN otherwise). x's rows go 16 at a time (the last block zero-padded
// through a copy), up to 4 row blocks per pass over W in result tiles 0-3; B in tile 4, A in tiles 5-7.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_isa.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace rexrag {

namespace {

constexpr int kColBlock = 16;  // columns of one tile
constexpr int kKBlock = 32;    // bf16 values of K per tile row (16 pairs)

// w [N, K] bf16 -> packed [N/16][K/32][16][32] bf16 (layout above).
void pack_weight(const uint16_t* w, uint16_t* packed, int64_t N, int64_t K) {
  const int64_t kb = K / kKBlock;
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < N / kColBlock; ++j) {
    for (int64_t k = 0; k < kb; ++k) {
      uint16_t* tile = packed + (j * kb + k) * kColBlock * kKBlock;
      for (int i = 0; i < kKBlock / 2; ++i) {
        for (int c = 0; c < kColBlock; ++c) {
          const uint16_t* src = w + (j * kColBlock + c) * K + k * kKBlock + 2 * i;
          tile[i * kKBlock + 2 * c] = src[0];
          tile[i * kKBlock + 2 * c + 1] = src[1];
        }
      }
    }
  }
}

#ifdef REXRAG_HAVE_AVX512_BUILD
REXRAG_AVX512_BF16_BEGIN

// y rows [r0, r0 + 16 * blocks) (of M), columns of column blocks [j0, j1): xp is x padded to whole row blocks.
void linear_pass(const uint16_t* xp, int64_t M, int64_t K, const uint16_t* wp, int64_t N, const uint16_t* bias,
                 uint16_t* y, int64_t r0, int blocks, int64_t j0, int64_t j1, float* cbuf) {
  const int64_t kb = K / kKBlock;
  const int64_t xstride = K * 2;  // bytes between rows of x
  const uint16_t* xr = xp + r0 * K;
  for (int64_t j = j0; j < j1; ++j) {
    const uint16_t* wt = wp + j * kb * kColBlock * kKBlock;
    _tile_zero(0);
    if (blocks > 1) _tile_zero(1);
    if (blocks > 2) _tile_zero(2);
    if (blocks > 3) _tile_zero(3);
    for (int64_t k = 0; k < kb; ++k) {
      _tile_loadd(4, wt + k * kColBlock * kKBlock, 64);
      const uint16_t* xa = xr + k * kKBlock;
      _tile_loadd(5, xa, xstride);
      _tile_dpbf16ps(0, 5, 4);
      if (blocks > 1) {
        _tile_loadd(6, xa + 16 * K, xstride);
        _tile_dpbf16ps(1, 6, 4);
      }
      if (blocks > 2) {
        _tile_loadd(7, xa + 32 * K, xstride);
        _tile_dpbf16ps(2, 7, 4);
      }
      if (blocks > 3) {
        _tile_loadd(5, xa + 48 * K, xstride);
        _tile_dpbf16ps(3, 5, 4);
      }
    }
    _tile_stored(0, cbuf, kColBlock * 4);
    if (blocks > 1) _tile_stored(1, cbuf + 256, kColBlock * 4);
    if (blocks > 2) _tile_stored(2, cbuf + 512, kColBlock * 4);
    if (blocks > 3) _tile_stored(3, cbuf + 768, kColBlock * 4);
    const int64_t rows = M - r0 < 16 * blocks ? M - r0 : 16 * blocks;
    __m512 b = _mm512_setzero_ps();  // the column block's bias in fp32, the same for every row
    if (bias != nullptr) {
      const __m256i b16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias + j * kColBlock));
      b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b16), 16));
    }
    for (int64_t r = 0; r < rows; ++r) {
      // acc + b rounded to nearest even (vcvtneps2bf16), as a bf16 matmul's output is
      const __m512 acc = _mm512_add_ps(_mm512_loadu_ps(cbuf + r * kColBlock), b);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (r0 + r) * N + j * kColBlock),
                          (__m256i)_mm512_cvtneps_pbh(acc));
    }
  }
}

void linear_amx(const uint16_t* x, int64_t M, int64_t K, const uint16_t* wp, int64_t N, const uint16_t* bias,
                uint16_t* y) {
  const int64_t Mp = (M + 15) / 16 * 16;
  static thread_local std::vector<uint16_t> pad;
  const uint16_t* xp = x;
  if (Mp != M) {
    if (pad.size() < static_cast<size_t>(Mp * K)) pad.resize(static_cast<size_t>(Mp * K));
    std::memcpy(pad.data(), x, static_cast<size_t>(M * K) * 2);
    std::memset(pad.data() + M * K, 0, static_cast<size_t>((Mp - M) * K) * 2);
    xp = pad.data();
  }
  const int64_t nb = N / kColBlock;
#pragma omp parallel
  {
#ifdef _OPENMP
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
#else
    const int64_t threads = 1, me = 0;
#endif
    const int64_t j0 = nb * me / threads, j1 = nb * (me + 1) / threads;
    alignas(64) float cbuf[4 * 16 * kColBlock];
    amx_tiles_begin();
    for (int64_t r0 = 0; r0 < M; r0 += 64) {
      const int blocks = static_cast<int>((M - r0 + 15) / 16 < 4 ? (M - r0 + 15) / 16 : 4);
      linear_pass(xp, M, K, wp, N, bias, y, r0, blocks, j0, j1, cbuf);
    }
    _tile_release();
  }
}

REXRAG_AVX512_END
#endif

}  // namespace

void bind_linear_amx(py::module_& m) {
  m.def("cpu_has_amx_bf16", &cpu_has_amx_bf16, "True when this CPU and the OS let the process use AMX-BF16 tiles.");
  m.def(
      "pack_linear_amx",
      [](uintptr_t w, uintptr_t packed, int64_t N, int64_t K) {
        if (N % kColBlock || K % kKBlock || N < 1 || K < 1) {
          throw std::invalid_argument("pack_linear_amx: weight [" + std::to_string(N) + ", " + std::to_string(K) +
                                      "] needs out_features % 16 == 0 and in_features % 32 == 0");
        }
        py::gil_scoped_release nogil;
        pack_weight(reinterpret_cast<const uint16_t*>(w), reinterpret_cast<uint16_t*>(packed), N, K);
      },
      "Unchecked data pointers: call it through rexrag_fast.engine.cpu_linear.PackedLinear.");
  m.def(
      "linear_amx",
      [](uintptr_t x, int64_t M, int64_t K, uintptr_t packed, int64_t N, uintptr_t bias, uintptr_t y) {
#ifdef REXRAG_HAVE_AVX512_BUILD
        if (!cpu_has_amx_bf16()) throw std::runtime_error("linear_amx: this CPU (or OS) does not run AMX-BF16");
        py::gil_scoped_release nogil;
        linear_amx(reinterpret_cast<const uint16_t*>(x), M, K, reinterpret_cast<const uint16_t*>(packed), N,
                   reinterpret_cast<const uint16_t*>(bias), reinterpret_cast<uint16_t*>(y));
#else
        (void)x, (void)M, (void)K, (void)packed, (void)N, (void)bias, (void)y;
        throw std::runtime_error("linear_amx: built without the x86-64 AVX-512 code");
#endif
      },
      "Unchecked data pointers: call it through rexrag_fast.engine.cpu_linear.PackedLinear.");
}

}  // namespace rexrag
