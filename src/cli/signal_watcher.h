#pragma once
// SignalWatcher: how the long-running faces of strata (`strata daemon`, `strata nbd`) end on
// signals. SIGTERM, SIGINT and SIGHUP are blocked and read from a signalfd on the given loop;
// each one calls `on_signal` there (the caller asks its daemon to shut down cleanly). SIGPIPE is
// ignored, so a vanished client never kills the process.
//
// Threading: construct and destroy on the loop's thread, before the loop runs and after it ends.

#include <functional>
#include <memory>

#include "aio/event_loop.h"
#include "aio/task_group.h"

namespace strata::cli {

class SignalWatcher {
 public:
  SignalWatcher(aio::EventLoop& loop, std::function<void()> on_signal);
  ~SignalWatcher();
  SignalWatcher(const SignalWatcher&) = delete;
  SignalWatcher& operator=(const SignalWatcher&) = delete;

 private:
  static aio::Task<void> watch(aio::EventLoop& loop, int fd, std::function<void()>* on_signal);

  std::function<void()> on_signal_;
  int fd_ = -1;
  std::unique_ptr<aio::TaskGroup> tasks_;
};

}  // namespace strata::cli
