// Resizing a qcow2 image (QEMU 10's qcow2_co_truncate with preallocation off): growth enlarges
// the active L1 table when needed (qcow2_grow_l1_table); shrinking drops the clusters past the
// new end (a full discard), then the L2 tables past it (qcow2_shrink_l1_table), then cuts the
// file after its last used cluster. The new size reaches the header last.

#include <algorithm>
#include <vector>

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
constexpr uint64_t kHeaderSizeOffset = 24;    // size (8 bytes)
constexpr uint64_t kHeaderL1SizeOffset = 36;  // l1_size (4 bytes), then l1_table_offset (8)

void store_be32(uint8_t* p, uint32_t value) {
  p[0] = static_cast<uint8_t>(value >> 24);
  p[1] = static_cast<uint8_t>(value >> 16);
  p[2] = static_cast<uint8_t>(value >> 8);
  p[3] = static_cast<uint8_t>(value);
}

}  // namespace

aio::Task<Result<void>> Qcow2Node::grow_l1_table(uint64_t min_size, bool exact_size) {
  if (min_size <= header_.l1_size) {
    co_return ok();
  }
  uint64_t new_size = min_size;
  if (!exact_size) {
    new_size = std::max<uint64_t>(header_.l1_size, 1);
    while (min_size > new_size) {
      new_size = (new_size * 3 + 1) / 2;
    }
  }
  if (new_size > kMaxL1Bytes / 8) {
    co_return Error::from_errno(EFBIG, "");
  }
  const uint64_t cluster_size = header_.cluster_size();
  std::vector<uint64_t> table = active_l1_table();
  table.resize(new_size, 0);
  std::vector<uint8_t> raw(new_size * 8);
  for (uint64_t i = 0; i < new_size; ++i) {
    put_be64(raw.data() + i * 8, table[i]);
  }
  Result<uint64_t> offset =
      co_await refcounts_->allocate((raw.size() + cluster_size - 1) / cluster_size);
  if (!offset) {
    co_return std::move(offset).error();
  }
  // The new table is complete on disk before the header points at it.
  Result<void> written = co_await write_growing(file(), *offset, IoVector(raw.data(), raw.size()));
  if (written) {
    written = co_await sync_metadata();
  }
  if (!written) {
    co_return written;
  }
  uint8_t field[12];
  store_be32(field, static_cast<uint32_t>(new_size));
  put_be64(field + 4, *offset);
  Result<void> switched = co_await write_header_field(kHeaderL1SizeOffset, field, sizeof(field));
  if (!switched) {
    co_return switched;
  }
  const uint64_t old_offset = header_.l1_table_offset;
  const uint64_t old_size = header_.l1_size;
  header_.l1_size = static_cast<uint32_t>(new_size);
  header_.l1_table_offset = *offset;
  map_->replace_l1(std::move(table), new_size);
  if (old_size > 0) {
    Result<void> freed = co_await refcounts_->update(old_offset, old_size * 8, -1);
    if (!freed) {
      co_return freed;
    }
  }
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::co_truncate(uint64_t new_size, bool exact) {
  if (refcounts_ == nullptr) {
    co_return Error::from_errno(EACCES, "qcow2: the image is opened read-only");
  }
  if ((new_size & 511) != 0) {
    co_return Error(ErrorKind::kInvalidArgument, "The new size must be a multiple of 512", EINVAL);
  }
  Result<void> flushed = co_await co_flush();
  if (!flushed) {
    co_return flushed;
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  auto meta = co_await meta_.scoped_lock();
  const uint64_t old_size = length();
  Result<void> resized = co_await resize_unlocked(new_size);
  if (resized && data_file_ != nullptr) {
    resized = co_await resize_data_file(old_size, new_size, exact);  // data_file.cc
  }
  co_return resized;
}

aio::Task<Result<void>> Qcow2Node::resize_unlocked(uint64_t new_size) {
  const uint64_t cluster_size = header_.cluster_size();
  const uint32_t cluster_bits = header_.cluster_bits;
  const uint64_t old_size = length();
  const uint64_t l2_coverage = cluster_size << header_.l2_bits();
  const uint64_t new_l1_size = (new_size + l2_coverage - 1) / l2_coverage;
  if (new_size < old_size) {
    // 1. Every cluster past the new end loses its mapping (qcow2_cluster_discard with
    //    full_discard): entries cleared and stable before the clusters are released.
    const uint64_t first = (new_size + cluster_size - 1) >> cluster_bits;
    const uint64_t end = (old_size + cluster_size - 1) >> cluster_bits;
    uint32_t steps = 0;
    for (uint64_t cluster = first; cluster < end;) {
      if (++steps % kWalkBatch == 0) {
        co_await aio::EventLoop::current()->yield();
      }
      Result<L2Ref> ref = co_await l2_ref(cluster);
      if (!ref) {
        co_return ref.error().with_prefix("Failed to discard cropped clusters");
      }
      const uint64_t table_end = std::min(end, (ref->l1_index + 1) << header_.l2_bits());
      if (ref->l2_offset == 0) {
        cluster = table_end;
        continue;
      }
      std::vector<uint64_t> old_entries;
      for (uint64_t c = cluster; c < table_end; ++c) {
        if (++steps % kWalkBatch == 0) {
          co_await aio::EventLoop::current()->yield();
        }
        Result<L2Ref> at = co_await l2_ref(c);
        if (!at) {
          co_return at.error().with_prefix("Failed to discard cropped clusters");
        }
        old_entries.push_back(at->entry);
      }
      if (std::any_of(old_entries.begin(), old_entries.end(), [](uint64_t e) { return e != 0; })) {
        Result<uint64_t> l2_offset = co_await writable_l2_table(ref->l1_index, ref->l2_offset);
        if (!l2_offset) {
          co_return l2_offset.error().with_prefix("Failed to discard cropped clusters");
        }
        Result<void> cleared = co_await write_l2_entries(
            *l2_offset, ref->l2_index, std::vector<uint64_t>(old_entries.size(), 0));
        if (cleared) {
          cleared = co_await sync_metadata();
        }
        for (uint64_t entry : old_entries) {
          if (++steps % kWalkBatch == 0) {
            co_await aio::EventLoop::current()->yield();
          }
          if (cleared && needs_release(entry)) {
            cleared = co_await release_entry(entry);
          }
        }
        if (!cleared) {
          co_return cleared.error().with_prefix("Failed to discard cropped clusters");
        }
      }
      cluster = table_end;
    }
    // 2. qcow2_shrink_l1_table: the L1 entries past the new end are zeroed on disk (the table
    //    keeps its size), then their L2 tables are released.
    if (new_l1_size < header_.l1_size) {
      std::vector<uint64_t> l1 = active_l1_table();
      std::vector<uint8_t> zeroes((l1.size() - new_l1_size) * 8, 0);
      Result<void> zeroed =
          co_await write_growing(file(), header_.l1_table_offset + new_l1_size * 8,
                                 IoVector(zeroes.data(), zeroes.size()));
      if (zeroed) {
        zeroed = co_await sync_metadata();
      }
      if (!zeroed) {
        co_return zeroed.error().with_prefix("Failed to reduce the number of L2 tables");
      }
      std::vector<uint64_t> dropped(l1.begin() + static_cast<ptrdiff_t>(new_l1_size), l1.end());
      std::fill(l1.begin() + static_cast<ptrdiff_t>(new_l1_size), l1.end(), 0);
      map_->replace_l1(std::move(l1), header_.l1_size);
      for (uint64_t entry : dropped) {
        if (++steps % kWalkBatch == 0) {
          co_await aio::EventLoop::current()->yield();
        }
        const uint64_t l2_offset = entry & kL1OffsetMask;
        if (l2_offset == 0) {
          continue;
        }
        Result<void> freed = co_await refcounts_->update(l2_offset, cluster_size, -1);
        if (!freed) {
          co_return freed.error().with_prefix("Failed to reduce the number of L2 tables");
        }
        forget_l2_table(l2_offset);
      }
    }
  } else {
    Result<void> grown = co_await grow_l1_table(new_l1_size, true);
    if (!grown) {
      co_return grown.error().with_prefix("Failed to grow the L1 table");
    }
  }

  uint8_t size_field[8];
  put_be64(size_field, new_size);
  Result<void> written = co_await write_header_field(kHeaderSizeOffset, size_field, 8);
  if (!written) {
    co_return written.error().with_prefix("Failed to update the image size");
  }
  header_.size = new_size;

  if (new_size < old_size) {
    // 3. The file ends after its last cluster in use (qcow2_get_last_cluster). Advisory, like
    //    QEMU's warning: the image is valid either way.
    const uint64_t file_length = file().length();
    uint64_t last_used = 0;
    uint32_t scanned = 0;
    for (uint64_t cluster = (file_length + cluster_size - 1) >> cluster_bits; cluster > 0;
         --cluster) {
      if (++scanned % kWalkBatch == 0) {
        co_await aio::EventLoop::current()->yield();
      }
      Result<uint64_t> refcount = co_await refcounts_->get(cluster - 1);
      if (!refcount) {
        co_return ok();
      }
      if (*refcount != 0) {
        last_used = cluster;
        break;
      }
    }
    if (last_used > 0 && (last_used << cluster_bits) < file_length) {
      // exact: strata's file node ignores an inexact shrink (QEMU's file-posix always truncates
      // regular files).
      Result<void> cut = co_await io::truncate(file(), last_used << cluster_bits, true);
      ignore_error(std::move(cut), "the tail of a shrunk image is only space, not data");
    }
  }
  co_return ok();
}

}  // namespace strata::block::qcow2
