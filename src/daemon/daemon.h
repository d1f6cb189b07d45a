#pragma once
// Daemon: owns the block graph, the QMP monitors, user-created objects (iothreads) and the
// command table, and runs on the main loop. It is what `strata daemon` builds from its command
// line (qemu-storage-daemon's) and what QMP commands act on.

#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "aio/event_loop.h"
#include "base/result.h"
#include "block/graph/graph.h"
#include "block/job/job.h"
#include "block/throttle/throttle_group.h"
#include "crypto/object_table.h"
#include "daemon/memory_backends.h"
#include "qmp/command_table.h"
#include "qmp/monitor.h"

namespace strata::daemon {

class ExportManager;
class TransactionActionTable;

// An `iothread` object: a thread running its own event loop.
class IoThread {
 public:
  static Result<std::unique_ptr<IoThread>> start(std::string id);
  ~IoThread();
  const std::string& id() const { return id_; }
  aio::EventLoop& loop() { return *loop_; }

 private:
  IoThread(std::string id, std::unique_ptr<aio::EventLoop> loop);
  std::string id_;
  std::unique_ptr<aio::EventLoop> loop_;
  std::thread thread_;
};

class Daemon {
 public:
  explicit Daemon(aio::EventLoop& main_loop);
  ~Daemon();
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  aio::EventLoop& main_loop() { return main_loop_; }
  block::Graph& graph() { return graph_; }
  qmp::MonitorHub& monitors() { return monitors_; }
  const qmp::CommandTable& commands() const { return commands_; }
  block::job::JobManager& jobs() { return jobs_; }
  qmp::CommandTable& command_table() { return commands_; }
  // Block exports and the NBD server (daemon/exports.h).
  ExportManager& exports() { return *exports_; }
  // The action types of `transaction` (daemon/transaction.h); others register theirs here.
  TransactionActionTable& transaction_actions() { return *transaction_actions_; }
  bool has_iothread(const std::string& id) const { return iothreads_.count(id) != 0; }
  // tls-creds-x509/-psk and authz-simple/-list objects (daemon/crypto_objects.cc).
  const crypto::ObjectTable& crypto_objects() const { return crypto_objects_; }
  // throttle-group objects (qom-get/qom-set reach their limits).
  block::throttle::ThrottleGroups& throttle_groups() { return throttle_groups_; }
  // Whether a user-created object (iothread, crypto, throttle group) has `id`.
  bool object_id_taken(const std::string& id) const;
  // The event loop of iothread `id`, or nullptr.
  aio::EventLoop* iothread_loop(const std::string& id) const {
    auto it = iothreads_.find(id);
    return it == iothreads_.end() ? nullptr : &it->second->loop();
  }

  // blockdev-add from QMP arguments or a --blockdev option (keyval: scalars are strings).
  Result<void> blockdev_add(const nlohmann::json& options, bool keyval);
  // object-add from QMP arguments or an --object option.
  Result<void> object_add(const nlohmann::json& options, bool keyval);
  Result<void> object_del(const std::string& id);

  // The run state query-status reports ("running", "paused", ...; daemon/run_state.h).
  const std::string& run_status() const { return run_status_; }
  void set_run_status(std::string status) { run_status_ = std::move(status); }
  // Sends a QMP event to every monitor.
  void emit_event(std::string_view name, const nlohmann::json& data = nullptr) {
    monitors_.emit_event(name, data);
  }
  // memory-backend-* objects (daemon/memory_backends.h).
  const MemoryBackends& memory_backends() const { return memory_backends_; }

  // The query-version value.
  static nlohmann::json version_info();

  // Runs until quit (QMP) or stop() (signals), then tears down monitors and objects.
  void run();
  // Thread-safe request to shut down (SIGTERM/SIGINT).
  void stop();

 private:
  void register_commands();
  Result<void> add_crypto_object(const std::string& qom_type, const std::string& id, ArgDecoder& d);
  static Error duplicate_object(const std::string& id);
  void register_block_commands();
  void register_job_commands();

  aio::EventLoop& main_loop_;
  block::Graph graph_;
  qmp::CommandTable commands_;
  qmp::MonitorHub monitors_;
  // After graph_ and monitors_: jobs use nodes and report to monitors until they are destroyed.
  block::job::JobManager jobs_;
  std::map<std::string, std::unique_ptr<IoThread>> iothreads_;
  crypto::ObjectTable crypto_objects_;
  block::throttle::ThrottleGroups throttle_groups_;
  MemoryBackends memory_backends_;
  std::string run_status_ = "running";
  // Deleted by object-del while an export still used them; stopped when the daemon exits.
  std::vector<std::unique_ptr<IoThread>> retired_iothreads_;
  // After graph_ and monitors_: exports hold root edges and emit events.
  std::unique_ptr<ExportManager> exports_;
  std::unique_ptr<TransactionActionTable> transaction_actions_;
  bool stop_requested_ = false;
};

}  // namespace strata::daemon
