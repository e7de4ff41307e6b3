#pragma once
// MKL's GEMMs for the decode step of large batches, borrowed at run time from a
// library this process has already loaded: packed SGEMM (cblas_sgemm_pack,
// cblas_sgemm_compute) in float32 and cblas_gemm_bf16bf16f32 in bfloat16.
//
// A cached decode multiplies the same weights by the same number of rows at every
// step. In float32 MKL can reorder a weight once into its GEMM kernel's own layout and
// compute from that, which saves the per-call reordering a plain GEMM pays (measured
// ~50-80 us per call at 100 rows). In bfloat16, on CPUs with bf16 units (AVX512-BF16,
// AMX), MKL's GEMM reads bfloat16 operands and sums in float32 at 0.8-1.3 TFLOP/s on
// 2 cores at 100 rows, 1.3-1.6x oneDNN's through PyTorch.
//
// jetfast links neither MKL nor libtorch, but PyTorch's CPU library carries MKL and
// exports its CBLAS: load_mkl_gemm resolves these functions from it (opened with
// RTLD_NOLOAD, so never a second copy), and MKL then runs on the same OpenMP threads
// as PyTorch's own GEMMs. Where the library lacks them (a PyTorch built without MKL)
// nothing is loaded and callers keep their other path.
#include <cstdint>
#include <string>

namespace jetfast {

// Resolve the functions from the already-loaded shared library at `path`; true if the
// packed SGEMM was found (the bf16 GEMM is optional: has_mkl_bf16_gemm). Idempotent.
bool load_mkl_gemm(const std::string& path);
bool has_mkl_packed_sgemm();
bool has_mkl_bf16_gemm();

// Floats of a weight w (out, in) packed as the B operand of x w^T for exactly `rows` rows.
int64_t packed_weight_floats(int64_t rows, int64_t out, int64_t in);
// Pack w (out, in), row-major, into `packed` (packed_weight_floats of them).
void pack_weight(const float* w, int64_t rows, int64_t out, int64_t in, float* packed);
// y (rows, out) = x (rows, in) w^T + beta * y, with w packed for `rows` by pack_weight.
void packed_sgemm(const float* x, const float* packed, float* y, int64_t rows, int64_t out, int64_t in, float beta);
// y (rows, out) = x (rows, in) w^T + beta * y with x and w (out, in) bfloat16 (uint16 bits), sums
// and y float32.
void bf16_gemm(const uint16_t* x, const uint16_t* w, float* y, int64_t rows, int64_t out, int64_t in, float beta);

}  // namespace jetfast
