// Python face of the fused CPU decode step: DecodeBlocks holds the blocks' weights
// and caches (NumPy views of the model's tensors, kept alive here) and runs a step
// per call. Every size is checked when it is made, so step() cannot read or write
// out of bounds.
#include "sampler/decode_blocks_bind.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "attention/decode_attention.h"
#include "common/array_checks.h"
#include "common/cpu_features.h"
#include "sampler/decode_blocks.h"
#include "sampler/mkl_gemm.h"

namespace py = pybind11;

namespace jetfast {
namespace {

const char* const kNames[] = {"ln_1.weight", "ln_1.bias", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
                              "ln_2.weight", "ln_2.bias", "fc.weight",  "fc.bias",  "out.weight",  "out.bias",
                              "k_cache",     "v_cache"};

// The arrays that are bfloat16 with bf16: the four weight matrices and the two caches.
bool is_low_precision(int j) { return j == 2 || j == 4 || j == 8 || j == 10 || j == 12 || j == 13; }

class DecodeBlocks {
 public:
  DecodeBlocks(const std::vector<std::vector<py::array>>& blocks, const std::vector<std::pair<float, float>>& eps,
               int64_t heads, bool bf16, bool gemm)
      : arrays_(blocks) {
    require(!bf16 || cpu_has_avx2_fma(), "bfloat16 weights need a CPU with AVX2 and FMA (and a build with their kernels)");
    require(!gemm || has_mkl_packed_sgemm(),
            "gemm=True needs MKL's functions: call load_mkl_gemm(path of PyTorch's CPU library) first");
    require(!(gemm && bf16) || has_mkl_bf16_gemm(), "gemm=True in bfloat16 needs MKL's cblas_gemm_bf16bf16f32");
    require(!blocks.empty(), "DecodeBlocks needs at least one block");
    require(eps.size() == blocks.size(), "one (ln_1 eps, ln_2 eps) pair per block");
    for (const auto& a : blocks)
      require(a.size() == 14, "each block is 14 arrays: ln_1, qkv, proj, ln_2, fc, out (weight, bias) and the caches");
    const py::array& k = blocks[0][12];
    require(k.ndim() == 4, "k_cache must be the cache storage (S_max, B, H, Dh); got " + shape_of(k));
    shape_ = {k.shape(1), k.shape(2) * k.shape(3), k.shape(2), k.shape(3), 0, k.shape(0), bf16, gemm};
    require(!bf16 || avx2_head_dim_supported(shape_.head_dim),
            std::string("bfloat16 caches need a head size of ") + kAvx2HeadDims + "; got " +
                std::to_string(shape_.head_dim));
    require(heads == shape_.heads, "caches have " + std::to_string(shape_.heads) + " heads; the model " +
                                       std::to_string(heads));
    const int64_t C = shape_.width;
    for (size_t i = 0; i < blocks.size(); ++i) {
      const auto& a = blocks[i];
      for (int j = 0; j < 14; ++j) {
        if (bf16 && is_low_precision(j))
          check_bf16_bits(a[j], kNames[j]);
        else
          check_float32(a[j], kNames[j]);
        require(a[j].flags() & py::array::c_style, std::string(kNames[j]) + " must be C-contiguous");
      }
      const int64_t hidden = a[8].ndim() == 2 ? a[8].shape(0) : -1;
      if (i == 0) shape_.hidden = hidden;
      auto expect = [&](int j, std::vector<int64_t> dims) {
        bool ok = a[j].ndim() == static_cast<py::ssize_t>(dims.size());
        for (size_t d = 0; ok && d < dims.size(); ++d) ok = a[j].shape(d) == dims[d];
        std::string want = "(";
        for (size_t d = 0; d < dims.size(); ++d) want += (d ? ", " : "") + std::to_string(dims[d]);
        require(ok, std::string("block ") + std::to_string(i) + ": " + kNames[j] + " must be " + want +
                        (dims.size() == 1 ? ",)" : ")") + "; got " + shape_of(a[j]));
      };
      expect(0, {C}), expect(1, {C}), expect(2, {3 * C, C}), expect(3, {3 * C}), expect(4, {C, C}), expect(5, {C});
      expect(6, {C}), expect(7, {C}), expect(8, {shape_.hidden, C}), expect(9, {shape_.hidden});
      expect(10, {C, shape_.hidden}), expect(11, {C});
      expect(12, {shape_.max_len, shape_.batch, shape_.heads, shape_.head_dim});
      expect(13, {shape_.max_len, shape_.batch, shape_.heads, shape_.head_dim});
      for (int j : {12, 13}) require(a[j].writeable(), std::string(kNames[j]) + " must be writable");
      auto p = [&](int j) { return static_cast<const float*>(a[j].data()); };
      auto w = [&](int j) { return const_cast<void*>(a[j].data()); };
      blocks_.push_back({p(0), p(1), a[2].data(), p(3), a[4].data(), p(5), p(6), p(7), a[8].data(), p(9), a[10].data(),
                         p(11), w(12), w(13), eps[i].first, eps[i].second});
      if (gemm && !bf16) {
        // Copies in MKL's layout for this batch: a parameter changed afterwards needs new DecodeBlocks.
        const int64_t rows = shape_.batch, F = shape_.hidden;
        DecodeBlock& block = blocks_.back();
        block.qkv_packed = pack(p(2), rows, 3 * C, C);
        block.proj_packed = pack(p(4), rows, C, C);
        block.fc_packed = pack(p(8), rows, F, C);
        block.out_packed = pack(p(10), rows, C, F);
      }
    }
    scratch_.resize(decode_blocks_scratch(shape_));
  }

