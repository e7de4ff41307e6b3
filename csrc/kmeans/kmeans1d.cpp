// Batched 1-D K-Means on the CPU; the method is described in kmeans1d.h.
#include "kmeans/kmeans1d.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "common/parallel.h"

namespace jetfast {
namespace {

// The distinct values of one dimension in ascending order, with their counts and
// float64 prefix sums of count, value and value^2, so that the squared error of any
// run [i, j) of distinct values is O(1).
//
// Precision: a plain prefix sum over heavy-tailed data carries the square of the
// most extreme value into every later entry, and the error of a narrow central run
// would drown in that cancellation. So values are shifted by the median and the sums
// are accumulated outwards from the median in both directions: an entry only holds
// the values between the median and itself.
class SortedDimension {
 public:
  // Reads column `column[row * stride]`; returns the first row holding a non-finite
  // value (and loads nothing), or -1.
  int64_t load(const float* column, int64_t n, int64_t stride) {
    sorted_.resize(n);
    for (int64_t row = 0; row < n; ++row) {
      const float v = column[row * stride];
      if (!std::isfinite(v)) return row;
      sorted_[row] = v;
    }
    std::sort(sorted_.begin(), sorted_.end());
    shift_ = sorted_[n / 2];
    n_ = n;

    distinct_.clear();
    value_.clear();
    count_.clear();
    int64_t anchor = 0;  // index of the distinct value at the median
    for (int64_t row = 0; row < n; ++row) {
      if (row == 0 || sorted_[row] != sorted_[row - 1]) {
        distinct_.push_back(sorted_[row]);
        value_.push_back(static_cast<double>(sorted_[row]) - static_cast<double>(shift_));
        count_.push_back(0.0);
      }
      count_.back() += 1.0;
      if (row == n / 2) anchor = static_cast<int64_t>(distinct_.size()) - 1;
    }
    const int64_t u = size();
    c0_.assign(u + 1, 0.0);
    c1_.assign(u + 1, 0.0);
    c2_.assign(u + 1, 0.0);
    for (int64_t t = anchor; t < u; ++t) {
      c0_[t + 1] = c0_[t] + count_[t];
      c1_[t + 1] = c1_[t] + count_[t] * value_[t];
      c2_[t + 1] = c2_[t] + count_[t] * value_[t] * value_[t];
    }
    for (int64_t t = anchor - 1; t >= 0; --t) {
      c0_[t] = c0_[t + 1] - count_[t];
      c1_[t] = c1_[t + 1] - count_[t] * value_[t];
      c2_[t] = c2_[t + 1] - count_[t] * value_[t] * value_[t];
    }
    return -1;
  }

  int64_t size() const { return static_cast<int64_t>(value_.size()); }
  int64_t num_values() const { return n_; }
  double shift() const { return shift_; }
  const std::vector<float>& distinct() const { return distinct_; }
  const std::vector<double>& values() const { return value_; }

  // Number of values in the run [i, j) of distinct values.
  double count(int64_t i, int64_t j) const { return c0_[j] - c0_[i]; }
  double mean(int64_t i, int64_t j) const { return (c1_[j] - c1_[i]) / (c0_[j] - c0_[i]); }
  double sse(int64_t i, int64_t j) const {
    if (j - i <= 1) return 0.0;
    const double w = c0_[j] - c0_[i], s = c1_[j] - c1_[i];
    const double e = (c2_[j] - c2_[i]) - s * s / w;
    return e > 0.0 ? e : 0.0;
  }
  // Prefix sums at chosen edges, for the coarse problem.
  void gather_prefix(const std::vector<int64_t>& edges, std::vector<double>* r0, std::vector<double>* r1,
                     std::vector<double>* r2) const {
    const size_t m = edges.size();
    r0->resize(m);
    r1->resize(m);
    r2->resize(m);
    for (size_t a = 0; a < m; ++a) {
      (*r0)[a] = c0_[edges[a]];
      (*r1)[a] = c1_[edges[a]];
      (*r2)[a] = c2_[edges[a]];
    }
  }

