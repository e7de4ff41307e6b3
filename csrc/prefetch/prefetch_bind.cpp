// Python face of the HDF5 prefetcher. Batches come back as NumPy arrays over the
// prefetcher's own buffers (no copy); each array's base is a capsule that returns
// the buffer to the pool when the last reference to it dies.
#include "prefetch/prefetch_bind.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "prefetch/prefetcher.h"

namespace py = pybind11;

namespace jetfast {
namespace {

struct Lease {
  std::shared_ptr<BufferPool> pool;
  float* data;
};

IntensityParams intensity_params(const std::vector<float>& scale, const std::vector<float>& mean,
                                 const std::vector<float>& std) {
  IntensityParams p;
  if (scale.empty() && mean.empty() && std.empty()) return p;
  if (scale.size() != 3 || mean.size() != 3 || std.size() != 3)
    throw py::value_error("scale, mean and std must have 3 values each (Tracks, ECAL, HCAL), or all be empty");
  p.apply = true;
  for (int c = 0; c < 3; ++c) {
    if (!(scale[c] > 0) || !(std[c] > 0)) throw py::value_error("scale and std must be > 0");
    p.scale[c] = scale[c];
    p.mean[c] = mean[c];
    p.std[c] = std[c];
  }
  return p;
}

py::object next_batch(Prefetcher& prefetcher) {
  Prefetcher::Batch batch;
  {
    py::gil_scoped_release release;
    batch = prefetcher.next();
  }
  if (!batch.data) return py::none();
  auto* lease = new Lease{prefetcher.pool(), batch.data};
  py::capsule owner(lease, [](void* p) {
    auto* l = static_cast<Lease*>(p);
    l->pool->release(l->data);
    delete l;
  });
  const py::ssize_t f = sizeof(float), s = kModelSize;
  return py::array_t<float>({static_cast<py::ssize_t>(batch.rows), py::ssize_t{kChannels}, s, s},
                            {kChannels * s * s * f, s * s * f, s * f, f}, batch.data, owner);
}

py::dict describe(const Prefetcher& prefetcher) {
  const DatasetIndex& index = prefetcher.index();
  py::dict d;
  d["path"] = index.path;
  d["dataset"] = index.name;
  d["num_jets"] = index.num_jets;
  d["layout"] = index.chunked ? "chunked" : "contiguous";
  d["chunk_rows"] = index.chunk_rows;
  d["chunk_shape"] = py::make_tuple(index.chunk_dims[0], index.chunk_dims[1], index.chunk_dims[2], index.chunk_dims[3]);
  d["filters"] = index.filters;
  d["num_chunks"] = index.chunks.size();
  d["buffers_allocated"] = prefetcher.pool() ? prefetcher.pool()->allocated() : 0;
  return d;
}

}  // namespace

void bind_prefetch(py::module_& m) {
  py::register_exception<ReadError>(m, "ReadError", PyExc_OSError);
  py::register_exception<UnsupportedLayout>(m, "UnsupportedLayout", PyExc_ValueError);

  py::class_<Prefetcher>(m, "Prefetcher",
                         "Multithreaded reader of (N,125,125,3) float32 jets into (B,3,128,128) model-layout batches")
      .def(py::init([](const std::string& path, const std::string& dataset, int num_threads, int prefetch,
                       const std::vector<float>& scale, const std::vector<float>& mean,
                       const std::vector<float>& std) {
             const IntensityParams params = intensity_params(scale, mean, std);
             // The GIL stays held while the HDF5 C library reads the index, so no h5py
             // call (h5py's own HDF5 copy) runs in another thread at the same time.
             return std::make_unique<Prefetcher>(path, dataset, num_threads, prefetch, params);
           }),
           py::arg("path"), py::arg("dataset"), py::arg("num_threads"), py::arg("prefetch"), py::arg("scale"),
           py::arg("mean"), py::arg("std"))
      .def(
          "start",
          [](Prefetcher& p, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& order,
             int64_t batch_size) {
            if (order.ndim() != 1) throw py::value_error("order must be 1-D");
            if (batch_size < 1) throw py::value_error("batch_size must be >= 1");
            const int64_t* data = order.data();
            const int64_t count = order.shape(0);
            py::gil_scoped_release release;
            p.start(data, count, batch_size);
          },
          py::arg("order"), py::arg("batch_size"), "Start an epoch over file indices `order`")
      .def("next", &next_batch, "The next batch (B,3,128,128) float32, or None after the last one")
      .def("stop", &Prefetcher::stop, py::call_guard<py::gil_scoped_release>(), "Stop and join the workers")
      .def("describe", &describe, "Layout, filters and chunk index summary of the dataset");
}

}  // namespace jetfast
