#include "block/drivers/throttle/throttle_node.h"

#include "block/graph/graph.h"
#include "block/io/request.h"

namespace strata::block {

std::unique_ptr<DriverOptions> ThrottleNode::parse(ArgDecoder& d) {
  auto options = std::make_unique<ThrottleOptions>();
  options->group = d.str("throttle-group");
  if (auto file = parse_blockdev_ref(d, "file", true)) {
    options->file = std::move(*file);
  }
  return options;
}

Result<std::shared_ptr<Node>> ThrottleNode::open(OpenContext& context,
                                                 const BlockdevOptions& options) {
  const auto& o = static_cast<const ThrottleOptions&>(*options.driver_options);
  const throttle::ThrottleGroups* groups = context.graph().throttle_groups();
  std::shared_ptr<throttle::ThrottleGroup> group =
      groups != nullptr ? groups->find(o.group) : nullptr;
  if (group == nullptr) {
    return make_error(ErrorKind::kNotFound, "Throttle group '" + o.group + "' does not exist");
  }
  auto node = std::make_shared<ThrottleNode>(context.options(), std::move(group));
  auto file = context.attach(*node, o.file, "file", kRoleFiltered | kRolePrimary);
  if (!file) {
    return std::move(file).error();
  }
  node->limits_ = (*file)->node()->limits();
  return std::shared_ptr<Node>(std::move(node));
}

aio::Task<void> ThrottleNode::wait_turn(throttle::Direction direction, uint64_t bytes) {
  co_await group_->intercept(direction, bytes, [this] { return requests().quiesced(); });
}

aio::Task<Result<void>> ThrottleNode::co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                                uint32_t flags) {
  co_await wait_turn(throttle::Direction::kRead, bytes);
  co_return co_await io::preadv(file(), offset, std::move(qiov), flags);
}

aio::Task<Result<void>> ThrottleNode::co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                                 uint32_t flags) {
  co_await wait_turn(throttle::Direction::kWrite, bytes);
  co_return co_await io::pwritev(file(), offset, std::move(qiov), flags);
}

aio::Task<Result<void>> ThrottleNode::co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                                       uint32_t flags) {
  co_await wait_turn(throttle::Direction::kWrite, bytes);
  co_return co_await io::pwrite_zeroes(file(), offset, bytes, flags);
}

aio::Task<Result<void>> ThrottleNode::co_pdiscard(uint64_t offset, uint64_t bytes) {
  co_await wait_turn(throttle::Direction::kWrite, bytes);
  co_return co_await io::pdiscard(file(), offset, bytes);
}

}  // namespace strata::block
