// Allocation queries over a backing chain (QEMU's bdrv_co_is_allocated_above).

#include <algorithm>

#include "block/io/request.h"

namespace strata::block::io {

aio::Task<Result<Allocation>> is_allocated_above(Node& top, const Node* base, uint64_t offset,
                                                 uint64_t bytes) {
  uint64_t run = bytes;
  for (Node* node = &top; node != nullptr && node != base; node = filter_or_cow(*node)) {
    if (offset >= node->length()) {
      // Past this layer's end the chain reads zeroes from here, not what lies below.
      co_return Allocation{true, run};
    }
    run = std::min(run, node->length() - offset);
    if (node->is_filter() && node->backing_child() == nullptr) {
      continue;  // a filter holds no data of its own
    }
    Result<BlockStatus> status = co_await node->co_block_status(offset, run);
    if (!status) {
      co_return status.error();
    }
    run = std::min(run, std::max<uint64_t>(status->bytes, 1));
    // A run the layer maps to its own file (raw over a protocol node) is the layer's data: QEMU's
    // recursion finds data or zeroes there, which makes the layer allocated.
    const bool in_own_file = (status->flags & BlockStatus::kRecurse) != 0 &&
                             status->file != nullptr && status->file != node;
    if (status->allocated_here() || in_own_file) {
      co_return Allocation{true, run};
    }
  }
  co_return Allocation{false, run};
}

}  // namespace strata::block::io
