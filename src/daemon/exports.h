#pragma once
// Block exports of the daemon (QEMU's block/export/export.c and blockdev-nbd.c): the NBD server
// (nbd-server-start/-stop, --nbd-server) and its exports (block-export-add/-del,
// query-block-exports, --export), with qemu-storage-daemon's arguments and error texts.
//
// An export is a root parent of its node with consistent-read permission (plus write when
// writable) and shares everything, as QEMU's BlockBackend of an export does. Deleting an export
// or stopping the server disconnects its clients and waits for their in-flight requests; other
// exports and QMP keep running meanwhile.

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "aio/task.h"
#include "base/result.h"
#include "nbd/export.h"
#include "nbd/server.h"

namespace strata::daemon {

class Daemon;

// Where an NBD server listens.
struct ListenAddress {
  std::string type;  // unix | inet
  std::string path;
  std::string host;
  std::string port;
};

class ExportManager {
 public:
  explicit ExportManager(Daemon& daemon);
  ~ExportManager();

  // nbd-server-start (legacy address form, `keyval` false) or --nbd-server (flat `addr.*`,
  // keyval true).
  Result<void> start_server(const nlohmann::json& args, bool keyval);
  // Starts a server on several addresses at once (the embedded default of `strata daemon`).
  // Addresses that cannot be bound are skipped and reported in `failures`; fails only when none
  // can be bound.
  Result<void> start_server_on(const std::vector<ListenAddress>& addresses,
                               nbd::ServerConfig config, std::vector<Error>* failures);
  // nbd-server-stop: deletes every NBD export (BLOCK_EXPORT_DELETED each), then closes the
  // listeners and the remaining clients.
  aio::Task<Result<void>> stop_server();
  // block-export-add / --export.
  Result<void> add_export(const nlohmann::json& args, bool keyval);
  // block-export-del.
  aio::Task<Result<void>> delete_export(const std::string& id, bool hard);
  nlohmann::json query() const;
  // Whether an export runs its connections on `loop` (an iothread in use cannot be deleted).
  bool uses_loop(const aio::EventLoop& loop) const;
  // Daemon shutdown: like nbd-server-stop when a server runs.
  aio::Task<void> shutdown();

  void register_commands();

  // The server's TLS from tls-creds / tls-authz ids (nbd-server-start, strata nbd; in
  // daemon/exports_tls.cc).
  Result<std::shared_ptr<const nbd::ServerTls>> server_tls(
      const std::string& creds_id, const std::optional<std::string>& authz_id) const;

 private:
  aio::Task<void> remove(std::shared_ptr<nbd::Export> exp);

  Daemon& daemon_;
  std::unique_ptr<nbd::Server> server_;
  std::vector<std::shared_ptr<nbd::Export>> exports_;  // oldest first
};

}  // namespace strata::daemon
