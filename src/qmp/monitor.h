#pragma once
// QMP monitors: listening sockets and client connections speaking QEMU's QMP (qmp-spec):
// greeting, capabilities negotiation, streaming JSON input, replies with `id` echoed verbatim,
// and events broadcast to every negotiated client. Events raised while a command runs are queued
// before that command's reply, so clients see them first (as QEMU does).
//
// Threading: everything runs on the daemon's main loop.

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "aio/event_loop.h"
#include "aio/sync.h"
#include "aio/task_group.h"
#include "base/result.h"
#include "qmp/command_table.h"
#include "qmp/json_stream.h"

namespace strata::qmp {

struct MonitorOptions {
  bool pretty = false;
};

class MonitorHub;

// One client connection.
class Monitor {
 public:
  // Reads requests from `in_fd` and writes replies to `out_fd` (the same socket, or stdin and
  // stdout for --chardev stdio). The descriptors stay owned by the caller.
  Monitor(MonitorHub& hub, int in_fd, int out_fd, MonitorOptions options);
  ~Monitor();
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;

  bool negotiated() const { return negotiated_; }
  // Queues one message for sending (\r\n-terminated, pretty if configured).
  void send(const nlohmann::json& message);
  // Serves the connection until the peer leaves or the hub shuts down.
  aio::Task<void> serve();
  // Stops reading; queued output is still flushed.
  void close();

 private:
  aio::Task<void> write_loop();
  aio::Task<void> handle(Result<nlohmann::json> message);
  aio::Task<void> dispatch(const nlohmann::json& request);

  MonitorHub& hub_;
  int in_fd_;
  int out_fd_;
  MonitorOptions options_;
  bool negotiated_ = false;
  bool oob_enabled_ = false;
  bool closing_ = false;
  bool writer_done_ = false;
  bool peer_gone_ = false;
  std::vector<std::string> outbox_;
  aio::Event output_ready_;
  aio::Event writer_finished_;
  JsonStreamParser parser_;
};

class MonitorHub {
 public:
  // `version` is the query-version value (also used in the greeting).
  MonitorHub(aio::EventLoop& loop, const CommandTable& commands, nlohmann::json version);
  ~MonitorHub();
  MonitorHub(const MonitorHub&) = delete;
  MonitorHub& operator=(const MonitorHub&) = delete;

  // Listens on a unix socket path (an existing socket file is replaced; mode 0600). Like a QEMU
  // socket chardev, one client is served at a time; the next waits in the backlog.
  Result<void> listen_unix(const std::string& path, MonitorOptions options);
  // Serves one client on already open descriptors (--chardev stdio: 0 and 1).
  void serve_fds(int in_fd, int out_fd, MonitorOptions options);

  // Sends an event to every negotiated monitor: {"timestamp", "event", "data"?}.
  void emit_event(std::string_view name, const nlohmann::json& data = nullptr);

  // Requests daemon shutdown after the current command's reply (QMP `quit`).
  void request_quit() { quit_requested_ = true; }
  bool quit_requested() const { return quit_requested_; }
  // Resolves when quit is requested; the daemon waits on it.
  aio::Event& quit_event() { return quit_event_; }

  // Stops listening, closes every connection after flushing, and waits for them.
  aio::Task<void> shutdown();

  const CommandTable& commands() const { return commands_; }
  const nlohmann::json& version() const { return version_; }
  aio::EventLoop& loop() { return loop_; }

 private:
  friend class Monitor;
  struct Listener {
    int fd;
    std::string path;
    MonitorOptions options;
  };
  aio::Task<void> accept_loop(Listener* listener);
  aio::Task<void> serve_stream(int in_fd, int out_fd, MonitorOptions options);
  void notify_quit_after_reply();

  aio::EventLoop& loop_;
  const CommandTable& commands_;
  nlohmann::json version_;
  std::vector<std::unique_ptr<Listener>> listeners_;
  std::vector<Monitor*> monitors_;
  aio::TaskGroup tasks_;
  bool quit_requested_ = false;
  bool shutting_down_ = false;
  aio::Event quit_event_;
};

// Error reply payload: {"class": ..., "desc": ...}.
nlohmann::json error_object(const Error& error);

}  // namespace strata::qmp
