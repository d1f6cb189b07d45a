#include "block/drivers/blkdebug/blkdebug_node.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <string_view>

#include "aio/event_loop.h"
#include "block/io/request.h"

namespace strata::block {

namespace {

using blkdebug::IoType;
using blkdebug::Rule;
using blkdebug::RuleSpec;

constexpr std::array<std::string_view, 4> kPermissionNames = {"consistent-read", "write",
                                                              "write-unchanged", "resize"};
constexpr uint64_t kPermissionBits[] = {kPermConsistentRead, kPermWrite, kPermWriteUnchanged,
                                        kPermResize};
constexpr std::array<std::string_view, 6> kIoTypeNames = {"read",    "write", "write-zeroes",
                                                          "discard", "flush", "block-status"};
// QEMU caps blkdebug's exact filename at its exact_filename buffer (PATH_MAX).
constexpr size_t kMaxExactFilename = 4096;

Error invalid(const std::string& message) {
  return make_error(ErrorKind::kInvalidArgument, message);
}

bool is_power_of_two(uint64_t value) {
  return value != 0 && (value & (value - 1)) == 0;
}

// Records every member present in `element` as a flattened strong option ("inject-error.0.event").
void flatten_into(nlohmann::json& strong, std::string_view list, size_t index,
                  const nlohmann::json& element) {
  if (!element.is_object()) {
    return;
  }
  for (const auto& [key, value] : element.items()) {
    strong[std::string(list) + "." + std::to_string(index) + "." + key] = value;
  }
}

uint64_t parse_perm_list(ArgDecoder& d, std::string_view name,
                         std::vector<std::string>& empty_lists) {
  uint64_t perms = 0;
  auto list = d.opt_enum_list(name, kPermissionNames);
  if (!list) {
    return 0;
  }
  if (list->empty()) {
    empty_lists.emplace_back(name);
  }
  for (const std::string& perm : *list) {
    for (size_t i = 0; i < kPermissionNames.size(); ++i) {
      if (kPermissionNames[i] == perm) {
        perms |= kPermissionBits[i];
      }
    }
  }
  return perms;
}

std::optional<uint64_t> as_unsigned(std::optional<int64_t> value) {
  if (!value) {
    return std::nullopt;
  }
  return static_cast<uint64_t>(*value);
}

}  // namespace

std::unique_ptr<DriverOptions> BlkdebugNode::parse(ArgDecoder& d) {
  auto options = std::make_unique<BlkdebugOptions>();
  if (auto image = parse_blockdev_ref(d, "image", true)) {
    options->image = std::move(*image);
  }
  options->config = d.opt_str("config");
  if (options->config) {
    options->strong["config"] = *options->config;
  }
  options->align = d.opt_i64("align");
  if (options->align) {
    options->strong["align"] = *options->align;
  }
  // QAPI declares these int32; the visitor's message names the bare member.
  for (auto [name, field] : {std::pair{"max-transfer", &options->max_transfer},
                             std::pair{"opt-write-zero", &options->opt_write_zero},
                             std::pair{"max-write-zero", &options->max_write_zero},
                             std::pair{"opt-discard", &options->opt_discard},
                             std::pair{"max-discard", &options->max_discard}}) {
    *field = d.opt_i64(name);
    if (*field && (**field < INT32_MIN || **field > INT32_MAX)) {
      d.fail(invalid(std::string("Parameter '") + name + "' expects int32_t"));
      *field = std::nullopt;
    }
    if (*field) {
      options->strong[name] = **field;
    }
  }

  if (auto list = d.opt_list("inject-error")) {
    if (list->empty()) {
      options->empty_lists.emplace_back("inject-error");
    }
    for (size_t i = 0; i < list->size() && !d.failed(); ++i) {
      const nlohmann::json& element = (*list)[i];
      ArgDecoder e = d.element_decoder(element, i, "inject-error");
      RuleSpec spec;
      spec.action = Rule::Action::kInjectError;
      spec.id = "inject-error." + std::to_string(i);
      spec.event = e.enumeration("event", blkdebug_event_names());
      spec.state = as_unsigned(e.opt_i64("state"));
      spec.iotype = e.opt_enum("iotype", kIoTypeNames);
      spec.errno_value = as_unsigned(e.opt_i64("errno"));
      spec.sector = as_unsigned(e.opt_i64("sector"));
      spec.once = e.opt_bool("once");
      spec.immediately = e.opt_bool("immediately");
      ignore_error(e.finish(), "recorded in the shared decoder state");
      flatten_into(options->strong, "inject-error", i, element);
      options->rule_specs.push_back(std::move(spec));
    }
  }
  if (auto list = d.opt_list("set-state")) {
    if (list->empty()) {
      options->empty_lists.emplace_back("set-state");
    }
    for (size_t i = 0; i < list->size() && !d.failed(); ++i) {
      const nlohmann::json& element = (*list)[i];
      ArgDecoder e = d.element_decoder(element, i, "set-state");
      RuleSpec spec;
      spec.action = Rule::Action::kSetState;
      spec.id = "set-state." + std::to_string(i);
      spec.event = e.enumeration("event", blkdebug_event_names());
      spec.state = as_unsigned(e.opt_i64("state"));
      spec.new_state = static_cast<uint64_t>(e.i64("new_state"));
      ignore_error(e.finish(), "recorded in the shared decoder state");
      flatten_into(options->strong, "set-state", i, element);
      options->rule_specs.push_back(std::move(spec));
    }
  }
  options->take_child_perms = parse_perm_list(d, "take-child-perms", options->empty_lists);
  options->unshare_child_perms = parse_perm_list(d, "unshare-child-perms", options->empty_lists);
  return options;
}

Result<std::shared_ptr<Node>> BlkdebugNode::open(OpenContext& context,
                                                 const BlockdevOptions& options) {
  const auto& o = static_cast<const BlkdebugOptions&>(*options.driver_options);

  // QEMU absorbs the limits as QemuOpts sizes (in QDict order), which rejects negative values.
  const std::pair<std::string, std::optional<int64_t>> sizes[] = {
      {"align", o.align},
      {"max-transfer", o.max_transfer},
      {"opt-write-zero", o.opt_write_zero},
      {"max-write-zero", o.max_write_zero},
      {"opt-discard", o.opt_discard},
      {"max-discard", o.max_discard},
  };
  std::vector<std::string> given;
  for (const auto& [name, value] : sizes) {
    if (value) {
      given.push_back(name);
    }
  }
  for (const std::string& name : blkdebug::qdict_order(given)) {
    for (const auto& [size_name, value] : sizes) {
      if (size_name == name && *value < 0) {
        return invalid("Value '" + std::to_string(*value) + "' is out of range for parameter '" +
                       name + "'");
      }
    }
  }

  // Rules: the config file's sections first, then the QMP lists (QEMU's read_config).
  std::vector<RuleSpec> specs;
  if (o.config) {
    auto file_specs = blkdebug::read_config_file(*o.config);
    if (!file_specs) {
      return std::move(file_specs).error();
    }
    specs = std::move(*file_specs);
  }
  specs.insert(specs.end(), o.rule_specs.begin(), o.rule_specs.end());
  auto rules = blkdebug::make_rules(specs);
  if (!rules) {
    return std::move(rules).error();
  }

  auto node = std::make_shared<BlkdebugNode>(context.options(), o, std::move(*rules));
  auto child = context.attach(*node, o.image, "image", kRoleFiltered | kRolePrimary);
  if (!child) {
    return std::move(child).error();
  }
  const NodeLimits& child_limits = (*child)->node()->limits();

  // blkdebug_open's constraint checks, in its order.
  const uint64_t align_option = o.align ? static_cast<uint64_t>(*o.align) : 0;
  if (align_option != 0 && (align_option >= INT_MAX || !is_power_of_two(align_option))) {
    return invalid("Cannot meet constraints with align " + std::to_string(align_option));
  }
  const uint64_t align = std::max<uint64_t>(align_option, child_limits.request_alignment);
  auto value_of = [](std::optional<int64_t> v) { return v ? static_cast<uint64_t>(*v) : 0; };
  const uint64_t max_transfer = value_of(o.max_transfer);
  const uint64_t opt_write_zero = value_of(o.opt_write_zero);
  const uint64_t max_write_zero = value_of(o.max_write_zero);
  const uint64_t opt_discard = value_of(o.opt_discard);
  const uint64_t max_discard = value_of(o.max_discard);
  const std::tuple<const char*, uint64_t, uint64_t> constraints[] = {
      {"max-transfer", max_transfer, align},
      {"opt-write-zero", opt_write_zero, align},
      {"max-write-zero", max_write_zero, std::max(opt_write_zero, align)},
      {"opt-discard", opt_discard, align},
      {"max-discard", max_discard, std::max(opt_discard, align)},
  };
  for (const auto& [name, value, granularity] : constraints) {
    if (value != 0 && (value >= INT_MAX || value % granularity != 0)) {
      return invalid(std::string("Cannot meet constraints with ") + name + " " +
                     std::to_string(value));
    }
  }

  // blkdebug_refresh_limits: the child's limits, overridden where an option was given.
  node->limits_ = child_limits;
  if (align_option != 0) {
    node->limits_.request_alignment = static_cast<uint32_t>(align_option);
  }
  if (max_transfer != 0) {
    node->limits_.max_transfer = max_transfer;
  }
  if (opt_write_zero != 0) {
    node->limits_.pwrite_zeroes_alignment = static_cast<uint32_t>(opt_write_zero);
  }
  if (max_write_zero != 0) {
    node->limits_.max_pwrite_zeroes = max_write_zero;
  }
  if (opt_discard != 0) {
    node->limits_.pdiscard_alignment = static_cast<uint32_t>(opt_discard);
  }
  if (max_discard != 0) {
    node->limits_.max_pdiscard = max_discard;
  }

  node->debug_event(BlkdebugEvent::kNone);

  // QEMU consumes list members by their flattened keys, so an empty list is left over and fails
  // the generic unknown-option check after the driver opened.
  if (!o.empty_lists.empty()) {
    return invalid("Block protocol 'blkdebug' doesn't support the option '" +
                   blkdebug::qdict_order(o.empty_lists).front() + "'");
  }
  return std::shared_ptr<Node>(std::move(node));
}

BlkdebugNode::BlkdebugNode(CommonOptions common, const BlkdebugOptions& options,
                           std::vector<blkdebug::Rule> rules)
    : Node(std::move(common)),
      config_(options.config),
      strong_(options.strong),
      take_child_perms_(options.take_child_perms),
      unshare_child_perms_(options.unshare_child_perms) {
  for (const Rule& rule : rules) {
    rules_.add(rule);
  }
}

std::optional<std::string> BlkdebugNode::exact_filename() const {
  // blkdebug_refresh_filename: only image and config may define the node.
  for (const auto& item : strong_.items()) {
    if (item.key() != "config") {
      return std::nullopt;
    }
  }
  auto image_filename = image().exact_filename();
  if (!image_filename) {
    return std::nullopt;
  }
  std::string filename = "blkdebug:" + config_.value_or("") + ":" + *image_filename;
  if (filename.size() >= kMaxExactFilename) {
    return std::nullopt;
  }
  return filename;
}

void BlkdebugNode::child_perm(const Child& child, uint64_t perm, uint64_t shared,
                              uint64_t& child_perm, uint64_t& child_shared) const {
  Node::child_perm(child, perm, shared, child_perm, child_shared);
  child_perm |= take_child_perms_;
  child_shared &= ~unshare_child_perms_;
}

Result<std::function<void()>> BlkdebugNode::prepare_reopen(const DriverOptions& options) {
  const auto& o = static_cast<const BlkdebugOptions&>(options);
  if (o.image.inline_options || o.image.node_name != image().name()) {
    return make_error(ErrorKind::kUnsupported, "Cannot change the option 'image'");
  }
  // blkdebug_reopen_prepare takes nothing: given options must equal the ones the node has.
  for (const auto& [key, value] : o.strong.items()) {
    if (!strong_.contains(key) || strong_[key] != value) {
      return make_error(ErrorKind::kUnsupported, "Cannot change the option '" + key + "'");
    }
  }
  return std::function<void()>([] {});
}

aio::Task<Result<bool>> BlkdebugNode::check(uint64_t offset, uint64_t bytes, IoType type) {
  auto injection = rules_.check(offset, bytes, type);
  if (!injection) {
    co_return false;
  }
  // QEMU completes a non-immediate failure from a fresh scheduling of the request's coroutine.
  if (!injection->immediately) {
    if (aio::EventLoop* loop = aio::EventLoop::current(); loop != nullptr) {
      co_await loop->yield();
    }
  }
  if (injection->error < 0) {
    co_return true;
  }
  co_return Error::from_errno(injection->error, "");
}

aio::Task<Result<void>> BlkdebugNode::co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                                uint32_t flags) {
  Result<bool> skip = co_await check(offset, bytes, IoType::kRead);
  if (!skip) {
    co_return std::move(skip).error();
  }
  if (*skip) {
    co_return ok();
  }
  auto result = co_await io::preadv(image(), offset, std::move(qiov), flags);
  co_return result;
}

