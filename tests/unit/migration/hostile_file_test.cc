// Hostile and damaged files (T5.5): every one fails to load with a clear error, and a mapped-ram
// file's damage is found before the destination's memory is touched.

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>

#include "migration/format.h"
#include "migration/stream.h"
#include "migration/vmstate_file.h"
#include "migration/wire.h"
#include "test_memory.h"

namespace strata::migration {
namespace {

using testing::Guest;
using testing::TempDir;

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

class HostileFileTest : public ::testing::Test {
 protected:
  HostileFileTest() : source_({{"pc.ram", 4 << 20}, {"vga.vram", 1 << 20}}, 17) {}

  void SetUp() override {
    TransferOptions options;
    options.multifd_channels = 2;
    auto saved = save_to_file(source_.blocks(), path_, options);
    ASSERT_TRUE(saved.ok()) << saved.error().message();
    bytes_ = read_bytes(path_);
    auto header = decode_header(bytes_);
    ASSERT_TRUE(header.ok());
    header_ = *header;
  }

  // Rewrites the block table through `edit`, with a valid checksum.
  void patch_table(const std::function<void(std::vector<BlockRecord>&)>& edit) {
    const size_t at = kHeaderSize;
    uint64_t length = load_le(bytes_.data() + at + 8, 8);
    auto blocks =
        decode_block_table(std::span<const uint8_t>(bytes_).subspan(at + kSectionFrameSize, length),
                           header_.block_count, true);
    ASSERT_TRUE(blocks.ok()) << blocks.error().message();
    edit(*blocks);
    auto section = encode_section(kSectionRamBlocks, encode_block_table(*blocks));
    ASSERT_EQ(section.size(), kSectionFrameSize + length) << "keep the names' lengths";
    std::copy(section.begin(), section.end(), bytes_.begin() + at);
  }

  void patch_header(const std::function<void(FileHeader&)>& edit) {
    edit(header_);
    auto encoded = encode_header(header_);
    std::copy(encoded.begin(), encoded.end(), bytes_.begin());
  }

  // Loads the damaged bytes into a destination filled with 0xAA; returns the error text. Unless
  // the damage only shows against a destination, describe_file must refuse the file too.
  std::string load_error(bool file_is_damaged = true) {
    write_bytes(path_, bytes_);
    Guest destination = source_.empty_twin();
    TransferOptions options;
    options.multifd_channels = 2;
    auto loaded = load_from_file(destination.blocks(), path_, options);
    EXPECT_FALSE(loaded.ok());
    {
      for (const RamBlock& block : destination.blocks()) {
        for (uint64_t i = 0; i < block.length; ++i) {
          if (block.host[i] != 0xAA) {
            ADD_FAILURE() << "the destination was written before the error, at " << block.name
                          << "+" << i;
            break;
          }
        }
      }
    }
    auto described = describe_file(path_, 0, true);
    EXPECT_EQ(described.ok(), !file_is_damaged);
    return loaded.ok() ? std::string() : loaded.error().message();
  }

