#include "block/drivers/qcow2/refcount.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <iterator>
#include <string>

#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

namespace {

// Offsets of the refcount table fields in the header (qcow2.rst "Header": bytes 48-55 and
// 56-59); they are adjacent, so one write switches both.
constexpr uint64_t kHeaderRefcountTableOffset = 48;

// Host offsets must fit the 56 bits an L2 entry can hold.
constexpr uint64_t kMaxHostOffset = uint64_t{1} << 56;

std::string hex(uint64_t value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%#" PRIx64, value);
  return buffer;
}

Error corruption(const std::string& what) {
  return Error(ErrorKind::kCorrupt, "qcow2: Image is corrupt: " + what, EIO);
}

}  // namespace

uint64_t refcount_entry(const uint8_t* block, uint32_t order, uint64_t index) {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const uint32_t bits = 1u << order;
      const uint32_t per_byte = 8u >> order;
      return (block[index / per_byte] >> ((index % per_byte) * bits)) & ((1u << bits) - 1);
    }
    case 3:
      return block[index];
    case 4:
      return load_be16(block + index * 2);
    case 5:
      return load_be32(block + index * 4);
    default:
      return load_be64(block + index * 8);
  }
}

void set_refcount_entry(uint8_t* block, uint32_t order, uint64_t index, uint64_t value) {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const uint32_t bits = 1u << order;
      const uint32_t per_byte = 8u >> order;
      const uint32_t shift = static_cast<uint32_t>(index % per_byte) * bits;
      const uint32_t mask = ((1u << bits) - 1) << shift;
      uint8_t& byte = block[index / per_byte];
      byte = static_cast<uint8_t>((byte & ~mask) | ((value << shift) & mask));
      break;
    }
    case 3:
      block[index] = static_cast<uint8_t>(value);
      break;
    case 4:
      block[index * 2] = static_cast<uint8_t>(value >> 8);
      block[index * 2 + 1] = static_cast<uint8_t>(value);
      break;
    case 5:
      for (int i = 3; i >= 0; --i) {
        block[index * 4 + static_cast<uint64_t>(i)] = static_cast<uint8_t>(value);
        value >>= 8;
      }
      break;
    default:
      put_be64(block + index * 8, value);
      break;
  }
}

Refcounts::Refcounts(Node& file, Header& header, std::vector<uint64_t> table, uint64_t cache_blocks,
                     uint64_t image_end)
    : file_(file),
      header_(header),
      table_(std::move(table)),
      cluster_size_(header.cluster_size()),
      cluster_bits_(header.cluster_bits),
      order_(header.refcount_order),
      block_bits_(header.cluster_bits + 3 - header.refcount_order),
      max_refcount_(header.refcount_order == 6
                        ? UINT64_MAX
                        : (uint64_t{1} << (1u << header.refcount_order)) - 1),
      allocated_end_((image_end + header.cluster_size() - 1) >> header.cluster_bits),
      cache_capacity_(std::max<uint64_t>(cache_blocks, 1)) {
  recount_used_entries();
}

void Refcounts::recount_used_entries() {
  used_entries_ = table_.size();
  while (used_entries_ > 0 && table_[used_entries_ - 1] == 0) {
    --used_entries_;
  }
}

void Refcounts::cache_insert(uint64_t offset, Block block) {
  if (auto it = index_.find(offset); it != index_.end()) {
    it->second->second = std::move(block);
    lru_.splice(lru_.begin(), lru_, it->second);
    used_.insert(offset);
    return;
  }
  used_.insert(offset);
  lru_.emplace_front(offset, std::move(block));
  index_[offset] = lru_.begin();
  // Dirty blocks are never evicted: the cache may exceed its capacity until write_back().
  auto it = std::prev(lru_.end());
  while (index_.size() > cache_capacity_ && it != lru_.begin()) {
    auto newer = std::prev(it);
    if (dirty_.count(it->first) == 0) {
      index_.erase(it->first);
      lru_.erase(it);
    }
    it = newer;
  }
}

void Refcounts::drop_unused() {
  for (auto it = lru_.begin(); it != lru_.end();) {
    if (dirty_.count(it->first) != 0 || used_.count(it->first) != 0) {
      ++it;
      continue;
    }
    index_.erase(it->first);
    it = lru_.erase(it);
  }
  used_.clear();
}

void Refcounts::drop_clean() {
  for (auto it = lru_.begin(); it != lru_.end();) {
    if (dirty_.count(it->first) != 0) {
      ++it;
      continue;
    }
    index_.erase(it->first);
    it = lru_.erase(it);
  }
}

