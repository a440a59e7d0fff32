// Run-time choice between the portable and the AVX-512 build of a CPU kernel file. Such a file includes its
// kernels twice, once as is and once between REXRAG_AVX512_BEGIN and REXRAG_AVX512_END (compiled for
// AVX-512 where the compiler can), and calls the second when cpu_has_avx512() says the CPU runs it (a third
// build between REXRAG_AVX512_BF16_BEGIN and REXRAG_AVX512_END where it also uses AVX-512-BF16, and AMX tiles
// where cpu_has_amx_bf16() says the CPU and the kernel allow them).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define REXRAG_HAVE_AVX512_BUILD 1
#define REXRAG_AVX512_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,fma,avx2,bmi2,f16c\")")
#define REXRAG_AVX512_BF16_BEGIN \
  _Pragma("GCC push_options")    \
      _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,fma,avx2,bmi2,f16c\")")
#define REXRAG_AVX512_END _Pragma("GCC pop_options")
#include <cpuid.h>
#include <cstdint>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace rexrag {

inline bool cpu_has_avx512() {
#ifdef REXRAG_HAVE_AVX512_BUILD
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

// AVX-512-BF16 (vdpbf16ps: bf16 pair products summed into fp32 lanes) on top of cpu_has_avx512().
inline bool cpu_has_avx512_bf16() {
#ifdef REXRAG_HAVE_AVX512_BUILD
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

#ifdef REXRAG_HAVE_AVX512_BUILD
// The AMX configuration both AMX kernels use (ldtilecfg's 64-byte operand, palette 1): all 8 tiles 16 rows of
// 64 bytes, so one tdpbf16ps is a 16 x 32 by 32 x 16 bf16 product (B as 16 rows of pairs) into 16 x 16 fp32.
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Loads AmxTileConfig on this thread (a thread's tile state is its own; oneDNN loads its own on the same threads).
__attribute__((target("amx-tile"))) inline void amx_tiles_begin() {
  static const AmxTileConfig cfg;
  _tile_loadconfig(&cfg);
}
#endif

// AMX-BF16 tiles (tdpbf16ps: a 16 x 32 by 32 x 16 bf16 product into a 16 x 16 fp32 tile) on top of
// cpu_has_avx512_bf16(): CPUID leaf 7 says the CPU has AMX-TILE and AMX-BF16, and Linux grants this process the
// tile state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA; without it a tile instruction faults). Asked once.
inline bool cpu_has_amx_bf16() {
#if defined(REXRAG_HAVE_AVX512_BUILD) && defined(__linux__) && defined(SYS_arch_prctl)
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!cpu_has_avx512_bf16() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;  // AMX-BF16, AMX-TILE
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace rexrag
