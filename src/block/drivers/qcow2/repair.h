#pragma once
// Writing half of `check -r` (QEMU 10's block/qcow2-refcount.c repair paths): rebuilding the
// refcount structure from the checker's in-memory refcount table, patching refcount blocks and
// L1/L2 entries, and clearing the dirty and corrupt bits once an image is consistent. Everything
// here writes to the image file directly (not through a Qcow2Node's caches): it runs either
// before a read-write Qcow2Node loads its refcounts (dirty-bit repair at open) or on a file
// opened only for the check (`strata img check -r`), never beside a node that writes.

#include <cstdint>
#include <string>
#include <vector>

#include "aio/task.h"
#include "base/result.h"
#include "block/drivers/qcow2/header.h"
#include "block/graph/node.h"

namespace strata::block::qcow2 {

// QEMU's BdrvCheckMode bits.
inline constexpr uint32_t kFixLeaks = 1;
inline constexpr uint32_t kFixErrors = 2;

// The refcount structure rebuild_refcount_structure() wrote and entered in the header.
struct RebuiltRefcounts {
  uint64_t table_offset = 0;
  uint32_t table_clusters = 0;
  std::vector<uint64_t> table;  // refcount block offsets, one per refcount table entry
};

// QEMU's rebuild_refcount_structure: writes a new refcount block for every refcount-block-sized
// range of `imrt` (the references the checker counted, one entry per host cluster) that holds a
// non-zero count, and a new refcount table describing them, in clusters that `imrt` says are free
// (their allocation is recorded in `imrt`, which may grow); then points the header at the new
// table (written and flushed last). The old structure is leaked, for the caller's second pass to
// reclaim. Fails with QEMU's texts ("ERROR allocating refblock", "ERROR writing refblock",
// "ERROR writing reftable", "ERROR setting reftable") and leaves the old structure in use when
// the header was not updated. With `set_refcount_order` the structure is built with
// header.refcount_order and the header's refcount_order field changes in the same write as the
// table fields (amend of refcount_bits; version 3 images).
aio::Task<Result<RebuiltRefcounts>> rebuild_refcount_structure(Node& file, const Header& header,
                                                               std::vector<uint64_t>& imrt,
                                                               bool set_refcount_order = false);

// QEMU's qcow2_mark_clean + qcow2_mark_consistent: flushes the file, then clears the dirty and
// corrupt incompatible bits in the header (version 3 images only carry them) and flushes again.
// `header` is updated to match. No-op when neither bit is set.
aio::Task<Result<void>> mark_clean_and_consistent(Node& file, Header& header);

// Writes the header's incompatible feature bits (qcow2.rst "Header", bytes 72-79; version 3
// images only: callers check) and flushes.
aio::Task<Result<void>> write_incompatible_features(Node& file, uint64_t features);

}  // namespace strata::block::qcow2
