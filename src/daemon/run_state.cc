#include "daemon/run_state.h"

#include "base/arg_decoder.h"
#include "daemon/daemon.h"

namespace strata::daemon {

namespace {

using Reply = aio::Task<Result<nlohmann::json>>;

Result<void> no_arguments(const nlohmann::json& args) {
  ArgDecoder d(args);
  return d.finish();
}

}  // namespace

void register_run_state_commands(Daemon& daemon) {
  qmp::CommandTable& commands = daemon.command_table();
  commands.add("query-status", [&daemon](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    if (auto checked = no_arguments(args); !checked) {
      co_return std::move(checked).error();
    }
    co_return nlohmann::json{{"status", daemon.run_status()},
                             {"running", daemon.run_status() == "running"}};
  });
  commands.add("stop", [&daemon](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    if (auto checked = no_arguments(args); !checked) {
      co_return std::move(checked).error();
    }
    if (daemon.run_status() == "running") {
      daemon.set_run_status("paused");
      daemon.emit_event("STOP");
    }
    co_return nlohmann::json::object();
  });
  commands.add("cont", [&daemon](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    if (auto checked = no_arguments(args); !checked) {
      co_return std::move(checked).error();
    }
    // QEMU's qmp_cont: block nodes inactivated by a migration come back first.
    if (auto activated = daemon.graph().set_active(nullptr, true); !activated) {
      co_return std::move(activated).error();
    }
    if (daemon.run_status() != "running") {
      daemon.set_run_status("running");
      daemon.emit_event("RESUME");
    }
    co_return nlohmann::json::object();
  });
}

}  // namespace strata::daemon
