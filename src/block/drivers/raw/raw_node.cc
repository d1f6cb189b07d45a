#include "block/drivers/raw/raw_node.h"

#include <cstdint>

#include "block/drivers/blkdebug/events.h"
#include "block/io/request.h"

namespace strata::block {

std::unique_ptr<DriverOptions> RawNode::parse(ArgDecoder& d) {
  auto options = std::make_unique<RawOptions>();
  if (auto file = parse_blockdev_ref(d, "file", true)) {
    options->file = std::move(*file);
  }
  // QAPI declares both as int; the range is checked when the node opens, after its child.
  options->offset = d.opt_i64("offset");
  options->size = d.opt_i64("size");
  return options;
}

Result<std::shared_ptr<Node>> RawNode::open(OpenContext& context, const BlockdevOptions& options) {
  const auto& raw = static_cast<const RawOptions&>(*options.driver_options);
  std::optional<uint64_t> size;
  if (raw.size && *raw.size >= 0) {
    size = static_cast<uint64_t>(*raw.size);
  }
  uint64_t offset = raw.offset && *raw.offset > 0 ? static_cast<uint64_t>(*raw.offset) : 0;
  auto node = std::make_shared<RawNode>(context.options(), offset, size);
  // QEMU's raw_open: a plain raw node filters its file; a window makes the file a data child.
  uint32_t role = node->has_window() ? (kRoleData | kRolePrimary) : (kRoleFiltered | kRolePrimary);
  auto child = context.attach(*node, raw.file, "file", role);
  if (!child) {
    return std::move(child).error();
  }
  for (const auto& [name, value] : {std::pair{"offset", raw.offset}, std::pair{"size", raw.size}}) {
    if (value && *value < 0) {
      return make_error(
          ErrorKind::kInvalidArgument,
          "Value '" + std::to_string(*value) + "' is out of range for parameter '" + name + "'");
    }
  }
  auto window = check_window(node->offset_, node->size_, (*child)->node()->length());
  if (!window) {
    return std::move(window).error();
  }
  node->limits_ = (*child)->node()->limits();
  return std::shared_ptr<Node>(std::move(node));
}

Result<void> RawNode::check_window(uint64_t offset, std::optional<uint64_t> size,
                                   uint64_t file_length) {
  if (offset > file_length) {
    return make_error(ErrorKind::kInvalidArgument,
                      "Offset (" + std::to_string(offset) +
                          ") cannot be greater than size of the containing file (" +
                          std::to_string(file_length) + ")");
  }
  if (size && offset + *size > file_length) {
    return make_error(ErrorKind::kInvalidArgument,
                      "The sum of offset (" + std::to_string(offset) + ") and size (" +
                          std::to_string(*size) +
                          ") has to be smaller or equal to the  actual size of the containing "
                          "file (" +
                          std::to_string(file_length) + ")");
  }
  if (size && *size % 512 != 0) {
    return make_error(ErrorKind::kInvalidArgument, "Specified size is not multiple of 512");
  }
  return ok();
}

Result<std::function<void()>> RawNode::prepare_reopen(const DriverOptions& options) {
  const auto& raw = static_cast<const RawOptions&>(options);
  if (raw.file.inline_options || raw.file.node_name != file().name()) {
    return make_error(ErrorKind::kUnsupported, "Cannot change the option 'file'");
  }
  for (const auto& [name, value] : {std::pair{"offset", raw.offset}, std::pair{"size", raw.size}}) {
    if (value && *value < 0) {
      return make_error(
          ErrorKind::kInvalidArgument,
          "Value '" + std::to_string(*value) + "' is out of range for parameter '" + name + "'");
    }
  }
  uint64_t offset = raw.offset ? static_cast<uint64_t>(*raw.offset) : 0;
  std::optional<uint64_t> size;
  if (raw.size) {
    size = static_cast<uint64_t>(*raw.size);
  }
  auto window = check_window(offset, size, file().length());
  if (!window) {
    return std::move(window).error();
  }
  return std::function<void()>([this, offset, size] {
    offset_ = offset;
    size_ = size;
  });
}

void RawNode::child_perm(const Child& child, uint64_t perm, uint64_t shared, uint64_t& child_perm,
                         uint64_t& child_shared) const {
  Node::child_perm(child, perm, shared, child_perm, child_shared);
  child_perm &= ~(kPermWrite | kPermResize);
  child_perm |= perm & (kPermWrite | kPermResize);
}

RawNode::RawNode(CommonOptions common, uint64_t offset, std::optional<uint64_t> size)
    : Node(std::move(common)), offset_(offset), size_(size) {}

std::optional<std::string> RawNode::exact_filename() const {
  if (has_window()) {
    return std::nullopt;
  }
  return file().exact_filename();
}

nlohmann::json RawNode::strong_options() const {
  nlohmann::json options = nlohmann::json::object();
  if (offset_ != 0) {
    options["offset"] = offset_;
  }
  if (size_) {
    options["size"] = *size_;
  }
  return options;
}

uint64_t RawNode::length() const {
  if (size_) {
    return *size_;
  }
  uint64_t file_length = file().length();
  return file_length > offset_ ? file_length - offset_ : 0;
}

aio::Task<Result<void>> RawNode::co_preadv(uint64_t offset, uint64_t, IoVector qiov,
                                           uint32_t flags) {
  block::debug_event(children().front().get(), BlkdebugEvent::kReadAio);
  auto result = co_await io::preadv(file(), offset + offset_, std::move(qiov), flags);
  co_return result;
}

aio::Task<Result<void>> RawNode::co_pwritev(uint64_t offset, uint64_t, IoVector qiov,
                                            uint32_t flags) {
  block::debug_event(children().front().get(), BlkdebugEvent::kWriteAio);
  auto result = co_await io::pwritev(file(), offset + offset_, std::move(qiov), flags);
  co_return result;
}

aio::Task<Result<void>> RawNode::co_pdiscard(uint64_t offset, uint64_t bytes) {
  auto result = co_await io::pdiscard(file(), offset + offset_, bytes);
  co_return result;
}

aio::Task<Result<void>> RawNode::co_pwrite_zeroes(uint64_t offset, uint64_t bytes, uint32_t flags) {
  auto result = co_await io::pwrite_zeroes(file(), offset + offset_, bytes, flags);
  co_return result;
}

aio::Task<Result<BlockStatus>> RawNode::co_block_status(uint64_t offset, uint64_t bytes) {
  BlockStatus status;
  status.bytes = bytes;
  status.flags = BlockStatus::kRecurse | BlockStatus::kOffsetValid;
  status.map_offset = offset + offset_;
  status.file = &file();
  co_return status;
}

aio::Task<Result<void>> RawNode::co_truncate(uint64_t new_size, bool exact) {
  // QEMU's raw_co_truncate: only an explicit size fixes the length; an offset-only window
  // follows the file, which is resized to offset + new size.
  if (size_) {
    co_return make_error(ErrorKind::kUnsupported, "Cannot resize fixed-size raw disks");
  }
  if (new_size > static_cast<uint64_t>(INT64_MAX) - offset_) {
    co_return make_error(ErrorKind::kInvalidArgument, "Disk size too large for the chosen offset");
  }
  auto result = co_await io::truncate(file(), new_size + offset_, exact);
  co_return result;
}

}  // namespace strata::block
