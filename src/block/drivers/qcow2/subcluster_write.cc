// Guest writes, write-zeroes and discard for images with extended L2 entries (subclusters) or an
// external data file: QEMU 10's qcow2_alloc_host_offset / calculate_l2_meta /
// qcow2_alloc_cluster_link_l2 (writes), qcow2_subcluster_zeroize (write-zeroes) and
// qcow2_cluster_discard (discard), one guest cluster at a time.
//
// These requests hold lock_ exclusively and meta_ for their whole duration: they are serialised
// against every other request of the node, so no in-flight tracking is needed. The ordering
// rules of qcow2_node.h still hold: data (and COW data) is written before the L2 entry that
// publishes it, refcounts of new clusters before the L2 entries using them
// (l2_depends_on_new_clusters), refcount drops after the L2 entries that stopped using a cluster
// (release_entry / release_data_cluster).

#include <algorithm>
#include <bit>

#include "block/drivers/blkdebug/events.h"
#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

namespace {

// QEMU's QCOW_OFLAG_SUB_ALLOC_RANGE / QCOW_OFLAG_SUB_ZERO_RANGE for subclusters [from, to).
uint64_t alloc_range(uint32_t from, uint32_t to) {
  const uint64_t below_to = to >= 32 ? 0xffffffffull : ((uint64_t{1} << to) - 1);
  const uint64_t below_from = (uint64_t{1} << from) - 1;
  return below_to & ~below_from;
}
uint64_t zero_range(uint32_t from, uint32_t to) {
  return alloc_range(from, to) << 32;
}

}  // namespace

Qcow2Node::ClusterKind Qcow2Node::cluster_kind(uint64_t entry) const {
  // QEMU's qcow2_get_cluster_type.
  if ((entry & kOflagCompressed) != 0) {
    return ClusterKind::kCompressed;
  }
  if ((entry & kOflagZero) != 0 && !header_.extended_l2()) {
    return (entry & kL2OffsetMask) != 0 ? ClusterKind::kZeroAlloc : ClusterKind::kZeroPlain;
  }
  if ((entry & kL2OffsetMask) == 0) {
    // Offset 0 is a valid cluster of an external data file, told apart by OFLAG_COPIED.
    return data_file_ != nullptr && (entry & kOflagCopied) != 0 ? ClusterKind::kNormal
                                                                : ClusterKind::kUnallocated;
  }
  return ClusterKind::kNormal;
}

SubclusterType Qcow2Node::subcluster_kind(uint64_t entry, uint64_t bitmap, uint32_t sc) const {
  // QEMU's qcow2_get_subcluster_type for entries already validated by the reader.
  const ClusterKind kind = cluster_kind(entry);
  if (!header_.extended_l2()) {
    switch (kind) {
      case ClusterKind::kCompressed:
        return SubclusterType::kCompressed;
      case ClusterKind::kZeroPlain:
        return SubclusterType::kZeroPlain;
      case ClusterKind::kZeroAlloc:
        return SubclusterType::kZeroAlloc;
      case ClusterKind::kNormal:
        return SubclusterType::kNormal;
      case ClusterKind::kUnallocated:
        return SubclusterType::kUnallocatedPlain;
    }
  }
  switch (kind) {
    case ClusterKind::kCompressed:
      return SubclusterType::kCompressed;
    case ClusterKind::kNormal:
    case ClusterKind::kZeroAlloc:
      if (bitmap & (uint64_t{1} << (32 + sc))) {
        return SubclusterType::kZeroAlloc;
      }
      return (bitmap & (uint64_t{1} << sc)) != 0 ? SubclusterType::kNormal
                                                 : SubclusterType::kUnallocatedAlloc;
    case ClusterKind::kZeroPlain:
    case ClusterKind::kUnallocated:
      return (bitmap & (uint64_t{1} << (32 + sc))) != 0 ? SubclusterType::kZeroPlain
                                                        : SubclusterType::kUnallocatedPlain;
  }
  return SubclusterType::kUnallocatedPlain;
}

aio::Task<Result<void>> Qcow2Node::set_l2_entry_and_bitmap(const L2Ref& ref, uint64_t entry,
                                                           uint64_t bitmap) {
  const uint64_t slice_offset = map_->slice_offset(ref.l2_offset, ref.l2_index);
  const uint32_t stride = header_.extended_l2() ? 2 : 1;
  const uint32_t word = static_cast<uint32_t>(ref.l2_index % map_->slice_entries()) * stride;
  Result<void> set = co_await map_->l2_cache().set_entry(file(), slice_offset, word, entry);
  if (set && stride == 2) {
    set = co_await map_->l2_cache().set_entry(file(), slice_offset, word + 1, bitmap);
  }
  co_return set;
}

