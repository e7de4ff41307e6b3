#pragma once
// The multithreaded batch prefetcher behind jetfast.data.JetLoader.
//
// One epoch = an order of file indices cut into batches. Worker threads claim
// batches in order, at most `prefetch` ahead of the consumer, and for each one
// pread the raw chunks it needs, decode them (LZF / deflate / shuffle, no lock)
// and write every jet straight into a (B, 3, 128, 128) float32 buffer in model
// layout: padded 125 -> 128, channels first, intensity transform applied.
// A chunk needed by two batches (a shuffle window cut by a batch boundary) is
// decoded once and kept until its last batch has used it.
//
// Buffers come from a BufferPool. next() hands a buffer to the caller, who gives
// it back with BufferPool::release when done with it (the Python binding does so
// when the last NumPy/torch reference dies), so a batch stays valid while held.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "prefetch/hdf5_index.h"

namespace jetfast {

constexpr int64_t kModelSize = 128;  // pixels per side in model layout
constexpr int64_t kPadBefore = 1;    // 125 -> 128: one row/column before, two after
constexpr int64_t kImageSize = 125;
constexpr int64_t kChannels = 3;
constexpr int64_t kModelJetFloats = kChannels * kModelSize * kModelSize;

// Per channel t = (log1p(x / scale) - mean) / std; `apply` false = physical units.
struct IntensityParams {
  bool apply = false;
  float scale[3] = {1, 1, 1}, mean[3] = {0, 0, 0}, std[3] = {1, 1, 1};
};

// Reusable batch buffers of one size. Shared (shared_ptr) between the prefetcher
// and every buffer on loan, so a buffer returned after the prefetcher is gone
// still finds its pool.
class BufferPool {
 public:
  BufferPool(int64_t floats, size_t keep) : floats_(floats), keep_(keep) {}
  ~BufferPool();
  float* acquire();
  void release(float* buffer);
  int64_t floats() const { return floats_; }
  int64_t allocated() const;  // buffers created so far (reuse keeps this small)

 private:
  const int64_t floats_;
  const size_t keep_;
  mutable std::mutex mutex_;
  std::vector<float*> free_;
  int64_t allocated_ = 0;
};

// Writes one file-layout jet (125, 125, 3) as (3, 128, 128) model layout.
void write_model_jet(const float* jet, float* out, const IntensityParams& params);

class Prefetcher {
 public:
  Prefetcher(const std::string& path, const std::string& name, int num_threads, int prefetch,
             const IntensityParams& params);
  ~Prefetcher();
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  // Starts an epoch over `order` (file indices, each < num_jets) in batches of
  // `batch_size`; stops any epoch still running first.
  void start(const int64_t* order, int64_t count, int64_t batch_size);

  struct Batch {
    float* data = nullptr;  // owned by the caller until released to pool()
    int64_t rows = 0;       // 0: the epoch is over
  };
  // Blocks until the next batch is ready; throws ReadError when it failed.
  Batch next();
  // Stops and joins the workers; idempotent.
  void stop();

  const DatasetIndex& index() const { return index_; }
  std::shared_ptr<BufferPool> pool() const { return pool_; }

 private:
  struct Piece {
    int64_t chunk, row, position;  // chunk row, jet within it, position within the batch
  };
  struct Slot {
    float* buffer = nullptr;
    bool ready = false;
    std::string error;
  };
  struct CachedChunk {
    enum class State { kDecoding, kReady, kFailed } state = State::kDecoding;
    std::shared_ptr<uint8_t[]> bytes;
    int remaining = 0;  // batches still to use it
    std::string error;
  };
  struct Scratch {
    std::vector<uint8_t> raw, stage, piece, decoded;
    std::shared_ptr<uint8_t[]> row;  // a chunk row only this batch needs
    uint64_t row_capacity = 0;
  };

  void worker();
  void fill_batch(int64_t batch, float* out, Scratch& scratch);
  // One stored chunk (flat index over the chunk grid) -> chunk_bytes() in dst.
  void decode_chunk(int64_t chunk, uint8_t* dst, Scratch& scratch);
  // Chunk row `row` (chunk_rows whole jets, channels last) -> row_bytes() in dst.
  void decode_row(int64_t row, uint8_t* dst, Scratch& scratch);
  const uint8_t* acquire_row(int64_t row, Scratch& scratch, std::shared_ptr<uint8_t[]>& hold);
  void release_row(int64_t row);
  void read_exact(uint64_t offset, uint64_t size, uint8_t* dst, const std::string& what);
  std::string chunk_context(int64_t chunk) const;

  DatasetIndex index_;
  IntensityParams params_;
  int num_threads_, prefetch_;
  int fd_ = -1;
  std::shared_ptr<BufferPool> pool_;

  // The running epoch.
  int64_t batch_size_ = 0, num_batches_ = 0;
  std::vector<std::vector<Piece>> plans_;  // per batch, sorted by chunk
  std::vector<int> chunk_users_;           // per chunk row: batches that need it
  std::vector<Slot> slots_;
  int64_t next_claim_ = 0, next_deliver_ = 0;
  std::atomic<bool> stopping_{false};  // also read by workers waiting on cache_cv_
  bool failed_ = false;
  std::mutex mutex_;
  std::condition_variable work_cv_, ready_cv_;
  std::vector<std::thread> threads_;

  std::mutex cache_mutex_;
  std::condition_variable cache_cv_;
  std::unordered_map<int64_t, CachedChunk> cache_;
  std::vector<std::shared_ptr<uint8_t[]>> free_rows_;  // decoded-row buffers to reuse
};

}  // namespace jetfast
