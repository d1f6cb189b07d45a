#include "qmp/monitor.h"

#include "base/qemu_json.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace strata::qmp {

namespace {

nlohmann::json timestamp_now() {
  timeval tv{};
  if (gettimeofday(&tv, nullptr) != 0) {
    return {{"seconds", -1}, {"microseconds", -1}};
  }
  return {{"seconds", static_cast<int64_t>(tv.tv_sec)},
          {"microseconds", static_cast<int64_t>(tv.tv_usec)}};
}

Error qmp_error(std::string desc, const char* qmp_class = nullptr) {
  Error error(ErrorKind::kInvalidArgument, std::move(desc));
  return qmp_class != nullptr ? error.with_qmp_class(qmp_class) : error;
}

}  // namespace

nlohmann::json error_object(const Error& error) {
  nlohmann::json body;
  body["class"] = error.qmp_class().empty() ? "GenericError" : error.qmp_class();
  body["desc"] = error.message();
  return body;
}

// ---- Monitor ----------------------------------------------------------------------------------

Monitor::Monitor(MonitorHub& hub, int in_fd, int out_fd, MonitorOptions options)
    : hub_(hub), in_fd_(in_fd), out_fd_(out_fd), options_(options) {
  hub_.monitors_.push_back(this);
}

Monitor::~Monitor() {
  auto& monitors = hub_.monitors_;
  monitors.erase(std::remove(monitors.begin(), monitors.end(), this), monitors.end());
}

void Monitor::send(const nlohmann::json& message) {
  if (peer_gone_) {
    return;
  }
  // QEMU's text: members in QDict order, its compact or pretty layout, and every line end written
  // as \r\n (monitor_puts).
  std::string json = qemu_json(message, options_.pretty);
  std::string text;
  text.reserve(json.size() + 8);
  for (char c : json) {
    if (c == '\n') {
      text += '\r';
    }
    text += c;
  }
  text += "\r\n";
  outbox_.push_back(std::move(text));
  output_ready_.set();
}

void Monitor::close() {
  closing_ = true;
  output_ready_.set();
  // Wakes the pending read of a socket with end-of-file (a no-op on pipes and terminals, whose
  // reads end when the hub's tasks are destroyed).
  ::shutdown(in_fd_, SHUT_RD);
}

aio::Task<void> Monitor::write_loop() {
  aio::EventLoop& loop = hub_.loop();
  while (true) {
    while (!outbox_.empty()) {
      std::vector<std::string> batch;
      batch.swap(outbox_);
      for (const auto& text : batch) {
        size_t sent = 0;
        while (sent < text.size() && !peer_gone_) {
          // Offset -1: the stream's own position (sockets, pipes, terminals alike).
          int n = co_await loop.write(out_fd_, text.data() + sent,
                                      static_cast<uint32_t>(text.size() - sent), ~uint64_t{0});
          if (n == -EINTR || n == -EAGAIN) {
            continue;
          }
          if (n <= 0) {
            peer_gone_ = true;
            break;
          }
          sent += static_cast<size_t>(n);
        }
      }
    }
    if (closing_ || peer_gone_) {
      break;
    }
    output_ready_.reset();
    co_await output_ready_.wait();
  }
  writer_done_ = true;
  writer_finished_.set();
}

aio::Task<void> Monitor::serve() {
  aio::TaskGroup writer;
  writer.spawn(write_loop());

  nlohmann::json greeting;
  greeting["QMP"]["version"] = hub_.version();
  greeting["QMP"]["capabilities"] = nlohmann::json::array({"oob"});
  send(greeting);

  aio::EventLoop& loop = hub_.loop();
  std::vector<char> buffer(64 * 1024);
  while (!closing_ && !peer_gone_) {
    int n = co_await loop.read(in_fd_, buffer.data(), static_cast<uint32_t>(buffer.size()),
                               ~uint64_t{0});
    if (n == -EINTR || n == -EAGAIN) {
      continue;
    }
    if (n <= 0) {
      break;
    }
    parser_.feed(std::string_view(buffer.data(), static_cast<size_t>(n)));
    while (auto message = parser_.next()) {
      co_await handle(std::move(*message));
      if (hub_.quit_requested() || closing_) {
        break;
      }
    }
    if (hub_.quit_requested()) {
      hub_.notify_quit_after_reply();
      break;
    }
  }
  closing_ = true;
  output_ready_.set();
  co_await writer.wait();
}

