// Python face of CPU decode attention. jetfast/kernels/decode_attention.py checks
// the tensors; the checks here guard every size that could read or write out of
// bounds.
#include "attention/decode_attention_bind.h"

#include <pybind11/numpy.h>

#include <string>

#include "attention/decode_attention.h"
#include "common/array_checks.h"
#include "common/cpu_features.h"

namespace py = pybind11;

namespace jetfast {
namespace {

void decode_attention_numpy(const py::array& q, const py::array& k_cache, const py::array& v_cache, int64_t length,
                            py::array& out, int num_threads, const py::object& k_new, const py::object& v_new) {
  check_float32(q, "q");
  check_float32(out, "out");
  // Caches of float32, or of bfloat16 (as int16 bits), widened to float32 as they are read.
  const bool bf16 = k_cache.itemsize() == 2;
  if (bf16) {
    check_bf16_bits(k_cache, "k_cache");
    check_bf16_bits(v_cache, "v_cache");
    require(cpu_has_avx2_fma(), "bfloat16 caches need a CPU with AVX2 and FMA (and a build with their kernels)");
  } else {
    check_float32(k_cache, "k_cache");
    check_float32(v_cache, "v_cache");
  }
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
    const int64_t item = a->itemsize();
    bool ok = a->strides(a->ndim() - 1) == item;
    for (int i = 0; i + 1 < a->ndim(); ++i) ok = ok && a->strides(i) >= 0 && a->strides(i) % item == 0;
    require(ok, "q, k_cache and v_cache must be contiguous along Dh, with non-negative strides");
  }
  require(!bf16 || avx2_head_dim_supported(head_dim),
          std::string("bfloat16 caches need a head size of ") + kAvx2HeadDims + "; got " + std::to_string(head_dim));
  require(out.ndim() == 3 && (out.flags() & py::array::c_style) && out.writeable() && out.shape(0) == batch &&
              out.shape(1) == heads && out.shape(2) == head_dim,
          "out must be a writable C-contiguous array of shape " + shape_of(q));
  require(1 <= length && length <= max_len,
          "need 1 <= length <= S_max=" + std::to_string(max_len) + "; got " + std::to_string(length));
  const int64_t k_item = k_cache.itemsize(), v_item = v_cache.itemsize();
  DecodeAttentionProblem problem{static_cast<const float*>(q.data()),
                                 q.strides(0) / 4,
                                 q.strides(1) / 4,
                                 bf16 ? nullptr : static_cast<const float*>(k_cache.data()),
                                 k_cache.strides(0) / k_item,
                                 k_cache.strides(1) / k_item,
                                 k_cache.strides(2) / k_item,
                                 bf16 ? nullptr : static_cast<const float*>(v_cache.data()),
                                 v_cache.strides(0) / v_item,
                                 v_cache.strides(1) / v_item,
                                 v_cache.strides(2) / v_item,
                                 batch,
                                 heads,
                                 head_dim,
                                 length,
                                 static_cast<float*>(out.mutable_data())};
  if (bf16) {
    problem.k_cache_bf16 = static_cast<const uint16_t*>(k_cache.data());
    problem.v_cache_bf16 = static_cast<const uint16_t*>(v_cache.data());
  }
  require(k_new.is_none() == v_new.is_none(), "pass both k_new and v_new, or neither");
  if (!k_new.is_none()) {
    const auto k = py::cast<py::array>(k_new), v = py::cast<py::array>(v_new);
    require(!bf16 && k_cache.writeable() && v_cache.writeable(),
            "k_new and v_new are written into float32 caches, which must be writable");
    check_float32(k, "k_new");
    check_float32(v, "v_new");
    for (const py::array* a : {&k, &v})
      require(a->ndim() == 3 && a->shape(0) == batch && a->shape(1) == heads && a->shape(2) == head_dim &&
                  a->strides(2) == 4 && a->strides(0) >= 0 && a->strides(1) >= 0 && a->strides(0) % 4 == 0 &&
                  a->strides(1) % 4 == 0,
              "k_new and v_new must be (B, H, Dh) = " + shape_of(q) + ", contiguous along Dh; got " + shape_of(*a));
    require(k.strides(0) == v.strides(0) && k.strides(1) == v.strides(1), "k_new and v_new must have one layout");
    problem.k_new = static_cast<const float*>(k.data());
    problem.v_new = static_cast<const float*>(v.data());
    problem.new_stride_b = k.strides(0) / 4;
    problem.new_stride_h = k.strides(1) / 4;
  }
  py::gil_scoped_release release;
  decode_attention_cpu(problem, num_threads);
}

}  // namespace

void bind_decode_attention(py::module_& m) {
  m.attr("decode_attention_bf16") = py::bool_(cpu_has_avx2_fma());  // decode_attention_cpu takes bf16 caches here
  py::list head_dims;  // ... of these head sizes
  for (int64_t d = 1; d <= 256; ++d)
    if (avx2_head_dim_supported(d)) head_dims.append(d);
  m.attr("decode_attention_bf16_head_dims") = py::tuple(head_dims);
  m.def("decode_attention_cpu", &decode_attention_numpy, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("length"), py::arg("out"), py::arg("num_threads"), py::arg("k_new") = py::none(),
        py::arg("v_new") = py::none(),
        "out[b, h] = softmax(q[b, h] . k_cache[b, h, :length]^T / sqrt(Dh)) . v_cache[b, h, :length], float32.\n"
        "With k_new and v_new (B, H, Dh) float32, they are first written at position length - 1 of the\n"
        "(float32, writable) caches: a decode step's append and attention in one call.\n"
        "Caches float32, or bfloat16 given as int16 bits (where decode_attention_bf16 is True), read as float32.\n"
        "q (B, H, Dh) and caches (B, H, S_max, Dh) contiguous along Dh, any other strides; out (B, H, Dh)\n"
        "C-contiguous. Fast layouts: caches contiguous, or views of (S_max, B, H, Dh) storage.");
}

}  // namespace jetfast
