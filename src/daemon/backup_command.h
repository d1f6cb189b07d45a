#pragma once
// blockdev-backup (QEMU's qmp_blockdev_backup / blockdev_backup_action) in the three steps of a
// transaction action, so that `transaction` can run it next to other actions:
//   prepare - decodes and checks the arguments and creates the job (JOB_STATUS_CHANGE created);
//             nothing is started. Errors are the command's errors.
//   commit  - starts the job (running, and QEMU's paused/running pair of the drained start).
//   abort   - cancels the job that prepare created (aborting, concluded, null).
// The standalone command is prepare + commit; `transaction` runs it as action "blockdev-backup".

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "base/arg_decoder.h"
#include "base/result.h"
#include "block/job/job.h"

namespace strata::daemon {

class Daemon;

// blockdev-backup's arguments, decoded (QEMU's BlockdevBackup).
struct BackupArgs {
  std::optional<std::string> job_id;
  std::string device;
  std::string target;
  std::string sync;
  std::optional<int64_t> speed;
  std::optional<std::string> bitmap_name;
  std::optional<std::string> bitmap_mode;
  bool compress = false;
  std::string on_source_error;
  std::string on_target_error;
  bool auto_finalize = true;
  bool auto_dismiss = true;
  bool discard_source = false;
  std::optional<int64_t> max_workers;  // x-perf
  std::optional<int64_t> max_chunk;
  std::optional<uint64_t> min_cluster_size;
};

// Decodes the members of `d` (errors recorded in `d`; the caller finishes it).
BackupArgs decode_backup_args(ArgDecoder& d);

class BackupAction {
 public:
  // `txn`: the JobTxn of a grouped transaction, or nullptr.
  static Result<std::unique_ptr<BackupAction>> prepare(
      Daemon& daemon, const nlohmann::json& args,
      std::shared_ptr<block::job::JobTxn> txn = nullptr);
  // Checks decoded arguments and creates the job (prepare without the decoding).
  static Result<std::unique_ptr<BackupAction>> create(
      Daemon& daemon, BackupArgs args, std::shared_ptr<block::job::JobTxn> txn = nullptr);
  void commit();
  void abort();

 private:
  BackupAction(Daemon& daemon, block::job::Job& job) : daemon_(daemon), job_(&job) {}
  Daemon& daemon_;
  block::job::Job* job_;
};

// Registers blockdev-backup.
void register_backup_command(Daemon& daemon);

}  // namespace strata::daemon
