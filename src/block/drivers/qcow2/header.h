#pragma once
// The qcow2 header and its extensions (qcow2.rst "Header", "Header extensions"), parsed and
// validated from the image's first cluster with the checks and messages of QEMU 10's
// qcow2_do_open and qcow2_read_extensions. Pure functions over bytes: they allocate at most what
// the first cluster holds, so a malformed image can only produce an error.

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "base/result.h"

namespace strata::block::qcow2 {

struct Header {
  // Fields as stored (version 2 images get QEMU's defaults for the version 3 fields).
  uint32_t version = 0;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 0;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = 0;
  uint8_t compression_type = 0;

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  bool extended_l2() const { return (incompatible_features & (1ull << 4)) != 0; }
  // Bytes per L2 entry: 8, or 16 with extended L2 (entry + subcluster bitmap).
  uint32_t l2_entry_size() const { return extended_l2() ? 16 : 8; }
  // log2 of the entries per L2 table.
  uint32_t l2_bits() const { return cluster_bits - (extended_l2() ? 4 : 3); }
  uint32_t subclusters_per_cluster() const { return extended_l2() ? 32 : 1; }
  uint64_t subcluster_size() const { return cluster_size() / subclusters_per_cluster(); }
  // End of the header extension area: the backing file name, or the end of the first cluster.
  uint64_t extensions_end() const {
    return backing_file_offset != 0 ? backing_file_offset : cluster_size();
  }
};

// What the header extensions say.
struct Extensions {
  std::optional<std::string> backing_format;
  std::optional<std::string> data_file;
  bool has_bitmaps = false;  // a bitmaps extension that is valid (autoclear bit set)
  uint32_t nb_bitmaps = 0;   // the valid extension's fields (0 without one)
  uint64_t bitmap_directory_size = 0;
  uint64_t bitmap_directory_offset = 0;
  // Extensions strata does not interpret (magic, data), kept for header rewrites as QEMU keeps
  // them (s->unknown_header_ext). The feature name table is not kept: rewrites regenerate it.
  std::vector<std::pair<uint32_t, std::vector<uint8_t>>> unknown;
};

// Checks magic, version and cluster size (the checks that need only the first 112 bytes) and
// returns cluster_bits. `head` holds at least kHeaderStructSize bytes (zeroes past end of file).
Result<uint32_t> probe_cluster_bits(std::span<const uint8_t> head);

// Parses and validates the header from `cluster` (the image's first cluster, zero-padded past end
// of file; its size must be the cluster size). Covers QEMU's checks up to and including "L1 table
// is too small". Encrypted images fail here (strata does not implement qcow2 encryption).
Result<Header> parse_header(std::span<const uint8_t> cluster);

// Parses the header extensions between header_length and extensions_end() in `cluster`.
Result<Extensions> parse_extensions(const Header& header, std::span<const uint8_t> cluster);

// QEMU's report_unsupported_feature: "Unsupported qcow2 feature(s): name, ..." for the
// incompatible bits `mask`, named from the feature name table extension when it has them.
std::string unsupported_features_message(const Header& header, std::span<const uint8_t> cluster,
                                         uint64_t mask);

// The backing file name stored after the extensions, or nullopt when there is none; fails with
// "Backing file name too long" like QEMU.
Result<std::optional<std::string>> parse_backing_file_name(const Header& header,
                                                           std::span<const uint8_t> cluster);

// QEMU's qcow2_validate_table: "<name> too large" / "<name> offset invalid".
Result<void> validate_table(uint64_t offset, uint64_t entries, uint64_t entry_length,
                            uint64_t max_bytes, uint64_t cluster_size, const char* name);

}  // namespace strata::block::qcow2
