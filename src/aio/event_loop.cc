#include "aio/event_loop.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstring>

namespace strata::aio {

namespace {
thread_local EventLoop* current_loop = nullptr;

// Sets current_loop for the duration of a loop iteration (loops may nest only on distinct threads).
class CurrentLoopScope {
 public:
  explicit CurrentLoopScope(EventLoop* loop) : previous_(current_loop) { current_loop = loop; }
  ~CurrentLoopScope() { current_loop = previous_; }

 private:
  EventLoop* previous_;
};

const IoArgs& args_of(const void* p) {
  return *static_cast<const IoArgs*>(p);
}
}  // namespace

IoAwaiter::~IoAwaiter() {
  if (op_.pending) {
    loop_.cancel_and_wait(&op_);
  }
}

bool IoAwaiter::await_suspend(std::coroutine_handle<> waiter) {
  op_.waiter = waiter;
  if (!loop_.submit(&op_, prepare_, args_)) {
    op_.result = -EAGAIN;
    return false;
  }
  return true;
}

Result<std::unique_ptr<EventLoop>> EventLoop::create(unsigned queue_depth) {
  std::unique_ptr<EventLoop> loop(new EventLoop());
  io_uring_params params{};
  params.flags = IORING_SETUP_CLAMP;
  int ret = io_uring_queue_init_params(queue_depth, &loop->ring_, &params);
  if (ret < 0) {
    return Error::from_errno(-ret, "Could not set up io_uring");
  }
  loop->ring_ready_ = true;
  loop->wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (loop->wake_fd_ < 0) {
    return Error::from_errno(errno, "Could not create eventfd");
  }
  return loop;
}

EventLoop::~EventLoop() {
  if (ring_ready_) {
    // The wake-up read is the loop's own request; cancel it and reap everything still in flight.
    // Requests of frames that still exist are owned by those frames, which must be gone by now.
    if (wake_op_.pending) {
      cancel_and_wait(&wake_op_);
    }
    while (in_flight_ > 0) {
      reap(true);
    }
    io_uring_queue_exit(&ring_);
  }
  if (wake_fd_ >= 0) {
    close(wake_fd_);
  }
}

EventLoop* EventLoop::current() {
  return current_loop;
}

io_uring_sqe* EventLoop::get_sqe() {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) {
    io_uring_submit(&ring_);
    unsubmitted_ = 0;
    sqe = io_uring_get_sqe(&ring_);
  }
  return sqe;
}

bool EventLoop::submit(IoOp* op, IoAwaiter::Prepare prepare, const void* args) {
  io_uring_sqe* sqe = get_sqe();
  if (sqe == nullptr) {
    return false;
  }
  prepare(sqe, args);
  io_uring_sqe_set_data(sqe, op);
  op->pending = true;
  ++in_flight_;
  ++unsubmitted_;
  return true;
}

void EventLoop::deliver(IoOp* op, int result) {
  op->result = result;
  op->pending = false;
  if (op == &wake_op_) {
    wake_armed_ = false;
    return;
  }
  if (op->waiter) {
    op->waiter.resume();
  }
}

void EventLoop::reap(bool wait) {
  if (unsubmitted_ > 0 || wait) {
    int ret = wait ? io_uring_submit_and_wait(&ring_, 1) : io_uring_submit(&ring_);
    (void)ret;  // -EINTR: nothing reaped this time; others: completions will tell
    unsubmitted_ = 0;
  }
  // Completions are collected first and delivered afterwards: resuming a coroutine may submit new
  // requests or even destroy frames whose completions are in this batch (cancel_and_wait then
  // finds them in completed_).
  io_uring_cqe* cqe = nullptr;
  unsigned head = 0;
  unsigned count = 0;
  io_uring_for_each_cqe(&ring_, head, cqe) {
    auto* op = static_cast<IoOp*>(io_uring_cqe_get_data(cqe));
    if (op != nullptr) {
      --in_flight_;
      completed_.emplace_back(op, cqe->res);
    }
    ++count;
  }
  io_uring_cq_advance(&ring_, count);
  deliver_completed();
}

void EventLoop::deliver_completed() {
  while (!completed_.empty()) {
    auto [op, result] = completed_.front();
    completed_.pop_front();
    deliver(op, result);
  }
}

void EventLoop::cancel_and_wait(IoOp* op) {
  // The waiting frame is going away: nobody may be resumed for this request.
  op->waiter = {};
  for (auto it = completed_.begin(); it != completed_.end(); ++it) {
    if (it->first == op) {
      // Already reaped, not yet delivered: the kernel is done with it.
      op->pending = false;
      op->result = it->second;
      completed_.erase(it);
      return;
    }
  }
  io_uring_sqe* sqe = get_sqe();
  if (sqe != nullptr) {
    io_uring_prep_cancel(sqe, op, 0);
    io_uring_sqe_set_data(sqe, nullptr);
  }
  io_uring_submit(&ring_);
  unsubmitted_ = 0;
  while (op->pending) {
    io_uring_cqe* cqe = nullptr;
    int ret = io_uring_wait_cqe(&ring_, &cqe);
    if (ret < 0) {
      continue;
    }
    auto* done = static_cast<IoOp*>(io_uring_cqe_get_data(cqe));
    int result = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    if (done == nullptr) {
      continue;
    }
    --in_flight_;
    if (done == op) {
      op->pending = false;
      op->result = result;
    } else {
      completed_.emplace_back(done, result);
    }
  }
}

