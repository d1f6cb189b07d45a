#include "daemon/exports.h"

#include <algorithm>
#include <array>
#include <cctype>

#include "base/arg_decoder.h"
#include "daemon/daemon.h"
#include "daemon/export_bitmaps.h"
#include "nbd/protocol.h"

namespace strata::daemon {

namespace {

using Reply = aio::Task<Result<nlohmann::json>>;

Error generic(std::string message) {
  return make_error(ErrorKind::kInvalidArgument, std::move(message));
}

// QEMU's id_wellformed: a letter first, then letters, digits, '-', '.', '_'.
bool id_wellformed(const std::string& id) {
  if (id.empty() || !std::isalpha(static_cast<unsigned char>(id[0]))) {
    return false;
  }
  for (char c : id) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.' && c != '_') {
      return false;
    }
  }
  return true;
}

// An optional uint32 member with QAPI's message for out-of-range values.
std::optional<uint32_t> opt_u32(ArgDecoder& d, std::string_view name) {
  std::optional<int64_t> value = d.opt_i64(name);
  if (!value) {
    return std::nullopt;
  }
  if (*value < 0 || *value > UINT32_MAX) {
    d.fail(generic("Parameter '" + d.full_name(name) + "' expects uint32_t"));
    return std::nullopt;
  }
  return static_cast<uint32_t>(*value);
}

// The members of SocketAddress's unix/inet branches (decoded from `d`, which is the branch's
// object: `data` in the legacy form, `addr` itself in the flat one).
void decode_address_members(ArgDecoder& d, ListenAddress& address) {
  if (address.type == "unix") {
    address.path = d.str("path");
    (void)d.opt_bool("abstract");
    (void)d.opt_bool("tight");
  } else if (address.type == "inet") {
    address.host = d.str("host");
    address.port = d.str("port");
    (void)d.opt_bool("numeric");
    (void)d.opt_i64("to");
    (void)d.opt_bool("ipv4");
    (void)d.opt_bool("ipv6");
    (void)d.opt_bool("keep-alive");
    (void)d.opt_bool("mptcp");
  } else if (address.type == "fd") {
    (void)d.str("str");
  } else if (address.type == "vsock") {
    (void)d.str("cid");
    (void)d.str("port");
  }
}

}  // namespace

ExportManager::ExportManager(Daemon& daemon) : daemon_(daemon) {}

ExportManager::~ExportManager() {
  for (auto& exp : exports_) {
    if (auto root = exp->take_root()) {
      daemon_.graph().detach_root(std::move(root));
    }
  }
}

Result<void> ExportManager::start_server(const nlohmann::json& args, bool keyval) {
  static constexpr std::array<std::string_view, 4> kTypes = {"unix", "inet", "vsock", "fd"};
  ArgDecoder d(args, "", keyval);
  ListenAddress address;
  ArgDecoder addr = d.object("addr");
  address.type = addr.enumeration("type", kTypes);
  if (!addr.failed()) {
    if (keyval) {
      decode_address_members(addr, address);
    } else {
      ArgDecoder data = addr.object("data");
      if (!data.failed()) {
        decode_address_members(data, address);
      }
      ignore_error(data.finish(), "recorded in the shared decoder state");
    }
  }
  ignore_error(addr.finish(), "recorded in the shared decoder state");
  std::optional<std::string> tls_creds = d.opt_str("tls-creds");
  std::optional<std::string> tls_authz = d.opt_str("tls-authz");
  std::optional<uint32_t> max_connections = opt_u32(d, "max-connections");
  std::optional<uint32_t> handshake_max_seconds = opt_u32(d, "handshake-max-seconds");
  auto decoded = d.finish();
  if (!decoded) {
    return decoded;
  }
  if (server_) {
    return generic("NBD server already running");
  }
  std::shared_ptr<const nbd::ServerTls> tls;
  if (tls_creds) {
    auto resolved = server_tls(*tls_creds, tls_authz);
    if (!resolved) {
      return std::move(resolved).error();
    }
    tls = std::move(resolved).value();
  }
  // Without tls-creds, qemu-storage-daemon accepts tls-authz and ignores it.
  if (address.type == "fd") {
    return generic("only QEMU supports file descriptor passing");
  }
  if (address.type == "vsock") {
    return generic("vsock addresses are not supported");
  }
  nbd::ServerConfig config;
  config.max_connections = max_connections.value_or(100);
  config.handshake_max_seconds = handshake_max_seconds.value_or(10);
  config.tls = std::move(tls);
  return start_server_on({address}, config, nullptr);
}

