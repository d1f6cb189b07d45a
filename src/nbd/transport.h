#pragma once
// Transport: the byte stream one NBD connection runs over. The protocol state machine
// (ServerConnection) only sees this interface, so it runs over a socket on the event loop in the
// daemon and over an in-memory stream in tests and the fuzz target.
//
// Contract: one reader and any number of writers; writers serialise among themselves (the
// connection holds a lock around each reply). shutdown() makes pending and later reads and writes
// fail promptly; it may be called from any coroutine on the loop.

#include <sys/uio.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "aio/event_loop.h"
#include "aio/task.h"

namespace strata::nbd {

class Transport {
 public:
  virtual ~Transport() = default;
  // Reads exactly `length` bytes; false on end of stream, error or after shutdown().
  virtual aio::Task<bool> read_exact(void* buffer, size_t length) = 0;
  // Writes every byte of `iov`; false on error or after shutdown().
  virtual aio::Task<bool> write_all(std::span<const iovec> iov) = 0;
  virtual void shutdown() = 0;
  // Moves the socket work (receives and sends) to `io_loop`'s thread (an export's iothread);
  // nullptr brings it back. Callers keep running on their own loop: each read_exact/write_all
  // crosses to `io_loop` and back. Call between operations, from the transport's own loop.
  // Transports without sockets ignore it.
  virtual void set_io_loop(aio::EventLoop* io_loop) { (void)io_loop; }

  // Reads and drops `length` bytes.
  aio::Task<bool> discard(uint64_t length);
};

// A connected stream socket on `loop`. Reads are buffered (small request headers cost one
// receive per buffer fill); payloads larger than the buffer are received in place. The descriptor
// stays owned by the caller. With an io loop set, receives and sends (and the copies they make)
// run on that loop's thread; a read the buffer already holds is served without crossing.
// shutdown() may be called from the transport's own loop while an operation runs on the io loop.
class SocketTransport final : public Transport {
 public:
  SocketTransport(aio::EventLoop& loop, int fd);
  aio::Task<bool> read_exact(void* buffer, size_t length) override;
  aio::Task<bool> write_all(std::span<const iovec> iov) override;
  void shutdown() override;
  void set_io_loop(aio::EventLoop* io_loop) override { io_loop_ = io_loop; }

 private:
  static constexpr size_t kBufferSize = 64 * 1024;
  // The socket operations themselves, on `loop` (the current one). read_on: see read_exact.
  aio::Task<bool> read_on(aio::EventLoop& loop, char* out, size_t length);
  // Sends `iov` past its first `already_sent` bytes, on `loop` (the current one).
  aio::Task<bool> write_on(aio::EventLoop& loop, std::span<const iovec> iov, size_t already_sent);
  // One non-blocking sendmsg of `iov`: bytes sent (0 when the socket is full), -1 on error.
  ssize_t try_send(std::span<const iovec> iov);

  aio::EventLoop& loop_;
  aio::EventLoop* io_loop_ = nullptr;
  int fd_;
  std::atomic<bool> shut_down_ = false;
  std::unique_ptr<char[]> buffer_;
  size_t begin_ = 0;
  size_t end_ = 0;
};

// An in-memory stream: reads come from a fixed input, writes are appended to output(). Every
// operation completes without suspending.
class MemoryTransport final : public Transport {
 public:
  explicit MemoryTransport(std::string input) : input_(std::move(input)) {}
  aio::Task<bool> read_exact(void* buffer, size_t length) override;
  aio::Task<bool> write_all(std::span<const iovec> iov) override;
  void shutdown() override { shut_down_ = true; }
  const std::string& output() const { return output_; }
  // Caps the bytes kept in output() (a fuzz input can ask for gigabytes of replies).
  void set_output_limit(size_t limit) { output_limit_ = limit; }

 private:
  std::string input_;
  size_t position_ = 0;
  std::string output_;
  size_t output_limit_ = SIZE_MAX;
  bool shut_down_ = false;
};

}  // namespace strata::nbd
