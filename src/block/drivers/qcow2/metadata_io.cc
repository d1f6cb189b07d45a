#include "block/drivers/qcow2/metadata_io.h"

#include <algorithm>

#include "block/io/request.h"

namespace strata::block::qcow2 {

aio::Task<Result<void>> read_zero_padded(Node& node, uint64_t offset, IoVector qiov) {
  const uint64_t length = node.length();
  const uint64_t wanted = qiov.size();
  const uint64_t in_node = offset >= length ? 0 : std::min(wanted, length - offset);
  if (in_node < wanted) {
    qiov.fill(in_node, 0, wanted - in_node);
  }
  if (in_node == 0) {
    co_return ok();
  }
  Result<void> read = co_await io::preadv(node, offset, qiov.slice(0, in_node));
  co_return read;
}

aio::Task<Result<void>> write_growing(Node& node, uint64_t offset, IoVector qiov, uint32_t flags) {
  const uint64_t end = offset + qiov.size();
  if (end > node.length()) {
    Result<void> grown = co_await io::truncate(node, end, false);
    if (!grown) {
      co_return grown;
    }
  }
  Result<void> written = co_await io::pwritev(node, offset, qiov, flags);
  co_return written;
}

aio::Task<Result<void>> write_metadata(Node& node, uint64_t offset, IoVector qiov, bool direct) {
  if (!direct) {
    Result<void> written = co_await write_growing(node, offset, qiov);
    co_return written;
  }
  const uint64_t bytes = qiov.size();
  Result<void> written = co_await node.co_pwritev(offset, bytes, qiov, 0);
  co_return written;
}

aio::Task<Result<void>> flush_metadata(Node& node, bool direct) {
  if (!direct) {
    Result<void> flushed = co_await io::flush(node);
    co_return flushed;
  }
  Result<void> flushed = co_await node.co_flush();
  if (!flushed) {
    co_return flushed;
  }
  for (const auto& child : node.children()) {
    if ((child->perm() & (kPermWrite | kPermWriteUnchanged)) == 0) {
      continue;
    }
    Result<void> below = co_await flush_metadata(*child->node(), true);
    if (!below) {
      co_return below;
    }
  }
  co_return ok();
}

}  // namespace strata::block::qcow2
