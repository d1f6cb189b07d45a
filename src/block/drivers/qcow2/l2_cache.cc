#include "block/drivers/qcow2/l2_cache.h"

#include <iterator>

#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/refcount.h"

namespace strata::block::qcow2 {

L2Cache::L2Cache(uint64_t capacity, uint32_t slice_bytes)
    : capacity_(capacity == 0 ? 1 : capacity), slice_bytes_(slice_bytes) {}

aio::Task<Result<L2Cache::Lru::iterator>> L2Cache::find_or_load(Node& file, uint64_t slice_offset) {
  for (;;) {
    if (auto it = index_.find(slice_offset); it != index_.end()) {
      ++hits_;
      it->second->used = true;
      lru_.splice(lru_.begin(), lru_, it->second);
      co_return it->second;
    }
    auto pending = loading_.find(slice_offset);
    if (pending == loading_.end()) {
      break;
    }
    std::shared_ptr<Loading> loading = pending->second;
    co_await loading->done.wait();
    if (!loading->result) {
      co_return loading->result.error();
    }
    // Loaded (and possibly evicted again since): look again.
  }
  ++misses_;
  auto loading = std::make_shared<Loading>();
  loading_[slice_offset] = loading;
  std::vector<uint8_t> raw(slice_bytes_);
  Result<void> read =
      co_await read_zero_padded(file, slice_offset, IoVector(raw.data(), raw.size()));
  loading_.erase(slice_offset);
  loading->result = read;
  loading->done.set();
  if (!read) {
    co_return std::move(read).error();
  }
  auto words = std::make_shared<std::vector<uint64_t>>(slice_bytes_ / 8);
  for (size_t i = 0; i < words->size(); ++i) {
    (*words)[i] = load_be64(raw.data() + i * 8);
  }
  co_return insert(slice_offset, std::move(words));
}

aio::Task<Result<L2Slice>> L2Cache::get(Node& file, uint64_t slice_offset) {
  Result<Lru::iterator> found = co_await find_or_load(file, slice_offset);
  if (!found) {
    co_return std::move(found).error();
  }
  co_return L2Slice((*found)->words);
}

aio::Task<Result<void>> L2Cache::set_entry(Node& file, uint64_t slice_offset, uint32_t index,
                                           uint64_t value) {
  Result<Lru::iterator> found = co_await find_or_load(file, slice_offset);
  if (!found) {
    co_return std::move(found).error();
  }
  Entry& entry = **found;
  (*entry.words)[index] = value;
  if (!entry.dirty) {
    entry.dirty = true;
    ++dirty_count_;
  }
  co_return ok();
}

void L2Cache::put_clean(uint64_t slice_offset, std::vector<uint64_t> words) {
  if (auto it = index_.find(slice_offset); it != index_.end()) {
    *it->second->words = std::move(words);
    it->second->used = true;
    if (it->second->dirty) {
      it->second->dirty = false;
      --dirty_count_;
    }
    lru_.splice(lru_.begin(), lru_, it->second);
    return;
  }
  insert(slice_offset, std::make_shared<std::vector<uint64_t>>(std::move(words)));
}

L2Cache::Lru::iterator L2Cache::insert(uint64_t slice_offset,
                                       std::shared_ptr<std::vector<uint64_t>> words) {
  // The caller checked that the slice is not cached (loads of one slice are serialised).
  lru_.push_front(Entry{slice_offset, std::move(words), false});
  index_[slice_offset] = lru_.begin();
  evict_clean();
  return lru_.begin();
}

void L2Cache::evict_clean() {
  // Least recently used clean slices go first; the newest slice (front) always stays.
  if (lru_.empty()) {
    return;
  }
  auto it = std::prev(lru_.end());
  while (index_.size() > capacity_ && it != lru_.begin()) {
    auto newer = std::prev(it);
    if (!it->dirty) {
      index_.erase(it->offset);
      lru_.erase(it);
    }
    it = newer;
  }
}

std::vector<uint64_t> L2Cache::dirty_slices() const {
  std::vector<uint64_t> offsets;
  offsets.reserve(dirty_count_);
  for (const Entry& entry : lru_) {
    if (entry.dirty) {
      offsets.push_back(entry.offset);
    }
  }
  return offsets;
}

std::vector<uint8_t> L2Cache::encode(uint64_t slice_offset) const {
  std::vector<uint8_t> raw(slice_bytes_);
  auto it = index_.find(slice_offset);
  if (it == index_.end()) {
    return raw;
  }
  const std::vector<uint64_t>& words = *it->second->words;
  for (size_t i = 0; i < words.size(); ++i) {
    put_be64(raw.data() + i * 8, words[i]);
  }
  return raw;
}

void L2Cache::mark_clean(uint64_t slice_offset) {
  if (auto it = index_.find(slice_offset); it != index_.end() && it->second->dirty) {
    it->second->dirty = false;
    --dirty_count_;
  }
  evict_clean();
}

void L2Cache::discard(uint64_t slice_offset) {
  auto it = index_.find(slice_offset);
  if (it == index_.end()) {
    return;
  }
  if (it->second->dirty) {
    --dirty_count_;
  }
  lru_.erase(it->second);
  index_.erase(it);
}

void L2Cache::drop_unused() {
  for (auto it = lru_.begin(); it != lru_.end();) {
    if (it->dirty || it->used) {
      it->used = false;
      ++it;
      continue;
    }
    index_.erase(it->offset);
    it = lru_.erase(it);
  }
}

void L2Cache::drop_clean() {
  for (auto it = lru_.begin(); it != lru_.end();) {
    if (it->dirty) {
      ++it;
      continue;
    }
    index_.erase(it->offset);
    it = lru_.erase(it);
  }
}

}  // namespace strata::block::qcow2
