// IoVector keeps up to kInlineEntries entries in the object and moves to the heap past that; both
// layouts, copies, moves and slices must describe the same bytes.

#include "block/io/io_vector.h"

#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

namespace strata::block {
namespace {

// A vector of `n` pieces of 3 bytes each over `storage`.
IoVector pieces(std::vector<uint8_t>& storage, size_t n) {
  storage.resize(n * 3);
  std::iota(storage.begin(), storage.end(), uint8_t{1});
  IoVector v;
  for (size_t i = 0; i < n; ++i) {
    v.append(storage.data() + 3 * i, 3);
  }
  return v;
}

std::vector<uint8_t> bytes_of(const IoVector& v) {
  std::vector<uint8_t> out(v.size());
  EXPECT_EQ(v.copy_to(0, out.data(), out.size()), out.size());
  return out;
}

TEST(IoVectorTest, InlineAndHeapLayoutsHoldTheSameBytes) {
  for (size_t n : {size_t{1}, IoVector::kInlineEntries, IoVector::kInlineEntries + 1, size_t{40}}) {
    std::vector<uint8_t> storage;
    IoVector v = pieces(storage, n);
    EXPECT_EQ(v.count(), n);
    EXPECT_EQ(v.size(), 3 * n);
    EXPECT_EQ(bytes_of(v), storage);
    for (size_t i = 0; i < n; ++i) {
      EXPECT_EQ(v.data()[i].iov_base, storage.data() + 3 * i);
    }
  }
}

TEST(IoVectorTest, CopiesAndMovesKeepTheEntries) {
  for (size_t n : {size_t{2}, size_t{9}}) {
    std::vector<uint8_t> storage;
    IoVector v = pieces(storage, n);
    IoVector copy = v;
    EXPECT_EQ(bytes_of(copy), storage);
    IoVector moved = std::move(copy);
    EXPECT_EQ(moved.count(), n);
    EXPECT_EQ(bytes_of(moved), storage);
    IoVector assigned;
    assigned = std::move(moved);
    EXPECT_EQ(bytes_of(assigned), storage);
    // The original is untouched by all of this.
    EXPECT_EQ(bytes_of(v), storage);
    EXPECT_EQ(v.entries().size(), n);
  }
}

TEST(IoVectorTest, SliceCrossesEntriesAndLayouts) {
  std::vector<uint8_t> storage;
  IoVector v = pieces(storage, 10);
  IoVector s = v.slice(4, 20);  // from inside entry 1 to the end of entry 7
  EXPECT_EQ(s.size(), 20u);
  EXPECT_EQ(s.count(), 7u);
  EXPECT_EQ(bytes_of(s), std::vector<uint8_t>(storage.begin() + 4, storage.begin() + 24));
  IoVector small = v.slice(3, 3);
  EXPECT_EQ(small.count(), 1u);
  EXPECT_EQ(bytes_of(small), std::vector<uint8_t>(storage.begin() + 3, storage.begin() + 6));
}

}  // namespace
}  // namespace strata::block
