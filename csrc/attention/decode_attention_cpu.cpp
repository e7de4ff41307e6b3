// Decode attention on the CPU. Rows (sequence, head) are split over threads and
// taken in blocks; a block is read twice in position order (keys for the scores,
// values for the sum) with an exact two-pass softmax in between, which needs only
// `length` floats of scratch per row.
#include "attention/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu_features.h"
#include "common/parallel.h"

namespace jetfast {
namespace {

// Rows per block when positions are outermost: up to 512, while the block's scores
// and sums take at most 512 KB (half of a Zen 4 core's L2). At Dh = 32 a block then
// reads 64 KB runs of the cache. Measured on 2 Zen 4 cores in the sampler (B*H =
// 4096, Dh = 32): 6% faster than blocks of 2048 rows, whose scratch spills from L2.
constexpr int64_t kMaxRowsPerBlock = 512;
constexpr int64_t kScratchFloats = int64_t{1} << 17;
// With rows contiguous along positions each row of a block is its own stream.
constexpr int64_t kStreamsPerBlock = 16;

int64_t padded(int64_t length) { return (length + 15) / 16 * 16; }

// The new key and value of rows [row_begin, row_end) into the caches at position length - 1.
// The caches are const for the attention; the binding passes writable ones with k_new.
void append_rows(const DecodeAttentionProblem& p, int64_t row_begin, int64_t row_end) {
  const int64_t pos = p.length - 1;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t b = r / p.heads, h = r % p.heads;
    const int64_t from = b * p.new_stride_b + h * p.new_stride_h;
    std::copy_n(p.k_new + from, p.head_dim, const_cast<float*>(p.k_cache) + b * p.k_stride_b + h * p.k_stride_h + pos * p.k_stride_s);
    std::copy_n(p.v_new + from, p.head_dim, const_cast<float*>(p.v_cache) + b * p.v_stride_b + h * p.v_stride_h + pos * p.v_stride_s);
  }
}

}  // namespace

void attend_rows_scalar(const DecodeAttentionProblem& p, int64_t row_begin, int64_t row_end, float* scores,
                        float* acc) {
  const int64_t rows = row_end - row_begin, dim = p.head_dim, stride = padded(rows);
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t b = (row_begin + i) / p.heads, h = (row_begin + i) % p.heads;
    const float* q = p.q + b * p.q_stride_b + h * p.q_stride_h;
    const float* k = p.k_cache + b * p.k_stride_b + h * p.k_stride_h;
    const float* v = p.v_cache + b * p.v_stride_b + h * p.v_stride_h;
    float* a = acc + i * dim;
    // max() skips NaN scores, but exp() below turns them, and so the row, into NaN.
    float max_score = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < p.length; ++j) {
      float dot = 0.0f;
      for (int64_t d = 0; d < dim; ++d) dot += q[d] * k[j * p.k_stride_s + d];
      scores[j * stride + i] = dot * scale;
      max_score = std::max(max_score, dot * scale);
    }
    float total = 0.0f;
    for (int64_t j = 0; j < p.length; ++j) total += (scores[j * stride + i] = std::exp(scores[j * stride + i] - max_score));
    std::fill(a, a + dim, 0.0f);
    for (int64_t j = 0; j < p.length; ++j)
      for (int64_t d = 0; d < dim; ++d) a[d] += scores[j * stride + i] * v[j * p.v_stride_s + d];
    float* out = p.out + (row_begin + i) * dim;
    for (int64_t d = 0; d < dim; ++d) out[d] = a[d] / total;
  }
}

void decode_attention_cpu(const DecodeAttentionProblem& p, int num_threads) {
  const int64_t rows = p.batch * p.heads;
  // Rows contiguous along positions are read a few at a time, each a stream of its
  // own; with positions outermost (the layout of the model's cache), a block reads
  // one contiguous run per position.
  const bool rows_contiguous = p.k_stride_s == p.head_dim && p.v_stride_s == p.head_dim;
  const int64_t block = rows_contiguous
                            ? kStreamsPerBlock
                            : std::clamp<int64_t>(kScratchFloats / (p.length + p.head_dim) / 16 * 16, 16, kMaxRowsPerBlock);
  // bfloat16 caches: the AVX2 kernel only (the caller checks cpu_has_avx2_fma()).
  const bool bf16 = p.k_cache_bf16 != nullptr;
  const bool vector = !bf16 && cpu_has_avx512() && p.head_dim % 16 == 0 && p.head_dim <= 256;
  const bool vector_avx2 = bf16 || (!vector && cpu_has_avx2_fma() && p.head_dim % 8 == 0 && p.head_dim <= 256);
  parallel_for(rows, num_threads, 64, [&](int64_t begin, int64_t end) {
    const int64_t most = std::min(block, end - begin);
    std::vector<float> scores(padded(most) * p.length);
    std::vector<float> acc(most * p.head_dim);
    for (int64_t first = begin; first < end; first += block) {
      const int64_t last = std::min(end, first + block);
      if (p.k_new != nullptr) append_rows(p, first, last);
#if defined(JETFAST_HAVE_AVX512_KERNELS)
      if (vector) {
        attend_rows_avx512(p, first, last, scores.data(), acc.data());
        continue;
      }
#endif
#if defined(JETFAST_HAVE_AVX2_KERNELS)
      if (vector_avx2) {
        attend_rows_avx2(p, first, last, scores.data(), acc.data());
        continue;
      }
#endif
      attend_rows_scalar(p, first, last, scores.data(), acc.data());
    }
  });
  (void)vector, (void)vector_avx2;
}

}  // namespace jetfast
