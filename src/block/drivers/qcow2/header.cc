#include "block/drivers/qcow2/header.h"

#include <cinttypes>
#include <cstdio>
#include <functional>
#include <vector>

#include "block/drivers/qcow2/format.h"

namespace strata::block::qcow2 {

namespace {

Error invalid(std::string message) {
  return Error(ErrorKind::kInvalidArgument, std::move(message), EINVAL);
}

// A string from `bytes`, ending at the first NUL (QEMU reads names into zeroed C buffers).
std::string c_string(std::span<const uint8_t> bytes) {
  std::string out;
  for (uint8_t b : bytes) {
    if (b == 0) {
      break;
    }
    out.push_back(static_cast<char>(b));
  }
  return out;
}

// Walks the extensions like QEMU's qcow2_read_extensions: `visit(magic, data)` for each one until
// the end marker or `end`. Stops at the first error (returned).
Result<void> walk_extensions(
    const Header& header, std::span<const uint8_t> cluster,
    const std::function<Result<void>(uint32_t, std::span<const uint8_t>)>& visit) {
  const uint64_t end = header.extensions_end();
  uint64_t offset = header.header_length;
  while (offset < end) {
    // end <= cluster size, so a header that does not fit in the cluster is also past `end`.
    if (offset + 8 > end || offset + 8 > cluster.size()) {
      return invalid("Header extension too large");
    }
    uint32_t magic = load_be32(cluster.data() + offset);
    uint32_t length = load_be32(cluster.data() + offset + 4);
    offset += 8;
    if (length > end - offset) {
      return invalid("Header extension too large");
    }
    if (magic == kExtEnd) {
      return ok();
    }
    auto visited = visit(magic, cluster.subspan(offset, length));
    if (!visited) {
      return visited;
    }
    offset += (uint64_t{length} + 7) & ~uint64_t{7};
  }
  return ok();
}

}  // namespace

Result<void> validate_table(uint64_t offset, uint64_t entries, uint64_t entry_length,
                            uint64_t max_bytes, uint64_t cluster_size, const char* name) {
  if (entries > max_bytes / entry_length) {
    return Error(ErrorKind::kInvalidArgument, std::string(name) + " too large", EFBIG);
  }
  if (static_cast<uint64_t>(INT64_MAX) - entries * entry_length < offset ||
      (offset & (cluster_size - 1)) != 0) {
    return invalid(std::string(name) + " offset invalid");
  }
  return ok();
}

Result<uint32_t> probe_cluster_bits(std::span<const uint8_t> head) {
  if (head.size() < kHeaderStructSize) {
    return invalid("Image is not in qcow2 format");
  }
  const uint8_t* p = head.data();
  if (load_be32(p) != kMagic) {
    return invalid("Image is not in qcow2 format");
  }
  uint32_t version = load_be32(p + 4);
  if (version < 2 || version > 3) {
    return Error(ErrorKind::kUnsupported, "Unsupported qcow2 version " + std::to_string(version),
                 ENOTSUP);
  }
  uint32_t cluster_bits = load_be32(p + 20);
  if (cluster_bits < kMinClusterBits || cluster_bits > kMaxClusterBits) {
    return invalid("Unsupported cluster size: 2^" + std::to_string(cluster_bits));
  }
  return cluster_bits;
}

Result<Header> parse_header(std::span<const uint8_t> cluster) {
  auto bits = probe_cluster_bits(cluster);
  if (!bits) {
    return std::move(bits).error();
  }
  const uint8_t* p = cluster.data();
  Header h;
  h.version = load_be32(p + 4);
  h.backing_file_offset = load_be64(p + 8);
  h.backing_file_size = load_be32(p + 16);
  h.cluster_bits = *bits;
  h.size = load_be64(p + 24);
  h.crypt_method = load_be32(p + 32);
  h.l1_size = load_be32(p + 36);
  h.l1_table_offset = load_be64(p + 40);
  h.refcount_table_offset = load_be64(p + 48);
  h.refcount_table_clusters = load_be32(p + 56);
  h.nb_snapshots = load_be32(p + 60);
  h.snapshots_offset = load_be64(p + 64);
  if (cluster.size() < h.cluster_size()) {
    return invalid("qcow2 header parsed from less than one cluster");
  }
  if (h.version == 2) {
    h.header_length = kHeaderV2Length;
  } else {
    h.incompatible_features = load_be64(p + 72);
    h.compatible_features = load_be64(p + 80);
    h.autoclear_features = load_be64(p + 88);
    h.refcount_order = load_be32(p + 96);
    h.header_length = load_be32(p + 100);
    if (h.header_length < kHeaderV3MinLength) {
      return invalid("qcow2 header too short");
    }
  }
  if (h.header_length > h.cluster_size()) {
    return invalid("qcow2 header exceeds cluster size");
  }
  if (h.backing_file_offset > h.cluster_size()) {
    return invalid("Invalid backing file offset");
  }
  h.compression_type =
      h.header_length > kCompressionTypeOffset ? p[kCompressionTypeOffset] : kCompressionZlib;
  if (h.compression_type != kCompressionZlib && h.compression_type != kCompressionZstd) {
    return Error(ErrorKind::kUnsupported,
                 "qcow2: unknown compression type: " + std::to_string(h.compression_type), ENOTSUP);
  }
  if (h.compression_type == kCompressionZlib && (h.incompatible_features & kIncompatCompression)) {
    return invalid("qcow2: Compression type incompatible feature bit must not be set");
  }
  if (h.compression_type != kCompressionZlib && !(h.incompatible_features & kIncompatCompression)) {
    return invalid("qcow2: Compression type incompatible feature bit must be set");
  }
  if (uint64_t unknown = h.incompatible_features & ~kIncompatMask; unknown != 0) {
    return Error(ErrorKind::kUnsupported, unsupported_features_message(h, cluster, unknown),
                 ENOTSUP);
  }
  if (h.subcluster_size() < (uint64_t{1} << kMinClusterBits)) {
    return invalid("Unsupported subcluster size: " + std::to_string(h.subcluster_size()));
  }
  if (h.refcount_order > 6) {
    return invalid("Reference count entry width too large; may not exceed 64 bits");
  }
  if (h.crypt_method != kCryptNone) {
    if (h.crypt_method != kCryptAes && h.crypt_method != kCryptLuks) {
      return invalid("Unsupported encryption method " + std::to_string(h.crypt_method));
    }
    return Error(ErrorKind::kUnsupported,
                 "Encrypted qcow2 images are not supported by strata (encryption is not "
                 "implemented)",
                 ENOTSUP);
  }
  if (h.refcount_table_clusters == 0) {
    return invalid("Image does not contain a reference count table");
  }
  auto reftable =
      validate_table(h.refcount_table_offset, h.refcount_table_clusters, h.cluster_size(),
                     kMaxRefcountTableBytes, h.cluster_size(), "Reference count table");
  if (!reftable) {
    return std::move(reftable).error();
  }
  auto snapshots =
      validate_table(h.snapshots_offset, h.nb_snapshots, kSnapshotHeaderSize,
                     kSnapshotHeaderSize * kMaxSnapshots, h.cluster_size(), "Snapshot table");
  if (!snapshots) {
    return std::move(snapshots).error();
  }
  auto l1 = validate_table(h.l1_table_offset, h.l1_size, 8, kMaxL1Bytes, h.cluster_size(),
                           "Active L1 table");
  if (!l1) {
    return std::move(l1).error();
  }
  // QEMU's size_to_l1: L1 entries needed for `size` bytes (the size is in whole sectors).
  const uint32_t l1_shift = h.cluster_bits + h.l2_bits();
  const uint64_t sectors_bytes = h.size & ~uint64_t{511};
  const uint64_t l1_needed = (sectors_bytes >> l1_shift) +
                             ((sectors_bytes & ((uint64_t{1} << l1_shift) - 1)) != 0 ? 1 : 0);
  if (l1_needed > static_cast<uint64_t>(INT32_MAX)) {
    return Error(ErrorKind::kInvalidArgument, "Image is too big", EFBIG);
  }
  if (h.size > static_cast<uint64_t>(INT64_MAX)) {
    // QEMU keeps the size in an int64_t; strata refuses what it cannot represent.
    return Error(ErrorKind::kInvalidArgument, "Image is too big", EFBIG);
  }
  if (h.l1_size < l1_needed) {
    return invalid("L1 table is too small");
  }
  return h;
}

Result<Extensions> parse_extensions(const Header& header, std::span<const uint8_t> cluster) {
  Extensions ext;
  auto walked = walk_extensions(
      header, cluster, [&](uint32_t magic, std::span<const uint8_t> data) -> Result<void> {
        switch (magic) {
          case kExtBackingFormat:
            if (data.size() > kBackingFormatMaxLength) {
              return invalid("ERROR: ext_backing_format: len=" + std::to_string(data.size()) +
                             " too large (>=16)");
            }
            ext.backing_format = c_string(data);
            return ok();
          case kExtCryptoHeader:
            // Encrypted images were refused with the header; QEMU's text for the rest.
            return invalid("CRYPTO header extension only expected with LUKS encryption method");
          case kExtBitmaps: {
            if (data.size() != 24) {
              return invalid("bitmaps_ext: Invalid extension length");
            }
            if (!(header.autoclear_features & kAutoclearBitmaps)) {
              // QEMU warns that the bitmaps are inconsistent and ignores the extension.
              return ok();
            }
            uint32_t nb_bitmaps = load_be32(data.data());
            uint32_t reserved = load_be32(data.data() + 4);
            uint64_t directory_size = load_be64(data.data() + 8);
            uint64_t directory_offset = load_be64(data.data() + 16);
            if (reserved != 0) {
              return invalid("bitmaps_ext: Reserved field is not zero");
            }
            constexpr uint32_t kMaxBitmaps = 65535;
            if (nb_bitmaps > kMaxBitmaps) {
              return invalid("bitmaps_ext: Image has " + std::to_string(nb_bitmaps) +
                             " bitmaps, exceeding the QEMU supported maximum of 65535");
            }
            if (nb_bitmaps == 0) {
              return invalid("found bitmaps extension with zero bitmaps");
            }
            if ((directory_offset & (header.cluster_size() - 1)) != 0) {
              return invalid("bitmaps_ext: invalid bitmap directory offset");
            }
            constexpr uint64_t kMaxDirectorySize = uint64_t{1024} * kMaxBitmaps;
            if (directory_size > kMaxDirectorySize) {
              return invalid("bitmaps_ext: bitmap directory size (" +
                             std::to_string(directory_size) +
                             ") exceeds the maximum supported size (" +
                             std::to_string(kMaxDirectorySize) + ")");
            }
            ext.has_bitmaps = true;
            ext.nb_bitmaps = nb_bitmaps;
            ext.bitmap_directory_size = directory_size;
            ext.bitmap_directory_offset = directory_offset;
            return ok();
          }
          case kExtDataFile:
            ext.data_file = c_string(data);
            return ok();
          case kExtFeatureTable:
            return ok();
          default:
            // Nothing a reader needs, but a header rewrite must keep it.
            ext.unknown.emplace_back(magic, std::vector<uint8_t>(data.begin(), data.end()));
            return ok();
        }
      });
  if (!walked) {
    return std::move(walked).error();
  }
  return ext;
}

std::string unsupported_features_message(const Header& header, std::span<const uint8_t> cluster,
                                         uint64_t mask) {
  std::vector<uint8_t> table;
  // Errors end the walk early, as in QEMU (which ignores them here).
  ignore_error(walk_extensions(header, cluster,
                               [&](uint32_t magic, std::span<const uint8_t> data) -> Result<void> {
                                 if (magic == kExtFeatureTable) {
                                   table.assign(data.begin(), data.end());
                                 }
                                 return ok();
                               }),
               "QEMU names what it could read before a malformed extension");
  std::string features;
  // Entries of 48 bytes: type, bit number, 46-byte name; the table ends at an empty name.
  constexpr size_t kEntrySize = 48;
  for (size_t at = 0; at < table.size(); at += kEntrySize) {
    uint8_t entry[kEntrySize] = {};
    for (size_t i = 0; i < kEntrySize && at + i < table.size(); ++i) {
      entry[i] = table[at + i];
    }
    if (entry[2] == 0) {
      break;
    }
    const uint8_t type = entry[0];
    const uint8_t bit = entry[1];
    if (type != 0 || bit >= 64 || !(mask & (uint64_t{1} << bit))) {
      continue;
    }
    if (!features.empty()) {
      features += ", ";
    }
    features += c_string(std::span<const uint8_t>(entry + 2, 46));
    mask &= ~(uint64_t{1} << bit);
  }
  if (mask != 0) {
    if (!features.empty()) {
      features += ", ";
    }
    char hex[32];
    std::snprintf(hex, sizeof(hex), "%" PRIx64, mask);
    features += std::string("Unknown incompatible feature: ") + hex;
  }
  return "Unsupported qcow2 feature(s): " + features;
}

Result<std::optional<std::string>> parse_backing_file_name(const Header& header,
                                                           std::span<const uint8_t> cluster) {
  if (header.backing_file_offset == 0) {
    return std::optional<std::string>();
  }
  const uint64_t length = header.backing_file_size;
  const uint64_t room = header.cluster_size() - header.backing_file_offset;
  if (length > std::min<uint64_t>(kMaxBackingFileNameLength, room) ||
      length >= kMaxBackingFileNameLength + 1) {
    return invalid("Backing file name too long");
  }
  return std::optional<std::string>(
      c_string(cluster.subspan(header.backing_file_offset, static_cast<size_t>(length))));
}

}  // namespace strata::block::qcow2
