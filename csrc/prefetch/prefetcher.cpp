#include "prefetch/prefetcher.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "prefetch/codecs.h"

namespace jetfast {

// ---- buffers ----------------------------------------------------------------------------

namespace {

// Batch and chunk-row buffers are tens of MB and written or read in scattered
// pieces; on 2 MiB pages (transparent huge pages, on request) those pieces stop
// costing a TLB miss each, which for chunks that cut the images is most of the time.
void* allocate_large(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  const bool huge = bytes >= 2 * kHuge;
  const size_t align = huge ? kHuge : 64;
  const size_t size = (std::max<size_t>(bytes, 1) + align - 1) / align * align;
  void* p = std::aligned_alloc(align, size);
  if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (huge) madvise(p, size, MADV_HUGEPAGE);  // a hint: failure only costs speed
#endif
  return p;
}

std::shared_ptr<uint8_t[]> allocate_row(size_t bytes) {
  return std::shared_ptr<uint8_t[]>(static_cast<uint8_t*>(allocate_large(bytes)), [](uint8_t* p) { std::free(p); });
}

}  // namespace

BufferPool::~BufferPool() {
  for (float* b : free_) std::free(b);
}

float* BufferPool::acquire() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!free_.empty()) {
      float* b = free_.back();
      free_.pop_back();
      return b;
    }
    ++allocated_;
  }
  float* b = static_cast<float*>(allocate_large(static_cast<size_t>(floats_) * sizeof(float)));
  // NaN poison: a pixel the writer forgets shows up in every comparison.
  std::fill(b, b + floats_, std::numeric_limits<float>::quiet_NaN());
  return b;
}

void BufferPool::release(float* buffer) {
  if (!buffer) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.size() < keep_) {
      free_.push_back(buffer);
      return;
    }
  }
  std::free(buffer);
}

int64_t BufferPool::allocated() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return allocated_;
}

// ---- layout + transform -----------------------------------------------------------------

namespace {

// The module is built for baseline x86-64; these loops get AVX2/AVX-512 clones
// chosen at load time (GCC/Clang function multiversioning).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(__SANITIZE_THREAD__)
#define JETFAST_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define JETFAST_VECTOR_CLONES
#endif

// Physical units: a straight transpose, channels last -> first, into the padded frame.
JETFAST_VECTOR_CLONES void write_jet_physical(const float* jet, float* out) {
  constexpr int64_t S = kModelSize, N = kImageSize, C = kChannels;
  for (int c = 0; c < C; ++c) {
    float* plane = out + c * S * S;
    std::fill(plane, plane + kPadBefore * S, 0.0f);
    std::fill(plane + (kPadBefore + N) * S, plane + S * S, 0.0f);
  }
  for (int64_t i = 0; i < N; ++i) {
    const float* src = jet + i * N * C;
    float* r0 = out + (i + kPadBefore) * S;
    float* r1 = r0 + S * S;
    float* r2 = r1 + S * S;
    for (float* r : {r0, r1, r2}) {
      std::fill(r, r + kPadBefore, 0.0f);
      std::fill(r + kPadBefore + N, r + S, 0.0f);
    }
    for (int64_t j = 0; j < N; ++j) {
      r0[kPadBefore + j] = src[j * C];
      r1[kPadBefore + j] = src[j * C + 1];
      r2[kPadBefore + j] = src[j * C + 2];
    }
  }
}

// With the transform: jet images are ~98% empty pixels, and an empty pixel maps to
// the padding value (the transform of zero energy). So fill the three planes with
// that value, then scan the channels-last source 16 floats at a time and pay for
// log1p only on lit pixels (about 25% faster than transforming every pixel).
JETFAST_VECTOR_CLONES void write_jet_transformed(const float* jet, float* out, const IntensityParams& p) {
  constexpr int64_t S = kModelSize, N = kImageSize, C = kChannels, kRow = N * C, kGroup = 16;
  float pad[C];
  for (int c = 0; c < C; ++c) pad[c] = (0.0f - p.mean[c]) / p.std[c];
  for (int c = 0; c < C; ++c) std::fill(out + c * S * S, out + (c + 1) * S * S, pad[c]);
  auto put = [&](int64_t i, int64_t k, float x) {
    const int64_t j = k / C, c = k - j * C;
    out[(c * S + i + kPadBefore) * S + j + kPadBefore] = (std::log1p(x / p.scale[c]) - p.mean[c]) / p.std[c];
  };
  for (int64_t i = 0; i < N; ++i) {
    const float* src = jet + i * kRow;
    int64_t k = 0;
    for (; k + kGroup <= kRow; k += kGroup) {
      uint32_t bits[kGroup];
      std::memcpy(bits, src + k, sizeof bits);
      uint32_t any = 0;
      for (int64_t q = 0; q < kGroup; ++q) any |= bits[q];
      if (!any) continue;
      for (int64_t q = 0; q < kGroup; ++q)
        if (bits[q]) put(i, k + q, src[k + q]);
    }
    for (; k < kRow; ++k)
      if (src[k] != 0.0f) put(i, k, src[k]);
  }
}

}  // namespace

