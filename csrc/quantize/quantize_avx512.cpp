// AVX-512 kernels of the CPU quantizer (compiled with -mavx512f/vl/bw; called only
// on CPUs that have them).
//
// Tiles of 64 rows x 16 dimensions. For one dimension, a search tree of up to 255
// midpoints (K <= 256) fits in 16 zmm registers as float32, so the descent of 16
// rows at once is register permutes (vpermt2ps), not memory gathers. The tree holds
// each exact midpoint m rounded *down* to float32, rd(m): for a float32 z,
// m < z exactly when rd(m) < z (no float32 lies in (rd(m), m]), so the float32
// descent gives the exact answer with no correction. z comes in, and codes go out,
// through 16x16 in-register transposes (gathers cost ~3 cycles per element here).
// K > 256, or dimensions left over after the 16-wide blocks, take the scalar search.
#include <immintrin.h>

#include <cmath>

#include "quantize/nearest_bin.h"
#include "quantize/quantize_kernels.h"

namespace jetfast {
namespace {

constexpr int kTileRows = 64;
constexpr int kDimsPerBlock = 16;
constexpr int kMaxRegisterLevels = 8;  // 2^8 = 256 table entries = 16 zmm registers

// The register-resident tree of one dimension: entries 0..255 in 16 registers.
struct RegisterTree {
  __m512 t[16];
};

inline __m512 tree_entry(const RegisterTree& tree, __m512i node, int level) {
  switch (level) {
    case 0: case 1: case 2: case 3:
      return _mm512_permutexvar_ps(node, tree.t[0]);
    case 4:
      return _mm512_permutex2var_ps(tree.t[0], node, tree.t[1]);
    case 5:
      return _mm512_permutex2var_ps(tree.t[2], node, tree.t[3]);
    case 6: {
      const __mmask16 high = _mm512_test_epi32_mask(node, _mm512_set1_epi32(32));
      const __m512 low_half = _mm512_permutex2var_ps(tree.t[4], node, tree.t[5]);
      const __m512 high_half = _mm512_permutex2var_ps(tree.t[6], node, tree.t[7]);
      return _mm512_mask_blend_ps(high, low_half, high_half);
    }
    default: {
      const __mmask16 bit5 = _mm512_test_epi32_mask(node, _mm512_set1_epi32(32));
      const __mmask16 bit6 = _mm512_test_epi32_mask(node, _mm512_set1_epi32(64));
      const __m512 q0 = _mm512_permutex2var_ps(tree.t[8], node, tree.t[9]);
      const __m512 q1 = _mm512_permutex2var_ps(tree.t[10], node, tree.t[11]);
      const __m512 q2 = _mm512_permutex2var_ps(tree.t[12], node, tree.t[13]);
      const __m512 q3 = _mm512_permutex2var_ps(tree.t[14], node, tree.t[15]);
      return _mm512_mask_blend_ps(bit6, _mm512_mask_blend_ps(bit5, q0, q1), _mm512_mask_blend_ps(bit5, q2, q3));
    }
  }
}

// kChains x 16 lanes (rows) descending one register tree: the nearest_bin descent,
// node = 2 node + (entry < z). The chains are independent, so their permute and
// compare latencies overlap.
constexpr int kChains = kTileRows / 16;
struct RegisterLanes {
  struct Index {
    __m512i v[kChains];
  };
  struct Value {
    __m512 v[kChains];
  };
  const RegisterTree* tree;
  int level;
  inline Index descend(const Index& node, const Value& z) {
    Index next;
    for (int c = 0; c < kChains; ++c) {
      const __m512 entry = tree_entry(*tree, node.v[c], level);
      const __mmask16 below = _mm512_cmp_ps_mask(entry, z.v[c], _CMP_LT_OQ);
      const __m512i twice = _mm512_add_epi32(node.v[c], node.v[c]);
      next.v[c] = _mm512_mask_add_epi32(twice, below, twice, _mm512_set1_epi32(1));
    }
    ++level;
    return next;
  }
};

// In-register transpose of a 16x16 block of 32-bit values: r[i][j] -> r[j][i].
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

template <class Code>
inline void store_row_codes(Code* out, __m512i codes) {
  if constexpr (sizeof(Code) == 1) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(codes));
  } else if constexpr (sizeof(Code) == 2) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(codes));
  } else {
    _mm512_storeu_si512(out, codes);
  }
}

