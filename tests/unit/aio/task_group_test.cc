#include "aio/task_group.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <optional>

#include <gtest/gtest.h>

#include "aio/event_loop.h"
#include "aio/sync.h"

namespace strata::aio {
namespace {

std::unique_ptr<EventLoop> make_loop() {
  auto loop = EventLoop::create();
  EXPECT_TRUE(loop.ok()) << loop.error().message();
  return std::move(loop).value();
}

// Counts frames that are still alive: one lives in each task's frame.
struct FrameProbe {
  explicit FrameProbe(int& alive) : alive_(alive) { ++alive_; }
  FrameProbe(const FrameProbe&) = delete;
  FrameProbe& operator=(const FrameProbe&) = delete;
  ~FrameProbe() { --alive_; }
  int& alive_;
};

class Pipe {
 public:
  Pipe() { EXPECT_EQ(pipe2(fds_, O_CLOEXEC), 0); }
  ~Pipe() {
    close(fds_[0]);
    close(fds_[1]);
  }
  int read_end() const { return fds_[0]; }

 private:
  int fds_[2] = {-1, -1};
};

Task<void> wait_for(Event& event, int& alive, bool& finished) {
  FrameProbe probe(alive);
  co_await event.wait();
  finished = true;
}

Task<void> finish_at_once(int& alive, bool& finished) {
  FrameProbe probe(alive);
  finished = true;
  co_return;
}

TEST(TaskGroupTest, SpawnRunsUntilFirstSuspensionAndFreesFinishedFrames) {
  auto loop = make_loop();
  loop->block_on([](EventLoop&) -> Task<void> {
    TaskGroup group;
    int alive = 0;
    bool quick_finished = false;
    group.spawn(finish_at_once(alive, quick_finished));
    EXPECT_TRUE(quick_finished);
    EXPECT_EQ(alive, 0);  // its frame is already gone
    EXPECT_TRUE(group.empty());

    Event event;
    bool slow_finished = false;
    group.spawn(wait_for(event, alive, slow_finished));
    EXPECT_EQ(alive, 1);
    EXPECT_EQ(group.size(), 1u);
    event.set();
    co_await group.wait();
    EXPECT_TRUE(slow_finished);
    EXPECT_EQ(alive, 0);
    EXPECT_EQ(group.size(), 0u);
  }(*loop));
}

TEST(TaskGroupTest, InvalidTaskIsIgnored) {
  TaskGroup group;
  group.spawn(Task<void>());
  EXPECT_TRUE(group.empty());
}

Task<void> yield_then_count(EventLoop& loop, int yields, int& finished) {
  for (int i = 0; i < yields; ++i) {
    co_await loop.yield();
  }
  ++finished;
}

Task<void> sleep_then_count(EventLoop& loop, int& finished) {
  int r = co_await loop.sleep_for(std::chrono::microseconds(10));
  EXPECT_EQ(r, -ETIME);
  ++finished;
}

TEST(TaskGroupTest, WaitResumesOnceManyTasksFinished) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    TaskGroup group;
    co_await group.wait();  // empty: immediate
    int finished = 0;
    constexpr int kTasks = 2000;
    for (int i = 0; i < kTasks; ++i) {
      if (i % 10 == 0) {
        group.spawn(sleep_then_count(loop, finished));
      } else {
        group.spawn(yield_then_count(loop, i % 7, finished));
      }
    }
    EXPECT_LT(group.size(), static_cast<size_t>(kTasks));  // the i % 7 == 0 ones finished
    co_await group.wait();
    EXPECT_EQ(finished, kTasks);
    EXPECT_TRUE(group.empty());
    EXPECT_EQ(loop.in_flight(), 1u);  // only the loop's wake-up read
  }(*loop));
}

Task<void> wait_group(TaskGroup& group, bool& resumed) {
  co_await group.wait();
  resumed = true;
}

TEST(TaskGroupTest, SeveralWaitersAllResume) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    TaskGroup group;
    TaskGroup waiters;
    Event event;
    int alive = 0;
    bool finished = false;
    group.spawn(wait_for(event, alive, finished));
    bool first = false;
    bool second = false;
    waiters.spawn(wait_group(group, first));
    waiters.spawn(wait_group(group, second));
    co_await loop.yield();
    EXPECT_FALSE(first);
    event.set();
    co_await waiters.wait();
    EXPECT_TRUE(first);
    EXPECT_TRUE(second);
  }(*loop));
}

// One task per kind of suspension, each with a probe in its frame.
struct Suspensions {
  CoMutex mutex;
  CoMutex handed_mutex;
  CoRwLock rwlock;
  CoQueue queue;
  Event event;
  Latch latch{1};
  Pipe pipe;
  Pipe second_pipe;
};

Task<void> hold_mutex_and_sleep(EventLoop& loop, CoMutex& mutex, int& alive) {
  FrameProbe probe(alive);
  auto guard = co_await mutex.scoped_lock();
  int r = co_await loop.sleep_for(std::chrono::hours(1));
  (void)r;
  ADD_FAILURE() << "resumed after the group was destroyed";
}

Task<void> lock_mutex(CoMutex& mutex, int& alive) {
  FrameProbe probe(alive);
  co_await mutex.lock();
  mutex.unlock();
  ADD_FAILURE() << "resumed after the group was destroyed";
}