aio::Task<Result<void>> BlkdebugNode::co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                                 uint32_t flags) {
  ++write_generation_;
  Result<bool> skip = co_await check(offset, bytes, IoType::kWrite);
  if (!skip) {
    co_return std::move(skip).error();
  }
  if (*skip) {
    co_return ok();
  }
  auto result = co_await io::pwritev(image(), offset, std::move(qiov), flags);
  co_return result;
}

aio::Task<Result<void>> BlkdebugNode::co_flush() {
  // QEMU's bdrv_co_flush calls blkdebug's flush_to_disk only when the node was written since its
  // last successful flush, and never with cache.no-flush; io::flush then flushes the image.
  const uint64_t generation = write_generation_;
  if (common_options().cache_no_flush || generation == flushed_generation_) {
    co_return ok();
  }
  Result<bool> skip = co_await check(0, 0, IoType::kFlush);
  if (!skip) {
    co_return std::move(skip).error();
  }
  flushed_generation_ = std::max(flushed_generation_, generation);
  co_return ok();
}

aio::Task<Result<void>> BlkdebugNode::co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                                       uint32_t flags) {
  ++write_generation_;
  // Requests below the preferred granularity are refused so that the request layer's fallback to
  // plain writes gets exercised (QEMU's blkdebug does the same).
  const uint64_t align =
      std::max<uint64_t>(limits().request_alignment, limits().pwrite_zeroes_alignment);
  if (bytes < align) {
    co_return Error::from_errno(ENOTSUP, "blkdebug: write-zeroes below alignment");
  }
  Result<bool> skip = co_await check(offset, bytes, IoType::kWriteZeroes);
  if (!skip) {
    co_return std::move(skip).error();
  }
  if (*skip) {
    co_return ok();
  }
  auto result = co_await io::pwrite_zeroes(image(), offset, bytes, flags);
  co_return result;
}