aio::Task<void> Monitor::handle(Result<nlohmann::json> message) {
  if (!message) {
    nlohmann::json reply;
    reply["error"] = error_object(message.error());
    send(reply);
    co_return;
  }
  co_await dispatch(*message);
}

// Validates the request envelope the way QEMU's monitor/qmp-dispatch.c does, then runs the
// command. The reply echoes `id` whenever the request carried one.
aio::Task<void> Monitor::dispatch(const nlohmann::json& request) {
  const nlohmann::json* id = nullptr;
  if (request.is_object()) {
    auto it = request.find("id");
    if (it != request.end()) {
      id = &*it;
    }
  }
  auto reply_error = [&](const Error& error) {
    nlohmann::json reply;
    if (id != nullptr) {
      reply["id"] = *id;
    }
    reply["error"] = error_object(error);
    send(reply);
  };

  if (!request.is_object()) {
    reply_error(qmp_error("QMP input must be a JSON object"));
    co_return;
  }
  bool has_execute = request.contains("execute");
  bool has_oob = request.contains("exec-oob");
  for (auto it = request.begin(); it != request.end(); ++it) {
    const std::string& key = it.key();
    if (key == "execute" || key == "arguments" || key == "id" || key == "control") {
      continue;
    }
    if (key == "exec-oob" && oob_enabled_) {
      continue;
    }
    reply_error(qmp_error("QMP input member '" + key + "' is unexpected"));
    co_return;
  }
  if (has_execute && has_oob) {
    reply_error(qmp_error("QMP input must not have both 'execute' and 'exec-oob'"));
    co_return;
  }
  const char* verb = has_oob ? "exec-oob" : "execute";
  auto command_it = request.find(verb);
  if (command_it == request.end()) {
    reply_error(qmp_error("QMP input lacks member 'execute'"));
    co_return;
  }
  if (!command_it->is_string()) {
    reply_error(qmp_error(std::string("QMP input member '") + verb + "' must be a string"));
    co_return;
  }
  std::string name = command_it->get<std::string>();
  nlohmann::json arguments = nlohmann::json::object();
  if (auto args_it = request.find("arguments"); args_it != request.end()) {
    if (!args_it->is_object()) {
      reply_error(qmp_error("QMP input member 'arguments' must be an object"));
      co_return;
    }
    arguments = *args_it;
  }

  if (name == "qmp_capabilities") {
    if (negotiated_) {
      reply_error(qmp_error("Capabilities negotiation is already complete, command ignored",
                            "CommandNotFound"));
      co_return;
    }
    bool want_oob = false;
    for (auto it = arguments.begin(); it != arguments.end(); ++it) {
      if (it.key() != "enable") {
        reply_error(qmp_error("Parameter '" + it.key() + "' is unexpected"));
        co_return;
      }
    }
    if (auto enable = arguments.find("enable"); enable != arguments.end()) {
      if (!enable->is_array()) {
        reply_error(qmp_error("Invalid parameter type for 'enable', expected: array"));
        co_return;
      }
      for (size_t i = 0; i < enable->size(); ++i) {
        const auto& cap = (*enable)[i];
        if (!cap.is_string()) {
          reply_error(qmp_error("Invalid parameter type for 'enable[" + std::to_string(i) +
                                "]', expected: string"));
          co_return;
        }
        if (cap.get<std::string>() != "oob") {
          // QEMU reports the enum with a 'null' name here (qmp-spec transcript).
          reply_error(
              qmp_error("Parameter 'null' does not accept value '" + cap.get<std::string>() + "'"));
          co_return;
        }
        want_oob = true;
      }
    }
    negotiated_ = true;
    oob_enabled_ = want_oob;
    nlohmann::json reply;
    reply["return"] = nlohmann::json::object();
    if (id != nullptr) {
      reply["id"] = *id;
    }
    send(reply);
    co_return;
  }
  if (!negotiated_) {
    reply_error(
        qmp_error("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"));
    co_return;
  }
  const Command* command = hub_.commands().find(name);
  if (command == nullptr) {
    reply_error(qmp_error("The command " + name + " has not been found", "CommandNotFound"));
    co_return;
  }
  if (has_oob && !command->allow_oob) {
    reply_error(qmp_error("The command " + name + " does not support OOB"));
    co_return;
  }
  auto result = co_await command->handler(arguments, *this);
  if (!result) {
    reply_error(result.error());
    co_return;
  }
  nlohmann::json reply;
  reply["return"] = *result;
  if (id != nullptr) {
    reply["id"] = *id;
  }
  send(reply);
}

