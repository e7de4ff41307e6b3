#pragma once
#include <pybind11/pybind11.h>

namespace jetfast {
void bind_decode_blocks(pybind11::module_& m);
}