aio::Task<Result<void>> Refcounts::write_back() {
  if (dirty_.empty()) {
    co_return ok();
  }
  if (write_back_hook_) {
    Result<void> ordered = co_await write_back_hook_();
    if (!ordered) {
      co_return ordered;
    }
  }
  while (!dirty_.empty()) {
    const uint64_t offset = *dirty_.begin();
    auto cached = index_.find(offset);
    if (cached == index_.end()) {
      dirty_.erase(dirty_.begin());
      continue;
    }
    Block block = cached->second->second;
    Result<void> written = co_await write(offset, block->data(), block->size());
    if (!written) {
      co_return written;
    }
    dirty_.erase(offset);
  }
  co_return ok();
}

aio::Task<Result<void>> Refcounts::write(uint64_t offset, const void* data, uint64_t bytes) {
  Result<void> written = co_await write_metadata(
      file_, offset, IoVector(const_cast<void*>(data), static_cast<size_t>(bytes)), direct_io_);
  co_return written;
}

aio::Task<Result<void>> Refcounts::barrier() {
  Result<void> flushed = co_await flush_metadata(file_, direct_io_);
  co_return flushed;
}

aio::Task<Result<Refcounts::Block>> Refcounts::load_block(uint64_t index) {
  if (index >= table_.size()) {
    co_return Block();
  }
  const uint64_t entry = table_[index];
  const uint64_t offset = entry & kRefcountTableOffsetMask;
  if (offset == 0) {
    co_return Block();
  }
  if ((entry & ~kRefcountTableOffsetMask) != 0 || (offset & (cluster_size_ - 1)) != 0) {
    co_return corruption("Refblock offset " + hex(offset) +
                         " unaligned (reftable index: " + hex(index) + ")");
  }
  auto cached = index_.find(offset);
  if (cached != index_.end()) {
    lru_.splice(lru_.begin(), lru_, cached->second);
    used_.insert(offset);
    Block hit = cached->second->second;
    co_return hit;
  }
  auto block = std::make_shared<std::vector<uint8_t>>(cluster_size_);
  Result<void> read =
      co_await read_zero_padded(file_, offset, IoVector(block->data(), block->size()));
  if (!read) {
    co_return std::move(read).error();
  }
  cache_insert(offset, block);
  co_return block;
}

aio::Task<Result<uint64_t>> Refcounts::get(uint64_t cluster_index) {
  Result<Block> block = co_await load_block(cluster_index >> block_bits_);
  if (!block) {
    co_return std::move(block).error();
  }
  if (*block == nullptr) {
    co_return uint64_t{0};
  }
  const uint64_t in_block = cluster_index & ((uint64_t{1} << block_bits_) - 1);
  co_return refcount_entry((*block)->data(), order_, in_block);
}

aio::Task<Result<uint64_t>> Refcounts::find_free(uint64_t clusters) {
  uint64_t start = free_hint_;
  uint64_t run = 0;
  for (uint64_t i = free_hint_; run < clusters; ++i) {
    if (((i + 1) << cluster_bits_) > kMaxHostOffset) {
      co_return Error(ErrorKind::kIo, "qcow2: no free host cluster below 2^56", ENOSPC);
    }
    Result<uint64_t> refcount = co_await get(i);
    if (!refcount) {
      co_return std::move(refcount).error();
    }
    if (*refcount != 0) {
      run = 0;
      start = i + 1;
    } else {
      ++run;
    }
  }
  free_hint_ = start + clusters;
  allocated_end_ = std::max(allocated_end_, start + clusters);
  co_return start;
}

aio::Task<Result<uint64_t>> Refcounts::allocate(uint64_t clusters) {
  Result<uint64_t> start = co_await find_free(clusters);
  if (!start) {
    co_return std::move(start).error();
  }
  Result<void> counted = co_await update(*start << cluster_bits_, clusters << cluster_bits_, 1);
  if (!counted) {
    co_return std::move(counted).error();
  }
  co_return *start << cluster_bits_;
}

