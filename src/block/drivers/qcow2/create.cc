#include "block/drivers/qcow2/create.h"

#include <algorithm>
#include <bit>
#include <cstring>

#include "block/drivers/qcow2/format.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

namespace {

constexpr const char kUseV3[] = " (use version=v3 or greater)";

void store_be32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) {
    p[i] = static_cast<uint8_t>(v >> (24 - 8 * i));
  }
}
void store_be64(uint8_t* p, uint64_t v) {
  store_be32(p, static_cast<uint32_t>(v >> 32));
  store_be32(p + 4, static_cast<uint32_t>(v));
}

// Refcount `index` of a refcount block: widths below 8 bits are packed least significant first
// within a byte, wider ones are big-endian (qcow2.rst "Host cluster management").
void store_refcount(uint8_t* block, uint64_t index, uint32_t order, uint64_t value) {
  const uint32_t bits = 1u << order;
  if (bits < 8) {
    const uint32_t per_byte = 8 / bits;
    const uint32_t shift = static_cast<uint32_t>(index % per_byte) * bits;
    const uint8_t mask = static_cast<uint8_t>(((1u << bits) - 1) << shift);
    uint8_t& byte = block[index / per_byte];
    byte = static_cast<uint8_t>((byte & ~mask) | ((value << shift) & mask));
    return;
  }
  const uint32_t bytes = bits / 8;
  uint8_t* p = block + index * bytes;
  for (uint32_t i = 0; i < bytes; ++i) {
    p[i] = static_cast<uint8_t>(value >> (8 * (bytes - 1 - i)));
  }
}

uint64_t div_round_up(uint64_t a, uint64_t b) {
  return a / b + (a % b != 0 ? 1 : 0);
}

// One header extension: magic, length, data padded to 8 bytes.
void append_extension(std::vector<uint8_t>& out, uint32_t magic, const void* data, size_t length) {
  size_t at = out.size();
  out.resize(at + 8 + ((length + 7) & ~size_t{7}), 0);
  store_be32(out.data() + at, magic);
  store_be32(out.data() + at + 4, static_cast<uint32_t>(length));
  if (length > 0) {
    std::memcpy(out.data() + at + 8, data, length);
  }
}

// QEMU 10's feature name table (qcow2_update_header): type, bit, 46-byte name.
std::vector<uint8_t> feature_table() {
  struct Feature {
    uint8_t type;
    uint8_t bit;
    const char* name;
  };
  static const Feature kFeatures[] = {
      {0, 0, "dirty bit"},        {0, 1, "corrupt bit"},         {0, 2, "external data file"},
      {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
      {2, 0, "bitmaps"},          {2, 1, "raw external data"},
  };
  std::vector<uint8_t> table(sizeof(kFeatures) / sizeof(kFeatures[0]) * 48, 0);
  size_t at = 0;
  for (const auto& feature : kFeatures) {
    table[at] = feature.type;
    table[at + 1] = feature.bit;
    std::memcpy(table.data() + at + 2, feature.name, std::strlen(feature.name));
    at += 48;
  }
  return table;
}

}  // namespace

