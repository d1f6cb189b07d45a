// `strata img create`/`convert` onto an NBD export: NBD cannot create images, so, as QEMU's
// bdrv_co_create_opts_simple does, the target is opened as an existing image instead.

#include <algorithm>

#include "block/io/request.h"
#include "cli/block_tool.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

Result<void> create_on_nbd_export(const std::string& uri, uint64_t size,
                                  const std::string& preallocation) {
  if (preallocation != "off") {
    return make_error(ErrorKind::kUnsupported,
                      uri + ": Unsupported preallocation mode '" + preallocation + "'");
  }
  auto session = BlockSession::create();
  if (!session) {
    return std::move(session).error();
  }
  ImageOpenRequest request;
  request.filename = uri;
  request.format = "nbd";
  request.read_only = false;
  auto node = (*session)->open(request);
  if (!node) {
    return make_error(ErrorKind::kUnsupported,
                      uri +
                          ": Protocol driver 'nbd' does not support creating new images, so an "
                          "existing image must be selected as the target; however, opening the "
                          "given target as an existing image failed: " +
                          node.error().message());
  }
  block::Node& export_node = **node;
  if (size > export_node.length()) {
    return make_error(ErrorKind::kUnsupported, uri + ": Cannot grow NBD nodes");
  }
  const uint64_t first_sector = std::min<uint64_t>(size, 512);
  if (first_sector > 0) {
    auto zeroed = (*session)->loop().block_on(
        block::io::pwrite_zeroes(export_node, 0, first_sector, block::kRequestMayUnmap));
    if (!zeroed) {
      return make_error(ErrorKind::kIo, uri + ": Failed to clear the new image's first sector: " +
                                            zeroed.error().message());
    }
  }
  auto flushed = (*session)->loop().block_on(block::io::flush(export_node));
  if (!flushed) {
    return std::move(flushed).error();
  }
  return ok();
}

}  // namespace strata::cli::img
