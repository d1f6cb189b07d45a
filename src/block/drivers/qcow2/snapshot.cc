// Internal snapshots (qcow2.rst "Snapshots"; QEMU 10's block/qcow2-snapshot.c): create, goto,
// delete and the refcount walk they share, plus the copy of a shared L2 table before a guest
// write changes it.
//
// Crash safety follows QEMU's order: references are added (and reach the file) before anything
// points at them, and dropped only after nothing on disk does, so a crash leaves leaks at worst.
// Like QEMU, the final OFLAG_COPIED pass after a delete or goto runs after the refcounts dropped,
// so a crash between the two leaves flags `qemu-img check -r all` repairs.

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>

#include "aio/event_loop.h"
#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

namespace {

// Unoptimised builds nest a stack frame for every co_await that completes without suspending
// (symmetric transfer becomes a tail call only with optimisation), so long metadata walks over
// cached tables yield to the loop every kWalkBatch steps to let the stack unwind.
constexpr uint32_t kWalkBatch = 64;

// Header fields rewritten here (qcow2.rst "Header").
constexpr uint64_t kHeaderNbSnapshotsOffset = 60;  // nb_snapshots, then snapshots_offset

void store_be32(uint8_t* p, uint32_t value) {
  p[0] = static_cast<uint8_t>(value >> 24);
  p[1] = static_cast<uint8_t>(value >> 16);
  p[2] = static_cast<uint8_t>(value >> 8);
  p[3] = static_cast<uint8_t>(value);
}

std::string hex(uint64_t value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%#" PRIx64, value);
  return buffer;
}

Error corruption(const std::string& what) {
  return Error(ErrorKind::kCorrupt, "qcow2: Image is corrupt: " + what, EIO);
}

Error read_only_node() {
  return Error::from_errno(EACCES, "qcow2: the image is opened read-only");
}

std::vector<uint8_t> be64_bytes(const std::vector<uint64_t>& table) {
  std::vector<uint8_t> raw(table.size() * 8);
  for (size_t i = 0; i < table.size(); ++i) {
    put_be64(raw.data() + i * 8, table[i]);
  }
  return raw;
}

}  // namespace

std::vector<Node::SnapshotInfo> Qcow2Node::snapshot_list() const {
  std::vector<SnapshotInfo> list;
  for (const SnapshotEntry& entry : snapshots_.entries) {
    list.push_back(SnapshotInfo{entry.id, entry.name, entry.vm_state_size, entry.date_sec,
                                entry.date_nsec, entry.vm_clock_nsec, entry.icount});
  }
  return list;
}

std::vector<uint64_t> Qcow2Node::active_l1_table() const {
  std::vector<uint64_t> l1(header_.l1_size, 0);
  const std::vector<uint64_t>& stored = map_->l1();
  std::copy_n(stored.begin(), std::min<size_t>(stored.size(), l1.size()), l1.begin());
  return l1;
}

aio::Task<Result<void>> Qcow2Node::write_header_field(uint64_t offset, const void* data,
                                                      uint64_t bytes) {
  Result<void> written = co_await io::pwrite(file(), offset, data, bytes);
  if (!written) {
    co_return written.error().with_prefix("Could not update qcow2 header");
  }
  Result<void> flushed = co_await sync_metadata();
  co_return flushed;
}

// ---- the refcount walk ---------------------------------------------------------------------

