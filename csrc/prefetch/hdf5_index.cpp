#include "prefetch/hdf5_index.h"

#include <hdf5.h>
#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <vector>

#include "prefetch/codecs.h"

namespace jetfast {

std::mutex& hdf5_mutex() {
  static std::mutex m;
  return m;
}

namespace {

// Closes an HDF5 identifier on scope exit.
struct Handle {
  hid_t id;
  herr_t (*close)(hid_t);
  Handle(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  ~Handle() {
    if (id >= 0) close(id);
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
};

const char* filter_name(int id) {
  switch (id) {
    case H5Z_FILTER_DEFLATE: return "gzip";
    case H5Z_FILTER_SHUFFLE: return "shuffle";
    case H5Z_FILTER_FLETCHER32: return "fletcher32";
    case H5Z_FILTER_SZIP: return "szip";
    case H5Z_FILTER_NBIT: return "nbit";
    case H5Z_FILTER_SCALEOFFSET: return "scaleoffset";
    case kFilterLzf: return "lzf";
    default: return "unknown";
  }
}

// Element coordinates of chunk `flat` (row-major over the chunk grid).
void chunk_offset(const DatasetIndex& index, int64_t flat, hsize_t offset[4]) {
  for (int axis = 3; axis >= 0; --axis) {
    offset[axis] = static_cast<hsize_t>((flat % index.grid[axis]) * index.chunk_dims[axis]);
    flat /= index.grid[axis];
  }
}

// 0 or `base`: whichever makes the bytes at a chunk's address equal what
// H5Dread_chunk returns for it (HDF5 versions differ in what they report).
uint64_t chunk_address_shift(const std::string& path, const std::string& name, hid_t dset, const DatasetIndex& index,
                             haddr_t base) {
  for (size_t c = 0; c < index.chunks.size(); ++c) {
    const ChunkLocation& loc = index.chunks[c];
    if (!loc.allocated || loc.stored_size == 0) continue;
    std::vector<uint8_t> expected(loc.stored_size), found(loc.stored_size);
    hsize_t offset[4];
    chunk_offset(index, static_cast<int64_t>(c), offset);
    uint32_t filters = 0;
    if (H5Dread_chunk(dset, H5P_DEFAULT, offset, &filters, expected.data()) < 0) break;
    std::ifstream file(path, std::ios::binary);
    for (uint64_t shift : {uint64_t{0}, static_cast<uint64_t>(base)}) {
      file.clear();
      file.seekg(static_cast<std::streamoff>(loc.address + shift));
      if (file.read(reinterpret_cast<char*>(found.data()), static_cast<std::streamsize>(found.size())) &&
          found == expected)
        return shift;
    }
    break;
  }
  throw UnsupportedLayout(path + ":" + name + " has a user block and its chunk addresses could not be confirmed");
}

}  // namespace

DatasetIndex read_dataset_index(const std::string& path, const std::string& name) {
  std::lock_guard<std::mutex> lock(hdf5_mutex());
  // Errors become exceptions with our messages; HDF5's own stack trace is noise here.
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);

  DatasetIndex index;
  index.path = path;
  index.name = name;
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) throw ReadError(path + ": cannot stat the file (missing?)");
  index.file_size = static_cast<uint64_t>(st.st_size);

  Handle file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (file.id < 0) throw ReadError(path + ": not a readable HDF5 file");
  Handle dset(H5Dopen2(file.id, name.c_str(), H5P_DEFAULT), H5Dclose);
  if (dset.id < 0) throw ReadError(path + ": no dataset '" + name + "'");

  Handle type(H5Dget_type(dset.id), H5Tclose);
  if (type.id < 0 || H5Tequal(type.id, H5T_IEEE_F32LE) <= 0)
    throw UnsupportedLayout(path + ":" + name + " is not little-endian float32");

  Handle space(H5Dget_space(dset.id), H5Sclose);
  hsize_t dims[4] = {0, 0, 0, 0};
  if (space.id < 0 || H5Sget_simple_extent_ndims(space.id) != 4)
    throw UnsupportedLayout(path + ":" + name + " is not 4-dimensional");
  H5Sget_simple_extent_dims(space.id, dims, nullptr);
  index.num_jets = static_cast<int64_t>(dims[0]);
  index.height = static_cast<int64_t>(dims[1]);
  index.width = static_cast<int64_t>(dims[2]);
  index.channels = static_cast<int64_t>(dims[3]);
  index.jet_floats = index.height * index.width * index.channels;

