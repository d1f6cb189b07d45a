// The stream's encoders and decoders: CRC-32C, header, sections, block table, mapped-ram layout.

#include "migration/format.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "migration/crc32c.h"

namespace strata::migration {
namespace {

std::span<const uint8_t> bytes_of(const std::string& text) {
  return {reinterpret_cast<const uint8_t*>(text.data()), text.size()};
}

TEST(Crc32cTest, KnownVectorsAndExtension) {
  EXPECT_EQ(crc32c(bytes_of("123456789")), 0xE3069283u);
  EXPECT_EQ(crc32c(bytes_of("")), 0u);
  std::string long_text(1000, 'x');
  long_text += "tail bytes";
  uint32_t whole = crc32c(bytes_of(long_text));
  uint32_t split =
      crc32c_extend(crc32c(bytes_of(long_text.substr(0, 333))), bytes_of(long_text.substr(333)));
  EXPECT_EQ(whole, split);
}

FileHeader sample_header() {
  FileHeader header;
  header.capabilities = kCapMappedRam;
  header.block_count = 2;
  header.ram_total = 3 << 20;
  header.base_offset = 4096;
  header.trailer_offset = 5 << 20;
  header.end_offset = (5 << 20) + 24;
  header.writer_flags = kWrittenWithMultifd;
  header.multifd_channels = 4;
  return header;
}

TEST(FormatTest, HeaderRoundTrip) {
  auto bytes = encode_header(sample_header());
  EXPECT_EQ(std::string(bytes.begin(), bytes.begin() + 8), "STRATAVM");
  auto decoded = decode_header(bytes);
  ASSERT_TRUE(decoded.ok()) << decoded.error().message();
  EXPECT_EQ(decoded->ram_total, 3u << 20);
  EXPECT_EQ(decoded->base_offset, 4096u);
  EXPECT_EQ(decoded->multifd_channels, 4u);
  EXPECT_TRUE(decoded->mapped_ram());
}

TEST(FormatTest, HeaderRejectsDamage) {
  auto bytes = encode_header(sample_header());
  auto flipped = bytes;
  flipped[30] ^= 1;
  auto result = decode_header(flipped);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.error().message(), "header checksum mismatch");

  std::array<uint8_t, kHeaderSize> zeros{};
  result = decode_header(zeros);
  ASSERT_FALSE(result.ok());
  EXPECT_NE(result.error().message().find("zeroed"), std::string::npos);

  result = decode_header(std::span<const uint8_t>(bytes).first(40));
  ASSERT_FALSE(result.ok());
  EXPECT_NE(result.error().message().find("too short"), std::string::npos);
}

TEST(FormatTest, HeaderRejectsUnknownCapabilityAndVersion) {
  FileHeader header = sample_header();
  header.capabilities |= 1u << 7;
  auto result = decode_header(encode_header(header));
  ASSERT_FALSE(result.ok());
  EXPECT_NE(result.error().message().find("unknown capability"), std::string::npos);

  header = sample_header();
  header.version = 2;
  result = decode_header(encode_header(header));
  ASSERT_FALSE(result.ok());
  EXPECT_NE(result.error().message().find("version 2"), std::string::npos);
}

TEST(FormatTest, BlockTableRoundTripAndDamage) {
  std::vector<BlockShape> shapes = {{"pc.ram", 4 << 20, 4096}, {"vga.vram", 1 << 20, 4096}};
  MappedRamLayout layout = plan_mapped_ram_layout(shapes, 0);
  auto payload = encode_block_table(layout.blocks);
  auto decoded = decode_block_table(payload, 2, true);
  ASSERT_TRUE(decoded.ok()) << decoded.error().message();
  EXPECT_EQ((*decoded)[1].name, "vga.vram");
  EXPECT_EQ((*decoded)[1].pages_offset, layout.blocks[1].pages_offset);

  EXPECT_FALSE(decode_block_table(payload, 3, true).ok());
  auto cut = std::vector<uint8_t>(payload.begin(), payload.end() - 3);
  EXPECT_FALSE(decode_block_table(cut, 2, true).ok());
  auto longer = payload;
  longer.push_back(0);
  EXPECT_FALSE(decode_block_table(longer, 2, true).ok());
}

TEST(FormatTest, LayoutAlignsPagesToAbsoluteMebibytes) {
  std::vector<BlockShape> shapes = {{"a", 3 << 20, 4096}, {"b", 12288, 4096}, {"c", 1 << 20, 4096}};
  for (uint64_t base : {uint64_t{0}, uint64_t{4096}, uint64_t{(1 << 20) - 100}}) {
    MappedRamLayout layout = plan_mapped_ram_layout(shapes, base);
    EXPECT_EQ(layout.table_offset, base + kHeaderSize);
    uint64_t previous_end = layout.table_offset + layout.table_size;
    for (const BlockRecord& block : layout.blocks) {
      EXPECT_GE(block.bitmap_offset, layout.table_offset + layout.table_size);
      EXPECT_EQ(block.pages_offset % kPagesAlignment, 0u);
      EXPECT_GE(block.pages_offset, previous_end);
      previous_end = block.pages_offset + block.length;
    }
    EXPECT_EQ(layout.trailer_offset, previous_end);
    FileHeader header = sample_header();
    header.base_offset = base;
    header.trailer_offset = layout.trailer_offset;
    header.end_offset = layout.trailer_offset + 24;
    EXPECT_TRUE(check_mapped_ram_layout(header, layout.table_offset + layout.table_size,
                                        layout.blocks, header.end_offset)
                    .ok());
  }
}

TEST(FormatTest, BlockShapesAreChecked) {
  EXPECT_TRUE(check_block_shapes(std::vector<BlockShape>{{"a", 8192, 4096}}).ok());
  EXPECT_FALSE(check_block_shapes(std::vector<BlockShape>{}).ok());
  EXPECT_FALSE(check_block_shapes(std::vector<BlockShape>{{"", 8192, 4096}}).ok());
  EXPECT_FALSE(check_block_shapes(std::vector<BlockShape>{{"a", 8191, 4096}}).ok());
  EXPECT_FALSE(check_block_shapes(std::vector<BlockShape>{{"a", 8192, 3000}}).ok());
  EXPECT_FALSE(
      check_block_shapes(std::vector<BlockShape>{{"a", 8192, 4096}, {"a", 8192, 4096}}).ok());
  EXPECT_FALSE(
      check_block_shapes(std::vector<BlockShape>{{"a", 8192, 4096}, {"b", 16384, 8192}}).ok());
}

TEST(FormatTest, SectionCrcCoversTypeLengthAndPayload) {
  std::vector<uint8_t> payload = {1, 2, 3};
  auto section = encode_section(kSectionDaemonState, payload);
  ASSERT_EQ(section.size(), kSectionFrameSize + 3);
  SectionFrame frame =
      decode_frame(std::span<const uint8_t, kSectionFrameSize>(section.data(), 16));
  EXPECT_EQ(frame.type, kSectionDaemonState);
  EXPECT_EQ(frame.length, 3u);
  std::span<const uint8_t> parts[] = {payload};
  EXPECT_EQ(section_crc(frame.type, frame.length, parts), frame.crc);
  EXPECT_NE(section_crc(kSectionDirtyBitmaps, frame.length, parts), frame.crc);
}

}  // namespace
}  // namespace strata::migration
