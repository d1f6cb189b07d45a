#include "block/drivers/http/readahead_cache.h"

#include <algorithm>

namespace strata::block::http {

ReadaheadCache::ReadaheadCache(uint64_t length, uint64_t readahead, size_t capacity)
    : length_(length), readahead_(readahead), capacity_(std::max<size_t>(capacity, 1)) {}

uint64_t ReadaheadCache::next_known_start(uint64_t offset, uint64_t limit) const {
  uint64_t first = limit;
  for (const Entry& e : held_) {
    if (e.range.begin > offset) {
      first = std::min(first, e.range.begin);
    }
  }
  for (const Entry& e : pending_) {
    if (e.range.begin > offset) {
      first = std::min(first, e.range.begin);
    }
  }
  return first;
}

ReadaheadCache::Step ReadaheadCache::next(uint64_t offset, uint64_t end) {
  for (auto it = held_.begin(); it != held_.end(); ++it) {
    if (it->range.contains(offset)) {
      held_.splice(held_.begin(), held_, it);
      return {Step::Kind::kCopy, held_.front().id, held_.front().range};
    }
  }
  for (const Entry& e : pending_) {
    if (e.range.contains(offset)) {
      return {Step::Kind::kWait, e.id, e.range};
    }
  }
  const uint64_t wanted = std::min(length_, std::max(end, end + readahead_));
  const ByteRange range{offset, next_known_start(offset, wanted)};
  const uint64_t id = next_id_++;
  pending_.push_back({id, range});
  return {Step::Kind::kFetch, id, range};
}

std::vector<uint64_t> ReadaheadCache::complete(uint64_t id, bool ok) {
  std::vector<uint64_t> evicted;
  auto it =
      std::find_if(pending_.begin(), pending_.end(), [id](const Entry& e) { return e.id == id; });
  if (it == pending_.end()) {
    return evicted;
  }
  const Entry entry = *it;
  pending_.erase(it);
  if (!ok) {
    return evicted;
  }
  held_.push_front(entry);
  while (held_.size() > capacity_) {
    evicted.push_back(held_.back().id);
    held_.pop_back();
  }
  return evicted;
}

}  // namespace strata::block::http