  Handle dcpl(H5Dget_create_plist(dset.id), H5Pclose);
  if (H5Pget_external_count(dcpl.id) > 0) throw UnsupportedLayout(path + ":" + name + " uses external storage");
  H5D_fill_value_t fill_state;
  if (H5Pfill_value_defined(dcpl.id, &fill_state) >= 0 && fill_state == H5D_FILL_VALUE_USER_DEFINED) {
    float fill = 0.0f;
    H5Pget_fill_value(dcpl.id, H5T_NATIVE_FLOAT, &fill);
    if (fill != 0.0f) throw UnsupportedLayout(path + ":" + name + " has a non-zero fill value");
  }

  // With a user block, HDF5 1.10's chunk index gives addresses relative to the base
  // address (after the user block) while H5Dget_offset gives absolute ones; which
  // one a chunk address is gets checked below against H5Dread_chunk.
  haddr_t base = 0;
  {
    Handle fcpl(H5Fget_create_plist(file.id), H5Pclose);
    hsize_t userblock = 0;
    if (fcpl.id >= 0 && H5Pget_userblock(fcpl.id, &userblock) >= 0) base = userblock;
  }

  const H5D_layout_t layout = H5Pget_layout(dcpl.id);
  if (layout == H5D_CONTIGUOUS) {
    index.chunked = false;
    const haddr_t address = H5Dget_offset(dset.id);
    index.contiguous_allocated = address != HADDR_UNDEF;
    index.contiguous_address = index.contiguous_allocated ? address : 0;
    index.chunk_rows = 1;
    return index;
  }
  if (layout != H5D_CHUNKED) throw UnsupportedLayout(path + ":" + name + " uses a compact or virtual layout");

  hsize_t chunk_dims[4] = {0, 0, 0, 0};
  if (H5Pget_chunk(dcpl.id, 4, chunk_dims) != 4) throw UnsupportedLayout(path + ":" + name + " has unreadable chunk dims");
  index.chunked = true;
  for (int axis = 0; axis < 4; ++axis) {
    index.chunk_dims[axis] = static_cast<int64_t>(chunk_dims[axis]);
    index.grid[axis] = index.chunk_dims[axis] == 0 ? 0
                                                   : (static_cast<int64_t>(dims[axis]) + index.chunk_dims[axis] - 1) /
                                                         index.chunk_dims[axis];
  }
  index.chunk_rows = index.chunk_dims[0];
  // A chunk row is decoded whole; refuse rows too large to hold a few of in memory.
  if (index.row_bytes() > (uint64_t{2} << 30))
    throw UnsupportedLayout(path + ":" + name + " has chunks spanning " + std::to_string(index.chunk_rows) +
                            " jets (" + std::to_string(index.row_bytes() >> 20) + " MiB per chunk row decoded)");

  const int nfilters = H5Pget_nfilters(dcpl.id);
  for (int i = 0; i < nfilters; ++i) {
    unsigned flags = 0;
    size_t nelements = 0;
    unsigned filter_config = 0;
    const H5Z_filter_t id = H5Pget_filter2(dcpl.id, static_cast<unsigned>(i), &flags, &nelements, nullptr, 0,
                                           nullptr, &filter_config);
    if (id != kFilterLzf && id != kFilterDeflate && id != kFilterShuffle)
      throw UnsupportedLayout(path + ":" + name + " uses HDF5 filter " + std::to_string(id) + " (" +
                              filter_name(id) + ")");
    index.filters.push_back(static_cast<int>(id));
  }

  const int64_t num_chunks = index.grid[0] * index.grid[1] * index.grid[2] * index.grid[3];
  index.chunks.resize(static_cast<size_t>(num_chunks));
  for (int64_t c = 0; c < num_chunks; ++c) {
    // By coordinate: a B-tree lookup each; by ordinal index is a scan each in HDF5 1.10.
    hsize_t offset[4];
    chunk_offset(index, c, offset);
    unsigned mask = 0;
    haddr_t address = HADDR_UNDEF;
    hsize_t size = 0;
    if (H5Dget_chunk_info_by_coord(dset.id, offset, &mask, &address, &size) < 0)
      throw ReadError(path + ":" + name + ": cannot read the index entry of chunk " + std::to_string(c));
    ChunkLocation& loc = index.chunks[static_cast<size_t>(c)];
    loc.allocated = address != HADDR_UNDEF;
    loc.address = loc.allocated ? address : 0;
    loc.stored_size = size;
    loc.filter_mask = mask;
  }
  if (base != 0) {
    const uint64_t shift = chunk_address_shift(path, name, dset.id, index, base);
    for (ChunkLocation& loc : index.chunks)
      if (loc.allocated) loc.address += shift;
  }
  return index;
}

}  // namespace jetfast
