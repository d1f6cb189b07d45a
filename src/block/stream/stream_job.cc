#include "block/stream/stream_job.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include "aio/event_loop.h"
#include "block/io/request.h"

namespace strata::block::stream {

namespace {

// QEMU's STREAM_CHUNK.
constexpr uint64_t kChunk = 512 << 10;
// The longest single sleep of the rate limit, so that pause and cancel stay responsive.
constexpr uint64_t kMaxSleepNs = 100'000'000;

class StreamJob : public job::BlockJob, public BlockParent {
 public:
  StreamJob(Graph& graph, StreamOptions options)
      : BlockJob(options.job_id, "stream", options.flags),
        graph_(graph),
        options_(std::move(options)) {}

  ~StreamJob() override { release(); }

  std::string parent_description() const override { return "stream job '" + id() + "'"; }

  Result<void> attach() {
    auto root =
        graph_.attach_root(*this, options_.top, "top", kRoleData,
                           kPermConsistentRead | kPermWriteUnchanged, kPermAll & ~kPermResize);
    if (!root) {
      return std::move(root).error();
    }
    root_ = std::move(root).value();
    return ok();
  }

 protected:
  aio::Task<Result<void>> run() override {
    Node& top = *options_.top;
    const uint64_t length = top.length();
    progress_set_remaining(length);
    std::vector<char> buffer(kChunk);
    std::optional<Error> first_error;
    for (uint64_t offset = 0; offset < length;) {
      if (is_cancelled()) {
        co_return ok();
      }
      co_await pause_point();
      if (is_cancelled()) {
        co_return ok();
      }
      uint64_t bytes = std::min(kChunk, length - offset);
      bool copy = false;
      Result<BlockStatus> own = co_await top.co_block_status(offset, bytes);
      if (!own) {
        co_return own.error();
      }
      bytes = std::min(bytes, std::max<uint64_t>(own->bytes, 1));
      Child* backing = top.backing_child();
      if (!own->allocated_here() && backing != nullptr) {
        Result<io::Allocation> above =
            co_await io::is_allocated_above(*backing->node(), options_.base.get(), offset, bytes);
        if (!above) {
          co_return above.error();
        }
        bytes = above->bytes;
        copy = above->allocated;
      }
      if (copy) {
        Result<void> copied =
            co_await io::preadv(top, offset, IoVector(buffer.data(), bytes), kRequestCopyOnRead);
        if (!copied) {
          const job::ErrorAction action =
              error_action(options_.on_error, /*is_read=*/true, copied.error().errno_value());
          if (action == job::ErrorAction::kStop) {
            continue;  // the job is paused; the chunk is tried again after the resume
          }
          if (!first_error) {
            first_error = copied.error();
          }
          if (action == job::ErrorAction::kReport) {
            break;
          }
        }
      }
      progress_update(bytes);
      offset += bytes;
      if (copy) {
        co_await rate_limit(bytes);
      }
    }
    if (first_error) {
      co_return Error::from_errno(first_error->errno_value(), "");
    }
    co_return co_await change_backing();
  }

  void clean() override { release(); }

 private:
  aio::Task<void> rate_limit(uint64_t bytes) {
    uint64_t delay = ratelimit_delay_ns(bytes);
    // A speed change to unlimited (block-job-set-speed 0) ends the wait early.
    while (delay > 0 && !is_cancelled() && speed() != 0) {
      const uint64_t step = std::min(delay, kMaxSleepNs);
      co_await aio::EventLoop::current()->sleep_for(std::chrono::nanoseconds(step));
      delay -= step;
    }
  }

  // QEMU's stream_prepare: the new backing file name and format in the image, then the graph.
  aio::Task<Result<void>> change_backing() {
    Node& top = *options_.top;
    std::string name;
    std::string format;
    if (options_.base) {
      Node& base = *options_.base;
      name = options_.backing_file.value_or(base.filename());
      format = base.format_name();
      if (options_.backing_mask_protocol && base.primary_child() == nullptr) {
        format = "raw";  // a protocol node: record the data as a raw image
      }
    }
    Result<void> changed = co_await top.co_change_backing_file(name, format);
    if (!changed) {
      co_return changed;
    }
    Child* backing = top.backing_child();
    if (backing == nullptr) {
      co_return ok();
    }
    if (!options_.base) {
      graph_.detach_child(backing);
      co_return ok();
    }
    co_return graph_.replace_child(backing, options_.base);
  }

  void release() {
    if (root_) {
      graph_.detach_root(std::move(root_));
    }
  }

  Graph& graph_;
  StreamOptions options_;
  std::unique_ptr<Child> root_;
};

}  // namespace

Result<std::unique_ptr<job::BlockJob>> create_stream_job(Graph& graph, StreamOptions options) {
  auto job = std::make_unique<StreamJob>(graph, std::move(options));
  auto attached = job->attach();
  if (!attached) {
    return std::move(attached).error();
  }
  return std::unique_ptr<job::BlockJob>(std::move(job));
}

}  // namespace strata::block::stream
