#include "block/mirror/mirror_job.h"

#include <algorithm>
#include <vector>

#include "aio/event_loop.h"
#include "aio/task_group.h"
#include "block/commit/writable_base.h"
#include "block/io/bounce_buffer.h"
#include "block/io/request.h"
#include "block/mirror/mirror_top_node.h"

namespace strata::block::mirror {

namespace {

// QEMU's MAX_IN_FLIGHT and MAX_IO_BYTES: copies in flight at once, and the size of one copy
// under the default buffer size (16 MiB in all).
constexpr size_t kMaxInFlight = 16;
constexpr uint64_t kMaxIoBytes = 1 << 20;
constexpr uint64_t kDefaultBufSize = kMaxInFlight * kMaxIoBytes;
constexpr size_t kBufferAlignment = 4096;

// QEMU's bdrv_get_default_bitmap_granularity: the target's cluster size within [4 KiB, 64 KiB],
// else 64 KiB.
uint64_t default_granularity(const Node& target) {
  if (auto cluster = target.cluster_size(); cluster && *cluster > 0) {
    return std::clamp<uint64_t>(*cluster, 4096, 65536);
  }
  return 65536;
}

// Whether the run at `offset` reads as zeroes through `top`'s backing chain, and how long the
// run is (<= bytes, > 0).
struct ZeroRun {
  bool zero = false;
  uint64_t bytes = 0;
};
aio::Task<Result<ZeroRun>> chain_zero_run(Node& top, uint64_t offset, uint64_t bytes) {
  uint64_t want = bytes;
  for (Node* node = &top; node != nullptr; node = filter_or_cow(*node)) {
    if (offset >= node->length()) {
      break;  // a shorter layer: zeroes from here down
    }
    Result<BlockStatus> status = co_await io::block_status(*node, offset, want);
    if (!status) {
      co_return status.error();
    }
    want = std::min(want, status->bytes);
    if (status->allocated_here()) {
      co_return ZeroRun{(status->flags & BlockStatus::kZero) != 0, want};
    }
  }
  co_return ZeroRun{true, want};
}

class MirrorJob : public job::BlockJob, public BlockParent, private MirrorCore::Listener {
 public:
  MirrorJob(Graph& graph, MirrorOptions options)
      : BlockJob(options.job_id, options.is_commit ? "commit" : "mirror", options.flags),
        graph_(graph),
        options_(std::move(options)) {}

  ~MirrorJob() override {
    end_drain();
    (void)finish_graph(false);
    release_roots();
    writable_base_.restore(graph_);
    if (core_) {
      core_->set_listener(nullptr);
    }
    io::release_when_idle(std::move(filter_));
  }

  std::string parent_description() const override { return type() + " job '" + id() + "'"; }
  bool stays_at_node() const override { return true; }

  Result<void> attach() {
    const MirrorOptions& o = options_;
    const uint64_t granularity =
        o.granularity != 0 ? o.granularity : default_granularity(*o.target);
    buf_size_ = o.buf_size != 0 ? (o.buf_size + granularity - 1) / granularity * granularity
                                : kDefaultBufSize;
    op_bytes_ = std::min(std::max(buf_size_ / kMaxInFlight, kMaxIoBytes), buf_size_);
    op_bytes_ = std::max(op_bytes_ / granularity * granularity, granularity);
    core_ = std::make_shared<MirrorCore>(o.target, o.source->length(), granularity, o.copy_mode);
    if (o.is_commit) {
      writable_base_.acquire(graph_, *o.target);
    }

    CommonOptions common;
    common.node_name = o.filter_node_name.value_or("");
    filter_ = std::make_shared<MirrorTopNode>(common, core_, o.is_commit);
    // Every user of the source now goes through the filter.
    if (auto inserted = graph_.insert_filter(filter_, o.source); !inserted) {
      filter_.reset();
      return inserted;
    }
    filter_inserted_ = true;

    // The source and the nodes in between may not be resized while the job runs; the target is
    // the job's alone to write (an active commit's base stays readable and writable for its
    // chain).
    const uint64_t keep_size = kPermConsistentRead | kPermWrite | kPermWriteUnchanged;
    auto source_root = graph_.attach_root(*this, o.source, "source", kRoleData, 0, keep_size);
    if (!source_root) {
      return std::move(source_root).error();
    }
    source_root_ = std::move(source_root).value();
    uint64_t target_perm = kPermWrite;
    uint64_t target_shared = kPermWriteUnchanged;
    if (o.is_commit) {
      target_shared |= kPermConsistentRead | kPermWrite;
      if (o.target->length() < o.source->length()) {
        target_perm |= kPermResize;
      }
    }
    auto target_root =
        graph_.attach_root(*this, o.target, "target", kRoleData, target_perm, target_shared);
    if (!target_root) {
      return std::move(target_root).error();
    }
    target_root_ = std::move(target_root).value();
    if (o.is_commit) {
      for (Node* n = filter_or_cow(*o.source); n != nullptr && n != o.target.get();
           n = filter_or_cow(*n)) {
        auto root = graph_.attach_root(*this, n->shared_from_this(), "intermediate node", kRoleData,
                                       0, keep_size);
        if (!root) {
          return std::move(root).error();
        }
        intermediate_roots_.push_back(std::move(root).value());
      }
    }
    core_->set_listener(this);
    return ok();
  }