Result<void> ExportManager::start_server_on(const std::vector<ListenAddress>& addresses,
                                            nbd::ServerConfig config,
                                            std::vector<Error>* failures) {
  if (server_) {
    return generic("NBD server already running");
  }
  auto server = std::make_unique<nbd::Server>(daemon_.main_loop(), config);
  std::optional<Error> last_error;
  size_t listening_count = 0;
  for (const ListenAddress& address : addresses) {
    Result<void> listening = address.type == "unix"
                                 ? server->listen_unix(address.path)
                                 : server->listen_inet(address.host, address.port);
    if (listening) {
      ++listening_count;
      continue;
    }
    if (failures == nullptr) {
      return listening;
    }
    failures->push_back(listening.error());
    last_error = std::move(listening).error();
  }
  if (listening_count == 0 && last_error) {
    return std::move(*last_error);
  }
  server->start();
  server_ = std::move(server);
  return ok();
}

aio::Task<void> ExportManager::remove(std::shared_ptr<nbd::Export> exp) {
  exp->request_shutdown();
  if (server_) {
    server_->remove_export(*exp);
  }
  co_await exp->wait_idle();
  if (auto root = exp->take_root()) {
    daemon_.graph().detach_root(std::move(root));
  }
  std::erase(exports_, exp);
  exp->release_bitmaps();
  daemon_.monitors().emit_event("BLOCK_EXPORT_DELETED", {{"id", exp->id()}});
}

aio::Task<Result<void>> ExportManager::stop_server() {
  if (!server_) {
    co_return generic("NBD server not running");
  }
  std::vector<std::shared_ptr<nbd::Export>> doomed(exports_.rbegin(), exports_.rend());
  for (auto& exp : doomed) {
    if (!exp->shutting_down()) {
      exp->request_shutdown();
    }
  }
  for (auto& exp : doomed) {
    co_await remove(exp);
  }
  std::unique_ptr<nbd::Server> server = std::move(server_);
  co_await server->stop();
  co_return ok();
}

Result<void> ExportManager::add_export(const nlohmann::json& args, bool keyval) {
  static constexpr std::array<std::string_view, 4> kTypes = {"nbd", "vhost-user-blk", "fuse",
                                                             "vduse-blk"};
  ArgDecoder d(args, "", keyval);
  std::string type = d.enumeration("type", kTypes);
  std::string id = d.str("id");
  // fixed-iothread: strata never moves an export off its iothread, so both values behave alike.
  (void)d.opt_bool("fixed-iothread");
  std::optional<std::string> iothread = d.opt_str("iothread");
  std::string node_name = d.str("node-name");
  bool writable = d.opt_bool("writable").value_or(false);
  bool writethrough = d.opt_bool("writethrough").value_or(false);
  bool allow_inactive = d.opt_bool("allow-inactive").value_or(false);
  nbd::ExportConfig config;
  // Each requested bitmap: {node, name} (node set) or a name looked up from the export's node.
  std::vector<std::pair<std::optional<std::string>, std::string>> bitmap_names;
  if (type == "nbd") {
    std::optional<std::string> name = d.opt_str("name");
    config.name = name.value_or(node_name);
    config.description = d.opt_str("description");
    if (auto bitmaps = d.opt_list("bitmaps")) {
      for (size_t i = 0; i < bitmaps->size(); ++i) {
        const nlohmann::json& element = (*bitmaps)[i];
        if (element.is_object()) {
          ArgDecoder e = d.element_decoder(element, i, "bitmaps");
          std::string bitmap_node = e.str("node");
          std::string bitmap_name = e.str("name");
          bitmap_names.emplace_back(std::move(bitmap_node), std::move(bitmap_name));
          ignore_error(e.finish(), "recorded in the shared decoder state");
        } else {
          bitmap_names.emplace_back(std::nullopt, d.element_str(element, i, "bitmaps"));
        }
      }
    }
    config.allocation_depth = d.opt_bool("allocation-depth").value_or(false);
  } else if (type == "fuse") {
    (void)d.str("mountpoint");
  } else if (type == "vhost-user-blk") {
    (void)d.object("addr");
  }
  auto decoded = d.finish();
  if (!decoded) {
    return decoded;
  }
  if (type != "nbd") {
    return generic("Block export type '" + type + "' is not supported");
  }
  if (!id_wellformed(id)) {
    return generic("Invalid block export id");
  }
  for (const auto& exp : exports_) {
    if (exp->id() == id) {
      return generic("Block export id '" + id + "' is already in use");
    }
  }
  block::Node* node = daemon_.graph().find(node_name);
  if (node == nullptr) {
    return generic("Cannot find device='' nor node-name='" + node_name + "'");
  }
  if (iothread && !daemon_.has_iothread(*iothread)) {
    return generic("iothread \"" + *iothread + "\" not found");
  }
  if (!node->is_active() && !allow_inactive) {
    auto activated = daemon_.graph().set_active(node, true);
    if (!activated) {
      return activated;
    }
  }
  if (writable && node->is_read_only()) {
    return generic("Cannot export read-only node as writable");
  }
  if (!server_) {
    return generic("NBD server not running");
  }
  if (config.name.size() > nbd::kMaxStringSize) {
    return generic("export name '" + config.name + "' too long");
  }
  if (config.description && config.description->size() > nbd::kMaxStringSize) {
    return generic("description '" + *config.description + "' too long");
  }
  if (server_->find_export(config.name)) {
    return generic("NBD server already has export named '" + config.name + "'");
  }
  auto bitmaps = resolve_export_bitmaps(daemon_.graph(), *node, bitmap_names, !writable);
  if (!bitmaps) {
    return std::move(bitmaps).error();
  }
  // Busy from here on; the export clears it when it is destroyed (also on the failures below).
  for (const auto& bitmap : *bitmaps) {
    config.bitmaps.push_back(bitmap->name());
    bitmap->set_busy(true);
  }
  config.bitmap_sources = std::move(bitmaps).value();
  config.writable = writable;
  config.writethrough = writethrough;
  config.multi_conn = server_->config().max_connections != 1;
  config.io_loop = iothread ? daemon_.iothread_loop(*iothread) : nullptr;
  auto exp = std::make_shared<nbd::Export>(id, std::move(config), node->shared_from_this());
  uint64_t perm = block::kPermConsistentRead | (writable ? uint64_t{block::kPermWrite} : 0u);
  auto root = daemon_.graph().attach_root(*exp, node->shared_from_this(), "root", block::kRoleImage,
                                          perm, block::kPermAll & ~uint64_t{block::kPermResize});
  if (!root) {
    return std::move(root).error();
  }
  exp->set_root(std::move(root).value());
  auto added = server_->add_export(exp);
  if (!added) {
    daemon_.graph().detach_root(exp->take_root());
    return added;
  }
  exports_.push_back(std::move(exp));
  return ok();
}