 private:
  int64_t n_ = 0;
  float shift_ = 0.0f;
  std::vector<float> sorted_, distinct_;
  std::vector<double> value_, count_, c0_, c1_, c2_;
};

// Greedy cut of the distinct values into the longest runs whose squared error stays
// <= cap; returns the number of runs. Extending a run never lowers its error, so the
// count falls as the cap grows.
int64_t cut_runs(const SortedDimension& dim, double cap, std::vector<int64_t>* edges) {
  const int64_t u = dim.size();
  edges->clear();
  edges->push_back(0);
  int64_t start = 0;
  for (int64_t t = 1; t < u; ++t) {
    if (dim.sse(start, t + 1) > cap) {
      edges->push_back(t);
      start = t;
    }
  }
  edges->push_back(u);
  return static_cast<int64_t>(edges->size()) - 1;
}

// Runs of bounded error, at most max_runs of them, found by bisecting the cap in log
// space over 120 octaves below the total error (heavy tails put the central runs' error
// dozens of octaves below it): the smallest cap, to 0.2%, whose greedy cut fits.
void coarse_runs(const SortedDimension& dim, int64_t max_runs, int64_t num_bins, std::vector<int64_t>* edges) {
  const int64_t u = dim.size();
  auto each_value = [&] {
    edges->resize(u + 1);
    for (int64_t t = 0; t <= u; ++t) (*edges)[t] = t;
  };
  if (max_runs <= 0 || u <= max_runs) return each_value();
  const double total = dim.sse(0, u);
  double log_hi = std::log2(total), log_lo = log_hi - 120.0;
  if (cut_runs(dim, std::exp2(log_lo), edges) <= max_runs) return;
  for (int step = 0; step < 16; ++step) {
    const double mid = 0.5 * (log_lo + log_hi);
    (cut_runs(dim, std::exp2(mid), edges) <= max_runs ? log_hi : log_lo) = mid;
  }
  // Too few runs can only come from a degenerate cap jump; the exact problem is safe.
  if (cut_runs(dim, std::exp2(log_hi), edges) < num_bins) each_value();
}

// Exact K-clustering of M weighted runs (prefix sums r0, r1, r2 at the M+1 run edges)
// into contiguous clusters of least squared error. error[l][j] = min_i error[l-1][i] +
// cost(i, j); the best i is non-decreasing in j for 1-D squared error (the cost is
// Monge), so each layer is solved by divide and conquer in O(M log M).
class CoarseExact {
 public:
  // Fills cuts (K+1 run edges, cuts[0] = 0, cuts[K] = M).
  void solve(const std::vector<double>& r0, const std::vector<double>& r1, const std::vector<double>& r2, int64_t k,
             std::vector<int64_t>* cuts) {
    r0_ = r0.data();
    r1_ = r1.data();
    r2_ = r2.data();
    const int64_t m = static_cast<int64_t>(r0.size()) - 1;
    prev_.assign(m + 1, kInf);
    cur_.assign(m + 1, kInf);
    argmin_.assign(static_cast<size_t>(k + 1) * (m + 1), 0);
    for (int64_t j = 1; j <= m - (k - 1); ++j) prev_[j] = cost(0, j);
    for (int64_t l = 2; l <= k; ++l) {
      const int64_t j_hi = m - (k - l);
      layer(l, m, l, j_hi, l - 1, j_hi - 1);
      std::swap(prev_, cur_);
    }
    cuts->assign(k + 1, 0);
    (*cuts)[k] = m;
    for (int64_t l = k; l >= 2; --l) (*cuts)[l - 1] = argmin_[static_cast<size_t>(l) * (m + 1) + (*cuts)[l]];
  }

 private:
  static constexpr double kInf = std::numeric_limits<double>::infinity();

  double cost(int64_t a, int64_t b) const {
    const double w = r0_[b] - r0_[a], s = r1_[b] - r1_[a];
    const double e = (r2_[b] - r2_[a]) - s * s / w;
    return e > 0.0 ? e : 0.0;
  }

  void layer(int64_t l, int64_t m, int64_t j_lo, int64_t j_hi, int64_t i_lo, int64_t i_hi) {
    if (j_lo > j_hi) return;
    const int64_t j = j_lo + (j_hi - j_lo) / 2;
    double best = kInf;
    int64_t best_i = i_lo;
    const int64_t last = std::min(i_hi, j - 1);
    for (int64_t i = i_lo; i <= last; ++i) {
      const double e = prev_[i] + cost(i, j);
      if (e < best) {
        best = e;
        best_i = i;
      }
    }
    cur_[j] = best;
    argmin_[static_cast<size_t>(l) * (m + 1) + j] = static_cast<int32_t>(best_i);
    layer(l, m, j_lo, j - 1, i_lo, best_i);
    layer(l, m, j + 1, j_hi, best_i, i_hi);
  }

