// CUDA quantizer: one thread per element, the search shared with the CPU path
// through nearest_bin.h. Launched on the caller's stream; launch errors are thrown.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "quantize/nearest_bin.h"
#include "quantize/quantize.h"

namespace jetfast {
namespace {

constexpr int kThreads = 256;

void check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 16 ? blocks : 65535 * 16);  // grid-stride loops cover the rest
}

__global__ void build_table_kernel(const float* __restrict__ centers, int64_t d, int64_t k, int levels,
                                   double* __restrict__ table) {
  const int64_t p = int64_t{1} << levels;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < d * p; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t dim = i / p;
    table[i] = search_table_entry(centers + dim * k, static_cast<int>(k), levels, static_cast<int>(i % p));
  }
}

template <class Code>
__global__ void quantize_kernel(const float* __restrict__ z, int64_t n, int64_t d, int64_t stride_n, int64_t stride_d,
                                const double* __restrict__ table, int levels, Code* __restrict__ codes,
                                int32_t* __restrict__ error_flag) {
  const int64_t p = int64_t{1} << levels;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n * d; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / d, dim = i % d;
    const float value = z[row * stride_n + dim * stride_d];
    if (value != value) *error_flag = 1;
    codes[i] = static_cast<Code>(nearest_bin_scalar(table + dim * p, levels, value));
  }
}

template <class Code>
__global__ void dequantize_kernel(const Code* __restrict__ codes, int64_t n, int64_t d,
                                  const float* __restrict__ centers, int64_t k, float* __restrict__ z_hat,
                                  int32_t* __restrict__ error_flag) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n * d; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t code = static_cast<int64_t>(codes[i]);
    if (code < 0 || code >= k) {
      *error_flag = 1;
      z_hat[i] = __int_as_float(0x7fc00000);  // NaN
    } else {
      z_hat[i] = centers[(i % d) * k + code];
    }
  }
}

}  // namespace

void quantize_cuda(const float* z, int64_t n, int64_t d, int64_t z_stride_n, int64_t z_stride_d,
                   const float* centers, int64_t k, double* table, void* codes, CodeType code_type,
                   int32_t* error_flag, std::uintptr_t stream_handle) {
  if (n == 0 || d == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int levels = search_levels(static_cast<int>(k));
  const int64_t p = int64_t{1} << levels;
  build_table_kernel<<<grid_for(d * p), kThreads, 0, stream>>>(centers, d, k, levels, table);
  check_launch("quantize: building the search table");
  const int grid = grid_for(n * d);
  switch (code_type) {
    case CodeType::kUInt8:
      quantize_kernel<<<grid, kThreads, 0, stream>>>(z, n, d, z_stride_n, z_stride_d, table, levels,
                                                     static_cast<uint8_t*>(codes), error_flag);
      break;
    case CodeType::kInt16:
      quantize_kernel<<<grid, kThreads, 0, stream>>>(z, n, d, z_stride_n, z_stride_d, table, levels,
                                                     static_cast<int16_t*>(codes), error_flag);
      break;
    case CodeType::kInt32:
      quantize_kernel<<<grid, kThreads, 0, stream>>>(z, n, d, z_stride_n, z_stride_d, table, levels,
                                                     static_cast<int32_t*>(codes), error_flag);
      break;
  }
  check_launch("quantize");
}

void dequantize_cuda(const void* codes, CodeType code_type, int64_t n, int64_t d, const float* centers, int64_t k,
                     float* z_hat, int32_t* error_flag, std::uintptr_t stream_handle) {
  if (n == 0 || d == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int grid = grid_for(n * d);
  switch (code_type) {
    case CodeType::kUInt8:
      dequantize_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint8_t*>(codes), n, d, centers, k, z_hat,
                                                       error_flag);
      break;
    case CodeType::kInt16:
      dequantize_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const int16_t*>(codes), n, d, centers, k, z_hat,
                                                       error_flag);
      break;
    case CodeType::kInt32:
      dequantize_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const int32_t*>(codes), n, d, centers, k, z_hat,
                                                       error_flag);
      break;
  }
  check_launch("dequantize");
}

}  // namespace jetfast
