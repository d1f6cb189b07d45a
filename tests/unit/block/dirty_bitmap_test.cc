// The dirty bitmap core (block/bitmap) and the qcow2 bitmap directory format
// (block/drivers/qcow2/bitmaps.h).

#include "block/bitmap/dirty_bitmap.h"

#include <gtest/gtest.h>

#include "block/drivers/qcow2/bitmaps.h"

namespace strata::block {
namespace {

using bitmap::BitmapSet;
using bitmap::DirtyBitmap;

TEST(DirtyBitmapTest, SetResetTestAndCountWorkInGranularityChunks) {
  DirtyBitmap b("b", 10 * 65536 + 100, 65536);
  EXPECT_EQ(b.bit_count(), 11u);
  b.set(65536 + 1, 1);  // one byte dirties its whole chunk
  EXPECT_TRUE(b.test(65536));
  EXPECT_TRUE(b.test(2 * 65536 - 1));
  EXPECT_FALSE(b.test(2 * 65536));
  EXPECT_EQ(b.count(), 65536u);
  b.set(3 * 65536 - 1, 2);  // straddles chunks 2 and 3
  EXPECT_EQ(b.count(), 3u * 65536);
  b.set(10 * 65536 + 50, 1000);  // clamped to the size
  EXPECT_TRUE(b.test(10 * 65536 + 99));
  EXPECT_FALSE(b.test(10 * 65536 + 100));  // past the end
  b.reset(2 * 65536, 65536);
  EXPECT_FALSE(b.test(2 * 65536));
  EXPECT_TRUE(b.test(3 * 65536));
  b.clear();
  EXPECT_EQ(b.count(), 0u);
}

TEST(DirtyBitmapTest, NextDirtyAndNextZeroIterateAcrossWords) {
  DirtyBitmap b("b", uint64_t{300} * 512, 512);
  b.set(70 * 512, 3 * 512);
  b.set(200 * 512, 512);
  EXPECT_EQ(b.next_dirty(0), 70u * 512);
  EXPECT_EQ(b.next_dirty(71 * 512 + 7), 71u * 512 + 7);
  EXPECT_EQ(b.next_zero(70 * 512), 73u * 512);
  EXPECT_EQ(b.next_dirty(73 * 512), 200u * 512);
  EXPECT_EQ(b.next_dirty(201 * 512), std::nullopt);
  b.set(0, 300 * 512);
  EXPECT_EQ(b.next_zero(0), std::nullopt);
}

TEST(DirtyBitmapTest, SerialisationIsLeastSignificantBitFirstAndRoundTrips) {
  DirtyBitmap b("b", 64 * 4096, 4096);
  b.set(0, 1);
  b.set(9 * 4096, 1);
  b.set(63 * 4096, 1);
  std::vector<uint8_t> bytes(b.serialization_size(0, b.size()));
  ASSERT_EQ(bytes.size(), 8u);
  b.serialize_part(bytes, 0, b.size());
  EXPECT_EQ(bytes[0], 0x01);
  EXPECT_EQ(bytes[1], 0x02);
  EXPECT_EQ(bytes[7], 0x80);

  DirtyBitmap copy("c", 64 * 4096, 4096);
  copy.set(5 * 4096, 1);  // replaced by the deserialised bits
  copy.deserialize_part(bytes, 0, copy.size());
  EXPECT_EQ(copy.count(), 3u * 4096);
  EXPECT_TRUE(copy.test(9 * 4096));
  EXPECT_FALSE(copy.test(5 * 4096));
  // A later part of the bitmap serialises from its own first bit.
  std::vector<uint8_t> tail(b.serialization_size(8 * 4096, 56 * 4096));
  b.serialize_part(tail, 8 * 4096, 56 * 4096);
  EXPECT_EQ(tail[0], 0x02);
}

TEST(DirtyBitmapTest, MergeCoversSourceChunksAtTheTargetGranularity) {
  DirtyBitmap target("t", 1 << 20, 65536);
  DirtyBitmap source("s", 1 << 20, 512);
  source.set(65536 + 512, 512);
  source.set(5 * 65536, 2 * 65536);
  target.merge_from(source);
  EXPECT_TRUE(target.test(65536));
  EXPECT_TRUE(target.test(5 * 65536));
  EXPECT_TRUE(target.test(6 * 65536));
  EXPECT_EQ(target.count(), 3u * 65536);
}

TEST(BitmapSetTest, MarkDirtyReachesOnlyEnabledBitmapsAndNamesAreChecked) {
  BitmapSet set;
  set.add(std::make_unique<DirtyBitmap>("a", 1 << 20, 65536));
  set.add(std::make_unique<DirtyBitmap>("b", 1 << 20, 65536)).set_enabled(false);
  set.mark_dirty(0, 1);
  EXPECT_EQ(set.find("a")->count(), 65536u);
  EXPECT_EQ(set.find("b")->count(), 0u);
  EXPECT_EQ(bitmap::check_new_bitmap(set, "a", 65536).error().message(),
            "Bitmap already exists: a");
  EXPECT_EQ(bitmap::check_new_bitmap(set, "", 65536).error().message(),
            "Bitmap name cannot be empty");
  EXPECT_EQ(bitmap::check_new_bitmap(set, "c", 1000).error().message(),
            "Granularity must be power of 2 and at least 512");
  EXPECT_TRUE(bitmap::check_new_bitmap(set, "c", 512));
  set.remove("a");
  EXPECT_EQ(set.find("a"), nullptr);
}

// ---- qcow2 bitmap directory ----------------------------------------------------------------

using qcow2::BitmapDirectoryEntry;

std::vector<BitmapDirectoryEntry> two_entries() {
  BitmapDirectoryEntry a;
  a.table_offset = 0x30000;
  a.table_size = 1;
  a.flags = qcow2::kBitmapFlagAuto;
  a.granularity_bits = 16;
  a.name = "first";
  BitmapDirectoryEntry b = a;
  b.table_offset = 0x40000;
  b.flags = qcow2::kBitmapFlagInUse;
  b.granularity_bits = 9;
  b.name = "second-bitmap";
  return {a, b};
}

TEST(Qcow2BitmapDirectoryTest, SerialisedDirectoryParsesBack) {
  const auto entries = two_entries();
  const std::vector<uint8_t> bytes = qcow2::serialize_bitmap_directory(entries);
  EXPECT_EQ(bytes.size(), 32u + 40u);  // 24 + 5 -> 32, 24 + 13 -> 40
  EXPECT_EQ(bytes[16], 1);             // type: dirty tracking
  auto parsed = qcow2::parse_bitmap_directory(bytes, 2, 65536, 1 << 20);
  ASSERT_TRUE(parsed) << parsed.error().message();
  ASSERT_EQ(parsed->size(), 2u);
  EXPECT_EQ((*parsed)[1].name, "second-bitmap");
  EXPECT_EQ((*parsed)[1].flags, qcow2::kBitmapFlagInUse);
  EXPECT_EQ((*parsed)[0].granularity_bits, 16);
  EXPECT_EQ((*parsed)[0].table_offset, 0x30000u);
}

TEST(Qcow2BitmapDirectoryTest, InconsistentDirectoriesFailWithQemuMessages) {
  auto entries = two_entries();
  std::vector<uint8_t> bytes = qcow2::serialize_bitmap_directory(entries);
  EXPECT_EQ(qcow2::parse_bitmap_directory(bytes, 1, 65536, 1 << 20).error().message(),
            "More bitmaps found than specified in header extension");
  EXPECT_EQ(qcow2::parse_bitmap_directory(bytes, 3, 65536, 1 << 20).error().message(),
            "Less bitmaps found than specified in header extension");
  std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + 40);
  EXPECT_EQ(qcow2::parse_bitmap_directory(cut, 2, 65536, 1 << 20).error().message(),
            "Broken bitmap directory");
  // A consistent bitmap whose table cannot cover the image.
  EXPECT_EQ(qcow2::parse_bitmap_directory(bytes, 2, 512, uint64_t{1} << 40).error().message(),
            "Bitmap 'first' doesn't satisfy the constraints");
  entries[0].granularity_bits = 32;
  bytes = qcow2::serialize_bitmap_directory(entries);
  EXPECT_EQ(qcow2::parse_bitmap_directory(bytes, 2, 65536, 1 << 20).error().message(),
            "Bitmap 'first' doesn't satisfy the constraints");
  entries = two_entries();
  bytes = qcow2::serialize_bitmap_directory(entries);
  bytes[23] = 8;  // extra data
  EXPECT_EQ(qcow2::parse_bitmap_directory(bytes, 2, 65536, 1 << 20).error().message(),
            "Bitmap extra data is not supported");
}

TEST(Qcow2BitmapDirectoryTest, TableEntriesAndConstraints) {
  EXPECT_TRUE(qcow2::bitmap_table_entry_valid(0, 65536));
  EXPECT_TRUE(qcow2::bitmap_table_entry_valid(1, 65536));  // all ones, no offset
  EXPECT_TRUE(qcow2::bitmap_table_entry_valid(0x50000, 65536));
  EXPECT_FALSE(qcow2::bitmap_table_entry_valid(0x50001, 65536));
  EXPECT_FALSE(qcow2::bitmap_table_entry_valid(0x50200, 65536));
  EXPECT_FALSE(qcow2::bitmap_table_entry_valid(2, 65536));
  EXPECT_EQ(qcow2::check_bitmap_constraints("x", 256, 1 << 20, 65536).error().message(),
            "Granularity is under minimum (512 bytes)");
  EXPECT_EQ(
      qcow2::check_bitmap_constraints("x", uint64_t{1} << 32, 1 << 20, 65536).error().message(),
      "Granularity exceeds maximum (2147483648 bytes)");
  EXPECT_EQ(qcow2::check_bitmap_constraints(std::string(1024, 'n'), 65536, 1 << 20, 65536)
                .error()
                .message(),
            "Name length exceeds maximum (1023 characters)");
  EXPECT_TRUE(qcow2::check_bitmap_constraints("x", 65536, 1 << 20, 65536));
}

}  // namespace
}  // namespace strata::block
