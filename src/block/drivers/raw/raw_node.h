#pragma once
// The `raw` format driver: the image is the child's bytes, optionally a window [offset,
// offset + size) of them. Without a window it passes permissions through like a filter.

#include <optional>

#include "block/drivers/driver.h"

namespace strata::block {

struct RawOptions : DriverOptions {
  BlockdevRef file;
  std::optional<int64_t> offset;
  std::optional<int64_t> size;
};

class RawNode final : public Node {
 public:
  static std::unique_ptr<DriverOptions> parse(ArgDecoder& d);
  static Result<std::shared_ptr<Node>> open(OpenContext& context, const BlockdevOptions& options);

  RawNode(CommonOptions common, uint64_t offset, std::optional<uint64_t> size);

  const char* driver_name() const override { return "raw"; }
  std::optional<std::string> exact_filename() const override;
  nlohmann::json strong_options() const override;
  std::optional<bool> dirty_flag() const override { return file().dirty_flag(); }

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override;
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t flags) override;
  aio::Task<Result<void>> co_pdiscard(uint64_t offset, uint64_t bytes) override;
  aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                           uint32_t flags) override;
  aio::Task<Result<BlockStatus>> co_block_status(uint64_t offset, uint64_t bytes) override;
  aio::Task<Result<void>> co_truncate(uint64_t new_size, bool exact) override;
  uint64_t length() const override;
  Result<std::function<void()>> prepare_reopen(const DriverOptions& options) override;
  // QEMU's raw_child_perm: the default rules by role, but write and resize on the file only when
  // raw's own parents take them (a window makes the file a data child, whose default rules would
  // add them).
  void child_perm(const Child& child, uint64_t perm, uint64_t shared, uint64_t& child_perm,
                  uint64_t& child_shared) const override;

  bool has_window() const { return offset_ != 0 || size_.has_value(); }
  // Checks a window against the file's length with QEMU's messages.
  static Result<void> check_window(uint64_t offset, std::optional<uint64_t> size,
                                   uint64_t file_length);

 private:
  Node& file() const { return *children().front()->node(); }

  uint64_t offset_;
  std::optional<uint64_t> size_;
};

}  // namespace strata::block
