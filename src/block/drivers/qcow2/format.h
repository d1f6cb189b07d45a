#pragma once
// qcow2 on-disk constants and big-endian accessors (docs/interop/qcow2.rst; QEMU's block/qcow2.h).
// Everything here describes bytes on disk; nothing allocates.

#include <cstdint>
#include <cstring>

namespace strata::block::qcow2 {

inline constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"

// Header layout (qcow2.rst "Header"): version 2 ends at byte 72, version 3 has at least 104 bytes;
// byte 104 holds the compression type when header_length allows it.
inline constexpr uint32_t kHeaderV2Length = 72;
inline constexpr uint32_t kHeaderV3MinLength = 104;
inline constexpr uint32_t kHeaderStructSize = 112;  // QEMU's sizeof(QCowHeader)
inline constexpr uint32_t kCompressionTypeOffset = 104;

inline constexpr uint32_t kMinClusterBits = 9;
inline constexpr uint32_t kMaxClusterBits = 21;

// QEMU's limits on table sizes (block/qcow2.h).
inline constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;  // QCOW_MAX_REFTABLE_SIZE
inline constexpr uint64_t kMaxL1Bytes = 32ull << 20;            // QCOW_MAX_L1_SIZE
inline constexpr uint64_t kMaxSnapshots = 65536;                // QCOW_MAX_SNAPSHOTS
inline constexpr uint64_t kSnapshotHeaderSize = 40;             // sizeof(QCowSnapshotHeader)
inline constexpr uint64_t kMaxSnapshotExtraData = 1024;         // QCOW_MAX_SNAPSHOT_EXTRA_DATA
inline constexpr uint64_t kMaxSnapshotsTableBytes =
    kMaxSnapshots * 1024;  // QCOW_MAX_SNAPSHOTS_SIZE
inline constexpr uint64_t kMaxBackingFileNameLength = 1023;

// Incompatible feature bits (qcow2.rst "incompatible_features").
inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatDataFile = 1ull << 2;
inline constexpr uint64_t kIncompatCompression = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
inline constexpr uint64_t kIncompatMask = (1ull << 5) - 1;
// Compatible and autoclear bits.
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;
inline constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
inline constexpr uint64_t kAutoclearDataFileRaw = 1ull << 1;

inline constexpr uint8_t kCompressionZlib = 0;
inline constexpr uint8_t kCompressionZstd = 1;

inline constexpr uint32_t kCryptNone = 0;
inline constexpr uint32_t kCryptAes = 1;
inline constexpr uint32_t kCryptLuks = 2;

// Header extension magics (qcow2.rst "Header extensions").
inline constexpr uint32_t kExtEnd = 0;
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureTable = 0x6803f857;
inline constexpr uint32_t kExtCryptoHeader = 0x0537be77;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtDataFile = 0x44415441;
inline constexpr uint32_t kBackingFormatMaxLength = 15;  // QEMU's bs->backing_format[16]

// L1/L2 entry bits (qcow2.rst "Cluster mapping").
inline constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ull;
// Offset bits of a refcount table entry (bits 9-63; the low 9 are reserved).
inline constexpr uint64_t kRefcountTableOffsetMask = 0xfffffffffffffe00ull;
inline constexpr uint64_t kL2CompressedOffsetSizeMask = 0x3fffffffffffffffull;
inline constexpr uint64_t kOflagCopied = 1ull << 63;
inline constexpr uint64_t kOflagCompressed = 1ull << 62;
inline constexpr uint64_t kOflagZero = 1ull << 0;
// Extended L2: the second 64-bit word holds 32 "allocated" bits, then 32 "reads as zero" bits.
inline constexpr uint32_t kSubclustersPerCluster = 32;
inline constexpr uint64_t kBitmapAllAlloc = 0xffffffffull;
inline constexpr uint64_t kBitmapAllZeroes = 0xffffffff00000000ull;

inline uint16_t load_be16(const uint8_t* p) {
  return static_cast<uint16_t>((p[0] << 8) | p[1]);
}
inline uint32_t load_be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}
inline uint64_t load_be64(const uint8_t* p) {
  return (uint64_t{load_be32(p)} << 32) | load_be32(p + 4);
}

}  // namespace strata::block::qcow2
