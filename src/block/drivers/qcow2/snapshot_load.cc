// Reading an internal snapshot in place of the active image (QEMU's qcow2_snapshot_load_tmp, what
// `qemu-img convert -l` uses): the node, opened read-only, switches its L1 table to the
// snapshot's. Nothing is written; the virtual size stays the active image's, as in QEMU.

#include <cerrno>

#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/qcow2_node.h"

namespace strata::block::qcow2 {

namespace {

// QEMU's find_snapshot_by_id_and_name, where a given but empty ID or name must match exactly.
int find_snapshot_exact(const std::vector<SnapshotEntry>& entries,
                        const std::optional<std::string>& id,
                        const std::optional<std::string>& name) {
  if (!id && !name) {
    return -1;
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    if ((!id || entries[i].id == *id) && (!name || entries[i].name == *name)) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

}  // namespace

aio::Task<Result<void>> Qcow2Node::load_snapshot_read_only(std::optional<std::string> id,
                                                           std::optional<std::string> name) {
  if (refcounts_ != nullptr) {
    co_return Error(ErrorKind::kInvalidArgument, "Device '' is not readonly", EINVAL);
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  auto meta = co_await meta_.scoped_lock();
  const int index = find_snapshot_exact(snapshots_.entries, id, name);
  if (index < 0) {
    co_return Error(ErrorKind::kNotFound, "Can't find snapshot", ENOENT);
  }
  const SnapshotEntry snapshot = snapshots_.entries[static_cast<size_t>(index)];
  Result<void> valid = validate_table(snapshot.l1_table_offset, snapshot.l1_size, 8, kMaxL1Bytes,
                                      header_.cluster_size(), "Snapshot L1 table");
  if (!valid) {
    co_return valid;
  }
  std::vector<uint8_t> raw(uint64_t{snapshot.l1_size} * 8);
  Result<void> read =
      co_await read_zero_padded(file(), snapshot.l1_table_offset, IoVector(raw.data(), raw.size()));
  if (!read) {
    co_return Error(ErrorKind::kIo, "Failed to read l1 table for snapshot",
                    read.error().errno_value());
  }
  std::vector<uint64_t> l1(snapshot.l1_size);
  for (uint64_t i = 0; i < snapshot.l1_size; ++i) {
    l1[i] = load_be64(raw.data() + i * 8);
  }
  header_.l1_size = snapshot.l1_size;
  header_.l1_table_offset = snapshot.l1_table_offset;
  map_->replace_l1(std::move(l1), snapshot.l1_size);
  map_->l2_cache().drop_clean();
  co_return ok();
}

}  // namespace strata::block::qcow2
