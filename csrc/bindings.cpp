// The one pybind11 module of jetfast. It does not link libtorch: every op takes
// NumPy buffers or raw device pointers (+ the caller's CUDA stream) and releases
// the GIL while it works. Each capability registers its functions here.
#include <pybind11/pybind11.h>

#include "attention/decode_attention_bind.h"
#include "common/cuda_info.h"
#include "kmeans/kmeans_bind.h"
#include "quantize/quantize_bind.h"
#include "sampler/decode_blocks_bind.h"
#ifdef JETFAST_WITH_PREFETCH
#include "prefetch/prefetch_bind.h"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "jetfast native ops (C++ CPU, optional CUDA)";
  m.attr("built_with_cuda") = py::bool_(jetfast::built_with_cuda());
#ifdef JETFAST_WITH_PREFETCH
  m.attr("built_with_prefetch") = py::bool_(true);
#else
  m.attr("built_with_prefetch") = py::bool_(false);
#endif
  m.def("cuda_device_count", &jetfast::cuda_device_count,
        "Number of CUDA devices the runtime sees (0 without a driver or without a CUDA build)");
  jetfast::bind_quantize(m);
  jetfast::bind_kmeans(m);
  jetfast::bind_decode_attention(m);
  jetfast::bind_decode_blocks(m);
#ifdef JETFAST_WITH_PREFETCH
  jetfast::bind_prefetch(m);
#endif
}
