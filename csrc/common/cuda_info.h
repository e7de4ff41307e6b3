#pragma once
// Whether this build carries CUDA kernels, and how many devices the runtime sees.
// A CUDA build must load and run its CPU paths on a machine with no driver, so the
// device count swallows every runtime error and reports 0.
namespace jetfast {
bool built_with_cuda();
int cuda_device_count();
}  // namespace jetfast
