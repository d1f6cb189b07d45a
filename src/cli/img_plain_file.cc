// What `strata img` does directly on the file under a raw image (a raw node without offset/size
// window, or a file node): convert -C's copy offloading (QEMU's blk_co_copy_range reaching
// file-posix's copy_file_range; any failure makes the caller fall back to reading and writing, as
// qemu-img does) and resize --preallocation=falloc (file-posix's posix_fallocate of the new area).

#include <unistd.h>

#include <fcntl.h>

#include <cerrno>

#include "block/drivers/file/file_node.h"
#include "block/drivers/raw/raw_node.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

namespace {

// The file node whose bytes are `node`'s bytes at the same offsets, if any.
block::FileNode* plain_file_of(block::Node& node) {
  if (auto* file = dynamic_cast<block::FileNode*>(&node); file != nullptr) {
    return file;
  }
  auto* raw = dynamic_cast<block::RawNode*>(&node);
  if (raw == nullptr || raw->has_window() || raw->primary_child() == nullptr) {
    return nullptr;
  }
  return dynamic_cast<block::FileNode*>(raw->primary_child()->node());
}

}  // namespace

bool copy_file_range_between(block::Node& source, uint64_t source_offset, block::Node& target,
                             uint64_t target_offset, uint64_t bytes) {
  block::FileNode* in = plain_file_of(source);
  block::FileNode* out = plain_file_of(target);
  if (in == nullptr || out == nullptr || !out->data_fd_writable()) {
    return false;
  }
  auto in_offset = static_cast<off_t>(source_offset);
  auto out_offset = static_cast<off_t>(target_offset);
  while (bytes > 0) {
    const ssize_t copied =
        ::copy_file_range(in->data_fd(), &in_offset, out->data_fd(), &out_offset, bytes, 0);
    if (copied < 0 && errno == EINTR) {
      continue;
    }
    if (copied <= 0) {
      return false;  // an error, or the source ended early
    }
    bytes -= static_cast<uint64_t>(copied);
  }
  return true;
}

bool is_plain_file(block::Node& node) {
  return plain_file_of(node) != nullptr;
}

Result<void> fallocate_plain_file(block::Node& node, uint64_t offset, uint64_t bytes) {
  block::FileNode* file = plain_file_of(node);
  if (file == nullptr) {
    return Error(ErrorKind::kUnsupported, "Operation not supported", ENOTSUP);
  }
  const int error =
      ::posix_fallocate(file->data_fd(), static_cast<off_t>(offset), static_cast<off_t>(bytes));
  if (error != 0) {
    return Error::from_errno(error, "Could not preallocate new data");
  }
  return ok();
}

}  // namespace strata::cli::img
