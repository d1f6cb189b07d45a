#pragma once
// Status of a range of an exported node over its whole backing chain, as NBD's base:allocation
// and qemu:allocation-depth contexts and sparse READ replies need it (QEMU's
// bdrv_block_status_above and bdrv_is_allocated_above with base NULL).

#include <cstdint>

#include "aio/task.h"
#include "base/result.h"
#include "block/graph/node.h"

namespace strata::nbd {

struct AllocationRun {
  uint64_t bytes = 0;  // length of the run, > 0 and at most the bytes asked for
  bool data = false;   // reads return stored data (not known zero)
  bool zero = false;   // reads return zeroes
  // 0: allocated nowhere in the chain; 1: in the node itself; n: in its (n-1)-th backing file.
  uint32_t depth = 0;
};

// Status of the run starting at `offset` (< top.length()), at most `bytes` (> 0) long.
aio::Task<Result<AllocationRun>> allocation_status(block::Node& top, uint64_t offset,
                                                   uint64_t bytes);

}  // namespace strata::nbd
