#include "nbd/allocation.h"

#include "block/io/request.h"

namespace strata::nbd {

aio::Task<Result<AllocationRun>> allocation_status(block::Node& top, uint64_t offset,
                                                   uint64_t bytes) {
  AllocationRun run;
  block::Node* node = &top;
  uint32_t hops = 0;
  for (;;) {
    while (node->is_filter() && node->primary_child() != nullptr) {
      node = node->primary_child()->node();
    }
    if (offset >= node->length()) {
      // A shorter backing file reads as zeroes past its end; nothing there is allocated.
      run.bytes = bytes;
      run.zero = true;
      co_return run;
    }
    Result<block::BlockStatus> status = co_await block::io::block_status(*node, offset, bytes);
    if (!status) {
      co_return std::move(status).error();
    }
    bytes = status->bytes;
    const uint32_t flags = status->flags;
    if ((flags & (block::BlockStatus::kData | block::BlockStatus::kZero)) != 0) {
      run.bytes = bytes;
      run.data = (flags & block::BlockStatus::kData) != 0;
      run.zero = (flags & block::BlockStatus::kZero) != 0;
      run.depth = (flags & block::BlockStatus::kAllocated) != 0 ? hops + 1 : 0;
      co_return run;
    }
    block::Child* backing = node->backing_child();
    if (backing == nullptr) {
      run.bytes = bytes;
      run.zero = true;
      co_return run;
    }
    node = backing->node();
    ++hops;
  }
}

}  // namespace strata::nbd