aio::Task<Result<void>> BlkdebugNode::co_pdiscard(uint64_t offset, uint64_t bytes) {
  ++write_generation_;
  if (bytes < limits().request_alignment) {
    co_return Error::from_errno(ENOTSUP, "blkdebug: discard below alignment");
  }
  Result<bool> skip = co_await check(offset, bytes, IoType::kDiscard);
  if (!skip) {
    co_return std::move(skip).error();
  }
  if (*skip) {
    co_return ok();
  }
  auto result = co_await io::pdiscard(image(), offset, bytes);
  co_return result;
}

aio::Task<Result<BlockStatus>> BlkdebugNode::co_block_status(uint64_t offset, uint64_t bytes) {
  Result<bool> skip = co_await check(offset, bytes, IoType::kBlockStatus);
  if (!skip) {
    co_return std::move(skip).error();
  }
  BlockStatus status;
  status.bytes = bytes;
  status.flags = BlockStatus::kRecurse | BlockStatus::kOffsetValid;
  status.map_offset = offset;
  status.file = &image();
  co_return status;
}

aio::Task<Result<void>> BlkdebugNode::co_truncate(uint64_t new_size, bool exact) {
  // blkdebug has no truncate of its own: QEMU forwards a filter's resize to its child.
  ++write_generation_;
  auto result = co_await io::truncate(image(), new_size, exact);
  co_return result;
}

}  // namespace strata::block