  TempDir dir_;
  std::string path_ = dir_.file("vm.state");
  Guest source_;
  std::vector<uint8_t> bytes_;
  FileHeader header_;
};

TEST_F(HostileFileTest, UntouchedFileLoads) {
  Guest destination = source_.empty_twin();
  ASSERT_TRUE(load_from_file(destination.blocks(), path_, TransferOptions{}).ok());
  EXPECT_TRUE(destination.same_as(source_));
}

TEST_F(HostileFileTest, Truncated) {
  const std::vector<uint8_t> whole = bytes_;
  for (size_t size : {size_t{0}, size_t{10}, size_t{kHeaderSize + 20}, size_t{300},
                      size_t{(1 << 20) + 5000}, whole.size() - 30, whole.size() - 1}) {
    bytes_.assign(whole.begin(), whole.begin() + static_cast<ptrdiff_t>(size));
    std::string error = load_error();
    EXPECT_FALSE(error.empty()) << "size " << size;
    EXPECT_EQ(error.find("Failed to load '" + path_ + "': "), 0u) << error;
  }
  bytes_.assign(whole.begin(), whole.end() - 30);
  EXPECT_NE(load_error().find("truncated"), std::string::npos);
}

TEST_F(HostileFileTest, ZeroedHeader) {
  std::fill(bytes_.begin(), bytes_.begin() + kHeaderSize, 0);
  EXPECT_NE(load_error().find("the header is zeroed"), std::string::npos);
}

TEST_F(HostileFileTest, FlippedBitsAreCaughtByChecksums) {
  const std::vector<uint8_t> whole = bytes_;
  bytes_[kHeaderSize + kSectionFrameSize + 20] ^= 0x10;  // inside the block table
  EXPECT_NE(load_error().find("ram-blocks section at 0x50: checksum mismatch"), std::string::npos);
  bytes_ = whole;
  auto bitmap_at = bytes_.begin() + kHeaderSize + 200;  // inside the first bitmap
  *bitmap_at ^= 0x01;
  EXPECT_NE(load_error().find("bitmap checksum mismatch"), std::string::npos);
  bytes_ = whole;
  bytes_[header_.trailer_offset + 17] ^= 1;  // END's payload
  EXPECT_NE(load_error().find("end section at"), std::string::npos);
}

TEST_F(HostileFileTest, BitmapBeyondTheEnd) {
  patch_table(
      [&](std::vector<BlockRecord>& blocks) { blocks[1].bitmap_offset = bytes_.size() - 8; });
  EXPECT_NE(load_error().find("bitmap at"), std::string::npos);
}

TEST_F(HostileFileTest, PresentCountDisagreesWithBitmap) {
  patch_table([](std::vector<BlockRecord>& blocks) { blocks[0].present_pages += 1; });
  EXPECT_NE(load_error().find("the table says"), std::string::npos);
}

TEST_F(HostileFileTest, UnalignedPagesOffset) {
  patch_table([](std::vector<BlockRecord>& blocks) { blocks[1].pages_offset += 4096; });
  EXPECT_NE(load_error().find("is not 1 MiB-aligned"), std::string::npos);
}

TEST_F(HostileFileTest, OverlappingPagesRegions) {
  patch_table([](std::vector<BlockRecord>& blocks) {
    blocks[1].pages_offset = blocks[0].pages_offset + (1 << 20);
  });
  EXPECT_NE(load_error().find("overlap"), std::string::npos);
}

TEST_F(HostileFileTest, PagesPastTheTrailer) {
  patch_table([](std::vector<BlockRecord>& blocks) { blocks[1].pages_offset += 1 << 20; });
  EXPECT_NE(load_error().find("run past the trailer"), std::string::npos);
}

TEST_F(HostileFileTest, UnknownBlockName) {
  patch_table([](std::vector<BlockRecord>& blocks) { blocks[1].name = "vga.xram"; });
  EXPECT_NE(load_error(false).find("Unknown RAM block \"vga.xram\", cannot accept migration"),
            std::string::npos);
}

TEST_F(HostileFileTest, WrongBlockLengths) {
  // The file's table and header disagree.
  patch_table([](std::vector<BlockRecord>& blocks) { blocks[1].length = 512 << 10; });
  EXPECT_NE(load_error().find("bitmap for"), std::string::npos);
}

TEST_F(HostileFileTest, DestinationOfAnotherSize) {
  write_bytes(path_, bytes_);
  Guest other({{"pc.ram", 4 << 20}, {"vga.vram", 2 << 20}}, 1);
  auto loaded = load_from_file(other.blocks(), path_, TransferOptions{});
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.error().message().find("Length mismatch: vga.vram: 0x100000 in != 0x200000"),
            std::string::npos);
  Guest fewer({{"pc.ram", 4 << 20}}, 1);
  loaded = load_from_file(fewer.blocks(), path_, TransferOptions{});
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.error().message().find("Unknown RAM block \"vga.vram\""), std::string::npos);
  Guest more({{"pc.ram", 4 << 20}, {"vga.vram", 1 << 20}, {"pc.bios", 4096}}, 1);
  loaded = load_from_file(more.blocks(), path_, TransferOptions{});
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.error().message().find("\"pc.bios\" is missing"), std::string::npos);
}

TEST_F(HostileFileTest, HeaderClaimsMoreBlocks) {
  patch_header([](FileHeader& header) { header.block_count = 3; });
  EXPECT_NE(load_error().find("lists 2 blocks, the header 3"), std::string::npos);
}

TEST_F(HostileFileTest, EndOffsetPastTheFile) {
  patch_header([&](FileHeader& header) { header.end_offset = bytes_.size() + 100; });
  EXPECT_NE(load_error().find("the file is truncated"), std::string::npos);
}

// Appends `section` before END in the trailer, keeping every checksum valid.
void add_trailer_section(std::vector<uint8_t>& bytes, FileHeader& header, uint32_t type) {
  bytes.resize(header.trailer_offset);
  std::vector<uint8_t> payload = {'n', 'e', 'w'};
  auto section = encode_section(type, payload);
  bytes.insert(bytes.end(), section.begin(), section.end());
  std::array<uint8_t, kEndPayloadSize> count{};
  store_le(count.data(), 2, 8);
  auto end = encode_section(kSectionEnd, count);
  bytes.insert(bytes.end(), end.begin(), end.end());
  header.end_offset = bytes.size();
  auto encoded = encode_header(header);
  std::copy(encoded.begin(), encoded.end(), bytes.begin());
}

TEST_F(HostileFileTest, UnknownSectionFailsUnlessSkippable) {
  const std::vector<uint8_t> whole = bytes_;
  add_trailer_section(bytes_, header_, 0x55);
  EXPECT_NE(load_error().find("unknown section type 0x55"), std::string::npos);

  bytes_ = whole;
  add_trailer_section(bytes_, header_, kSectionSkippable | 0x55);
  write_bytes(path_, bytes_);
  Guest destination = source_.empty_twin();
  auto loaded = load_from_file(destination.blocks(), path_, TransferOptions{});
  ASSERT_TRUE(loaded.ok()) << loaded.error().message();
  EXPECT_TRUE(destination.same_as(source_));
  auto described = describe_file(path_, 0, false);
  ASSERT_TRUE(described.ok());
  EXPECT_EQ(described->sections.size(), 3u);
}

