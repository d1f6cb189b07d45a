#include "block/commit/commit_job.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include "aio/event_loop.h"
#include "block/commit/commit_top_node.h"
#include "block/commit/writable_base.h"
#include "block/io/request.h"

namespace strata::block::commit {

namespace {

// QEMU's COMMIT_BUFFER_SIZE.
constexpr uint64_t kChunk = 512 << 10;

class CommitJob : public job::BlockJob, public BlockParent {
 public:
  CommitJob(Graph& graph, CommitOptions options)
      : BlockJob(options.job_id, "commit", options.flags),
        graph_(graph),
        options_(std::move(options)) {}

  ~CommitJob() override { release(); }

  std::string parent_description() const override { return "commit job '" + id() + "'"; }
  bool stays_at_node() const override { return true; }

  Result<void> attach() {
    // QEMU's commit_start: "convert base to r/w, if necessary".
    writable_base_.acquire(graph_, *options_.base);
    // The top is read; the base is written (and may be resized); others may go on reading
    // both.
    auto top = graph_.attach_root(*this, options_.top, "top", kRoleData, kPermConsistentRead,
                                  kPermAll & ~kPermResize);
    if (!top) {
      return std::move(top).error();
    }
    top_root_ = std::move(top).value();
    auto base = graph_.attach_root(*this, options_.base, "base", kRoleData,
                                   kPermConsistentRead | kPermWrite | kPermResize,
                                   kPermConsistentRead | kPermWriteUnchanged);
    if (!base) {
      release();
      return std::move(base).error();
    }
    base_root_ = std::move(base).value();
    return insert_filter();
  }

 protected:
  aio::Task<Result<void>> run() override {
    Node& top = *options_.top;
    Node& base = *options_.base;
    const uint64_t length = top.length();
    if (base.length() < length) {
      Result<void> grown = co_await io::truncate(base, length, false);
      if (!grown) {
        co_return grown;
      }
    }
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
      const uint64_t want = std::min(kChunk, length - offset);
      Result<io::Allocation> above = co_await io::is_allocated_above(top, &base, offset, want);
      if (!above) {
        co_return above.error();
      }
      const uint64_t bytes = above->bytes;
      if (above->allocated) {
        bool is_read = true;
        Result<void> copied = co_await io::pread(top, offset, buffer.data(), bytes);
        if (copied) {
          is_read = false;
          copied = co_await io::pwrite(base, offset, buffer.data(), bytes);
        }
        if (!copied) {
          const job::ErrorAction action =
              error_action(options_.on_error, is_read, copied.error().errno_value());
          if (action == job::ErrorAction::kStop) {
            continue;  // paused; the chunk is tried again after the resume
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
      if (above->allocated) {
        co_await rate_limit_sleep(bytes);
      }
    }
    if (first_error) {
      co_return Error::from_errno(first_error->errno_value(), "");
    }
    Result<void> flushed = co_await io::flush(base);
    if (!flushed) {
      co_return flushed;
    }
    co_return co_await drop_intermediate();
  }

  void clean() override { release(); }

 private:
  // QEMU's bdrv_drop_intermediate: the overlay names the base and uses it.
  aio::Task<Result<void>> drop_intermediate() {
    Node& overlay = *options_.overlay;
    Node& base = *options_.base;
    std::string format = base.format_name();
    if (options_.backing_mask_protocol && base.primary_child() == nullptr) {
      format = "raw";
    }
    Result<void> changed = co_await overlay.co_change_backing_file(
        options_.backing_file.value_or(base.filename()), format);
    if (!changed) {
      co_return changed;
    }
    Child* backing = overlay.backing_child();
    if (backing == nullptr ||
        (backing->node() != options_.top.get() && backing->node() != filter_.get())) {
      co_return ok();  // the graph changed meanwhile; the image names the base already
    }
    co_return graph_.replace_child(backing, options_.base);
  }

  // QEMU's commit_start: the commit_top filter above the top; the overlay reads through it.
  Result<void> insert_filter() {
    CommonOptions common;
    common.node_name = options_.filter_node_name.value_or("");
    filter_ = std::make_shared<CommitTopNode>(common);
    if (auto inserted = graph_.insert_filter(filter_, options_.top); !inserted) {
      filter_.reset();
      release();
      return inserted;
    }
    filter_inserted_ = true;
    return ok();
  }

  void release() {
    if (filter_inserted_) {
      filter_inserted_ = false;
      ignore_error(graph_.replace_node(*filter_, options_.top), "the overlay returns to the top");
    }
    io::release_when_idle(std::move(filter_));
    if (base_root_) {
      graph_.detach_root(std::move(base_root_));
    }
    if (top_root_) {
      graph_.detach_root(std::move(top_root_));
    }
    writable_base_.restore(graph_);  // the file descriptors go back to read-only
  }

  Graph& graph_;
  CommitOptions options_;
  std::unique_ptr<Child> top_root_;
  std::unique_ptr<Child> base_root_;
  WritableBase writable_base_;
  std::shared_ptr<Node> filter_;
  bool filter_inserted_ = false;
};

}  // namespace

Result<std::unique_ptr<job::BlockJob>> create_commit_job(Graph& graph, CommitOptions options) {
  auto job = std::make_unique<CommitJob>(graph, std::move(options));
  auto attached = job->attach();
  if (!attached) {
    return std::move(attached).error();
  }
  return std::unique_ptr<job::BlockJob>(std::move(job));
}

}  // namespace strata::block::commit
