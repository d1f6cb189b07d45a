#include "block/drivers/cbw/cbw_node.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <climits>

#include "block/bitmap/dirty_bitmap.h"
#include "block/io/request.h"

namespace strata::block {

namespace {
constexpr std::array<std::string_view, 2> kOnCbwError = {"break-guest-write", "break-snapshot"};
}  // namespace

std::unique_ptr<DriverOptions> CbwNode::parse(ArgDecoder& d) {
  auto options = std::make_unique<CbwOptions>();
  if (auto file = parse_blockdev_ref(d, "file", true)) {
    options->file = std::move(*file);
  }
  if (auto target = parse_blockdev_ref(d, "target", true)) {
    options->target = std::move(*target);
  }
  if (auto bitmap = d.opt_object("bitmap")) {
    options->bitmap_node = bitmap->str("node");
    options->bitmap_name = bitmap->str("name");
    (void)bitmap->finish();
  }
  options->break_snapshot =
      d.opt_enum("on-cbw-error", kOnCbwError).value_or("break-guest-write") == "break-snapshot";
  options->min_cluster_size = d.opt_size("min-cluster-size").value_or(0);
  if (auto timeout = d.opt_u64("cbw-timeout")) {
    if (*timeout > UINT32_MAX) {
      d.fail(make_error(ErrorKind::kInvalidArgument, "Parameter 'cbw-timeout' expects uint32_t"));
    }
    options->cbw_timeout = static_cast<uint32_t>(*timeout);
  }
  return options;
}

CbwNode::CbwNode(CommonOptions common, bool break_snapshot, uint32_t timeout_seconds)
    : Node(std::move(common)),
      break_snapshot_(break_snapshot),
      timeout_ns_(uint64_t{timeout_seconds} * 1'000'000'000) {}

Result<std::shared_ptr<Node>> CbwNode::open(OpenContext& context, const BlockdevOptions& options) {
  const auto& o = static_cast<const CbwOptions&>(*options.driver_options);
  auto node = std::make_shared<CbwNode>(context.options(), o.break_snapshot, o.cbw_timeout);
  auto file = context.attach(*node, o.file, "file", kRoleFiltered | kRolePrimary);
  if (!file) {
    return std::move(file).error();
  }
  auto target = context.attach(*node, o.target, "target", kRoleData);
  if (!target) {
    return std::move(target).error();
  }
  if (o.min_cluster_size != 0 && (o.min_cluster_size & (o.min_cluster_size - 1)) != 0) {
    return make_error(ErrorKind::kInvalidArgument,
                      "Cannot create block-copy-state: min-cluster-size needs to be a power of 2");
  }
  Node& source = *(*file)->node();
  Node& target_node = *(*target)->node();
  copy::BlockCopyOptions copy_options;
  copy_options.min_cluster_size = o.min_cluster_size;
  // A target backed by the source (fleecing) must not be read while a copy is half written.
  Child* target_backing = target_node.backing_child();
  copy_options.serialise_target_writes =
      target_backing != nullptr && target_backing->node() == &source;
  auto block_copy = copy::BlockCopy::create(source, target_node, copy_options);
  if (!block_copy) {
    return std::move(block_copy).error();
  }
  node->block_copy_ = std::move(block_copy).value();
  if (o.bitmap_node) {
    Node* bitmap_node = context.graph().find(*o.bitmap_node);
    if (bitmap_node == nullptr) {
      return make_error(ErrorKind::kNotFound, "Cannot find device='" + *o.bitmap_node +
                                                  "' nor node-name='" + *o.bitmap_node + "'");
    }
    bitmap::DirtyBitmap* bitmap = bitmap_node->dirty_bitmaps().find(*o.bitmap_name);
    if (bitmap == nullptr) {
      return make_error(ErrorKind::kNotFound, "Dirty bitmap '" + *o.bitmap_name + "' not found");
    }
    bitmap::DirtyBitmap& frozen = node->block_copy_->copy_bitmap();
    frozen.clear();
    frozen.merge_from(*bitmap);
  }
  const uint64_t cluster = node->block_copy_->cluster_size();
  node->access_bitmap_ =
      std::make_unique<bitmap::DirtyBitmap>("", source.length(), static_cast<uint32_t>(cluster));
  node->access_bitmap_->merge_from(node->block_copy_->copy_bitmap());
  node->done_bitmap_ =
      std::make_unique<bitmap::DirtyBitmap>("", source.length(), static_cast<uint32_t>(cluster));
  node->limits_ = source.limits();
  return std::shared_ptr<Node>(std::move(node));
}

void CbwNode::child_perm(const Child& child, uint64_t perm, uint64_t shared, uint64_t& child_perm,
                         uint64_t& child_shared) const {
  if ((child.role() & kRoleFiltered) == 0) {
    child_perm = kPermWrite;
    child_shared = kPermAll & ~kPermResize;
    return;
  }
  Node::child_perm(child, perm, shared, child_perm, child_shared);
  child_perm |= kPermConsistentRead;
}

aio::Task<Result<void>> CbwNode::copy_before_write(uint64_t offset, uint64_t bytes) {
  if (snapshot_broken_) {
    co_return ok();
  }
  const uint64_t cluster = block_copy_->cluster_size();
  const uint64_t start = offset / cluster * cluster;
  const uint64_t end = std::min(length(), (offset + bytes + cluster - 1) / cluster * cluster);
  Result<void> copied = ok();
  if (block_copy_->range_done(offset, bytes)) {
    // Copied before (or never to be copied): no call, no coroutine, nothing to wait for.
  } else if (timeout_ns_ == 0) {
    copied = co_await block_copy_->copy_range(offset, bytes);
  } else {
    copied = co_await copy_with_timeout(start, (offset + bytes + cluster - 1) / cluster * cluster);
  }
  if (!copied && !break_snapshot_) {
    co_return copied;
  }
  if (copied) {
    done_bitmap_->set(start, end - start);
  } else {
    snapshot_broken_ = true;  // the guest write goes on; the frozen view is lost
  }
  // Snapshot readers still reading the old data from `file` finish first.
  if (!frozen_reads_.empty()) {
    co_await wait_frozen_reads(start, end - start);
  }
  co_return ok();
}

aio::Task<Result<void>> CbwNode::co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                           uint32_t flags) {
  (void)bytes;
  co_return co_await io::preadv(file(), offset, std::move(qiov), flags & kRequestNoSerialising);
}

aio::Task<Result<void>> CbwNode::co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                            uint32_t flags) {
  auto copied = co_await copy_before_write(offset, bytes);
  if (!copied) {
    co_return copied;
  }
  co_return co_await io::pwritev(file(), offset, std::move(qiov), flags);
}

