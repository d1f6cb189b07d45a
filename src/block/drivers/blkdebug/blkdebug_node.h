#pragma once
// The `blkdebug` filter driver (QEMU's block/blkdebug.c): passes every request to its `image` child
// unless an active inject-error rule fails it, and optionally imposes request limits (align,
// max-transfer, write-zeroes and discard granularity) and extra permissions on the child.
//
// Rules come from the `config` file and the inject-error/set-state lists (see rules.h for the
// state machine, config_file.h for the file format). Events reach the node from its parents
// (Node::debug_event); `none` fires once when the node opens. QEMU's breakpoints
// (break/resume/wait_break, qemu-io only) are not implemented.

#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "block/drivers/blkdebug/config_file.h"
#include "block/drivers/blkdebug/rules.h"
#include "block/drivers/driver.h"

namespace strata::block {

struct BlkdebugOptions : DriverOptions {
  BlockdevRef image;
  std::optional<std::string> config;
  // QAPI: align is int, the others int32; QEMU reads them as sizes after decoding.
  std::optional<int64_t> align;
  std::optional<int64_t> max_transfer;
  std::optional<int64_t> opt_write_zero;
  std::optional<int64_t> max_write_zero;
  std::optional<int64_t> opt_discard;
  std::optional<int64_t> max_discard;
  std::vector<blkdebug::RuleSpec> rule_specs;  // inject-error elements, then set-state elements
  // Strong options as given ("inject-error.0.event": "read_aio", "align": 4096, ...).
  nlohmann::json strong = nlohmann::json::object();
  uint64_t take_child_perms = 0;
  uint64_t unshare_child_perms = 0;
  // List members given as [] (QEMU leaves them unconsumed and fails after opening).
  std::vector<std::string> empty_lists;
};

class BlkdebugNode final : public Node {
 public:
  static std::unique_ptr<DriverOptions> parse(ArgDecoder& d);
  static Result<std::shared_ptr<Node>> open(OpenContext& context, const BlockdevOptions& options);

  BlkdebugNode(CommonOptions common, const BlkdebugOptions& options,
               std::vector<blkdebug::Rule> rules);

  const char* driver_name() const override { return "blkdebug"; }
  std::optional<std::string> exact_filename() const override;
  nlohmann::json strong_options() const override { return strong_; }
  bool is_filter() const override { return true; }
  std::optional<bool> dirty_flag() const override { return image().dirty_flag(); }
  // QEMU: a protocol driver without its own callback reports no allocated size.
  std::optional<uint64_t> allocated_size() const override { return std::nullopt; }

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override;
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t flags) override;
  aio::Task<Result<void>> co_flush() override;
  aio::Task<Result<void>> co_pdiscard(uint64_t offset, uint64_t bytes) override;
  aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                           uint32_t flags) override;
  aio::Task<Result<BlockStatus>> co_block_status(uint64_t offset, uint64_t bytes) override;
  aio::Task<Result<void>> co_truncate(uint64_t new_size, bool exact) override;
  uint64_t length() const override { return image().length(); }

  void child_perm(const Child& child, uint64_t perm, uint64_t shared, uint64_t& child_perm,
                  uint64_t& child_shared) const override;
  void debug_event(BlkdebugEvent event) override { rules_.on_event(event); }
  Result<std::function<void()>> prepare_reopen(const DriverOptions& options) override;

  // The rule engine (state, active rules), for tests.
  const blkdebug::RuleEngine& rules() const { return rules_; }

 private:
  Node& image() const { return *children().front()->node(); }
  // QEMU's rule_check: false to carry on with the I/O, true to complete the request without I/O
  // (a rule with a negative errno), or the injected error.
  aio::Task<Result<bool>> check(uint64_t offset, uint64_t bytes, blkdebug::IoType type);

  std::optional<std::string> config_;
  nlohmann::json strong_;
  uint64_t take_child_perms_;
  uint64_t unshare_child_perms_;
  blkdebug::RuleEngine rules_;
  // QEMU's write_gen/flushed_gen of this node: its flush (flush_to_disk) runs only when something
  // was written since the last successful one.
  uint64_t write_generation_ = 0;
  uint64_t flushed_generation_ = 0;
};

}  // namespace strata::block
