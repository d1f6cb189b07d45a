// Dirty bitmap merges across granularities, the QEMU usability checks, and the HBitmap byte
// view behind x-debug-block-dirty-bitmap-sha256.

#include <gtest/gtest.h>

#include "block/bitmap/dirty_bitmap.h"

namespace strata::block {
namespace {

using bitmap::DirtyBitmap;

TEST(DirtyBitmapMergeTest, FineIntoCoarseDirtiesEveryOverlappedChunk) {
  DirtyBitmap fine("fine", 1 << 20, 512);
  fine.set(65535, 1);      // the last byte of coarse chunk 0
  fine.set(65536 * 3, 1);  // the first byte of chunk 3
  DirtyBitmap coarse("coarse", 1 << 20, 65536);
  coarse.merge_from(fine);
  EXPECT_EQ(coarse.count(), 2u * 65536);
  EXPECT_TRUE(coarse.test(0));
  EXPECT_FALSE(coarse.test(65536));
  EXPECT_TRUE(coarse.test(65536 * 3));
}

TEST(DirtyBitmapMergeTest, CoarseIntoFineDirtiesTheWholeCoarseChunk) {
  DirtyBitmap coarse("coarse", 1 << 20, 65536);
  coarse.set(70000, 1);
  DirtyBitmap fine("fine", 1 << 20, 512);
  fine.merge_from(coarse);
  EXPECT_EQ(fine.count(), 65536u);
  EXPECT_EQ(fine.next_dirty(0), 65536u);
  EXPECT_EQ(fine.next_zero(65536), 131072u);
}

TEST(DirtyBitmapMergeTest, TailChunkShorterThanTheGranularityMergesToTheEnd) {
  const uint64_t size = 65536 * 2 + 1000;  // the last chunk covers 1000 bytes
  DirtyBitmap source("s", size, 512);
  source.set(size - 1, 1);
  DirtyBitmap target("t", size, 65536);
  target.merge_from(source);
  EXPECT_TRUE(target.test(size - 1));
  EXPECT_EQ(target.count(), 65536u);  // counted in whole chunks, as QEMU does
  EXPECT_FALSE(target.next_zero(65536 * 2).has_value());
}

TEST(DirtyBitmapMergeTest, SaveAndRestoreUndoAMerge) {
  DirtyBitmap source("s", 1 << 20, 65536);
  source.set(0, 1 << 20);
  DirtyBitmap target("t", 1 << 20, 65536);
  target.set(65536, 1);
  std::vector<uint64_t> saved = target.save_bits();
  target.merge_from(source);
  EXPECT_EQ(target.count(), uint64_t{1} << 20);
  target.restore_bits(std::move(saved));
  EXPECT_EQ(target.count(), 65536u);
  EXPECT_TRUE(target.test(65536));
}

TEST(DirtyBitmapCheckTest, MessagesAndOrderAreQemus) {
  DirtyBitmap b("b", 1 << 20, 65536);
  EXPECT_TRUE(bitmap::check_bitmap(b, bitmap::kCheckDefault));
  b.set_readonly(true);
  EXPECT_EQ(bitmap::check_bitmap(b, bitmap::kCheckDefault).error().message(),
            "Bitmap 'b' is readonly and cannot be modified");
  EXPECT_TRUE(bitmap::check_bitmap(b, bitmap::kCheckAllowReadonly));
  b.set_busy(true);
  EXPECT_EQ(bitmap::check_bitmap(b, bitmap::kCheckAllowReadonly).error().message(),
            "Bitmap 'b' is currently in use by another operation and cannot be used");
  b.set_busy(false);
  b.set_readonly(false);
  b.set_inconsistent();
  EXPECT_FALSE(b.enabled());  // inconsistent bitmaps stop recording
  EXPECT_EQ(bitmap::check_bitmap(b, bitmap::kCheckAllowReadonly).error().message(),
            "Bitmap 'b' is inconsistent and cannot be used");
  EXPECT_TRUE(bitmap::check_bitmap(b, bitmap::kCheckBusy | bitmap::kCheckReadonly));
}

TEST(DirtyBitmapCheckTest, NameLengthLimitComesAfterTheExistenceCheck) {
  bitmap::BitmapSet set;
  EXPECT_TRUE(bitmap::check_new_bitmap(set, std::string(1023, 'n'), 65536));
  EXPECT_EQ(bitmap::check_new_bitmap(set, std::string(1024, 'n'), 65536).error().message(),
            "Bitmap name too long: " + std::string(1024, 'n'));
}

TEST(DirtyBitmapHbitmapBytesTest, LittleEndianWordsAndAtLeastOne) {
  DirtyBitmap empty("e", 0, 65536);
  EXPECT_EQ(empty.hbitmap_bytes(), std::vector<uint8_t>(8, 0));
  DirtyBitmap b("b", uint64_t{65} * 512, 512);  // 65 chunks: two words
  b.set(0, 1);
  b.set(9 * 512, 1);
  b.set(64 * 512, 1);
  std::vector<uint8_t> expected(16, 0);
  expected[0] = 0x01;
  expected[1] = 0x02;
  expected[8] = 0x01;
  EXPECT_EQ(b.hbitmap_bytes(), expected);
}

TEST(BitmapSetSharingTest, RemovedBitmapStaysAliveForItsHolders) {
  bitmap::BitmapSet set;
  set.add(std::make_unique<DirtyBitmap>("x", 1 << 20, 65536));
  std::shared_ptr<DirtyBitmap> held = set.find_shared("x");
  set.remove("x");
  EXPECT_EQ(set.find("x"), nullptr);
  held->set(0, 1);
  EXPECT_EQ(held->count(), 65536u);
}

}  // namespace
}  // namespace strata::block