aio::Task<Result<void>> ExportManager::delete_export(const std::string& id, bool hard) {
  std::shared_ptr<nbd::Export> exp;
  for (const auto& candidate : exports_) {
    if (candidate->id() == id) {
      exp = candidate;
    }
  }
  if (!exp) {
    co_return generic("Export '" + id + "' is not found");
  }
  if (exp->shutting_down()) {
    co_return generic("Block export '" + id + "' is already shutting down");
  }
  if (!hard && exp->connection_count() > 0) {
    co_return generic("export '" + id + "' still in use");
  }
  co_await remove(exp);
  co_return ok();
}

bool ExportManager::uses_loop(const aio::EventLoop& loop) const {
  return std::any_of(exports_.begin(), exports_.end(),
                     [&](const auto& exp) { return exp->config().io_loop == &loop; });
}

nlohmann::json ExportManager::query() const {
  nlohmann::json list = nlohmann::json::array();
  for (auto it = exports_.rbegin(); it != exports_.rend(); ++it) {
    list.push_back({{"type", "nbd"},
                    {"id", (*it)->id()},
                    {"node-name", (*it)->node().name()},
                    {"shutting-down", (*it)->shutting_down()}});
  }
  return list;
}

aio::Task<void> ExportManager::shutdown() {
  if (server_) {
    auto stopped = co_await stop_server();
    ignore_error(std::move(stopped), "a running server always stops");
  }
}

void ExportManager::register_commands() {
  qmp::CommandTable& commands = daemon_.command_table();
  commands.add("nbd-server-start", [this](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    auto started = start_server(args, false);
    if (!started) {
      co_return std::move(started).error();
    }
    co_return nlohmann::json::object();
  });
  commands.add("nbd-server-stop", [this](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    ArgDecoder d(args);
    auto decoded = d.finish();
    if (!decoded) {
      co_return std::move(decoded).error();
    }
    auto stopped = co_await stop_server();
    if (!stopped) {
      co_return std::move(stopped).error();
    }
    co_return nlohmann::json::object();
  });
  commands.add("block-export-add", [this](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    auto added = add_export(args, false);
    if (!added) {
      co_return std::move(added).error();
    }
    co_return nlohmann::json::object();
  });
  commands.add("block-export-del", [this](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    static constexpr std::array<std::string_view, 2> kModes = {"safe", "hard"};
    ArgDecoder d(args);
    std::string id = d.str("id");
    std::string mode = d.opt_enum("mode", kModes).value_or("safe");
    auto decoded = d.finish();
    if (!decoded) {
      co_return std::move(decoded).error();
    }
    auto deleted = co_await delete_export(id, mode == "hard");
    if (!deleted) {
      co_return std::move(deleted).error();
    }
    co_return nlohmann::json::object();
  });
  commands.add("query-block-exports", [this](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    ArgDecoder d(args);
    auto decoded = d.finish();
    if (!decoded) {
      co_return std::move(decoded).error();
    }
    co_return query();
  });
}

}  // namespace strata::daemon
