// Reading and checking everything of a mapped-ram file but the pages: what the loader validates
// before it touches the destination, and what `strata vmstate info|verify` reports.

#include <fmt/format.h>

#include <algorithm>

#include "migration/crc32c.h"
#include "migration/internal.h"
#include "migration/wire.h"

namespace strata::migration::internal {

namespace {

Error corrupt(std::string message) {
  return Error(ErrorKind::kCorrupt, std::move(message));
}

// Reads the section at `offset`, which must end by `limit`; checks its CRC.
Result<std::vector<uint8_t>> read_section(int fd, uint64_t offset, uint64_t limit,
                                          SectionFrame& frame) {
  if (offset > limit || limit - offset < kSectionFrameSize) {
    return corrupt(fmt::format("section at {:#x} runs past {:#x}", offset, limit));
  }
  std::array<uint8_t, kSectionFrameSize> head;
  auto got = pread_all(fd, head.data(), head.size(), offset);
  if (!got.ok()) {
    return std::move(got).error();
  }
  frame = decode_frame(head);
  if (frame.length > kMaxMetadataPayload || frame.length > limit - offset - kSectionFrameSize) {
    return corrupt(fmt::format("{} section at {:#x}: length {:#x} runs past {:#x}",
                               section_type_name(frame.type), offset, frame.length, limit));
  }
  std::vector<uint8_t> payload(frame.length);
  got = pread_all(fd, payload.data(), payload.size(), offset + kSectionFrameSize);
  if (!got.ok()) {
    return std::move(got).error();
  }
  std::span<const uint8_t> parts[] = {payload};
  if (section_crc(frame.type, frame.length, parts) != frame.crc) {
    return corrupt(fmt::format("{} section at {:#x}: checksum mismatch",
                               section_type_name(frame.type), offset));
  }
  return payload;
}

}  // namespace

Result<FileHeader> read_file_header(int fd, uint64_t offset, uint64_t file_size) {
  if (offset >= file_size) {
    return corrupt(fmt::format("file too short: no stream at offset {:#x} of a {}-byte file",
                               offset, file_size));
  }
  std::vector<uint8_t> bytes(std::min<uint64_t>(kMaxHeaderSize, file_size - offset));
  auto got = pread_all(fd, bytes.data(), bytes.size(), offset);
  if (!got.ok()) {
    return std::move(got).error();
  }
  auto header = decode_header(bytes);
  if (!header.ok()) {
    return header;
  }
  if (header->mapped_ram() && header->base_offset != offset) {
    return corrupt(fmt::format("the stream was saved at offset {:#x}, not {:#x}",
                               header->base_offset, offset));
  }
  return header;
}

Result<MappedRamMetadata> read_mapped_ram_metadata(int fd, const FileHeader& header,
                                                   uint64_t file_size) {
  MappedRamMetadata meta;
  meta.header = header;
  meta.file_size = file_size;
  const uint64_t table_offset = header.base_offset + header.header_size;
  SectionFrame frame;
  auto table = read_section(fd, table_offset, file_size, frame);
  if (!table.ok()) {
    return std::move(table).error();
  }
  if (frame.type != kSectionRamBlocks) {
    return corrupt(
        fmt::format("expected the ram-blocks section after the header, found type {}", frame.type));
  }
  const uint64_t table_end = table_offset + kSectionFrameSize + frame.length;
  meta.sections.push_back(SectionSummary{frame.type, table_offset, frame.length});
  auto blocks = decode_block_table(*table, header.block_count, true);
  if (!blocks.ok()) {
    return std::move(blocks).error();
  }
  meta.blocks = std::move(*blocks);
  uint64_t ram_total = 0;
  for (const BlockRecord& block : meta.blocks) {
    if (block.page_size != header.page_size) {
      return corrupt(fmt::format("RAM block \"{}\": page size {} differs from the header's {}",
                                 block.name, block.page_size, header.page_size));
    }
    ram_total += block.length;
  }
  if (ram_total != header.ram_total) {
    return corrupt(fmt::format("the blocks hold {:#x} bytes, the header says {:#x}", ram_total,
                               header.ram_total));
  }
  auto layout = check_mapped_ram_layout(header, table_end, meta.blocks, file_size);
  if (!layout.ok()) {
    return std::move(layout).error();
  }
  meta.metadata_bytes = header.header_size + kSectionFrameSize + frame.length;

  for (const BlockRecord& block : meta.blocks) {
    std::vector<uint8_t> bitmap(block.bitmap_size);
    auto got = pread_all(fd, bitmap.data(), bitmap.size(), block.bitmap_offset);
    if (!got.ok()) {
      return std::move(got).error();
    }
    if (crc32c(bitmap) != block.bitmap_crc) {
      return corrupt(fmt::format("RAM block \"{}\": bitmap checksum mismatch", block.name));
    }
    for (uint64_t bit = block.page_count(); bit < bitmap.size() * 8; ++bit) {
      if (bitmap_test(bitmap, bit)) {
        return corrupt(fmt::format("RAM block \"{}\": bitmap marks page {} past its {} pages",
                                   block.name, bit, block.page_count()));
      }
    }
    if (bitmap_count(bitmap) != block.present_pages) {
      return corrupt(fmt::format("RAM block \"{}\": bitmap has {} pages, the table says {}",
                                 block.name, bitmap_count(bitmap), block.present_pages));
    }
    meta.metadata_bytes += bitmap.size();
    meta.bitmaps.push_back(std::move(bitmap));
  }

  // Trailer: sections from trailer_offset, END last and exactly at end_offset.
  uint64_t position = header.trailer_offset;
  uint64_t sections_before_end = 1;
  while (true) {
    auto payload = read_section(fd, position, header.end_offset, frame);
    if (!payload.ok()) {
      return std::move(payload).error();
    }
    const uint64_t section_offset = position;
    meta.sections.push_back(SectionSummary{frame.type, section_offset, frame.length});
    meta.metadata_bytes += kSectionFrameSize + frame.length;
    position += kSectionFrameSize + frame.length;
    if (frame.type == kSectionEnd) {
      if (frame.length != kEndPayloadSize) {
        return corrupt(fmt::format("end section has a {}-byte payload", frame.length));
      }
      uint64_t counted = load_le(payload->data(), 8);
      if (counted != sections_before_end) {
        return corrupt(fmt::format("end section counts {} sections, the file has {}", counted,
                                   sections_before_end));
      }
      if (position != header.end_offset) {
        return corrupt(fmt::format("end section ends at {:#x}, the header says {:#x}", position,
                                   header.end_offset));
      }
      break;
    }
    if (frame.type == kSectionRamBlocks || frame.type == kSectionRamPages) {
      return corrupt(fmt::format("unexpected {} section in the trailer at {:#x}",
                                 section_type_name(frame.type), section_offset));
    }
    bool known = frame.type == kSectionDirtyBitmaps || frame.type == kSectionDaemonState;
    if (!known && (frame.type & kSectionSkippable) == 0) {
      return corrupt(
          fmt::format("unknown section type {:#x} at {:#x}", frame.type, section_offset));
    }
    ++sections_before_end;
  }
  return meta;
}

}  // namespace strata::migration::internal
