#pragma once
// Decode attention on the CPU: one query per (sequence, head) against the cached
// keys and values of positions [0, length).
//
//   out[b, h] = softmax(q[b, h] . K[b, h, :length]^T / sqrt(Dh)) . V[b, h, :length]
//
// Memory-bound: each call streams 2 * B * H * length * Dh * 4 bytes of cache at
// 4 FLOP per 8 bytes, so the floor is that traffic over the read bandwidth
// (B*H = 4096, length 64, Dh 32: 67 MB, ~1.9 ms at 35 GB/s). Positions at or past
// `length` are never read.
//
// Caches may have any strides as long as Dh is contiguous. Rows are processed in
// blocks, position by position. The model's cache stores positions outermost,
// (S, B, H, Dh), so a step's prefix is one contiguous stream with no gaps between
// rows; a contiguous (B, H, S, Dh) cache is read in blocks of a few rows, each a
// stream of its own.
#include <cstdint>

namespace jetfast {

struct DecodeAttentionProblem {
  const float* q;  // q[b * q_stride_b + h * q_stride_h + d]
  int64_t q_stride_b, q_stride_h;
  const float* k_cache;  // k_cache[b * k_stride_b + h * k_stride_h + s * k_stride_s + d]
  int64_t k_stride_b, k_stride_h, k_stride_s;
  const float* v_cache;
  int64_t v_stride_b, v_stride_h, v_stride_s;
  int64_t batch, heads, head_dim, length;
  float* out;  // contiguous (batch, heads, head_dim)
  // Caches of bfloat16 values (uint16) in place of k_cache and v_cache (null), with the same
  // strides: the AVX2 kernel only (attend_rows_avx2), which widens them to float32 as it reads.
  const uint16_t* k_cache_bf16 = nullptr;
  const uint16_t* v_cache_bf16 = nullptr;
  // A step's new keys and values (float32 caches only), or null: k_new[b * new_stride_b + h *
  // new_stride_h + d], written into the caches at position length - 1 before that row attends.
  // Each thread writes the rows it attends, so a model's step appends and attends in one call
  // (two indexed copies fewer per layer from Python, which cost more than the copy at small batches).
  const float* k_new = nullptr;
  const float* v_new = nullptr;
  int64_t new_stride_b = 0, new_stride_h = 0;
};

void decode_attention_cpu(const DecodeAttentionProblem& problem, int num_threads);

// Head sizes the AVX2 kernel is unrolled for (eight floats per vector), the only ones it reads
// bfloat16 caches at; kAvx2HeadDims names them for error messages.
inline bool avx2_head_dim_supported(int64_t head_dim) {
  const int64_t v = head_dim / 8;
  return head_dim % 8 == 0 && v >= 1 && (v <= 4 || v == 6 || v == 8 || v == 12 || v == 16 || v == 32);
}
constexpr const char* kAvx2HeadDims = "8, 16, 24, 32, 48, 64, 96, 128 or 256";

// One block: rows [row_begin, row_end) of the problem (row r = b * heads + h).
// Scratch: `scores` holds length * n16 floats, laid out [position][row] with n16
// the row count n rounded up to 16; `acc` holds n * head_dim.
void attend_rows_scalar(const DecodeAttentionProblem& p, int64_t row_begin, int64_t row_end, float* scores,
                        float* acc);
#if defined(JETFAST_HAVE_AVX2_KERNELS)
// AVX2 + FMA versions for head_dim a multiple of 8, up to 256 (CPUs without AVX-512).
void attend_rows_avx2(const DecodeAttentionProblem& p, int64_t row_begin, int64_t row_end, float* scores, float* acc);
#endif
#if defined(JETFAST_HAVE_AVX512_KERNELS)
// AVX-512 versions for head_dim a multiple of 16, up to 256.
void attend_rows_avx512(const DecodeAttentionProblem& p, int64_t row_begin, int64_t row_end, float* scores,
                        float* acc);
#endif

}  // namespace jetfast
