// The qcow2 writer: guest writes, write-zeroes and discard (see qcow2_node.h for the ordering
// and locking rules this file implements).

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <string>

#include "block/drivers/blkdebug/events.h"
#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/overlap.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

namespace {

// Offset of the autoclear feature bits in a version 3 header (qcow2.rst "Header").
constexpr uint64_t kHeaderAutoclearOffset = 88;
// How far ensure_file_covers extends the image file beyond what an allocation needs: a quarter
// of the file's size, at least kFileGrowStep and at most kFileGrowMaxStep. Growing by a share of
// the size keeps the number of ftruncate calls logarithmic: each one runs on the event loop and
// waits for the buffered write the kernel is carrying out (the inode lock), which on a loaded
// machine stalled a 2 GiB convert for a large part of its time with 8 MiB steps.
constexpr uint64_t kFileGrowStep = 8ull << 20;
constexpr uint64_t kFileGrowMaxStep = 1ull << 30;
// The largest run of clusters one allocation covers (bounds the COW buffers and the time the
// exclusive lock is held by one step).
constexpr uint64_t kMaxAllocationBytes = 8ull << 20;

std::string hex(uint64_t value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%#" PRIx64, value);
  return buffer;
}

Error corruption(const std::string& what) {
  return Error(ErrorKind::kCorrupt, "qcow2: Image is corrupt: " + what, EIO);
}

// Allocated host cluster with refcount 1: guest writes may go there directly.
bool writable_in_place(uint64_t entry) {
  return (entry & kOflagCopied) != 0 && (entry & (kOflagCompressed | kOflagZero)) == 0 &&
         (entry & kL2OffsetMask) != 0;
}

// A preallocated zero cluster with refcount 1: rewritten in place (rewrite_zero_cluster).
bool reusable_zero_cluster(uint64_t entry) {
  return (entry & kOflagCopied) != 0 && (entry & kOflagZero) != 0 &&
         (entry & kOflagCompressed) == 0 && (entry & kL2OffsetMask) != 0;
}

// What an old L2 entry reads as is zeroes: a zero cluster, or unallocated without a backing
// file (compressed and allocated clusters hold data).
bool reads_as_zeroes(uint64_t entry, bool has_backing) {
  if ((entry & kOflagCompressed) != 0) {
    return false;
  }
  if ((entry & kOflagZero) != 0) {
    return true;
  }
  return (entry & kL2OffsetMask) == 0 && !has_backing;
}

}  // namespace

// ---- open ----------------------------------------------------------------------------------

Result<void> Qcow2Node::prepare_writes(
    const Extensions& /*extensions*/, uint64_t refcount_cache_blocks,
    const std::function<Result<void>(aio::Task<Result<void>>)>& run, bool active) {
  // QEMU refuses these too (qcow2_do_open).
  if (header_.incompatible_features & kIncompatCorrupt) {
    return Error(ErrorKind::kPermission, "qcow2: Image is corrupt; cannot be opened read/write",
                 EACCES);
  }
  const uint64_t table_bytes = uint64_t{header_.refcount_table_clusters} << header_.cluster_bits;
  Result<void> valid =
      validate_table(header_.refcount_table_offset, table_bytes / 8, 8, kMaxRefcountTableBytes,
                     header_.cluster_size(), "Reference count table");
  if (!valid) {
    return valid;
  }
  if ((header_.incompatible_features & kIncompatDirty) != 0 && active) {
    Result<void> repaired = run(repair_dirty_image());
    if (!repaired) {
      return repaired;
    }
  }
  Result<void> loaded = run(load_refcounts(refcount_cache_blocks));
  if (!loaded) {
    return loaded;
  }
  if (header_.version >= 3 && (header_.autoclear_features & ~kept_autoclear_bits()) != 0) {
    // qcow2.rst: autoclear bits a writer does not understand must be cleared before writing.
    // strata keeps the bitmaps bit of a valid bitmaps extension (bitmaps.cc maintains it) and
    // data-file-raw (data_file.cc).
    Result<void> cleared = run(clear_autoclear_bits());
    if (!cleared) {
      return cleared;
    }
  }
  return ok();
}

