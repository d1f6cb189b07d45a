// Cluster compression for qcow2 compressed writes (see compressed.h).

#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include <memory>

#include "block/drivers/qcow2/compressed.h"
#include "block/drivers/qcow2/format.h"

namespace strata::block::qcow2 {

namespace {

using Compressed = std::optional<std::vector<uint8_t>>;

Error library_failure(const char* library) {
  return Error(ErrorKind::kIo, std::string("Could not compress a cluster with ") + library, EIO);
}

// QEMU's qcow2_zlib_compress: Z_STREAM_END is success; Z_OK means the output buffer (one byte
// less than a cluster) was too small, i.e. the data does not compress.
Result<Compressed> zlib_compress(std::span<const uint8_t> input) {
  z_stream stream{};
  if (deflateInit2(&stream, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) !=
      Z_OK) {
    return library_failure("zlib");
  }
  std::vector<uint8_t> output(input.size() - 1);
  stream.next_in = const_cast<Bytef*>(input.data());
  stream.avail_in = static_cast<uInt>(input.size());
  stream.next_out = output.data();
  stream.avail_out = static_cast<uInt>(output.size());
  const int ret = deflate(&stream, Z_FINISH);
  const uint64_t produced = output.size() - stream.avail_out;
  deflateEnd(&stream);
  if (ret == Z_STREAM_END) {
    output.resize(produced);
    return Compressed(std::move(output));
  }
  if (ret == Z_OK || ret == Z_BUF_ERROR) {
    return Compressed();
  }
  return library_failure("zlib");
}

struct CctxDeleter {
  void operator()(ZSTD_CCtx* cctx) const { ZSTD_freeCCtx(cctx); }
};

// QEMU's qcow2_zstd_compress: one ZSTD_e_end stream call into a buffer one byte smaller than the
// cluster; a frame left unfinished because the buffer is full means the data does not compress.
Result<Compressed> zstd_compress(std::span<const uint8_t> input) {
  std::unique_ptr<ZSTD_CCtx, CctxDeleter> cctx(ZSTD_createCCtx());
  if (!cctx) {
    return library_failure("zstd");
  }
  std::vector<uint8_t> output(input.size() - 1);
  ZSTD_inBuffer in{input.data(), input.size(), 0};
  ZSTD_outBuffer out{output.data(), output.size(), 0};
  // One call, as QEMU: a frame that is not complete after it did not fit.
  const size_t ret = ZSTD_compressStream2(cctx.get(), &out, &in, ZSTD_e_end);
  if (ZSTD_isError(ret)) {
    return ZSTD_getErrorCode(ret) == ZSTD_error_dstSize_tooSmall ? Result<Compressed>(Compressed())
                                                                 : library_failure("zstd");
  }
  if (ret != 0) {
    if (ret > out.size - out.pos) {
      return Compressed();
    }
    return library_failure("zstd");
  }
  output.resize(out.pos);
  return Compressed(std::move(output));
}

}  // namespace

Result<std::optional<std::vector<uint8_t>>> compress(uint8_t compression_type,
                                                     std::span<const uint8_t> input) {
  if (input.size() < 2) {
    return Compressed();
  }
  switch (compression_type) {
    case kCompressionZlib:
      return zlib_compress(input);
    case kCompressionZstd:
      return zstd_compress(input);
    default:
      return Error(ErrorKind::kUnsupported, "Unknown compression type", ENOTSUP);
  }
}

}  // namespace strata::block::qcow2