  nlohmann::json block_info() const override {
    nlohmann::json info = BlockJob::block_info();
    if (!options_.is_commit) {
      info["actively-synced"] = core_->actively_synced();
    }
    return info;
  }

 protected:
  aio::Task<Result<void>> run() override {
    Result<void> result = co_await copy_until_done();
    co_await copies_.wait();
    if (!result) {
      end_drain();
    }
    co_return result;
  }

  // QEMU's mirror_prepare (mirror_exit_common): the pivot, or only the filter's removal.
  Result<void> prepare() override {
    Result<void> result = finish_graph(should_complete_);
    end_drain();
    if (result && should_complete_) {
      writable_base_.keep();  // an active commit's base is the active layer now
    }
    return result;
  }

  void abort() override {
    (void)finish_graph(false);
    end_drain();
    writable_base_.restore(graph_);
  }

  void clean() override {
    release_roots();
    core_->set_listener(nullptr);
  }

  // QEMU's mirror_change: only background -> write-blocking.
  Result<void> change(const job::JobChange& options) override {
    const CopyMode wanted =
        options.copy_mode == "write-blocking" ? CopyMode::kWriteBlocking : CopyMode::kBackground;
    if (wanted == core_->copy_mode()) {
      return ok();
    }
    if (wanted != CopyMode::kWriteBlocking) {
      return make_error(ErrorKind::kInvalidArgument,
                        "Change to copy mode '" + options.copy_mode + "' is not implemented");
    }
    core_->set_copy_mode(wanted);
    kick();  // actively synced as soon as nothing is dirty
    return ok();
  }

  bool supports_complete() const override { return true; }
  Result<void> complete() override {
    should_complete_ = true;
    return ok();
  }

  // QEMU's mirror_cancel: before READY every cancel is forced; after it, a soft cancel finishes
  // like job-complete without the pivot.
  bool on_cancel(bool force) override {
    const bool forced = force || !ready_;
    if (forced) {
      core_->stop_copying();
    }
    return forced;
  }

 private:
  // ---- MirrorCore::Listener ----------------------------------------------------------------
  void dirtied() override { kick(); }
  void active_write_started(uint64_t bytes) override {
    active_bytes_ += bytes;
    progress_increase_remaining(bytes);
  }
  void active_write_finished(uint64_t bytes, bool copied) override {
    active_bytes_ -= bytes;
    if (copied) {
      progress_update(bytes);
    }
  }
  void active_write_failed(int error) override {
    record_error(options_.on_target_error, /*is_read=*/false, error);
  }

  // QEMU's mirror_error_action: the policy decides; `report` ends the job with this error.
  void record_error(job::OnError policy, bool is_read, int error) {
    if (error_action(policy, is_read, error) == job::ErrorAction::kReport && !failure_) {
      failure_ = Error::from_errno(error, "");
      core_->stop_copying();
    }
    kick();
  }