// One tile: kTileRows rows starting at `row`, dims [dim, dim + 16). Returns true if
// the tile holds a NaN.
template <class Code>
bool quantize_tile(const float* z, int64_t row, int64_t stride_n, int64_t dim, const SearchTables& tables,
                   Code* codes) {
  const int levels = tables.levels;
  const int64_t p = int64_t{1} << levels;
  alignas(64) float columns[kDimsPerBlock][kTileRows];      // z, one dimension per row
  alignas(64) int32_t tile_codes[kDimsPerBlock][kTileRows];  // codes, one dimension per row
  __mmask16 nan_mask = 0;
  for (int c = 0; c < kChains; ++c) {
    __m512 block[16];
    for (int r = 0; r < 16; ++r) {
      block[r] = _mm512_loadu_ps(z + (row + 16 * c + r) * stride_n + dim);
      nan_mask |= _mm512_cmp_ps_mask(block[r], block[r], _CMP_UNORD_Q);
    }
    transpose16(block);
    for (int j = 0; j < kDimsPerBlock; ++j) _mm512_store_ps(&columns[j][16 * c], block[j]);
  }
  for (int j = 0; j < kDimsPerBlock; ++j) {
    RegisterTree tree;
    const float* rounded = tables.rounded + (dim + j) * p;
    for (int r = 0; r < 16; ++r)
      tree.t[r] = (r * 16 < p) ? _mm512_loadu_ps(rounded + r * 16) : _mm512_set1_ps(INFINITY);
    RegisterLanes lanes{&tree, 0};
    RegisterLanes::Value value;
    RegisterLanes::Index root;
    for (int c = 0; c < kChains; ++c) {
      value.v[c] = _mm512_load_ps(&columns[j][16 * c]);
      root.v[c] = _mm512_set1_epi32(1);
    }
    const RegisterLanes::Index leaf = descend_tree(lanes, root, levels, value);
    for (int c = 0; c < kChains; ++c)
      _mm512_store_si512(&tile_codes[j][16 * c], _mm512_sub_epi32(leaf.v[c], _mm512_set1_epi32(static_cast<int>(p))));
  }
  for (int c = 0; c < kChains; ++c) {
    __m512 block[16];
    for (int j = 0; j < kDimsPerBlock; ++j) block[j] = _mm512_castsi512_ps(_mm512_load_si512(&tile_codes[j][16 * c]));
    transpose16(block);
    for (int r = 0; r < 16; ++r)
      store_row_codes(codes + (row + 16 * c + r) * tables.dims + dim, _mm512_castps_si512(block[r]));
  }
  return nan_mask != 0;
}

template <class Code>
int64_t scalar_rows(const float* z, int64_t row_begin, int64_t row_end, int64_t stride_n, int64_t dim_begin,
                    int64_t dim_end, const SearchTables& tables, Code* codes) {
  const int64_t p = int64_t{1} << tables.levels;
  int64_t nan_at = -1;
  for (int64_t row = row_begin; row < row_end; ++row)
    for (int64_t dim = dim_begin; dim < dim_end; ++dim) {
      const float value = z[row * stride_n + dim];
      if (std::isnan(value)) nan_at = row * tables.dims + dim;
      codes[row * tables.dims + dim] = static_cast<Code>(nearest_bin_scalar(tables.exact + dim * p, tables.levels, value));
    }
  return nan_at;
}

template <class Code>
int64_t quantize_rows(const float* z, int64_t row_begin, int64_t row_end, int64_t stride_n, const SearchTables& tables,
                      Code* codes) {
  const int64_t d = tables.dims;
  if (tables.levels > kMaxRegisterLevels || d < kDimsPerBlock)
    return scalar_rows(z, row_begin, row_end, stride_n, 0, d, tables, codes);
  const int64_t block_dims = d / kDimsPerBlock * kDimsPerBlock;
  const int64_t tile_end = row_begin + (row_end - row_begin) / kTileRows * kTileRows;
  bool nan_seen = false;
  for (int64_t row = row_begin; row < tile_end; row += kTileRows)
    for (int64_t dim = 0; dim < block_dims; dim += kDimsPerBlock)
      nan_seen |= quantize_tile(z, row, stride_n, dim, tables, codes);
  int64_t nan_at = -1;
  if (block_dims < d) nan_at = scalar_rows(z, row_begin, tile_end, stride_n, block_dims, d, tables, codes);
  const int64_t tail_nan = scalar_rows(z, tile_end, row_end, stride_n, 0, d, tables, codes);
  if (tail_nan >= 0) nan_at = tail_nan;
  if (nan_seen && nan_at < 0) {
    for (int64_t row = row_begin; row < tile_end && nan_at < 0; ++row)
      for (int64_t dim = 0; dim < block_dims; ++dim)
        if (std::isnan(z[row * stride_n + dim])) {
          nan_at = row * d + dim;
          break;
        }
  }
  return nan_at;
}

}  // namespace

#define JETFAST_DEFINE_AVX512_KERNEL(Code)                                                                   \
  int64_t quantize_rows_avx512(const float* z, int64_t row_begin, int64_t row_end, int64_t stride_n,         \
                               const SearchTables& tables, Code* codes) {                                   \
    return quantize_rows(z, row_begin, row_end, stride_n, tables, codes);                                   \
  }
JETFAST_DEFINE_AVX512_KERNEL(uint8_t)
JETFAST_DEFINE_AVX512_KERNEL(int16_t)
JETFAST_DEFINE_AVX512_KERNEL(int32_t)
#undef JETFAST_DEFINE_AVX512_KERNEL

}  // namespace jetfast
