// AVX-512 decode attention over a block of rows (head_dim = 16 * NV). Compiled
// with AVX-512 flags; decode_attention_cpu.cpp calls it only on CPUs that have them.
//
// Per position and row: NV loads and FMAs plus one horizontal sum for the score,
// NV FMAs for the value sum; about 10 instructions per 64 bytes of cache, well
// below what the memory system delivers, so the loops run at streaming bandwidth.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "attention/decode_attention.h"

namespace jetfast {
namespace {

// exp(x) for x <= 0 (scores minus their maximum), ~1 ulp: x = n ln2 + r with
// |r| <= ln2/2, a degree-6 polynomial for exp(r), then scale by 2^n. Below
// -87.3 the result underflows to 0 through scalef, as expf does.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
  const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  // Keeps n finite (exp(-104) is 0 in float32). Operand order matters: vmaxps
  // returns its second operand when one is NaN, so a NaN score stays NaN.
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 poly = _mm512_set1_ps(1.3981999507e-3f);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(8.3334519073e-3f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(4.1665795894e-2f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.6666665459e-1f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 r2 = _mm512_mul_ps(r, r);
  poly = _mm512_fmadd_ps(poly, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(poly, n);
}

inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
}

// Positions per visit of a row: each query and each row's running sums are then
// loaded once per four positions. Measured on 2 Zen 4 cores (B*H = 4096, Dh = 32):
// 35 GB/s of cache read, against 22 GB/s one position at a time, whose extra
// loads of queries and sums (a block's do not fit in L1) hold up the stream.
constexpr int kPositions = 4;

// scores[(j + u) * stride + i] for u < P and every row i of the block.
template <int NV, int P>
inline void score_positions(const DecodeAttentionProblem& p, int64_t rows, int64_t j, int64_t stride, float scale,
                            const float* const* q_rows, const float* const* k_rows, float* scores) {
  for (int64_t i = 0; i < rows; ++i) {
    __m512 query[NV];
    for (int v = 0; v < NV; ++v) query[v] = _mm512_loadu_ps(q_rows[i] + 16 * v);
    for (int u = 0; u < P; ++u) {
      const float* key = k_rows[i] + (j + u) * p.k_stride_s;
      __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(key), query[0]);
      for (int v = 1; v < NV; ++v) dot = _mm512_fmadd_ps(_mm512_loadu_ps(key + 16 * v), query[v], dot);
      scores[(j + u) * stride + i] = _mm512_reduce_add_ps(dot) * scale;
    }
  }
}

// acc_i += sum over u < P of w[(j + u) * stride + i] * v_i,(j+u), for every row i.
template <int NV, int P>
inline void accumulate_positions(const DecodeAttentionProblem& p, int64_t rows, int64_t j, int64_t stride,
                                 const float* const* v_rows, const float* weights, float* acc) {
  for (int64_t i = 0; i < rows; ++i) {
    float* a = acc + i * 16 * NV;
    __m512 sum[NV];
    for (int v = 0; v < NV; ++v) sum[v] = _mm512_loadu_ps(a + 16 * v);
    for (int u = 0; u < P; ++u) {
      const __m512 weight = _mm512_set1_ps(weights[(j + u) * stride + i]);
      const float* value = v_rows[i] + (j + u) * p.v_stride_s;
      for (int v = 0; v < NV; ++v) sum[v] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(value + 16 * v), sum[v]);
    }
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(a + 16 * v, sum[v]);
  }
}

template <int NV>
void attend_rows(const DecodeAttentionProblem& p, int64_t row_begin, int64_t row_end, float* scores, float* acc) {
  constexpr int64_t kDim = 16 * NV;
  const int64_t rows = row_end - row_begin, length = p.length, stride = (rows + 15) / 16 * 16;
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  std::vector<const float*> q_rows(rows), k_rows(rows), v_rows(rows);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t b = (row_begin + i) / p.heads, h = (row_begin + i) % p.heads;
    q_rows[i] = p.q + b * p.q_stride_b + h * p.q_stride_h;
    k_rows[i] = p.k_cache + b * p.k_stride_b + h * p.k_stride_h;
    v_rows[i] = p.v_cache + b * p.v_stride_b + h * p.v_stride_h;
  }

  // Pass 1: scores[j][i] = q_i . k_ij / sqrt(Dh).
  int64_t first = 0;
  for (; first + kPositions <= length; first += kPositions)
    score_positions<NV, kPositions>(p, rows, first, stride, scale, q_rows.data(), k_rows.data(), scores);
  for (; first < length; ++first)
    score_positions<NV, 1>(p, rows, first, stride, scale, q_rows.data(), k_rows.data(), scores);

  // Softmax down each column (row of the problem), 16 rows per vector. A NaN score
  // never becomes the maximum but turns its weight, hence the row, into NaN (NaN or
  // inf in q or a key gives a NaN row, as in PyTorch).
  std::vector<float> totals(stride);
  for (int64_t i = 0; i < rows; i += 16) {
    const __mmask16 lanes = first_lanes(rows - i);
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < length; ++j) top = _mm512_max_ps(top, _mm512_maskz_loadu_ps(lanes, scores + j * stride + i));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < length; ++j) {
      float* s = scores + j * stride + i;
      const __m512 w = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s), top));
      _mm512_mask_storeu_ps(s, lanes, w);
      total = _mm512_add_ps(total, w);
    }
    _mm512_mask_storeu_ps(totals.data() + i, lanes, total);
  }

  // Pass 2: acc_i += w_ij * v_ij.
  for (int64_t i = 0; i < rows * kDim; i += 16) _mm512_storeu_ps(acc + i, _mm512_setzero_ps());
  first = 0;
  for (; first + kPositions <= length; first += kPositions)
    accumulate_positions<NV, kPositions>(p, rows, first, stride, v_rows.data(), scores, acc);
  for (; first < length; ++first) accumulate_positions<NV, 1>(p, rows, first, stride, v_rows.data(), scores, acc);
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 inverse = _mm512_set1_ps(1.0f / totals[i]);
    float* out = p.out + (row_begin + i) * kDim;
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + 16 * v, _mm512_mul_ps(_mm512_loadu_ps(acc + i * kDim + 16 * v), inverse));
  }
}

}  // namespace

void attend_rows_avx512(const DecodeAttentionProblem& p, int64_t row_begin, int64_t row_end, float* scores,
                        float* acc) {
  switch (p.head_dim / 16) {
    case 1: return attend_rows<1>(p, row_begin, row_end, scores, acc);
    case 2: return attend_rows<2>(p, row_begin, row_end, scores, acc);
    case 3: return attend_rows<3>(p, row_begin, row_end, scores, acc);
    case 4: return attend_rows<4>(p, row_begin, row_end, scores, acc);
    case 6: return attend_rows<6>(p, row_begin, row_end, scores, acc);
    case 8: return attend_rows<8>(p, row_begin, row_end, scores, acc);
    case 16: return attend_rows<16>(p, row_begin, row_end, scores, acc);
    default: return attend_rows_scalar(p, row_begin, row_end, scores, acc);
  }
}

}  // namespace jetfast