aio::Task<Result<void>> Qcow2Node::load_refcounts(uint64_t cache_blocks) {
  const uint64_t entries = (uint64_t{header_.refcount_table_clusters} << header_.cluster_bits) / 8;
  std::vector<uint8_t> raw(entries * 8);
  Result<void> read = co_await read_zero_padded(file(), header_.refcount_table_offset,
                                                IoVector(raw.data(), raw.size()));
  if (!read) {
    co_return read.error().with_prefix("Could not read refcount table");
  }
  std::vector<uint64_t> table(entries);
  for (uint64_t i = 0; i < entries; ++i) {
    table[i] = load_be64(raw.data() + i * 8);
  }
  refcounts_ = std::make_unique<Refcounts>(file(), header_, std::move(table),
                                           std::max<uint64_t>(cache_blocks, 4), file().length());
  refcounts_->set_write_back_hook([this] { return before_refcount_write_back(); });
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::clear_autoclear_bits() {
  const uint64_t kept = header_.autoclear_features & kept_autoclear_bits();
  uint8_t value[8] = {};
  put_be64(value, kept);
  Result<void> written = co_await io::pwrite(file(), kHeaderAutoclearOffset, value, 8);
  if (!written) {
    co_return written.error().with_prefix("Could not update qcow2 header");
  }
  Result<void> flushed = co_await io::flush(file());
  if (!flushed) {
    co_return flushed;
  }
  header_.autoclear_features = kept;
  co_return ok();
}

// ---- mapping for writes ----------------------------------------------------------------------

aio::Task<Result<Qcow2Node::L2Ref>> Qcow2Node::l2_ref(uint64_t guest_cluster) {
  const uint32_t l2_bits = header_.l2_bits();
  L2Ref ref;
  ref.l1_index = guest_cluster >> l2_bits;
  ref.l2_index = guest_cluster & ((uint64_t{1} << l2_bits) - 1);
  if (ref.l1_index >= header_.l1_size) {
    co_return Error(ErrorKind::kIo,
                    "qcow2: L1 table too small for guest cluster " + hex(guest_cluster), EIO);
  }
  const uint64_t l1_entry = map_->l1_entry(ref.l1_index);
  ref.l2_offset = l1_entry & kL1OffsetMask;
  if (ref.l2_offset == 0) {
    co_return ref;
  }
  if ((ref.l2_offset & (header_.cluster_size() - 1)) != 0) {
    co_return corruption("L2 table offset " + hex(ref.l2_offset) +
                         " unaligned (L1 index: " + hex(ref.l1_index) + ")");
  }
  const uint64_t slice_offset = map_->slice_offset(ref.l2_offset, ref.l2_index);
  Result<L2Slice> slice = co_await map_->l2_cache().get(file(), slice_offset);
  if (!slice) {
    co_return std::move(slice).error();
  }
  const uint32_t stride = header_.extended_l2() ? 2 : 1;
  const uint64_t word = (ref.l2_index % map_->slice_entries()) * stride;
  ref.entry = (**slice)[word];
  ref.bitmap = stride == 2 ? (**slice)[word + 1] : 0;
  const uint64_t host = ref.entry & kL2OffsetMask;
  if ((ref.entry & kOflagCompressed) == 0 && (host & (header_.cluster_size() - 1)) != 0) {
    co_return corruption("Cluster allocation offset " + hex(host) + " unaligned (L2 offset: " +
                         hex(ref.l2_offset) + ", L2 index: " + hex(ref.l2_index) + ")");
  }
  co_return ref;
}

aio::Task<Result<void>> Qcow2Node::read_for_cow(uint64_t offset, std::vector<uint8_t>& buffer) {
  const uint64_t readable =
      offset >= length() ? 0 : std::min<uint64_t>(buffer.size(), length() - offset);
  std::fill(buffer.begin() + static_cast<ptrdiff_t>(readable), buffer.end(), 0);
  if (readable == 0) {
    co_return ok();
  }
  Result<void> read = co_await read_unlocked(offset, readable, IoVector(buffer.data(), readable));
  co_return read;
}

// ---- writes --------------------------------------------------------------------------------

aio::Task<Result<void>> Qcow2Node::co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                              uint32_t flags) {
  Result<void> usable = check_usable();
  if (!usable) {
    co_return usable;
  }
  if (flags & kRequestWriteCompressed) {
    co_return co_await write_compressed(offset, bytes, std::move(qiov));
  }
  if (uses_general_write_path()) {
    co_return co_await write_general(offset, bytes, std::move(qiov), flags);  // subcluster_write.cc
  }
  uint64_t done = 0;
  {
    auto shared = co_await lock_.scoped_read_lock();
    Result<bool> in_place = co_await write_in_place(offset, bytes, qiov, flags);
    if (!in_place) {
      co_return std::move(in_place).error();
    }
    if (*in_place) {
      co_return ok();
    }
    Result<uint64_t> written = co_await write_clusters(offset, bytes, qiov, flags, false);
    if (!written) {
      co_return std::move(written).error();
    }
    done = *written;
  }
  if (done < bytes) {
    // The rest replaces clusters that must be freed: no reader may use them meanwhile.
    auto exclusive = co_await lock_.scoped_write_lock();
    Result<uint64_t> written = co_await write_clusters(offset + done, bytes - done,
                                                       qiov.slice(done, bytes - done), flags, true);
    if (!written) {
      co_return std::move(written).error();
    }
  }
  if ((flags & kRequestFua) != 0) {
    Result<void> flushed = co_await write_caches_and_flush();
    co_return flushed;
  }
  co_return ok();
}

