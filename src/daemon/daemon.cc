#include "daemon/daemon.h"

#include <array>

#include "base/arg_decoder.h"
#include "daemon/backup_command.h"
#include "daemon/bitmap_commands.h"
#include "daemon/block_job_commands.h"
#include "daemon/commit_command.h"
#include "daemon/exports.h"
#include "daemon/mirror_command.h"
#include "daemon/qom_commands.h"
#include "daemon/run_state.h"
#include "daemon/stream_command.h"
#include "daemon/transaction.h"

namespace strata::daemon {

// ---- IoThread ---------------------------------------------------------------------------------

Result<std::unique_ptr<IoThread>> IoThread::start(std::string id) {
  auto loop = aio::EventLoop::create();
  if (!loop) {
    return std::move(loop).error();
  }
  return std::unique_ptr<IoThread>(new IoThread(std::move(id), std::move(loop).value()));
}

IoThread::IoThread(std::string id, std::unique_ptr<aio::EventLoop> loop)
    : id_(std::move(id)), loop_(std::move(loop)) {
  thread_ = std::thread([this] { loop_->run(); });
}

IoThread::~IoThread() {
  // A stop() made before the thread reached run() (an iothread deleted right after it was
  // created) still ends that run.
  loop_->stop();
  thread_.join();
}

// ---- Daemon -----------------------------------------------------------------------------------

Daemon::Daemon(aio::EventLoop& main_loop)
    : main_loop_(main_loop),
      monitors_(main_loop, commands_, version_info()),
      jobs_(main_loop, [this](const block::job::Job& job) {
        monitors_.emit_event(
            "JOB_STATUS_CHANGE",
            {{"id", job.id()}, {"status", std::string(block::job::status_name(job.status()))}});
      }) {
  // Node events reach the monitors on the main loop, whichever loop raised them.
  graph_.set_event_sink([this](std::string name, nlohmann::json data) {
    main_loop_.post([this, name = std::move(name), data = std::move(data)] {
      monitors_.emit_event(name, data);
    });
  });
  graph_.set_crypto_objects(&crypto_objects_, [this](const std::string& id) {
    return has_iothread(id) || throttle_groups_.contains(id);
  });
  graph_.set_throttle_groups(&throttle_groups_);
  // Before any registration: commands add their transaction forms to it.
  transaction_actions_ = std::make_unique<TransactionActionTable>();
  register_commands();
  register_block_commands();
  register_job_commands();
  register_block_job_commands(*this);
  register_backup_command(*this);
  register_qom_commands(*this);
  register_stream_command(*this);
  register_commit_command(*this);
  register_mirror_command(*this);
  register_run_state_commands(*this);
  jobs_.set_event_sink(
      [this](std::string name, nlohmann::json data) { monitors_.emit_event(name, data); });
  exports_ = std::make_unique<ExportManager>(*this);
  exports_->register_commands();
  register_transaction_command(*this);
  register_bitmap_commands(*this);
}

Daemon::~Daemon() = default;

nlohmann::json Daemon::version_info() {
  return {{"qemu", {{"major", 10}, {"minor", 0}, {"micro", 2}}}, {"package", "strata 0.1.0"}};
}

Result<void> Daemon::object_add(const nlohmann::json& options, bool keyval) {
  ArgDecoder d(options, "", keyval);
  static constexpr std::array<std::string_view, 9> kTypes = {
      "iothread",           "tls-creds-x509",       "tls-creds-psk",
      "authz-simple",       "authz-list",           "throttle-group",
      "memory-backend-ram", "memory-backend-memfd", "memory-backend-file"};
  std::string type = d.enumeration("qom-type", kTypes);
  std::string id = d.str("id");
  if (crypto::ObjectTable::handles(type)) {
    return add_crypto_object(type, id, d);
  }
  if (MemoryBackends::handles(type)) {
    if (d.failed()) {
      return d.finish();
    }
    if (object_id_taken(id)) {
      return duplicate_object(id);
    }
    return memory_backends_.add(type, id, d);
  }
  if (type == "throttle-group") {
    if (d.failed()) {
      return d.finish();
    }
    return throttle_groups_.add(id, d,
                                [this](const std::string& name) { return object_id_taken(name); });
  }
  // iothread properties are accepted; strata's loops need no polling or batch tuning.
  (void)d.opt_i64("poll-max-ns");
  (void)d.opt_i64("poll-grow");
  (void)d.opt_i64("poll-shrink");
  (void)d.opt_i64("aio-max-batch");
  (void)d.opt_i64("thread-pool-min");
  (void)d.opt_i64("thread-pool-max");
  auto decoded = d.finish();
  if (!decoded) {
    return decoded;
  }
  if (object_id_taken(id)) {
    return duplicate_object(id);
  }
  auto thread = IoThread::start(id);
  if (!thread) {
    return std::move(thread).error();
  }
  iothreads_.emplace(id, std::move(thread).value());
  return ok();
}

bool Daemon::object_id_taken(const std::string& id) const {
  return iothreads_.count(id) != 0 || crypto_objects_.contains(id) ||
         throttle_groups_.contains(id) || memory_backends_.contains(id);
}

Error Daemon::duplicate_object(const std::string& id) {
  return make_error(ErrorKind::kExists,
                    "attempt to add duplicate property '" + id + "' to object (type 'container')");
}

Result<void> Daemon::object_del(const std::string& id) {
  if (crypto_objects_.remove(id)) {
    return ok();  // users that resolved it (a running NBD server) keep their reference
  }
  if (throttle_groups_.contains(id)) {
    return throttle_groups_.remove(id);
  }
  if (memory_backends_.remove(id)) {
    return ok();
  }
  auto it = iothreads_.find(id);
  if (it == iothreads_.end()) {
    return make_error(ErrorKind::kNotFound, "object '" + id + "' not found");
  }
  if (exports_->uses_loop(it->second->loop())) {
    // As in QEMU, deleting an iothread an export runs on succeeds; the thread lives on (and the
    // id is free again) until the daemon exits.
    retired_iothreads_.push_back(std::move(it->second));
  }
  iothreads_.erase(it);
  return ok();
}

void Daemon::register_commands() {
  commands_.add("query-version",
                [](const nlohmann::json& args, qmp::Monitor&) -> aio::Task<Result<nlohmann::json>> {
                  ArgDecoder d(args);
                  auto decoded = d.finish();
                  if (!decoded) {
                    co_return std::move(decoded).error();
                  }
                  co_return version_info();
                });
  commands_.add(
      "query-commands",
      [this](const nlohmann::json& args, qmp::Monitor&) -> aio::Task<Result<nlohmann::json>> {
        ArgDecoder d(args);
        auto decoded = d.finish();
        if (!decoded) {
          co_return std::move(decoded).error();
        }
        nlohmann::json list = nlohmann::json::array();
        list.push_back({{"name", "qmp_capabilities"}});
        for (const auto& name : commands_.names()) {
          list.push_back({{"name", name}});
        }
        co_return list;
      });
  commands_.add(
      "quit",
      [this](const nlohmann::json& args, qmp::Monitor&) -> aio::Task<Result<nlohmann::json>> {
        ArgDecoder d(args);
        auto decoded = d.finish();
        if (!decoded) {
          co_return std::move(decoded).error();
        }
        // As qemu-storage-daemon, running jobs are cancelled and their events sent before
        // quit's reply.
        co_await jobs_.cancel_all();
        monitors_.request_quit();
        co_return nlohmann::json::object();
      });
  commands_.add(
      "object-add",
      [this](const nlohmann::json& args, qmp::Monitor&) -> aio::Task<Result<nlohmann::json>> {
        auto added = object_add(args, false);
        if (!added) {
          co_return std::move(added).error();
        }
        co_return nlohmann::json::object();
      });
  commands_.add(
      "query-memdev",
      [this](const nlohmann::json& args, qmp::Monitor&) -> aio::Task<Result<nlohmann::json>> {
        ArgDecoder d(args);
        auto decoded = d.finish();
        if (!decoded) {
          co_return std::move(decoded).error();
        }
        co_return memory_backends_.info();
      });
  commands_.add(
      "object-del",
      [this](const nlohmann::json& args, qmp::Monitor&) -> aio::Task<Result<nlohmann::json>> {
        ArgDecoder d(args);
        std::string id = d.str("id");
        auto decoded = d.finish();
        if (!decoded) {
          co_return std::move(decoded).error();
        }
        auto deleted = object_del(id);
        if (!deleted) {
          co_return std::move(deleted).error();
        }
        co_return nlohmann::json::object();
      });
}

void Daemon::stop() {
  main_loop_.post([this] {
    stop_requested_ = true;
    monitors_.quit_event().set();
  });
}

void Daemon::run() {
  main_loop_.block_on([](Daemon& self) -> aio::Task<void> {
    co_await self.monitors_.quit_event().wait();
    // As qemu-storage-daemon's exit path (job_cancel_sync_all): jobs end before the graph.
    co_await self.jobs_.cancel_all();
    co_await self.exports_->shutdown();
    co_await self.monitors_.shutdown();
  }(*this));
  iothreads_.clear();
  retired_iothreads_.clear();
}

}  // namespace strata::daemon
