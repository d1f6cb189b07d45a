#include "block/drivers/null/null_node.h"

#include <chrono>

#include "aio/event_loop.h"

namespace strata::block {

std::unique_ptr<DriverOptions> NullNode::parse(ArgDecoder& d) {
  auto options = std::make_unique<NullOptions>();
  if (auto size = d.opt_i64("size")) {
    if (*size < 0) {
      d.fail(make_error(ErrorKind::kInvalidArgument, "Value '" + std::to_string(*size) +
                                                         "' is out of range for parameter 'size'"));
    } else {
      options->size = static_cast<uint64_t>(*size);
    }
  }
  options->latency_ns = d.opt_u64("latency-ns").value_or(0);
  options->read_zeroes = d.opt_bool("read-zeroes").value_or(false);
  return options;
}

Result<std::shared_ptr<Node>> NullNode::open_co(OpenContext& context,
                                                const BlockdevOptions& options) {
  const auto& null_options = static_cast<const NullOptions&>(*options.driver_options);
  return std::shared_ptr<Node>(
      std::make_shared<NullNode>(context.options(), null_options, "null-co"));
}

Result<std::shared_ptr<Node>> NullNode::open_aio(OpenContext& context,
                                                 const BlockdevOptions& options) {
  const auto& null_options = static_cast<const NullOptions&>(*options.driver_options);
  return std::shared_ptr<Node>(
      std::make_shared<NullNode>(context.options(), null_options, "null-aio"));
}

NullNode::NullNode(CommonOptions common, const NullOptions& options, const char* driver)
    : Node(std::move(common)),
      driver_(driver),
      size_(options.size.value_or(1ull << 30)),
      latency_ns_(options.latency_ns),
      read_zeroes_(options.read_zeroes),
      size_given_(options.size.has_value()) {}

std::optional<std::string> NullNode::exact_filename() const {
  // "null-co://" alone reopens a default null node; any strong option needs a json: filename.
  if (strong_options().empty()) {
    return std::string(driver_) + "://";
  }
  return std::nullopt;
}

nlohmann::json NullNode::strong_options() const {
  nlohmann::json options = nlohmann::json::object();
  if (size_given_) {
    options["size"] = size_;
  }
  if (read_zeroes_) {
    options["read-zeroes"] = true;
  }
  if (latency_ns_ != 0) {
    options["latency-ns"] = latency_ns_;
  }
  return options;
}

aio::Task<void> NullNode::simulate_latency() {
  if (latency_ns_ == 0) {
    co_return;
  }
  aio::EventLoop* loop = aio::EventLoop::current();
  if (loop != nullptr) {
    int expired = co_await loop->sleep_for(std::chrono::nanoseconds(latency_ns_));
    (void)expired;  // -ETIME is the normal outcome; -ECANCELED only at teardown
  }
}

aio::Task<Result<void>> NullNode::co_preadv(uint64_t, uint64_t bytes, IoVector qiov, uint32_t) {
  co_await simulate_latency();
  if (read_zeroes_) {
    qiov.fill(0, 0, bytes);
  }
  co_return ok();
}

aio::Task<Result<void>> NullNode::co_pwritev(uint64_t, uint64_t, IoVector, uint32_t) {
  co_await simulate_latency();
  co_return ok();
}

aio::Task<Result<void>> NullNode::co_flush() {
  co_await simulate_latency();
  co_return ok();
}

aio::Task<Result<void>> NullNode::co_pwrite_zeroes(uint64_t, uint64_t, uint32_t) {
  co_await simulate_latency();
  co_return ok();
}

aio::Task<Result<BlockStatus>> NullNode::co_block_status(uint64_t offset, uint64_t bytes) {
  BlockStatus status;
  status.bytes = bytes;
  status.map_offset = offset;
  status.file = this;
  status.flags = BlockStatus::kOffsetValid;
  if (read_zeroes_) {
    status.flags |= BlockStatus::kZero;
  }
  co_return status;
}

}  // namespace strata::block
