#include "migration/format.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <set>

#include "migration/crc32c.h"
#include "migration/wire.h"

namespace strata::migration {

namespace {

Error corrupt(std::string message) {
  return Error(ErrorKind::kCorrupt, std::move(message));
}

bool is_power_of_two(uint64_t value) {
  return value != 0 && (value & (value - 1)) == 0;
}

uint64_t align_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

// What is wrong with one block's name, page size or length on its own, if anything.
std::optional<std::string> shape_problem(const std::string& name, uint32_t page_size,
                                         uint64_t length) {
  if (name.empty() || name.size() > kMaxBlockNameLength || name.find('\0') != std::string::npos) {
    return fmt::format("invalid RAM block name \"{}\"", name);
  }
  if (!is_power_of_two(page_size) || page_size < kMinPageSize || page_size > kMaxPageSize) {
    return fmt::format("RAM block \"{}\": page size {} is not a power of two from 4 KiB to 1 MiB",
                       name, page_size);
  }
  if (length == 0 || length % page_size != 0) {
    return fmt::format("RAM block \"{}\": length {:#x} is not a non-zero multiple of its page size",
                       name, length);
  }
  return std::nullopt;
}

}  // namespace

std::array<uint8_t, kHeaderSize> encode_header(const FileHeader& header) {
  WireEncoder e;
  e.bytes(std::string_view(reinterpret_cast<const char*>(kMagic.data()), kMagic.size()));
  e.u32(header.version);
  e.u32(kHeaderSize);
  e.u64(header.capabilities);
  e.u32(header.page_size);
  e.u32(header.block_count);
  e.u64(header.ram_total);
  e.u64(header.base_offset);
  e.u64(header.trailer_offset);
  e.u64(header.end_offset);
  e.u32(header.writer_flags);
  e.u32(header.multifd_channels);
  e.u32(0);  // reserved
  e.u32(crc32c(e.data()));
  std::array<uint8_t, kHeaderSize> bytes{};
  std::memcpy(bytes.data(), e.data().data(), kHeaderSize);
  return bytes;
}

Result<FileHeader> decode_header(std::span<const uint8_t> bytes) {
  if (bytes.size() < kHeaderSize) {
    return corrupt(
        fmt::format("file too short for a header ({} of {} bytes)", bytes.size(), kHeaderSize));
  }
  if (!std::equal(kMagic.begin(), kMagic.end(), bytes.begin())) {
    bool zeroed =
        std::all_of(bytes.begin(), bytes.begin() + kHeaderSize, [](uint8_t b) { return b == 0; });
    return corrupt(zeroed ? "the header is zeroed (an interrupted save leaves it so)"
                          : "not a strata migration stream (bad magic)");
  }
  WireDecoder d(bytes.subspan(kMagic.size()));
  FileHeader header;
  header.version = d.u32();
  header.header_size = d.u32();
  if (header.version != kFormatVersion) {
    return corrupt(fmt::format("unsupported format version {} (this strata reads version {})",
                               header.version, kFormatVersion));
  }
  if (header.header_size < kHeaderSize || header.header_size > kMaxHeaderSize) {
    return corrupt(fmt::format("invalid header size {}", header.header_size));
  }
  if (bytes.size() < header.header_size) {
    return corrupt(fmt::format("file too short for its {}-byte header", header.header_size));
  }
  header.capabilities = d.u64();
  header.page_size = d.u32();
  header.block_count = d.u32();
  header.ram_total = d.u64();
  header.base_offset = d.u64();
  header.trailer_offset = d.u64();
  header.end_offset = d.u64();
  header.writer_flags = d.u32();
  header.multifd_channels = d.u32();
  uint32_t stored = static_cast<uint32_t>(load_le(bytes.data() + header.header_size - 4, 4));
  if (stored != crc32c(bytes.first(header.header_size - 4))) {
    return corrupt("header checksum mismatch");
  }
  if ((header.capabilities & ~kKnownCapabilities) != 0) {
    return corrupt(fmt::format("unknown capability bits {:#x} (written by a newer strata?)",
                               header.capabilities & ~kKnownCapabilities));
  }
  if (!is_power_of_two(header.page_size) || header.page_size < kMinPageSize ||
      header.page_size > kMaxPageSize) {
    return corrupt(fmt::format("invalid page size {}", header.page_size));
  }
  if (header.block_count > kMaxBlocks) {
    return corrupt(
        fmt::format("too many RAM blocks ({}, at most {})", header.block_count, kMaxBlocks));
  }
  return header;
}

const char* section_type_name(uint32_t type) {
  switch (type) {
    case kSectionRamBlocks:
      return "ram-blocks";
    case kSectionRamPages:
      return "ram-pages";
    case kSectionDirtyBitmaps:
      return "dirty-bitmaps";
    case kSectionDaemonState:
      return "daemon-state";
    case kSectionEnd:
      return "end";
    default:
      return "unknown";
  }
}

uint32_t section_crc(uint32_t type, uint64_t length,
                     std::span<const std::span<const uint8_t>> parts) {
  uint8_t prefix[12];
  store_le(prefix, type, 4);
  store_le(prefix + 4, length, 8);
  uint32_t crc = crc32c(prefix);
  for (std::span<const uint8_t> part : parts) {
    crc = crc32c_extend(crc, part);
  }
  return crc;
}

std::array<uint8_t, kSectionFrameSize> encode_frame(const SectionFrame& frame) {
  std::array<uint8_t, kSectionFrameSize> bytes{};
  store_le(bytes.data(), frame.type, 4);
  store_le(bytes.data() + 4, frame.crc, 4);
  store_le(bytes.data() + 8, frame.length, 8);
  return bytes;
}

SectionFrame decode_frame(std::span<const uint8_t, kSectionFrameSize> bytes) {
  return SectionFrame{static_cast<uint32_t>(load_le(bytes.data(), 4)),
                      static_cast<uint32_t>(load_le(bytes.data() + 4, 4)),
                      load_le(bytes.data() + 8, 8)};
}

std::vector<uint8_t> encode_section(uint32_t type, std::span<const uint8_t> payload) {
  std::span<const uint8_t> parts[] = {payload};
  SectionFrame frame{type, section_crc(type, payload.size(), parts), payload.size()};
  std::vector<uint8_t> bytes(kSectionFrameSize + payload.size());
  auto head = encode_frame(frame);
  std::memcpy(bytes.data(), head.data(), head.size());
  if (!payload.empty()) {
    std::memcpy(bytes.data() + kSectionFrameSize, payload.data(), payload.size());
  }
  return bytes;
}

std::vector<uint8_t> encode_block_table(std::span<const BlockRecord> blocks) {
  WireEncoder e;
  e.u32(static_cast<uint32_t>(blocks.size()));
  e.u32(0);  // reserved
  for (const BlockRecord& block : blocks) {
    e.u16(static_cast<uint16_t>(block.name.size()));
    e.u16(0);  // reserved
    e.u32(block.page_size);
    e.u64(block.length);
    e.u64(block.bitmap_offset);
    e.u64(block.bitmap_size);
    e.u64(block.pages_offset);
    e.u64(block.present_pages);
    e.u32(block.bitmap_crc);
    e.u32(0);  // reserved
    e.bytes(block.name);
  }
  return std::move(e.data());
}

Result<std::vector<BlockRecord>> decode_block_table(std::span<const uint8_t> payload,
                                                    uint32_t expected_count, bool mapped_ram) {
  WireDecoder d(payload);
  uint32_t count = d.u32();
  (void)d.u32();
  if (d.failed() || count != expected_count) {
    return corrupt(
        fmt::format("the RAM block table lists {} blocks, the header {}", count, expected_count));
  }
  std::vector<BlockRecord> blocks;
  blocks.reserve(count);
  std::set<std::string> names;
  for (uint32_t i = 0; i < count; ++i) {
    BlockRecord block;
    uint16_t name_length = d.u16();
    (void)d.u16();
    block.page_size = d.u32();
    block.length = d.u64();
    block.bitmap_offset = d.u64();
    block.bitmap_size = d.u64();
    block.pages_offset = d.u64();
    block.present_pages = d.u64();
    block.bitmap_crc = d.u32();
    (void)d.u32();
    block.name = d.text(name_length);
    if (d.failed()) {
      return corrupt(fmt::format("the RAM block table ends inside block {}", i));
    }
    if (auto problem = shape_problem(block.name, block.page_size, block.length)) {
      return corrupt(*problem);
    }
    if (!names.insert(block.name).second) {
      return corrupt(fmt::format("RAM block \"{}\" is listed twice", block.name));
    }
    if (mapped_ram) {
      if (block.bitmap_size != bitmap_bytes(block.page_count())) {
        return corrupt(fmt::format("RAM block \"{}\" has a {}-byte bitmap for {} pages", block.name,
                                   block.bitmap_size, block.page_count()));
      }
      if (block.present_pages > block.page_count()) {
        return corrupt(fmt::format("RAM block \"{}\" claims {} present pages of {}", block.name,
                                   block.present_pages, block.page_count()));
      }
    }
    blocks.push_back(std::move(block));
  }
  if (d.remaining() != 0) {
    return corrupt(fmt::format("{} stray bytes after the RAM block table", d.remaining()));
  }
  return blocks;
}

std::array<uint8_t, kPageRunSize> encode_page_run(const PageRun& run) {
  std::array<uint8_t, kPageRunSize> bytes{};
  store_le(bytes.data(), run.block_index, 4);
  store_le(bytes.data() + 4, run.kind, 4);
  store_le(bytes.data() + 8, run.first_page, 8);
  store_le(bytes.data() + 16, run.page_count, 8);
  return bytes;
}

PageRun decode_page_run(std::span<const uint8_t, kPageRunSize> bytes) {
  return PageRun{static_cast<uint32_t>(load_le(bytes.data(), 4)),
                 static_cast<uint32_t>(load_le(bytes.data() + 4, 4)), load_le(bytes.data() + 8, 8),
                 load_le(bytes.data() + 16, 8)};
}

Result<void> check_block_shapes(std::span<const BlockShape> blocks) {
  if (blocks.empty()) {
    return Error(ErrorKind::kInvalidArgument, "no RAM blocks to migrate");
  }
  if (blocks.size() > kMaxBlocks) {
    return Error(ErrorKind::kInvalidArgument,
                 fmt::format("too many RAM blocks ({}, at most {})", blocks.size(), kMaxBlocks));
  }
  std::set<std::string> names;
  for (const BlockShape& block : blocks) {
    if (auto problem = shape_problem(block.name, block.page_size, block.length)) {
      return Error(ErrorKind::kInvalidArgument, *problem);
    }
    if (!names.insert(block.name).second) {
      return Error(ErrorKind::kInvalidArgument,
                   fmt::format("RAM block name \"{}\" is used twice", block.name));
    }
    if (block.page_size != blocks[0].page_size) {
      return Error(ErrorKind::kInvalidArgument,
                   fmt::format("RAM block \"{}\": page size {} differs from the first block's {}",
                               block.name, block.page_size, blocks[0].page_size));
    }
  }
  return ok();
}

MappedRamLayout plan_mapped_ram_layout(std::span<const BlockShape> blocks, uint64_t base_offset) {
  MappedRamLayout layout;
  layout.table_offset = base_offset + kHeaderSize;
  for (const BlockShape& shape : blocks) {
    BlockRecord record;
    record.name = shape.name;
    record.length = shape.length;
    record.page_size = shape.page_size;
    record.bitmap_size = bitmap_bytes(record.page_count());
    layout.blocks.push_back(std::move(record));
  }
  // The table's size does not depend on the offsets it holds.
  layout.table_size = kSectionFrameSize + encode_block_table(layout.blocks).size();
  uint64_t next = align_up(layout.table_offset + layout.table_size, 8);
  for (BlockRecord& record : layout.blocks) {
    record.bitmap_offset = next;
    next += record.bitmap_size;
  }
  for (BlockRecord& record : layout.blocks) {
    record.pages_offset = align_up(next, kPagesAlignment);
    next = record.pages_offset + record.length;
  }
  layout.trailer_offset = next;
  return layout;
}

Result<void> check_mapped_ram_layout(const FileHeader& header, uint64_t table_end,
                                     std::span<const BlockRecord> blocks, uint64_t file_size) {
  if (header.end_offset > file_size) {
    return corrupt(fmt::format("the file is truncated: it ends at {:#x}, the stream at {:#x}",
                               file_size, header.end_offset));
  }
  if (header.trailer_offset > header.end_offset) {
    return corrupt(fmt::format("trailer offset {:#x} is past the end offset {:#x}",
                               header.trailer_offset, header.end_offset));
  }
  uint64_t bitmaps_end = table_end;
  for (const BlockRecord& block : blocks) {
    if (block.bitmap_offset < table_end || block.bitmap_offset > file_size ||
        block.bitmap_size > file_size - block.bitmap_offset) {
      return corrupt(
          fmt::format("RAM block \"{}\": bitmap at {:#x} (+{:#x}) is outside the file "
                      "metadata (which ends at {:#x} in a {:#x}-byte file)",
                      block.name, block.bitmap_offset, block.bitmap_size, table_end, file_size));
    }
    bitmaps_end = std::max(bitmaps_end, block.bitmap_offset + block.bitmap_size);
  }
  uint64_t previous_end = bitmaps_end;
  for (const BlockRecord& block : blocks) {
    if (block.pages_offset % kPagesAlignment != 0) {
      return corrupt(fmt::format("RAM block \"{}\": pages offset {:#x} is not 1 MiB-aligned",
                                 block.name, block.pages_offset));
    }
    if (block.pages_offset < previous_end) {
      return corrupt(
          fmt::format("RAM block \"{}\": pages at {:#x} overlap the metadata or the "
                      "previous block (which end at {:#x})",
                      block.name, block.pages_offset, previous_end));
    }
    if (block.pages_offset > header.trailer_offset ||
        block.length > header.trailer_offset - block.pages_offset) {
      return corrupt(
          fmt::format("RAM block \"{}\": pages at {:#x} (+{:#x}) run past the trailer "
                      "at {:#x}",
                      block.name, block.pages_offset, block.length, header.trailer_offset));
    }
    previous_end = block.pages_offset + block.length;
  }
  return ok();
}

}  // namespace strata::migration
