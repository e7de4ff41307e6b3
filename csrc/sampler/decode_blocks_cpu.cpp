// The fused CPU decode step (see decode_blocks.h): one call runs every block.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "attention/decode_attention.h"
#include "common/cpu_features.h"
#include "common/parallel.h"
#include "sampler/decode_blocks.h"
#include "sampler/mkl_gemm.h"

namespace jetfast {
namespace {

// Rows of a weight matrix per thread at least: below ~64 KB of weights per thread
// the fork and join cost more than the rows.
constexpr int64_t kMinWeightsPerThread = 16384;

// Exact (erf) GELU, as torch.nn.GELU().
inline float gelu(float v) { return 0.5f * v * (1.0f + std::erf(v * static_cast<float>(M_SQRT1_2))); }

// y = x w^T + bias (accumulate: y +=), optionally GELU'd, rows split over the threads; each
// thread applies the GELU to its own rows (erf costs ~10 ns: a thousand of them per layer
// would take as long as streaming the layer's weights from L3). bf16 weights are read by the
// AVX2 kernel only (DecodeBlocks refuses them without it).
void linear(const void* w, bool bf16, const float* bias, const float* x, float* y, int64_t batch, int64_t in,
            int64_t out, bool accumulate, int num_threads, bool with_gelu = false) {
  const bool vector = cpu_has_avx2_fma();
  parallel_for(out, num_threads, std::max<int64_t>(1, kMinWeightsPerThread / std::max<int64_t>(1, in)),
               [&](int64_t begin, int64_t end) {
#if defined(JETFAST_HAVE_AVX2_KERNELS)
                 if (bf16)
                   linear_rows_avx2_bf16(static_cast<const uint16_t*>(w), bias, x, y, batch, in, out, begin, end,
                                         accumulate);
                 else if (vector)
                   linear_rows_avx2(static_cast<const float*>(w), bias, x, y, batch, in, out, begin, end, accumulate);
                 else
#endif
                   linear_rows_scalar(static_cast<const float*>(w), bias, x, y, batch, in, out, begin, end,
                                      accumulate);
                 if (with_gelu)
                   for (int64_t b = 0; b < batch; ++b)
                     for (int64_t r = begin; r < end; ++r) y[b * out + r] = gelu(y[b * out + r]);
               });
  (void)vector;
}

// n floats to bfloat16 bits.
void round_to_bf16(const float* src, uint16_t* dst, int64_t n) {
#if defined(JETFAST_HAVE_AVX2_KERNELS)
  if (cpu_has_avx2_fma()) return to_bf16_avx2(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = to_bf16(src[i]);
}

// A step's key or value row (C floats) into the cache at `dst`.
void cache_row(void* dst, const float* src, int64_t count, bool bf16) {
  if (!bf16)
    std::memcpy(dst, src, count * sizeof(float));
  else
    round_to_bf16(src, static_cast<uint16_t*>(dst), count);
}

// PyTorch's layer norm: biased variance, eps inside the square root.
void layer_norm(const float* x, const float* weight, const float* bias, float eps, float* out, int64_t batch,
                int64_t width) {
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = x + b * width;
    double mean = 0.0, square = 0.0;
    for (int64_t i = 0; i < width; ++i) mean += row[i];
    mean /= static_cast<double>(width);
    for (int64_t i = 0; i < width; ++i) square += (row[i] - mean) * (row[i] - mean);
    const float inverse = static_cast<float>(1.0 / std::sqrt(square / static_cast<double>(width) + eps));
    const float m = static_cast<float>(mean);
    for (int64_t i = 0; i < width; ++i) out[b * width + i] = (row[i] - m) * inverse * weight[i] + bias[i];
  }
}

// Rows per thread at least in the passes between the GEMMs: each row is a few hundred
// floats, and a fork and join costs about as much as ~16 of them.
constexpr int64_t kMinRowsPerThread = 16;

// Rows [begin, end): out = LayerNorm(x), then each row of `broadcast` (ld floats) = `bias`
// (the next GEMM adds its product to it) and, with `residual_bias`, x += residual_bias (the
// bias of the GEMM that will accumulate into x after the norm has read it).
void norm_rows(const float* weight, const float* bias, float eps, float* x, float* out, int64_t begin, int64_t end,
               int64_t width, const float* next_bias, float* broadcast, int64_t ld, const float* residual_bias) {
#if defined(JETFAST_HAVE_AVX2_KERNELS)
  if (cpu_has_avx2_fma())
    layer_norm_rows_avx2(x, weight, bias, eps, out, begin, end, width);
  else
#endif
    layer_norm(x + begin * width, weight, bias, eps, out + begin * width, end - begin, width);
  for (int64_t b = begin; b < end; ++b) {
    if (next_bias)
      std::copy_n(next_bias, ld, broadcast + b * ld);
    else
      std::fill_n(broadcast + b * ld, ld, 0.0f);
    if (residual_bias)
      for (int64_t i = 0; i < width; ++i) x[b * width + i] += residual_bias[i];
  }
}

void gelu_rows(float* y, int64_t count) {
#if defined(JETFAST_HAVE_AVX2_KERNELS)
  if (cpu_has_avx2_fma()) return gelu_avx2(y, count);
#endif
  for (int64_t i = 0; i < count; ++i) y[i] = gelu(y[i]);
}

// bf16 GEMMs take the rows this many at a time (a tile): a whole large batch's activations
// (~11 KB a row, float32 and bf16 copies) do not stay in cache between the GEMM that writes
// them and the pass that reads them. Measured at 4096 rows, position 64, us per jet and step:
// 26.6 at once, 22.3 in tiles of 512 (22.4 of 1024, 24.0 of 256, PyTorch's blocks 25.0); tiles
// of 512 also at 512 and 2048 rows. MKL's packed fp32 weights are packed for the whole batch,
// so fp32 takes it at once (and is not slower for it: at 4096 rows 42.6 against the PyTorch
// blocks' 50.7).
constexpr int64_t kBf16RowsPerTile = 512;

int64_t rows_per_tile(const DecodeShape& s) { return s.bf16 ? std::min(s.batch, kBf16RowsPerTile) : s.batch; }

// One block for rows [row0, row0 + R) of a batch of GEMM size: four MKL GEMMs with a pass over
// the rows before each of the two that start a branch (layer norm, bias broadcast, residual
// bias), the cache append, the attention and the GELU. In bf16 each GEMM's input is rounded to
// bfloat16 in the pass that makes it (`low`), and the keys and values as they are cached.
void gemm_block(const DecodeShape& s, const DecodeBlock& block, float* x_all, int64_t pos, int64_t row0, int64_t R,
                float* scratch, int num_threads) {
  const int64_t B = s.batch, C = s.width, F = s.hidden;
  float* x = x_all + row0 * C;         // (R, C) of the residual stream
  float* h = scratch;                  // (R, C) layer-norm output
  float* qkv = h + R * C;              // (R, 3C)
  float* attended = qkv + R * 3 * C;   // (R, C) = (R, H, Dh)
  float* hidden = attended + R * C;    // (R, F)
  uint16_t* low = reinterpret_cast<uint16_t*>(hidden + R * F);  // bf16: (R, C) or (R, F), the GEMM's input
  // y (R, out) += x (R, in) w^T: the input as floats (x32) or already rounded (`low`)
  auto gemm = [&](const float* x32, const void* weight, const float* packed, float* y, int64_t out, int64_t in) {
    if (s.bf16)
      bf16_gemm(low, static_cast<const uint16_t*>(weight), y, R, out, in, 1.0f);
    else
      packed_sgemm(x32, packed, y, R, out, in, 1.0f);
  };
  auto rows = [&](auto&& fn) { parallel_for(R, num_threads, kMinRowsPerThread, fn); };
  rows([&](int64_t begin, int64_t end) {
    norm_rows(block.ln1_weight, block.ln1_bias, block.ln1_eps, x, h, begin, end, C, block.qkv_bias, qkv, 3 * C,
              block.proj_bias);
    if (s.bf16) round_to_bf16(h + begin * C, low + begin * C, (end - begin) * C);
  });
  gemm(h, block.qkv_weight, block.qkv_packed, qkv, 3 * C, C);
  // The caches are (S_max, B, H, Dh): these rows start row0 sequences into each position.
  const int64_t element = s.bf16 ? sizeof(uint16_t) : sizeof(float);
  char* k_cache = static_cast<char*>(block.k_cache) + row0 * C * element;
  char* v_cache = static_cast<char*>(block.v_cache) + row0 * C * element;
  DecodeAttentionProblem attention{qkv, 3 * C, s.head_dim,
                                   s.bf16 ? nullptr : reinterpret_cast<const float*>(k_cache), C, s.head_dim, B * C,
                                   s.bf16 ? nullptr : reinterpret_cast<const float*>(v_cache), C, s.head_dim, B * C,
                                   R, s.heads, s.head_dim, pos + 1, attended};
  if (s.bf16) {  // the kernel appends float32 rows only: round and write them here
    rows([&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        cache_row(k_cache + (pos * B + b) * C * element, qkv + b * 3 * C + C, C, true);
        cache_row(v_cache + (pos * B + b) * C * element, qkv + b * 3 * C + 2 * C, C, true);
      }
    });
    attention.k_cache_bf16 = reinterpret_cast<const uint16_t*>(k_cache);
    attention.v_cache_bf16 = reinterpret_cast<const uint16_t*>(v_cache);
  } else {
    attention.k_new = qkv + C;
    attention.v_new = qkv + 2 * C;
    attention.new_stride_b = 3 * C;
    attention.new_stride_h = s.head_dim;
  }
  decode_attention_cpu(attention, num_threads);
  if (s.bf16)
    rows([&](int64_t begin, int64_t end) { round_to_bf16(attended + begin * C, low + begin * C, (end - begin) * C); });
  gemm(attended, block.proj_weight, block.proj_packed, x, C, C);  // x already holds its bias
  rows([&](int64_t begin, int64_t end) {
    norm_rows(block.ln2_weight, block.ln2_bias, block.ln2_eps, x, h, begin, end, C, block.fc_bias, hidden, F,
              block.out_bias);
    if (s.bf16) round_to_bf16(h + begin * C, low + begin * C, (end - begin) * C);
  });
  gemm(h, block.fc_weight, block.fc_packed, hidden, F, C);
  rows([&](int64_t begin, int64_t end) {
    gelu_rows(hidden + begin * F, (end - begin) * F);
    if (s.bf16) round_to_bf16(hidden + begin * F, low + begin * F, (end - begin) * F);
  });
  gemm(hidden, block.out_weight, block.out_packed, x, C, F);
}

}  // namespace

