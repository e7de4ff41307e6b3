// Python face of the batched 1-D K-Means. Takes NumPy arrays; the friendly checks
// live in jetfast/bins.py and the ones that guard memory are repeated here.
#include "kmeans/kmeans_bind.h"

#include <pybind11/numpy.h>

#include <stdexcept>
#include <string>

#include "common/array_checks.h"
#include "kmeans/kmeans1d.h"

namespace py = pybind11;

namespace jetfast {
namespace {

int64_t kmeans1d_numpy(const py::array_t<float, py::array::c_style>& latents,
                       py::array_t<float, py::array::c_style>& centers, py::array_t<int32_t, py::array::c_style>& iterations,
                       py::array_t<int64_t, py::array::c_style>& distinct, int max_iter, double tol,
                       const std::string& init, int64_t groups_per_bin, int num_threads) {
  require(latents.ndim() == 2, "latents must be (N, D); got shape " + shape_of(latents));
  const int64_t n = latents.shape(0), d = latents.shape(1);
  require(n >= 1 && d >= 1, "latents must hold at least one value per dimension; got shape " + shape_of(latents));
  require(centers.ndim() == 2 && centers.shape(0) == d && centers.shape(1) >= 2 && centers.writeable(),
          "centers must be a writable (D, K) array with D=" + std::to_string(d) + " and K >= 2; got shape " +
              shape_of(centers));
  require(iterations.ndim() == 1 && iterations.shape(0) == d && iterations.writeable(),
          "iterations must be a writable (D,) int32 array; got shape " + shape_of(iterations));
  require(distinct.ndim() == 1 && distinct.shape(0) == d && distinct.writeable(),
          "distinct must be a writable (D,) int64 array; got shape " + shape_of(distinct));
  require(max_iter >= 0, "max_iter must be >= 0; got " + std::to_string(max_iter));
  require(tol >= 0.0, "tol must be >= 0; got " + std::to_string(tol));
  require(groups_per_bin >= 0, "groups_per_bin must be >= 0; got " + std::to_string(groups_per_bin));
  require(num_threads >= 1, "num_threads must be >= 1; got " + std::to_string(num_threads));

  Kmeans1dOptions options;
  options.num_bins = centers.shape(1);
  options.max_iter = max_iter;
  options.tol = tol;
  options.groups_per_bin = groups_per_bin;
  if (init == "coarse_exact") {
    options.init = Kmeans1dInit::kCoarseExact;
  } else if (init == "quantile") {
    options.init = Kmeans1dInit::kQuantile;
  } else {
    throw py::value_error("init must be 'coarse_exact' or 'quantile'; got '" + init + "'");
  }
  const float* latents_data = latents.data();
  float* centers_data = centers.mutable_data();
  int32_t* iterations_data = iterations.mutable_data();
  int64_t* distinct_data = distinct.mutable_data();
  py::gil_scoped_release release;
  return kmeans1d_cpu(latents_data, n, d, d, 1, options, centers_data, iterations_data, distinct_data, num_threads);
}

}  // namespace

void bind_kmeans(py::module_& m) {
  // noconvert: a float64 or strided array must not be silently copied into a
  // temporary that the caller then never sees written.
  m.def("kmeans1d_cpu", &kmeans1d_numpy, py::arg("latents").noconvert(), py::arg("centers").noconvert(),
        py::arg("iterations").noconvert(), py::arg("distinct").noconvert(), py::arg("max_iter"), py::arg("tol"),
        py::arg("init"), py::arg("groups_per_bin"), py::arg("num_threads"),
        "K-Means of every column of latents (N, D) float32 into centers (D, K) float32, rows sorted.\n"
        "Writes iterations (D,) int32 (Lloyd steps + edge sweeps) and distinct-value counts (D,) int64.\n"
        "Returns the flat index of the first non-finite latent, or -1.");
}

}  // namespace jetfast
