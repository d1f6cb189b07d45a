#include "nbd/client_socket.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace strata::nbd {

std::string ServerAddress::description() const {
  if (type == Type::kUnix) {
    return path;
  }
  return host + ":" + port;
}

namespace {

Error connect_error(const ServerAddress& address, int error) {
  return Error(ErrorKind::kIo,
               "Failed to connect to '" + address.description() + "': " + std::strerror(error),
               error);
}

// Connects `fd` to `sockaddr`; 0 or -errno.
aio::Task<int> connect_fd(aio::EventLoop& loop, int fd, const sockaddr* sa, socklen_t length) {
  int result = co_await loop.connect(fd, sa, length);
  co_return result;
}

}  // namespace

aio::Task<Result<int>> connect_to_server(aio::EventLoop& loop, const ServerAddress& address) {
  if (address.type == ServerAddress::Type::kUnix) {
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    if (address.path.size() >= sizeof(sun.sun_path)) {
      co_return Error(ErrorKind::kInvalidArgument,
                      "UNIX socket path '" + address.path + "' is too long", EINVAL);
    }
    std::memcpy(sun.sun_path, address.path.data(), address.path.size());
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      co_return connect_error(address, errno);
    }
    int result = co_await connect_fd(loop, fd, reinterpret_cast<const sockaddr*>(&sun),
                                     static_cast<socklen_t>(sizeof(sun)));
    if (result < 0) {
      ::close(fd);
      co_return connect_error(address, -result);
    }
    co_return fd;
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  int gai = ::getaddrinfo(address.host.c_str(), address.port.c_str(), &hints, &found);
  if (gai != 0) {
    co_return Error(ErrorKind::kIo,
                    "address resolution failed for " + address.host + ":" + address.port + ": " +
                        ::gai_strerror(gai),
                    EINVAL);
  }
  int last_error = ECONNREFUSED;
  for (addrinfo* ai = found; ai != nullptr; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last_error = errno;
      continue;
    }
    int result = co_await connect_fd(loop, fd, ai->ai_addr, ai->ai_addrlen);
    if (result == 0) {
      int one = 1;
      (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      ::freeaddrinfo(found);
      co_return fd;
    }
    last_error = -result;
    ::close(fd);
  }
  ::freeaddrinfo(found);
  co_return connect_error(address, last_error);
}

}  // namespace strata::nbd
