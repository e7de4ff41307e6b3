#pragma once
// The Transformer blocks of one cached decode step on the CPU, fused: for a few
// sequences (the sampler at batch 1..15) the step is a chain of matrix-vector
// products over 12.6 MB of weights (default model) with a few thousand other
// FLOPs in between, and calling ~40 framework ops for it from Python costs more
// than the arithmetic. Here a step is one call.
//
// Per block, on x (B, C), the residual stream, exactly as GPT's Block.decode_step:
//
//   h   = LayerNorm_1(x)
//   qkv = h W_qkv^T + b_qkv                      (B, 3C); k, v written to the cache at pos
//   y   = attention(q, K[:pos+1], V[:pos+1])     (decode_attention_cpu)
//   x  += y W_proj^T + b_proj
//   h   = LayerNorm_2(x)
//   x  += GELU(h W_fc^T + b_fc) W_out^T + b_out   (exact erf GELU)
//
// Weights are nn.Linear's (out, in), row-major; caches are the model's storage,
// positions outermost: (S_max, B, H, Dh), contiguous. The residual stream, layer
// norms, biases, activations and every sum are float32; the four weight matrices and
// the caches are float32, or with `bf16` bfloat16 (stored as uint16): read, widened
// to float32 and multiplied there, the keys and values rounded to bfloat16 (to
// nearest even) as they are cached. bf16 needs AVX2 + FMA (cpu_has_avx2_fma()).
//
// Floor at batch 1: every weight is read once per step, 12.6 MB for the default
// model; from DRAM (~20 GB/s) 0.63 ms, from L3 (where 12.6 MB may stay between steps)
// less. In bf16 6.3 MB, which an 8 MB L3 holds.
//
// From ~16 sequences on the products are GEMMs, not matrix-vector rows: with `gemm`
// they are MKL's (mkl_gemm.h), in float32 on the four weights of each block packed for
// the batch, in bfloat16 on the bf16 weights as they are, with the layer inputs rounded
// to bfloat16 and float32 sums, 512 rows at a time (decode_blocks_cpu.cpp). What lies between them (layer norms with the next bias
// broadcast, the GELU, the cache append) is one pass each over the rows, split over the
// threads. The step then costs the GEMMs, the attention and ~8 short passes per block:
// the ~70 framework calls per step from Python that it replaces cost ~1 ms, which a
// batch of 100 pays per 100 jets and a batch of 512 per 512.
#include <cstdint>
#include <cstring>
#include <vector>

namespace jetfast {

struct DecodeBlock {
  const float *ln1_weight, *ln1_bias;
  const void* qkv_weight;
  const float* qkv_bias;
  const void* proj_weight;
  const float *proj_bias, *ln2_weight, *ln2_bias;
  const void* fc_weight;
  const float* fc_bias;
  const void* out_weight;
  const float* out_bias;  // biases may be null
  void *k_cache, *v_cache;  // (S_max, B, H, Dh)
  float ln1_eps, ln2_eps;
  // With DecodeShape::gemm in float32: the four weights packed for the batch (pack_weight).
  const float *qkv_packed = nullptr, *proj_packed = nullptr, *fc_packed = nullptr, *out_packed = nullptr;
};

struct DecodeShape {
  int64_t batch, width, heads, head_dim, hidden, max_len;
  bool bf16;  // weights and caches in bfloat16
  bool gemm;  // products as MKL's GEMMs (float32: on DecodeBlock::*_packed)
};

// float32 -> bfloat16 bits, rounded to nearest even as PyTorch rounds; NaN stays a (quiet) NaN.
inline uint16_t to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Floats of scratch decode_blocks_cpu needs.
int64_t decode_blocks_scratch(const DecodeShape& shape);

// Run every block on x (batch, width) in place for the token at position pos.
void decode_blocks_cpu(const DecodeShape& shape, const std::vector<DecodeBlock>& blocks, float* x, int64_t pos,
                       float* scratch, int num_threads);

// y[b, r] (+)= bias[r] + sum_i w[r, i] x[b, i] for rows r in [row_begin, row_end); x is (batch, in),
// y (batch, ldy). With accumulate the result is added to y, else it replaces it. The _bf16
// version reads bfloat16 weights.
void linear_rows_scalar(const float* w, const float* bias, const float* x, float* y, int64_t batch, int64_t in,
                        int64_t ldy, int64_t row_begin, int64_t row_end, bool accumulate);
#if defined(JETFAST_HAVE_AVX2_KERNELS)
// Rows [row_begin, row_end) of x (., width): out = LayerNorm(x) (PyTorch's: biased variance, eps
// inside the square root), float32 sums, eight lanes.
void layer_norm_rows_avx2(const float* x, const float* weight, const float* bias, float eps, float* out,
                          int64_t row_begin, int64_t row_end, int64_t width);
// y = GELU(y) on n floats: 0.5 y (1 + erf(y / sqrt 2)) with erf as PyTorch's vectorised CPU kernel
// computes it (Abramowitz and Stegun 7.1.26, |error| < 1.5e-7).
void gelu_avx2(float* y, int64_t n);
// n floats to bfloat16 bits, as to_bf16.
void to_bf16_avx2(const float* src, uint16_t* dst, int64_t n);
void linear_rows_avx2_bf16(const uint16_t* w, const float* bias, const float* x, float* y, int64_t batch,
                           int64_t in, int64_t ldy, int64_t row_begin, int64_t row_end, bool accumulate);
void linear_rows_avx2(const float* w, const float* bias, const float* x, float* y, int64_t batch, int64_t in,
                      int64_t ldy, int64_t row_begin, int64_t row_end, bool accumulate);
#endif

}  // namespace jetfast