aio::Task<Result<void>> Qcow2Node::update_snapshot_refcount(uint64_t l1_offset, uint64_t l1_size,
                                                            int addend) {
  const uint64_t cluster_size = header_.cluster_size();
  const uint32_t cluster_bits = header_.cluster_bits;
  const bool active = l1_offset == header_.l1_table_offset;
  std::vector<uint64_t> l1;
  if (active) {
    l1 = active_l1_table();
  } else {
    if (l1_size > kMaxL1Bytes / 8) {
      co_return corruption("snapshot L1 table too large");
    }
    std::vector<uint8_t> raw(l1_size * 8);
    Result<void> read =
        co_await read_zero_padded(file(), l1_offset, IoVector(raw.data(), raw.size()));
    if (!read) {
      co_return read;
    }
    l1.resize(l1_size);
    for (uint64_t i = 0; i < l1_size; ++i) {
      l1[i] = load_be64(raw.data() + i * 8);
    }
  }

  const uint32_t slice_entries = map_->slice_entries();
  const uint64_t table_entries = uint64_t{1} << header_.l2_bits();
  const uint32_t csize_shift = 62 - (cluster_bits - 8);
  const uint64_t csize_mask = (uint64_t{1} << (cluster_bits - 8)) - 1;
  bool l1_modified = false;
  uint32_t steps = 0;
  if (addend != 0) {
    // The flags set below follow the new counts: the refcount blocks reach the file before the
    // L2 slices (a cleared OFLAG_COPIED with the count still 1, or a set one with the count
    // still 2, is a corruption to qemu-img check).
    Result<void> ordered = co_await l2_depends_on_new_clusters();
    if (!ordered) {
      co_return ordered;
    }
  }
  for (uint64_t i = 0; i < l1.size(); ++i) {
    if (++steps % kWalkBatch == 0) {
      co_await aio::EventLoop::current()->yield();
    }
    const uint64_t l2_offset = l1[i] & kL1OffsetMask;
    if (l2_offset == 0) {
      continue;
    }
    if ((l2_offset & (cluster_size - 1)) != 0) {
      co_return corruption("L2 table offset " + hex(l2_offset) + " unaligned (L1 index: " + hex(i) +
                           ")");
    }
    for (uint64_t first = 0; first < table_entries; first += slice_entries) {
      const uint64_t slice_offset = map_->slice_offset(l2_offset, first);
      Result<L2Slice> slice = co_await map_->l2_cache().get(file(), slice_offset);
      if (!slice) {
        co_return std::move(slice).error();
      }
      // The entries of the slice (with extended L2, every other word is a subcluster bitmap).
      const uint32_t stride = header_.extended_l2() ? 2 : 1;
      std::vector<uint64_t> entries((*slice)->size() / stride);
      for (size_t w = 0; w < entries.size(); ++w) {
        entries[w] = (**slice)[w * stride];
      }
      uint64_t changed_begin = entries.size();
      uint64_t changed_end = 0;
      for (uint64_t j = 0; j < entries.size(); ++j) {
        if (++steps % kWalkBatch == 0) {
          co_await aio::EventLoop::current()->yield();
        }
        const uint64_t entry = entries[j];
        uint64_t refcount = 0;
        if ((entry & kOflagCompressed) != 0) {
          if (addend != 0) {
            const uint64_t coffset = entry & ((uint64_t{1} << csize_shift) - 1);
            const uint64_t sectors = ((entry >> csize_shift) & csize_mask) + 1;
            const uint64_t csize = sectors * 512 - (coffset & 511);
            Result<void> updated = co_await refcounts_->update(coffset, csize, addend);
            if (!updated) {
              co_return updated;
            }
          }
          continue;  // compressed entries never carry OFLAG_COPIED
        }
        const uint64_t host = entry & kL2OffsetMask;
        if (host != 0) {
          if ((host & (cluster_size - 1)) != 0) {
            co_return corruption("Cluster allocation offset " + hex(host) +
                                 " unaligned (L2 offset: " + hex(l2_offset) +
                                 ", L2 index: " + hex(first + j) + ")");
          }
          if (addend != 0) {
            Result<void> updated = co_await refcounts_->update(host, cluster_size, addend);
            if (!updated) {
              co_return updated;
            }
          }
          Result<uint64_t> count = co_await refcounts_->get(host >> cluster_bits);
          if (!count) {
            co_return std::move(count).error();
          }
          refcount = *count;
        }
        const uint64_t flagged = refcount == 1 ? entry | kOflagCopied : entry & ~kOflagCopied;
        if (flagged != entry) {
          entries[j] = flagged;
          changed_begin = std::min(changed_begin, j);
          changed_end = j + 1;
        }
      }
      if (changed_begin < changed_end) {
        Result<void> written = co_await write_l2_entries(
            l2_offset, first + changed_begin,
            std::vector<uint64_t>(entries.begin() + static_cast<ptrdiff_t>(changed_begin),
                                  entries.begin() + static_cast<ptrdiff_t>(changed_end)));
        if (!written) {
          co_return written;
        }
      }
    }
    if (addend != 0) {
      Result<void> updated = co_await refcounts_->update(l2_offset, cluster_size, addend);
      if (!updated) {
        co_return updated;
      }
    }
    Result<uint64_t> count = co_await refcounts_->get(l2_offset >> cluster_bits);
    if (!count) {
      co_return std::move(count).error();
    }
    if (*count == 0) {
      // The table is free now: its cached slices (flags just changed above) must not be
      // written back over the next user of the cluster.
      forget_l2_table(l2_offset);
      continue;
    }
    const uint64_t flagged = *count == 1 ? l1[i] | kOflagCopied : l1[i] & ~kOflagCopied;
    if (flagged != l1[i]) {
      l1[i] = flagged;
      l1_modified = true;
    }
  }

  if (addend >= 0 && l1_modified) {
    // QEMU's bdrv_flush before the L1 write: the L2 flags and counts it relies on come first.
    Result<void> synced = co_await sync_metadata();
    if (!synced) {
      co_return synced;
    }
    std::vector<uint8_t> raw = be64_bytes(l1);
    Result<void> written =
        co_await write_growing(file(), l1_offset, IoVector(raw.data(), raw.size()));
    if (!written) {
      co_return written;
    }
    Result<void> flushed = co_await sync_metadata();
    if (!flushed) {
      co_return flushed;
    }
    if (active) {
      map_->replace_l1(std::move(l1), header_.l1_size);
    }
  }
  co_return ok();
}

