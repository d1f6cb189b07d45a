#include "block/backup/backup_job.h"

#include "aio/task_group.h"
#include "block/io/request.h"

namespace strata::block::backup {

namespace {

// What outlives the job as long as a write notifier may still be running: block-copy and the
// nodes it uses, and the successor of the sync bitmap.
struct CopyBeforeWrite {
  std::shared_ptr<Node> source;
  std::shared_ptr<Node> target;
  std::unique_ptr<copy::BlockCopy> block_copy;
  std::unique_ptr<bitmap::DirtyBitmap> successor;
};

class BackupJob : public job::BlockJob, public BlockParent {
 public:
  BackupJob(Graph& graph, BackupOptions options, std::shared_ptr<CopyBeforeWrite> cbw)
      : BlockJob(options.job_id, "backup", options.flags),
        graph_(graph),
        options_(std::move(options)),
        cbw_(std::move(cbw)) {}

  ~BackupJob() override { release(); }

  std::string parent_description() const override { return "backup job '" + id() + "'"; }
  bool stays_at_node() const override { return true; }

  Result<void> attach() {
    const uint64_t source_perm =
        kPermConsistentRead | (options_.discard_source ? kPermWrite : uint64_t{0});
    auto source_root = graph_.attach_root(*this, options_.source, "source", kRoleData, source_perm,
                                          kPermAll & ~kPermResize);
    if (!source_root) {
      return std::move(source_root).error();
    }
    source_root_ = std::move(source_root).value();
    auto target_root = graph_.attach_root(*this, options_.target, "target", kRoleData, kPermWrite,
                                          kPermAll & ~kPermResize);
    if (!target_root) {
      release();
      return std::move(target_root).error();
    }
    target_root_ = std::move(target_root).value();
    return ok();
  }

 protected:
  aio::Task<Result<void>> run() override {
    copy::BlockCopy& block_copy = *cbw_->block_copy;
    init_copy_bitmap(block_copy);
    if (options_.sync == SyncMode::kTop) {
      block_copy.set_skip_unallocated(true);
    }
    start_copy_before_write();

    if (options_.sync == SyncMode::kTop) {
      for (uint64_t offset = 0; offset < block_copy.length();) {
        if (is_cancelled()) {
          co_return ok();
        }
        co_await pause_point();
        if (is_cancelled()) {
          co_return ok();
        }
        auto run = co_await block_copy.reset_unallocated(offset);
        if (!run) {
          co_return std::move(run).error();
        }
        offset += *run;
      }
      block_copy.set_skip_unallocated(false);
    }

    if (options_.sync == SyncMode::kNone) {
      // Copy-before-write does all the work; the job lasts until it is cancelled.
      while (!is_cancelled()) {
        co_await yield();
      }
      co_return ok();
    }
    co_return co_await copy_loop(block_copy);
  }

  void commit() override { cleanup_sync_bitmap(true); }
  void abort() override { cleanup_sync_bitmap(false); }
  void clean() override { release(); }

  bool on_cancel(bool force) override {
    (void)force;
    if (call_ != nullptr) {
      cbw_->block_copy->cancel(*call_);
    }
    return true;
  }
  // QEMU's backup_pause: the background call stops so that the job can park; the copy loop
  // starts a new call after the pause.
  void on_pause() override {
    if (call_ != nullptr) {
      cbw_->block_copy->cancel(*call_);
    }
  }
  void speed_changed() override { cbw_->block_copy->set_speed(speed()); }

 private:
  // QEMU's backup_init_bcs_bitmap and the progress estimate.
  void init_copy_bitmap(copy::BlockCopy& block_copy) {
    bitmap::DirtyBitmap& copy_bitmap = block_copy.copy_bitmap();
    if (options_.sync == SyncMode::kBitmap) {
      copy_bitmap.clear();
      copy_bitmap.merge_from(*options_.bitmap);
    }
    block_copy.set_progress({[this](uint64_t bytes) { progress_update(bytes); },
                             [this](uint64_t remaining) { progress_set_remaining(remaining); }});
    block_copy.set_speed(speed());
    progress_set_remaining(copy_bitmap.count());
  }

  // From here on every write to the source first saves the old data.
  void start_copy_before_write() {
    std::shared_ptr<CopyBeforeWrite> cbw = cbw_;
    notifier_ = io::add_write_notifier(
        *options_.source,
        [cbw](Node&, uint64_t offset, uint64_t bytes, uint32_t) -> aio::Task<Result<void>> {
          if (cbw->successor) {
            cbw->successor->set(offset, bytes);
          }
          co_return co_await cbw->block_copy->copy_range(offset, bytes);
        });
  }