void linear_rows_scalar(const float* w, const float* bias, const float* x, float* y, int64_t batch, int64_t in,
                        int64_t ldy, int64_t row_begin, int64_t row_end, bool accumulate) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* row = w + r * in;
    for (int64_t b = 0; b < batch; ++b) {
      const float* v = x + b * in;
      float sum = 0.0f;
      for (int64_t i = 0; i < in; ++i) sum += row[i] * v[i];
      const float value = sum + (bias ? bias[r] : 0.0f);
      float& out = y[b * ldy + r];
      out = accumulate ? out + value : value;
    }
  }
}

int64_t decode_blocks_scratch(const DecodeShape& s) {
  const int64_t rows = s.gemm ? rows_per_tile(s) : s.batch;
  const int64_t low = s.gemm && s.bf16 ? (rows * std::max(s.width, s.hidden) + 1) / 2 : 0;  // bf16 GEMM inputs
  return rows * (s.width + 3 * s.width + s.width + s.hidden) + low;
}

void decode_blocks_cpu(const DecodeShape& s, const std::vector<DecodeBlock>& blocks, float* x, int64_t pos,
                       float* scratch, int num_threads) {
  const int64_t B = s.batch, C = s.width;
  float* h = scratch;               // (B, C) layer-norm output
  float* qkv = h + B * C;           // (B, 3C)
  float* attended = qkv + B * 3 * C;  // (B, C) = (B, H, Dh)
  float* hidden = attended + B * C;   // (B, hidden)
  const int64_t step = B * C;       // elements per position in the caches
  const int64_t element = s.bf16 ? sizeof(uint16_t) : sizeof(float);
  if (s.gemm) {
    const int64_t tile = rows_per_tile(s);
    for (const DecodeBlock& block : blocks)
      for (int64_t row0 = 0; row0 < B; row0 += tile)
        gemm_block(s, block, x, pos, row0, std::min(tile, B - row0), scratch, num_threads);
    return;
  }
  for (const DecodeBlock& block : blocks) {
    layer_norm(x, block.ln1_weight, block.ln1_bias, block.ln1_eps, h, B, C);
    linear(block.qkv_weight, s.bf16, block.qkv_bias, h, qkv, B, C, 3 * C, false, num_threads);
    char* k_cache = static_cast<char*>(block.k_cache);
    char* v_cache = static_cast<char*>(block.v_cache);
    for (int64_t b = 0; b < B; ++b) {
      cache_row(k_cache + (pos * step + b * C) * element, qkv + b * 3 * C + C, C, s.bf16);
      cache_row(v_cache + (pos * step + b * C) * element, qkv + b * 3 * C + 2 * C, C, s.bf16);
    }
    DecodeAttentionProblem attention{qkv, 3 * C, s.head_dim,
                                     s.bf16 ? nullptr : static_cast<const float*>(block.k_cache), C, s.head_dim, step,
                                     s.bf16 ? nullptr : static_cast<const float*>(block.v_cache), C, s.head_dim, step,
                                     B, s.heads, s.head_dim, pos + 1, attended};
    if (s.bf16) {
      attention.k_cache_bf16 = static_cast<const uint16_t*>(block.k_cache);
      attention.v_cache_bf16 = static_cast<const uint16_t*>(block.v_cache);
    }
    decode_attention_cpu(attention, num_threads);
    linear(block.proj_weight, s.bf16, block.proj_bias, attended, x, B, C, C, true, num_threads);
    layer_norm(x, block.ln2_weight, block.ln2_bias, block.ln2_eps, h, B, C);
    linear(block.fc_weight, s.bf16, block.fc_bias, h, hidden, B, C, s.hidden, false, num_threads, true);
    linear(block.out_weight, s.bf16, block.out_bias, hidden, x, B, s.hidden, C, true, num_threads);
  }
}

}  // namespace jetfast
