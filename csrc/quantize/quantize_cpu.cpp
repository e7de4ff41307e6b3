// CPU quantizer: multithreaded over row blocks; AVX-512 kernels (quantize_avx512.cpp)
// when the CPU has them, the scalar search of nearest_bin.h otherwise.
//
// Cost floor (N = 1M, D = 128, K = 256): 512 MB read + 128 MB written, ~32 ms at
// 20 GB/s; the search is 8 dependent comparisons per element.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "common/cpu_features.h"
#include "common/parallel.h"
#include "quantize/nearest_bin.h"
#include "quantize/quantize.h"
#include "quantize/quantize_kernels.h"

namespace jetfast {
namespace {

struct OwnedTables {
  std::vector<double> exact;
  std::vector<float> rounded;
  SearchTables view;
};

// The largest float32 <= x. For a float32 z, x < z exactly when round_down(x) < z.
float round_down_to_float(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) > x) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}

// The (D, P) search tables (see nearest_bin.h): exact float64 entries, and the same
// rounded down to float32 for the AVX-512 register path.
OwnedTables build_search_tables(const float* centers, int64_t d, int64_t k, int levels, int num_threads) {
  const int64_t p = int64_t{1} << levels;
  OwnedTables tables;
  tables.exact.resize(static_cast<size_t>(d * p));
  tables.rounded.resize(static_cast<size_t>(d * p));
  parallel_for(d, num_threads, 64, [&](int64_t begin, int64_t end) {
    for (int64_t dim = begin; dim < end; ++dim)
      for (int64_t node = 0; node < p; ++node) {
        const double entry =
            search_table_entry(centers + dim * k, static_cast<int>(k), levels, static_cast<int>(node));
        tables.exact[dim * p + node] = entry;
        tables.rounded[dim * p + node] = round_down_to_float(entry);
      }
  });
  tables.view = SearchTables{tables.exact.data(), tables.rounded.data(), d, levels};
  return tables;
}

template <class Code>
int64_t quantize_rows_scalar(const float* z, int64_t row_begin, int64_t row_end, int64_t stride_n, int64_t stride_d,
                             const SearchTables& tables, Code* codes) {
  const int64_t p = int64_t{1} << tables.levels, d = tables.dims;
  int64_t nan_at = -1;
  for (int64_t row = row_begin; row < row_end; ++row) {
    for (int64_t dim = 0; dim < d; ++dim) {
      const float value = z[row * stride_n + dim * stride_d];
      if (std::isnan(value)) nan_at = row * d + dim;
      codes[row * d + dim] = static_cast<Code>(nearest_bin_scalar(tables.exact + dim * p, tables.levels, value));
    }
  }
  return nan_at;
}

template <class Code>
int64_t quantize_typed(const float* z, int64_t n, int64_t stride_n, int64_t stride_d, const SearchTables& tables,
                       Code* codes, int num_threads) {
  std::atomic<int64_t> nan_at{-1};
  const bool vector = cpu_has_avx512() && stride_d == 1;
  // Blocks of at least ~64k elements: smaller ones cost more in thread start-up than they save.
  const int64_t min_rows = std::max<int64_t>(64, 65536 / std::max<int64_t>(tables.dims, 1));
  parallel_for(n, num_threads, min_rows, [&](int64_t begin, int64_t end) {
    int64_t found;
#if defined(JETFAST_HAVE_AVX512_KERNELS)
    if (vector)
      found = quantize_rows_avx512(z, begin, end, stride_n, tables, codes);
    else
#endif
      found = quantize_rows_scalar(z, begin, end, stride_n, stride_d, tables, codes);
    if (found >= 0) nan_at.store(found);
  });
  (void)vector;
  return nan_at.load();
}

template <class Code>
int64_t dequantize_typed(const Code* codes, int64_t n, int64_t d, const float* centers, int64_t k, float* z_hat,
                         int num_threads) {
  std::atomic<int64_t> bad_at{-1};
  const int64_t min_rows = std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1));
  parallel_for(n, num_threads, min_rows, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t dim = 0; dim < d; ++dim) {
        const int64_t code = static_cast<int64_t>(codes[row * d + dim]);
        if (code < 0 || code >= k) {
          bad_at.store(row * d + dim);
          z_hat[row * d + dim] = std::numeric_limits<float>::quiet_NaN();
        } else {
          z_hat[row * d + dim] = centers[dim * k + code];
        }
      }
    }
  });
  return bad_at.load();
}

void check_sizes(int64_t n, int64_t d, int64_t k) {
  if (n < 0 || d < 1 || d > kMaxDims)
    throw std::invalid_argument("quantize: need N >= 0 and 1 <= D <= " + std::to_string(kMaxDims) + "; got N=" +
                                std::to_string(n) + ", D=" + std::to_string(d));
  if (k < 2 || k > kMaxBins)
    throw std::invalid_argument("quantize: need 2 <= K <= " + std::to_string(kMaxBins) + "; got K=" + std::to_string(k));
}

}  // namespace

int64_t quantize_cpu(const float* z, int64_t n, int64_t d, int64_t z_stride_n, int64_t z_stride_d,
                     const float* centers, int64_t k, void* codes, CodeType code_type, int num_threads) {
  check_sizes(n, d, k);
  if (n == 0) return -1;
  const int levels = search_levels(static_cast<int>(k));
  const OwnedTables tables = build_search_tables(centers, d, k, levels, num_threads);
  switch (code_type) {
    case CodeType::kUInt8:
      if (k > 256) throw std::invalid_argument("quantize: uint8 codes need K <= 256; got K=" + std::to_string(k));
      return quantize_typed(z, n, z_stride_n, z_stride_d, tables.view, static_cast<uint8_t*>(codes), num_threads);
    case CodeType::kInt16:
      if (k > 32768) throw std::invalid_argument("quantize: int16 codes need K <= 32768; got K=" + std::to_string(k));
      return quantize_typed(z, n, z_stride_n, z_stride_d, tables.view, static_cast<int16_t*>(codes), num_threads);
    case CodeType::kInt32:
      return quantize_typed(z, n, z_stride_n, z_stride_d, tables.view, static_cast<int32_t*>(codes), num_threads);
  }
  throw std::invalid_argument("quantize: unknown code type");
}

int64_t dequantize_cpu(const void* codes, CodeType code_type, int64_t n, int64_t d, const float* centers, int64_t k,
                       float* z_hat, int num_threads) {
  check_sizes(n, d, k);
  switch (code_type) {
    case CodeType::kUInt8:
      return dequantize_typed(static_cast<const uint8_t*>(codes), n, d, centers, k, z_hat, num_threads);
    case CodeType::kInt16:
      return dequantize_typed(static_cast<const int16_t*>(codes), n, d, centers, k, z_hat, num_threads);
    case CodeType::kInt32:
      return dequantize_typed(static_cast<const int32_t*>(codes), n, d, centers, k, z_hat, num_threads);
  }
  throw std::invalid_argument("dequantize: unknown code type");
}

}  // namespace jetfast
