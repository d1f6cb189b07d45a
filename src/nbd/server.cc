#include "nbd/server.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "nbd/server_connection.h"
#include "nbd/transport.h"

namespace strata::nbd {

Server::Server(aio::EventLoop& loop, ServerConfig config) : loop_(loop), config_(config) {}

Server::~Server() {
  for (auto& listener : listeners_) {
    if (listener->fd >= 0) {
      ::close(listener->fd);
      if (!listener->unix_path.empty()) {
        ::unlink(listener->unix_path.c_str());
      }
    }
  }
}

Result<void> Server::listen_unix(const std::string& path) {
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
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    int bind_errno = errno;
    ::close(fd);
    return Error::from_errno(bind_errno, "Failed to bind socket to " + path);
  }
  if (::listen(fd, 128) != 0) {
    int listen_errno = errno;
    ::close(fd);
    ::unlink(path.c_str());
    return Error::from_errno(listen_errno, "Failed to listen on socket");
  }
  auto listener = std::make_unique<Listener>();
  listener->fd = fd;
  listener->unix_path = path;
  listeners_.push_back(std::move(listener));
  return ok();
}

Result<void> Server::listen_inet(const std::string& host, const std::string& port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_ADDRCONFIG;
  addrinfo* found = nullptr;
  int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &found);
  if (rc != 0) {
    return make_error(ErrorKind::kInvalidArgument, "address resolution failed for " + host + ":" +
                                                       port + ": " + gai_strerror(rc));
  }
  int last_errno = 0;
  int fd = -1;
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      last_errno = errno;
      continue;
    }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 128) == 0) {
      break;
    }
    last_errno = errno;
    ::close(fd);
    fd = -1;
  }
  ::freeaddrinfo(found);
  if (fd < 0) {
    return Error::from_errno(last_errno, "Failed to bind socket");
  }
  auto listener = std::make_unique<Listener>();
  listener->fd = fd;
  listeners_.push_back(std::move(listener));
  return ok();
}

void Server::start() {
  for (auto& listener : listeners_) {
    tasks_.spawn(accept_loop(*listener));
  }
}

aio::Task<void> Server::accept_loop(Listener& listener) {
  while (!stopping_) {
    while (!stopping_ && config_.max_connections != 0 &&
           clients_.size() >= config_.max_connections) {
      slot_free_.reset();
      co_await slot_free_.wait();
    }
    if (stopping_) {
      break;
    }
    int fd = co_await loop_.accept(listener.fd, SOCK_CLOEXEC);
    if (fd == -EINTR || fd == -EAGAIN || fd == -ECONNABORTED) {
      continue;
    }
    if (fd == -EMFILE || fd == -ENFILE || fd == -ENOBUFS || fd == -ENOMEM) {
      // Out of descriptors: back off instead of spinning; clients wait in the backlog.
      co_await loop_.sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    if (fd < 0) {
      break;
    }
    if (stopping_) {
      ::close(fd);
      break;
    }
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));  // fails harmlessly on unix
    tasks_.spawn(serve_client(fd));
  }
}

aio::Task<void> Server::handshake_timer(ServerConnection& connection) {
  co_await loop_.sleep_for(std::chrono::seconds(config_.handshake_max_seconds));
  if (!connection.in_transmission()) {
    connection.close();
  }
}

aio::Task<void> Server::serve_client(int fd) {
  bool negotiated = false;
  {
    SocketTransport transport(loop_, fd);
    ServerConnection connection(transport, *this);
    connection.set_tls(config_.tls.get());
    clients_.push_back(&connection);
    {
      aio::TaskGroup timer;  // destroyed (sleep cancelled) before the connection
      if (config_.handshake_max_seconds > 0) {
        timer.spawn(handshake_timer(connection));
      }
      co_await connection.run();
    }
    negotiated = connection.in_transmission();
    clients_.erase(std::remove(clients_.begin(), clients_.end(), &connection), clients_.end());
  }
  ::close(fd);
  slot_free_.set();
  if (config_.on_client_closed) {
    config_.on_client_closed(negotiated, clients_.size());
  }
}

aio::Task<void> Server::stop() {
  stopping_ = true;
  for (auto& listener : listeners_) {
    if (listener->fd >= 0) {
      ::shutdown(listener->fd, SHUT_RDWR);  // ends the pending accept
    }
  }
  slot_free_.set();
  std::vector<ServerConnection*> clients = clients_;
  for (ServerConnection* client : clients) {
    client->close();
  }
  co_await tasks_.wait();
  for (auto& listener : listeners_) {
    if (listener->fd >= 0) {
      ::close(listener->fd);
      listener->fd = -1;
      if (!listener->unix_path.empty()) {
        ::unlink(listener->unix_path.c_str());
      }
    }
  }
}

Result<void> Server::add_export(std::shared_ptr<Export> exp) {
  for (const auto& existing : exports_) {
    if (existing->name() == exp->name()) {
      return make_error(ErrorKind::kExists,
                        "NBD server already has export named '" + exp->name() + "'");
    }
  }
  exports_.push_back(std::move(exp));
  return ok();
}

void Server::remove_export(const Export& exp) {
  exports_.erase(std::remove_if(exports_.begin(), exports_.end(),
                                [&](const auto& e) { return e.get() == &exp; }),
                 exports_.end());
}

std::shared_ptr<Export> Server::find_export(std::string_view name) const {
  for (const auto& exp : exports_) {
    if (exp->name() == name && !exp->shutting_down()) {
      return exp;
    }
  }
  return nullptr;
}

std::vector<std::shared_ptr<Export>> Server::list_exports() const {
  std::vector<std::shared_ptr<Export>> out;
  for (const auto& exp : exports_) {
    if (!exp->shutting_down()) {
      out.push_back(exp);
    }
  }
  return out;
}

}  // namespace strata::nbd