// ---- the snapshot table --------------------------------------------------------------------

aio::Task<Result<void>> Qcow2Node::write_snapshot_table(std::vector<SnapshotEntry> entries) {
  const uint64_t cluster_size = header_.cluster_size();
  std::vector<uint8_t> table = serialize_snapshot_table(entries);
  if (table.size() > kMaxSnapshotsTableBytes) {
    co_return Error::from_errno(EFBIG, "Snapshot table is too big");
  }
  uint64_t table_offset = 0;
  if (!table.empty()) {
    Result<uint64_t> allocated =
        co_await refcounts_->allocate((table.size() + cluster_size - 1) / cluster_size);
    if (!allocated) {
      co_return std::move(allocated).error();
    }
    table_offset = *allocated;
    Result<void> written =
        co_await write_growing(file(), table_offset, IoVector(table.data(), table.size()));
    if (!written) {
      co_return written;
    }
  }
  // The new table and its refcounts are stable before the header points at them.
  Result<void> flushed = co_await sync_metadata();
  if (!flushed) {
    co_return flushed;
  }
  uint8_t field[12];
  store_be32(field, static_cast<uint32_t>(entries.size()));
  put_be64(field + 4, table_offset);
  Result<void> switched = co_await write_header_field(kHeaderNbSnapshotsOffset, field, 12);
  if (!switched) {
    co_return switched;
  }
  const uint64_t old_offset = header_.snapshots_offset;
  const uint64_t old_size = snapshots_.size;
  header_.nb_snapshots = static_cast<uint32_t>(entries.size());
  header_.snapshots_offset = table_offset;
  snapshots_.entries = std::move(entries);
  snapshots_.size = table.size();
  if (old_size > 0) {
    Result<void> freed = co_await refcounts_->update(old_offset, old_size, -1);
    if (!freed) {
      co_return freed;
    }
  }
  co_return ok();
}

// ---- operations ------------------------------------------------------------------------------

