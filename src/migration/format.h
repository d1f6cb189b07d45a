#pragma once
// The strata migration stream, version 1 (docs/migration-format.md is the specification; this
// header is its encoder and decoder). A stream is a file header, then sections; each section is a
// 16-byte frame (type, CRC-32C, payload length) and a payload. Two forms share the header and the
// framing:
//
// - mapped-ram (capability kCapMappedRam, files only): header, RAM_BLOCKS section, every block's
//   present-pages bitmap, then per block a pages region at a 1 MiB-aligned absolute file offset
//   (page i at pages_offset + i * page_size; absent pages are not written), then the trailer
//   sections from header.trailer_offset up to END, which ends at header.end_offset.
// - streaming (no capability bits, files or sockets): header, RAM_BLOCKS, RAM_PAGES sections
//   (runs of data or zero pages) and later sections in any order, END last.
//
// Decoders never trust a length or offset: every failure is a kCorrupt error naming the field.

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"

namespace strata::migration {

inline constexpr std::array<uint8_t, 8> kMagic = {'S', 'T', 'R', 'A', 'T', 'A', 'V', 'M'};
inline constexpr uint32_t kFormatVersion = 1;
inline constexpr uint32_t kHeaderSize = 80;
// Largest header a version-1 reader accepts (later versions may append fields; see the spec).
inline constexpr uint32_t kMaxHeaderSize = 4096;
// Alignment of every mapped-ram pages region, as an absolute file offset (QEMU's
// MAPPED_RAM_FILE_OFFSET_ALIGNMENT).
inline constexpr uint64_t kPagesAlignment = 1u << 20;
inline constexpr uint32_t kMinPageSize = 4096;
inline constexpr uint32_t kMaxPageSize = 1u << 20;
inline constexpr uint32_t kMaxBlocks = 4096;
inline constexpr uint32_t kMaxBlockNameLength = 255;

// Capabilities change the layout: a reader refuses a bit it does not know.
inline constexpr uint64_t kCapMappedRam = 1u << 0;
inline constexpr uint64_t kKnownCapabilities = kCapMappedRam;

// Writer flags only describe how the file was written; readers ignore unknown bits.
inline constexpr uint32_t kWrittenWithMultifd = 1u << 0;
inline constexpr uint32_t kWrittenWithDirectIo = 1u << 1;

struct FileHeader {
  uint32_t version = kFormatVersion;
  uint32_t header_size = kHeaderSize;
  uint64_t capabilities = 0;
  uint32_t page_size = kMinPageSize;
  uint32_t block_count = 0;
  uint64_t ram_total = 0;       // sum of the blocks' lengths
  uint64_t base_offset = 0;     // absolute offset of this header in its file (0 on a socket)
  uint64_t trailer_offset = 0;  // mapped-ram: absolute offset of the first trailer section
  uint64_t end_offset = 0;      // mapped-ram: absolute offset just past the END section
  uint32_t writer_flags = 0;
  uint32_t multifd_channels = 0;

