// Zero-page detection, present-page bitmaps and the split of blocks into worker chunks.

#include <bit>
#include <cstring>

#include "migration/internal.h"

namespace strata::migration::internal {

bool is_zero_page(const uint8_t* page, size_t size) {
  // 64-byte lines OR-ed in 8-byte words: the compiler vectorises the inner loop, and random data
  // stops at the first line.
  for (size_t line = 0; line + 64 <= size; line += 64) {
    uint64_t words[8];
    std::memcpy(words, page + line, sizeof(words));
    uint64_t any = 0;
    for (uint64_t word : words) {
      any |= word;
    }
    if (any != 0) {
      return false;
    }
  }
  for (size_t i = size / 64 * 64; i < size; ++i) {
    if (page[i] != 0) {
      return false;
    }
  }
  return true;
}

uint64_t bitmap_count(std::span<const uint8_t> bitmap) {
  uint64_t count = 0;
  size_t i = 0;
  for (; i + 8 <= bitmap.size(); i += 8) {
    uint64_t word;
    std::memcpy(&word, bitmap.data() + i, 8);
    count += static_cast<uint64_t>(std::popcount(word));
  }
  for (; i < bitmap.size(); ++i) {
    count += static_cast<uint64_t>(std::popcount(bitmap[i]));
  }
  return count;
}

std::vector<Chunk> split_into_chunks(std::span<const BlockRecord> blocks) {
  std::vector<Chunk> chunks;
  for (size_t b = 0; b < blocks.size(); ++b) {
    uint64_t pages = blocks[b].page_count();
    uint64_t per_chunk = kChunkBytes / blocks[b].page_size / 64 * 64;
    if (per_chunk < 64) {
      per_chunk = 64;
    }
    for (uint64_t first = 0; first < pages; first += per_chunk) {
      chunks.push_back(Chunk{b, first, std::min(per_chunk, pages - first)});
    }
  }
  return chunks;
}

}  // namespace strata::migration::internal
