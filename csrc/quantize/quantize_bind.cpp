// Python face of the quantizer. Takes NumPy arrays (CPU) or raw device pointers
// (CUDA); the torch-facing checks live in jetfast/ops.py and are repeated here
// wherever a wrong size could write out of bounds.
#include "quantize/quantize_bind.h"

#include <pybind11/numpy.h>

#include <stdexcept>
#include <string>

#include "common/array_checks.h"
#include "quantize/quantize.h"

namespace py = pybind11;

namespace jetfast {
namespace {

CodeType code_type_of(const py::array& codes) {
  const auto kind = codes.dtype().kind();
  const auto size = codes.itemsize();
  if (kind == 'u' && size == 1) return CodeType::kUInt8;
  if (kind == 'i' && size == 2) return CodeType::kInt16;
  if (kind == 'i' && size == 4) return CodeType::kInt32;
  throw py::type_error("codes must be uint8, int16 or int32; got " + std::string(py::str(codes.dtype())));
}

int64_t quantize_numpy(const py::array& z, const py::array& centers, py::array& codes, int num_threads) {
  check_float32(z, "z");
  check_float32(centers, "centers");
  require(z.ndim() == 2, "z must be (N, D); got shape " + shape_of(z));
  require(centers.ndim() == 2 && (centers.flags() & py::array::c_style),
          "centers must be a C-contiguous (D, K) array; got shape " + shape_of(centers));
  require(codes.ndim() == 2 && (codes.flags() & py::array::c_style) && codes.writeable(),
          "codes must be a writable C-contiguous (N, D) array; got shape " + shape_of(codes));
  const int64_t n = z.shape(0), d = z.shape(1), k = centers.shape(1);
  require(centers.shape(0) == d, "centers has " + std::to_string(centers.shape(0)) + " rows but z has D=" +
                                     std::to_string(d) + " columns");
  require(codes.shape(0) == n && codes.shape(1) == d,
          "codes has shape " + shape_of(codes) + "; expected " + shape_of(z));
  const CodeType code_type = code_type_of(codes);
  const int64_t stride_n = z.strides(0) / 4, stride_d = z.strides(1) / 4;
  require(z.strides(0) % 4 == 0 && z.strides(1) % 4 == 0, "z strides must be multiples of 4 bytes");
  const float* z_data = static_cast<const float*>(z.data());
  const float* centers_data = static_cast<const float*>(centers.data());
  void* codes_data = codes.mutable_data();
  py::gil_scoped_release release;
  return quantize_cpu(z_data, n, d, stride_n, stride_d, centers_data, k, codes_data, code_type, num_threads);
}

int64_t dequantize_numpy(const py::array& codes, const py::array& centers, py::array& z_hat, int num_threads) {
  check_float32(centers, "centers");
  check_float32(z_hat, "z_hat");
  require(codes.ndim() == 2 && (codes.flags() & py::array::c_style),
          "codes must be a C-contiguous (N, D) array; got shape " + shape_of(codes));
  require(centers.ndim() == 2 && (centers.flags() & py::array::c_style),
          "centers must be a C-contiguous (D, K) array; got shape " + shape_of(centers));
  const int64_t n = codes.shape(0), d = codes.shape(1), k = centers.shape(1);
  require(centers.shape(0) == d, "centers has " + std::to_string(centers.shape(0)) + " rows but codes has D=" +
                                     std::to_string(d) + " columns");
  require(z_hat.ndim() == 2 && (z_hat.flags() & py::array::c_style) && z_hat.writeable() && z_hat.shape(0) == n &&
              z_hat.shape(1) == d,
          "z_hat must be a writable C-contiguous array of shape " + shape_of(codes));
  const CodeType code_type = code_type_of(codes);
  const void* codes_data = codes.data();
  const float* centers_data = static_cast<const float*>(centers.data());
  float* out = static_cast<float*>(z_hat.mutable_data());
  py::gil_scoped_release release;
  return dequantize_cpu(codes_data, code_type, n, d, centers_data, k, out, num_threads);
}

}  // namespace

void bind_quantize(py::module_& m) {
  m.def("quantize_cpu", &quantize_numpy, py::arg("z"), py::arg("centers"), py::arg("codes"), py::arg("num_threads"),
        "Nearest-bin codes of z (N, D) float32 against sorted centers (D, K) into codes (N, D).\n"
        "Returns the flat index of a NaN in z, or -1.");
  m.def("dequantize_cpu", &dequantize_numpy, py::arg("codes"), py::arg("centers"), py::arg("z_hat"),
        py::arg("num_threads"),
        "z_hat[n, d] = centers[d, codes[n, d]]. Returns the flat index of an out-of-range code, or -1.");
  m.attr("max_dims") = kMaxDims;
  m.attr("max_bins") = kMaxBins;
#ifdef JETFAST_WITH_CUDA
  m.def(
      "quantize_cuda",
      [](std::uintptr_t z, int64_t n, int64_t d, int64_t stride_n, int64_t stride_d, std::uintptr_t centers, int64_t k,
         std::uintptr_t table, std::uintptr_t codes, int code_type, std::uintptr_t error_flag, std::uintptr_t stream) {
        require(n >= 0 && d >= 1 && d <= kMaxDims && k >= 2 && k <= kMaxBins && code_type >= 0 && code_type <= 2,
                "quantize_cuda: sizes out of range");
        py::gil_scoped_release release;
        quantize_cuda(reinterpret_cast<const float*>(z), n, d, stride_n, stride_d, reinterpret_cast<const float*>(centers),
                      k, reinterpret_cast<double*>(table), reinterpret_cast<void*>(codes),
                      static_cast<CodeType>(code_type), reinterpret_cast<int32_t*>(error_flag), stream);
      },
      "CUDA quantize on device pointers, launched on `stream`.");
  m.def(
      "dequantize_cuda",
      [](std::uintptr_t codes, int code_type, int64_t n, int64_t d, std::uintptr_t centers, int64_t k,
         std::uintptr_t z_hat, std::uintptr_t error_flag, std::uintptr_t stream) {
        require(n >= 0 && d >= 1 && d <= kMaxDims && k >= 2 && k <= kMaxBins && code_type >= 0 && code_type <= 2,
                "dequantize_cuda: sizes out of range");
        py::gil_scoped_release release;
        dequantize_cuda(reinterpret_cast<const void*>(codes), static_cast<CodeType>(code_type), n, d,
                        reinterpret_cast<const float*>(centers), k, reinterpret_cast<float*>(z_hat),
                        reinterpret_cast<int32_t*>(error_flag), stream);
      },
      "CUDA dequantize on device pointers, launched on `stream`.");
#endif
}

}  // namespace jetfast
