#pragma once
#include <pybind11/pybind11.h>

namespace jetfast {
// Registers jetfast._C.Prefetcher and its exceptions (ReadError, UnsupportedLayout).
void bind_prefetch(pybind11::module_& m);
}  // namespace jetfast