  bool mapped_ram() const { return (capabilities & kCapMappedRam) != 0; }
};

std::array<uint8_t, kHeaderSize> encode_header(const FileHeader& header);
// Checks the magic, version, size, CRC and capability bits; `bytes` holds at least header_size
// bytes (kHeaderSize is enough to learn header_size: call again with more when it is larger).
Result<FileHeader> decode_header(std::span<const uint8_t> bytes);

// Section types. A type with kSectionSkippable set may be skipped by a reader that does not know
// it; any other unknown type fails the load.
inline constexpr uint32_t kSectionSkippable = 0x80000000u;
enum SectionType : uint32_t {
  kSectionRamBlocks = 1,
  kSectionRamPages = 2,      // streaming form only
  kSectionDirtyBitmaps = 3,  // reserved: block dirty bitmaps (not written yet)
  kSectionDaemonState = 4,   // reserved: daemon state (not written yet)
  kSectionEnd = 0x7f,
};
const char* section_type_name(uint32_t type);

inline constexpr size_t kSectionFrameSize = 16;
// Largest payload accepted for a metadata section (everything but RAM_PAGES).
inline constexpr uint64_t kMaxMetadataPayload = 16u << 20;

struct SectionFrame {
  uint32_t type = 0;
  uint32_t crc = 0;
  uint64_t length = 0;
};

// The CRC of a section covers its type, its length and its payload, given in `parts`.
uint32_t section_crc(uint32_t type, uint64_t length,
                     std::span<const std::span<const uint8_t>> parts);
std::array<uint8_t, kSectionFrameSize> encode_frame(const SectionFrame& frame);
SectionFrame decode_frame(std::span<const uint8_t, kSectionFrameSize> bytes);
// A whole section (frame + payload) whose payload is one buffer.
std::vector<uint8_t> encode_section(uint32_t type, std::span<const uint8_t> payload);

// One RAM block's record in the RAM_BLOCKS section.
struct BlockRecord {
  std::string name;
  uint64_t length = 0;  // bytes, a multiple of page_size
  uint32_t page_size = kMinPageSize;
  // mapped-ram only (0 in the streaming form): absolute file offsets and sizes.
  uint64_t bitmap_offset = 0;
  uint64_t bitmap_size = 0;
  uint64_t pages_offset = 0;
  uint64_t present_pages = 0;
  uint32_t bitmap_crc = 0;

  uint64_t page_count() const { return length / page_size; }
};

// Bytes of the present-pages bitmap of `pages` pages: little-endian 64-bit words, bit i of the
// stream is bit (i % 64) of word i / 64.
inline uint64_t bitmap_bytes(uint64_t pages) {
  return (pages + 63) / 64 * 8;
}

std::vector<uint8_t> encode_block_table(std::span<const BlockRecord> blocks);
// Decodes exactly `expected_count` records and checks each one on its own (name, page size,
// length, bitmap size); where the offsets point is checked by check_mapped_ram_layout.
Result<std::vector<BlockRecord>> decode_block_table(std::span<const uint8_t> payload,
                                                    uint32_t expected_count, bool mapped_ram);

// A RAM_PAGES payload starts with this record; a data run is followed by page_count pages.
inline constexpr size_t kPageRunSize = 24;
inline constexpr uint32_t kPageRunData = 0;
inline constexpr uint32_t kPageRunZero = 1;
// Largest data run a writer emits and a reader accepts, in bytes.
inline constexpr uint64_t kMaxRunBytes = 4u << 20;
struct PageRun {
  uint32_t block_index = 0;
  uint32_t kind = kPageRunData;
  uint64_t first_page = 0;
  uint64_t page_count = 0;
};
std::array<uint8_t, kPageRunSize> encode_page_run(const PageRun& run);
PageRun decode_page_run(std::span<const uint8_t, kPageRunSize> bytes);

// END's payload: the number of sections before it, so a dropped section is noticed.
inline constexpr size_t kEndPayloadSize = 8;

// The shape of one block to save or restore.
struct BlockShape {
  std::string name;
  uint64_t length = 0;
  uint32_t page_size = kMinPageSize;
};

// Checks names (unique, 1..255 bytes), page sizes (powers of two, 4 KiB..1 MiB, one per stream)
// and lengths (non-zero multiples of the page size).
Result<void> check_block_shapes(std::span<const BlockShape> blocks);

// Where everything of a mapped-ram file goes when its header is at `base_offset`.
struct MappedRamLayout {
  uint64_t table_offset = 0;  // the RAM_BLOCKS section
  uint64_t table_size = 0;    // frame + payload
  std::vector<BlockRecord> blocks;
  uint64_t trailer_offset = 0;  // just past the last pages region
};
// `blocks` must have passed check_block_shapes.
MappedRamLayout plan_mapped_ram_layout(std::span<const BlockShape> blocks, uint64_t base_offset);

// Checks that the mapped-ram records of a file whose header is `header` fit together: bitmaps
// between the table and the first pages region, pages regions 1 MiB-aligned, in order, not
// overlapping, ending at or before trailer_offset <= end_offset <= file_size.
Result<void> check_mapped_ram_layout(const FileHeader& header, uint64_t table_end,
                                     std::span<const BlockRecord> blocks, uint64_t file_size);

}  // namespace strata::migration
