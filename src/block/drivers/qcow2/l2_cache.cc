#include "block/drivers/qcow2/l2_cache.h"

#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"

namespace strata::block::qcow2 {

L2Cache::L2Cache(uint64_t capacity, uint32_t slice_bytes)
    : capacity_(capacity == 0 ? 1 : capacity), slice_bytes_(slice_bytes) {}

aio::Task<Result<L2Slice>> L2Cache::get(Node& file, uint64_t slice_offset) {
  if (auto it = index_.find(slice_offset); it != index_.end()) {
    ++hits_;
    lru_.splice(lru_.begin(), lru_, it->second);
    co_return it->second->second;
  }
  ++misses_;
  std::vector<uint8_t> raw(slice_bytes_);
  Result<void> read =
      co_await read_zero_padded(file, slice_offset, IoVector(raw.data(), raw.size()));
  if (!read) {
    co_return std::move(read).error();
  }
  auto words = std::make_shared<std::vector<uint64_t>>(slice_bytes_ / 8);
  for (size_t i = 0; i < words->size(); ++i) {
    (*words)[i] = load_be64(raw.data() + i * 8);
  }
  insert(slice_offset, words);
  co_return L2Slice(std::move(words));
}

void L2Cache::update(uint64_t slice_offset, uint32_t index, uint64_t value) {
  if (auto it = index_.find(slice_offset); it != index_.end()) {
    (*it->second->second)[index] = value;
  }
}

void L2Cache::insert(uint64_t slice_offset, MutableSlice slice) {
  if (auto it = index_.find(slice_offset); it != index_.end()) {
    it->second->second = std::move(slice);
    lru_.splice(lru_.begin(), lru_, it->second);
    return;
  }
  lru_.emplace_front(slice_offset, std::move(slice));
  index_[slice_offset] = lru_.begin();
  while (index_.size() > capacity_) {
    index_.erase(lru_.back().first);
    lru_.pop_back();
  }
}

void L2Cache::clear() {
  index_.clear();
  lru_.clear();
}

}  // namespace strata::block::qcow2
