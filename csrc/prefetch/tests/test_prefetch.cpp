// C++ tests of the prefetcher, run under ThreadSanitizer and AddressSanitizer +
// UndefinedBehaviorSanitizer (`make sanitize`). Reads the files make_files.py
// writes and checks every batch against an independent naive reference.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "prefetch/codecs.h"
#include "prefetch/prefetcher.h"

using namespace jetfast;

namespace {

int failures = 0;
#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (!(cond)) {                                               \
      ++failures;                                                \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                         \
      std::fprintf(stderr, "\n");                                \
    }                                                            \
  } while (0)

constexpr int64_t kJetFloats = 125 * 125 * 3;
std::string dir;
std::vector<float> expected;  // (N, 125, 125, 3)
int64_t num_jets = 0;

// Naive model-layout value of pixel (c, r, q) of jet n: padding, channels first, transform.
float reference_pixel(int64_t n, int c, int r, int q, const IntensityParams& p) {
  const int i = r - 1, j = q - 1;
  const float x = (i >= 0 && i < 125 && j >= 0 && j < 125) ? expected[n * kJetFloats + (i * 125 + j) * 3 + c] : 0.0f;
  return p.apply ? (std::log1p(x / p.scale[c]) - p.mean[c]) / p.std[c] : x;
}

bool batch_matches(const float* data, const std::vector<int64_t>& order, int64_t first, int64_t rows,
                   const IntensityParams& p) {
  for (int64_t b = 0; b < rows; ++b)
    for (int c = 0; c < 3; ++c)
      for (int r = 0; r < 128; ++r)
        for (int q = 0; q < 128; ++q) {
          const float got = data[((b * 3 + c) * 128 + r) * 128 + q];
          const float want = reference_pixel(order[first + b], c, r, q, p);
          if (!(std::fabs(got - want) <= 1e-5f * (1.0f + std::fabs(want)))) {
            std::fprintf(stderr, "jet %lld pixel (%d,%d,%d): got %g want %g\n", (long long)order[first + b], c, r,
                         q, got, want);
            return false;
          }
        }
  return true;
}

std::vector<int64_t> shuffled(int64_t n, unsigned seed) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(seed));
  return order;
}

void test_file_matches(const std::string& name) {
  IntensityParams transform;
  transform.apply = true;
  for (int c = 0; c < 3; ++c) {
    transform.scale[c] = 0.5f + c;
    transform.mean[c] = 0.1f * c;
    transform.std[c] = 1.5f;
  }
  for (const IntensityParams& params : {IntensityParams{}, transform}) {
    Prefetcher prefetcher(dir + "/" + name + ".h5", "X_jets", 4, 3, params);
    CHECK(prefetcher.index().num_jets == num_jets, "%s: %lld jets", name.c_str(), (long long)prefetcher.index().num_jets);
    for (unsigned epoch = 0; epoch < 3; ++epoch) {
      const std::vector<int64_t> order = shuffled(num_jets, epoch);
      const int64_t batch_size = 4 + epoch;
      prefetcher.start(order.data(), static_cast<int64_t>(order.size()), batch_size);
      std::vector<Prefetcher::Batch> held;  // hold every batch: a reused buffer would fail the checks
      for (;;) {
        Prefetcher::Batch batch = prefetcher.next();
        if (!batch.data) break;
        held.push_back(batch);
      }
      CHECK(static_cast<int64_t>(held.size()) == (num_jets + batch_size - 1) / batch_size, "%s: %zu batches",
            name.c_str(), held.size());
      for (size_t k = 0; k < held.size(); ++k) {
        CHECK(batch_matches(held[k].data, order, static_cast<int64_t>(k) * batch_size, held[k].rows, params),
              "%s epoch %u batch %zu", name.c_str(), epoch, k);
        prefetcher.pool()->release(held[k].data);
      }
    }
  }
  std::printf("ok  %s matches the reference\n", name.c_str());
}

void test_abandon_and_release_from_other_threads() {
  Prefetcher prefetcher(dir + "/lzf.h5", "X_jets", 3, 4, IntensityParams{});
  const std::vector<int64_t> order = shuffled(num_jets, 7);
  for (int round = 0; round < 100; ++round) {
    prefetcher.start(order.data(), static_cast<int64_t>(order.size()), 3);
    std::vector<std::thread> releasers;
    for (int k = 0; k < round % 5; ++k) {
      Prefetcher::Batch batch = prefetcher.next();
      // Another thread drops the batch, as Python's garbage collector may.
      releasers.emplace_back([pool = prefetcher.pool(), batch] { pool->release(batch.data); });
    }
    if (round % 2) prefetcher.stop();  // otherwise the next start() stops the epoch
    for (auto& t : releasers) t.join();
  }
  {
    Prefetcher doomed(dir + "/gzip_shuffle.h5", "X_jets", 2, 2, IntensityParams{});
    doomed.start(order.data(), static_cast<int64_t>(order.size()), 5);
    Prefetcher::Batch batch = doomed.next();
    doomed.pool()->release(batch.data);
  }  // destroyed mid-epoch
  std::printf("ok  abandoned epochs and destruction mid-epoch\n");
}