void write_model_jet(const float* jet, float* out, const IntensityParams& params) {
  if (params.apply)
    write_jet_transformed(jet, out, params);
  else
    write_jet_physical(jet, out);
}

// ---- prefetcher -------------------------------------------------------------------------

Prefetcher::Prefetcher(const std::string& path, const std::string& name, int num_threads, int prefetch,
                       const IntensityParams& params)
    : index_(read_dataset_index(path, name)),
      params_(params),
      num_threads_(std::max(1, num_threads)),
      prefetch_(std::max(1, prefetch)) {
  if (index_.height != kImageSize || index_.width != kImageSize || index_.channels != kChannels)
    throw UnsupportedLayout(path + ":" + name + " does not hold (N, 125, 125, 3) images");
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw ReadError(path + ": cannot open: " + std::strerror(errno));
}

Prefetcher::~Prefetcher() {
  stop();
  if (fd_ >= 0) ::close(fd_);
}

std::string Prefetcher::chunk_context(int64_t chunk) const {
  std::string where = index_.path + ":" + index_.name;
  if (!index_.chunked) return where + " jet " + std::to_string(chunk);
  const int64_t row = chunk / index_.chunks_per_row();
  const int64_t first = row * index_.chunk_rows;
  const int64_t last = std::min(index_.num_jets, first + index_.chunk_rows) - 1;
  const ChunkLocation& loc = index_.chunks[static_cast<size_t>(chunk)];
  return where + " chunk " + std::to_string(chunk) + " (jets " + std::to_string(first) + ".." + std::to_string(last) +
         ", file offset " + std::to_string(loc.address) + ", " + std::to_string(loc.stored_size) + " bytes)";
}