Task<void> write_lock(CoRwLock& lock, int& alive) {
  FrameProbe probe(alive);
  co_await lock.write_lock();
  lock.unlock_write();
  ADD_FAILURE() << "resumed after the group was destroyed";
}

template <typename Waitable>
Task<void> wait_on(Waitable& waitable, int& alive) {
  FrameProbe probe(alive);
  co_await waitable.wait();
  ADD_FAILURE() << "resumed after the group was destroyed";
}

Task<void> read_pipe(EventLoop& loop, int fd, int& alive) {
  FrameProbe probe(alive);
  char buffer[16];
  int r = co_await loop.read(fd, buffer, sizeof(buffer), 0);
  (void)r;
  ADD_FAILURE() << "resumed after the group was destroyed";
}

Task<void> yield_forever(EventLoop& loop, int& alive) {
  FrameProbe probe(alive);
  for (;;) {
    co_await loop.yield();
  }
}

// Fills `group` with tasks suspended in every way a task can be; returns how many.
Task<int> spawn_suspended(EventLoop& loop, TaskGroup& group, Suspensions& s, int& alive) {
  group.spawn(hold_mutex_and_sleep(loop, s.mutex, alive));
  group.spawn(lock_mutex(s.mutex, alive));
  EXPECT_TRUE(s.rwlock.try_read_lock());
  group.spawn(write_lock(s.rwlock, alive));
  group.spawn(wait_on(s.queue, alive));
  group.spawn(wait_on(s.event, alive));
  group.spawn(wait_on(s.latch, alive));
  group.spawn(read_pipe(loop, s.pipe.read_end(), alive));
  group.spawn(read_pipe(loop, s.second_pipe.read_end(), alive));
  group.spawn(yield_forever(loop, alive));
  // Ownership handed to a waiter that will not have run when the group is destroyed.
  EXPECT_TRUE(s.handed_mutex.try_lock());
  group.spawn(lock_mutex(s.handed_mutex, alive));
  co_await loop.yield();  // submits the reads and the timer
  s.handed_mutex.unlock();
  co_return static_cast<int>(group.size());
}

TEST(TaskGroupTest, DestroyingGroupDestroysEverySuspendedTask) {
  auto loop = make_loop();
  int alive = 0;
  Suspensions s;
  {
    TaskGroup group;
    int spawned = loop->block_on(spawn_suspended(*loop, group, s, alive));
    EXPECT_EQ(spawned, 10);
    EXPECT_EQ(alive, 10);
    EXPECT_EQ(loop->in_flight(), 4u);  // timer, two reads, wake-up read
  }
  EXPECT_EQ(alive, 0);
  EXPECT_EQ(loop->in_flight(), 1u);
  // Every primitive is usable again: nothing is left locked or linked.
  EXPECT_TRUE(s.mutex.try_lock());
  EXPECT_TRUE(s.handed_mutex.try_lock());
  EXPECT_TRUE(s.queue.empty());
  s.rwlock.unlock_read();
  EXPECT_TRUE(s.rwlock.try_write_lock());
  // Withdrawn resumptions are not run.
  loop->block_on([](EventLoop& loop) -> Task<void> {
    for (int i = 0; i < 4; ++i) {
      co_await loop.yield();
    }
  }(*loop));
}

TEST(TaskGroupTest, GroupDestroyedAfterLoopStoppedWithRequestsInFlight) {
  auto loop = make_loop();
  int alive = 0;
  Suspensions s;
  auto group = std::make_unique<TaskGroup>();
  Task<void> driver = [](EventLoop& loop, TaskGroup& group, Suspensions& s,
                         int& alive) -> Task<void> {
    int spawned = co_await spawn_suspended(loop, group, s, alive);
    EXPECT_EQ(spawned, 10);
    loop.stop();  // in the same iteration as the mutex hand-off: that waiter never runs
  }(*loop, *group, s, alive);
  loop->post([&] { driver.handle().resume(); });
  loop->run();
  EXPECT_TRUE(driver.done());
  EXPECT_EQ(alive, 10);
  // The timer and both reads, plus the loop's wake-up read if it is armed.
  uint64_t before = loop->in_flight();
  EXPECT_GE(before, 3u);
  group.reset();
  EXPECT_EQ(alive, 0);
  EXPECT_EQ(loop->in_flight(), before - 3);
  loop.reset();
}

Task<void> wait_group_destroyed(TaskGroup& group, bool& resumed) {
  co_await group.wait();
  resumed = true;
}

TEST(TaskGroupTest, DestroyingGroupWakesItsWaiters) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    Event never;
    int alive = 0;
    bool finished = false;
    bool resumed = false;
    TaskGroup outer;
    {
      TaskGroup group;
      group.spawn(wait_for(never, alive, finished));
      outer.spawn(wait_group_destroyed(group, resumed));
      co_await loop.yield();
      EXPECT_FALSE(resumed);
    }
    co_await outer.wait();
    EXPECT_TRUE(resumed);
    EXPECT_FALSE(finished);
    EXPECT_EQ(alive, 0);
  }(*loop));
}

}  // namespace
}  // namespace strata::aio
