// AVX2 + FMA matrix-vector rows for the fused decode step (compiled with -mavx2
// -mfma, called only when the CPU has both: common/cpu_features.h). Weights are
// float32 or bfloat16 (uint16, widened as they are loaded); sums are float32.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/avx2_vectors.h"
#include "sampler/decode_blocks.h"

namespace jetfast {
namespace {

inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Four independent accumulators hide the FMA latency; the weights stream through once.
template <class W>
inline float dot(const W* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(load8(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(load8(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(load8(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(b + i), s0);
  float sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < n; ++i) sum += scalar(a[i]) * b[i];
  return sum;
}

// Four rows of weights against one sequence: four streams from memory at once (one stream
// alone does not reach the memory bandwidth of a core), each x load used four times.
template <class W>
inline void dot4(const W* w, int64_t in, const float* x, float* out) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    s0 = _mm256_fmadd_ps(load8(w + i), v, s0);
    s1 = _mm256_fmadd_ps(load8(w + in + i), v, s1);
    s2 = _mm256_fmadd_ps(load8(w + 2 * in + i), v, s2);
    s3 = _mm256_fmadd_ps(load8(w + 3 * in + i), v, s3);
  }
  out[0] = horizontal_sum(s0), out[1] = horizontal_sum(s1), out[2] = horizontal_sum(s2), out[3] = horizontal_sum(s3);
  for (; i < in; ++i)
    for (int j = 0; j < 4; ++j) out[j] += scalar(w[j * in + i]) * x[i];
}

template <class W>
void rows(const W* w, const float* bias, const float* x, float* y, int64_t batch, int64_t in, int64_t ldy,
          int64_t row_begin, int64_t row_end, bool accumulate) {
  int64_t r = row_begin;
  for (; r + 4 <= row_end; r += 4) {
    for (int64_t b = 0; b < batch; ++b) {  // the four rows are read from memory once, then from L1
      float sums[4];
      dot4(w + r * in, in, x + b * in, sums);
      for (int j = 0; j < 4; ++j) {
        const float value = sums[j] + (bias ? bias[r + j] : 0.0f);
        float& out = y[b * ldy + r + j];
        out = accumulate ? out + value : value;
      }
    }
  }
  for (; r < row_end; ++r) {
    for (int64_t b = 0; b < batch; ++b) {
      const float value = dot(w + r * in, x + b * in, in) + (bias ? bias[r] : 0.0f);
      float& out = y[b * ldy + r];
      out = accumulate ? out + value : value;
    }
  }
}

// erf(z) as PyTorch's Vectorized<float>::erf: sign(z) (1 - t (p1 + p2 t + ... + p5 t^4) exp(-z^2)),
// t = 1 / (1 + p |z|).
inline __m256 erf8(__m256 z) {
  const __m256 sign = _mm256_and_ps(z, _mm256_set1_ps(-0.0f));
  const __m256 a = _mm256_xor_ps(z, sign);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, one));
  __m256 r = _mm256_set1_ps(1.061405429f);
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-1.453152027f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = exp_nonpositive(_mm256_xor_ps(_mm256_mul_ps(a, a), _mm256_set1_ps(-0.0f)));
  return _mm256_xor_ps(_mm256_fnmadd_ps(_mm256_mul_ps(r, t), e, one), sign);
}

}  // namespace

void layer_norm_rows_avx2(const float* x, const float* weight, const float* bias, float eps, float* out,
                          int64_t row_begin, int64_t row_end, int64_t width) {
  const int64_t vector_end = width / 8 * 8;
  for (int64_t b = row_begin; b < row_end; ++b) {
    const float* row = x + b * width;
    float* y = out + b * width;
    // Two passes (mean, then squared deviations): as exact as float32 sums allow, no cancellation.
    __m256 s = _mm256_setzero_ps();
    for (int64_t i = 0; i < vector_end; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(row + i));
    float sum = horizontal_sum(s);
    for (int64_t i = vector_end; i < width; ++i) sum += row[i];
    const float mean = sum / static_cast<float>(width);
    const __m256 m = _mm256_set1_ps(mean);
    __m256 q = _mm256_setzero_ps();
    for (int64_t i = 0; i < vector_end; i += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(row + i), m);
      q = _mm256_fmadd_ps(d, d, q);
    }
    float square = horizontal_sum(q);
    for (int64_t i = vector_end; i < width; ++i) square += (row[i] - mean) * (row[i] - mean);
    const float inverse = 1.0f / std::sqrt(square / static_cast<float>(width) + eps);
    const __m256 v = _mm256_set1_ps(inverse);
    for (int64_t i = 0; i < vector_end; i += 8) {
      const __m256 n = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(row + i), m), v);
      _mm256_storeu_ps(y + i, _mm256_fmadd_ps(n, _mm256_loadu_ps(weight + i), _mm256_loadu_ps(bias + i)));
    }
    for (int64_t i = vector_end; i < width; ++i) y[i] = (row[i] - mean) * inverse * weight[i] + bias[i];
  }
}

void gelu_avx2(float* y, int64_t n) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  const __m256 root_half = _mm256_set1_ps(static_cast<float>(M_SQRT1_2));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(y + i);
    const __m256 e = erf8(_mm256_mul_ps(v, root_half));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, e)));
  }
  for (; i < n; ++i) y[i] = 0.5f * y[i] * (1.0f + std::erf(y[i] * static_cast<float>(M_SQRT1_2)));
}

void to_bf16_avx2(const float* src, uint16_t* dst, int64_t n) {
  const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7FFF), quiet = _mm256_set1_epi32(0x400000);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    const __m256i bits = _mm256_castps_si256(v);
    // + 0x7FFF + the kept part's lowest bit: round to nearest, ties to even; a NaN only made quiet
    const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(bits, 16), one)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i upper = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, _mm256_or_si256(bits, quiet), nan), 16);
    // 32 -> 16 bits within each 128-bit lane, then the two lanes' low halves together
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(upper, upper), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_castsi256_si128(packed));
  }
  for (; i < n; ++i) dst[i] = to_bf16(src[i]);
}

void linear_rows_avx2(const float* w, const float* bias, const float* x, float* y, int64_t batch, int64_t in,
                      int64_t ldy, int64_t row_begin, int64_t row_end, bool accumulate) {
  rows(w, bias, x, y, batch, in, ldy, row_begin, row_end, accumulate);
}

void linear_rows_avx2_bf16(const uint16_t* w, const float* bias, const float* x, float* y, int64_t batch,
                           int64_t in, int64_t ldy, int64_t row_begin, int64_t row_end, bool accumulate) {
  rows(w, bias, x, y, batch, in, ldy, row_begin, row_end, accumulate);
}

}  // namespace jetfast
