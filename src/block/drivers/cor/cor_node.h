#pragma once
// The copy-on-read filter (QEMU's block/copy-on-read.c): reads pass to `file` as copy-on-read
// requests, so data that comes from below `file` (its backing chain) is also written into
// `file`, and later reads find it there. With `bottom` (a node in file's backing chain) only
// data allocated above and in `bottom` is copied; what comes from below `bottom` is read but
// left where it is. Writes, write-zeroes, discard and flush pass through.

#include <optional>
#include <string>

#include "block/drivers/driver.h"

namespace strata::block {

struct CorOptions : DriverOptions {
  BlockdevRef file;
  std::optional<std::string> bottom;
};

class CorNode final : public Node {
 public:
  static std::unique_ptr<DriverOptions> parse(ArgDecoder& d);
  static Result<std::shared_ptr<Node>> open(OpenContext& context, const BlockdevOptions& options);

  explicit CorNode(CommonOptions common) : Node(std::move(common)) {}

  const char* driver_name() const override { return "copy-on-read"; }
  bool is_filter() const override { return true; }
  uint64_t length() const override { return file().length(); }

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override;
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t flags) override;
  aio::Task<Result<void>> co_pdiscard(uint64_t offset, uint64_t bytes) override;
  aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                           uint32_t flags) override;
  // QEMU's cor_child_perm: the copies are writes that do not change the content.
  void child_perm(const Child& child, uint64_t perm, uint64_t shared, uint64_t& child_perm,
                  uint64_t& child_shared) const override;

 private:
  Node& file() const { return *children().front()->node(); }

  // `bottom`, when given: what lies below it (found at each read, since the chain below may
  // change while the filter exists) is read but not copied.
  std::weak_ptr<Node> bottom_;
  bool has_bottom_ = false;
};

}  // namespace strata::block