  const float* pack(const float* w, int64_t rows, int64_t out, int64_t in) {
    // 64-byte aligned, as PyTorch's own packings are: MKL's kernels read them in cache lines.
    const size_t bytes = (static_cast<size_t>(packed_weight_floats(rows, out, in)) * sizeof(float) + 63) / 64 * 64;
    float* buffer = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (buffer == nullptr) throw std::bad_alloc();
    packed_.emplace_back(buffer, &std::free);
    pack_weight(w, rows, out, in, buffer);
    return buffer;
  }

  void step(py::array& x, int64_t pos, int num_threads) {
    check_float32(x, "x");
    require(x.ndim() == 2 && x.shape(0) == shape_.batch && x.shape(1) == shape_.width &&
                (x.flags() & py::array::c_style) && x.writeable(),
            "x must be a writable C-contiguous (" + std::to_string(shape_.batch) + ", " +
                std::to_string(shape_.width) + ") array; got " + shape_of(x));
    require(0 <= pos && pos < shape_.max_len,
            "position " + std::to_string(pos) + " is outside the cache of " + std::to_string(shape_.max_len));
    float* data = static_cast<float*>(x.mutable_data());
    py::gil_scoped_release release;
    decode_blocks_cpu(shape_, blocks_, data, pos, scratch_.data(), num_threads);
  }

 private:
  std::vector<std::vector<py::array>> arrays_;  // keeps the buffers alive
  std::vector<DecodeBlock> blocks_;
  DecodeShape shape_{};
  std::vector<float> scratch_;
  std::vector<std::unique_ptr<float, decltype(&std::free)>> packed_;  // the packed weights of a float32 gemm
};

}  // namespace

void bind_decode_blocks(py::module_& m) {
  m.attr("decode_blocks_bf16") = py::bool_(cpu_has_avx2_fma());  // DecodeBlocks takes bf16=True here
  m.def("load_mkl_gemm", &load_mkl_gemm, py::arg("path"),
        "Resolve MKL's GEMMs (cblas_sgemm_pack and _compute; cblas_gemm_bf16bf16f32 if there) from the\n"
        "already-loaded shared library at path (PyTorch's CPU library); True if the float32 ones were found.\n"
        "Needed by DecodeBlocks(gemm=True).");
  m.def("has_mkl_bf16_gemm", &has_mkl_bf16_gemm, "Whether load_mkl_gemm found MKL's bfloat16 GEMM.");
  py::class_<DecodeBlocks>(m, "DecodeBlocks",
                           "The Transformer blocks of a cached decode step, fused (CPU).\n"
                           "DecodeBlocks(blocks, eps, heads, bf16=False, gemm=False): per block 14 arrays (ln_1 weight, bias; qkv\n"
                           "weight, bias; proj weight, bias; ln_2 weight, bias; fc weight, bias; out weight, bias; k\n"
                           "and v cache storage (S_max, B, H, Dh)), one (ln_1 eps, ln_2 eps) pair per block. float32,\n"
                           "or with bf16 the four weights and the caches bfloat16, given as int16 bits. With gemm (for\n"
                           "batches of GEMM size; load_mkl_gemm first) the products are MKL's GEMMs: in float32 on\n"
                           "copies of the four weights packed for the caches' batch, in bf16 on bf16 weights and inputs.")
      .def(py::init<const std::vector<std::vector<py::array>>&, const std::vector<std::pair<float, float>>&, int64_t,
                    bool, bool>(),
           py::arg("blocks"), py::arg("eps"), py::arg("heads"), py::arg("bf16") = false, py::arg("gemm") = false)
      .def("step", &DecodeBlocks::step, py::arg("x"), py::arg("pos"), py::arg("num_threads"),
           "Run every block on x (B, C) in place for the token at position pos (writing its keys and values).");
}

}  // namespace jetfast
