#pragma once
// ReadaheadCache: the bookkeeping half of the http driver's read path, with no I/O in it. It
// knows which byte ranges of the origin are held in memory (fetched ranges, kept for later reads:
// QEMU's curl readahead buffers) and which are being fetched, and tells a read what to do next
// for the part of the request it has not served yet:
//   - copy from a held range that contains its first byte,
//   - wait for a pending fetch that contains its first byte, or
//   - start a fetch at its first byte that runs `readahead` bytes past the request's end (capped
//     at the origin's length and at the next held or pending range, so no byte is fetched twice).
// A read repeats this until its last byte is served; a sequential reader thus finds the front of
// each request already held and fetches only what follows.
//
// Ranges are identified by ids the cache hands out; the caller keeps the buffers under those ids.
// Held ranges are evicted least recently used first beyond `capacity`.
//
// Threading: none of its own; the http node calls it under its mutex.

#include <cstddef>
#include <cstdint>
#include <list>
#include <vector>

namespace strata::block::http {

struct ByteRange {
  uint64_t begin = 0;
  uint64_t end = 0;  // exclusive
  bool contains(uint64_t offset) const { return begin <= offset && offset < end; }
  uint64_t size() const { return end - begin; }
  bool operator==(const ByteRange&) const = default;
};

class ReadaheadCache {
 public:
  // `length`: the origin's size in bytes; `readahead`: bytes fetched past a request's end;
  // `capacity`: held ranges kept (at least 1).
  ReadaheadCache(uint64_t length, uint64_t readahead, size_t capacity);

  struct Step {
    enum class Kind { kCopy, kWait, kFetch };
    Kind kind;
    uint64_t id = 0;  // kCopy: the held range; kWait: the pending one; kFetch: the new one
    ByteRange range;  // the whole range `id` names
  };
  // What to do for the unserved part [offset, end) of a request (offset < end <= length).
  // kFetch registers the new range as pending under the returned id; kCopy marks the held range
  // as just used.
  Step next(uint64_t offset, uint64_t end);

  // A pending fetch finished: with `ok` it becomes held (returns the ids evicted to make room,
  // whose buffers the caller frees); otherwise it is forgotten.
  std::vector<uint64_t> complete(uint64_t id, bool ok);

  size_t held_count() const { return held_.size(); }
  size_t pending_count() const { return pending_.size(); }

 private:
  struct Entry {
    uint64_t id;
    ByteRange range;
  };
  // The first byte at or after `offset` that a held or pending range starts at (or `limit`).
  uint64_t next_known_start(uint64_t offset, uint64_t limit) const;

  uint64_t length_;
  uint64_t readahead_;
  size_t capacity_;
  uint64_t next_id_ = 1;
  std::list<Entry> held_;  // most recently used first
  std::vector<Entry> pending_;
};

}  // namespace strata::block::http
