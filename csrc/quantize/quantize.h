#pragma once
// Nearest-bin quantizer and its inverse.
//
//   quantize:   z (N, D) float32, centers (D, K) float32 sorted rows -> codes (N, D)
//               codes[n, d] = index of the center of row d nearest to z[n, d]
//               (see nearest_bin.h for the exact rule).
//   dequantize: codes (N, D) + centers (D, K) -> z_hat (N, D) float32, z_hat = centers[d, code].
//
// Code types: uint8 (K <= 256), int16 (K <= 32768), int32 (K <= 65536).
#include <cstdint>

namespace jetfast {

enum class CodeType : int { kUInt8 = 0, kInt16 = 1, kInt32 = 2 };

constexpr int64_t kMaxDims = 4096;
constexpr int64_t kMaxBins = 65536;

// CPU. z may be strided (element strides); codes are C-contiguous (N, D).
// Returns the flat index n * D + d of a NaN in z, or -1 when there is none
// (codes at NaN positions are then unspecified).
int64_t quantize_cpu(const float* z, int64_t n, int64_t d, int64_t z_stride_n, int64_t z_stride_d,
                     const float* centers, int64_t k, void* codes, CodeType code_type, int num_threads);

// CPU. Codes must lie in [0, K); returns the flat index of one that does not, or -1.
int64_t dequantize_cpu(const void* codes, CodeType code_type, int64_t n, int64_t d, const float* centers,
                       int64_t k, float* z_hat, int num_threads);

#ifdef JETFAST_WITH_CUDA
// CUDA, launched on `stream` (the caller's current stream). All pointers are device
// pointers: table is a (D, P) float64 workspace, P = 2^search_levels(K); error_flag a
// single int32 set non-zero when a NaN (quantize) or an out-of-range code (dequantize)
// is met. Throws std::runtime_error when a launch fails.
void quantize_cuda(const float* z, int64_t n, int64_t d, int64_t z_stride_n, int64_t z_stride_d,
                   const float* centers, int64_t k, double* table, void* codes, CodeType code_type,
                   int32_t* error_flag, std::uintptr_t stream);
void dequantize_cuda(const void* codes, CodeType code_type, int64_t n, int64_t d, const float* centers, int64_t k,
                     float* z_hat, int32_t* error_flag, std::uintptr_t stream);
#endif

}  // namespace jetfast
