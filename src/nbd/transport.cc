#include "nbd/transport.h"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace strata::nbd {

aio::Task<bool> Transport::discard(uint64_t length) {
  char scratch[4096];
  while (length > 0) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(length, sizeof(scratch)));
    bool got = co_await read_exact(scratch, chunk);
    if (!got) {
      co_return false;
    }
    length -= chunk;
  }
  co_return true;
}

// ---- SocketTransport -------------------------------------------------------------------------

namespace {

size_t total_length(std::span<const iovec> iov) {
  size_t total = 0;
  for (const iovec& v : iov) {
    total += v.iov_len;
  }
  return total;
}

}  // namespace

SocketTransport::SocketTransport(aio::EventLoop& loop, int fd)
    : loop_(loop), fd_(fd), buffer_(new char[kBufferSize]) {}

aio::Task<bool> SocketTransport::read_exact(void* buffer, size_t length) {
  char* out = static_cast<char*>(buffer);
  // Served from the buffer (most request headers) without another frame or a thread crossing.
  if (end_ - begin_ >= length && !shut_down_) {
    std::memcpy(out, buffer_.get() + begin_, length);
    begin_ += length;
    co_return true;
  }
  if (io_loop_ == nullptr) {
    co_return co_await read_on(loop_, out, length);
  }
  aio::EventLoop* io_loop = io_loop_;
  co_await io_loop->hop();
  bool got = co_await read_on(*io_loop, out, length);
  co_await loop_.hop();
  co_return got;
}

aio::Task<bool> SocketTransport::write_all(std::span<const iovec> iov) {
  if (io_loop_ == nullptr) {
    // The common case sends the whole reply here, with no further frame or allocation.
    ssize_t sent = shut_down_ ? 0 : try_send(iov);
    if (sent < 0) {
      co_return false;
    }
    if (static_cast<size_t>(sent) == total_length(iov)) {
      co_return true;
    }
    co_return co_await write_on(loop_, iov, static_cast<size_t>(sent));
  }
  aio::EventLoop* io_loop = io_loop_;
  co_await io_loop->hop();
  ssize_t sent = shut_down_ ? 0 : try_send(iov);
  bool ok = sent >= 0;
  if (ok && static_cast<size_t>(sent) != total_length(iov)) {
    ok = co_await write_on(*io_loop, iov, static_cast<size_t>(sent));
  }
  co_await loop_.hop();
  co_return ok;
}

ssize_t SocketTransport::try_send(std::span<const iovec> iov) {
  // A non-blocking send usually takes the whole reply at once, without a trip through the ring,
  // so a reply never waits a loop iteration behind another (QEMU's qio_channel_writev does the
  // same). Whatever it leaves goes through io_uring in write_on.
  msghdr message{};
  message.msg_iov = const_cast<iovec*>(iov.data());
  message.msg_iovlen = std::min<size_t>(iov.size(), 1024);
  ssize_t n = ::sendmsg(fd_, &message, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (n < 0) {
    return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
  }
  return n;
}

aio::Task<bool> SocketTransport::read_on(aio::EventLoop& loop, char* out, size_t length) {
  while (length > 0) {
    if (shut_down_) {
      co_return false;
    }
    if (begin_ < end_) {
      size_t n = std::min(length, end_ - begin_);
      std::memcpy(out, buffer_.get() + begin_, n);
      begin_ += n;
      out += n;
      length -= n;
      continue;
    }
    int n;
    if (length >= kBufferSize) {
      n = co_await loop.recv(fd_, out, static_cast<uint32_t>(std::min<size_t>(length, 1u << 30)));
      if (n > 0) {
        out += n;
        length -= static_cast<size_t>(n);
        continue;
      }
    } else {
      n = co_await loop.recv(fd_, buffer_.get(), kBufferSize);
      if (n > 0) {
        begin_ = 0;
        end_ = static_cast<size_t>(n);
        continue;
      }
    }
    if (n == -EINTR || n == -EAGAIN) {
      continue;
    }
    co_return false;
  }
  co_return true;
}

aio::Task<bool> SocketTransport::write_on(aio::EventLoop& loop, std::span<const iovec> iov,
                                          size_t already_sent) {
  std::vector<iovec> rest(iov.begin(), iov.end());
  size_t index = 0;
  size_t sent = already_sent;
  while (sent > 0 && index < rest.size()) {
    size_t step = std::min(sent, rest[index].iov_len);
    rest[index].iov_base = static_cast<char*>(rest[index].iov_base) + step;
    rest[index].iov_len -= step;
    sent -= step;
    if (rest[index].iov_len == 0) {
      ++index;
    }
  }
  while (index < rest.size()) {
    if (shut_down_) {
      co_return false;
    }
    if (rest[index].iov_len == 0) {
      ++index;
      continue;
    }
    unsigned count = static_cast<unsigned>(std::min<size_t>(rest.size() - index, 1024));
    int n = co_await loop.sendmsg_iov(fd_, rest.data() + index, count);
    if (n == -EINTR || n == -EAGAIN) {
      continue;
    }
    if (n <= 0) {
      co_return false;
    }
    size_t sent = static_cast<size_t>(n);
    while (sent > 0 && index < rest.size()) {
      size_t step = std::min(sent, rest[index].iov_len);
      rest[index].iov_base = static_cast<char*>(rest[index].iov_base) + step;
      rest[index].iov_len -= step;
      sent -= step;
      if (rest[index].iov_len == 0) {
        ++index;
      }
    }
  }
  co_return true;
}

void SocketTransport::shutdown() {
  if (!shut_down_.exchange(true)) {
    ::shutdown(fd_, SHUT_RDWR);
  }
}

// ---- MemoryTransport -------------------------------------------------------------------------

aio::Task<bool> MemoryTransport::read_exact(void* buffer, size_t length) {
  if (shut_down_ || length > input_.size() - position_) {
    position_ = input_.size();
    co_return false;
  }
  std::memcpy(buffer, input_.data() + position_, length);
  position_ += length;
  co_return true;
}

aio::Task<bool> MemoryTransport::write_all(std::span<const iovec> iov) {
  if (shut_down_) {
    co_return false;
  }
  for (const iovec& v : iov) {
    size_t room = output_limit_ - std::min(output_limit_, output_.size());
    output_.append(static_cast<const char*>(v.iov_base), std::min(room, v.iov_len));
  }
  co_return true;
}

}  // namespace strata::nbd
