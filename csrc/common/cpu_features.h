#pragma once
// Run-time CPU feature checks. Kernels in *_avx512.cpp (*_avx2.cpp) files are compiled with
// AVX-512 (AVX2 + FMA) flags (CMakeLists.txt) and only called when this says the CPU has them.

namespace jetfast {

inline bool cpu_has_avx512() {
#if defined(JETFAST_HAVE_AVX512_KERNELS)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

inline bool cpu_has_avx2_fma() {
#if defined(JETFAST_HAVE_AVX2_KERNELS)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace jetfast