aio::Task<Result<void>> Qcow2Node::co_snapshot_create(SnapshotEntry entry) {
  if (refcounts_ == nullptr) {
    co_return read_only_node();
  }
  if (data_file_ != nullptr) {
    // QEMU's qcow2_snapshot_create/goto: data clusters of an external data file are not
    // refcounted, so they cannot be shared with a snapshot.
    co_return Error(ErrorKind::kUnsupported, "Operation not supported", ENOTSUP);
  }
  // Metadata cached by the writer reaches the file before the walk reads tables.
  Result<void> flushed = co_await co_flush();
  if (!flushed) {
    co_return flushed;
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  auto meta = co_await meta_.scoped_lock();
  if (snapshots_.entries.size() >= kMaxSnapshots) {
    co_return Error::from_errno(EFBIG, "");
  }
  // QEMU's find_new_snapshot_id: one more than the largest numeric ID.
  unsigned long max_id = 0;
  for (const SnapshotEntry& existing : snapshots_.entries) {
    max_id = std::max(max_id, std::strtoul(existing.id.c_str(), nullptr, 10));
  }
  entry.id = std::to_string(max_id + 1);
  if (find_snapshot(snapshots_.entries, entry.id, "") >= 0) {
    co_return Error::from_errno(EEXIST, "");
  }
  entry.disk_size = length();
  entry.l1_size = header_.l1_size;
  entry.l1_table_offset = 0;

  // The snapshot's copy of the active L1 table.
  if (header_.l1_size > 0) {
    const uint64_t cluster_size = header_.cluster_size();
    std::vector<uint8_t> raw = be64_bytes(active_l1_table());
    Result<uint64_t> allocated =
        co_await refcounts_->allocate((raw.size() + cluster_size - 1) / cluster_size);
    if (!allocated) {
      co_return std::move(allocated).error();
    }
    entry.l1_table_offset = *allocated;
    Result<void> written =
        co_await write_growing(file(), entry.l1_table_offset, IoVector(raw.data(), raw.size()));
    if (!written) {
      co_return written;
    }
  }
  // Every reachable cluster gains the snapshot's reference (and the active tables lose
  // OFLAG_COPIED) before the snapshot table names the new L1 copy.
  Result<void> counted =
      co_await update_snapshot_refcount(header_.l1_table_offset, header_.l1_size, 1);
  if (!counted) {
    co_return counted;
  }
  std::vector<SnapshotEntry> entries = snapshots_.entries;
  entries.push_back(std::move(entry));
  Result<void> written = co_await write_snapshot_table(std::move(entries));
  co_return written;
}

aio::Task<Result<void>> Qcow2Node::co_snapshot_goto(const std::string& id_or_name) {
  if (refcounts_ == nullptr) {
    co_return read_only_node();
  }
  if (data_file_ != nullptr) {
    // QEMU's qcow2_snapshot_create/goto: data clusters of an external data file are not
    // refcounted, so they cannot be shared with a snapshot.
    co_return Error(ErrorKind::kUnsupported, "Operation not supported", ENOTSUP);
  }
  Result<void> flushed = co_await co_flush();
  if (!flushed) {
    co_return flushed;
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  auto meta = co_await meta_.scoped_lock();
  const int index = find_snapshot_by_id_or_name(snapshots_.entries, id_or_name);
  if (index < 0) {
    co_return Error::from_errno(ENOENT, "");
  }
  const SnapshotEntry snapshot = snapshots_.entries[static_cast<size_t>(index)];
  Result<void> valid = validate_table(snapshot.l1_table_offset, snapshot.l1_size, 8, kMaxL1Bytes,
                                      header_.cluster_size(), "Snapshot L1 table");
  if (!valid) {
    co_return valid;
  }
  if (snapshot.disk_size != length()) {
    // QEMU 10 resizes the image to the snapshot's size first.
    if ((snapshot.disk_size & 511) != 0) {
      co_return Error(ErrorKind::kInvalidArgument, "The new size must be a multiple of 512",
                      EINVAL);
    }
    Result<void> resized = co_await resize_unlocked(snapshot.disk_size);
    if (!resized) {
      co_return resized;
    }
  }
  // The active L1 must hold every entry of the snapshot's (padded with zeroes otherwise).
  Result<void> grown = co_await grow_l1_table(snapshot.l1_size, true);
  if (!grown) {
    co_return grown;
  }
  std::vector<uint64_t> new_l1(header_.l1_size, 0);
  {
    std::vector<uint8_t> raw(uint64_t{snapshot.l1_size} * 8);
    Result<void> read = co_await read_zero_padded(file(), snapshot.l1_table_offset,
                                                  IoVector(raw.data(), raw.size()));
    if (!read) {
      co_return read;
    }
    for (uint64_t i = 0; i < snapshot.l1_size; ++i) {
      new_l1[i] = load_be64(raw.data() + i * 8);
    }
  }
  // References for what the new active table reaches come first; the old active table's are
  // dropped only once the file holds the new table.
  Result<void> counted =
      co_await update_snapshot_refcount(snapshot.l1_table_offset, snapshot.l1_size, 1);
  if (!counted) {
    co_return counted;
  }
  std::vector<uint8_t> raw = be64_bytes(new_l1);
  Result<void> written =
      co_await write_growing(file(), header_.l1_table_offset, IoVector(raw.data(), raw.size()));
  if (written) {
    written = co_await sync_metadata();
  }
  if (!written) {
    co_return written;
  }
  Result<void> dropped =
      co_await update_snapshot_refcount(header_.l1_table_offset, header_.l1_size, -1);
  // The in-memory table follows the file even when dropping references failed.
  map_->replace_l1(std::move(new_l1), header_.l1_size);
  map_->l2_cache().drop_clean();
  if (!dropped) {
    co_return dropped;
  }
  // OFLAG_COPIED of the new active tables (refcounts may have dropped to 1 above).
  Result<void> flagged =
      co_await update_snapshot_refcount(header_.l1_table_offset, header_.l1_size, 0);
  co_return flagged;
}

aio::Task<Result<void>> Qcow2Node::co_snapshot_delete(const std::string& id,
                                                      const std::string& name) {
  if (refcounts_ == nullptr) {
    co_return read_only_node();
  }
  Result<void> flushed = co_await co_flush();
  if (!flushed) {
    co_return flushed;
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  auto meta = co_await meta_.scoped_lock();
  const int index = find_snapshot(snapshots_.entries, id, name);
  if (index < 0) {
    co_return Error(ErrorKind::kNotFound, "Can't find the snapshot", ENOENT);
  }
  std::vector<SnapshotEntry> entries = snapshots_.entries;
  const SnapshotEntry snapshot = entries[static_cast<size_t>(index)];
  entries.erase(entries.begin() + index);
  Result<void> removed = co_await write_snapshot_table(std::move(entries));
  if (!removed) {
    co_return removed.error().with_prefix("Failed to remove snapshot from snapshot list");
  }
  // Nothing names the snapshot any more: a failure from here on leaks clusters only.
  if (snapshot.l1_size > 0) {
    Result<void> released =
        co_await update_snapshot_refcount(snapshot.l1_table_offset, snapshot.l1_size, -1);
    if (released) {
      released =
          co_await refcounts_->update(snapshot.l1_table_offset, uint64_t{snapshot.l1_size} * 8, -1);
    }
    if (!released) {
      co_return released.error().with_prefix("Failed to free the cluster and L1 table");
    }
  }
  Result<void> flagged =
      co_await update_snapshot_refcount(header_.l1_table_offset, header_.l1_size, 0);
  if (!flagged) {
    co_return flagged.error().with_prefix("Failed to update snapshot status in disk");
  }
  co_return ok();
}

// ---- copy of a shared L2 table ---------------------------------------------------------------

aio::Task<Result<uint64_t>> Qcow2Node::writable_l2_table(uint64_t l1_index, uint64_t l2_offset) {
  const uint64_t cluster_size = header_.cluster_size();
  if ((map_->l1_entry(l1_index) & kOflagCopied) != 0) {
    co_return l2_offset;
  }
  Result<uint64_t> refcount = co_await refcounts_->get(l2_offset >> header_.cluster_bits);
  if (!refcount) {
    co_return std::move(refcount).error();
  }
  if (*refcount == 0) {
    co_return corruption("L2 table at " + hex(l2_offset) + " has refcount 0");
  }
  if (*refcount == 1) {
    // Only the flag was missing.
    Result<void> fixed = co_await write_l1_entry(l1_index, l2_offset | kOflagCopied);
    if (!fixed) {
      co_return std::move(fixed).error();
    }
    co_return l2_offset;
  }
  // Shared with a snapshot: the active L1 gets its own copy. The copy keeps every entry (and so
  // the references the old table held: the data clusters' refcounts already count both tables).
  std::vector<uint64_t> entries;
  entries.reserve(cluster_size / 8);
  const uint64_t table_entries = uint64_t{1} << header_.l2_bits();
  uint32_t steps = 0;
  for (uint64_t first = 0; first < table_entries; first += map_->slice_entries()) {
    if (++steps % kWalkBatch == 0) {
      co_await aio::EventLoop::current()->yield();
    }
    Result<L2Slice> slice =
        co_await map_->l2_cache().get(file(), map_->slice_offset(l2_offset, first));
    if (!slice) {
      co_return std::move(slice).error();
    }
    entries.insert(entries.end(), (*slice)->begin(), (*slice)->end());
  }
  Result<uint64_t> copy = co_await refcounts_->allocate(1);
  if (!copy) {
    co_return std::move(copy).error();
  }
  std::vector<uint8_t> raw = be64_bytes(entries);
  Result<void> written = co_await write_growing(file(), *copy, IoVector(raw.data(), raw.size()));
  if (written) {
    written = co_await sync_metadata();
  }
  if (written) {
    written = co_await write_l1_entry(l1_index, *copy | kOflagCopied);
  }
  if (written) {
    written = co_await sync_metadata();
  }
  if (written) {
    written = co_await refcounts_->update(l2_offset, cluster_size, -1);
  }
  if (!written) {
    co_return std::move(written).error();
  }
  co_return *copy;
}

}  // namespace strata::block::qcow2