aio::Task<Result<bool>> Qcow2Node::write_in_place(uint64_t offset, uint64_t bytes, IoVector qiov,
                                                  uint32_t flags) {
  struct Run {
    uint64_t host;
    uint64_t at;  // offset in qiov
    uint64_t bytes;
  };
  std::vector<Run> runs;
  const uint64_t cluster_size = header_.cluster_size();
  for (uint64_t pos = offset; pos < offset + bytes;) {
    Result<L2Ref> ref = co_await l2_ref(pos >> header_.cluster_bits);
    if (!ref) {
      co_return std::move(ref).error();
    }
    if (!writable_in_place(ref->entry)) {
      co_return false;
    }
    const uint64_t in_cluster = pos & (cluster_size - 1);
    const uint64_t n = std::min(offset + bytes - pos, cluster_size - in_cluster);
    const uint64_t host = (ref->entry & kL2OffsetMask) + in_cluster;
    if (!runs.empty() && runs.back().host + runs.back().bytes == host) {
      runs.back().bytes += n;
    } else {
      runs.push_back(Run{host, pos - offset, n});
    }
    pos += n;
  }
  for (const Run& run : runs) {
    Result<void> allowed = co_await pre_write_overlap_check(0, run.host, run.bytes, true);
    if (!allowed) {
      co_return std::move(allowed).error();
    }
    block::debug_event(child("file"), BlkdebugEvent::kWriteAio);
    Result<void> written = co_await write_growing(file(), run.host, qiov.slice(run.at, run.bytes),
                                                  flags & kRequestFua);
    if (!written) {
      co_return std::move(written).error();
    }
  }
  co_return true;
}

std::shared_ptr<Qcow2Node::InflightAllocation> Qcow2Node::inflight_for(uint64_t cluster) const {
  for (const auto& allocation : inflight_) {
    if (cluster >= allocation->first_cluster &&
        cluster - allocation->first_cluster < allocation->clusters) {
      return allocation;
    }
  }
  return nullptr;
}