aio::Task<Result<Refcounts::Block>> Refcounts::ensure_block(uint64_t index) {
  for (;;) {
    if (index >= table_.size()) {
      Result<void> grown = co_await grow_table(index + 1);
      if (!grown) {
        co_return std::move(grown).error();
      }
      continue;
    }
    if (table_[index] != 0) {
      Result<Block> existing = co_await load_block(index);
      co_return existing;
    }
    // QEMU's alloc_refcount_block: a new block, described by itself when it lies in the range
    // it covers, else by another block (this recurses at most a few levels).
    Result<uint64_t> found = co_await find_free(1);
    if (!found) {
      co_return std::move(found).error();
    }
    const uint64_t new_cluster = *found;
    auto block = std::make_shared<std::vector<uint8_t>>(cluster_size_, 0);
    if ((new_cluster >> block_bits_) == index) {
      set_refcount_entry(block->data(), order_, new_cluster & ((uint64_t{1} << block_bits_) - 1),
                         1);
    } else {
      Result<void> counted = co_await update(new_cluster << cluster_bits_, cluster_size_, 1);
      if (!counted) {
        co_return std::move(counted).error();
      }
      if (index < table_.size() && table_[index] != 0) {
        // The nested update created this very block; give the cluster back.
        Result<void> freed = co_await update(new_cluster << cluster_bits_, cluster_size_, -1);
        if (!freed) {
          co_return std::move(freed).error();
        }
        continue;
      }
    }
    const uint64_t block_offset = new_cluster << cluster_bits_;
    Result<void> written = co_await write(block_offset, block->data(), block->size());
    if (!written) {
      co_return std::move(written).error();
    }
    // The block, and the dirty block holding its refcount when it does not describe itself,
    // must be on disk before the table points at it.
    Result<void> counted = co_await write_back();
    if (!counted) {
      co_return std::move(counted).error();
    }
    Result<void> synced = co_await barrier();
    if (!synced) {
      co_return std::move(synced).error();
    }
    uint8_t entry[8];
    put_be64(entry, block_offset);
    Result<void> hooked = co_await write(header_.refcount_table_offset + index * 8, entry, 8);
    if (!hooked) {
      co_return std::move(hooked).error();
    }
    table_[index] = block_offset;
    used_entries_ = std::max(used_entries_, index + 1);
    cache_insert(block_offset, block);
    co_return block;
  }
}

aio::Task<Result<void>> Refcounts::grow_table(uint64_t min_entries) {
  // The new table and the refcount blocks describing the area it occupies go past everything
  // the old table can describe and past every cluster in use, so the whole area has refcount 0
  // until the header switches to the new table.
  const uint64_t block_entries = uint64_t{1} << block_bits_;
  const uint64_t old_entries = table_.size();
  const uint64_t area_start = std::max(allocated_end_, old_entries * block_entries);
  uint64_t entries = std::max(min_entries, old_entries + old_entries / 2 + 1);
  uint64_t table_clusters = 0;
  uint64_t block_count = 0;
  uint64_t first_block = area_start >> block_bits_;
  for (;;) {
    table_clusters = (entries * 8 + cluster_size_ - 1) >> cluster_bits_;
    uint64_t blocks = 0;
    for (;;) {
      const uint64_t last = (area_start + blocks + table_clusters - 1) >> block_bits_;
      const uint64_t needed = last - first_block + 1;
      if (needed == blocks) {
        break;
      }
      blocks = needed;
    }
    block_count = blocks;
    const uint64_t last_block = first_block + block_count - 1;
    if (last_block < entries) {
      break;
    }
    entries = last_block + 1 + entries / 2;
  }
  // Use every entry of the table's last cluster.
  entries = (table_clusters << cluster_bits_) / 8;
  if (table_clusters << cluster_bits_ > kMaxRefcountTableBytes) {
    co_return Error(ErrorKind::kIo, "qcow2: refcount table would exceed its maximum size", EFBIG);
  }
  const uint64_t area_end = area_start + block_count + table_clusters;
  if ((area_end << cluster_bits_) > kMaxHostOffset) {
    co_return Error(ErrorKind::kIo, "qcow2: no free host cluster below 2^56", ENOSPC);
  }

  // The new refcount blocks: each area cluster has refcount 1.
  std::vector<uint8_t> blocks(block_count << cluster_bits_, 0);
  for (uint64_t cluster = area_start; cluster < area_end; ++cluster) {
    const uint64_t which = (cluster >> block_bits_) - first_block;
    set_refcount_entry(blocks.data() + (which << cluster_bits_), order_,
                       cluster & (block_entries - 1), 1);
  }
  std::vector<uint64_t> new_table(entries, 0);
  std::copy(table_.begin(), table_.end(), new_table.begin());
  for (uint64_t i = 0; i < block_count; ++i) {
    new_table[first_block + i] = (area_start + i) << cluster_bits_;
  }
  std::vector<uint8_t> raw_table(table_clusters << cluster_bits_, 0);
  for (uint64_t i = 0; i < entries; ++i) {
    put_be64(raw_table.data() + i * 8, new_table[i]);
  }
  const uint64_t table_offset = (area_start + block_count) << cluster_bits_;
  Result<void> written = co_await write(area_start << cluster_bits_, blocks.data(), blocks.size());
  if (!written) {
    co_return std::move(written).error();
  }
  written = co_await write(table_offset, raw_table.data(), raw_table.size());
  if (!written) {
    co_return std::move(written).error();
  }
  Result<void> synced = co_await barrier();
  if (!synced) {
    co_return std::move(synced).error();
  }
  // Switch the header to the new table (offset and cluster count in one write).
  uint8_t fields[12];
  put_be64(fields, table_offset);
  const auto clusters32 = static_cast<uint32_t>(table_clusters);
  fields[8] = static_cast<uint8_t>(clusters32 >> 24);
  fields[9] = static_cast<uint8_t>(clusters32 >> 16);
  fields[10] = static_cast<uint8_t>(clusters32 >> 8);
  fields[11] = static_cast<uint8_t>(clusters32);
  written = co_await write(kHeaderRefcountTableOffset, fields, sizeof(fields));
  if (!written) {
    co_return std::move(written).error();
  }
  synced = co_await barrier();
  if (!synced) {
    co_return std::move(synced).error();
  }
  const uint64_t old_offset = header_.refcount_table_offset;
  const uint64_t old_clusters = header_.refcount_table_clusters;
  header_.refcount_table_offset = table_offset;
  header_.refcount_table_clusters = clusters32;
  table_ = std::move(new_table);
  recount_used_entries();
  for (uint64_t i = 0; i < block_count; ++i) {
    auto block = std::make_shared<std::vector<uint8_t>>(
        blocks.begin() + static_cast<ptrdiff_t>(i << cluster_bits_),
        blocks.begin() + static_cast<ptrdiff_t>((i + 1) << cluster_bits_));
    cache_insert((area_start + i) << cluster_bits_, std::move(block));
  }
  allocated_end_ = std::max(allocated_end_, area_end);
  // Nothing refers to the old table any more (the header switch is on disk).
  if (old_clusters > 0) {
    Result<void> freed = co_await update(old_offset, old_clusters << cluster_bits_, -1);
    if (!freed) {
      co_return std::move(freed).error();
    }
  }
  co_return ok();
}