  // ---- the copy loop (QEMU's mirror_run) ------------------------------------------------------
  aio::Task<Result<void>> copy_until_done() {
    Node& source = *options_.source;
    Node& target = *options_.target;
    const uint64_t length = source.length();
    if (options_.is_commit) {
      if (target.length() < length) {
        Result<void> grown = co_await io::truncate(target, length, false);
        if (!grown) {
          co_return grown;
        }
      }
    } else if (target.length() != length) {
      co_return make_error(ErrorKind::kInvalidArgument,
                           "Source and target image have different sizes");
    }
    Result<void> initialised = co_await init_dirty_bitmap(length);
    if (!initialised) {
      co_return initialised;
    }
    uint64_t cursor = 0;
    for (;;) {
      if (failure_) {
        co_return *failure_;
      }
      if (pause_requested() && !copies_.empty()) {
        co_await copies_.wait();  // QEMU's mirror_pause: park with nothing in flight
        continue;
      }
      co_await pause_point();
      if (is_cancelled()) {
        co_return ok();
      }
      const uint64_t dirty = core_->dirty().count();
      progress_set_remaining(dirty + bytes_in_flight_ + active_bytes_);
      if (dirty > 0 && copies_.size() < kMaxInFlight && bytes_in_flight_ < buf_size_) {
        Result<uint64_t> started = co_await start_copy(length, cursor);
        if (!started) {
          co_return started.error();
        }
        if (*started > 0 && speed() != 0) {
          co_await rate_limit_sleep(*started);
        }
        continue;
      }
      if (dirty == 0 && copies_.empty()) {
        if (!ready_) {
          Result<void> flushed = co_await io::flush(target);
          if (!flushed) {
            record_error(options_.on_target_error, false, flushed.error().errno_value());
            continue;
          }
          // From now on a soft cancel completes the job with the target in sync.
          ready_ = true;
          transition_to_ready();
        }
        if (core_->copy_mode() == CopyMode::kWriteBlocking) {
          core_->set_actively_synced(true);
        }
        if (should_complete_ || cancel_requested()) {
          // The final sync: no guest request in flight, nothing dirty. The drain lasts until
          // prepare() or abort() (guest requests wait for the pivot).
          io::drain_begin(*filter_);
          in_drain_ = true;
          co_await io::drain(*filter_);
          if (core_->dirty().count() == 0 && copies_.empty() && !failure_) {
            Result<void> flushed = co_await io::flush(target);
            if (flushed) {
              co_return ok();
            }
            record_error(options_.on_target_error, false, flushed.error().errno_value());
          }
          end_drain();
          continue;
        }
      }
      co_await yield();  // a copy finished, a guest write dirtied data, or a verb arrived
    }
  }

  // QEMU's mirror_dirty_init: what must be copied before the job can be READY.
  aio::Task<Result<void>> init_dirty_bitmap(uint64_t length) {
    if (options_.sync == SyncMode::kNone) {
      co_return ok();
    }
    // top and active commit: what the source's layers hold above `base`; full: everything held
    // anywhere in the chain, and whatever reads as zeroes on the source but not on the target.
    const bool full = options_.sync == SyncMode::kFull && !options_.is_commit;
    const Node* base = nullptr;
    if (options_.is_commit) {
      base = options_.target.get();
    } else if (options_.sync == SyncMode::kTop) {
      base = filter_or_cow(*options_.source);
    }
    for (uint64_t offset = 0; offset < length;) {
      if (is_cancelled()) {
        co_return ok();
      }
      Result<io::Allocation> above =
          co_await io::is_allocated_above(*options_.source, base, offset, length - offset);
      if (!above) {
        co_return above.error();
      }
      if (above->allocated) {
        core_->dirty().set(offset, above->bytes);
      } else if (full) {
        for (uint64_t done = 0; done < above->bytes;) {
          Result<ZeroRun> run =
              co_await chain_zero_run(*options_.target, offset + done, above->bytes - done);
          if (!run) {
            co_return run.error();
          }
          if (!run->zero) {
            core_->dirty().set(offset + done, run->bytes);
          }
          done += run->bytes;
        }
      }
      offset += above->bytes;
    }
    co_return ok();
  }

  // QEMU's mirror_iteration, one copy at a time: the dirty granules from `cursor` on (wrapping
  // around), up to one copy's size, that no other copy or guest write holds. Returns the bytes
  // it started copying (0 when it had to wait for an overlapping range first).
  aio::Task<Result<uint64_t>> start_copy(uint64_t length, uint64_t& cursor) {
    bitmap::DirtyBitmap& dirty = core_->dirty();
    std::optional<uint64_t> next = dirty.next_dirty(cursor);
    if (!next) {
      next = dirty.next_dirty(0);
    }
    if (!next) {
      co_return 0;
    }
    const uint64_t g = core_->granularity();
    const uint64_t start = core_->align_down(*next);
    if (core_->overlaps(start, start + g)) {
      co_await core_->wait_for_overlaps(start, start + g);
      co_return 0;
    }
    const uint64_t max_bytes = std::max(std::min(op_bytes_, buf_size_ - bytes_in_flight_), g);
    uint64_t end = std::min(start + g, length);
    while (end < length && end - start + g <= max_bytes && dirty.test(end) &&
           !core_->overlaps(end, end + g)) {
      end = std::min(end + g, length);
    }
    Result<io::BounceBuffer> buffer = take_buffer();
    if (!buffer) {
      co_return buffer.error();
    }
    dirty.reset(start, end - start);
    auto lock = std::make_unique<MirrorCore::RangeLock>(*core_, start, core_->align_up(end));
    bytes_in_flight_ += end - start;
    cursor = end;
    copies_.spawn(copy_region(start, end - start, std::move(lock), std::move(buffer).value()));
    co_return end - start;
  }

