#pragma once
// Permissions a parent takes on a node and shares with other parents (QEMU's BLK_PERM_*,
// include/block/block-common.h). The bit values are part of the on-disk lock protocol: bit i maps
// to lock bytes 100+i and 200+i of an image file (see image_lock.h), so they must not be
// renumbered.

#include <cstdint>
#include <string>

namespace strata::block {

enum : uint64_t {
  kPermConsistentRead = 1,  // reads return consistent data (no pending copy-on-read etc.)
  kPermWrite = 2,           // guest-visible content may change
  kPermWriteUnchanged = 4,  // writes that keep the content the same (e.g. stream, COR)
  kPermResize = 8,          // the length may change
  kPermAll = 15,
};

// QEMU's bdrv_perm_names: the names of the set bits in bit order, joined by ", "
// ("consistent read", "write", "write unchanged", "resize"); bits outside kPermAll are ignored and
// an empty set gives "".
inline std::string perm_names(uint64_t perms) {
  static constexpr struct {
    uint64_t perm;
    const char* name;
  } kNames[] = {
      {kPermConsistentRead, "consistent read"},
      {kPermWrite, "write"},
      {kPermWriteUnchanged, "write unchanged"},
      {kPermResize, "resize"},
  };
  std::string result;
  for (const auto& entry : kNames) {
    if ((perms & entry.perm) != 0) {
      if (!result.empty()) {
        result += ", ";
      }
      result += entry.name;
    }
  }
  return result;
}

}  // namespace strata::block
