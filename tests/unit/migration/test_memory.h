#pragma once
// Test helpers for migration/: page-aligned RAM blocks filled with reproducible data, and a
// temporary directory.

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "migration/ram_block.h"

namespace strata::migration::testing {

// Anonymous page-aligned memory, unmapped on destruction.
class Memory {
 public:
  explicit Memory(uint64_t length) : length_(length) {
    void* p = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    data_ = p == MAP_FAILED ? nullptr : static_cast<uint8_t*>(p);
  }
  ~Memory() {
    if (data_ != nullptr) {
      ::munmap(data_, length_);
    }
  }
  Memory(const Memory&) = delete;
  Memory& operator=(const Memory&) = delete;

  uint8_t* data() const { return data_; }
  uint64_t length() const { return length_; }

 private:
  uint8_t* data_;
  uint64_t length_;
};

// Blocks named `names` with `lengths`, each page random or (one in `zero_every`) zero.
class Guest {
 public:
  Guest(std::vector<std::pair<std::string, uint64_t>> shapes, uint32_t seed,
        unsigned zero_every = 5, uint32_t page_size = 4096) {
    std::mt19937_64 random(seed);
    for (const auto& [name, length] : shapes) {
      memory_.push_back(std::make_unique<Memory>(length));
      RamBlock block{name, memory_.back()->data(), length, page_size};
      for (uint64_t page = 0; page < length / page_size; ++page) {
        uint8_t* p = block.host + page * page_size;
        if (zero_every != 0 && random() % zero_every == 0) {
          std::memset(p, 0, page_size);
          continue;
        }
        for (uint64_t i = 0; i < page_size; i += 8) {
          uint64_t value = random();
          std::memcpy(p + i, &value, 8);
        }
        // Some non-zero pages are zero but for their last byte: a zero check must read it all.
        if (random() % 7 == 0) {
          std::memset(p, 0, page_size - 1);
        }
        p[page_size - 1] |= 1;
      }
      blocks_.push_back(block);
    }
  }

  // A guest with the same shapes, every byte 0xAA (restores must overwrite every byte).
  Guest empty_twin() const {
    std::vector<std::pair<std::string, uint64_t>> shapes;
    for (const RamBlock& block : blocks_) {
      shapes.emplace_back(block.name, block.length);
    }
    Guest twin(shapes, 0, 0, blocks_.empty() ? 4096 : blocks_[0].page_size);
    for (RamBlock& block : twin.blocks_) {
      std::memset(block.host, 0xAA, block.length);
    }
    return twin;
  }

  bool same_as(const Guest& other) const {
    if (blocks_.size() != other.blocks_.size()) {
      return false;
    }
    for (size_t i = 0; i < blocks_.size(); ++i) {
      if (blocks_[i].length != other.blocks_[i].length ||
          std::memcmp(blocks_[i].host, other.blocks_[i].host, blocks_[i].length) != 0) {
        return false;
      }
    }
    return true;
  }

  std::vector<RamBlock>& blocks() { return blocks_; }
  const std::vector<RamBlock>& blocks() const { return blocks_; }

 private:
  std::vector<std::unique_ptr<Memory>> memory_;
  std::vector<RamBlock> blocks_;
};

class TempDir {
 public:
  TempDir() {
    // Under /var/tmp, not /tmp: /tmp may be a tmpfs, which refuses O_DIRECT.
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base != nullptr ? base : "/var/tmp") + "/strata-mig-XXXXXX";
    if (::mkdtemp(pattern.data()) != nullptr) {
      path_ = pattern;
    }
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace strata::migration::testing
