// Python face of CPU decode attention. jetfast/kernels/decode_attention.py checks
// the tensors; the checks here guard every size that could read or write out of
// bounds.
#include "attention/decode_attention_bind.h"

#include <pybind11/numpy.h>

#include <string>

#include "attention/decode_attention.h"
#include "common/array_checks.h"

namespace py = pybind11;

namespace jetfast {
namespace {

void decode_attention_numpy(const py::array& q, const py::array& k_cache, const py::array& v_cache, int64_t length,
                            py::array& out, int num_threads) {
  check_float32(q, "q");
  check_float32(k_cache, "k_cache");
  check_float32(v_cache, "v_cache");
  check_float32(out, "out");
  require(k_cache.ndim() == 4, "k_cache must be (B, H, S_max, Dh); got shape " + shape_of(k_cache));
  require(v_cache.ndim() == 4, "v_cache must be (B, H, S_max, Dh); got shape " + shape_of(v_cache));
  const int64_t batch = k_cache.shape(0), heads = k_cache.shape(1), max_len = k_cache.shape(2),
                head_dim = k_cache.shape(3);
  for (int i = 0; i < 4; ++i)
    require(v_cache.shape(i) == k_cache.shape(i),
            "v_cache " + shape_of(v_cache) + " and k_cache " + shape_of(k_cache) + " must have one shape");
  require(q.ndim() == 3 && q.shape(0) == batch && q.shape(1) == heads && q.shape(2) == head_dim,
          "q must be (B, H, Dh) = (" + std::to_string(batch) + ", " + std::to_string(heads) + ", " +
              std::to_string(head_dim) + "); got " + shape_of(q));
  for (const py::array* a : {&q, &k_cache, &v_cache}) {
    bool ok = a->strides(a->ndim() - 1) == 4;
    for (int i = 0; i + 1 < a->ndim(); ++i) ok = ok && a->strides(i) >= 0 && a->strides(i) % 4 == 0;
    require(ok, "q, k_cache and v_cache must be contiguous along Dh, with non-negative strides");
  }
  require(out.ndim() == 3 && (out.flags() & py::array::c_style) && out.writeable() && out.shape(0) == batch &&
              out.shape(1) == heads && out.shape(2) == head_dim,
          "out must be a writable C-contiguous array of shape " + shape_of(q));
  require(1 <= length && length <= max_len,
          "need 1 <= length <= S_max=" + std::to_string(max_len) + "; got " + std::to_string(length));
  DecodeAttentionProblem problem{static_cast<const float*>(q.data()),
                                 q.strides(0) / 4,
                                 q.strides(1) / 4,
                                 static_cast<const float*>(k_cache.data()),
                                 k_cache.strides(0) / 4,
                                 k_cache.strides(1) / 4,
                                 k_cache.strides(2) / 4,
                                 static_cast<const float*>(v_cache.data()),
                                 v_cache.strides(0) / 4,
                                 v_cache.strides(1) / 4,
                                 v_cache.strides(2) / 4,
                                 batch,
                                 heads,
                                 head_dim,
                                 length,
                                 static_cast<float*>(out.mutable_data())};
  py::gil_scoped_release release;
  decode_attention_cpu(problem, num_threads);
}

}  // namespace

void bind_decode_attention(py::module_& m) {
  m.def("decode_attention_cpu", &decode_attention_numpy, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("length"), py::arg("out"), py::arg("num_threads"),
        "out[b, h] = softmax(q[b, h] . k_cache[b, h, :length]^T / sqrt(Dh)) . v_cache[b, h, :length], float32.\n"
        "q (B, H, Dh) and caches (B, H, S_max, Dh) contiguous along Dh, any other strides; out (B, H, Dh)\n"
        "C-contiguous. Fast layouts: caches contiguous, or views of (S_max, B, H, Dh) storage.");
}

}  // namespace jetfast
