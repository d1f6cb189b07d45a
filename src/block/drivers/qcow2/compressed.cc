#include "block/drivers/qcow2/compressed.h"

#include <zlib.h>
#include <zstd.h>

#include <memory>

#include "block/drivers/qcow2/format.h"

namespace strata::block::qcow2 {

namespace {

Error corrupt_data() {
  return Error(ErrorKind::kCorrupt, "Could not decompress a compressed cluster", EIO);
}

// QEMU's qcow2_zlib_decompress: raw deflate, window bits 12; success when the output is full,
// whether or not the stream ended (Z_STREAM_END or Z_BUF_ERROR).
Result<void> zlib_decompress(std::span<const uint8_t> input, std::span<uint8_t> output) {
  z_stream stream{};
  if (inflateInit2(&stream, -12) != Z_OK) {
    return Error(ErrorKind::kIo, "Could not initialise zlib", EIO);
  }
  stream.next_in = const_cast<Bytef*>(input.data());
  stream.avail_in = static_cast<uInt>(input.size());
  stream.next_out = output.data();
  stream.avail_out = static_cast<uInt>(output.size());
  int ret = inflate(&stream, Z_FINISH);
  bool full = stream.avail_out == 0;
  inflateEnd(&stream);
  if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR) && full) {
    return ok();
  }
  return corrupt_data();
}

struct DctxDeleter {
  void operator()(ZSTD_DCtx* dctx) const { ZSTD_freeDCtx(dctx); }
};

// QEMU's qcow2_zstd_decompress: stream frames until the output is full; running out of input
// before that is an error.
Result<void> zstd_decompress(std::span<const uint8_t> input, std::span<uint8_t> output) {
  std::unique_ptr<ZSTD_DCtx, DctxDeleter> dctx(ZSTD_createDCtx());
  if (!dctx) {
    return Error(ErrorKind::kIo, "Could not initialise zstd", EIO);
  }
  ZSTD_inBuffer in{input.data(), input.size(), 0};
  ZSTD_outBuffer out{output.data(), output.size(), 0};
  while (out.pos < out.size) {
    size_t before_in = in.pos;
    size_t before_out = out.pos;
    size_t ret = ZSTD_decompressStream(dctx.get(), &out, &in);
    if (ZSTD_isError(ret)) {
      return corrupt_data();
    }
    if (in.pos == before_in && out.pos == before_out) {
      // No progress: the input ended before the cluster was complete.
      return corrupt_data();
    }
  }
  return ok();
}

}  // namespace

Result<void> decompress(uint8_t compression_type, std::span<const uint8_t> input,
                        std::span<uint8_t> output) {
  switch (compression_type) {
    case kCompressionZlib:
      return zlib_decompress(input, output);
    case kCompressionZstd:
      return zstd_decompress(input, output);
    default:
      return Error(ErrorKind::kUnsupported, "Unknown compression type", ENOTSUP);
  }
}

}  // namespace strata::block::qcow2
