#include "block/drivers/qcow2/snapshot_table.h"

#include <algorithm>

#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/refcount.h"

namespace strata::block::qcow2 {

namespace {

// Entry header layout (qcow2.rst "Snapshot table entry").
constexpr size_t kL1OffsetAt = 0;
constexpr size_t kL1SizeAt = 8;
constexpr size_t kIdSizeAt = 12;
constexpr size_t kNameSizeAt = 14;
constexpr size_t kDateSecAt = 16;
constexpr size_t kDateNsecAt = 20;
constexpr size_t kVmClockAt = 24;
constexpr size_t kVmStateSizeAt = 32;
constexpr size_t kExtraSizeAt = 36;

void put_be32(uint8_t* p, uint32_t value) {
  p[0] = static_cast<uint8_t>(value >> 24);
  p[1] = static_cast<uint8_t>(value >> 16);
  p[2] = static_cast<uint8_t>(value >> 8);
  p[3] = static_cast<uint8_t>(value);
}

void put_be16(uint8_t* p, uint16_t value) {
  p[0] = static_cast<uint8_t>(value >> 8);
  p[1] = static_cast<uint8_t>(value);
}

aio::Task<Result<std::vector<uint8_t>>> read_table_bytes(Node& file, uint64_t offset,
                                                         uint64_t bytes) {
  std::vector<uint8_t> buffer(bytes);
  if (bytes > 0) {
    Result<void> read =
        co_await read_zero_padded(file, offset, IoVector(buffer.data(), buffer.size()));
    if (!read) {
      co_return read.error().with_prefix("Failed to read snapshot table");
    }
  }
  co_return buffer;
}

// Stored names end at their first NUL, as QEMU's C strings do.
std::string c_string(const std::vector<uint8_t>& bytes) {
  auto end = std::find(bytes.begin(), bytes.end(), uint8_t{0});
  return std::string(bytes.begin(), end);
}

}  // namespace

aio::Task<Result<SnapshotTable>> read_snapshot_table(Node& file, const Header& header) {
  SnapshotTable table;
  uint64_t offset = header.snapshots_offset;
  for (uint32_t i = 0; i < header.nb_snapshots; ++i) {
    offset = (offset + 7) & ~uint64_t{7};
    Result<std::vector<uint8_t>> head =
        co_await read_table_bytes(file, offset, kSnapshotHeaderSize);
    if (!head) {
      co_return std::move(head).error();
    }
    offset += kSnapshotHeaderSize;
    const uint8_t* h = head->data();
    SnapshotEntry entry;
    entry.l1_table_offset = load_be64(h + kL1OffsetAt);
    entry.l1_size = load_be32(h + kL1SizeAt);
    entry.date_sec = load_be32(h + kDateSecAt);
    entry.date_nsec = load_be32(h + kDateNsecAt);
    entry.vm_clock_nsec = load_be64(h + kVmClockAt);
    entry.vm_state_size = load_be32(h + kVmStateSizeAt);
    const uint32_t extra_size = load_be32(h + kExtraSizeAt);
    const uint16_t id_size = load_be16(h + kIdSizeAt);
    const uint16_t name_size = load_be16(h + kNameSizeAt);
    if (extra_size > kMaxSnapshotExtraData) {
      co_return Error(ErrorKind::kInvalidArgument,
                      "Too much extra metadata in snapshot table entry " + std::to_string(i),
                      EFBIG);
    }
    Result<std::vector<uint8_t>> extra = co_await read_table_bytes(file, offset, extra_size);
    if (!extra) {
      co_return std::move(extra).error();
    }
    offset += extra_size;
    if (extra_size >= 8) {
      entry.vm_state_size = load_be64(extra->data());
    }
    entry.disk_size = extra_size >= 16 ? load_be64(extra->data() + 8) : header.size;
    entry.icount = extra_size >= 24 ? load_be64(extra->data() + 16) : UINT64_MAX;
    if (extra_size > kSnapshotKnownExtraBytes) {
      entry.unknown_extra.assign(extra->begin() + kSnapshotKnownExtraBytes, extra->end());
    }
    Result<std::vector<uint8_t>> id = co_await read_table_bytes(file, offset, id_size);
    if (!id) {
      co_return std::move(id).error();
    }
    offset += id_size;
    Result<std::vector<uint8_t>> name = co_await read_table_bytes(file, offset, name_size);
    if (!name) {
      co_return std::move(name).error();
    }
    offset += name_size;
    entry.id = c_string(*id);
    entry.name = c_string(*name);
    if (offset - header.snapshots_offset > kMaxSnapshotsTableBytes) {
      co_return Error(ErrorKind::kInvalidArgument, "Snapshot table is too big", EFBIG);
    }
    table.entries.push_back(std::move(entry));
  }
  table.size = header.nb_snapshots > 0 ? offset - header.snapshots_offset : 0;
  co_return table;
}

std::vector<uint8_t> serialize_snapshot_table(const std::vector<SnapshotEntry>& entries) {
  std::vector<uint8_t> out;
  for (const SnapshotEntry& entry : entries) {
    out.resize((out.size() + 7) & ~size_t{7}, 0);
    const size_t at = out.size();
    const uint32_t extra_size =
        static_cast<uint32_t>(kSnapshotKnownExtraBytes + entry.unknown_extra.size());
    out.resize(at + kSnapshotHeaderSize + extra_size + entry.id.size() + entry.name.size(), 0);
    uint8_t* h = out.data() + at;
    put_be64(h + kL1OffsetAt, entry.l1_table_offset);
    put_be32(h + kL1SizeAt, entry.l1_size);
    put_be16(h + kIdSizeAt, static_cast<uint16_t>(entry.id.size()));
    put_be16(h + kNameSizeAt, static_cast<uint16_t>(entry.name.size()));
    put_be32(h + kDateSecAt, entry.date_sec);
    put_be32(h + kDateNsecAt, entry.date_nsec);
    put_be64(h + kVmClockAt, entry.vm_clock_nsec);
    // The 32-bit field holds the size when it fits; vm_state_size_large always does.
    put_be32(h + kVmStateSizeAt,
             entry.vm_state_size <= UINT32_MAX ? static_cast<uint32_t>(entry.vm_state_size) : 0);
    put_be32(h + kExtraSizeAt, extra_size);
    uint8_t* extra = h + kSnapshotHeaderSize;
    put_be64(extra, entry.vm_state_size);
    put_be64(extra + 8, entry.disk_size);
    put_be64(extra + 16, entry.icount);
    std::copy(entry.unknown_extra.begin(), entry.unknown_extra.end(),
              extra + kSnapshotKnownExtraBytes);
    uint8_t* names = extra + extra_size;
    std::copy(entry.id.begin(), entry.id.end(), names);
    std::copy(entry.name.begin(), entry.name.end(), names + entry.id.size());
  }
  return out;
}

int find_snapshot(const std::vector<SnapshotEntry>& entries, const std::string& id,
                  const std::string& name) {
  if (id.empty() && name.empty()) {
    return -1;
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    if ((id.empty() || entries[i].id == id) && (name.empty() || entries[i].name == name)) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

int find_snapshot_by_id_or_name(const std::vector<SnapshotEntry>& entries,
                                const std::string& id_or_name) {
  int index = find_snapshot(entries, id_or_name, "");
  return index >= 0 ? index : find_snapshot(entries, "", id_or_name);
}

}  // namespace strata::block::qcow2
