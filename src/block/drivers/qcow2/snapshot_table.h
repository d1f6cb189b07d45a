#pragma once
// The qcow2 snapshot table (qcow2.rst "Snapshots"): parsing with QEMU 10's checks and messages
// (qcow2_do_read_snapshots) and serialization as qcow2_write_snapshots lays it out. Shared by
// open, check and the snapshot operations (snapshot.cc). Parsing allocates at most what the
// table's limits allow (65536 entries, 1 KiB of extra data each, QCOW_MAX_SNAPSHOTS_SIZE bytes).

#include <cstdint>
#include <string>
#include <vector>

#include "aio/task.h"
#include "base/result.h"
#include "block/drivers/qcow2/header.h"
#include "block/graph/node.h"

namespace strata::block::qcow2 {

// The extra data fields strata understands (qcow2.rst: vm_state_size_large, disk_size, icount).
inline constexpr uint32_t kSnapshotKnownExtraBytes = 24;

struct SnapshotEntry {
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;
  std::string id;
  std::string name;
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  uint64_t vm_state_size = 0;    // vm_state_size_large when present
  uint64_t disk_size = 0;        // the header's size when the entry does not record it
  uint64_t icount = UINT64_MAX;  // UINT64_MAX (-1): not recorded
  // Extra data past the known fields, kept as stored so a rewrite preserves it.
  std::vector<uint8_t> unknown_extra;
};

struct SnapshotTable {
  std::vector<SnapshotEntry> entries;
  // Bytes from the table's offset to the end of the last entry (QEMU's snapshots_size).
  uint64_t size = 0;
};

// Reads header.nb_snapshots entries at header.snapshots_offset of `file`.
aio::Task<Result<SnapshotTable>> read_snapshot_table(Node& file, const Header& header);

// The table as qcow2_write_snapshots stores it: entries 8-byte aligned, extra data at least the
// 24 known bytes.
std::vector<uint8_t> serialize_snapshot_table(const std::vector<SnapshotEntry>& entries);

// QEMU's find_snapshot_by_id_and_name: the index of the first entry matching `id` (when not
// empty) and `name` (when not empty), or -1.
int find_snapshot(const std::vector<SnapshotEntry>& entries, const std::string& id,
                  const std::string& name);
// QEMU's find_snapshot_by_id_or_name: by ID first, then by name.
int find_snapshot_by_id_or_name(const std::vector<SnapshotEntry>& entries,
                                const std::string& id_or_name);

}  // namespace strata::block::qcow2
