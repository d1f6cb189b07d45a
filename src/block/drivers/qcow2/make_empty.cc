// Emptying an image (QEMU's qcow2_make_empty), used by `strata img commit` after the data was
// copied into the base.

#include <algorithm>

#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

aio::Task<Result<void>> Qcow2Node::make_empty() {
  if (refcounts_ == nullptr) {
    co_return Error(ErrorKind::kPermission, "Permission denied", EACCES);
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  auto meta = co_await meta_.scoped_lock();
  const uint64_t entries_per_table = uint64_t{1} << header_.l2_bits();
  const uint64_t clusters = (length() + header_.cluster_size() - 1) >> header_.cluster_bits;
  for (uint64_t l1_index = 0; l1_index < header_.l1_size; ++l1_index) {
    const uint64_t first = l1_index * entries_per_table;
    if (first >= clusters) {
      break;
    }
    if ((map_->l1_entry(l1_index) & kL1OffsetMask) == 0) {
      continue;
    }
    const uint64_t count = std::min(entries_per_table, clusters - first);
    std::vector<uint64_t> old_entries;
    old_entries.reserve(count);
    uint64_t l2_offset = 0;
    bool any = false;
    for (uint64_t i = 0; i < count; ++i) {
      Result<L2Ref> ref = co_await l2_ref(first + i);
      if (!ref) {
        co_return std::move(ref).error();
      }
      l2_offset = ref->l2_offset;
      old_entries.push_back(ref->entry);
      any = any || ref->entry != 0;
    }
    if (!any) {
      continue;
    }
    Result<void> written = co_await write_l2_entries(l2_offset, 0, std::vector<uint64_t>(count, 0));
    if (!written) {
      co_return written;
    }
    // The cleared entries must be stable before their clusters can be reused.
    Result<void> flushed = co_await sync_metadata();
    if (!flushed) {
      co_return flushed;
    }
    for (uint64_t entry : old_entries) {
      if (needs_release(entry)) {
        Result<void> released = co_await release_entry(entry);
        if (!released) {
          co_return released;
        }
      }
    }
  }
  Result<void> flushed = co_await sync_metadata();
  co_return flushed;
}

}  // namespace strata::block::qcow2