  // One copy (QEMU's mirror_co_read / mirror_co_zero_or_discard): runs that read as zeroes are
  // written as zeroes, the rest is read from the source and written to the target. A failure
  // marks the region dirty again and goes to the error policy.
  aio::Task<void> copy_region(uint64_t offset, uint64_t bytes,
                              std::unique_ptr<MirrorCore::RangeLock> lock,
                              io::BounceBuffer buffer) {
    Node& source = *options_.source;
    Node& target = *options_.target;
    Result<void> result = ok();
    bool is_read = true;
    for (uint64_t done = 0; done < bytes && result;) {
      const uint64_t at = offset + done;
      Result<ZeroRun> run = co_await chain_zero_run(source, at, bytes - done);
      if (!run) {
        result = run.error();
        break;
      }
      if (run->zero) {
        is_read = false;
        result = co_await io::pwrite_zeroes(target, at, run->bytes, kRequestMayUnmap);
      } else {
        is_read = true;
        result = co_await io::pread(source, at, buffer.data() + done, run->bytes);
        if (result) {
          is_read = false;
          result = co_await io::pwrite(target, at, buffer.data() + done, run->bytes);
        }
      }
      done += run->bytes;
    }
    bytes_in_flight_ -= bytes;
    free_buffers_.push_back(std::move(buffer));
    lock.reset();
    if (result) {
      progress_update(bytes);
    } else {
      core_->dirty().set(offset, bytes);
      record_error(is_read ? options_.on_source_error : options_.on_target_error, is_read,
                   result.error().errno_value());
    }
    kick();
  }

  Result<io::BounceBuffer> take_buffer() {
    if (!free_buffers_.empty()) {
      io::BounceBuffer buffer = std::move(free_buffers_.back());
      free_buffers_.pop_back();
      return buffer;
    }
    return io::BounceBuffer::allocate(op_bytes_, kBufferAlignment);
  }

  // ---- the end ------------------------------------------------------------------------------
  // Takes the filter out of the graph (once). With `pivot`, the target first replaces the source
  // (or `replaces`) for every user; the filter's users then go to the node below it.
  Result<void> finish_graph(bool pivot) {
    if (!filter_inserted_) {
      return ok();
    }
    filter_inserted_ = false;
    // The target's new users need the write permission the job's edge does not share.
    if (target_root_) {
      graph_.detach_root(std::move(target_root_));
    }
    Result<void> result = ok();
    if (pivot) {
      Node& to_replace = options_.replaces ? *options_.replaces : *options_.source;
      result = graph_.replace_node(to_replace, options_.target);
    }
    std::shared_ptr<Node> below = filter_->children().front()->node_ref();
    Result<void> removed = graph_.replace_node(*filter_, below);
    core_->stop();
    ignore_error(graph_.refresh_perms({filter_.get()}), "dropping the filter's permissions");
    if (result && !removed) {
      result = std::move(removed);
    }
    return result;
  }

  void end_drain() {
    if (in_drain_) {
      in_drain_ = false;
      io::drain_end(*filter_);
    }
  }

  void release_roots() {
    for (auto& root : intermediate_roots_) {
      graph_.detach_root(std::move(root));
    }
    intermediate_roots_.clear();
    if (target_root_) {
      graph_.detach_root(std::move(target_root_));
    }
    if (source_root_) {
      graph_.detach_root(std::move(source_root_));
    }
  }

  Graph& graph_;
  MirrorOptions options_;
  std::shared_ptr<MirrorCore> core_;
  std::shared_ptr<MirrorTopNode> filter_;
  bool filter_inserted_ = false;
  std::unique_ptr<Child> source_root_;
  std::unique_ptr<Child> target_root_;
  std::vector<std::unique_ptr<Child>> intermediate_roots_;
  commit::WritableBase writable_base_;
  uint64_t buf_size_ = kDefaultBufSize;
  uint64_t op_bytes_ = kMaxIoBytes;
  uint64_t bytes_in_flight_ = 0;
  uint64_t active_bytes_ = 0;
  bool ready_ = false;
  bool should_complete_ = false;
  bool in_drain_ = false;
  std::optional<Error> failure_;
  std::vector<io::BounceBuffer> free_buffers_;
  aio::TaskGroup copies_;
};

}  // namespace

Result<std::unique_ptr<job::BlockJob>> create_mirror_job(Graph& graph, MirrorOptions options) {
  auto job = std::make_unique<MirrorJob>(graph, std::move(options));
  auto attached = job->attach();
  if (!attached) {
    return std::move(attached).error();
  }
  return std::unique_ptr<job::BlockJob>(std::move(job));
}

}  // namespace strata::block::mirror
