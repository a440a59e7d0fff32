// Run-time choice between the portable and the AVX-512 build of a CPU kernel file. Such a file includes its
// kernels twice, once as is and once between REXRAG_AVX512_BEGIN and REXRAG_AVX512_END (compiled for
// AVX-512 where the compiler can), and calls the second when cpu_has_avx512() says the CPU runs it (a third
// build between REXRAG_AVX512_BF16_BEGIN and REXRAG_AVX512_END where it also uses AVX-512-BF16).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define REXRAG_HAVE_AVX512_BUILD 1
#define REXRAG_AVX512_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,fma,avx2,bmi2,f16c\")")
#define REXRAG_AVX512_BF16_BEGIN \
  _Pragma("GCC push_options")    \
      _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2,bmi2,f16c\")")
#define REXRAG_AVX512_END _Pragma("GCC pop_options")
#include <immintrin.h>
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

}  // namespace rexrag
