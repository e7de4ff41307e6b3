// AVX2 + FMA decode attention over a block of rows (head_dim = 8 * NV), for CPUs
// without AVX-512. Compiled with -mavx2 -mfma; decode_attention_cpu.cpp calls it
// only on CPUs that have both. The same two passes as the AVX-512 kernel, eight
// lanes wide: without it such CPUs ran the scalar loops, whose strict-order dot
// products the compiler cannot vectorise.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/decode_attention.h"
#include "common/avx2_vectors.h"

namespace jetfast {
namespace {

// Positions per visit of a row, as in the AVX-512 kernel: each query and running sum is
// loaded once per four positions.
constexpr int kPositions = 4;

template <int NV, int P, class T>
inline void score_positions(const DecodeAttentionProblem& p, int64_t rows, int64_t j, int64_t stride, float scale,
                            const float* const* q_rows, const T* const* k_rows, float* scores) {
  for (int64_t i = 0; i < rows; ++i) {
    __m256 query[NV];
    for (int v = 0; v < NV; ++v) query[v] = _mm256_loadu_ps(q_rows[i] + 8 * v);
    for (int u = 0; u < P; ++u) {
      const T* key = k_rows[i] + (j + u) * p.k_stride_s;
      __m256 dot = _mm256_mul_ps(load8(key), query[0]);
      for (int v = 1; v < NV; ++v) dot = _mm256_fmadd_ps(load8(key + 8 * v), query[v], dot);
      scores[(j + u) * stride + i] = horizontal_sum(dot) * scale;
    }
  }
}

template <int NV, int P, class T>
inline void accumulate_positions(const DecodeAttentionProblem& p, int64_t rows, int64_t j, int64_t stride,
                                 const T* const* v_rows, const float* weights, float* acc) {
  for (int64_t i = 0; i < rows; ++i) {
    float* a = acc + i * 8 * NV;
    __m256 sum[NV];
    for (int v = 0; v < NV; ++v) sum[v] = _mm256_loadu_ps(a + 8 * v);
    for (int u = 0; u < P; ++u) {
      const __m256 weight = _mm256_set1_ps(weights[(j + u) * stride + i]);
      const T* value = v_rows[i] + (j + u) * p.v_stride_s;
      for (int v = 0; v < NV; ++v) sum[v] = _mm256_fmadd_ps(weight, load8(value + 8 * v), sum[v]);
    }
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(a + 8 * v, sum[v]);
  }
}

template <int NV, class T>
void attend_rows(const DecodeAttentionProblem& p, const T* k_cache, const T* v_cache, int64_t row_begin,
                 int64_t row_end, float* scores, float* acc) {
  constexpr int64_t kDim = 8 * NV;
  const int64_t rows = row_end - row_begin, length = p.length, stride = (rows + 15) / 16 * 16;
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  std::vector<const float*> q_rows(rows);
  std::vector<const T*> k_rows(rows), v_rows(rows);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t b = (row_begin + i) / p.heads, h = (row_begin + i) % p.heads;
    q_rows[i] = p.q + b * p.q_stride_b + h * p.q_stride_h;
    k_rows[i] = k_cache + b * p.k_stride_b + h * p.k_stride_h;
    v_rows[i] = v_cache + b * p.v_stride_b + h * p.v_stride_h;
  }

  // Pass 1: scores[j][i] = q_i . k_ij / sqrt(Dh).
  int64_t first = 0;
  for (; first + kPositions <= length; first += kPositions)
    score_positions<NV, kPositions, T>(p, rows, first, stride, scale, q_rows.data(), k_rows.data(), scores);
  for (; first < length; ++first)
    score_positions<NV, 1, T>(p, rows, first, stride, scale, q_rows.data(), k_rows.data(), scores);

  // Softmax down each column, 8 rows per vector. The scratch is padded to 16 rows per
  // position, so whole vectors stay inside it; lanes past the block's rows hold scratch
  // values and are never read back. A NaN score never becomes the maximum but turns its
  // weight, hence the row, into NaN.
  std::vector<float> totals(stride);
  for (int64_t i = 0; i < rows; i += 8) {
    __m256 top = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < length; ++j) top = _mm256_max_ps(top, _mm256_loadu_ps(scores + j * stride + i));
    __m256 total = _mm256_setzero_ps();
    for (int64_t j = 0; j < length; ++j) {
      float* s = scores + j * stride + i;
      const __m256 w = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s), top));
      _mm256_storeu_ps(s, w);
      total = _mm256_add_ps(total, w);
    }
    _mm256_storeu_ps(totals.data() + i, total);
  }

  // Pass 2: acc_i += w_ij * v_ij.
  for (int64_t i = 0; i < rows * kDim; i += 8) _mm256_storeu_ps(acc + i, _mm256_setzero_ps());
  first = 0;
  for (; first + kPositions <= length; first += kPositions)
    accumulate_positions<NV, kPositions, T>(p, rows, first, stride, v_rows.data(), scores, acc);
  for (; first < length; ++first) accumulate_positions<NV, 1, T>(p, rows, first, stride, v_rows.data(), scores, acc);
  for (int64_t i = 0; i < rows; ++i) {
    const __m256 inverse = _mm256_set1_ps(1.0f / totals[i]);
    float* out = p.out + (row_begin + i) * kDim;
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + 8 * v, _mm256_mul_ps(_mm256_loadu_ps(acc + i * kDim + 8 * v), inverse));
  }
}

template <class T>
void attend_rows_typed(const DecodeAttentionProblem& p, const T* k, const T* v, int64_t row_begin, int64_t row_end,
                       float* scores, float* acc) {
  switch (p.head_dim / 8) {
    case 1: return attend_rows<1>(p, k, v, row_begin, row_end, scores, acc);
    case 2: return attend_rows<2>(p, k, v, row_begin, row_end, scores, acc);
    case 3: return attend_rows<3>(p, k, v, row_begin, row_end, scores, acc);
    case 4: return attend_rows<4>(p, k, v, row_begin, row_end, scores, acc);
    case 6: return attend_rows<6>(p, k, v, row_begin, row_end, scores, acc);
    case 8: return attend_rows<8>(p, k, v, row_begin, row_end, scores, acc);
    case 12: return attend_rows<12>(p, k, v, row_begin, row_end, scores, acc);
    case 16: return attend_rows<16>(p, k, v, row_begin, row_end, scores, acc);
    case 32: return attend_rows<32>(p, k, v, row_begin, row_end, scores, acc);
  }
}

}  // namespace

void attend_rows_avx2(const DecodeAttentionProblem& p, int64_t row_begin, int64_t row_end, float* scores,
                      float* acc) {
  const bool supported = avx2_head_dim_supported(p.head_dim);
  if (p.k_cache_bf16) {
    if (!supported) throw std::invalid_argument(std::string("bfloat16 caches need a head size of ") + kAvx2HeadDims);
    return attend_rows_typed(p, p.k_cache_bf16, p.v_cache_bf16, row_begin, row_end, scores, acc);
  }
  if (!supported) return attend_rows_scalar(p, row_begin, row_end, scores, acc);
  attend_rows_typed(p, p.k_cache, p.v_cache, row_begin, row_end, scores, acc);
}

}  // namespace jetfast