// ---- MonitorHub -------------------------------------------------------------------------------

MonitorHub::MonitorHub(aio::EventLoop& loop, const CommandTable& commands, nlohmann::json version)
    : loop_(loop), commands_(commands), version_(std::move(version)) {}

MonitorHub::~MonitorHub() {
  for (auto& listener : listeners_) {
    if (listener->fd >= 0) {
      ::close(listener->fd);
    }
  }
}

Result<void> MonitorHub::listen_unix(const std::string& path, MonitorOptions options) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.size() >= sizeof(address.sun_path)) {
    return make_error(ErrorKind::kInvalidArgument, "UNIX socket path '" + path + "' is too long");
  }
  std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return Error::from_errno(errno, "Failed to create socket");
  }
  ::unlink(path.c_str());
  // Only the owner may talk to the monitor: create the socket file with mode 0600.
  mode_t old_mask = ::umask(0177);
  int bound = ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  int bind_errno = errno;
  ::umask(old_mask);
  if (bound != 0) {
    ::close(fd);
    return Error::from_errno(bind_errno, "Failed to bind socket to " + path);
  }
  if (::listen(fd, 16) != 0) {
    int listen_errno = errno;
    ::close(fd);
    return Error::from_errno(listen_errno, "Failed to listen on socket");
  }
  listeners_.push_back(std::make_unique<Listener>(Listener{fd, path, options}));
  tasks_.spawn(accept_loop(listeners_.back().get()));
  return ok();
}

aio::Task<void> MonitorHub::accept_loop(Listener* listener) {
  co_await loop_.yield();  // see serve_stream
  while (!shutting_down_) {
    int fd = co_await loop_.accept(listener->fd, SOCK_CLOEXEC);
    if (fd == -EINTR || fd == -EAGAIN || fd == -ECONNABORTED) {
      continue;
    }
    if (fd < 0) {
      break;
    }
    if (shutting_down_) {
      ::close(fd);
      break;
    }
    // One client at a time, as a QEMU socket chardev does.
    Monitor monitor(*this, fd, fd, listener->options);
    co_await monitor.serve();
    ::close(fd);
  }
}

void MonitorHub::serve_fds(int in_fd, int out_fd, MonitorOptions options) {
  tasks_.spawn(serve_stream(in_fd, out_fd, options));
}

aio::Task<void> MonitorHub::serve_stream(int in_fd, int out_fd, MonitorOptions options) {
  // Monitors may be set up from the command line before the loop runs; start on the loop.
  co_await loop_.yield();
  Monitor monitor(*this, in_fd, out_fd, options);
  co_await monitor.serve();
}

void MonitorHub::emit_event(std::string_view name, const nlohmann::json& data) {
  nlohmann::json event;
  event["timestamp"] = timestamp_now();
  event["event"] = name;
  if (!data.is_null()) {
    event["data"] = data;
  }
  for (Monitor* monitor : monitors_) {
    if (monitor->negotiated()) {
      monitor->send(event);
    }
  }
}

void MonitorHub::notify_quit_after_reply() {
  quit_event_.set();
}

aio::Task<void> MonitorHub::shutdown() {
  shutting_down_ = true;
  for (auto& listener : listeners_) {
    if (listener->fd >= 0) {
      ::shutdown(listener->fd, SHUT_RDWR);
      ::close(listener->fd);
      listener->fd = -1;
      ::unlink(listener->path.c_str());
    }
  }
  for (Monitor* monitor : monitors_) {
    monitor->close();
  }
  co_await tasks_.wait();
}

}  // namespace strata::qmp
