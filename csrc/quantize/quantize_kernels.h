#pragma once
// Row-block kernels of the CPU quantizer, one per instruction set. The AVX-512
// kernels live in their own translation unit, compiled with -mavx512*, and are
// called only after a runtime CPU check.
#include <cstdint>

namespace jetfast {

struct SearchTables {
  const double* exact;     // (D, P) float64 Eytzinger tables, see nearest_bin.h
  const float* rounded;    // (D, P) the same entries rounded down to float32 (AVX-512 path)
  int64_t dims;
  int levels;
};

// Each kernel quantizes rows [row_begin, row_end) of z (row stride stride_n, unit
// column stride) and returns the flat index of a NaN it met, or -1.
#define JETFAST_DECLARE_AVX512_KERNEL(Code)                                                                     \
  int64_t quantize_rows_avx512(const float* z, int64_t row_begin, int64_t row_end, int64_t stride_n,            \
                               const SearchTables& tables, Code* codes);
JETFAST_DECLARE_AVX512_KERNEL(uint8_t)
JETFAST_DECLARE_AVX512_KERNEL(int16_t)
JETFAST_DECLARE_AVX512_KERNEL(int32_t)
#undef JETFAST_DECLARE_AVX512_KERNEL

}  // namespace jetfast
