#pragma once
// blockdev-backup (QEMU's qmp_blockdev_backup / blockdev_backup_action) in the three steps of a
// transaction action, so that `transaction` can run it next to other actions:
//   prepare - decodes and checks the arguments and creates the job (JOB_STATUS_CHANGE created);
//             nothing is started. Errors are the command's errors.
//   commit  - starts the job (running, and QEMU's paused/running pair of the drained start).
//   abort   - cancels the job that prepare created (aborting, concluded, null).
// The standalone command is prepare + commit.

#include <memory>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "block/job/job.h"

namespace strata::daemon {

class Daemon;

class BackupAction {
 public:
  // `txn`: the JobTxn of a grouped transaction, or nullptr.
  static Result<std::unique_ptr<BackupAction>> prepare(
      Daemon& daemon, const nlohmann::json& args,
      std::shared_ptr<block::job::JobTxn> txn = nullptr);
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
