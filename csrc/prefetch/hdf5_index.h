#pragma once
// Where the bytes of the X_jets dataset lie in the file, read once through the
// HDF5 C library (every call under one process-wide mutex: h5py's own HDF5 may
// run in other threads). Afterwards the prefetcher reads those bytes with pread
// and never calls HDF5 again.
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace jetfast {

// The dataset is valid but stored in a way the prefetcher does not decode
// (another filter, dtype or chunk shape); the caller falls back to h5py.
struct UnsupportedLayout : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The file cannot be read: missing, not HDF5, truncated, corrupt.
struct ReadError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The one lock around the HDF5 C library.
std::mutex& hdf5_mutex();

struct ChunkLocation {
  uint64_t address = 0;      // absolute byte offset in the file
  uint64_t stored_size = 0;  // bytes on disk (compressed)
  uint32_t filter_mask = 0;  // bit i set: filter i of the pipeline was skipped for this chunk
  bool allocated = false;    // never written chunks read as the fill value (zeros)
};

struct DatasetIndex {
  std::string path, name;
  int64_t num_jets = 0;           // N
  int64_t jet_floats = 0;         // 125 * 125 * 3
  int64_t height = 0, width = 0, channels = 0;
  bool chunked = false;
  int64_t chunk_rows = 0;         // jets per chunk (chunked): chunk_dims[0]
  int64_t chunk_dims[4] = {0, 0, 0, 0};
  int64_t grid[4] = {0, 0, 0, 0};  // chunks along each axis
  std::vector<int> filters;       // pipeline in the order applied when writing
  std::vector<ChunkLocation> chunks;  // row-major over grid
  uint64_t contiguous_address = 0;  // contiguous layout
  bool contiguous_allocated = false;
  uint64_t file_size = 0;

  // Decoded bytes of one stored chunk (edge chunks are stored at full size too).
  uint64_t chunk_bytes() const {
    return static_cast<uint64_t>(chunk_dims[0] * chunk_dims[1] * chunk_dims[2] * chunk_dims[3]) * 4;
  }
  // A "chunk row": all chunks at one position along N, i.e. chunk_rows whole jets.
  int64_t chunks_per_row() const { return grid[1] * grid[2] * grid[3]; }
  uint64_t row_bytes() const { return static_cast<uint64_t>(chunk_rows) * jet_floats * 4; }
  bool whole_images() const { return chunks_per_row() == 1; }
};

// Reads layout, filters and chunk index of `name` (N, H, W, C) float32 in `path`.
// Throws ReadError (cannot read) or UnsupportedLayout (reason in the message).
DatasetIndex read_dataset_index(const std::string& path, const std::string& name);

}  // namespace jetfast
