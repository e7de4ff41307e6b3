#pragma once
// Batched 1-D K-Means: K bin centers for each latent dimension at once.
//
//   latents (N, D) float32  ->  centers (D, K) float32, every row sorted ascending
//
// Each dimension is solved on its own (in parallel across dimensions):
//   1. sort the N values once, fold repeated values into (value, count) pairs, and
//      build prefix sums of count, value and value^2 in float64, so the squared error
//      of any run of sorted values costs O(1);
//   2. initialise with the exact optimum over a coarsened problem (init kCoarseExact):
//      sorted values are cut into at most groups_per_bin*K runs of bounded squared
//      error, and a dynamic programme finds the K clusters (unions of runs) of least
//      total squared error. The only approximation is that cluster edges fall on run
//      edges. Or, for comparison, equal-count quantile bins (init kQuantile);
//   3. polish with Lloyd iterations whose assignment step binary-searches the
//      midpoints between centers in the sorted values: O(K log N) per iteration;
//   4. sweep the edges: each edge between two neighbouring clusters moves to the exact
//      best place for their union (O(N) per sweep), until none moves. This is exact
//      for K = 2 and leaves the shallow local optima Lloyd stops in.
//
// Plain Lloyd from quantiles stalls far above the optimum on 1-D data (heavy tails
// are the worst case: a few extreme values deserve bins of their own, and Lloyd moves
// bins there only one neighbour at a time); the coarse exact start removes that.
//
// Fewer distinct values U than K: the U distinct values are the first U centers and
// the remaining K-U centers repeat the largest value (zero error; rows stay sorted,
// and the nearest-bin rule maps ties to the first of equal centers).
#include <cstdint>

namespace jetfast {

enum class Kmeans1dInit : int { kCoarseExact = 0, kQuantile = 1 };

struct Kmeans1dOptions {
  int64_t num_bins = 256;       // K >= 2
  int max_iter = 100;           // cap on Lloyd iterations, and on edge sweeps (0: the initialisation only)
  double tol = 1e-9;            // stop once an iteration lowers the squared error by < tol * error
  Kmeans1dInit init = Kmeans1dInit::kCoarseExact;
  int64_t groups_per_bin = 16;  // runs per bin of the coarse problem; 0 = no coarsening (exact DP)
};

// latents: (N, D) float32 with element strides (stride_n, stride_d); N >= 1.
// centers: (D, K) float32, C-contiguous, written.
// iterations: (D,) int32, Lloyd iterations plus edge sweeps run per dimension, written.
// distinct: (D,) int64, number of distinct values per dimension, written.
// Returns the flat index n * D + d of the first non-finite latent (nothing else is
// then guaranteed to be written), or -1.
int64_t kmeans1d_cpu(const float* latents, int64_t n, int64_t d, int64_t stride_n, int64_t stride_d,
                     const Kmeans1dOptions& options, float* centers, int32_t* iterations, int64_t* distinct,
                     int num_threads);

}  // namespace jetfast