  // QEMU's backup_loop: background block-copy calls, retried after pauses and ignored errors.
  aio::Task<Result<void>> copy_loop(copy::BlockCopy& block_copy) {
    while (true) {
      copy::BlockCopy::Call call;
      call.offset = 0;
      call.bytes = block_copy.length();
      call.max_workers = options_.max_workers;
      call.max_chunk = options_.max_chunk;
      bool finished = false;
      Result<void> outcome = ok();
      aio::TaskGroup group;
      call_ = &call;
      group.spawn([](BackupJob& self, copy::BlockCopy& engine, copy::BlockCopy::Call& c, bool& done,
                     Result<void>& out) -> aio::Task<void> {
        out = co_await engine.run(c);
        if (out && self.options_.discard_source) {
          // Nothing is left to copy; the source's data is no longer needed.
          out = co_await io::pdiscard(*self.options_.source, 0, engine.length());
        }
        done = true;
        self.kick();
      }(*this, block_copy, call, finished, outcome));
      while (!finished && !is_cancelled()) {
        co_await yield();
      }
      if (!finished) {
        block_copy.cancel(call);
      }
      co_await group.wait();
      call_ = nullptr;
      if (is_cancelled() || outcome) {
        co_return ok();
      }
      if (call.cancelled && !call.error) {
        continue;  // paused: start a new call
      }
      const Error& error = outcome.error();
      const bool is_read = call.error_is_read;
      const job::ErrorAction action =
          error_action(is_read ? options_.on_source_error : options_.on_target_error, is_read,
                       error.errno_value());
      if (action == job::ErrorAction::kReport) {
        co_return Error::from_errno(error.errno_value(), "");
      }
      if (action == job::ErrorAction::kStop) {
        co_await pause_point();
      }
    }
  }

  // QEMU's backup_cleanup_sync_bitmap.
  void cleanup_sync_bitmap(bool success) {
    bitmap::DirtyBitmap* bitmap = options_.bitmap;
    if (bitmap == nullptr || !cbw_->successor) {
      return;
    }
    const bool sync = (success || options_.bitmap_mode == BitmapMode::kAlways) &&
                      options_.bitmap_mode != BitmapMode::kNever;
    if (sync) {
      bitmap->clear();  // abdicate: the bitmap becomes the successor
    }
    bitmap->merge_from(*cbw_->successor);
    if (!success && options_.bitmap_mode == BitmapMode::kAlways) {
      bitmap->merge_from(cbw_->block_copy->copy_bitmap());
    }
    bitmap->set_enabled(bitmap_was_enabled_);
    cbw_->successor.reset();
  }

  void release() {
    if (notifier_ != 0) {
      io::remove_write_notifier(*options_.source, notifier_);
      notifier_ = 0;
    }
    if (cbw_ && cbw_->successor && options_.bitmap != nullptr) {
      options_.bitmap->merge_from(*cbw_->successor);
      options_.bitmap->set_enabled(bitmap_was_enabled_);
      cbw_->successor.reset();
    }
    if (target_root_) {
      graph_.detach_root(std::move(target_root_));
    }
    if (source_root_) {
      graph_.detach_root(std::move(source_root_));
    }
  }

 public:
  // Freezes the sync bitmap: writes during the job are recorded in the successor instead.
  void freeze_bitmap() {
    if (options_.bitmap == nullptr) {
      return;
    }
    bitmap_was_enabled_ = options_.bitmap->enabled();
    options_.bitmap->set_enabled(false);
    cbw_->successor = std::make_unique<bitmap::DirtyBitmap>("", options_.bitmap->size(),
                                                            options_.bitmap->granularity());
  }

 private:
  Graph& graph_;
  BackupOptions options_;
  std::shared_ptr<CopyBeforeWrite> cbw_;
  std::unique_ptr<Child> source_root_;
  std::unique_ptr<Child> target_root_;
  RequestTracker::NotifierId notifier_ = 0;
  copy::BlockCopy::Call* call_ = nullptr;
  bool bitmap_was_enabled_ = true;
};

}  // namespace

Result<std::unique_ptr<job::BlockJob>> create_backup_job(Graph& graph, BackupOptions options,
                                                         std::optional<std::string>& warning) {
  Node& source = *options.source;
  Node& target = *options.target;
  if (&source == &target) {
    return make_error(ErrorKind::kInvalidArgument, "Source and target cannot be the same");
  }
  if (options.compress && !target.supports_compressed_writes()) {
    return make_error(ErrorKind::kUnsupported, "Compression is not supported for this drive ");
  }
  if (source.length() != target.length()) {
    return make_error(ErrorKind::kInvalidArgument, "Source and target image have different sizes");
  }
  copy::ClusterSizeResult cluster = copy::calculate_cluster_size(target, options.min_cluster_size);
  warning = cluster.warning;
  copy::BlockCopyOptions copy_options;
  copy_options.min_cluster_size = options.min_cluster_size;
  copy_options.compress = options.compress;
  auto block_copy = copy::BlockCopy::create(source, target, copy_options);
  if (!block_copy) {
    return std::move(block_copy).error();
  }
  auto cbw = std::make_shared<CopyBeforeWrite>();
  cbw->source = options.source;
  cbw->target = options.target;
  cbw->block_copy = std::move(block_copy).value();
  const uint64_t speed = options.speed;
  auto job = std::make_unique<BackupJob>(graph, std::move(options), std::move(cbw));
  auto attached = job->attach();
  if (!attached) {
    return std::move(attached).error();
  }
  job->freeze_bitmap();
  job->set_speed(speed);
  return std::unique_ptr<job::BlockJob>(std::move(job));
}

}  // namespace strata::block::backup