  const double *r0_ = nullptr, *r1_ = nullptr, *r2_ = nullptr;
  std::vector<double> prev_, cur_;
  std::vector<int32_t> argmin_;
};

// Equal-count bins over the sorted values, every bin holding at least one distinct value.
void quantile_bounds(const SortedDimension& dim, int64_t k, std::vector<int64_t>* bounds) {
  const int64_t u = dim.size();
  const double n = static_cast<double>(dim.num_values());
  bounds->assign(k + 1, 0);
  (*bounds)[k] = u;
  int64_t t = 0;
  for (int64_t j = 1; j < k; ++j) {
    const double target = n * static_cast<double>(j) / static_cast<double>(k);
    while (t < u && dim.count(0, t) < target) ++t;
    (*bounds)[j] = std::clamp(t, (*bounds)[j - 1] + 1, u - (k - j));
  }
}

// Lloyd can leave a cluster with no value at all; give its center to the cluster of
// largest error, split at its mean (both halves are non-empty: it holds >= 2 distinct
// values). Needs more distinct values than clusters, which the caller guarantees.
void refill_empty_clusters(const SortedDimension& dim, std::vector<int64_t>* bounds) {
  const int64_t k = static_cast<int64_t>(bounds->size()) - 1;
  std::vector<int64_t> edges(*bounds);
  edges.erase(std::unique(edges.begin(), edges.end()), edges.end());
  const double* values = dim.values().data();
  while (static_cast<int64_t>(edges.size()) - 1 < k) {
    size_t worst = 0;
    double worst_error = -1.0;
    for (size_t a = 0; a + 1 < edges.size(); ++a) {
      const double e = dim.sse(edges[a], edges[a + 1]);
      if (edges[a + 1] - edges[a] >= 2 && e > worst_error) {
        worst_error = e;
        worst = a;
      }
    }
    const int64_t lo = edges[worst], hi = edges[worst + 1];
    const double mean = dim.mean(lo, hi);
    const int64_t split = std::clamp<int64_t>(std::upper_bound(values + lo, values + hi, mean) - values, lo + 1, hi - 1);
    edges.insert(edges.begin() + worst + 1, split);
  }
  *bounds = std::move(edges);
}

double partition_error(const SortedDimension& dim, const std::vector<int64_t>& bounds) {
  double total = 0.0;
  for (size_t j = 0; j + 1 < bounds.size(); ++j) total += dim.sse(bounds[j], bounds[j + 1]);
  return total;
}

void centers_of(const SortedDimension& dim, const std::vector<int64_t>& bounds, std::vector<double>* centers) {
  centers->resize(bounds.size() - 1);
  for (size_t j = 0; j + 1 < bounds.size(); ++j) (*centers)[j] = dim.mean(bounds[j], bounds[j + 1]);
}

// Lloyd iterations from `bounds`; the assignment step puts each boundary at the first
// value above the midpoint of two neighbouring centers (a value on the midpoint goes
// to the lower bin, as in the quantizer). Returns the iterations run.
int lloyd(const SortedDimension& dim, int max_iter, double tol, std::vector<int64_t>* bounds,
          std::vector<double>* centers) {
  const int64_t k = static_cast<int64_t>(bounds->size()) - 1, u = dim.size();
  const double* values = dim.values().data();
  std::vector<int64_t> next(k + 1);
  centers_of(dim, *bounds, centers);
  double error = partition_error(dim, *bounds);
  int iteration = 0;
  while (iteration < max_iter) {
    ++iteration;
    next[0] = 0;
    next[k] = u;
    for (int64_t j = 1; j < k; ++j) {
      const double midpoint = 0.5 * ((*centers)[j - 1] + (*centers)[j]);
      next[j] = std::upper_bound(values, values + u, midpoint) - values;
    }
    if (next == *bounds) break;  // a fixed point: no value changed bin
    bounds->swap(next);
    refill_empty_clusters(dim, bounds);
    centers_of(dim, *bounds, centers);
    const double new_error = partition_error(dim, *bounds);
    const bool stalled = error - new_error <= tol * error;
    error = new_error;
    if (stalled) break;
  }
  return iteration;
}

// Exact best edge between every two neighbouring clusters given their union, swept
// left to right until no edge moves (or max_sweeps). Each sweep is O(U) with the
// prefix sums. The result is optimal for K = 2 and, for larger K, lifts Lloyd out of
// the shallow local optima that sampling noise creates between neighbouring bins.
// Returns the sweeps run.
int refine_edges(const SortedDimension& dim, int max_sweeps, std::vector<int64_t>* bounds) {
  const int64_t k = static_cast<int64_t>(bounds->size()) - 1;
  std::vector<int64_t>& b = *bounds;
  int sweep = 0;
  bool moved = true;
  while (moved && sweep < max_sweeps) {
    ++sweep;
    moved = false;
    for (int64_t j = 0; j + 1 < k; ++j) {
      const int64_t lo = b[j], hi = b[j + 2];
      int64_t best_edge = b[j + 1];
      double best = dim.sse(lo, best_edge) + dim.sse(best_edge, hi);
      for (int64_t edge = lo + 1; edge < hi; ++edge) {
        const double e = dim.sse(lo, edge) + dim.sse(edge, hi);
        if (e < best) {
          best = e;
          best_edge = edge;
        }
      }
      if (best_edge != b[j + 1]) {
        b[j + 1] = best_edge;
        moved = true;
      }
    }
  }
  return sweep;
}

struct Workspace {
  SortedDimension dim;
  std::vector<int64_t> edges, cuts, bounds;
  std::vector<double> r0, r1, r2, centers;
  CoarseExact coarse;
};

// One dimension: column[row * stride] for N rows -> K sorted centers. Returns the
// first non-finite row or -1.
int64_t fit_dimension(const float* column, int64_t n, int64_t stride, const Kmeans1dOptions& options, Workspace& ws,
                      float* centers_out, int32_t* iterations_out, int64_t* distinct_out) {
  const int64_t k = options.num_bins;
  const int64_t bad_row = ws.dim.load(column, n, stride);
  if (bad_row >= 0) return bad_row;
  const int64_t u = ws.dim.size();
  *distinct_out = u;
  *iterations_out = 0;
  if (u <= k) {
    const std::vector<float>& distinct = ws.dim.distinct();
    for (int64_t j = 0; j < k; ++j) centers_out[j] = distinct[std::min(j, u - 1)];
    return -1;
  }

  if (options.init == Kmeans1dInit::kQuantile) {
    quantile_bounds(ws.dim, k, &ws.bounds);
  } else {
    coarse_runs(ws.dim, options.groups_per_bin * k, k, &ws.edges);
    ws.dim.gather_prefix(ws.edges, &ws.r0, &ws.r1, &ws.r2);
    ws.coarse.solve(ws.r0, ws.r1, ws.r2, k, &ws.cuts);
    ws.bounds.resize(k + 1);
    for (int64_t j = 0; j <= k; ++j) ws.bounds[j] = ws.edges[ws.cuts[j]];
  }
  int steps = lloyd(ws.dim, options.max_iter, options.tol, &ws.bounds, &ws.centers);
  if (options.max_iter > 0) {
    steps += refine_edges(ws.dim, options.max_iter, &ws.bounds);
    centers_of(ws.dim, ws.bounds, &ws.centers);
  }
  *iterations_out = steps;

  // Means of ordered, disjoint, non-empty runs increase strictly; rounding to float32
  // keeps them non-decreasing.
  const double shift = ws.dim.shift();
  for (int64_t j = 0; j < k; ++j) centers_out[j] = static_cast<float>(ws.centers[j] + shift);
  return -1;
}

}  // namespace

int64_t kmeans1d_cpu(const float* latents, int64_t n, int64_t d, int64_t stride_n, int64_t stride_d,
                     const Kmeans1dOptions& options, float* centers, int32_t* iterations, int64_t* distinct,
                     int num_threads) {
  if (n < 1 || d < 1) throw std::invalid_argument("kmeans1d: need N >= 1 and D >= 1");
  if (options.num_bins < 2) throw std::invalid_argument("kmeans1d: need K >= 2 bins");
  if (options.max_iter < 0 || options.groups_per_bin < 0 || !(options.tol >= 0.0))
    throw std::invalid_argument("kmeans1d: max_iter, groups_per_bin and tol must be >= 0");
  const int64_t k = options.num_bins;
  std::vector<int64_t> bad_rows(d, -1);
  parallel_for(d, num_threads, 1, [&](int64_t begin, int64_t end) {
    Workspace ws;
    for (int64_t dim = begin; dim < end; ++dim) {
      bad_rows[dim] = fit_dimension(latents + dim * stride_d, n, stride_n, options, ws, centers + dim * k,
                                    iterations + dim, distinct + dim);
    }
  });
  int64_t first_bad = -1;
  for (int64_t dim = 0; dim < d; ++dim) {
    if (bad_rows[dim] < 0) continue;
    const int64_t flat = bad_rows[dim] * d + dim;
    if (first_bad < 0 || flat < first_bad) first_bad = flat;
  }
  return first_bad;
}

}  // namespace jetfast
