// Loading and storing qcow2 persistent dirty bitmaps through a Qcow2Node (QEMU's
// block/qcow2-bitmap.c); the on-disk format is in bitmaps.h / bitmap_directory.cc.

#include "block/drivers/qcow2/bitmaps.h"

#include <cstdio>
#include <cstring>

#include "aio/event_loop.h"
#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/io/request.h"
#include "block/io/request_tracker.h"

namespace strata::block::qcow2 {

namespace {

Error invalid(std::string message) {
  return Error(ErrorKind::kInvalidArgument, std::move(message), EINVAL);
}

BitmapDirectoryEntry* find_entry(std::vector<BitmapDirectoryEntry>& entries,
                                 const std::string& name) {
  for (auto& entry : entries) {
    if (entry.name == name) {
      return &entry;
    }
  }
  return nullptr;
}

uint32_t granularity_bits_of(uint32_t granularity) {
  uint32_t bits = 0;
  while ((uint32_t{1} << bits) < granularity) {
    ++bits;
  }
  return bits;
}

// Clusters of the bitmap table of `dirty` in an image with `cluster_size` clusters.
uint64_t table_clusters_for(const bitmap::DirtyBitmap& dirty, uint64_t cluster_size) {
  const uint64_t bytes = dirty.serialization_size(0, dirty.size());
  return (bytes + cluster_size - 1) / cluster_size;
}

}  // namespace

// ---- reading -----------------------------------------------------------------------------------

aio::Task<Result<std::vector<BitmapDirectoryEntry>>> Qcow2Node::read_bitmap_directory() {
  const uint64_t size = header_contents_.bitmap_directory_size;
  if (header_contents_.nb_bitmaps == 0) {
    co_return std::vector<BitmapDirectoryEntry>();
  }
  if (size == 0) {
    co_return invalid("Requested bitmap directory size is zero");
  }
  if (size > kMaxBitmapDirectorySize) {
    co_return invalid("Requested bitmap directory size is too big");
  }
  std::vector<uint8_t> directory(size);
  Result<void> read = co_await read_zero_padded(file(), header_contents_.bitmap_directory_offset,
                                                IoVector(directory.data(), directory.size()));
  if (!read) {
    co_return read.error().with_prefix("Failed to read bitmap directory");
  }
  co_return parse_bitmap_directory(directory, header_contents_.nb_bitmaps, header_.cluster_size(),
                                   length());
}

aio::Task<Result<std::vector<uint64_t>>> Qcow2Node::read_bitmap_table(
    const BitmapDirectoryEntry& entry) {
  std::vector<uint8_t> raw(uint64_t{entry.table_size} * 8);
  Result<void> read =
      co_await read_zero_padded(file(), entry.table_offset, IoVector(raw.data(), raw.size()));
  if (!read) {
    co_return std::move(read).error();
  }
  std::vector<uint64_t> table(entry.table_size);
  for (uint64_t i = 0; i < table.size(); ++i) {
    table[i] = load_be64(raw.data() + i * 8);
    if (!bitmap_table_entry_valid(table[i], header_.cluster_size())) {
      co_return Error(ErrorKind::kInvalidArgument, "Invalid argument", EINVAL);
    }
  }
  co_return table;
}

aio::Task<Result<void>> Qcow2Node::load_bitmaps(bool writable) {
  Result<std::vector<BitmapDirectoryEntry>> directory = co_await read_bitmap_directory();
  if (!directory) {
    co_return std::move(directory).error();
  }
  std::vector<BitmapDirectoryEntry> entries = std::move(directory).value();
  bitmap_directory_ = entries;
  const uint64_t cluster_size = header_.cluster_size();
  bitmap::BitmapSet& set = dirty_bitmaps();
  std::vector<std::string> created;
  auto fail = [&](Error error) {
    for (const auto& name : created) {
      set.remove(name);
    }
    return error;
  };
  bool needs_update = false;
  for (auto& entry : entries) {
    if ((entry.flags & kBitmapFlagInUse) != 0 && set.find(entry.name) != nullptr) {
      // Already in memory (reactivation): the image holds an outdated copy.
      continue;
    }
    if (set.find(entry.name) != nullptr) {
      co_return fail(invalid("Bitmap already exists: " + entry.name));
    }
    auto dirty = std::make_unique<bitmap::DirtyBitmap>(entry.name, length(),
                                                       uint32_t{1} << entry.granularity_bits);
    if ((entry.flags & kBitmapFlagInUse) == 0) {
      Result<std::vector<uint64_t>> table = co_await read_bitmap_table(entry);
      if (!table) {
        co_return fail(table.error().with_prefix(
            "Could not read bitmap_table table from image for bitmap '" + entry.name + "'"));
      }
      const uint64_t expected = table_clusters_for(*dirty, cluster_size);
      if (expected != entry.table_size || expected > kMaxBitmapTableSize) {
        co_return fail(
            Error::from_errno(EINVAL, "Could not read bitmap '" + entry.name + "' from image"));
      }
      const uint64_t coverage = dirty->serialization_coverage(cluster_size);
      std::vector<uint8_t> buffer(cluster_size);
      for (uint64_t i = 0; i < table->size(); ++i) {
        const uint64_t offset = i * coverage;
        const uint64_t count = std::min(dirty->size() - offset, coverage);
        const uint64_t data_offset = (*table)[i] & kBitmapTableEntryOffsetMask;
        if (data_offset == 0) {
          if (((*table)[i] & kBitmapTableEntryAllOnes) != 0) {
            dirty->set(offset, count);
          }
          continue;
        }
        Result<void> read =
            co_await read_zero_padded(file(), data_offset, IoVector(buffer.data(), cluster_size));
        if (!read) {
          co_return fail(
              read.error().with_prefix("Could not read bitmap '" + entry.name + "' from image"));
        }
        dirty->deserialize_part(buffer, offset, count);
      }
    }
    dirty->set_persistent(true);
    if ((entry.flags & kBitmapFlagInUse) != 0) {
      dirty->set_inconsistent();
    } else {
      entry.flags |= kBitmapFlagInUse;
      needs_update = true;
    }
    if ((entry.flags & kBitmapFlagAuto) == 0) {
      dirty->set_enabled(false);
    }
    dirty->set_readonly(!writable);
    created.push_back(entry.name);
    set.add(std::move(dirty));
  }
  if (needs_update && writable) {
    Result<void> updated = co_await rewrite_bitmap_directory_in_place(entries);
    if (!updated) {
      co_return fail(updated.error().with_prefix("Can't update bitmap directory"));
    }
    bitmap_directory_ = std::move(entries);
  }
  co_return ok();
}

// ---- directory and header updates --------------------------------------------------------

aio::Task<Result<void>> Qcow2Node::rewrite_bitmap_directory_in_place(
    const std::vector<BitmapDirectoryEntry>& entries) {
  if ((header_.autoclear_features & kAutoclearBitmaps) == 0 || entries.empty() ||
      entries.size() != header_contents_.nb_bitmaps) {
    co_return Error(ErrorKind::kInvalidArgument, "Invalid argument", EINVAL);
  }
  const std::vector<uint8_t> directory = serialize_bitmap_directory(entries);
  if (directory.size() != header_contents_.bitmap_directory_size) {
    co_return Error(ErrorKind::kInvalidArgument, "Invalid argument", EINVAL);
  }
  // While the autoclear bit is clear, readers ignore the directory, so rewriting it in place
  // cannot leave a half-written directory that claims to be valid.
  header_.autoclear_features &= ~kAutoclearBitmaps;
  Result<void> step = co_await rewrite_header();
  if (!step) {
    co_return step;
  }
  std::vector<uint8_t> copy = directory;
  step = co_await write_growing(file(), header_contents_.bitmap_directory_offset,
                                IoVector(copy.data(), copy.size()));
  if (!step) {
    co_return step;
  }
  step = co_await rewrite_header();
  if (!step) {
    co_return step;
  }
  header_.autoclear_features |= kAutoclearBitmaps;
  step = co_await rewrite_header();
  co_return step;
}

aio::Task<Result<void>> Qcow2Node::replace_bitmap_directory(
    const std::vector<BitmapDirectoryEntry>& entries) {
  const HeaderContents old_contents = header_contents_;
  const uint64_t old_autoclear = header_.autoclear_features;
  const uint64_t cluster_size = header_.cluster_size();
  uint64_t new_offset = 0;
  uint64_t new_size = 0;
  if (!entries.empty()) {
    if (entries.size() > kMaxBitmaps) {
      co_return Error(ErrorKind::kInvalidArgument, "Invalid argument", EINVAL);
    }
    std::vector<uint8_t> directory = serialize_bitmap_directory(entries);
    if (directory.size() > kMaxBitmapDirectorySize) {
      co_return Error(ErrorKind::kInvalidArgument, "Invalid argument", EINVAL);
    }
    for (const auto& entry : entries) {
      if (!bitmap_directory_entry_valid(entry, cluster_size, length())) {
        co_return Error(ErrorKind::kInvalidArgument, "Invalid argument", EINVAL);
      }
    }
    new_size = directory.size();
    Result<uint64_t> allocated =
        co_await refcounts_->allocate((new_size + cluster_size - 1) / cluster_size);
    if (!allocated) {
      co_return std::move(allocated).error();
    }
    new_offset = *allocated;
    Result<void> written =
        co_await write_growing(file(), new_offset, IoVector(directory.data(), directory.size()));
    if (written) {
      // Tables, data clusters, the directory and their refcounts reach the disk before the
      // header names them.
      written = co_await sync_metadata();
    }
    if (!written) {
      ignore_error(co_await refcounts_->update(new_offset, new_size, -1),
                   "the new directory leaks; qemu-img check -r repairs it");
      co_return written;
    }
    header_.autoclear_features |= kAutoclearBitmaps;
  } else {
    header_.autoclear_features &= ~kAutoclearBitmaps;
  }
  header_contents_.bitmap_directory_offset = new_offset;
  header_contents_.bitmap_directory_size = new_size;
  header_contents_.nb_bitmaps = static_cast<uint32_t>(entries.size());
  Result<void> switched = co_await rewrite_header();
  if (!switched) {
    if (new_offset != 0) {
      ignore_error(co_await refcounts_->update(new_offset, new_size, -1),
                   "the new directory leaks; qemu-img check -r repairs it");
    }
    header_contents_ = old_contents;
    header_.autoclear_features = old_autoclear;
    co_return switched;
  }
  bitmap_directory_ = entries;
  if (old_contents.bitmap_directory_size > 0) {
    ignore_error(co_await refcounts_->update(old_contents.bitmap_directory_offset,
                                             old_contents.bitmap_directory_size, -1),
                 "QEMU ignores failures to free the old directory (a leak at worst)");
  }
  co_return ok();
}

// ---- storing -----------------------------------------------------------------------------

aio::Task<Result<void>> Qcow2Node::free_bitmap_clusters(uint64_t table_offset,
                                                        uint32_t table_size) {
  BitmapDirectoryEntry entry;
  entry.table_offset = table_offset;
  entry.table_size = table_size;
  Result<std::vector<uint64_t>> table = co_await read_bitmap_table(entry);
  if (!table) {
    co_return std::move(table).error();
  }
  const uint64_t cluster_size = header_.cluster_size();
  for (uint64_t value : *table) {
    const uint64_t offset = value & kBitmapTableEntryOffsetMask;
    if (offset != 0) {
      ignore_error(co_await refcounts_->update(offset, cluster_size, -1),
                   "QEMU frees bitmap clusters without checking (a leak at worst)");
    }
  }
  ignore_error(co_await refcounts_->update(table_offset, uint64_t{table_size} * 8, -1),
               "QEMU frees bitmap tables without checking (a leak at worst)");
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::store_bitmap(BitmapDirectoryEntry& entry,
                                                const bitmap::DirtyBitmap& dirty) {
  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t table_size = table_clusters_for(dirty, cluster_size);
  if (table_size > kMaxBitmapTableSize || table_size * cluster_size > kMaxBitmapPhysSize) {
    co_return invalid("Bitmap '" + dirty.name() + "' is too big");
  }
  std::vector<uint64_t> table(table_size, 0);
  auto release_data = [&]() -> aio::Task<void> {
    for (uint64_t value : table) {
      if (value != 0) {
        ignore_error(co_await refcounts_->update(value, cluster_size, -1),
                     "a failed store leaks at worst");
      }
    }
  };
  const uint64_t coverage = dirty.serialization_coverage(cluster_size);
  std::vector<uint8_t> buffer(cluster_size);
  uint64_t offset = 0;
  // Only clusters of the bitmap with a dirty bit get a data cluster; the others stay 0 (all
  // zeroes) in the table.
  while (auto next = dirty.next_dirty(offset)) {
    const uint64_t start = *next / coverage * coverage;
    const uint64_t end = std::min(dirty.size(), start + coverage);
    Result<uint64_t> allocated = co_await refcounts_->allocate(1);
    if (!allocated) {
      co_await release_data();
      co_return allocated.error().with_prefix("Failed to allocate clusters for bitmap '" +
                                              dirty.name() + "'");
    }
    table[start / coverage] = *allocated;
    std::fill(buffer.begin(), buffer.end(), 0);
    dirty.serialize_part(
        std::span<uint8_t>(buffer.data(), dirty.serialization_size(start, end - start)), start,
        end - start);
    Result<void> written =
        co_await write_growing(file(), *allocated, IoVector(buffer.data(), cluster_size));
    if (!written) {
      co_await release_data();
      co_return written.error().with_prefix("Failed to write bitmap '" + dirty.name() +
                                            "' to file");
    }
    offset = end;
  }

  const uint64_t table_bytes = table_size * 8;
  Result<uint64_t> table_offset =
      co_await refcounts_->allocate((table_bytes + cluster_size - 1) / cluster_size);
  if (!table_offset) {
    co_await release_data();
    co_return table_offset.error().with_prefix("Failed to allocate clusters for bitmap '" +
                                               dirty.name() + "'");
  }
  std::vector<uint8_t> raw(table_bytes);
  for (uint64_t i = 0; i < table_size; ++i) {
    put_be64(raw.data() + i * 8, table[i]);
  }
  Result<void> written =
      co_await write_growing(file(), *table_offset, IoVector(raw.data(), raw.size()));
  if (!written) {
    co_await release_data();
    ignore_error(co_await refcounts_->update(*table_offset, table_bytes, -1),
                 "a failed store leaks at worst");
    co_return written.error().with_prefix("Failed to write bitmap '" + dirty.name() + "' to file");
  }
  entry.table_offset = *table_offset;
  entry.table_size = static_cast<uint32_t>(table_size);
  co_return ok();
}

aio::Task<void> Qcow2Node::free_new_tables(const std::vector<BitmapDirectoryEntry>& entries,
                                           const std::vector<bool>& stored) {
  for (size_t i = 0; i < entries.size(); ++i) {
    if (stored[i] && entries[i].table_offset != 0) {
      ignore_error(co_await free_bitmap_clusters(entries[i].table_offset, entries[i].table_size),
                   "a failed store leaks at worst");
    }
  }
}

aio::Task<Result<void>> Qcow2Node::store_bitmaps(bool release) {
  auto exclusive = co_await lock_.scoped_write_lock();
  auto meta = co_await meta_.scoped_lock();
  Result<std::vector<BitmapDirectoryEntry>> directory = co_await read_bitmap_directory();
  if (!directory) {
    co_return std::move(directory).error();
  }
  std::vector<BitmapDirectoryEntry> entries = std::move(directory).value();
  // Which entries get a new table from which bitmap, and the tables they replace.
  std::vector<const bitmap::DirtyBitmap*> sources(entries.size(), nullptr);
  std::vector<std::pair<uint64_t, uint32_t>> drop_tables;
  uint64_t directory_size = header_contents_.bitmap_directory_size;
  bool need_write = false;
  for (const auto& owned : dirty_bitmaps().bitmaps()) {
    const bitmap::DirtyBitmap& dirty = *owned;
    if (!dirty.persistent() || dirty.inconsistent() || dirty.readonly()) {
      continue;
    }
    need_write = true;
    Result<void> fits = check_bitmap_constraints(dirty.name(), dirty.granularity(), length(),
                                                 header_.cluster_size());
    if (!fits) {
      co_return fits.error().with_prefix("Bitmap '" + dirty.name() +
                                         "' doesn't satisfy the constraints");
    }
    BitmapDirectoryEntry* entry = find_entry(entries, dirty.name());
    if (entry == nullptr) {
      if (entries.size() + 1 > kMaxBitmaps) {
        co_return invalid("Too many persistent bitmaps");
      }
      directory_size += bitmap_directory_entry_size(dirty.name().size());
      if (directory_size > kMaxBitmapDirectorySize) {
        co_return invalid("Bitmap directory is too large");
      }
      entries.push_back(BitmapDirectoryEntry{});
      sources.push_back(nullptr);
      entry = &entries.back();
      entry->name = dirty.name();
    } else {
      if ((entry->flags & kBitmapFlagInUse) == 0) {
        co_return invalid("Bitmap '" + dirty.name() + "' already exists in the image");
      }
      drop_tables.emplace_back(entry->table_offset, entry->table_size);
      entry->table_offset = 0;
      entry->table_size = 0;
    }
    entry->flags = dirty.enabled() ? kBitmapFlagAuto : 0;
    entry->granularity_bits = static_cast<uint8_t>(granularity_bits_of(dirty.granularity()));
    sources[static_cast<size_t>(entry - entries.data())] = &dirty;
  }
  if (need_write) {
    if (refcounts_ == nullptr || !is_writable()) {
      co_return Error(ErrorKind::kPermission, "No write access", EACCES);
    }
    std::vector<bool> stored(entries.size(), false);
    for (size_t i = 0; i < entries.size(); ++i) {
      if (sources[i] == nullptr) {
        continue;
      }
      Result<void> done = co_await store_bitmap(entries[i], *sources[i]);
      if (!done) {
        co_await free_new_tables(entries, stored);
        co_return done;
      }
      stored[i] = true;
    }
    Result<void> switched = co_await replace_bitmap_directory(entries);
    if (!switched) {
      co_await free_new_tables(entries, stored);
      co_return switched.error().with_prefix("Failed to update bitmap extension");
    }
    // The directory no longer names the old tables.
    for (const auto& [offset, size] : drop_tables) {
      ignore_error(co_await free_bitmap_clusters(offset, size),
                   "QEMU ignores failures to free old bitmap data (a leak at worst)");
    }
  }
  if (release) {
    std::vector<std::string> names;
    for (const auto& owned : dirty_bitmaps().bitmaps()) {
      if (owned->persistent() && find_entry(entries, owned->name()) != nullptr) {
        names.push_back(owned->name());
      }
    }
    for (const auto& name : names) {
      dirty_bitmaps().remove(name);
    }
  }
  co_return ok();
}

namespace {

// Lets the driver's own requests reach `root` and the nodes below it while a caller holds them
// quiesced (blockdev-set-active inactivates inside a drained section). QEMU never blocks a
// driver's requests to its children during a drain; strata's request layer parks every new
// request of a quiesced node, so the store at inactivation lifts the quiesce of the image file's
// subtree for its duration and restores it exactly afterwards.
class QuiesceLift {
 public:
  explicit QuiesceLift(Node& root) { lift(root); }
  ~QuiesceLift() {
    for (auto it = lifted_.rbegin(); it != lifted_.rend(); ++it) {
      io::drain_begin(*it->first);
      for (uint64_t i = 1; i < it->second; ++i) {
        io::drain_begin(*it->first);
      }
    }
  }
  QuiesceLift(const QuiesceLift&) = delete;
  QuiesceLift& operator=(const QuiesceLift&) = delete;

 private:
  void lift(Node& node) {
    uint64_t count = 0;
    while (node.requests().quiesced()) {
      io::drain_end(node);
      ++count;
    }
    if (count > 0) {
      lifted_.emplace_back(node.shared_from_this(), count);
    }
    for (const auto& child : node.children()) {
      lift(*child->node());
    }
  }
  std::vector<std::pair<std::shared_ptr<Node>, uint64_t>> lifted_;
};

}  // namespace

bool Qcow2Node::store_bitmaps_now(bool release) {
  bool persistent = false;
  for (const auto& owned : dirty_bitmaps().bitmaps()) {
    persistent = persistent || owned->persistent();
  }
  if (!persistent) {
    return true;
  }
  QuiesceLift lift(file());
  auto loop = aio::EventLoop::create(16);
  Result<void> stored =
      loop ? (*loop)->block_on(store_bitmaps(release)) : Result<void>(std::move(loop).error());
  if (!stored) {
    std::fflush(stdout);
    std::fprintf(stderr, "Lost persistent bitmaps during inactivation of node '%s': %s\n",
                 name().c_str(), stored.error().message().c_str());
    return false;
  }
  return true;
}

Result<void> Qcow2Node::on_activate() {
  if (dirty_bitmaps().empty() && header_contents_.nb_bitmaps == 0) {
    return ok();
  }
  QuiesceLift lift(file());
  auto loop = aio::EventLoop::create(16);
  if (!loop) {
    return std::move(loop).error();
  }
  return (*loop)->block_on(load_bitmaps(refcounts_ != nullptr && !read_only_));
}

// ---- QEMU's driver callbacks -------------------------------------------------------------

Result<void> Qcow2Node::can_store_new_bitmap(const std::string& name, uint64_t granularity) {
  auto fail = [&](const Error& error) {
    return error.with_prefix("Can't make bitmap '" + name + "' persistent in '" + this->name() +
                             "'");
  };
  if (header_.version < 3) {
    return fail(invalid("Cannot store dirty bitmaps in qcow2 v2 files"));
  }
  Result<void> fits = check_bitmap_constraints(name, granularity, length(), header_.cluster_size());
  if (!fits) {
    return fail(fits.error());
  }
  uint64_t count = 1;
  uint64_t directory_size = bitmap_directory_entry_size(name.size());
  for (const auto& owned : dirty_bitmaps().bitmaps()) {
    if (owned->persistent()) {
      ++count;
      directory_size += bitmap_directory_entry_size(owned->name().size());
    }
  }
  if (count > kMaxBitmaps) {
    return fail(invalid("Maximum number of persistent bitmaps is already reached"));
  }
  if (directory_size > kMaxBitmapDirectorySize) {
    return fail(invalid("Not enough space in the bitmap directory"));
  }
  return ok();
}

aio::Task<Result<void>> Qcow2Node::remove_persistent_bitmap(std::string name) {
  if (header_contents_.nb_bitmaps == 0) {
    co_return ok();
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  auto meta = co_await meta_.scoped_lock();
  Result<std::vector<BitmapDirectoryEntry>> directory = co_await read_bitmap_directory();
  if (!directory) {
    co_return std::move(directory).error();
  }
  std::vector<BitmapDirectoryEntry> entries = std::move(directory).value();
  BitmapDirectoryEntry* entry = find_entry(entries, name);
  if (entry == nullptr) {
    co_return ok();
  }
  const BitmapDirectoryEntry removed = *entry;
  entries.erase(entries.begin() + (entry - entries.data()));
  if (refcounts_ == nullptr) {
    co_return Error(ErrorKind::kPermission, "Failed to update bitmap extension: No write access",
                    EACCES);
  }
  Result<void> switched = co_await replace_bitmap_directory(entries);
  if (!switched) {
    co_return switched.error().with_prefix("Failed to update bitmap extension");
  }
  ignore_error(co_await free_bitmap_clusters(removed.table_offset, removed.table_size),
               "QEMU ignores failures to free a removed bitmap (a leak at worst)");
  co_return ok();
}

}  // namespace strata::block::qcow2