TEST(HostileStreamTest, TruncatedAndDamagedStreams) {
  TempDir dir;
  const std::string path = dir.file("vm.stream");
  Guest source({{"pc.ram", 2 << 20}}, 23);
  TransferOptions options;
  options.mapped_ram = false;
  ASSERT_TRUE(save_to_file(source.blocks(), path, options).ok());
  const std::vector<uint8_t> whole = read_bytes(path);
  Guest destination = source.empty_twin();

  std::vector<uint8_t> cut(whole.begin(), whole.end() - 5);
  write_bytes(path, cut);
  auto loaded = load_from_file(destination.blocks(), path, options);
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.error().message().find("stream truncated"), std::string::npos);

  std::vector<uint8_t> flipped = whole;
  flipped[whole.size() / 2] ^= 0x40;  // page data
  write_bytes(path, flipped);
  loaded = load_from_file(destination.blocks(), path, options);
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.error().message().find("checksum mismatch"), std::string::npos);
  EXPECT_FALSE(describe_file(path, 0, false).ok());
}

}  // namespace
}  // namespace strata::migration

namespace strata::migration {
namespace {

class VectorSink : public ByteSink {
 public:
  Result<void> write(std::span<const uint8_t> data) override {
    bytes.insert(bytes.end(), data.begin(), data.end());
    return ok();
  }
  std::vector<uint8_t> bytes;
};

class VectorSource : public ByteSource {
 public:
  explicit VectorSource(const std::vector<uint8_t>& bytes) : bytes_(bytes) {}
  Result<void> read(std::span<uint8_t> buffer) override {
    if (buffer.size() > bytes_.size() - position_) {
      return Error(ErrorKind::kCorrupt, "stream truncated");
    }
    std::memcpy(buffer.data(), bytes_.data() + position_, buffer.size());
    position_ += buffer.size();
    return ok();
  }

 private:
  const std::vector<uint8_t>& bytes_;
  size_t position_ = 0;
};

// The offsets of the sections of a streaming-form stream.
std::vector<size_t> section_offsets(const std::vector<uint8_t>& bytes) {
  std::vector<size_t> offsets;
  for (size_t at = kHeaderSize; at + kSectionFrameSize <= bytes.size();) {
    offsets.push_back(at);
    at += kSectionFrameSize + load_le(bytes.data() + at + 8, 8);
  }
  return offsets;
}

// Rewrites END's count of sections before it.
void set_end_count(std::vector<uint8_t>& bytes, uint64_t count) {
  std::array<uint8_t, kEndPayloadSize> payload{};
  store_le(payload.data(), count, 8);
  auto end = encode_section(kSectionEnd, payload);
  std::copy(end.begin(), end.end(), bytes.end() - static_cast<ptrdiff_t>(end.size()));
}

TEST(HostileStreamTest, EveryPageMustBeCovered) {
  Guest source({{"pc.ram", 64 << 20}}, 29, 3);
  VectorSink sink;
  ASSERT_TRUE(save_to_stream(source.blocks(), sink, 0, TransferOptions{}).ok());
  auto offsets = section_offsets(sink.bytes);
  ASSERT_GT(offsets.size(), 4u);

  // Drop the second ram-pages section (and fix END's count): its pages are never covered.
  std::vector<uint8_t> dropped(sink.bytes.begin(),
                               sink.bytes.begin() + static_cast<ptrdiff_t>(offsets[2]));
  dropped.insert(dropped.end(), sink.bytes.begin() + static_cast<ptrdiff_t>(offsets[3]),
                 sink.bytes.end());
  set_end_count(dropped, offsets.size() - 2);
  Guest destination = source.empty_twin();
  VectorSource missing(dropped);
  auto loaded = load_from_stream(destination.blocks(), missing, TransferOptions{});
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.error().message().find("the stream ended without page"), std::string::npos)
      << loaded.error().message();

  // Sending a run twice is fine (a later pass may resend pages): the stream still loads.
  std::vector<uint8_t> twice(sink.bytes.begin(), sink.bytes.end() - 24);
  twice.insert(twice.end(), sink.bytes.begin() + static_cast<ptrdiff_t>(offsets[1]),
               sink.bytes.begin() + static_cast<ptrdiff_t>(offsets[2]));
  twice.insert(twice.end(), sink.bytes.end() - 24, sink.bytes.end());
  set_end_count(twice, offsets.size());
  VectorSource repeated(twice);
  loaded = load_from_stream(destination.blocks(), repeated, TransferOptions{});
  ASSERT_TRUE(loaded.ok()) << loaded.error().message();
  EXPECT_TRUE(destination.same_as(source));

  // Without END the stream is truncated.
  std::vector<uint8_t> no_end(sink.bytes.begin(), sink.bytes.end() - 24);
  VectorSource cut(no_end);
  loaded = load_from_stream(destination.blocks(), cut, TransferOptions{});
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.error().message(), "stream truncated");
}

}  // namespace
}  // namespace strata::migration
