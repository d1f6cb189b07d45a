#pragma once
// The throttle filter (QEMU's block/throttle.c): requests to `file` pass through the limits of
// the throttle-group object named by `throttle-group`. Reads count as reads; writes,
// write-zeroes and discards as writes (their byte counts included); flush is not throttled.
// While the node is drained, requests go through without waiting (QEMU disables limits in a
// drained section), so graph changes and blockdev-del never wait for a slow group.
//
// An unknown group: "Throttle group 'X' does not exist", as in QEMU.

#include <memory>
#include <string>

#include "block/drivers/driver.h"
#include "block/throttle/throttle_group.h"

namespace strata::block {

struct ThrottleOptions : DriverOptions {
  BlockdevRef file;
  std::string group;  // throttle-group (required)
};

class ThrottleNode final : public Node {
 public:
  static std::unique_ptr<DriverOptions> parse(ArgDecoder& d);
  static Result<std::shared_ptr<Node>> open(OpenContext& context, const BlockdevOptions& options);

  ThrottleNode(CommonOptions common, std::shared_ptr<throttle::ThrottleGroup> group)
      : Node(std::move(common)), group_(std::move(group)) {}

  const char* driver_name() const override { return "throttle"; }
  bool is_filter() const override { return true; }
  uint64_t length() const override { return file().length(); }
  nlohmann::json strong_options() const override { return {{"throttle-group", group_->name()}}; }

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override;
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t flags) override;
  aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                           uint32_t flags) override;
  aio::Task<Result<void>> co_pdiscard(uint64_t offset, uint64_t bytes) override;

 private:
  Node& file() const { return *children().front()->node(); }
  aio::Task<void> wait_turn(throttle::Direction direction, uint64_t bytes);

  std::shared_ptr<throttle::ThrottleGroup> group_;
};

}  // namespace strata::block