Result<void> validate_create_options(CreateOptions& options) {
  auto invalid = [](std::string message) {
    return make_error(ErrorKind::kInvalidArgument, std::move(message));
  };
  if (options.extended_l2 && options.version < 3) {
    return invalid(
        std::string("Extended L2 entries are only supported with compatibility level 1.1 and "
                    "above") +
        kUseV3);
  }
  const uint64_t cs = options.cluster_size;
  if (cs < (1u << kMinClusterBits) || cs > (1u << kMaxClusterBits) || !std::has_single_bit(cs)) {
    return invalid("Cluster size must be a power of two between 512 and 2048k");
  }
  if (options.extended_l2 && cs < (1u << kMinClusterBits) * kSubclustersPerCluster) {
    return invalid(
        "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
  }
  if (options.backing_file && options.preallocation != Preallocation::kOff &&
      !options.extended_l2) {
    return invalid(
        "Backing file and preallocation can only be used at the same time if extended_l2 is on");
  }
  if (options.backing_format && !options.backing_file) {
    return invalid("Backing format cannot be used without backing file");
  }
  if (options.version < 3 && options.lazy_refcounts) {
    return invalid(std::string("Lazy refcounts only supported with compatibility level 1.1 and "
                               "above") +
                   kUseV3);
  }
  if (options.refcount_bits > 64 || !std::has_single_bit(options.refcount_bits)) {
    return invalid("Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (options.version < 3 && options.refcount_bits != 16) {
    return invalid(
        std::string("Different refcount widths than 16 bits require compatibility level 1.1 or "
                    "above") +
        kUseV3);
  }
  if (options.data_file_raw && !options.data_file) {
    return invalid("data-file-raw requires data-file");
  }
  if (options.data_file_raw && options.backing_file) {
    return invalid("Backing file and data-file-raw cannot be used at the same time");
  }
  if (options.data_file_raw && options.preallocation == Preallocation::kOff) {
    // The data file's content must be visible through the image from the start.
    options.preallocation = Preallocation::kMetadata;
  }
  if (options.data_file && options.version < 3) {
    return invalid(
        std::string("External data files are only supported with compatibility level 1.1 and "
                    "above") +
        kUseV3);
  }
  if (options.compression_type != kCompressionZlib && options.version < 3) {
    return invalid(std::string("Non-zlib compression type is only supported with compatibility "
                               "level 1.1 and above") +
                   kUseV3);
  }
  if (options.backing_file && options.backing_file->size() > kMaxBackingFileNameLength) {
    return invalid("Backing file name too long");
  }
  if (options.backing_format && options.backing_format->size() > kBackingFormatMaxLength) {
    return invalid("Backing format name too long");
  }
  return ok();
}

Result<ImageLayout> layout_image(const CreateOptions& options) {
  const uint64_t cs = options.cluster_size;
  const uint32_t cluster_bits = static_cast<uint32_t>(std::countr_zero(cs));
  const uint32_t refcount_order = static_cast<uint32_t>(std::countr_zero(options.refcount_bits));
  const uint64_t size = (options.size + 511) & ~uint64_t{511};
  const uint64_t l2_entry_bytes = options.extended_l2 ? 16 : 8;
  const uint64_t l2_entries = cs / l2_entry_bytes;
  const uint64_t l1_size = div_round_up(size, cs * l2_entries);
  if (l1_size * 8 > kMaxL1Bytes) {
    return make_error(ErrorKind::kInvalidArgument,
                      "Could not resize image: Failed to grow the L1 table: File too large");
  }
  const uint64_t l1_bytes = l1_size * 8;
  const uint64_t l1_clusters = div_round_up(l1_bytes, cs);
  const bool preallocate = options.preallocation != Preallocation::kOff;
  const bool external_data = options.data_file.has_value();
  const uint64_t guest_clusters = div_round_up(size, cs);
  const uint64_t l2_tables = preallocate ? l1_size : 0;
  const uint64_t data_clusters = preallocate && !external_data ? guest_clusters : 0;

  // Refcount table and blocks must cover every cluster, themselves included.
  const uint64_t refblock_entries = (cs * 8) >> refcount_order;
  const uint64_t fixed = 1 + l1_clusters + l2_tables + data_clusters;
  uint64_t reftable_clusters = 1;
  uint64_t refblocks = 1;
  for (;;) {
    uint64_t total = fixed + reftable_clusters + refblocks;
    uint64_t need_blocks = div_round_up(total, refblock_entries);
    uint64_t need_table = std::max<uint64_t>(1, div_round_up(need_blocks * 8, cs));
    if (need_blocks <= refblocks && need_table <= reftable_clusters) {
      break;
    }
    refblocks = std::max(refblocks, need_blocks);
    reftable_clusters = std::max(reftable_clusters, need_table);
  }
  if (reftable_clusters * cs > kMaxRefcountTableBytes) {
    return make_error(ErrorKind::kInvalidArgument, "Image size too large for qcow2");
  }
  const uint64_t total_clusters = fixed + reftable_clusters + refblocks;

  ImageLayout layout;
  const uint64_t reftable_offset = cs;
  const uint64_t first_refblock = (1 + reftable_clusters) * cs;
  uint64_t next = first_refblock + cs;
  const uint64_t l1_offset = l1_size > 0 ? next : 0;
  next += l1_clusters * cs;

  // Header cluster.
  std::vector<uint8_t> header(cs, 0);
  uint8_t* h = header.data();
  store_be32(h, kMagic);
  store_be32(h + 4, options.version);
  store_be32(h + 20, cluster_bits);
  store_be64(h + 24, size);
  store_be32(h + 36, static_cast<uint32_t>(l1_size));
  store_be64(h + 40, l1_offset);
  store_be64(h + 48, reftable_offset);
  store_be32(h + 56, static_cast<uint32_t>(reftable_clusters));
  uint32_t header_length = kHeaderV2Length;
  if (options.version >= 3) {
    header_length = kHeaderStructSize;
    uint64_t incompatible = 0;
    if (options.data_file) {
      incompatible |= kIncompatDataFile;
    }
    if (options.compression_type != kCompressionZlib) {
      incompatible |= kIncompatCompression;
    }
    if (options.extended_l2) {
      incompatible |= kIncompatExtendedL2;
    }
    store_be64(h + 72, incompatible);
    store_be64(h + 80, options.lazy_refcounts ? kCompatLazyRefcounts : 0);
    store_be64(h + 88, options.data_file_raw ? kAutoclearDataFileRaw : 0);
    store_be32(h + 96, refcount_order);
    store_be32(h + 100, header_length);
    h[kCompressionTypeOffset] = options.compression_type;
  }
  std::vector<uint8_t> extensions;
  if (options.backing_format) {
    append_extension(extensions, kExtBackingFormat, options.backing_format->data(),
                     options.backing_format->size());
  }
  if (options.data_file) {
    append_extension(extensions, kExtDataFile, options.data_file->data(),
                     options.data_file->size());
  }
  if (options.version >= 3) {
    std::vector<uint8_t> table = feature_table();
    append_extension(extensions, kExtFeatureTable, table.data(), table.size());
  }
  extensions.resize(extensions.size() + 8, 0);  // end of extensions
  uint64_t end = header_length + extensions.size();
  const size_t backing_length = options.backing_file ? options.backing_file->size() : 0;
  if (end + backing_length > cs) {
    return make_error(ErrorKind::kInvalidArgument,
                      "Could not write qcow2 header: No space left on device");
  }
  std::memcpy(h + header_length, extensions.data(), extensions.size());
  if (options.backing_file) {
    store_be64(h + 8, end);
    store_be32(h + 16, static_cast<uint32_t>(backing_length));
    std::memcpy(h + end, options.backing_file->data(), backing_length);
  }
  layout.writes.emplace_back(0, std::move(header));

  // Refcount table: entry i points at refblock i (the first right after the table, the rest
  // after all other clusters).
  const uint64_t extra_refblocks_start = (total_clusters - (refblocks - 1)) * cs;
  std::vector<uint8_t> reftable(reftable_clusters * cs, 0);
  for (uint64_t i = 0; i < refblocks; ++i) {
    uint64_t offset = i == 0 ? first_refblock : extra_refblocks_start + (i - 1) * cs;
    store_be64(reftable.data() + i * 8, offset);
  }
  layout.writes.emplace_back(reftable_offset, std::move(reftable));

  // Every cluster in [0, total_clusters) is in use exactly once.
  std::vector<std::vector<uint8_t>> blocks(refblocks, std::vector<uint8_t>(cs, 0));
  for (uint64_t cluster = 0; cluster < total_clusters; ++cluster) {
    store_refcount(blocks[cluster / refblock_entries].data(), cluster % refblock_entries,
                   refcount_order, 1);
  }

  // L1 (and with preallocation the L2 tables, each followed by its data clusters).
  std::vector<uint8_t> l1(l1_bytes, 0);
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> l2_writes;
  if (preallocate) {
    uint64_t guest = 0;
    for (uint64_t i = 0; i < l1_size; ++i) {
      const uint64_t l2_offset = next;
      next += cs;
      store_be64(l1.data() + i * 8, l2_offset | kOflagCopied);
      std::vector<uint8_t> l2(cs, 0);
      const uint64_t count = std::min(l2_entries, guest_clusters - i * l2_entries);
      const uint64_t data_start = next;
      for (uint64_t j = 0; j < count; ++j, guest += cs) {
        uint64_t host = external_data ? guest : data_start + j * cs;
        store_be64(l2.data() + j * l2_entry_bytes, host | kOflagCopied);
      }
      if (!external_data) {
        layout.data_extents.emplace_back(data_start, count * cs);
        next += count * cs;
      }
      l2_writes.emplace_back(l2_offset, std::move(l2));
    }
  }
  layout.writes.emplace_back(first_refblock, std::move(blocks[0]));
  if (l1_size > 0) {
    layout.writes.emplace_back(l1_offset, std::move(l1));
  }
  for (auto& write : l2_writes) {
    layout.writes.push_back(std::move(write));
  }
  for (uint64_t i = 1; i < refblocks; ++i) {
    layout.writes.emplace_back(extra_refblocks_start + (i - 1) * cs, std::move(blocks[i]));
  }

  // QEMU's file ends at the last byte it wrote (the L1 table is written with its exact size) or
  // at the end of the last preallocated cluster.
  if (refblocks > 1 || (preallocate && external_data)) {
    layout.file_length = total_clusters * cs;
  } else if (preallocate && guest_clusters > 0) {
    // QEMU extends the file to the end of the last allocation, which covers the image's last
    // guest byte rounded up to a subcluster.
    const uint64_t subcluster = options.extended_l2 ? cs / kSubclustersPerCluster : cs;
    const uint64_t last_guest = (guest_clusters - 1) * cs;
    const uint64_t tail = ((size - last_guest) + subcluster - 1) / subcluster * subcluster;
    layout.file_length =
        layout.data_extents.back().first + layout.data_extents.back().second - cs + tail;
  } else if (preallocate) {
    layout.file_length = total_clusters * cs;
  } else if (l1_size > 0) {
    layout.file_length = l1_offset + l1_bytes;
  } else {
    layout.file_length = first_refblock + cs;
  }
  return layout;
}

aio::Task<Result<void>> write_image(Node& file, const ImageLayout& layout) {
  Result<void> resized = co_await io::truncate(file, layout.file_length, /*exact=*/true);
  if (!resized) {
    co_return resized;
  }
  for (const auto& [offset, bytes] : layout.writes) {
    Result<void> written = co_await io::pwrite(file, offset, bytes.data(), bytes.size());
    if (!written) {
      co_return written;
    }
  }
  co_return co_await io::flush(file);
}

}  // namespace strata::block::qcow2
