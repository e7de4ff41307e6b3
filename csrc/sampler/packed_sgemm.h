#pragma once
// MKL's packed SGEMM (cblas_sgemm_pack, cblas_sgemm_compute) for the decode step of
// large batches, borrowed at run time from a library this process has already loaded.
//
// A cached decode multiplies the same weights by the same number of rows at every
// step. MKL can reorder a weight once into its GEMM kernel's own layout and compute
// from that, which saves the per-call reordering a plain GEMM pays (measured ~50-80
// us per call at 100 rows). jetfast links neither MKL nor libtorch, but PyTorch's CPU
// library carries MKL and exports its CBLAS: load_packed_sgemm resolves these
// functions from it (opened with RTLD_NOLOAD, so never a second copy), and MKL then
// runs on the same OpenMP threads as PyTorch's own GEMMs. Where the library lacks
// them (a PyTorch built without MKL) nothing is loaded and callers keep their other path.
#include <cstdint>
#include <string>

namespace jetfast {

// Resolve the functions from the already-loaded shared library at `path`; true on
// success. Idempotent; false leaves packed_sgemm_available() as it was.
bool load_packed_sgemm(const std::string& path);
bool packed_sgemm_available();

// Floats of a weight w (out, in) packed as the B operand of x w^T for exactly `rows` rows.
int64_t packed_weight_floats(int64_t rows, int64_t out, int64_t in);
// Pack w (out, in), row-major, into `packed` (packed_weight_floats of them).
void pack_weight(const float* w, int64_t rows, int64_t out, int64_t in, float* packed);
// y (rows, out) = x (rows, in) w^T + beta * y, with w packed for `rows` by pack_weight.
void packed_sgemm(const float* x, const float* packed, float* y, int64_t rows, int64_t out, int64_t in, float beta);

}  // namespace jetfast
