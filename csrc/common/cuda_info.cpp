#include "common/cuda_info.h"

#ifdef JETFAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace jetfast {

bool built_with_cuda() {
#ifdef JETFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef JETFAST_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

}  // namespace jetfast
