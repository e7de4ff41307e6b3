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

}  // namespace jetfast
