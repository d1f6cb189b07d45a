// The qcow2 writer: guest writes, write-zeroes and discard (see qcow2_node.h for the ordering
// and locking rules this file implements).

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <string>

#include "block/drivers/blkdebug/events.h"
#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

namespace {

// Offset of the autoclear feature bits in a version 3 header (qcow2.rst "Header").
constexpr uint64_t kHeaderAutoclearOffset = 88;
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

Error read_only_only(const std::string& what) {
  return Error(ErrorKind::kUnsupported,
               "qcow2 images " + what +
                   " can only be opened read-only in this version of strata (set read-only=on)",
               ENOTSUP);
}

// Allocated host cluster with refcount 1: guest writes may go there directly.
bool writable_in_place(uint64_t entry) {
  return (entry & kOflagCopied) != 0 && (entry & (kOflagCompressed | kOflagZero)) == 0 &&
         (entry & kL2OffsetMask) != 0;
}

}  // namespace

// ---- open ----------------------------------------------------------------------------------

Result<void> Qcow2Node::prepare_writes(
    const Extensions& extensions, uint64_t refcount_cache_blocks,
    const std::function<Result<void>(aio::Task<Result<void>>)>& run) {
  // QEMU refuses these too (qcow2_do_open).
  if (header_.incompatible_features & kIncompatCorrupt) {
    return Error(ErrorKind::kPermission, "Image is corrupt; cannot be opened read/write", EACCES);
  }
  if (header_.incompatible_features & kIncompatDirty) {
    // QEMU rebuilds the refcounts of an image left dirty by lazy refcounts; strata does not yet.
    return Error(ErrorKind::kUnsupported,
                 "qcow2 image is dirty (lazy refcounts were not written back); repair it with "
                 "'qemu-img check -r all' before opening it read-write",
                 ENOTSUP);
  }
  if (header_.extended_l2()) {
    return read_only_only("with extended L2 entries");
  }
  if (header_.incompatible_features & kIncompatDataFile) {
    return read_only_only("with an external data file");
  }
  if (header_.nb_snapshots > 0) {
    return read_only_only("with internal snapshots");
  }
  if (extensions.has_bitmaps) {
    return read_only_only("with persistent dirty bitmaps");
  }
  const uint64_t table_bytes = uint64_t{header_.refcount_table_clusters} << header_.cluster_bits;
  Result<void> valid =
      validate_table(header_.refcount_table_offset, table_bytes / 8, 8, kMaxRefcountTableBytes,
                     header_.cluster_size(), "Reference count table");
  if (!valid) {
    return valid;
  }
  Result<void> loaded = run(load_refcounts(refcount_cache_blocks));
  if (!loaded) {
    return loaded;
  }
  if (header_.version >= 3 && header_.autoclear_features != 0) {
    // qcow2.rst: autoclear bits a writer does not understand must be cleared before writing.
    // The only ones strata knows (bitmaps, data-file-raw) were refused above.
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
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::clear_autoclear_bits() {
  uint8_t zeroes[8] = {};
  Result<void> written = co_await io::pwrite(file(), kHeaderAutoclearOffset, zeroes, 8);
  if (!written) {
    co_return written.error().with_prefix("Could not update qcow2 header");
  }
  Result<void> flushed = co_await io::flush(file());
  if (!flushed) {
    co_return flushed;
  }
  header_.autoclear_features = 0;
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
  ref.entry = (**slice)[ref.l2_index % map_->slice_entries()];
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
  if (flags & kRequestWriteCompressed) {
    co_return co_await write_compressed(offset, bytes, std::move(qiov));
  }
  {
    auto shared = co_await lock_.scoped_read_lock();
    Result<bool> in_place = co_await write_in_place(offset, bytes, qiov, flags);
    if (!in_place) {
      co_return std::move(in_place).error();
    }
    if (*in_place) {
      co_return ok();
    }
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  Result<void> written = co_await write_allocating(offset, bytes, qiov, flags);
  co_return written;
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
    block::debug_event(child("file"), BlkdebugEvent::kWriteAio);
    Result<void> written = co_await write_growing(file(), run.host, qiov.slice(run.at, run.bytes),
                                                  flags & kRequestFua);
    if (!written) {
      co_return std::move(written).error();
    }
  }
  co_return true;
}

aio::Task<Result<void>> Qcow2Node::write_allocating(uint64_t offset, uint64_t bytes, IoVector qiov,
                                                    uint32_t flags) {
  const uint64_t cluster_size = header_.cluster_size();
  const uint32_t cluster_bits = header_.cluster_bits;
  const uint64_t end = offset + bytes;
  const uint64_t max_clusters = std::max<uint64_t>(1, kMaxAllocationBytes >> cluster_bits);
  uint64_t pos = offset;
  bool allocated = false;
  while (pos < end) {
    const uint64_t guest_cluster = pos >> cluster_bits;
    Result<L2Ref> ref = co_await l2_ref(guest_cluster);
    if (!ref) {
      co_return std::move(ref).error();
    }
    const uint64_t in_cluster = pos & (cluster_size - 1);
    uint64_t n = std::min(end - pos, cluster_size - in_cluster);
    if (writable_in_place(ref->entry)) {
      block::debug_event(child("file"), BlkdebugEvent::kWriteAio);
      Result<void> written =
          co_await write_growing(file(), (ref->entry & kL2OffsetMask) + in_cluster,
                                 qiov.slice(pos - offset, n), flags & kRequestFua);
      if (!written) {
        co_return written;
      }
      pos += n;
      continue;
    }
    // The following clusters that need an allocation too, in the same L2 table.
    std::vector<uint64_t> old_entries{ref->entry};
    while (pos + n < end && old_entries.size() < max_clusters) {
      const uint64_t next = guest_cluster + old_entries.size();
      if ((next >> header_.l2_bits()) != ref->l1_index) {
        break;
      }
      Result<L2Ref> next_ref = co_await l2_ref(next);
      if (!next_ref) {
        co_return std::move(next_ref).error();
      }
      if (writable_in_place(next_ref->entry)) {
        break;
      }
      old_entries.push_back(next_ref->entry);
      n += std::min(end - (pos + n), cluster_size);
    }
    Result<void> run =
        co_await allocate_run(*ref, pos, n, qiov.slice(pos - offset, n), old_entries);
    if (!run) {
      co_return run;
    }
    allocated = true;
    pos += n;
  }
  if (allocated && (flags & kRequestFua) != 0) {
    Result<void> flushed = co_await io::flush(file());
    if (!flushed) {
      co_return flushed;
    }
  }
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::allocate_run(const L2Ref& first, uint64_t offset, uint64_t bytes,
                                                IoVector data,
                                                const std::vector<uint64_t>& old_entries) {
  const uint64_t cluster_size = header_.cluster_size();
  const uint32_t cluster_bits = header_.cluster_bits;
  const uint64_t count = old_entries.size();
  const uint64_t guest_start = (offset >> cluster_bits) << cluster_bits;

  // An L2 table without OFLAG_COPIED is shared with a snapshot (refused at open) or carries a
  // wrong flag; only a table with refcount 1 may be written.
  uint64_t l2_offset = first.l2_offset;
  if (l2_offset != 0 && (map_->l1_entry(first.l1_index) & kOflagCopied) == 0) {
    Result<uint64_t> refcount = co_await refcounts_->get(l2_offset >> cluster_bits);
    if (!refcount) {
      co_return std::move(refcount).error();
    }
    if (*refcount != 1) {
      co_return Error(ErrorKind::kUnsupported,
                      "qcow2: writing to an L2 table shared with a snapshot is not supported",
                      ENOTSUP);
    }
    Result<void> fixed = co_await write_l1_entry(first.l1_index, l2_offset | kOflagCopied);
    if (!fixed) {
      co_return fixed;
    }
  }

  // 1. Refcounts of the new clusters (written before anything can point at them).
  block::debug_event(child("file"), BlkdebugEvent::kClusterAlloc);
  Result<uint64_t> host = co_await refcounts_->allocate(count);
  if (!host) {
    co_return std::move(host).error();
  }
  uint64_t new_l2 = 0;
  if (l2_offset == 0) {
    block::debug_event(child("file"), BlkdebugEvent::kL2AllocWrite);
    Result<uint64_t> table = co_await refcounts_->allocate(1);
    if (!table) {
      co_return std::move(table).error();
    }
    new_l2 = *table;
  }

  // 2. Data with the COW head and tail (old data, backing data or zeroes).
  std::vector<uint8_t> head(offset - guest_start);
  std::vector<uint8_t> tail(guest_start + (count << cluster_bits) - (offset + bytes));
  if (!head.empty() || !tail.empty()) {
    block::debug_event(child("file"), BlkdebugEvent::kCowRead);
  }
  if (!head.empty()) {
    Result<void> read = co_await read_for_cow(guest_start, head);
    if (!read) {
      co_return read;
    }
  }
  if (!tail.empty()) {
    Result<void> read = co_await read_for_cow(offset + bytes, tail);
    if (!read) {
      co_return read;
    }
  }
  IoVector cluster_data;
  cluster_data.append(head.data(), head.size());
  cluster_data.append(data);
  cluster_data.append(tail.data(), tail.size());
  block::debug_event(child("file"), BlkdebugEvent::kWriteAio);
  Result<void> written = co_await write_growing(file(), *host, cluster_data);
  if (!written) {
    co_return written;
  }

  // 3. A new L2 table goes to disk complete, before the L1 entry points at it.
  std::vector<uint64_t> entries(count);
  for (uint64_t i = 0; i < count; ++i) {
    entries[i] = (*host + (i << cluster_bits)) | kOflagCopied;
  }
  if (new_l2 != 0) {
    std::vector<uint8_t> table(cluster_size, 0);
    for (uint64_t i = 0; i < count; ++i) {
      put_be64(table.data() + (first.l2_index + i) * 8, entries[i]);
    }
    written = co_await write_growing(file(), new_l2, IoVector(table.data(), table.size()));
    if (!written) {
      co_return written;
    }
  }

  // 4. Barrier: refcounts, data and the new L2 table are stable before they are published.
  Result<void> flushed = co_await io::flush(file());
  if (!flushed) {
    co_return flushed;
  }
  if (new_l2 != 0) {
    block::debug_event(child("file"), BlkdebugEvent::kL1Update);
    written = co_await write_l1_entry(first.l1_index, new_l2 | kOflagCopied);
  } else {
    block::debug_event(child("file"), BlkdebugEvent::kL2Update);
    written = co_await write_l2_entries(l2_offset, first.l2_index, entries);
  }
  if (!written) {
    co_return written;
  }

  // 5. What the new clusters replaced loses its reference, after the new entries are stable.
  const bool release = std::any_of(old_entries.begin(), old_entries.end(), needs_release);
  if (release) {
    flushed = co_await io::flush(file());
    if (!flushed) {
      co_return flushed;
    }
    for (uint64_t entry : old_entries) {
      Result<void> released = co_await release_entry(entry);
      if (!released) {
        co_return released;
      }
    }
  }
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::write_l2_entries(uint64_t l2_offset, uint64_t l2_index,
                                                    const std::vector<uint64_t>& entries) {
  std::vector<uint8_t> raw(entries.size() * 8);
  for (size_t i = 0; i < entries.size(); ++i) {
    put_be64(raw.data() + i * 8, entries[i]);
  }
  Result<void> written =
      co_await write_growing(file(), l2_offset + l2_index * 8, IoVector(raw.data(), raw.size()));
  if (!written) {
    // The file may hold the new entries or the old ones; make the next lookup read it again.
    map_->l2_cache().clear();
    co_return written;
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    const uint64_t index = l2_index + i;
    map_->l2_cache().update(map_->slice_offset(l2_offset, index),
                            static_cast<uint32_t>(index % map_->slice_entries()), entries[i]);
  }
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::write_l1_entry(uint64_t l1_index, uint64_t entry) {
  uint8_t raw[8];
  put_be64(raw, entry);
  Result<void> written =
      co_await write_growing(file(), header_.l1_table_offset + l1_index * 8, IoVector(raw, 8));
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
  // Zero flags exist from version 3 on; partial clusters are left to the request layer, which
  // writes zero buffers when the driver says ENOTSUP.
  const uint64_t mask = header_.cluster_size() - 1;
  const bool whole_clusters =
      (offset & mask) == 0 && ((bytes & mask) == 0 || offset + bytes == length());
  if (header_.version < 3 || !whole_clusters || refcounts_ == nullptr) {
    co_return Error(ErrorKind::kUnsupported, "qcow2: write-zeroes needs whole clusters", ENOTSUP);
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  Result<void> zeroed =
      co_await zero_or_discard_clusters(offset, bytes, false, (flags & kRequestMayUnmap) != 0);
  if (!zeroed) {
    co_return zeroed;
  }
  if (flags & kRequestFua) {
    Result<void> flushed = co_await io::flush(file());
    co_return flushed;
  }
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::co_pdiscard(uint64_t offset, uint64_t bytes) {
  const uint64_t mask = header_.cluster_size() - 1;
  const bool whole_clusters =
      (offset & mask) == 0 && ((bytes & mask) == 0 || offset + bytes == length());
  if (!whole_clusters || refcounts_ == nullptr) {
    co_return Error(ErrorKind::kUnsupported, "qcow2: discard needs whole clusters", ENOTSUP);
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  Result<void> discarded = co_await zero_or_discard_clusters(offset, bytes, true, true);
  co_return discarded;
}

aio::Task<Result<void>> Qcow2Node::zero_or_discard_clusters(uint64_t offset, uint64_t bytes,
                                                            bool discard, bool unmap) {
  // QEMU's zero_in_l2_slice and discard_in_l2_slice (full_discard=false): the new entry reads as
  // zeroes (v3) or as the backing file / zeroes (v2 discard); the old cluster is released unless
  // write-zeroes may keep it allocated. Entries are written one L2 table at a time; their
  // clusters are released only after the new entries are stable.
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
      const bool allocated = (entry & kOflagCompressed) != 0 || (entry & kL2OffsetMask) != 0;
      if (discard) {
        if (!allocated && !backing && (entry & kOflagZero) == 0) {
          updated = entry;  // unallocated without a backing file already reads as zeroes
        } else {
          updated = header_.version >= 3 ? kOflagZero : 0;
        }
      } else if (!unmap && writable_in_place(entry)) {
        updated = entry | kOflagZero;  // keep the cluster, read it as zeroes
      } else {
        updated = kOflagZero;
      }
      old_entries.push_back(updated == entry || (updated & kL2OffsetMask) != 0 ? 0 : entry);
      new_entries.push_back(updated);
    }
    Result<void> written = co_await write_l2_entries(ref->l2_offset, ref->l2_index, new_entries);
    if (!written) {
      co_return written;
    }
    if (std::any_of(old_entries.begin(), old_entries.end(), needs_release)) {
      Result<void> flushed = co_await io::flush(file());
      if (!flushed) {
        co_return flushed;
      }
      for (uint64_t entry : old_entries) {
        Result<void> released = co_await release_entry(entry);
        if (!released) {
          co_return released;
        }
      }
    }
    cluster = stop + 1;
  }
  co_return ok();
}

}  // namespace strata::block::qcow2
