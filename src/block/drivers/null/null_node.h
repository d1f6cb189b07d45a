#pragma once
// The `null-co` / `null-aio` drivers: a device of a given size that discards writes and either
// leaves read buffers untouched or zeroes them (read-zeroes). Used for benchmarks and tests.

#include <optional>

#include "block/drivers/driver.h"

namespace strata::block {

struct NullOptions : DriverOptions {
  std::optional<uint64_t> size;
  uint64_t latency_ns = 0;
  bool read_zeroes = false;
};

class NullNode final : public Node {
 public:
  static std::unique_ptr<DriverOptions> parse(ArgDecoder& d);
  static Result<std::shared_ptr<Node>> open_co(OpenContext& context,
                                               const BlockdevOptions& options);
  static Result<std::shared_ptr<Node>> open_aio(OpenContext& context,
                                                const BlockdevOptions& options);

  NullNode(CommonOptions common, const NullOptions& options, const char* driver);

  const char* driver_name() const override { return driver_; }
  std::optional<std::string> exact_filename() const override;
  nlohmann::json strong_options() const override;

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override;
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t flags) override;
  aio::Task<Result<void>> co_flush() override;
  aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                           uint32_t flags) override;
  aio::Task<Result<BlockStatus>> co_block_status(uint64_t offset, uint64_t bytes) override;
  uint64_t length() const override { return size_; }
  std::optional<uint64_t> allocated_size() const override { return 0; }

 private:
  aio::Task<void> simulate_latency();

  const char* driver_;
  uint64_t size_;
  uint64_t latency_ns_;
  bool read_zeroes_;
  bool size_given_;
};

}  // namespace strata::block