void EventLoop::arm_wakeup() {
  if (wake_armed_) {
    return;
  }
  io_uring_sqe* sqe = get_sqe();
  if (sqe == nullptr) {
    return;
  }
  io_uring_prep_read(sqe, wake_fd_, &wake_value_, sizeof(wake_value_), 0);
  io_uring_sqe_set_data(sqe, &wake_op_);
  wake_op_.pending = true;
  wake_armed_ = true;
  ++in_flight_;
  ++unsubmitted_;
}

void EventLoop::drain_posted() {
  if (!posted_pending_.exchange(false, std::memory_order_acquire)) {
    return;
  }
  std::vector<std::function<void()>> work;
  {
    std::lock_guard lock(posted_mutex_);
    work.swap(posted_);
  }
  for (auto& fn : work) {
    fn();
  }
}

bool EventLoop::run_once(bool wait) {
  CurrentLoopScope scope(this);
  deliver_completed();
  // Resume what was ready at the start; coroutines scheduled meanwhile wait for the next turn.
  size_t ready_now = ready_.size();
  for (size_t i = 0; i < ready_now && !ready_.empty(); ++i) {
    auto handle = ready_.front();
    ready_.pop_front();
    if (handle) {  // null: withdrawn by unschedule()
      handle.resume();
    }
  }
  drain_posted();
  arm_wakeup();
  bool nothing_ready =
      ready_.empty() && completed_.empty() && !posted_pending_.load(std::memory_order_acquire);
  reap(wait && nothing_ready && !stopping());
  return !stopping();
}

void EventLoop::run() {
  // A stop() made before this call counts: it ends this run (it is not cleared here).
  while (run_once(true)) {
  }
  stop_requested_.store(false, std::memory_order_relaxed);
}

void EventLoop::stop() {
  stop_requested_.store(true, std::memory_order_relaxed);
  uint64_t one = 1;
  ssize_t written = ::write(wake_fd_, &one, sizeof(one));
  (void)written;  // a full counter already guarantees a wake-up
}

void EventLoop::post(std::function<void()> fn) {
  {
    std::lock_guard lock(posted_mutex_);
    posted_.push_back(std::move(fn));
  }
  posted_pending_.store(true, std::memory_order_release);
  uint64_t one = 1;
  ssize_t written = ::write(wake_fd_, &one, sizeof(one));
  (void)written;
}

void EventLoop::schedule(std::coroutine_handle<> handle) {
  ready_.push_back(handle);
}

void EventLoop::unschedule(std::coroutine_handle<> handle) {
  for (auto& entry : ready_) {
    if (entry == handle) {
      entry = nullptr;
    }
  }
}

namespace {

// Large reads go straight to io_uring's worker threads (IOSQE_ASYNC). Otherwise a read the page
// cache can serve is copied inline, on the loop thread, inside io_uring_enter: bulk copies (img
// convert reads 2 MiB at a time) then serialise with everything else the loop does instead of
// running beside it on another core (qemu's default aio=threads reads on worker threads too).
constexpr uint64_t kAsyncReadBytes = 256 << 10;

void punt_large_read(io_uring_sqe* sqe, uint64_t length) {
  if (length >= kAsyncReadBytes) {
    sqe->flags |= IOSQE_ASYNC;
  }
}

}  // namespace

EventLoop::Op EventLoop::readv(int fd, const iovec* iov, unsigned count, uint64_t offset) {
  IoArgs a;
  a.fd = fd;
  a.iov = iov;
  a.iov_count = count;
  a.offset = offset;
  return Op(
      *this,
      [](io_uring_sqe* sqe, const void* p) {
        const IoArgs& x = args_of(p);
        io_uring_prep_readv(sqe, x.fd, x.iov, x.iov_count, x.offset);
        uint64_t length = 0;
        for (unsigned i = 0; i < x.iov_count; ++i) {
          length += x.iov[i].iov_len;
        }
        punt_large_read(sqe, length);
      },
      a);
}

EventLoop::Op EventLoop::writev(int fd, const iovec* iov, unsigned count, uint64_t offset) {
  IoArgs a;
  a.fd = fd;
  a.iov = iov;
  a.iov_count = count;
  a.offset = offset;
  return Op(
      *this,
      [](io_uring_sqe* sqe, const void* p) {
        const IoArgs& x = args_of(p);
        io_uring_prep_writev(sqe, x.fd, x.iov, x.iov_count, x.offset);
      },
      a);
}

EventLoop::Op EventLoop::read(int fd, void* buffer, uint32_t length, uint64_t offset) {
  IoArgs a;
  a.fd = fd;
  a.buffer = buffer;
  a.length = length;
  a.offset = offset;
  return Op(
      *this,
      [](io_uring_sqe* sqe, const void* p) {
        const IoArgs& x = args_of(p);
        io_uring_prep_read(sqe, x.fd, x.buffer, static_cast<unsigned>(x.length), x.offset);
        punt_large_read(sqe, x.length);
      },
      a);
}