aio::Task<Result<void>> Refcounts::update(uint64_t offset, uint64_t length, int64_t addend) {
  if (length == 0) {
    co_return ok();
  }
  const uint64_t first = offset >> cluster_bits_;
  const uint64_t last = (offset + length - 1) >> cluster_bits_;
  const uint64_t block_entries = uint64_t{1} << block_bits_;
  uint64_t cluster = first;
  while (cluster <= last) {
    const uint64_t index = cluster >> block_bits_;
    // (No co_await inside a conditional expression: GCC 12 destroys its temporaries twice.)
    Result<Block> loaded = Block();
    if (addend > 0) {
      loaded = co_await ensure_block(index);
    } else {
      loaded = co_await load_block(index);
    }
    if (!loaded) {
      co_return std::move(loaded).error();
    }
    if (*loaded == nullptr) {
      co_return corruption("Freeing cluster " + hex(cluster << cluster_bits_) +
                           " with no refcount block");
    }
    std::vector<uint8_t>& block = **loaded;
    const uint64_t end = std::min(last, ((index + 1) << block_bits_) - 1);
    const uint64_t first_entry = cluster & (block_entries - 1);
    const uint64_t last_entry = end & (block_entries - 1);
    // Check every entry first, so a failed update leaves the cached block unchanged.
    for (uint64_t i = first_entry; i <= last_entry; ++i) {
      const uint64_t value = refcount_entry(block.data(), order_, i);
      if (addend >= 0) {
        if (value > max_refcount_ - static_cast<uint64_t>(addend)) {
          co_return Error(ErrorKind::kInvalidArgument,
                          "qcow2: refcount of cluster " +
                              hex(((index << block_bits_) + i) << cluster_bits_) +
                              " would overflow",
                          EINVAL);
        }
      } else if (value < static_cast<uint64_t>(-addend)) {
        co_return corruption("refcount of cluster " +
                             hex(((index << block_bits_) + i) << cluster_bits_) +
                             " would drop below 0");
      }
    }
    for (uint64_t i = first_entry; i <= last_entry; ++i) {
      const uint64_t value = refcount_entry(block.data(), order_, i);
      uint64_t updated = 0;
      if (addend >= 0) {
        updated = value + static_cast<uint64_t>(addend);
      } else {
        updated = value - static_cast<uint64_t>(-addend);
        if (updated == 0) {
          free_hint_ = std::min(free_hint_, (index << block_bits_) + i);
        }
      }
      set_refcount_entry(block.data(), order_, i, updated);
    }
    mark_dirty(table_[index] & kRefcountTableOffsetMask);
    cluster = end + 1;
  }
  co_return ok();
}

}  // namespace strata::block::qcow2