void Prefetcher::read_exact(uint64_t offset, uint64_t size, uint8_t* dst, const std::string& what) {
  if (offset + size > index_.file_size)
    throw ReadError(what + ": the file is truncated (needs bytes up to " + std::to_string(offset + size) +
                    ", the file has " + std::to_string(index_.file_size) + ")");
  uint64_t done = 0;
  while (done < size) {
    const ssize_t got = ::pread(fd_, dst + done, size - done, static_cast<off_t>(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw ReadError(what + ": read failed: " + std::strerror(errno));
    if (got == 0)
      throw ReadError(what + ": the file is truncated (read " + std::to_string(done) + " of " + std::to_string(size) +
                      " bytes)");
    done += static_cast<uint64_t>(got);
  }
}

void Prefetcher::decode_chunk(int64_t chunk, uint8_t* dst, Scratch& scratch) {
  const ChunkLocation& loc = index_.chunks[static_cast<size_t>(chunk)];
  const uint64_t bytes = index_.chunk_bytes();
  if (!loc.allocated) {
    std::memset(dst, 0, bytes);
    return;
  }
  // Filters still to undo, last applied first; bit i of the mask = filter i skipped.
  int active[32];
  int num_active = 0;
  for (int i = static_cast<int>(index_.filters.size()) - 1; i >= 0; --i)
    if (!(loc.filter_mask & (1u << i))) active[num_active++] = index_.filters[static_cast<size_t>(i)];
  const std::string what = chunk_context(chunk);
  if (num_active == 0) {
    if (loc.stored_size != bytes)
      throw ReadError(what + ": stored unfiltered with " + std::to_string(loc.stored_size) + " bytes; expected " +
                      std::to_string(bytes));
    read_exact(loc.address, bytes, dst, what);
    return;
  }
  scratch.raw.resize(loc.stored_size);
  read_exact(loc.address, loc.stored_size, scratch.raw.data(), what);
  if (num_active > 1) scratch.stage.resize(bytes);
  const uint8_t* in = scratch.raw.data();
  size_t in_size = loc.stored_size;
  try {
    for (int step = 0; step < num_active; ++step) {
      // Alternate between the stage buffer and dst so that the last step lands in dst.
      uint8_t* out = ((num_active - 1 - step) % 2 == 0) ? dst : scratch.stage.data();
      switch (active[step]) {
        case kFilterLzf: lzf_decode(in, in_size, out, bytes); break;
        case kFilterDeflate: inflate_decode(in, in_size, out, bytes); break;
        case kFilterShuffle:
          if (in_size != bytes)
            throw DecodeError("shuffled data has " + std::to_string(in_size) + " bytes; expected " +
                              std::to_string(bytes));
          unshuffle(in, bytes, sizeof(float), out);
          break;
      }
      in = out;
      in_size = bytes;
    }
  } catch (const DecodeError& e) {
    throw ReadError(what + ": " + e.what());
  }
}

void Prefetcher::decode_row(int64_t row, uint8_t* dst, Scratch& scratch) {
  if (index_.whole_images()) {
    decode_chunk(row, dst, scratch);
    return;
  }
  // Chunks cut the images: decode each and copy its block to where it lies in the
  // jets (on huge pages, see allocate_large, these scattered copies stay cheap).
  const int64_t* cd = index_.chunk_dims;
  const int64_t H = index_.height, W = index_.width, C = index_.channels;
  scratch.piece.resize(index_.chunk_bytes());
  const float* piece = reinterpret_cast<const float*>(scratch.piece.data());
  float* jets = reinterpret_cast<float*>(dst);
  const int64_t per_row = index_.chunks_per_row();
  for (int64_t k = 0; k < per_row; ++k) {
    decode_chunk(row * per_row + k, scratch.piece.data(), scratch);
    const int64_t k3 = k % index_.grid[3], k2 = k / index_.grid[3] % index_.grid[2];
    const int64_t k1 = k / (index_.grid[3] * index_.grid[2]);
    const int64_t y0 = k1 * cd[1], x0 = k2 * cd[2], c0 = k3 * cd[3];
    const int64_t ny = std::min(cd[1], H - y0), nx = std::min(cd[2], W - x0), nc = std::min(cd[3], C - c0);
    for (int64_t r = 0; r < cd[0]; ++r)
      for (int64_t y = 0; y < ny; ++y)
        for (int64_t x = 0; x < nx; ++x) {
          const float* from = piece + ((r * cd[1] + y) * cd[2] + x) * cd[3];
          float* to = jets + ((r * H + y0 + y) * W + x0 + x) * C + c0;
          std::memcpy(to, from, static_cast<size_t>(nc) * sizeof(float));
        }
  }
}

const uint8_t* Prefetcher::acquire_row(int64_t row, Scratch& scratch, std::shared_ptr<uint8_t[]>& hold) {
  const uint64_t bytes = index_.row_bytes();
  if (chunk_users_[static_cast<size_t>(row)] == 1) {
    if (scratch.row_capacity < bytes) {
      scratch.row = allocate_row(bytes);
      scratch.row_capacity = bytes;
    }
    decode_row(row, scratch.row.get(), scratch);
    return scratch.row.get();
  }
  std::unique_lock<std::mutex> lock(cache_mutex_);
  auto [it, inserted] = cache_.try_emplace(row);
  CachedChunk& entry = it->second;  // stays valid: erased only after its last user released it
  if (inserted) {
    entry.remaining = chunk_users_[static_cast<size_t>(row)];
    // Reuse a row buffer: fresh ones cost page faults (and huge-page zeroing) every time.
    std::shared_ptr<uint8_t[]> decoded;
    if (!free_rows_.empty()) {
      decoded = std::move(free_rows_.back());
      free_rows_.pop_back();
    }
    lock.unlock();
    std::string error;
    try {
      if (!decoded) decoded = allocate_row(bytes);  // not value-initialised: every byte gets decoded
      decode_row(row, decoded.get(), scratch);
    } catch (const std::exception& e) {
      error = e.what();
    }
    lock.lock();
    if (error.empty()) {
      entry.bytes = decoded;
      entry.state = CachedChunk::State::kReady;
    } else {
      entry.error = error;
      entry.state = CachedChunk::State::kFailed;
    }
    cache_cv_.notify_all();
  } else {
    cache_cv_.wait(lock, [&] { return entry.state != CachedChunk::State::kDecoding || stopping_; });
  }
  if (entry.state == CachedChunk::State::kFailed) throw ReadError(entry.error);
  if (entry.state == CachedChunk::State::kDecoding) throw ReadError("stopped");
  hold = entry.bytes;
  return hold.get();
}

void Prefetcher::release_row(int64_t row) {
  if (chunk_users_[static_cast<size_t>(row)] == 1) return;
  std::lock_guard<std::mutex> lock(cache_mutex_);
  auto it = cache_.find(row);
  if (it != cache_.end() && --it->second.remaining == 0) {
    if (it->second.bytes && free_rows_.size() < static_cast<size_t>(prefetch_) + 2)
      free_rows_.push_back(std::move(it->second.bytes));
    cache_.erase(it);
  }
}

void Prefetcher::fill_batch(int64_t batch, float* out, Scratch& scratch) {
  const std::vector<Piece>& plan = plans_[static_cast<size_t>(batch)];
  const int64_t jet_bytes = index_.jet_floats * 4;
  if (!index_.chunked) {
    // Contiguous rows: read each jet where it lies.
    scratch.decoded.resize(static_cast<size_t>(jet_bytes));
    for (const Piece& piece : plan) {
      if (index_.contiguous_allocated)
        read_exact(index_.contiguous_address + static_cast<uint64_t>(piece.chunk) * jet_bytes, jet_bytes,
                   scratch.decoded.data(), chunk_context(piece.chunk));
      else
        std::memset(scratch.decoded.data(), 0, jet_bytes);
      write_model_jet(reinterpret_cast<const float*>(scratch.decoded.data()), out + piece.position * kModelJetFloats,
                      params_);
    }
    return;
  }
  size_t begin = 0;
  while (begin < plan.size()) {
    const int64_t chunk = plan[begin].chunk;
    size_t end = begin;
    while (end < plan.size() && plan[end].chunk == chunk) ++end;
    std::shared_ptr<uint8_t[]> hold;
    const uint8_t* jets = acquire_row(chunk, scratch, hold);
    for (size_t k = begin; k < end; ++k)
      write_model_jet(reinterpret_cast<const float*>(jets + plan[k].row * jet_bytes),
                      out + plan[k].position * kModelJetFloats, params_);
    hold.reset();
    release_row(chunk);
    begin = end;
  }
}

void Prefetcher::worker() {
  Scratch scratch;
  for (;;) {
    int64_t batch;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      work_cv_.wait(lock, [&] {
        return stopping_ || failed_ || next_claim_ >= num_batches_ || next_claim_ < next_deliver_ + prefetch_;
      });
      if (stopping_ || failed_ || next_claim_ >= num_batches_) return;
      batch = next_claim_++;
    }
    float* buffer = nullptr;
    std::string error;
    try {
      buffer = pool_->acquire();
      fill_batch(batch, buffer, scratch);
    } catch (const std::exception& e) {
      error = e.what();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    Slot& slot = slots_[static_cast<size_t>(batch)];
    slot.buffer = buffer;
    slot.error = error;
    slot.ready = true;
    if (!error.empty()) failed_ = true;
    ready_cv_.notify_all();
  }
}

void Prefetcher::start(const int64_t* order, int64_t count, int64_t batch_size) {
  stop();
  if (batch_size < 1) throw std::invalid_argument("batch_size must be >= 1");
  for (int64_t i = 0; i < count; ++i)
    if (order[i] < 0 || order[i] >= index_.num_jets)
      throw std::out_of_range("index " + std::to_string(order[i]) + " out of range for " + index_.path +
                              " with " + std::to_string(index_.num_jets) + " jets");
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (!free_rows_.empty() && free_rows_.size() > static_cast<size_t>(prefetch_) + 2) free_rows_.clear();
  }
  const int64_t floats = batch_size * kModelJetFloats;
  if (!pool_ || pool_->floats() != floats)
    pool_ = std::make_shared<BufferPool>(floats, static_cast<size_t>(prefetch_) + 2);

  batch_size_ = batch_size;
  num_batches_ = (count + batch_size - 1) / batch_size;
  const int64_t rows = index_.chunked ? index_.chunk_rows : 1;
  plans_.assign(static_cast<size_t>(num_batches_), {});
  chunk_users_.assign(index_.chunked ? static_cast<size_t>(index_.grid[0]) : 0, 0);
  for (int64_t b = 0; b < num_batches_; ++b) {
    auto& plan = plans_[static_cast<size_t>(b)];
    const int64_t first = b * batch_size, last = std::min(count, first + batch_size);
    for (int64_t i = first; i < last; ++i) plan.push_back({order[i] / rows, order[i] % rows, i - first});
    std::sort(plan.begin(), plan.end(), [](const Piece& a, const Piece& c) {
      return a.chunk != c.chunk ? a.chunk < c.chunk : a.row < c.row;
    });
    if (index_.chunked)
      for (size_t k = 0; k < plan.size(); ++k)
        if (k == 0 || plan[k].chunk != plan[k - 1].chunk) ++chunk_users_[static_cast<size_t>(plan[k].chunk)];
  }
  slots_.assign(static_cast<size_t>(num_batches_), Slot{});
  next_claim_ = next_deliver_ = 0;
  stopping_ = false;
  failed_ = false;
  const int64_t threads = std::min<int64_t>({num_threads_, prefetch_, std::max<int64_t>(num_batches_, 1)});
  for (int64_t t = 0; t < threads; ++t) threads_.emplace_back([this] { worker(); });
}

Prefetcher::Batch Prefetcher::next() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (next_deliver_ >= num_batches_ || stopping_) return {};
  const int64_t batch = next_deliver_;
  Slot& slot = slots_[static_cast<size_t>(batch)];
  // After a failure no worker claims new batches: the failed batch reports the error.
  ready_cv_.wait(lock, [&] { return slot.ready || stopping_ || (failed_ && batch >= next_claim_); });
  if (!slot.ready && stopping_) return {};
  if (!slot.ready) throw ReadError(index_.path + ": an earlier batch failed to read");
  ++next_deliver_;
  work_cv_.notify_all();
  Batch result{slot.buffer, std::min(batch_size_, static_cast<int64_t>(plans_[static_cast<size_t>(batch)].size()))};
  slot.buffer = nullptr;
  if (!slot.error.empty()) {
    const std::string error = slot.error;
    lock.unlock();
    pool_->release(result.data);
    throw ReadError(error);
  }
  return result;
}

void Prefetcher::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);  // wakes workers waiting on a chunk
    cache_cv_.notify_all();
  }
  work_cv_.notify_all();
  ready_cv_.notify_all();
  for (auto& t : threads_) t.join();
  threads_.clear();
  std::lock_guard<std::mutex> lock(mutex_);
  for (Slot& slot : slots_)
    if (slot.buffer) {
      pool_->release(slot.buffer);
      slot.buffer = nullptr;
    }
  cache_.clear();
  num_batches_ = next_claim_ = next_deliver_ = 0;
}

}  // namespace jetfast
