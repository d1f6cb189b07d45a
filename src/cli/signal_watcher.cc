#include "cli/signal_watcher.h"

#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cerrno>

namespace strata::cli {

SignalWatcher::SignalWatcher(aio::EventLoop& loop, std::function<void()> on_signal)
    : on_signal_(std::move(on_signal)) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);
  fd_ = signalfd(-1, &set, SFD_CLOEXEC);
  if (fd_ >= 0) {
    tasks_ = std::make_unique<aio::TaskGroup>();
    tasks_->spawn(watch(loop, fd_, &on_signal_));
  }
}

SignalWatcher::~SignalWatcher() {
  tasks_.reset();  // the reader's frame goes before its descriptor
  if (fd_ >= 0) {
    ::close(fd_);
  }
}

aio::Task<void> SignalWatcher::watch(aio::EventLoop& loop, int fd,
                                     std::function<void()>* on_signal) {
  signalfd_siginfo info{};
  while (true) {
    int n = co_await loop.read(fd, &info, sizeof(info), 0);
    if (n == -EINTR || n == -EAGAIN) {
      continue;
    }
    if (n != static_cast<int>(sizeof(info))) {
      co_return;
    }
    (*on_signal)();
  }
}

}  // namespace strata::cli
