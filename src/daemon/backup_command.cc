#include "daemon/backup_command.h"

#include <array>
#include <climits>
#include <cstdio>

#include "base/arg_decoder.h"
#include "block/backup/backup_job.h"
#include "daemon/daemon.h"
#include "daemon/transaction.h"

namespace strata::daemon {

namespace {

using block::backup::BitmapMode;
using block::backup::SyncMode;

constexpr std::array<std::string_view, 5> kSyncModes = {"top", "full", "none", "incremental",
                                                        "bitmap"};
constexpr std::array<std::string_view, 3> kBitmapModes = {"on-success", "never", "always"};

Error generic(std::string message) {
  return make_error(ErrorKind::kInvalidArgument, std::move(message));
}

// QEMU's op blockers of block_job_add_bdrv: a node that a block job writes to (a backup target)
// may not take part in another backup.
Result<void> check_not_job_target(block::Node& node) {
  for (const block::Child* parent : node.parents()) {
    auto* job = dynamic_cast<block::job::BlockJob*>(parent->parent());
    if (job != nullptr && parent->name() == "target") {
      return make_error(ErrorKind::kBusy,
                        "Node '" + node.name() +
                            "' is busy: block device is in use by block job: " + job->type());
    }
  }
  return ok();
}

Result<std::shared_ptr<block::Node>> lookup(block::Graph& graph, const std::string& name) {
  block::Node* node = graph.find(name);
  if (node == nullptr) {
    return make_error(ErrorKind::kNotFound,
                      "Cannot find device='" + name + "' nor node-name='" + name + "'");
  }
  return node->shared_from_this();
}

}  // namespace

BackupArgs decode_backup_args(ArgDecoder& d) {
  BackupArgs a;
  a.job_id = d.opt_str("job-id");
  a.device = d.str("device");
  a.target = d.str("target");
  a.sync = d.enumeration("sync", kSyncModes);
  a.speed = d.opt_i64("speed");
  a.bitmap_name = d.opt_str("bitmap");
  a.bitmap_mode = d.opt_enum("bitmap-mode", kBitmapModes);
  a.compress = d.opt_bool("compress").value_or(false);
  a.on_source_error =
      d.opt_enum("on-source-error", block::job::on_error_names()).value_or("report");
  a.on_target_error =
      d.opt_enum("on-target-error", block::job::on_error_names()).value_or("report");
  a.auto_finalize = d.opt_bool("auto-finalize").value_or(true);
  a.auto_dismiss = d.opt_bool("auto-dismiss").value_or(true);
  // Accepted; strata inserts no filter node (copy-before-write is a write notifier).
  (void)d.opt_str("filter-node-name");
  a.discard_source = d.opt_bool("discard-source").value_or(false);
  if (auto perf = d.opt_object("x-perf")) {
    (void)perf->opt_bool("use-copy-range");
    a.max_workers = perf->opt_i64("max-workers");
    a.max_chunk = perf->opt_i64("max-chunk");
    a.min_cluster_size = perf->opt_size("min-cluster-size");
    ignore_error(perf->finish(), "recorded in the shared decoder state");
  }
  return a;
}

Result<std::unique_ptr<BackupAction>> BackupAction::prepare(
    Daemon& daemon, const nlohmann::json& args, std::shared_ptr<block::job::JobTxn> txn) {
  ArgDecoder d(args);
  BackupArgs a = decode_backup_args(d);
  auto decoded = d.finish();
  if (!decoded) {
    return std::move(decoded).error();
  }
  return create(daemon, std::move(a), std::move(txn));
}

Result<std::unique_ptr<BackupAction>> BackupAction::create(
    Daemon& daemon, BackupArgs a, std::shared_ptr<block::job::JobTxn> txn) {
  std::optional<std::string> job_id = std::move(a.job_id);
  const std::string& device = a.device;
  const std::string& target_name = a.target;
  std::string sync = a.sync;
  std::optional<int64_t> speed = a.speed;
  std::optional<std::string> bitmap_name = a.bitmap_name;
  std::optional<std::string> bitmap_mode = a.bitmap_mode;
  const bool compress = a.compress;
  const std::string& on_source_error = a.on_source_error;
  const std::string& on_target_error = a.on_target_error;
  const bool auto_finalize = a.auto_finalize;
  const bool auto_dismiss = a.auto_dismiss;
  const bool discard_source = a.discard_source;
  std::optional<int64_t> max_workers = a.max_workers;
  std::optional<int64_t> max_chunk = a.max_chunk;
  std::optional<uint64_t> min_cluster_size = a.min_cluster_size;

  block::Graph& graph = daemon.graph();
  auto source = lookup(graph, device);
  if (!source) {
    return std::move(source).error();
  }
  auto target = lookup(graph, target_name);
  if (!target) {
    return std::move(target).error();
  }

  block::backup::BackupOptions options;
  // QEMU's default job id is the device's BlockBackend name, which a node has not: "" (refused).
  options.job_id = job_id.value_or("");
  options.source = *source;
  options.target = *target;
  options.compress = compress;
  options.discard_source = discard_source;
  options.on_source_error = *block::job::parse_on_error(on_source_error);
  options.on_target_error = *block::job::parse_on_error(on_target_error);
  options.flags.auto_finalize = auto_finalize;
  options.flags.auto_dismiss = auto_dismiss;

  // x-perf (QEMU's do_backup_common).
  if (max_workers && (*max_workers < 1 || *max_workers > INT_MAX)) {
    return generic("max-workers must be between 1 and " + std::to_string(INT_MAX));
  }
  if (max_chunk && *max_chunk < 0) {
    return generic("max-chunk must be zero (which means no limit) or positive");
  }
  if (min_cluster_size &&
      (*min_cluster_size == 0 || (*min_cluster_size & (*min_cluster_size - 1)) != 0)) {
    return generic(
        "Could not create node: Cannot create block-copy-state: min-cluster-size needs to be a "
        "power of 2");
  }
  options.max_workers = static_cast<int>(max_workers.value_or(block::copy::kDefaultMaxWorkers));
  options.max_chunk = static_cast<uint64_t>(max_chunk.value_or(0));
  options.min_cluster_size = min_cluster_size.value_or(0);

  // Sync mode and bitmap rules, with QEMU's messages and in its order.
  if ((sync == "bitmap" || sync == "incremental") && !bitmap_name) {
    return generic("must provide a valid bitmap name for '" + sync + "' sync mode");
  }
  if (sync == "incremental") {
    if (bitmap_mode && *bitmap_mode != "on-success") {
      return generic("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
    }
    bitmap_mode = "on-success";
    sync = "bitmap";
  }
  if (bitmap_name) {
    block::bitmap::DirtyBitmap* bitmap = (*source)->dirty_bitmaps().find(*bitmap_name);
    if (bitmap == nullptr) {
      return generic("Bitmap '" + *bitmap_name + "' could not be found");
    }
    if (!bitmap_mode) {
      return generic("Bitmap sync mode must be given when providing a bitmap");
    }
    if (bitmap->inconsistent()) {
      return generic("Bitmap '" + *bitmap_name +
                     "' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to "
                     "delete this bitmap from disk");
    }
    if (!bitmap->enabled() && bitmap->readonly() && *bitmap_mode != "never") {
      return generic("Bitmap '" + *bitmap_name + "' is readonly and cannot be modified");
    }
    if (sync == "none") {
      return generic("sync mode 'none' does not produce meaningful bitmap outputs");
    }
    if (*bitmap_mode == "never" && sync != "bitmap") {
      return generic(
          "Bitmap sync mode 'never' has no meaningful effect when combined with sync "
          "mode '" +
          sync + "'");
    }
    options.bitmap = bitmap;
  }
  if (!bitmap_name && bitmap_mode) {
    return generic("Cannot specify bitmap sync mode without a bitmap");
  }
  options.sync = sync == "top"      ? SyncMode::kTop
                 : sync == "none"   ? SyncMode::kNone
                 : sync == "bitmap" ? SyncMode::kBitmap
                                    : SyncMode::kFull;
  options.bitmap_mode = !bitmap_mode               ? BitmapMode::kOnSuccess
                        : *bitmap_mode == "never"  ? BitmapMode::kNever
                        : *bitmap_mode == "always" ? BitmapMode::kAlways
                                                   : BitmapMode::kOnSuccess;

  if (*source == *target) {
    return generic("Source and target cannot be the same");
  }
  for (block::Node* node : {source->get(), target->get()}) {
    auto free = check_not_job_target(*node);
    if (!free) {
      return std::move(free).error();
    }
  }

  std::optional<std::string> warning;
  auto job = block::backup::create_backup_job(graph, std::move(options), warning);
  if (!job) {
    return std::move(job).error();
  }
  if (warning) {
    std::fprintf(stderr, "strata: warning: %s\n", warning->c_str());
  }
  block::job::JobManager& jobs = daemon.jobs();
  auto created = jobs.create(std::move(job).value(), std::move(txn));
  if (!created) {
    return std::move(created).error();
  }
  if (speed) {
    auto speed_set = jobs.set_speed(**created, *speed);
    if (!speed_set) {
      jobs.early_fail(**created);
      return std::move(speed_set).error();
    }
  }
  return std::unique_ptr<BackupAction>(new BackupAction(daemon, **created));
}

void BackupAction::commit() {
  // As QEMU, the job starts inside a drained section: it parks at its first pause point and
  // is resumed when the section ends (running, paused, running).
  daemon_.jobs().start(*job_, /*drained=*/true);
}

void BackupAction::abort() {
  (void)daemon_.jobs().user_cancel(*job_, true);
}

namespace {

// blockdev-backup as an action of `transaction`: decoded with the other actions, the job created
// in prepare (in the transaction's JobTxn with completion-mode=grouped), started in commit.
class BackupTransactionAction : public TransactionAction {
 public:
  BackupTransactionAction(Daemon& daemon, BackupArgs args)
      : daemon_(daemon), args_(std::move(args)) {}
  aio::Task<Result<void>> prepare() override {
    auto action = BackupAction::create(daemon_, std::move(args_), job_txn);
    if (!action) {
      co_return std::move(action).error();
    }
    action_ = std::move(action).value();
    co_return ok();
  }
  void commit() override { action_->commit(); }
  void abort() override { action_->abort(); }

 private:
  Daemon& daemon_;
  BackupArgs args_;
  std::unique_ptr<BackupAction> action_;
};

}  // namespace

void register_backup_command(Daemon& daemon) {
  daemon.transaction_actions().add(
      "blockdev-backup",
      [](Daemon& owner, ArgDecoder& data) -> std::unique_ptr<TransactionAction> {
        return std::make_unique<BackupTransactionAction>(owner, decode_backup_args(data));
      },
      /*supports_grouped=*/true);
  daemon.command_table().add(
      "blockdev-backup",
      [&daemon](const nlohmann::json& args, qmp::Monitor&) -> aio::Task<Result<nlohmann::json>> {
        auto action = BackupAction::prepare(daemon, args);
        if (!action) {
          co_return std::move(action).error();
        }
        (*action)->commit();
        co_return nlohmann::json::object();
      });
}

}  // namespace strata::daemon