EventLoop::Op EventLoop::write(int fd, const void* buffer, uint32_t length, uint64_t offset) {
  IoArgs a;
  a.fd = fd;
  a.buffer = const_cast<void*>(buffer);
  a.length = length;
  a.offset = offset;
  return Op(
      *this,
      [](io_uring_sqe* sqe, const void* p) {
        const IoArgs& x = args_of(p);
        io_uring_prep_write(sqe, x.fd, x.buffer, static_cast<unsigned>(x.length), x.offset);
      },
      a);
}

EventLoop::Op EventLoop::fsync(int fd) {
  IoArgs a;
  a.fd = fd;
  return Op(
      *this, [](io_uring_sqe* sqe, const void* p) { io_uring_prep_fsync(sqe, args_of(p).fd, 0); },
      a);
}

EventLoop::Op EventLoop::fdatasync(int fd) {
  IoArgs a;
  a.fd = fd;
  return Op(
      *this,
      [](io_uring_sqe* sqe, const void* p) {
        io_uring_prep_fsync(sqe, args_of(p).fd, IORING_FSYNC_DATASYNC);
      },
      a);
}

EventLoop::Op EventLoop::fallocate(int fd, int mode, uint64_t offset, uint64_t length) {
  IoArgs a;
  a.fd = fd;
  a.mode = mode;
  a.offset = offset;
  a.length = length;
  return Op(
      *this,
      [](io_uring_sqe* sqe, const void* p) {
        const IoArgs& x = args_of(p);
        io_uring_prep_fallocate(sqe, x.fd, x.mode, x.offset, x.length);
      },
      a);
}

EventLoop::Op EventLoop::accept(int fd, int flags) {
  IoArgs a;
  a.fd = fd;
  a.flags = flags;
  return Op(
      *this,
      [](io_uring_sqe* sqe, const void* p) {
        const IoArgs& x = args_of(p);
        io_uring_prep_accept(sqe, x.fd, nullptr, nullptr, x.flags);
      },
      a);
}

EventLoop::Op EventLoop::connect(int fd, const sockaddr* address, socklen_t length) {
  IoArgs a;
  a.fd = fd;
  a.address = address;
  a.address_length = length;
  return Op(
      *this,
      [](io_uring_sqe* sqe, const void* p) {
        const IoArgs& x = args_of(p);
        io_uring_prep_connect(sqe, x.fd, x.address, x.address_length);
      },
      a);
}

EventLoop::Op EventLoop::recv(int fd, void* buffer, uint32_t length, int flags) {
  IoArgs a;
  a.fd = fd;
  a.buffer = buffer;
  a.length = length;
  a.flags = flags;
  return Op(
      *this,
      [](io_uring_sqe* sqe, const void* p) {
        const IoArgs& x = args_of(p);
        io_uring_prep_recv(sqe, x.fd, x.buffer, x.length, x.flags);
      },
      a);
}

EventLoop::Op EventLoop::send(int fd, const void* buffer, uint32_t length, int flags) {
  IoArgs a;
  a.fd = fd;
  a.buffer = const_cast<void*>(buffer);
  a.length = length;
  a.flags = flags;
  return Op(
      *this,
      [](io_uring_sqe* sqe, const void* p) {
        const IoArgs& x = args_of(p);
        io_uring_prep_send(sqe, x.fd, x.buffer, x.length, x.flags);
      },
      a);
}

EventLoop::Op EventLoop::sendmsg_iov(int fd, const iovec* iov, unsigned count) {
  IoArgs a;
  a.fd = fd;
  a.iov = iov;
  a.iov_count = count;
  // writev on a socket is a send without flags; MSG_NOSIGNAL is ensured by ignoring SIGPIPE in
  // the daemon.
  return Op(
      *this,
      [](io_uring_sqe* sqe, const void* p) {
        const IoArgs& x = args_of(p);
        io_uring_prep_writev(sqe, x.fd, x.iov, x.iov_count, 0);
      },
      a);
}

EventLoop::Op EventLoop::poll(int fd, unsigned events) {
  IoArgs a;
  a.fd = fd;
  a.flags = static_cast<int>(events);
  return Op(
      *this,
      [](io_uring_sqe* sqe, const void* p) {
        const IoArgs& x = args_of(p);
        io_uring_prep_poll_add(sqe, x.fd, static_cast<unsigned>(x.flags));
      },
      a);
}

EventLoop::Op EventLoop::sleep_for(std::chrono::nanoseconds duration) {
  IoArgs a;
  auto ns = duration.count() < 0 ? 0 : duration.count();
  a.timeout.tv_sec = ns / 1000000000;
  a.timeout.tv_nsec = ns % 1000000000;
  return Op(
      *this,
      [](io_uring_sqe* sqe, const void* p) {
        const IoArgs& x = args_of(p);
        io_uring_prep_timeout(sqe, const_cast<__kernel_timespec*>(&x.timeout), 0, 0);
      },
      a);
}

}  // namespace strata::aio