aio::Task<Result<void>> CbwNode::co_pwrite_zeroes(uint64_t offset, uint64_t bytes, uint32_t flags) {
  auto copied = co_await copy_before_write(offset, bytes);
  if (!copied) {
    co_return copied;
  }
  co_return co_await io::pwrite_zeroes(file(), offset, bytes, flags);
}

aio::Task<Result<void>> CbwNode::co_pdiscard(uint64_t offset, uint64_t bytes) {
  auto copied = co_await copy_before_write(offset, bytes);
  if (!copied) {
    co_return copied;
  }
  co_return co_await io::pdiscard(file(), offset, bytes);
}

struct CbwNode::TimedCopy {
  copy::BlockCopy::Call call;
  std::optional<Result<void>> result;  // set when the copy ends
  aio::Event finished;                 // the copy ended or the timeout passed
};

aio::Task<Result<void>> CbwNode::copy_with_timeout(uint64_t start, uint64_t end) {
  auto copy = std::make_shared<TimedCopy>();
  copy->call.offset = start;
  copy->call.bytes = end - start;
  copy->call.ignore_ratelimit = true;
  background_.spawn(run_timed_copy(copy));
  if (!copy->result) {
    background_.spawn(run_timer(copy));
    co_await copy->finished.wait();
  }
  if (copy->result) {
    co_return *copy->result;
  }
  // No new chunks; the ones in flight finish in the background.
  block_copy_->cancel(copy->call);
  co_return Error(ErrorKind::kTimeout, "Connection timed out", ETIMEDOUT);
}

aio::Task<void> CbwNode::run_timed_copy(std::shared_ptr<TimedCopy> copy) {
  Result<void> result = co_await block_copy_->run(copy->call);
  copy->result = std::move(result);
  copy->finished.set();
}

aio::Task<void> CbwNode::run_timer(std::shared_ptr<TimedCopy> copy) {
  (void)co_await aio::EventLoop::current()->sleep_for(std::chrono::nanoseconds(timeout_ns_));
  copy->finished.set();
}

}  // namespace strata::block
