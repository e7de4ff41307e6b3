#pragma once
// A minimal parallel-for over [0, n) in contiguous blocks on std::threads.
// The compiled module does not link libtorch or OpenMP; the caller passes the
// thread count (jetfast uses torch.get_num_threads() by default).
#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace jetfast {

template <class Fn>
void parallel_for(int64_t n, int num_threads, int64_t min_block, Fn&& fn) {
  if (n <= 0) return;
  int64_t max_threads = std::max<int64_t>(1, (n + min_block - 1) / std::max<int64_t>(1, min_block));
  int threads = static_cast<int>(std::min<int64_t>(std::max(1, num_threads), max_threads));
  if (threads == 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(threads);
  int64_t block = (n + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    int64_t begin = t * block, end = std::min(n, begin + block);
    if (begin >= end) break;
    pool.emplace_back([&, t, begin, end] {
      try {
        fn(begin, end);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace jetfast
