#pragma once
// Argument checks shared by the bindings: a bad size must be a Python exception
// that prints what was received, never an out-of-bounds write.
#include <pybind11/numpy.h>

#include <string>

namespace jetfast {

// "(3, 4)" for an array of shape (3, 4); "(5,)" for a 1-D one.
inline std::string shape_of(const pybind11::array& a) {
  std::string s = "(";
  for (pybind11::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Raise ValueError(message) unless ok.
inline void require(bool ok, const std::string& message) {
  if (!ok) throw pybind11::value_error(message);
}

// Raise TypeError unless `a` holds float32.
inline void check_float32(const pybind11::array& a, const char* name) {
  if (a.dtype().kind() != 'f' || a.itemsize() != 4)
    throw pybind11::type_error(std::string(name) + " must be float32; got " + std::string(pybind11::str(a.dtype())));
}

// Raise TypeError unless `a` holds bfloat16 values: NumPy has no bfloat16, so such arrays come as
// their bits, 16-bit integers (torch's .view(torch.int16)).
inline void check_bf16_bits(const pybind11::array& a, const char* name) {
  if ((a.dtype().kind() != 'i' && a.dtype().kind() != 'u') || a.itemsize() != 2)
    throw pybind11::type_error(std::string(name) + " must be bfloat16 bits (int16); got " +
                               std::string(pybind11::str(a.dtype())));
}

}  // namespace jetfast
