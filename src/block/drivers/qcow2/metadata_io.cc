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

}  // namespace strata::block::qcow2
