#pragma once
// The nearest-bin search, written once and shared by the CPU path (scalar and
// AVX-512 lanes) and the CUDA kernel (one thread = one scalar lane).
//
// Shapes: centers (D, K) float32, each row sorted ascending; the search table is
// (D, P) float64 with P = 2^levels >= K, one row per latent dimension.
//
// Exactness. Each table row holds the K-1 midpoints m[j] = (c[j] + c[j+1]) / 2 in
// float64. The sum of two float32 values is exact in float64 (for centers whose
// exponents differ by less than 29), so comparing z with m[j] is comparing with the
// exact midpoint; a float32 midpoint is off by up to half an ulp and picks the wrong
// bin about once per million values.
//
// Rule. The nearest center is the number of midpoints strictly below z: a value
// exactly on a midpoint goes to the lower index, -inf to 0, +inf to K-1. NaN compares
// false everywhere and yields 0; callers detect and report NaN.
//
// Layout. A row stores its midpoints as an implicit binary search tree in BFS
// (Eytzinger) order at positions 1..P-1, padded with +inf to a complete tree, so
// the first levels of every search share two cache lines and the descent
// `node = 2 * node + (table[node] < z)` is branch-free with a fixed trip count:
// the CPU vectorises it across dimensions (one gather per level) and CUDA threads
// never diverge. After `levels` steps, node - P is the rank of z among the midpoints.
#include <cmath>

#include "common/host_device.h"

namespace jetfast {

// Smallest `levels` with 2^levels >= num_bins (num_bins >= 2).
JETFAST_HD int search_levels(int num_bins) {
  int levels = 1;
  while ((1 << levels) < num_bins) ++levels;
  return levels;
}

// Sorted position (0-based, into the padded midpoint list of length P-1) of the
// tree node `node` (1 <= node < P) in a complete tree of `levels` levels.
JETFAST_HD int eytzinger_sorted_position(int node, int levels) {
  int depth = 0;
  while ((node >> (depth + 1)) != 0) ++depth;
  int position_in_level = node - (1 << depth);
  return (2 * position_in_level + 1) * (1 << (levels - 1 - depth)) - 1;
}

// Table entry `node` of one dimension: the float64 midpoint of the two centers it
// separates, or +inf for padding (index >= K-1) and for the unused slot 0.
JETFAST_HD double search_table_entry(const float* centers_row, int num_bins, int levels, int node) {
  if (node == 0) return static_cast<double>(INFINITY);
  int j = eytzinger_sorted_position(node, levels);
  if (j >= num_bins - 1) return static_cast<double>(INFINITY);
  return (static_cast<double>(centers_row[j]) + static_cast<double>(centers_row[j + 1])) * 0.5;
}

// The descent, written once. `Lanes` decides how many elements go down together
// and where the table lives: ScalarLanes reads one element's row from memory (the
// CPU scalar path and each CUDA thread); the AVX-512 path (quantize_avx512.cpp)
// moves 16 rows of one dimension at once through a tree held in registers.
// Each step is node = 2 * node + (table[node] < z); the result is the leaf node.
template <class Lanes>
JETFAST_HD typename Lanes::Index descend_tree(Lanes& lanes, typename Lanes::Index root, int levels,
                                              typename Lanes::Value z) {
  typename Lanes::Index node = root;
  for (int level = 0; level < levels; ++level) node = lanes.descend(node, z);
  return node;
}

struct ScalarLanes {
  using Index = int;
  using Value = double;
  const double* table_row;
#if defined(__CUDACC__)
  __host__ __device__ __forceinline__
#else
  inline
#endif
  Index descend(Index node, Value z) const {
    return 2 * node + (table_row[node] < z ? 1 : 0);
  }
};

// One element: the index of the nearest center (the leaf's rank among the midpoints).
JETFAST_HD int nearest_bin_scalar(const double* table_row, int levels, double z) {
  ScalarLanes lanes{table_row};
  return descend_tree(lanes, 1, levels, z) - (1 << levels);
}

}  // namespace jetfast
