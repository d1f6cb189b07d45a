#pragma once
// Metadata overlap checks (QEMU's QCow2MetadataOverlap and the `overlap-check` option of
// BlockdevOptionsQcow2): which qcow2 structures a write to the image file is checked against
// before it is issued. Pure functions; the checks themselves are Qcow2Node members (overlap.cc).

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include "base/result.h"

namespace strata::block::qcow2 {

// One bit per structure, in QEMU's order (QCOW2_OL_*_BITNR).
enum OverlapBits : uint32_t {
  kOverlapMainHeader = 1u << 0,
  kOverlapActiveL1 = 1u << 1,
  kOverlapActiveL2 = 1u << 2,
  kOverlapRefcountTable = 1u << 3,
  kOverlapRefcountBlock = 1u << 4,
  kOverlapSnapshotTable = 1u << 5,
  kOverlapInactiveL1 = 1u << 6,
  kOverlapInactiveL2 = 1u << 7,
  kOverlapBitmapDirectory = 1u << 8,
};

// QEMU's QCOW2_OL_CONSTANT / CACHED / ALL templates.
inline constexpr uint32_t kOverlapConstant =
    kOverlapMainHeader | kOverlapActiveL1 | kOverlapRefcountTable | kOverlapSnapshotTable;
inline constexpr uint32_t kOverlapCached = kOverlapConstant | kOverlapActiveL2 |
                                           kOverlapRefcountBlock | kOverlapBitmapDirectory |
                                           kOverlapInactiveL1;
inline constexpr uint32_t kOverlapAll = kOverlapCached | kOverlapInactiveL2;

// The checks an `overlap-check` setting asks for: the template ("none", "constant", "cached",
// "all"; absent means QEMU's default "cached"), then each per-structure flag given
// ("main-header", "active-l1", ... "bitmap-directory") turns its structure on or off.
uint32_t overlap_checks(const std::optional<std::string>& template_name,
                        const std::map<std::string, bool>& flags);

// The name QEMU's messages give the structure of the lowest bit set in `bits` ("active L1
// table", "refcount block", ...).
const char* overlap_structure_name(uint32_t bits);

}  // namespace strata::block::qcow2
