#pragma once
// RamNode: a test block node whose data lives in memory. It can hold writes (to observe requests
// in flight), fail writes at one offset, and report zero or unallocated runs for block status.
// Shared by the block-copy and mirror tests.

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <vector>

#include "aio/sync.h"
#include "block/graph/node.h"

namespace strata::block::testing {

inline CommonOptions node_options(const char* name) {
  CommonOptions options;
  options.node_name = name;
  return options;
}

class RamNode : public Node {
 public:
  RamNode(const char* name, uint64_t size) : Node(node_options(name)), data_(size, 0) {}

  const char* driver_name() const override { return "test-ram"; }
  uint64_t length() const override { return data_.size(); }
  std::optional<uint64_t> cluster_size() const override { return reported_cluster_size; }

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t) override {
    qiov.copy_from(0, data_.data() + offset, bytes);
    co_return ok();
  }
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t) override {
    writes.push_back({offset, bytes});
    co_await hold_point();
    if (fail_write_at && offset <= *fail_write_at && *fail_write_at < offset + bytes) {
      co_return Error(ErrorKind::kIo, "injected write error", EIO);
    }
    qiov.copy_to(0, data_.data() + offset, bytes);
    co_return ok();
  }
  aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes, uint32_t) override {
    zero_writes.push_back({offset, bytes});
    std::memset(data_.data() + offset, 0, bytes);
    co_return ok();
  }
  aio::Task<Result<BlockStatus>> co_block_status(uint64_t offset, uint64_t bytes) override {
    BlockStatus status;
    status.bytes = bytes;
    status.flags = BlockStatus::kData | BlockStatus::kAllocated;
    for (const auto& [start, length, flags] : runs) {
      if (offset >= start && offset < start + length) {
        status.bytes = std::min(bytes, start + length - offset);
        status.flags = flags;
      } else if (offset < start && start < offset + bytes) {
        status.bytes = std::min(status.bytes, start - offset);
      }
    }
    co_return status;
  }

  void hold() {
    held_gate_.reset();
    holding_ = true;
  }
  void release() {
    holding_ = false;
    held_gate_.set();
  }
  int held() const { return held_; }
  int max_held() const { return max_held_; }
  std::vector<uint8_t>& data() { return data_; }

  struct Range {
    uint64_t offset;
    uint64_t bytes;
  };
  struct Run {
    uint64_t offset;
    uint64_t bytes;
    uint32_t flags;
  };
  std::vector<Range> writes;
  std::vector<Range> zero_writes;
  std::vector<Run> runs;  // block status overrides
  std::optional<uint64_t> fail_write_at;
  std::optional<uint64_t> reported_cluster_size;

 private:
  aio::Task<void> hold_point() {
    if (holding_) {
      ++held_;
      max_held_ = std::max(max_held_, held_);
      co_await held_gate_.wait();
      --held_;
    }
  }
  std::vector<uint8_t> data_;
  bool holding_ = false;
  aio::Event held_gate_;
  int held_ = 0;
  int max_held_ = 0;
};

}  // namespace strata::block::testing