aio::Task<Result<uint64_t>> Qcow2Node::write_clusters(uint64_t offset, uint64_t bytes,
                                                      IoVector qiov, uint32_t flags,
                                                      bool may_free) {
  const uint64_t cluster_size = header_.cluster_size();
  const uint32_t cluster_bits = header_.cluster_bits;
  const uint64_t end = offset + bytes;
  const uint64_t max_clusters = std::max<uint64_t>(1, kMaxAllocationBytes >> cluster_bits);
  uint64_t pos = offset;
  while (pos < end) {
    const uint64_t guest_cluster = pos >> cluster_bits;
    const uint64_t in_cluster = pos & (cluster_size - 1);
    uint64_t n = std::min(end - pos, cluster_size - in_cluster);
    auto meta = co_await meta_.scoped_lock();
    // QEMU's handle_dependencies: wait for an allocation of this very cluster, then look again.
    if (auto busy = inflight_for(guest_cluster)) {
      meta.unlock();
      co_await busy->done.wait();
      continue;
    }
    Result<L2Ref> ref = co_await l2_ref(guest_cluster);
    if (!ref) {
      co_return std::move(ref).error();
    }
    if (writable_in_place(ref->entry)) {
      Result<void> allowed =
          co_await pre_write_overlap_check(0, (ref->entry & kL2OffsetMask) + in_cluster, n, true);
      if (!allowed) {
        co_return std::move(allowed).error();
      }
      meta.unlock();
      block::debug_event(child("file"), BlkdebugEvent::kWriteAio);
      Result<void> written =
          co_await write_growing(file(), (ref->entry & kL2OffsetMask) + in_cluster,
                                 qiov.slice(pos - offset, n), flags & kRequestFua);
      if (!written) {
        co_return std::move(written).error();
      }
      pos += n;
      continue;
    }
    if (reusable_zero_cluster(ref->entry)) {
      auto allocation = std::make_shared<InflightAllocation>();
      allocation->first_cluster = guest_cluster;
      allocation->clusters = 1;
      inflight_.push_back(allocation);
      Result<void> rewritten =
          co_await rewrite_zero_cluster(meta, *ref, pos, n, qiov.slice(pos - offset, n));
      inflight_.erase(std::find(inflight_.begin(), inflight_.end(), allocation));
      allocation->done.set();
      if (!rewritten) {
        co_return std::move(rewritten).error();
      }
      Result<void> trimmed = co_await trim_caches();
      if (!trimmed) {
        co_return std::move(trimmed).error();
      }
      pos += n;
      continue;
    }
    if (!may_free && needs_release(ref->entry)) {
      co_return pos - offset;
    }
    // The following clusters that need an allocation too, in the same L2 table and not in
    // flight elsewhere.
    std::vector<uint64_t> old_entries{ref->entry};
    while (pos + n < end && old_entries.size() < max_clusters) {
      const uint64_t next = guest_cluster + old_entries.size();
      if ((next >> header_.l2_bits()) != ref->l1_index || inflight_for(next) != nullptr) {
        break;
      }
      Result<L2Ref> next_ref = co_await l2_ref(next);
      if (!next_ref) {
        co_return std::move(next_ref).error();
      }
      if (writable_in_place(next_ref->entry) || reusable_zero_cluster(next_ref->entry) ||
          (!may_free && needs_release(next_ref->entry))) {
        break;
      }
      old_entries.push_back(next_ref->entry);
      n += std::min(end - (pos + n), cluster_size);
    }
    auto allocation = std::make_shared<InflightAllocation>();
    allocation->first_cluster = guest_cluster;
    allocation->clusters = old_entries.size();
    inflight_.push_back(allocation);
    Result<void> run =
        co_await allocate_run(meta, *ref, pos, n, qiov.slice(pos - offset, n), old_entries);
    inflight_.erase(std::find(inflight_.begin(), inflight_.end(), allocation));
    allocation->done.set();
    if (!run) {
      co_return std::move(run).error();
    }
    Result<void> trimmed = co_await trim_caches();
    if (!trimmed) {
      co_return std::move(trimmed).error();
    }
    pos += n;
  }
  co_return bytes;
}

aio::Task<Result<uint64_t>> Qcow2Node::allocate_l2_table(uint64_t l1_index) {
  block::debug_event(child("file"), BlkdebugEvent::kL2AllocWrite);
  Result<uint64_t> table = co_await refcounts_->allocate(1);
  if (!table) {
    co_return std::move(table).error();
  }
  // QEMU's l2_allocate: the (empty) table and its refcount are durable before the L1 entry
  // points at it.
  const uint64_t cluster_size = header_.cluster_size();
  Result<void> written = co_await pre_write_overlap_check(kOverlapActiveL2, *table, cluster_size,
                                                          /*data_file=*/false);
  if (!written) {
    co_return std::move(written).error();
  }
  if (*table >= file().length()) {
    written = co_await io::truncate(file(), *table + cluster_size, false);  // reads as zeroes
  } else {
    std::vector<uint8_t> zeroes(cluster_size, 0);
    written = co_await write_growing(file(), *table, IoVector(zeroes.data(), zeroes.size()));
  }
  if (!written) {
    co_return std::move(written).error();
  }
  Result<void> counted = co_await refcounts_->write_back();
  if (!counted) {
    co_return std::move(counted).error();
  }
  Result<void> flushed = co_await meta_flush();
  if (!flushed) {
    co_return std::move(flushed).error();
  }
  block::debug_event(child("file"), BlkdebugEvent::kL1Update);
  written = co_await write_l1_entry(l1_index, *table | kOflagCopied);
  if (!written) {
    co_return std::move(written).error();
  }
  const uint32_t slice_bytes = map_->l2_cache().slice_bytes();
  for (uint64_t at = 0; at < cluster_size; at += slice_bytes) {
    map_->l2_cache().put_clean(*table + at, std::vector<uint64_t>(slice_bytes / 8, 0));
  }
  co_return *table;
}

