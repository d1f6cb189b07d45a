#pragma once
// Server: NBD listeners and their client connections (QEMU's nbd-server-start state in
// blockdev-nbd.c), plus the table of exports clients can select by name.
//
// Accepting: with max_connections > 0, no new client is accepted while that many are connected
// (later ones wait in the listen backlog and get their greeting when a slot frees, as QEMU does).
// A client that has not finished the handshake after handshake_max_seconds (> 0) is dropped.
// stop() closes the listeners and every client (negotiated or not) and waits for their requests.
//
// Threading: everything on `loop` (the daemon's main loop).

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "aio/event_loop.h"
#include "aio/sync.h"
#include "aio/task_group.h"
#include "base/result.h"
#include "nbd/export.h"

namespace strata::nbd {

class ServerConnection;
struct ServerTls;

struct ServerConfig {
  uint32_t max_connections = 100;       // 0: unlimited
  uint32_t handshake_max_seconds = 10;  // 0: no limit
  // Called on the loop after a client connection has ended and been forgotten: `negotiated` is
  // whether it reached transmission (selected an export), `remaining` how many clients are still
  // connected. `strata nbd` uses it to exit after the last client, as qemu-nbd does.
  std::function<void(bool negotiated, size_t remaining)> on_client_closed;
  std::shared_ptr<const ServerTls> tls;  // set: every client must STARTTLS first
};

class Server final : public ExportDirectory {
 public:
  Server(aio::EventLoop& loop, ServerConfig config);
  ~Server() override;
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds and listens; call before start(). An existing socket file at `path` is replaced.
  Result<void> listen_unix(const std::string& path);
  // host may be a name or address; port a number or service name (QEMU's inet address).
  Result<void> listen_inet(const std::string& host, const std::string& port);
  // Starts accepting on every listener.
  void start();
  // Closes listeners and clients; returns once every connection has ended.
  aio::Task<void> stop();

  const ServerConfig& config() const { return config_; }

  // Export table. add_export fails with QEMU's text when the name is taken.
  Result<void> add_export(std::shared_ptr<Export> exp);
  void remove_export(const Export& exp);
  std::shared_ptr<Export> find_export(std::string_view name) const override;
  std::vector<std::shared_ptr<Export>> list_exports() const override;

 private:
  struct Listener {
    int fd = -1;
    std::string unix_path;
  };
  aio::Task<void> accept_loop(Listener& listener);
  aio::Task<void> serve_client(int fd);
  aio::Task<void> handshake_timer(ServerConnection& connection);

  aio::EventLoop& loop_;
  ServerConfig config_;
  std::vector<std::unique_ptr<Listener>> listeners_;
  std::vector<ServerConnection*> clients_;
  std::vector<std::shared_ptr<Export>> exports_;
  bool stopping_ = false;
  aio::Event slot_free_;
  aio::TaskGroup tasks_;
};

}  // namespace strata::nbd
