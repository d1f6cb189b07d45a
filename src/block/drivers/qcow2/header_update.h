#pragma once
// Rewriting the qcow2 header cluster (QEMU's qcow2_update_header): the header fields, then the
// header extensions in QEMU's order (backing format, external data file, feature name table,
// bitmaps, the extensions strata does not interpret), the end marker and the backing file name,
// all in the first cluster. Used whenever a header field or extension changes after creation
// (bitmaps, amend, rebase).

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "base/result.h"
#include "block/drivers/qcow2/header.h"

namespace strata::block::qcow2 {

// What the header cluster holds besides the Header fields.
struct HeaderContents {
  std::string backing_file;    // "" when there is none
  std::string backing_format;  // "" when the image names none
  std::optional<std::string> data_file;
  uint32_t nb_bitmaps = 0;  // the bitmaps extension is written when > 0
  uint64_t bitmap_directory_size = 0;
  uint64_t bitmap_directory_offset = 0;
  // Header bytes past the 112 strata knows (header_length > 112), kept as QEMU keeps them.
  std::vector<uint8_t> unknown_fields;
  std::vector<std::pair<uint32_t, std::vector<uint8_t>>> unknown_extensions;
};

// The bytes of the first cluster for `header` and `contents` (cluster_size() bytes). The size
// field is written in whole sectors, header_length as QEMU computes it and backing_file_offset /
// backing_file_size from the name's place. Fails with ENOSPC when everything does not fit.
Result<std::vector<uint8_t>> build_header_cluster(const Header& header,
                                                  const HeaderContents& contents);

// QEMU 10's feature name table extension data (only written for clusters above 4 KiB).
std::vector<uint8_t> feature_name_table();

}  // namespace strata::block::qcow2