aio::Task<Result<void>> Qcow2Node::allocate_run(aio::CoMutex::Guard& meta, const L2Ref& first,
                                                uint64_t offset, uint64_t bytes, IoVector data,
                                                const std::vector<uint64_t>& old_entries) {
  const uint32_t cluster_bits = header_.cluster_bits;
  const uint64_t count = old_entries.size();
  const uint64_t guest_start = (offset >> cluster_bits) << cluster_bits;

  // An L2 table without OFLAG_COPIED may be shared with a snapshot: write to a private copy.
  uint64_t l2_offset = first.l2_offset;
  if (l2_offset != 0) {
    Result<uint64_t> writable = co_await writable_l2_table(first.l1_index, l2_offset);
    if (!writable) {
      co_return std::move(writable).error();
    }
    l2_offset = *writable;
  }
  if (l2_offset == 0) {
    Result<uint64_t> table = co_await allocate_l2_table(first.l1_index);
    if (!table) {
      co_return std::move(table).error();
    }
    l2_offset = *table;
  }

  // 1. Refcounts of the new clusters (in the cache; written before any L2 entry using them).
  block::debug_event(child("file"), BlkdebugEvent::kClusterAlloc);
  Result<uint64_t> host = co_await refcounts_->allocate(count);
  if (!host) {
    co_return std::move(host).error();
  }

  const uint64_t host_end = *host + (count << cluster_bits);
  Result<void> covered = co_await ensure_file_covers(host_end);
  if (!covered) {
    Result<void> freed = co_await refcounts_->update(*host, count << cluster_bits, -1);
    ignore_error(std::move(freed), "the clusters of a failed allocation only leak");
    co_return covered;
  }

  // COW regions of clusters that read as zeroes are written from a shared zero buffer, without
  // reading anything (QEMU's is_zero_cow).
  const bool cow_is_zero = std::all_of(old_entries.begin(), old_entries.end(), [&](uint64_t entry) {
    return reads_as_zeroes(entry, backing_child() != nullptr);
  });

  // 2. Data with the COW head and tail (old data, backing data or zeroes), without meta_: the
  //    clusters are in flight, so nothing else reads them as new or writes them.
  meta.unlock();
  Result<void> filled = ok();
  if (cow_is_zero) {
    const uint64_t head = offset - guest_start;
    const uint64_t tail = guest_start + (count << cluster_bits) - (offset + bytes);
    if (zero_cluster_.size() < std::max(head, tail)) {
      zero_cluster_.assign(header_.cluster_size(), 0);
    }
    IoVector cluster_data;
    if (head != 0) {
      cluster_data.append(zero_cluster_.data(), head);
    }
    cluster_data.append(data);
    if (tail != 0) {
      cluster_data.append(zero_cluster_.data(), tail);
    }
    filled = co_await pre_write_overlap_check(0, *host, cluster_data.size(), /*data_file=*/true);
    if (filled) {
      block::debug_event(child("file"), BlkdebugEvent::kWriteAio);
      filled = co_await write_growing(file(), *host, cluster_data);
    }
  } else if (filled) {
    std::vector<uint8_t> head(offset - guest_start);
    std::vector<uint8_t> tail(guest_start + (count << cluster_bits) - (offset + bytes));
    if (!head.empty() || !tail.empty()) {
      block::debug_event(child("file"), BlkdebugEvent::kCowRead);
    }
    if (!head.empty()) {
      filled = co_await read_for_cow(guest_start, head);
    }
    if (filled && !tail.empty()) {
      filled = co_await read_for_cow(offset + bytes, tail);
    }
    if (filled) {
      IoVector cluster_data;
      cluster_data.append(head.data(), head.size());
      cluster_data.append(data);
      cluster_data.append(tail.data(), tail.size());
      filled = co_await pre_write_overlap_check(0, *host, cluster_data.size(),
                                                /*data_file=*/true);
      if (filled) {
        block::debug_event(child("file"), BlkdebugEvent::kWriteAio);
        filled = co_await write_growing(file(), *host, cluster_data);
      }
    }
  }
  meta = co_await meta_.scoped_lock();
  if (!filled) {
    // Nothing points at the new clusters: give them back (a failure here only leaks them).
    Result<void> freed = co_await refcounts_->update(*host, count << cluster_bits, -1);
    ignore_error(std::move(freed), "the clusters of a failed allocation only leak");
    co_return filled;
  }

  // 3. Publish: the L2 slice now depends on the refcounts and the data written above.
  Result<void> ordered = co_await l2_depends_on_new_clusters();
  if (!ordered) {
    co_return ordered;
  }
  std::vector<uint64_t> entries(count);
  for (uint64_t i = 0; i < count; ++i) {
    entries[i] = (*host + (i << cluster_bits)) | kOflagCopied;
  }
  // Lazy refcounts: the dirty bit is on disk before the first L2/L1 update (dirty.cc).
  Result<void> dirty = co_await mark_dirty();
  if (!dirty) {
    co_return dirty;
  }
  block::debug_event(child("file"), BlkdebugEvent::kL2Update);
  Result<void> written = co_await write_l2_entries(l2_offset, first.l2_index, entries);
  if (!written) {
    co_return written;
  }

  // 4. What the new clusters replaced loses its reference (on disk only after the new entries).
  for (uint64_t entry : old_entries) {
    if (!needs_release(entry)) {
      continue;
    }
    Result<void> released = co_await release_entry(entry);
    if (!released) {
      co_return released;
    }
  }
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::rewrite_zero_cluster(aio::CoMutex::Guard& meta, const L2Ref& ref,
                                                        uint64_t offset, uint64_t bytes,
                                                        IoVector data) {
  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t head = offset & (cluster_size - 1);
  const uint64_t tail = cluster_size - head - bytes;
  const uint64_t host = ref.entry & kL2OffsetMask;
  Result<uint64_t> l2_offset = co_await writable_l2_table(ref.l1_index, ref.l2_offset);
  if (!l2_offset) {
    co_return std::move(l2_offset).error();
  }
  if (zero_cluster_.size() < cluster_size) {
    zero_cluster_.assign(cluster_size, 0);
  }
  IoVector cluster_data;
  if (head != 0) {
    cluster_data.append(zero_cluster_.data(), head);
  }
  cluster_data.append(data);
  if (tail != 0) {
    cluster_data.append(zero_cluster_.data(), tail);
  }
  // The data is written without meta_ (the cluster is in flight); until the entry changes,
  // readers still see zeroes.
  meta.unlock();
  Result<void> filled = co_await pre_write_overlap_check(0, host, cluster_size, true);
  if (filled) {
    block::debug_event(child("file"), BlkdebugEvent::kWriteAio);
    filled = co_await write_growing(file(), host, cluster_data);
  }
  meta = co_await meta_.scoped_lock();
  if (!filled) {
    co_return filled;
  }
  // The new entry reaches the file only after the data (l2_needs_flush_).
  Result<void> ordered = co_await l2_depends_on_new_clusters();
  if (!ordered) {
    co_return ordered;
  }
  Result<void> dirty = co_await mark_dirty();
  if (!dirty) {
    co_return dirty;
  }
  block::debug_event(child("file"), BlkdebugEvent::kL2Update);
  const std::vector<uint64_t> entry{host | kOflagCopied};
  co_return co_await write_l2_entries(*l2_offset, ref.l2_index, entry);
}

aio::Task<Result<void>> Qcow2Node::ensure_file_covers(uint64_t end) {
  if (end <= file().length()) {
    co_return ok();
  }
  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t step = std::clamp(file().length() / 4, kFileGrowStep, kFileGrowMaxStep);
  const uint64_t target = (end + step + cluster_size - 1) & ~(cluster_size - 1);
  Result<void> grown = co_await io::truncate(file(), target, false);
  if (!grown) {
    // Growing ahead is an optimisation: fall back to exactly what is needed.
    grown = co_await io::truncate(file(), end, false);
    co_return grown;
  }
  file_grown_ahead_ = true;
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::write_l2_entries(uint64_t l2_offset, uint64_t l2_index,
                                                    const std::vector<uint64_t>& entries) {
  // With extended L2 the bitmap is kept, except for entries that become unallocated or
  // compressed: their bitmap must be 0.
  const uint32_t stride = header_.extended_l2() ? 2 : 1;
  for (size_t i = 0; i < entries.size(); ++i) {
    const uint64_t index = l2_index + i;
    const uint64_t slice_offset = map_->slice_offset(l2_offset, index);
    const auto word = static_cast<uint32_t>(index % map_->slice_entries() * stride);
    Result<void> set = co_await map_->l2_cache().set_entry(file(), slice_offset, word, entries[i]);
    if (set && stride == 2 &&
        ((entries[i] & kOflagCompressed) != 0 ||
         cluster_kind(entries[i]) == ClusterKind::kUnallocated)) {
      set = co_await map_->l2_cache().set_entry(file(), slice_offset, word + 1, 0);
    }
    if (!set) {
      co_return set;
    }
  }
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::write_l1_entry(uint64_t l1_index, uint64_t entry) {
  uint8_t raw[8];
  put_be64(raw, entry);
  Result<void> written = co_await pre_write_overlap_check(
      kOverlapActiveL1, header_.l1_table_offset + l1_index * 8, 8, false);
  if (!written) {
    co_return written;
  }
  written = co_await meta_write(header_.l1_table_offset + l1_index * 8, IoVector(raw, 8));
  if (!written) {
    co_return written;
  }
  map_->set_l1_entry(l1_index, entry);
  co_return ok();
}

bool Qcow2Node::needs_release(uint64_t entry) {
  return (entry & kOflagCompressed) != 0 || (entry & kL2OffsetMask) != 0;
}

aio::Task<Result<void>> Qcow2Node::release_entry(uint64_t entry) {
  if (data_file_ != nullptr) {
    co_return ok();  // data clusters of an external data file are not refcounted (data_file.cc)
  }
  Result<void> ordered = co_await refcounts_depend_on_l2();
  if (!ordered) {
    co_return ordered;
  }
  block::debug_event(child("file"), BlkdebugEvent::kClusterFree);
  if (entry & kOflagCompressed) {
    free_byte_offset_ = 0;  // the host cluster compressed writes pack into may become free
    // QEMU's qcow2_parse_compressed_l2_entry: the bytes [coffset, coffset + csize) belong to the
    // cluster, and every host cluster they touch holds one reference.
    const uint32_t csize_shift = 62 - (header_.cluster_bits - 8);
    const uint64_t csize_mask = (uint64_t{1} << (header_.cluster_bits - 8)) - 1;
    const uint64_t coffset = entry & ((uint64_t{1} << csize_shift) - 1);
    const uint64_t sectors = ((entry >> csize_shift) & csize_mask) + 1;
    const uint64_t csize = sectors * 512 - (coffset & 511);
    Result<void> released = co_await refcounts_->update(coffset, csize, -1);
    co_return released;
  }
  const uint64_t host = entry & kL2OffsetMask;
  if (host == 0) {
    co_return ok();
  }
  Result<void> released = co_await refcounts_->update(host, header_.cluster_size(), -1);
  if (!released) {
    co_return released;
  }
  if (pass_discard_request_) {
    Result<uint64_t> refcount = co_await refcounts_->get(host >> header_.cluster_bits);
    if (refcount && *refcount == 0) {
      // Advisory, like QEMU's queued discards: a failure changes nothing the guest sees.
      Result<void> discarded = co_await io::pdiscard(file(), host, header_.cluster_size());
      ignore_error(std::move(discarded), "discard of a freed cluster is advisory");
    }
  }
  co_return ok();
}

// ---- write-zeroes and discard ----------------------------------------------------------------

aio::Task<Result<void>> Qcow2Node::co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                                    uint32_t flags) {
  Result<void> usable = check_usable();
  if (!usable) {
    co_return usable;
  }
  if (uses_general_write_path() && refcounts_ != nullptr) {
    co_return co_await zeroize_general(offset, bytes, flags);  // subcluster_write.cc
  }
  // Zero flags exist from version 3 on; partial clusters are left to the request layer, which
  // writes zero buffers when the driver says ENOTSUP.
  const uint64_t mask = header_.cluster_size() - 1;
  const bool whole_clusters =
      (offset & mask) == 0 && ((bytes & mask) == 0 || offset + bytes == length());
  if (header_.version < 3 || !whole_clusters || refcounts_ == nullptr) {
    co_return Error(ErrorKind::kUnsupported, "qcow2: write-zeroes needs whole clusters", ENOTSUP);
  }
  {
    auto exclusive = co_await lock_.scoped_write_lock();
    auto meta = co_await meta_.scoped_lock();
    Result<void> zeroed =
        co_await zero_or_discard_clusters(offset, bytes, false, (flags & kRequestMayUnmap) != 0);
    if (!zeroed) {
      co_return zeroed;
    }
  }
  if (flags & kRequestFua) {
    Result<void> flushed = co_await write_caches_and_flush();
    co_return flushed;
  }
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::co_pdiscard(uint64_t offset, uint64_t bytes) {
  Result<void> usable = check_usable();
  if (!usable) {
    co_return usable;
  }
  const uint64_t mask = header_.cluster_size() - 1;
  if (uses_general_write_path() && refcounts_ != nullptr) {
    co_return co_await discard_general(offset, bytes);  // subcluster_write.cc
  }
  const bool whole_clusters =
      (offset & mask) == 0 && ((bytes & mask) == 0 || offset + bytes == length());
  if (!whole_clusters || refcounts_ == nullptr) {
    co_return Error(ErrorKind::kUnsupported, "qcow2: discard needs whole clusters", ENOTSUP);
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  auto meta = co_await meta_.scoped_lock();
  Result<void> discarded = co_await zero_or_discard_clusters(offset, bytes, true, true);
  co_return discarded;
}

aio::Task<Result<void>> Qcow2Node::zero_or_discard_clusters(uint64_t offset, uint64_t bytes,
                                                            bool discard, bool unmap) {
  // QEMU's zero_in_l2_slice and discard_in_l2_slice (full_discard=false): the new entry reads as
  // zeroes (v3) or as the backing file / zeroes (v2 discard); the old cluster is released unless
  // write-zeroes may keep it allocated. Entries change one L2 table at a time in the cache; the
  // drops of their clusters reach the file only after the new entries (release_entry).
  const uint32_t cluster_bits = header_.cluster_bits;
  const uint64_t first = offset >> cluster_bits;
  const uint64_t last = (offset + bytes - 1) >> cluster_bits;
  const bool backing = backing_child() != nullptr;
  uint64_t cluster = first;
  while (cluster <= last) {
    Result<L2Ref> ref = co_await l2_ref(cluster);
    if (!ref) {
      co_return std::move(ref).error();
    }
    const uint64_t table_end = ((ref->l1_index + 1) << header_.l2_bits()) - 1;
    const uint64_t stop = std::min(last, table_end);
    if (ref->l2_offset == 0) {
      // No L2 table: the range reads from the backing file (as it did before the guest wrote
      // anything, so a discard leaves it) or as zeroes.
      if (discard || !backing) {
        cluster = stop + 1;
        continue;
      }
      // Zeroes over a backing file need an L2 table: let the request layer write zero buffers
      // (they allocate the table) for this part.
      co_return Error(ErrorKind::kUnsupported, "qcow2: no L2 table to hold zero flags", ENOTSUP);
    }
    std::vector<uint64_t> old_entries;
    std::vector<uint64_t> new_entries;
    std::vector<uint64_t> kept_hosts;  // discard-no-unref: clusters kept, their data discarded
    for (uint64_t c = cluster; c <= stop; ++c) {
      uint64_t entry = ref->entry;
      if (c != cluster) {
        Result<L2Ref> at = co_await l2_ref(c);
        if (!at) {
          co_return std::move(at).error();
        }
        entry = at->entry;
      }
      uint64_t updated = 0;
      const bool compressed = (entry & kOflagCompressed) != 0;
      const bool allocated = compressed || (entry & kL2OffsetMask) != 0;
      // QEMU's keep_reference: with discard-no-unref (version 3 only) a guest discard or an
      // unmapping write-zeroes leaves the host cluster allocated, reading as zeroes.
      const bool keep_reference = discard_no_unref_ && !compressed;
      if (discard) {
        if (!allocated && !backing && (entry & kOflagZero) == 0) {
          updated = entry;  // unallocated without a backing file already reads as zeroes
        } else {
          updated = header_.version >= 3 ? kOflagZero : 0;
          if (keep_reference) {
            updated |= entry;
          }
        }
      } else if ((!unmap || keep_reference) && writable_in_place(entry)) {
        updated = entry | kOflagZero;  // keep the cluster, read it as zeroes
      } else if (keep_reference) {
        updated = entry | kOflagZero;
      } else {
        updated = kOflagZero;
      }
      // The kept cluster's old data may still be dropped in the file, but only when no snapshot
      // shares it (OFLAG_COPIED: refcount 1).
      if (keep_reference && (discard || unmap) && updated != entry && (entry & kOflagCopied) != 0 &&
          (entry & kL2OffsetMask) != 0) {
        kept_hosts.push_back(entry & kL2OffsetMask);
      }
      old_entries.push_back(updated == entry || (updated & kL2OffsetMask) != 0 ? 0 : entry);
      new_entries.push_back(updated);
    }
    Result<uint64_t> l2_offset = co_await writable_l2_table(ref->l1_index, ref->l2_offset);
    if (!l2_offset) {
      co_return std::move(l2_offset).error();
    }
    Result<void> written = co_await write_l2_entries(*l2_offset, ref->l2_index, new_entries);
    if (!written) {
      co_return written;
    }
    for (uint64_t entry : old_entries) {
      if (!needs_release(entry)) {
        continue;
      }
      Result<void> released = co_await release_entry(entry);
      if (!released) {
        co_return released;
      }
    }
    if (pass_discard_request_) {
      for (uint64_t host : kept_hosts) {
        // Advisory, as in release_entry.
        Result<void> dropped = co_await io::pdiscard(file(), host, header_.cluster_size());
        ignore_error(std::move(dropped), "discard of a kept cluster's data is advisory");
      }
    }
    Result<void> trimmed = co_await trim_caches();
    if (!trimmed) {
      co_return trimmed;
    }
    cluster = stop + 1;
  }
  co_return ok();
}

}  // namespace strata::block::qcow2
