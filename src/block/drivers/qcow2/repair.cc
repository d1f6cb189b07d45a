// Writing half of `check -r`: see repair.h.

#include "block/drivers/qcow2/repair.h"

#include <algorithm>
#include <cerrno>

#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/refcount.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

namespace {

// Offset of the refcount table fields and of the incompatible feature bits in the header.
constexpr uint64_t kHeaderRefcountTableOffset = 48;
constexpr uint64_t kHeaderRefcountOrderOffset = 96;  // version 3 only
constexpr uint64_t kHeaderIncompatibleOffset = 72;

// QEMU's alloc_clusters_imrt: the first run of `count` clusters with no references at or after
// `*first_free` (which moves to the first gap seen), growing `imrt` past its end when needed;
// marks them referenced once and returns the first cluster's index.
uint64_t alloc_clusters_imrt(std::vector<uint64_t>& imrt, uint64_t count, uint64_t& first_free) {
  uint64_t cluster = first_free;
  uint64_t contiguous = 0;
  bool first_gap = true;
  for (; cluster < imrt.size() && contiguous < count; ++cluster) {
    if (imrt[cluster] == 0) {
      ++contiguous;
      if (first_gap) {
        first_free = cluster;
        first_gap = false;
      }
    } else {
      contiguous = 0;
    }
  }
  if (contiguous < count) {
    const uint64_t needed = cluster + count - contiguous;
    if (needed > imrt.size()) {
      imrt.resize(needed, 0);
    }
  }
  cluster -= contiguous;
  for (uint64_t i = 0; i < count; ++i) {
    imrt[cluster + i] = 1;
  }
  return cluster;
}

struct Geometry {
  uint32_t cluster_bits;
  uint64_t cluster_size;
  uint32_t order;
  uint32_t block_bits;  // log2(refcount entries per refcount block)
};

// QEMU's rebuild_refcounts_write_refblocks over clusters [first, end): writes a refcount block
// for every block-sized slice of `imrt` that has a referenced cluster in the range, allocating
// the blocks that `table` does not have yet. Returns whether `table` had to grow.
aio::Task<Result<bool>> write_refblocks(Node& file, const Geometry& g, std::vector<uint64_t>& imrt,
                                        uint64_t first, uint64_t end,
                                        std::vector<uint64_t>& table) {
  const uint64_t block_entries = uint64_t{1} << g.block_bits;
  uint64_t first_free = 0;
  bool grown = false;
  std::vector<uint8_t> block(g.cluster_size);
  for (uint64_t cluster = first; cluster < end; ++cluster) {
    if (cluster >= imrt.size() || imrt[cluster] == 0) {
      continue;
    }
    const uint64_t index = cluster >> g.block_bits;
    const uint64_t block_start = index << g.block_bits;
    uint64_t block_offset = 0;
    if (index < table.size() && table[index] != 0) {
      block_offset = table[index];
    } else {
      first_free = std::max(first_free, block_start);
      const uint64_t block_cluster = alloc_clusters_imrt(imrt, 1, first_free);
      block_offset = block_cluster << g.cluster_bits;
      if (block_cluster >= end) {
        end = block_cluster + 1;  // the block describing this block must be written too
      }
      if (table.size() <= index) {
        const uint64_t per_cluster = g.cluster_size / 8;
        table.resize((index + 1 + per_cluster - 1) / per_cluster * per_cluster, 0);
        grown = true;
      }
      table[index] = block_offset;
    }
    std::fill(block.begin(), block.end(), 0);
    for (uint64_t i = 0; i < block_entries && block_start + i < imrt.size(); ++i) {
      set_refcount_entry(block.data(), g.order, i, imrt[block_start + i]);
    }
    Result<void> written =
        co_await write_growing(file, block_offset, IoVector(block.data(), block.size()));
    if (!written) {
      co_return written.error().with_prefix("ERROR writing refblock");
    }
    cluster = block_start + block_entries - 1;
  }
  co_return grown;
}

}  // namespace