aio::Task<Result<void>> Qcow2Node::write_general(uint64_t offset, uint64_t bytes, IoVector qiov,
                                                 uint32_t flags) {
  const uint64_t cluster_size = header_.cluster_size();
  {
    auto exclusive = co_await lock_.scoped_write_lock();
    auto meta = co_await meta_.scoped_lock();
    for (uint64_t pos = offset; pos < offset + bytes;) {
      const uint64_t in_cluster = pos & (cluster_size - 1);
      const uint64_t n = std::min(offset + bytes - pos, cluster_size - in_cluster);
      Result<void> written = co_await write_one_cluster(pos, n, qiov.slice(pos - offset, n));
      if (!written) {
        co_return written;
      }
      Result<void> trimmed = co_await trim_caches();
      if (!trimmed) {
        co_return trimmed;
      }
      pos += n;
    }
  }
  if ((flags & kRequestFua) != 0) {
    Result<void> flushed = co_await write_caches_and_flush();
    if (flushed && data_file_ != nullptr) {
      flushed = co_await io::flush(data_file());  // the data itself lives there
    }
    co_return flushed;
  }
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::write_one_cluster(uint64_t offset, uint64_t bytes,
                                                     IoVector data) {
  const uint32_t cluster_bits = header_.cluster_bits;
  const uint64_t cluster_size = header_.cluster_size();
  const bool extended = header_.extended_l2();
  const uint32_t sc_bits = extended ? cluster_bits - 5 : cluster_bits;
  const uint32_t subclusters = header_.subclusters_per_cluster();
  const uint64_t guest_cluster = offset >> cluster_bits;
  const uint64_t guest_start = guest_cluster << cluster_bits;
  // The written range [from, to) within the cluster and its subclusters.
  const uint64_t from = offset - guest_start;
  const uint64_t to = from + bytes;
  const uint32_t first_sc = static_cast<uint32_t>(from >> sc_bits);
  const uint32_t last_sc = static_cast<uint32_t>((to - 1) >> sc_bits);

  Result<L2Ref> ref = co_await l2_ref(guest_cluster);
  if (!ref) {
    co_return std::move(ref).error();
  }
  const uint64_t entry = ref->entry;
  const uint64_t bitmap = ref->bitmap;
  const ClusterKind kind = cluster_kind(entry);
  const uint32_t alloc_bits = static_cast<uint32_t>(bitmap);
  // QEMU's cluster_needs_new_alloc: an allocated cluster with refcount 1 is written in place.
  const bool keep_old = (kind == ClusterKind::kNormal || kind == ClusterKind::kZeroAlloc) &&
                        (entry & kOflagCopied) != 0;

  // QEMU's calculate_l2_meta: the COW region [cow_from, cow_to) around the written bytes.
  uint64_t cow_from = from;
  uint64_t cow_to = to;
  const SubclusterType first_type = subcluster_kind(entry, bitmap, first_sc);
  const SubclusterType last_type = subcluster_kind(entry, bitmap, last_sc);
  const uint64_t sc_size = uint64_t{1} << sc_bits;
  const uint64_t to_sc_end = std::min(cluster_size, (to + sc_size - 1) & ~(sc_size - 1));
  if (keep_old) {
    bool all_normal = true;
    for (uint32_t sc = first_sc; sc <= last_sc && all_normal; ++sc) {
      all_normal = subcluster_kind(entry, bitmap, sc) == SubclusterType::kNormal;
    }
    const uint64_t host = (entry & kL2OffsetMask) + from;
    if (all_normal) {
      // Plain in-place write: no metadata changes.
      Result<void> allowed = co_await pre_write_overlap_check(0, host, bytes, true);
      if (!allowed) {
        co_return allowed;
      }
      block::debug_event(child("file"), BlkdebugEvent::kWriteAio);
      co_return co_await write_growing(data_file(), host, data);
    }
    if (first_type != SubclusterType::kNormal) {
      cow_from = uint64_t{first_sc} << sc_bits;
    }
    if (last_type != SubclusterType::kNormal) {
      cow_to = to_sc_end;
    }
  } else {
    switch (first_type) {
      case SubclusterType::kCompressed:
        cow_from = 0;
        break;
      case SubclusterType::kNormal:
      case SubclusterType::kZeroAlloc:
      case SubclusterType::kUnallocatedAlloc:
        cow_from = extended ? uint64_t{std::min<uint32_t>(
                                  first_sc, static_cast<uint32_t>(std::countr_zero(alloc_bits)))}
                                  << sc_bits
                            : 0;
        break;
      case SubclusterType::kZeroPlain:
      case SubclusterType::kUnallocatedPlain:
        cow_from = uint64_t{first_sc} << sc_bits;
        break;
    }
    switch (last_type) {
      case SubclusterType::kCompressed:
        cow_to = cluster_size;
        break;
      case SubclusterType::kNormal:
      case SubclusterType::kZeroAlloc:
      case SubclusterType::kUnallocatedAlloc:
        cow_to = cluster_size;
        if (extended) {
          cow_to -=
              uint64_t{std::min<uint32_t>(subclusters - last_sc - 1,
                                          static_cast<uint32_t>(std::countl_zero(alloc_bits)))}
              << sc_bits;
        }
        break;
      case SubclusterType::kZeroPlain:
      case SubclusterType::kUnallocatedPlain:
        cow_to = to_sc_end;
        break;
    }
  }

  // The L2 table the new entry goes to (a private copy when shared with a snapshot).
  Result<L2Ref> table = co_await ensure_l2_table(guest_cluster);
  if (!table) {
    co_return std::move(table).error();
  }

  // The host cluster: the current one, the guest offset in an external data file (QEMU's
  // do_alloc_cluster_offset: data clusters there are not refcounted), or a new image cluster.
  uint64_t host = 0;
  bool allocated_here = false;
  if (keep_old) {
    host = entry & kL2OffsetMask;
  } else if (data_file_ != nullptr) {
    host = guest_start;
  } else {
    block::debug_event(child("file"), BlkdebugEvent::kClusterAlloc);
    Result<uint64_t> allocated = co_await refcounts_->allocate(1);
    if (!allocated) {
      co_return std::move(allocated).error();
    }
    host = *allocated;
    allocated_here = true;
    Result<void> covered = co_await ensure_file_covers(host + cluster_size);
    if (!covered) {
      ignore_error(co_await refcounts_->update(host, cluster_size, -1),
                   "the cluster of a failed allocation only leaks");
      co_return covered;
    }
  }

  // COW head and tail: what the guest reads there now (old data, backing data or zeroes).
  std::vector<uint8_t> head(from - cow_from);
  std::vector<uint8_t> tail(cow_to - to);
  Result<void> filled = ok();
  if (!head.empty() || !tail.empty()) {
    block::debug_event(child("file"), BlkdebugEvent::kCowRead);
  }
  if (!head.empty()) {
    filled = co_await read_for_cow(guest_start + cow_from, head);
  }
  if (filled && !tail.empty()) {
    filled = co_await read_for_cow(guest_start + to, tail);
  }
  if (filled) {
    IoVector cluster_data;
    cluster_data.append(head.data(), head.size());
    cluster_data.append(data);
    cluster_data.append(tail.data(), tail.size());
    filled = co_await pre_write_overlap_check(0, host + cow_from, cluster_data.size(), true);
    if (filled) {
      block::debug_event(child("file"), BlkdebugEvent::kWriteAio);
      filled = co_await write_growing(data_file(), host + cow_from, cluster_data);
    }
  }
  if (!filled) {
    if (allocated_here) {
      ignore_error(co_await refcounts_->update(host, cluster_size, -1),
                   "the cluster of a failed allocation only leaks");
    }
    co_return filled;
  }

  // Publish (QEMU's qcow2_alloc_cluster_link_l2): the entry points at the host cluster; with
  // subclusters the COW region's subclusters become allocated and stop reading as zeroes.
  Result<void> ordered = co_await l2_depends_on_new_clusters();
  if (!ordered) {
    co_return ordered;
  }
  Result<void> dirty = co_await mark_dirty();
  if (!dirty) {
    co_return dirty;
  }
  uint64_t new_bitmap = 0;
  if (extended) {
    const uint32_t range_first = static_cast<uint32_t>(cow_from >> sc_bits);
    const uint32_t range_end = static_cast<uint32_t>(((cow_to - 1) >> sc_bits) + 1);
    new_bitmap =
        (table->bitmap | alloc_range(range_first, range_end)) & ~zero_range(range_first, range_end);
    if (kind == ClusterKind::kCompressed) {
      new_bitmap = alloc_range(range_first, range_end);
    }
  }
  block::debug_event(child("file"), BlkdebugEvent::kL2Update);
  Result<void> written = co_await set_l2_entry_and_bitmap(*table, host | kOflagCopied, new_bitmap);
  if (!written) {
    co_return written;
  }
  if (!keep_old && needs_release(entry)) {
    Result<void> released = co_await release_data_cluster(entry, /*pass_discard=*/false);
    if (!released) {
      co_return released;
    }
  }
  co_return ok();
}

// ---- write-zeroes ----------------------------------------------------------------------------

aio::Task<Result<void>> Qcow2Node::zeroize_general(uint64_t offset, uint64_t bytes,
                                                   uint32_t flags) {
  const uint64_t cluster_size = header_.cluster_size();
  const uint32_t sc_bits = header_.cluster_bits - (header_.extended_l2() ? 5 : 0);
  const uint64_t sc_mask = (uint64_t{1} << sc_bits) - 1;
  const uint64_t end = offset + bytes;
  // QEMU's qcow2_co_pwrite_zeroes hands unaligned parts to the generic code (zero buffers).
  if ((offset & sc_mask) != 0 || ((end & sc_mask) != 0 && end != length()) || header_.version < 3) {
    co_return Error(ErrorKind::kUnsupported, "qcow2: write-zeroes needs whole subclusters",
                    ENOTSUP);
  }
  {
    auto exclusive = co_await lock_.scoped_write_lock();
    auto meta = co_await meta_.scoped_lock();
    if (data_file_raw()) {
      // QEMU's qcow2_subcluster_zeroize: the raw data file reads as the guest disk.
      Result<void> zeroed = co_await io::pwrite_zeroes(data_file(), offset, bytes, flags);
      if (!zeroed) {
        co_return zeroed;
      }
    }
    for (uint64_t pos = offset; pos < end;) {
      const uint64_t in_cluster = pos & (cluster_size - 1);
      const uint64_t n = std::min(end - pos, cluster_size - in_cluster);
      Result<L2Ref> ref = co_await ensure_l2_table(pos >> header_.cluster_bits);
      if (!ref) {
        co_return std::move(ref).error();
      }
      const bool whole = n == cluster_size || (in_cluster == 0 && pos + n == length());
      Result<void> changed = ok();
      if (whole) {
        changed = co_await zero_whole_cluster(*ref, flags);
      } else {
        // QEMU's zero_l2_subclusters: only with subclusters (sc_bits < cluster_bits here).
        if (cluster_kind(ref->entry) == ClusterKind::kCompressed) {
          co_return Error(ErrorKind::kUnsupported,
                          "qcow2: cannot zero part of a compressed cluster", ENOTSUP);
        }
        const uint32_t first = static_cast<uint32_t>(in_cluster >> sc_bits);
        const uint32_t last_end = static_cast<uint32_t>((in_cluster + n + sc_mask) >> sc_bits);
        const uint64_t bitmap =
            (ref->bitmap | zero_range(first, last_end)) & ~alloc_range(first, last_end);
        if (bitmap != ref->bitmap) {
          Result<void> dirty = co_await mark_dirty();
          if (!dirty) {
            co_return dirty;
          }
          changed = co_await set_l2_entry_and_bitmap(*ref, ref->entry, bitmap);
        }
      }
      if (!changed) {
        co_return changed;
      }
      Result<void> trimmed = co_await trim_caches();
      if (!trimmed) {
        co_return trimmed;
      }
      pos += n;
    }
  }
  if ((flags & kRequestFua) != 0) {
    Result<void> flushed = co_await write_caches_and_flush();
    co_return flushed;
  }
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::zero_whole_cluster(const L2Ref& ref, uint32_t flags) {
  // QEMU's zero_in_l2_slice for one entry.
  const ClusterKind kind = cluster_kind(ref.entry);
  const bool allocated = kind == ClusterKind::kNormal || kind == ClusterKind::kCompressed ||
                         kind == ClusterKind::kZeroAlloc;
  const bool unmap =
      kind == ClusterKind::kCompressed || ((flags & kRequestMayUnmap) != 0 && allocated);
  const bool keep_reference = discard_no_unref_ && kind != ClusterKind::kCompressed;
  uint64_t entry = unmap ? 0 : ref.entry;
  uint64_t bitmap = ref.bitmap;
  if (header_.extended_l2()) {
    bitmap = kBitmapAllZeroes;
  } else {
    entry |= kOflagZero;
  }
  if (keep_reference) {
    entry |= ref.entry;
  }
  if (entry == ref.entry && bitmap == ref.bitmap) {
    co_return ok();
  }
  Result<void> dirty = co_await mark_dirty();
  if (!dirty) {
    co_return dirty;
  }
  Result<void> set = co_await set_l2_entry_and_bitmap(ref, entry, bitmap);
  if (!set || !unmap) {
    co_return set;
  }
  if (keep_reference) {
    co_return co_await discard_kept_cluster(ref.entry);
  }
  co_return co_await release_data_cluster(ref.entry, pass_discard_request_);
}

aio::Task<Result<void>> Qcow2Node::discard_kept_cluster(uint64_t entry) {
  // QEMU passes the discard on for a kept normal or preallocated-zero cluster; strata does it
  // only when no snapshot shares the cluster (OFLAG_COPIED), so a snapshot never loses data.
  const ClusterKind kind = cluster_kind(entry);
  const bool has_data = kind == ClusterKind::kNormal || kind == ClusterKind::kZeroAlloc;
  if (!pass_discard_request_ || !has_data ||
      (data_file_ == nullptr && (entry & kOflagCopied) == 0)) {
    co_return ok();
  }
  Node& holder = data_file_ != nullptr ? data_file() : file();
  Result<void> dropped =
      co_await io::pdiscard(holder, entry & kL2OffsetMask, header_.cluster_size());
  ignore_error(std::move(dropped), "discard of a kept cluster's data is advisory");
  co_return ok();
}

// ---- discard ---------------------------------------------------------------------------------

aio::Task<Result<void>> Qcow2Node::discard_general(uint64_t offset, uint64_t bytes) {
  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t mask = cluster_size - 1;
  // QEMU's qcow2_co_pdiscard ignores partial clusters (except the last one of the image).
  if ((offset & mask) != 0 || ((bytes & mask) != 0 && offset + bytes != length())) {
    co_return Error(ErrorKind::kUnsupported, "qcow2: discard needs whole clusters", ENOTSUP);
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  auto meta = co_await meta_.scoped_lock();
  const bool backing = backing_child() != nullptr;
  for (uint64_t pos = offset; pos < offset + bytes; pos += cluster_size) {
    Result<L2Ref> ref = co_await l2_ref(pos >> header_.cluster_bits);
    if (!ref) {
      co_return std::move(ref).error();
    }
    // QEMU's discard_in_l2_slice (full_discard false): the cluster reads as zeroes afterwards
    // (v3), or from the backing file (v2).
    const ClusterKind kind = cluster_kind(ref->entry);
    const bool allocated = kind == ClusterKind::kNormal || kind == ClusterKind::kCompressed ||
                           kind == ClusterKind::kZeroAlloc;
    if (!backing && !allocated) {
      continue;
    }
    const bool keep_reference = discard_no_unref_ && kind != ClusterKind::kCompressed;
    uint64_t entry = ref->entry;
    uint64_t bitmap = ref->bitmap;
    if (header_.extended_l2()) {
      entry = 0;
      bitmap = kBitmapAllZeroes;
    } else {
      entry = header_.version >= 3 ? kOflagZero : 0;
    }
    if (keep_reference) {
      entry |= ref->entry;
    }
    if (entry == ref->entry && bitmap == ref->bitmap) {
      continue;
    }
    Result<L2Ref> table = co_await ensure_l2_table(pos >> header_.cluster_bits);
    if (!table) {
      co_return std::move(table).error();
    }
    Result<void> dirty = co_await mark_dirty();
    if (!dirty) {
      co_return dirty;
    }
    Result<void> set = co_await set_l2_entry_and_bitmap(*table, entry, bitmap);
    if (!set) {
      co_return set;
    }
    // (No co_await inside ?:, which GCC 12 miscompiles.)
    Result<void> released = ok();
    if (keep_reference) {
      released = co_await discard_kept_cluster(table->entry);
    } else {
      released = co_await release_data_cluster(table->entry, pass_discard_request_);
    }
    if (!released) {
      co_return released;
    }
    Result<void> trimmed = co_await trim_caches();
    if (!trimmed) {
      co_return trimmed;
    }
  }
  co_return ok();
}

}  // namespace strata::block::qcow2
