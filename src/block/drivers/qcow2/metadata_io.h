#pragma once
// Reads from a qcow2 child where the bytes past its end read as zeroes, as QEMU's block layer
// returns them (bdrv_aligned_preadv zero-fills past EOF). Metadata, data and backing reads of
// the qcow2 driver all go through here, so an image whose tables point past its end yields
// zeroes, never an error or an out-of-range request.

#include <cstdint>

#include "aio/task.h"
#include "base/result.h"
#include "block/graph/node.h"
#include "block/io/io_vector.h"

namespace strata::block::qcow2 {

// Reads qiov.size() bytes of `node` at `offset`; the part at or past node.length() is zeroed.
aio::Task<Result<void>> read_zero_padded(Node& node, uint64_t offset, IoVector qiov);

// Writes qiov.size() bytes of `node` at `offset`, first growing the node (io::truncate) when the
// write ends past its end: the request layer refuses writes beyond a node's length, while qcow2
// appends clusters at the end of its file.
aio::Task<Result<void>> write_growing(Node& node, uint64_t offset, IoVector qiov,
                                      uint32_t flags = 0);

// Metadata writes of the qcow2 caches: write_growing through the request layer, or with `direct`
// straight to the driver of `node` (co_pwritev without growing: write-back during close and
// inactivation only writes back places the file already holds, and the graph may be drained).
aio::Task<Result<void>> write_metadata(Node& node, uint64_t offset, IoVector qiov, bool direct);
// io::flush, or with `direct` the driver's co_flush of `node` and of every node below it.
aio::Task<Result<void>> flush_metadata(Node& node, bool direct);

}  // namespace strata::block::qcow2
