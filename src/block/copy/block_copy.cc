#include "block/copy/block_copy.h"

#include <algorithm>
#include <chrono>

#include <fmt/format.h>

#include "aio/event_loop.h"
#include "aio/task_group.h"
#include "block/io/bounce_buffer.h"
#include "block/io/request.h"

namespace strata::block::copy {

namespace {

uint64_t align_down(uint64_t value, uint64_t alignment) {
  return value / alignment * alignment;
}
uint64_t align_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

// Longest sleep between checks for a speed change or a cancel.
constexpr uint64_t kThrottleSliceNs = 10'000'000;

}  // namespace

struct BlockCopy::Task {
  uint64_t offset = 0;
  uint64_t bytes = 0;
  bool zeroes = false;
  aio::Event done;
  uint64_t end() const { return offset + bytes; }
};

ClusterSizeResult calculate_cluster_size(const Node& target, uint64_t min_cluster_size) {
  const uint64_t minimum = std::max(min_cluster_size, kDefaultClusterSize);
  std::optional<uint64_t> target_cluster = target.cluster_size();
  if (!target_cluster) {
    // raw and protocol nodes report no cluster size (QEMU's bdrv_get_info fails with ENOTSUP).
    const Node* format = &target;
    bool has_backing = format->backing_child() != nullptr;
    if (has_backing) {
      return {minimum, std::nullopt};
    }
    return {minimum,
            fmt::format("The target block device doesn't provide information about the block "
                        "size and it doesn't have a backing file. The (default) block size of "
                        "{} bytes is used. If the actual block size of the target exceeds this "
                        "value, the backup may be unusable",
                        minimum)};
  }
  return {std::max(minimum, *target_cluster), std::nullopt};
}

Result<std::unique_ptr<BlockCopy>> BlockCopy::create(Node& source, Node& target,
                                                     const BlockCopyOptions& options) {
  ClusterSizeResult cluster = calculate_cluster_size(target, options.min_cluster_size);
  if (cluster.cluster_size > UINT32_MAX) {
    return make_error(ErrorKind::kInvalidArgument, "Cluster size is too large");
  }
  return std::unique_ptr<BlockCopy>(new BlockCopy(source, target, cluster.cluster_size, options));
}

BlockCopy::BlockCopy(Node& source, Node& target, uint64_t cluster_size,
                     const BlockCopyOptions& options)
    : source_(source),
      target_(target),
      cluster_size_(cluster_size),
      length_(source.length()),
      options_(options),
      copy_bitmap_(std::make_unique<bitmap::DirtyBitmap>("", source.length(),
                                                         static_cast<uint32_t>(cluster_size))) {
  copy_bitmap_->set(0, length_);
}

BlockCopy::~BlockCopy() = default;

uint64_t BlockCopy::remaining_bytes() const {
  return copy_bitmap_->count() + in_flight_bytes_;
}

RegionState BlockCopy::state_of(uint64_t offset) const {
  if (find_in_flight(offset, 1)) {
    return RegionState::kInFlight;
  }
  return copy_bitmap_->test(offset) ? RegionState::kNotStarted : RegionState::kDone;
}

bool BlockCopy::range_done(uint64_t offset, uint64_t bytes) const {
  const uint64_t start = align_down(offset, cluster_size_);
  const uint64_t end = std::min(align_up(offset + bytes, cluster_size_), length_);
  std::optional<uint64_t> dirty = copy_bitmap_->next_dirty(start);
  if (dirty && *dirty < end) {
    return false;
  }
  return in_flight_.empty() || find_in_flight(start, end - start) == nullptr;
}

void BlockCopy::set_speed(uint64_t bytes_per_second) {
  rate_limit_.set_speed(bytes_per_second, job::RateLimit::kSliceNs);
  ++wake_generation_;
}

void BlockCopy::cancel(Call& call) {
  call.cancelled = true;
  ++wake_generation_;
}

std::shared_ptr<BlockCopy::Task> BlockCopy::find_in_flight(uint64_t offset, uint64_t bytes) const {
  for (const auto& task : in_flight_) {
    if (task->offset < offset + bytes && offset < task->end()) {
      return task;
    }
  }
  return nullptr;
}

std::shared_ptr<BlockCopy::Task> BlockCopy::claim(uint64_t offset, uint64_t end,
                                                  uint64_t max_bytes) {
  std::optional<uint64_t> start = copy_bitmap_->next_dirty(offset);
  if (!start || *start >= end) {
    return nullptr;
  }
  uint64_t run_end = copy_bitmap_->next_zero(*start).value_or(length_);
  run_end = std::min({run_end, end, *start + max_bytes, length_});
  auto task = std::make_shared<Task>();
  task->offset = *start;
  task->bytes = run_end - *start;
  copy_bitmap_->reset(task->offset, task->bytes);
  in_flight_bytes_ += task->bytes;
  in_flight_.push_back(task);
  return task;
}

void BlockCopy::end_task(Task& task, bool copied, bool skipped) {
  in_flight_bytes_ -= task.bytes;
  if (!copied && !skipped) {
    copy_bitmap_->set(task.offset, task.bytes);
  }
  in_flight_.erase(std::remove_if(in_flight_.begin(), in_flight_.end(),
                                  [&](const std::shared_ptr<Task>& t) { return t.get() == &task; }),
                   in_flight_.end());
  if (copied) {
    if (progress_.done) {
      progress_.done(task.bytes);
    }
  } else if (progress_.set_remaining) {
    progress_.set_remaining(remaining_bytes());
  }
  task.done.set();
}

uint64_t BlockCopy::chunk_limit(const Call& call) const {
  if (options_.compress) {
    return cluster_size_;  // compressed writes are whole clusters
  }
  uint64_t limit = kMaxBuffer;
  if (target_.limits().max_transfer != 0) {
    limit = std::min(limit, target_.limits().max_transfer);
  }
  if (call.max_chunk != 0) {
    limit = std::min(limit, call.max_chunk);
  }
  return std::max(align_down(limit, cluster_size_), cluster_size_);
}

aio::Task<bool> BlockCopy::classify(Task& task) {
  auto status = co_await io::block_status(source_, task.offset, task.bytes);
  uint64_t run = cluster_size_;
  uint32_t flags = BlockStatus::kAllocated | BlockStatus::kData;
  if (status && status->bytes >= cluster_size_) {
    flags = status->flags;
    run = task.offset + status->bytes >= length_ ? align_up(status->bytes, cluster_size_)
                                                 : align_down(status->bytes, cluster_size_);
  }
  if (run < task.bytes) {
    // Shrink: the rest of the task is not started again (QEMU's block_copy_task_shrink).
    copy_bitmap_->set(task.offset + run, task.bytes - run);
    in_flight_bytes_ -= task.bytes - run;
    task.bytes = run;
  }
  if (skip_unallocated_ && (flags & BlockStatus::kAllocated) == 0) {
    end_task(task, false, true);
    co_return false;
  }
  // Neither data nor zero: unallocated; without a backing file that reads as zeroes (QEMU's
  // block status above no base reports BDRV_BLOCK_ZERO there).
  const bool unallocated_without_backing =
      (flags & (BlockStatus::kData | BlockStatus::kZero)) == 0 &&
      source_.backing_child() == nullptr;
  task.zeroes = (flags & BlockStatus::kZero) != 0 || unallocated_without_backing;
  co_return true;
}

aio::Task<Result<uint64_t>> BlockCopy::reset_unallocated(uint64_t offset) {
  const uint64_t bytes = std::min(length_ - offset, kMaxBuffer * 16);
  auto status = co_await io::block_status(source_, offset, bytes);
  if (!status) {
    co_return std::move(status).error();
  }
  uint64_t run = offset + status->bytes >= length_ ? length_ - offset
                                                   : align_down(status->bytes, cluster_size_);
  if (run == 0) {
    co_return std::min(cluster_size_, length_ - offset);  // shorter than a cluster: keep it
  }
  if ((status->flags & BlockStatus::kAllocated) == 0) {
    copy_bitmap_->reset(offset, run);
    if (progress_.set_remaining) {
      progress_.set_remaining(remaining_bytes());
    }
  }
  co_return run;
}

aio::Task<Result<void>> BlockCopy::copy_chunk(Task& task, bool& error_is_read) {
  const uint64_t bytes = std::min(task.bytes, length_ - task.offset);
  const uint32_t serialise =
      options_.serialise_target_writes ? uint32_t{kRequestSerialising} : uint32_t{0};
  if (task.zeroes) {
    error_is_read = false;
    co_return co_await io::pwrite_zeroes(target_, task.offset, bytes, serialise);
  }
  auto buffer = io::BounceBuffer::allocate(
      bytes, std::max(source_.limits().memory_alignment, target_.limits().memory_alignment));
  if (!buffer) {
    co_return std::move(buffer).error();
  }
  // The source read does not wait for serialising requests: copy-before-write reads the old
  // data while the guest write that triggered it holds its range.
  auto read = co_await io::preadv(source_, task.offset, IoVector(buffer->data(), bytes),
                                  kRequestNoSerialising);
  if (!read) {
    error_is_read = true;
    co_return read;
  }
  error_is_read = false;
  uint32_t flags = serialise;
  if (options_.compress) {
    flags |= kRequestWriteCompressed;
  }
  co_return co_await io::pwritev(target_, task.offset, IoVector(buffer->data(), bytes), flags);
}

aio::Task<void> BlockCopy::run_task(Call& call, std::shared_ptr<Task> task, int& workers,
                                    aio::CoQueue& worker_done) {
  bool error_is_read = false;
  Result<void> copied = co_await copy_chunk(*task, error_is_read);
  if (!copied && !call.error) {
    call.error = std::move(copied).error();
    call.error_is_read = error_is_read;
  }
  end_task(*task, copied.ok());
  --workers;
  worker_done.notify_all();
}

aio::Task<void> BlockCopy::throttle_sleep(Call& call, uint64_t ns) {
  const uint64_t generation = wake_generation_;
  const uint64_t deadline = job::RateLimit::monotonic_now_ns() + ns;
  aio::EventLoop* loop = aio::EventLoop::current();
  while (!call.cancelled && generation == wake_generation_) {
    const uint64_t now = job::RateLimit::monotonic_now_ns();
    if (now >= deadline) {
      break;
    }
    co_await loop->sleep_for(std::chrono::nanoseconds(std::min(deadline - now, kThrottleSliceNs)));
  }
}

aio::Task<Result<void>> BlockCopy::run(Call& call) {
  const uint64_t end = std::min(call.offset + call.bytes, length_);
  const int max_workers = std::max(call.max_workers, 1);
  while (true) {
    // QEMU's block_copy_dirty_clusters: claim not-started runs and copy them in parallel.
    bool found = false;
    int workers = 0;
    aio::CoQueue worker_done;
    aio::TaskGroup group;
    uint64_t position = call.offset;
    while (position < end && !call.cancelled && !call.error) {
      // A free worker first, so that nothing is claimed after a failure or a cancel.
      while (workers >= max_workers) {
        co_await worker_done.wait();
      }
      if (call.cancelled || call.error) {
        break;
      }
      std::shared_ptr<Task> task = claim(position, end, chunk_limit(call));
      if (!task) {
        break;
      }
      found = true;
      if (!co_await classify(*task)) {
        position = task->end();
        continue;
      }
      if (rate_limit_.speed() != 0 && !call.ignore_ratelimit) {
        const uint64_t delay = rate_limit_.delay_ns(0);
        if (delay > 0) {
          end_task(*task, false);
          co_await throttle_sleep(call, delay);
          continue;
        }
        (void)rate_limit_.delay_ns(task->bytes);
      }
      position = task->end();
      ++workers;
      group.spawn(run_task(call, std::move(task), workers, worker_done));
    }
    co_await group.wait();
    if (call.error) {
      co_return *call.error;
    }
    if (call.cancelled) {
      co_return make_error(ErrorKind::kCancelled, "Operation canceled");
    }
    if (!found) {
      // Nothing left to claim: wait for another call's task over our range, then look again
      // (a task that failed has put its clusters back).
      if (std::shared_ptr<Task> other = find_in_flight(call.offset, end - call.offset)) {
        co_await other->done.wait();
        continue;
      }
      std::optional<uint64_t> dirty = copy_bitmap_->next_dirty(call.offset);
      if (!dirty || *dirty >= end) {
        co_return ok();
      }
    }
  }
}

aio::Task<Result<void>> BlockCopy::copy_range(uint64_t offset, uint64_t bytes) {
  Call call;
  call.offset = align_down(offset, cluster_size_);
  call.bytes = align_up(offset + bytes, cluster_size_) - call.offset;
  call.ignore_ratelimit = true;
  co_return co_await run(call);
}

}  // namespace strata::block::copy
