#include "aio/event_loop.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>

#include <gtest/gtest.h>

namespace strata::aio {
namespace {

std::unique_ptr<EventLoop> make_loop() {
  auto loop = EventLoop::create();
  EXPECT_TRUE(loop.ok()) << loop.error().message();
  return std::move(loop).value();
}

Task<int> add_one(int x) {
  co_return x + 1;
}

Task<int> chain(int depth) {
  int total = 0;
  for (int i = 0; i < depth; ++i) {
    int v = co_await add_one(i);
    total += v;
  }
  co_return total;
}

TEST(EventLoopTest, BlockOnReturnsTaskValue) {
  auto loop = make_loop();
  EXPECT_EQ(loop->block_on(chain(1000)), 500500);
}

Task<int> write_then_read(EventLoop& loop, int fd) {
  std::string data = "hello, strata";
  int written = co_await loop.write(fd, data.data(), static_cast<uint32_t>(data.size()), 4096);
  if (written != static_cast<int>(data.size())) {
    co_return -1;
  }
  int synced = co_await loop.fdatasync(fd);
  if (synced != 0) {
    co_return -2;
  }
  char buffer[64] = {};
  int got = co_await loop.read(fd, buffer, sizeof(buffer), 4096);
  if (got != static_cast<int>(data.size()) || std::string(buffer, got) != data) {
    co_return -3;
  }
  co_return got;
}

TEST(EventLoopTest, FileWriteSyncRead) {
  auto loop = make_loop();
  char path[] = "/tmp/strata-loop-XXXXXX";
  int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  unlink(path);
  EXPECT_EQ(loop->block_on(write_then_read(*loop, fd)), 13);
  close(fd);
}

Task<int> sleep_briefly(EventLoop& loop) {
  int r = co_await loop.sleep_for(std::chrono::milliseconds(1));
  co_return r;
}

TEST(EventLoopTest, TimerExpires) {
  auto loop = make_loop();
  EXPECT_EQ(loop->block_on(sleep_briefly(*loop)), -ETIME);
}

Task<int> read_forever(EventLoop& loop, int fd, bool& reached_end) {
  char c;
  int r = co_await loop.read(fd, &c, 1, 0);
  reached_end = true;
  co_return r;
}

TEST(EventLoopTest, DestroyingSuspendedTaskCancelsItsRead) {
  auto loop = make_loop();
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  bool reached_end = false;
  {
    Task<int> task = read_forever(*loop, fds[0], reached_end);
    task.handle().resume();  // starts and suspends on the pipe read
    loop->run_once(false);
    EXPECT_EQ(loop->in_flight(), 2u);  // the read plus the loop's own wake-up read
  }
  EXPECT_FALSE(reached_end);
  EXPECT_EQ(loop->in_flight(), 1u);
  close(fds[0]);
  close(fds[1]);
}

TEST(EventLoopTest, PostFromAnotherThreadWakesLoop) {
  auto loop = make_loop();
  int value = 0;
  std::thread other([&] {
    loop->post([&] {
      value = 42;
      loop->stop();
    });
  });
  loop->run();
  other.join();
  EXPECT_EQ(value, 42);
}

// A stop() made before run() starts (another thread asking a loop that is only about to run)
// is not lost: run() returns at once. A watchdog stops the loop if it does not, and the test
// fails when the watchdog had to.
TEST(EventLoopTest, StopBeforeRunIsNotLost) {
  auto loop = make_loop();
  loop->stop();
  std::mutex mutex;
  std::condition_variable returned_cv;
  bool returned = false;
  bool watchdog_fired = false;
  std::thread watchdog([&] {
    std::unique_lock lock(mutex);
    if (!returned_cv.wait_for(lock, std::chrono::seconds(10), [&] { return returned; })) {
      watchdog_fired = true;
      loop->stop();
    }
  });
  loop->run();
  {
    std::lock_guard lock(mutex);
    returned = true;
  }
  returned_cv.notify_all();
  watchdog.join();
  EXPECT_FALSE(watchdog_fired) << "run() ignored the stop() made before it";
  // The request is used up: a later run() runs until a new stop().
  int value = 0;
  loop->post([&] {
    value = 1;
    loop->stop();
  });
  loop->run();
  EXPECT_EQ(value, 1);
}

// A frame whose completion was already taken off the completion ring (by another frame's
// cancellation) must still be destroyable: its request is finished, nothing is left to cancel.
TEST(EventLoopTest, DestroyingFramesWhoseCompletionsWereReapedByAnotherCancel) {
  auto loop = make_loop();
  int idle[2];
  int busy[2];
  ASSERT_EQ(pipe(idle), 0);
  ASSERT_EQ(pipe(busy), 0);
  ASSERT_EQ(::write(busy[1], "x", 1), 1);
  bool idle_done = false;
  bool busy_done = false;
  {
    Task<int> waits_forever = read_forever(*loop, idle[0], idle_done);
    Task<int> completes_at_once = read_forever(*loop, busy[0], busy_done);
    waits_forever.handle().resume();
    completes_at_once.handle().resume();
    // Destroying the first submits both reads and the cancel; the second read's completion is
    // reaped while waiting for the cancelled one.
    waits_forever = Task<int>();
    EXPECT_EQ(loop->in_flight(), 0u);
  }
  EXPECT_FALSE(idle_done);
  EXPECT_FALSE(busy_done);
  loop->run_once(false);
  EXPECT_FALSE(busy_done);
  for (int fd : {idle[0], idle[1], busy[0], busy[1]}) {
    close(fd);
  }
}

Task<int> read_then_destroy(EventLoop& loop, int fd, Task<int>& victim, int& finished) {
  char c;
  int r = co_await loop.read(fd, &c, 1, 0);
  victim = Task<int>();
  ++finished;
  co_return r;
}

// Completions are reaped in batches; a coroutine resumed from one completion may destroy a frame
// whose completion is later in the same batch. That frame must neither be resumed nor hang.
TEST(EventLoopTest, ResumedCoroutineDestroysFrameCompletedInSameBatch) {
  auto loop = make_loop();
  int first[2];
  int second[2];
  ASSERT_EQ(pipe(first), 0);
  ASSERT_EQ(pipe(second), 0);
  ASSERT_EQ(::write(first[1], "x", 1), 1);
  ASSERT_EQ(::write(second[1], "y", 1), 1);
  int finished = 0;
  Task<int> a;
  Task<int> b;
  a = read_then_destroy(*loop, first[0], b, finished);
  b = read_then_destroy(*loop, second[0], a, finished);
  a.handle().resume();
  b.handle().resume();
  while (loop->in_flight() > 1) {
    loop->run_once(true);
  }
  EXPECT_EQ(finished, 1);
  EXPECT_NE(a.valid(), b.valid());
  for (int fd : {first[0], first[1], second[0], second[1]}) {
    close(fd);
  }
}

Task<EventLoop*> current_loop() {
  co_return EventLoop::current();
}

TEST(EventLoopTest, TasksRunByBlockOnSeeTheirLoop) {
  auto loop = make_loop();
  EXPECT_EQ(EventLoop::current(), nullptr);
  EXPECT_EQ(loop->block_on(current_loop()), loop.get());
  EXPECT_EQ(EventLoop::current(), nullptr);
}

Task<int> yield_then_return(EventLoop& loop) {
  co_await loop.yield();
  co_return 5;
}

// block_on must return when the task finishes during an iteration, without waiting in the kernel
// for a completion that will never come.
TEST(EventLoopTest, BlockOnReturnsWhenTaskFinishesAfterYield) {
  auto loop = make_loop();
  EXPECT_EQ(loop->block_on(yield_then_return(*loop)), 5);
}

Task<void> yield_and_mark(EventLoop& loop, bool& resumed) {
  co_await loop.yield();
  resumed = true;
}

TEST(EventLoopTest, FrameDestroyedAfterYieldIsNotResumed) {
  auto loop = make_loop();
  bool resumed = false;
  loop->block_on([](EventLoop& loop, bool& resumed) -> Task<void> {
    Task<void> yielder = yield_and_mark(loop, resumed);
    yielder.handle().resume();  // scheduled on the loop
    yielder = Task<void>();     // destroyed before the loop resumes it
    co_await loop.yield();
    co_await loop.yield();
  }(*loop, resumed));
  EXPECT_FALSE(resumed);
}

struct HopTrace {
  std::thread::id start;
  std::thread::id away;
  std::thread::id back;
  EventLoop* away_loop = nullptr;
  EventLoop* back_loop = nullptr;
};

Task<HopTrace> hop_there_and_back(EventLoop& home, EventLoop& other) {
  HopTrace trace;
  trace.start = std::this_thread::get_id();
  co_await other.hop();
  trace.away = std::this_thread::get_id();
  trace.away_loop = EventLoop::current();
  co_await home.hop();
  trace.back = std::this_thread::get_id();
  trace.back_loop = EventLoop::current();
  co_return trace;
}

TEST(EventLoopTest, HopToLoopOnAnotherThreadAndBack) {
  auto home = make_loop();
  auto other = make_loop();
  std::thread::id other_id;
  std::thread other_thread([&] {
    other_id = std::this_thread::get_id();
    other->run();
  });
  HopTrace trace = home->block_on(hop_there_and_back(*home, *other));
  other->stop();
  other_thread.join();
  EXPECT_EQ(trace.start, std::this_thread::get_id());
  EXPECT_EQ(trace.away, other_id);
  EXPECT_NE(trace.away, trace.start);
  EXPECT_EQ(trace.away_loop, other.get());
  EXPECT_EQ(trace.back, trace.start);
  EXPECT_EQ(trace.back_loop, home.get());
}

}  // namespace
}  // namespace strata::aio