template <class Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

void drain(Prefetcher& prefetcher, const std::vector<int64_t>& order, int64_t batch_size) {
  prefetcher.start(order.data(), static_cast<int64_t>(order.size()), batch_size);
  for (;;) {
    Prefetcher::Batch batch = prefetcher.next();
    if (!batch.data) break;
    prefetcher.pool()->release(batch.data);
  }
}

void test_errors() {
  std::vector<int64_t> order(num_jets);
  std::iota(order.begin(), order.end(), 0);
  Prefetcher corrupt(dir + "/corrupt.h5", "X_jets", 2, 3, IntensityParams{});
  for (int repeat = 0; repeat < 2; ++repeat) {
    const std::string error = error_of([&] { drain(corrupt, order, 5); });
    CHECK(error.find("chunk 3") != std::string::npos && error.find("LZF") != std::string::npos, "got: %s",
          error.c_str());
  }

  const std::string truncated = dir + "/truncated.h5";
  {
    std::ifstream src(dir + "/lzf.h5", std::ios::binary);
    std::ofstream dst(truncated, std::ios::binary);
    dst << src.rdbuf();
  }
  Prefetcher reader(truncated, "X_jets", 2, 3, IntensityParams{});
  const ChunkLocation& loc = reader.index().chunks[4];
  CHECK(::truncate(truncated.c_str(), static_cast<off_t>(loc.address + 10)) == 0, "truncate failed");
  const std::string error = error_of([&] { drain(reader, order, 5); });
  CHECK(error.find("truncated") != std::string::npos && error.find("chunk 4") != std::string::npos, "got: %s",
        error.c_str());
  CHECK(!error_of([] { Prefetcher(dir + "/missing.h5", "X_jets", 1, 1, IntensityParams{}); }).empty(), "missing file");
  CHECK(!error_of([] { Prefetcher(dir + "/lzf.h5", "nope", 1, 1, IntensityParams{}); }).empty(), "missing dataset");
  std::vector<int64_t> bad = {0, num_jets};
  CHECK(!error_of([&] { drain(reader, bad, 2); }).empty(), "index out of range accepted");
  std::printf("ok  corrupt chunk, truncated file and bad input raise\n");
}

void test_codecs() {
  // Hand-made LZF stream: literal "ab", then a back reference of length 5 at distance 2.
  const uint8_t stream[] = {1, 'a', 'b', (3 << 5) | 0, 1};
  uint8_t out[7];
  lzf_decode(stream, sizeof stream, out, sizeof out);
  CHECK(std::memcmp(out, "abababa", 7) == 0, "lzf overlap copy");
  CHECK(!error_of([&] { lzf_decode(stream, sizeof stream, out, 6); }).empty(), "lzf output overrun accepted");
  CHECK(!error_of([&] { lzf_decode(stream, 2, out, 7); }).empty(), "lzf truncated stream accepted");
  const uint8_t shuffled_bytes[] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  uint8_t plain[9];
  unshuffle(shuffled_bytes, 9, 4, plain);
  const uint8_t want[] = {1, 3, 5, 7, 2, 4, 6, 8, 9};
  CHECK(std::memcmp(plain, want, 9) == 0, "unshuffle");
  std::printf("ok  codecs\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR (written by make_files.py)\n", argv[0]);
    return 2;
  }
  dir = argv[1];
  std::ifstream in(dir + "/expected.f32", std::ios::binary | std::ios::ate);
  num_jets = static_cast<int64_t>(in.tellg()) / (kJetFloats * 4);
  expected.resize(static_cast<size_t>(num_jets * kJetFloats));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(expected.data()), static_cast<std::streamsize>(expected.size() * 4));

  test_codecs();
  for (const char* name : {"lzf", "gzip_shuffle", "chunked_raw", "contiguous", "tiles"}) test_file_matches(name);
  test_abandon_and_release_from_other_threads();
  test_errors();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all prefetcher tests passed\n");
  return 0;
}
