#pragma once
// Decoders for the raw chunk bytes HDF5 stores, run by the prefetcher's worker
// threads without any lock: LZF (h5py's filter 32000), deflate (filter 1, zlib
// stream) and byte shuffle (filter 2). Each writes exactly `out_size` bytes or
// throws DecodeError saying what was wrong with the stream.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace jetfast {

struct DecodeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// HDF5 filter ids the prefetcher decodes itself.
constexpr int kFilterDeflate = 1;
constexpr int kFilterShuffle = 2;
constexpr int kFilterLzf = 32000;

// A bare liblzf stream (no header, as h5py writes it) -> exactly out_size bytes.
void lzf_decode(const uint8_t* in, size_t in_size, uint8_t* out, size_t out_size);

// A zlib (RFC 1950) stream -> exactly out_size bytes.
void inflate_decode(const uint8_t* in, size_t in_size, uint8_t* out, size_t out_size);

// Undo HDF5's shuffle of `size` bytes of `element_size`-byte elements: the input
// holds all first bytes, then all second bytes, ...; trailing bytes that do not
// fill an element are stored as they are.
void unshuffle(const uint8_t* in, size_t size, size_t element_size, uint8_t* out);

}  // namespace jetfast
