#include "prefetch/codecs.h"

#include <zlib.h>

#include <climits>
#include <cstring>

namespace jetfast {

// liblzf format: a control byte c. c < 32: a literal run of c + 1 bytes follows.
// Otherwise a back reference: length (c >> 5) + 2, with 7 meaning "add the next
// byte", and distance ((c & 31) << 8 | next byte) + 1 into the output so far.
void lzf_decode(const uint8_t* in, size_t in_size, uint8_t* out, size_t out_size) {
  const uint8_t* ip = in;
  const uint8_t* const in_end = in + in_size;
  uint8_t* op = out;
  uint8_t* const out_end = out + out_size;
  while (ip < in_end) {
    unsigned ctrl = *ip++;
    if (ctrl < 32) {
      size_t len = ctrl + 1;
      if (static_cast<size_t>(in_end - ip) < len) throw DecodeError("LZF stream ends inside a literal run");
      if (static_cast<size_t>(out_end - op) < len) throw DecodeError("LZF stream decodes to more bytes than the chunk holds");
      std::memcpy(op, ip, len);
      ip += len;
      op += len;
      continue;
    }
    size_t len = ctrl >> 5;
    if (len == 7) {
      if (ip >= in_end) throw DecodeError("LZF stream ends inside a back reference");
      len += *ip++;
    }
    len += 2;
    if (ip >= in_end) throw DecodeError("LZF stream ends inside a back reference");
    size_t distance = (static_cast<size_t>(ctrl & 31) << 8 | *ip++) + 1;
    if (distance > static_cast<size_t>(op - out)) throw DecodeError("LZF back reference points before the chunk start");
    if (static_cast<size_t>(out_end - op) < len) throw DecodeError("LZF stream decodes to more bytes than the chunk holds");
    const uint8_t* ref = op - distance;
    if (distance == 1) {
      // Runs of one repeated byte: the zeros that fill most of a jet image.
      std::memset(op, *ref, len);
      op += len;
    } else if (distance >= len) {
      std::memcpy(op, ref, len);
      op += len;
    } else if (distance >= 8) {
      // Overlapping, but each 8-byte step only reads bytes already written.
      size_t i = 0;
      for (; i + 8 <= len; i += 8) std::memcpy(op + i, ref + i, 8);
      for (; i < len; ++i) op[i] = ref[i];
      op += len;
    } else {
      for (size_t i = 0; i < len; ++i) op[i] = ref[i];
      op += len;
    }
  }
  if (op != out_end)
    throw DecodeError("LZF stream decodes to " + std::to_string(op - out) + " bytes; the chunk holds " +
                      std::to_string(out_size));
}

void inflate_decode(const uint8_t* in, size_t in_size, uint8_t* out, size_t out_size) {
  if (in_size > UINT_MAX || out_size > UINT_MAX) throw DecodeError("deflate chunk larger than 4 GiB");
  z_stream stream{};
  if (inflateInit(&stream) != Z_OK) throw DecodeError("zlib inflateInit failed");
  stream.next_in = const_cast<Bytef*>(in);
  stream.avail_in = static_cast<uInt>(in_size);
  stream.next_out = out;
  stream.avail_out = static_cast<uInt>(out_size);
  const int status = inflate(&stream, Z_FINISH);
  const size_t produced = stream.total_out;
  std::string message = stream.msg ? stream.msg : "";
  inflateEnd(&stream);
  if (status == Z_STREAM_END && produced == out_size) return;
  if (status == Z_STREAM_END)
    throw DecodeError("deflate stream decodes to " + std::to_string(produced) + " bytes; the chunk holds " +
                      std::to_string(out_size));
  if (status == Z_BUF_ERROR && stream.avail_out == 0)
    throw DecodeError("deflate stream decodes to more bytes than the chunk holds");
  throw DecodeError("corrupt deflate stream (zlib status " + std::to_string(status) +
                    (message.empty() ? "" : ": " + message) + ")");
}

void unshuffle(const uint8_t* in, size_t size, size_t element_size, uint8_t* out) {
  if (element_size <= 1) {
    std::memcpy(out, in, size);
    return;
  }
  const size_t count = size / element_size;
  if (element_size == 4) {
    const uint8_t *b0 = in, *b1 = in + count, *b2 = in + 2 * count, *b3 = in + 3 * count;
    for (size_t i = 0; i < count; ++i) {
      out[4 * i] = b0[i];
      out[4 * i + 1] = b1[i];
      out[4 * i + 2] = b2[i];
      out[4 * i + 3] = b3[i];
    }
  } else {
    for (size_t b = 0; b < element_size; ++b)
      for (size_t i = 0; i < count; ++i) out[i * element_size + b] = in[b * count + i];
  }
  const size_t tail = count * element_size;
  std::memcpy(out + tail, in + tail, size - tail);
}

}  // namespace jetfast
