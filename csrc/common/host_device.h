#pragma once
// Functions marked JETFAST_HD compile for the host and, under nvcc, for the device,
// so math shared by the CPU path and the CUDA kernel is written once.
//
// They are `static`: each translation unit keeps its own copy, so a copy compiled
// with -mavx512f (quantize_avx512.cpp) can never be the one the linker hands to
// code that runs on CPUs without AVX-512.
#if defined(__CUDACC__)
#define JETFAST_HD static __host__ __device__ __forceinline__
#else
#define JETFAST_HD static inline
#endif
