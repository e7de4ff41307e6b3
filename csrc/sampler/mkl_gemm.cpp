// Run-time binding to MKL's GEMMs (see mkl_gemm.h).
#include "sampler/mkl_gemm.h"

#include <dlfcn.h>

#include <atomic>
#include <cstddef>
#include <limits>
#include <mutex>
#include <string>
#include <stdexcept>

namespace jetfast {
namespace {

// CBLAS's enumerations (mkl_cblas.h); MKL_INT is int in the LP64 interface PyTorch uses.
enum : int { kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162 };
using PackGetSize = size_t (*)(int identifier, int m, int n, int k);
using Pack = void (*)(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest);
using Compute = void (*)(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc);
using GemmBf16 = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                          int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);

struct Functions {
  PackGetSize get_size = nullptr;
  Pack pack = nullptr;
  Compute compute = nullptr;
  GemmBf16 gemm_bf16 = nullptr;  // optional
};

Functions functions;
std::atomic<bool> loaded{false};
std::mutex loading;

int to_int(int64_t value) {
  if (value < 0 || value > std::numeric_limits<int>::max())
    throw std::invalid_argument("MKL GEMM: a size of " + std::to_string(value) + " does not fit MKL's 32-bit ints");
  return static_cast<int>(value);
}

const Functions& require_loaded() {
  if (!loaded.load(std::memory_order_acquire))
    throw std::runtime_error("MKL GEMM: MKL's functions are not loaded (load_mkl_gemm)");
  return functions;
}

}  // namespace

bool load_mkl_gemm(const std::string& path) {
  std::lock_guard<std::mutex> lock(loading);
  if (loaded.load()) return true;
  void* library = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (library == nullptr) return false;
  Functions found;
  found.get_size = reinterpret_cast<PackGetSize>(dlsym(library, "cblas_sgemm_pack_get_size"));
  found.pack = reinterpret_cast<Pack>(dlsym(library, "cblas_sgemm_pack"));
  found.compute = reinterpret_cast<Compute>(dlsym(library, "cblas_sgemm_compute"));
  found.gemm_bf16 = reinterpret_cast<GemmBf16>(dlsym(library, "cblas_gemm_bf16bf16f32"));
  if (!found.get_size || !found.pack || !found.compute) {
    dlclose(library);
    return false;
  }
  // The handle stays open: the library is the process's own and outlives every caller.
  functions = found;
  loaded.store(true, std::memory_order_release);
  return true;
}

bool has_mkl_packed_sgemm() { return loaded.load(std::memory_order_acquire); }
bool has_mkl_bf16_gemm() { return has_mkl_packed_sgemm() && functions.gemm_bf16 != nullptr; }

int64_t packed_weight_floats(int64_t rows, int64_t out, int64_t in) {
  const size_t bytes = require_loaded().get_size(kBMatrix, to_int(rows), to_int(out), to_int(in));
  return static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float));
}

void pack_weight(const float* w, int64_t rows, int64_t out, int64_t in, float* packed) {
  // B = w^T (in, out): w row-major (out, in) read transposed, leading dimension in.
  require_loaded().pack(kRowMajor, kBMatrix, kTrans, to_int(rows), to_int(out), to_int(in), 1.0f, w, to_int(in),
                        packed);
}

void packed_sgemm(const float* x, const float* packed, float* y, int64_t rows, int64_t out, int64_t in, float beta) {
  require_loaded().compute(kRowMajor, kNoTrans, kPacked, to_int(rows), to_int(out), to_int(in), x, to_int(in), packed,
                           to_int(in), beta, y, to_int(out));
}

void bf16_gemm(const uint16_t* x, const uint16_t* w, float* y, int64_t rows, int64_t out, int64_t in, float beta) {
  const Functions& f = require_loaded();
  if (f.gemm_bf16 == nullptr) throw std::runtime_error("MKL GEMM: this MKL has no cblas_gemm_bf16bf16f32");
  f.gemm_bf16(kRowMajor, kNoTrans, kTrans, to_int(rows), to_int(out), to_int(in), 1.0f, x, to_int(in), w, to_int(in),
              beta, y, to_int(out));
}

}  // namespace jetfast