aio::Task<Result<RebuiltRefcounts>> rebuild_refcount_structure(Node& file, const Header& header,
                                                               std::vector<uint64_t>& imrt,
                                                               bool set_refcount_order) {
  const Geometry g{header.cluster_bits, header.cluster_size(), header.refcount_order,
                   header.cluster_bits + 3 - header.refcount_order};
  std::vector<uint64_t> table;
  auto grown = co_await write_refblocks(file, g, imrt, 0, imrt.size(), table);
  if (!grown) {
    co_return std::move(grown).error();
  }
  uint64_t table_offset = 0;
  uint64_t table_clusters = 0;
  // Placing the table changes refcounts, which may need a new block, which may grow the table:
  // repeat until it stops growing (each table cluster describes many more clusters than it uses).
  do {
    table_clusters = (table.size() * 8 + g.cluster_size - 1) / g.cluster_size;
    uint64_t first_free = 0;
    const uint64_t start = alloc_clusters_imrt(imrt, table_clusters, first_free);
    table_offset = start << g.cluster_bits;
    grown = co_await write_refblocks(file, g, imrt, start, start + table_clusters, table);
    if (!grown) {
      co_return std::move(grown).error();
    }
  } while (*grown);

  std::vector<uint8_t> raw(table_clusters * g.cluster_size, 0);
  for (size_t i = 0; i < table.size(); ++i) {
    put_be64(raw.data() + i * 8, table[i]);
  }
  Result<void> written =
      co_await write_growing(file, table_offset, IoVector(raw.data(), raw.size()));
  if (!written) {
    co_return written.error().with_prefix("ERROR writing reftable");
  }
  Result<void> flushed = co_await io::flush(file);
  if (!flushed) {
    co_return flushed.error().with_prefix("ERROR writing reftable");
  }
  // Table offset and size (and with set_refcount_order the order too, bytes 96-99) change in
  // one write of one sector, so the header never describes a mix of the two structures.
  std::vector<uint8_t> fields(
      set_refcount_order ? kHeaderRefcountOrderOffset + 4 - kHeaderRefcountTableOffset : 12);
  if (set_refcount_order) {
    Result<void> current =
        co_await io::pread(file, kHeaderRefcountTableOffset, fields.data(), fields.size());
    if (!current) {
      co_return current.error().with_prefix("ERROR setting reftable");
    }
    uint8_t* order = fields.data() + (kHeaderRefcountOrderOffset - kHeaderRefcountTableOffset);
    for (int i = 0; i < 4; ++i) {
      order[i] = static_cast<uint8_t>(header.refcount_order >> (24 - 8 * i));
    }
  }
  put_be64(fields.data(), table_offset);
  const uint32_t clusters32 = static_cast<uint32_t>(table_clusters);
  for (int i = 0; i < 4; ++i) {
    fields[8 + i] = static_cast<uint8_t>(clusters32 >> (24 - 8 * i));
  }
  written = co_await io::pwrite(file, kHeaderRefcountTableOffset, fields.data(), fields.size());
  if (written) {
    written = co_await io::flush(file);
  }
  if (!written) {
    co_return written.error().with_prefix("ERROR setting reftable");
  }
  co_return RebuiltRefcounts{table_offset, clusters32, std::move(table)};
}

aio::Task<Result<void>> write_incompatible_features(Node& file, uint64_t features) {
  uint8_t raw[8];
  put_be64(raw, features);
  Result<void> written = co_await io::pwrite(file, kHeaderIncompatibleOffset, raw, sizeof(raw));
  if (!written) {
    co_return written.error().with_prefix("Could not update qcow2 header");
  }
  co_return co_await io::flush(file);
}

aio::Task<Result<void>> mark_clean_and_consistent(Node& file, Header& header) {
  const uint64_t bits = kIncompatDirty | kIncompatCorrupt;
  if (header.version < 3 || (header.incompatible_features & bits) == 0) {
    co_return ok();
  }
  // The repaired metadata must be on disk before the header stops saying it may not be.
  Result<void> flushed = co_await io::flush(file);
  if (!flushed) {
    co_return flushed;
  }
  Result<void> written =
      co_await write_incompatible_features(file, header.incompatible_features & ~bits);
  if (!written) {
    co_return written;
  }
  header.incompatible_features &= ~bits;
  co_return ok();
}

}  // namespace strata::block::qcow2
