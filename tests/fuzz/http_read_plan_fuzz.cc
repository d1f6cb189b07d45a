// Drives the http driver's read planning (ReadaheadCache) with arbitrary sequences of reads and
// fetch completions, checking its promises after every step: a copy or wait names a range that
// holds the read's first byte; a new fetch starts at that byte, is not empty, stays inside the
// origin and overlaps no range held or pending; no more than `capacity` ranges are held. The
// input's tail is also matched as an HTTP response header line (accepts_byte_ranges).
//
// Input: a header of three bytes (origin length in KiB units, readahead in 512-byte units,
// capacity), then 5-byte steps: kind, offset (2 bytes), length (2 bytes).

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string_view>

#include "block/drivers/http/curl_client.h"
#include "block/drivers/http/readahead_cache.h"

namespace {

using strata::block::http::ByteRange;
using strata::block::http::ReadaheadCache;

void require(bool condition) {
  if (!condition) {
    std::abort();
  }
}

bool overlaps(const ByteRange& a, const ByteRange& b) {
  return a.begin < b.end && b.begin < a.end;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) {
    return 0;
  }
  const uint64_t length = (uint64_t{data[0]} + 1) * 1024;
  const uint64_t readahead = uint64_t{data[1]} * 512;
  const size_t capacity = data[2] % 9 + 1;
  ReadaheadCache cache(length, readahead, capacity);
  std::map<uint64_t, ByteRange> pending;
  std::map<uint64_t, ByteRange> held;
  size_t at = 3;
  for (; at + 5 <= size; at += 5) {
    const uint8_t kind = data[at];
    const uint64_t a = (uint64_t{data[at + 1]} << 8 | data[at + 2]) % length;
    const uint64_t n = (uint64_t{data[at + 3]} << 8 | data[at + 4]) % (length - a) + 1;
    if (kind % 3 == 0 && !pending.empty()) {
      // Completes the pending fetch chosen by the offset bytes, successfully or not.
      auto it = std::next(pending.begin(), static_cast<long>(a % pending.size()));
      const uint64_t id = it->first;
      const ByteRange range = it->second;
      pending.erase(it);
      const bool ok = kind % 2 == 0;
      const auto evicted = cache.complete(id, ok);
      if (ok) {
        held[id] = range;
      }
      for (uint64_t e : evicted) {
        require(e != id && held.erase(e) == 1);
      }
      require(cache.held_count() <= capacity);
      require(cache.held_count() == held.size() && cache.pending_count() == pending.size());
      continue;
    }
    const auto step = cache.next(a, a + n);
    require(step.range.contains(a));
    switch (step.kind) {
      case ReadaheadCache::Step::Kind::kCopy:
        require(held.count(step.id) == 1 && held[step.id] == step.range);
        break;
      case ReadaheadCache::Step::Kind::kWait:
        require(pending.count(step.id) == 1 && pending[step.id] == step.range);
        break;
      case ReadaheadCache::Step::Kind::kFetch:
        require(step.range.begin == a && step.range.end <= length);
        for (const auto& [id, range] : pending) {
          require(!overlaps(range, step.range));
        }
        for (const auto& [id, range] : held) {
          require(!overlaps(range, step.range));
        }
        pending[step.id] = step.range;
        break;
    }
  }
  (void)strata::block::http::accepts_byte_ranges(
      std::string_view(reinterpret_cast<const char*>(data) + at, size - at));
  return 0;
}
