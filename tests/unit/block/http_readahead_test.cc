// The http driver's read planning (block/drivers/http/readahead_cache.h): which ranges a read
// copies, waits for or fetches, so that sequential reads fetch every byte once and reads that
// meet a fetch in flight share it.

#include "block/drivers/http/readahead_cache.h"

#include <gtest/gtest.h>

namespace strata::block::http {
namespace {

using Kind = ReadaheadCache::Step::Kind;
constexpr uint64_t KiB = 1024;

TEST(ReadaheadCacheTest, FirstReadFetchesReadaheadPastItsEnd) {
  ReadaheadCache cache(1024 * KiB, 256 * KiB, 8);
  auto step = cache.next(0, 4 * KiB);
  EXPECT_EQ(step.kind, Kind::kFetch);
  EXPECT_EQ(step.range, (ByteRange{0, 260 * KiB}));
  EXPECT_EQ(cache.pending_count(), 1u);
}

TEST(ReadaheadCacheTest, FetchStopsAtTheOriginsEnd) {
  ReadaheadCache cache(100 * KiB, 256 * KiB, 8);
  auto step = cache.next(96 * KiB, 100 * KiB);
  EXPECT_EQ(step.range, (ByteRange{96 * KiB, 100 * KiB}));
}

TEST(ReadaheadCacheTest, SequentialSmallReadsAreServedFromTheHeldRange) {
  ReadaheadCache cache(1024 * KiB, 256 * KiB, 8);
  auto fetch = cache.next(0, 4 * KiB);
  EXPECT_TRUE(cache.complete(fetch.id, true).empty());
  for (uint64_t offset = 4 * KiB; offset < 260 * KiB; offset += 4 * KiB) {
    auto step = cache.next(offset, offset + 4 * KiB);
    ASSERT_EQ(step.kind, Kind::kCopy) << offset;
    EXPECT_EQ(step.id, fetch.id);
  }
  // The first byte past the held range starts a new fetch, right where the old one ended.
  auto next = cache.next(260 * KiB, 264 * KiB);
  EXPECT_EQ(next.kind, Kind::kFetch);
  EXPECT_EQ(next.range.begin, 260 * KiB);
}

TEST(ReadaheadCacheTest, ReadsInsideAPendingFetchWaitForIt) {
  ReadaheadCache cache(1024 * KiB, 256 * KiB, 8);
  auto fetch = cache.next(0, 64 * KiB);
  auto step = cache.next(128 * KiB, 192 * KiB);
  EXPECT_EQ(step.kind, Kind::kWait);
  EXPECT_EQ(step.id, fetch.id);
  EXPECT_EQ(cache.pending_count(), 1u);
}

TEST(ReadaheadCacheTest, NewFetchEndsWhereAKnownRangeBegins) {
  ReadaheadCache cache(1024 * KiB, 256 * KiB, 8);
  auto later = cache.next(512 * KiB, 576 * KiB);
  ASSERT_EQ(later.kind, Kind::kFetch);
  // A read before it fetches up to it, not over it.
  auto earlier = cache.next(448 * KiB, 520 * KiB);
  EXPECT_EQ(earlier.kind, Kind::kFetch);
  EXPECT_EQ(earlier.range, (ByteRange{448 * KiB, 512 * KiB}));
  // The rest of that read then waits for the later fetch.
  auto rest = cache.next(512 * KiB, 520 * KiB);
  EXPECT_EQ(rest.kind, Kind::kWait);
  EXPECT_EQ(rest.id, later.id);
}

TEST(ReadaheadCacheTest, FailedFetchIsForgottenAndFetchedAgain) {
  ReadaheadCache cache(1024 * KiB, 0, 8);
  auto fetch = cache.next(0, 4 * KiB);
  EXPECT_TRUE(cache.complete(fetch.id, false).empty());
  EXPECT_EQ(cache.pending_count(), 0u);
  EXPECT_EQ(cache.held_count(), 0u);
  auto again = cache.next(0, 4 * KiB);
  EXPECT_EQ(again.kind, Kind::kFetch);
  EXPECT_NE(again.id, fetch.id);
}

TEST(ReadaheadCacheTest, LeastRecentlyUsedRangeIsEvictedBeyondCapacity) {
  ReadaheadCache cache(1024 * KiB, 0, 2);
  auto a = cache.next(0, 4 * KiB);
  auto b = cache.next(8 * KiB, 12 * KiB);
  auto c = cache.next(16 * KiB, 20 * KiB);
  EXPECT_TRUE(cache.complete(a.id, true).empty());
  EXPECT_TRUE(cache.complete(b.id, true).empty());
  EXPECT_EQ(cache.next(0, 4 * KiB).kind, Kind::kCopy);  // a is now the most recently used
  auto evicted = cache.complete(c.id, true);
  ASSERT_EQ(evicted.size(), 1u);
  EXPECT_EQ(evicted[0], b.id);
  EXPECT_EQ(cache.held_count(), 2u);
  EXPECT_EQ(cache.next(8 * KiB, 12 * KiB).kind, Kind::kFetch);
}

TEST(ReadaheadCacheTest, CompletingAnUnknownIdDoesNothing) {
  ReadaheadCache cache(1024 * KiB, 0, 2);
  EXPECT_TRUE(cache.complete(42, true).empty());
  EXPECT_EQ(cache.held_count(), 0u);
}

}  // namespace
}  // namespace strata::block::http
