#pragma once
// The QMP `transaction` command (QEMU's qmp_transaction in blockdev.c): a list of actions that
// take effect all together or not at all.
//
// Each action type registers a factory in the daemon's TransactionActionTable. The command first
// decodes every action (any argument error fails the whole command before anything happens),
// then prepares the actions in order; if one fails, the actions already prepared are aborted in
// reverse order and the command fails with that error. When all are prepared they are committed
// in order. Every prepared action is cleaned last, after commit or abort.
//
// The standalone commands of an action type (block-dirty-bitmap-add, ...) run as a transaction
// of that one action, so they and their transaction form behave alike.
//
// Threading: the main loop only. prepare() may suspend; nothing else of a transaction does.

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "aio/task.h"
#include "base/arg_decoder.h"
#include "base/result.h"
#include "block/job/job.h"

namespace strata::daemon {

class Daemon;

class TransactionAction {
 public:
  virtual ~TransactionAction() = default;
  // Checks the action and makes its change in a form abort() can undo exactly. A failing prepare
  // leaves nothing to undo: abort() is not called for it (clean() is not either).
  virtual aio::Task<Result<void>> prepare() = 0;
  // Makes the prepared change final; cannot fail.
  virtual void commit() {}
  // Undoes what prepare() did.
  virtual void abort() {}
  // Releases what the action held, after commit() or abort().
  virtual void clean() {}

  // With completion-mode=grouped: the JobTxn every job the transaction starts joins (set before
  // prepare(); nullptr otherwise).
  std::shared_ptr<block::job::JobTxn> job_txn;
};

// Decodes the `data` member of one action (the decoder's path is "actions[i].data", or the
// standalone command's arguments) and returns the action. On a decoding error the factory
// returns nullptr after recording the error in `data` (or the whole decoder state).
using TransactionActionFactory =
    std::function<std::unique_ptr<TransactionAction>(Daemon& daemon, ArgDecoder& data)>;

class TransactionActionTable {
 public:
  // `supports_grouped`: whether the action may run with completion-mode=grouped (only actions
  // that start block jobs can; QEMU refuses the others in their prepare step).
  void add(std::string type, TransactionActionFactory factory, bool supports_grouped = false);
  bool contains(const std::string& type) const { return types_.count(type) != 0; }
  // Action type names, sorted (the `type` enum).
  std::vector<std::string> types() const;

  struct Entry {
    TransactionActionFactory factory;
    bool supports_grouped = false;
  };
  const Entry* find(const std::string& type) const;

 private:
  std::map<std::string, Entry> types_;
};

// Prepares, then commits `actions`, or aborts the prepared ones on the first failure (see
// above). `grouped` is completion-mode=grouped: an action type that does not support it fails
// the transaction before anything is prepared (QEMU's message); the others share one JobTxn.
aio::Task<Result<void>> run_transaction(std::vector<std::unique_ptr<TransactionAction>> actions,
                                        std::vector<const TransactionActionTable::Entry*> entries,
                                        std::vector<std::string> types, bool grouped);

// Registers `transaction` and the `abort` action type.
void register_transaction_command(Daemon& daemon);

}  // namespace strata::daemon
