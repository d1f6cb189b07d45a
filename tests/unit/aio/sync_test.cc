#include "aio/sync.h"

#include <memory>
#include <vector>

#include <gtest/gtest.h>

#include "aio/event_loop.h"
#include "aio/task_group.h"

namespace strata::aio {
namespace {

std::unique_ptr<EventLoop> make_loop() {
  auto loop = EventLoop::create();
  EXPECT_TRUE(loop.ok()) << loop.error().message();
  return std::move(loop).value();
}

// Lets every coroutine that is ready (and those they make ready, a few hops deep) run.
Task<void> settle(EventLoop& loop) {
  for (int i = 0; i < 8; ++i) {
    co_await loop.yield();
  }
}

// Starts a task on the running loop and keeps its frame, so a test can destroy it while suspended.
Task<void> start(Task<void> task) {
  task.handle().resume();
  return task;
}

// ---------------------------------------------------------------------------------------------
// CoMutex

Task<void> lock_record_unlock(CoMutex& mutex, std::vector<int>& order, int id) {
  co_await mutex.lock();
  order.push_back(id);
  mutex.unlock();
}

TEST(CoMutexTest, TryLockFailsWhileHeld) {
  CoMutex mutex;
  EXPECT_FALSE(mutex.locked());
  EXPECT_TRUE(mutex.try_lock());
  EXPECT_TRUE(mutex.locked());
  EXPECT_FALSE(mutex.try_lock());
  mutex.unlock();
  EXPECT_FALSE(mutex.locked());
  EXPECT_TRUE(mutex.try_lock());
  mutex.unlock();
}

TEST(CoMutexTest, WaitersAcquireInFifoOrderAndNeverInsideUnlock) {
  auto loop = make_loop();
  loop->block_on([](EventLoop&) -> Task<void> {
    CoMutex mutex;
    std::vector<int> order;
    TaskGroup group;
    co_await mutex.lock();
    for (int id = 0; id < 4; ++id) {
      group.spawn(lock_record_unlock(mutex, order, id));
    }
    EXPECT_EQ(group.size(), 4u);
    mutex.unlock();
    // Ownership went to waiter 0, which has not run yet: unlock() resumes nobody itself and the
    // mutex cannot be taken from under the waiter.
    EXPECT_TRUE(order.empty());
    EXPECT_TRUE(mutex.locked());
    EXPECT_FALSE(mutex.try_lock());
    co_await group.wait();
    EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3}));
    EXPECT_FALSE(mutex.locked());
  }(*loop));
}

Task<void> hold_with_guard(EventLoop& loop, CoMutex& mutex, int& inside, int& max_inside) {
  auto guard = co_await mutex.scoped_lock();
  ++inside;
  max_inside = std::max(max_inside, inside);
  co_await loop.yield();
  co_await loop.yield();
  --inside;
}

TEST(CoMutexTest, ScopedLockExcludesAndReleases) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    CoMutex mutex;
    int inside = 0;
    int max_inside = 0;
    TaskGroup group;
    for (int i = 0; i < 5; ++i) {
      group.spawn(hold_with_guard(loop, mutex, inside, max_inside));
    }
    co_await group.wait();
    EXPECT_EQ(max_inside, 1);
    EXPECT_FALSE(mutex.locked());
    {
      auto guard = co_await mutex.scoped_lock();
      EXPECT_TRUE(guard.owns_lock());
      guard.unlock();
      EXPECT_FALSE(guard.owns_lock());
      EXPECT_FALSE(mutex.locked());
    }
    EXPECT_FALSE(mutex.locked());
  }(*loop));
}

TEST(CoMutexTest, DestroyedQueuedWaiterIsUnlinked) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    CoMutex mutex;
    std::vector<int> order;
    co_await mutex.lock();
    Task<void> first = start(lock_record_unlock(mutex, order, 1));
    Task<void> second = start(lock_record_unlock(mutex, order, 2));
    Task<void> third = start(lock_record_unlock(mutex, order, 3));
    second = Task<void>();  // destroyed while queued
    mutex.unlock();
    co_await settle(loop);
    EXPECT_EQ(order, (std::vector<int>{1, 3}));
    EXPECT_TRUE(first.done());
    EXPECT_TRUE(third.done());
    EXPECT_FALSE(mutex.locked());
  }(*loop));
}

TEST(CoMutexTest, DestroyedWaiterPassesOnHandedOwnership) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    CoMutex mutex;
    std::vector<int> order;
    co_await mutex.lock();
    Task<void> first = start(lock_record_unlock(mutex, order, 1));
    Task<void> second = start(lock_record_unlock(mutex, order, 2));
    mutex.unlock();        // hands ownership to `first`, which is scheduled
    first = Task<void>();  // ... and destroyed before it runs
    EXPECT_TRUE(mutex.locked());
    co_await settle(loop);
    EXPECT_EQ(order, (std::vector<int>{2}));
    EXPECT_TRUE(second.done());
    EXPECT_FALSE(mutex.locked());
  }(*loop));
}

TEST(CoMutexTest, DestroyedLastWaiterFreesHandedMutex) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    CoMutex mutex;
    std::vector<int> order;
    co_await mutex.lock();
    Task<void> only = start(lock_record_unlock(mutex, order, 1));
    mutex.unlock();
    only = Task<void>();
    EXPECT_FALSE(mutex.locked());
    co_await settle(loop);
    EXPECT_TRUE(order.empty());
    EXPECT_TRUE(mutex.try_lock());
    mutex.unlock();
  }(*loop));
}

// ---------------------------------------------------------------------------------------------
// CoRwLock

Task<void> read_record(CoRwLock& lock, Event& release, std::vector<int>& order, int id) {
  co_await lock.read_lock();
  order.push_back(id);
  co_await release.wait();
  lock.unlock_read();
}

Task<void> write_record(CoRwLock& lock, Event& release, std::vector<int>& order, int id) {
  co_await lock.write_lock();
  order.push_back(id);
  co_await release.wait();
  lock.unlock_write();
}

TEST(CoRwLockTest, ReadersShareWritersExclude) {
  CoRwLock lock;
  EXPECT_TRUE(lock.try_read_lock());
  EXPECT_TRUE(lock.try_read_lock());
  EXPECT_EQ(lock.readers(), 2u);
  EXPECT_FALSE(lock.try_write_lock());
  lock.unlock_read();
  lock.unlock_read();
  EXPECT_TRUE(lock.try_write_lock());
  EXPECT_TRUE(lock.write_locked());
  EXPECT_FALSE(lock.try_read_lock());
  EXPECT_FALSE(lock.try_write_lock());
  lock.unlock_write();
  EXPECT_TRUE(lock.try_read_lock());
  lock.unlock_read();
}

TEST(CoRwLockTest, QueuedWriterHoldsBackLaterReaders) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    CoRwLock lock;
    Event release_reader;
    Event release_writer;
    Event release_late_readers;
    std::vector<int> order;
    TaskGroup group;
    group.spawn(read_record(lock, release_reader, order, 1));
    group.spawn(write_record(lock, release_writer, order, 2));
    group.spawn(read_record(lock, release_late_readers, order, 3));
    group.spawn(read_record(lock, release_late_readers, order, 4));
    co_await settle(loop);
    // Reader 3 would be compatible with reader 1 but queues behind the writer.
    EXPECT_EQ(order, (std::vector<int>{1}));
    EXPECT_EQ(lock.readers(), 1u);
    release_reader.set();
    co_await settle(loop);
    EXPECT_EQ(order, (std::vector<int>{1, 2}));
    EXPECT_TRUE(lock.write_locked());
    release_writer.set();
    co_await settle(loop);
    // Both late readers are admitted together.
    EXPECT_EQ(order, (std::vector<int>{1, 2, 3, 4}));
    EXPECT_EQ(lock.readers(), 2u);
    release_late_readers.set();
    co_await group.wait();
    EXPECT_EQ(lock.readers(), 0u);
    EXPECT_FALSE(lock.write_locked());
  }(*loop));
}

TEST(CoRwLockTest, ReadersStopAtTheNextQueuedWriter) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    CoRwLock lock;
    Event release;
    std::vector<int> order;
    TaskGroup group;
    EXPECT_TRUE(lock.try_write_lock());
    group.spawn(read_record(lock, release, order, 1));
    group.spawn(read_record(lock, release, order, 2));
    group.spawn(write_record(lock, release, order, 3));
    group.spawn(read_record(lock, release, order, 4));
    lock.unlock_write();
    co_await settle(loop);
    EXPECT_EQ(order, (std::vector<int>{1, 2}));
    release.set();
    co_await group.wait();
    EXPECT_EQ(order, (std::vector<int>{1, 2, 3, 4}));
  }(*loop));
}

TEST(CoRwLockTest, DestroyedQueuedWriterAdmitsReadersBehindIt) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    CoRwLock lock;
    Event release;
    std::vector<int> order;
    EXPECT_TRUE(lock.try_read_lock());
    Task<void> writer = start(write_record(lock, release, order, 1));
    Task<void> reader = start(read_record(lock, release, order, 2));
    EXPECT_TRUE(order.empty());
    writer = Task<void>();
    co_await settle(loop);
    EXPECT_EQ(order, (std::vector<int>{2}));
    EXPECT_EQ(lock.readers(), 2u);
    release.set();
    lock.unlock_read();
    co_await settle(loop);
    EXPECT_TRUE(reader.done());
    EXPECT_EQ(lock.readers(), 0u);
  }(*loop));
}

TEST(CoRwLockTest, DestroyedWokenWriterReleasesTheLock) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    CoRwLock lock;
    Event release;
    std::vector<int> order;
    EXPECT_TRUE(lock.try_read_lock());
    Task<void> writer = start(write_record(lock, release, order, 1));
    Task<void> reader = start(read_record(lock, release, order, 2));
    lock.unlock_read();  // the writer is granted the lock and scheduled
    EXPECT_TRUE(lock.write_locked());
    writer = Task<void>();
    co_await settle(loop);
    EXPECT_FALSE(lock.write_locked());
    EXPECT_EQ(order, (std::vector<int>{2}));
    release.set();
    co_await settle(loop);
    EXPECT_TRUE(reader.done());
  }(*loop));
}

TEST(CoRwLockTest, ScopedGuardsRelease) {
  auto loop = make_loop();
  loop->block_on([](EventLoop&) -> Task<void> {
    CoRwLock lock;
    {
      auto first = co_await lock.scoped_read_lock();
      auto second = co_await lock.scoped_read_lock();
      EXPECT_EQ(lock.readers(), 2u);
    }
    EXPECT_EQ(lock.readers(), 0u);
    {
      auto writer = co_await lock.scoped_write_lock();
      EXPECT_TRUE(lock.write_locked());
    }
    EXPECT_FALSE(lock.write_locked());
  }(*loop));
}

// ---------------------------------------------------------------------------------------------
// CoQueue

Task<void> wait_record(CoQueue& queue, std::vector<int>& order, int id) {
  co_await queue.wait();
  order.push_back(id);
}

TEST(CoQueueTest, NotifyOneWakesOldestNotifyAllTheRest) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    CoQueue queue;
    std::vector<int> order;
    EXPECT_TRUE(queue.empty());
    EXPECT_FALSE(queue.notify_one());
    TaskGroup group;
    for (int id = 0; id < 4; ++id) {
      group.spawn(wait_record(queue, order, id));
    }
    EXPECT_FALSE(queue.empty());
    EXPECT_TRUE(queue.notify_one());
    EXPECT_TRUE(order.empty());  // resumed later, not from notify_one
    co_await settle(loop);
    EXPECT_EQ(order, (std::vector<int>{0}));
    queue.notify_all();
    EXPECT_TRUE(queue.empty());
    co_await group.wait();
    EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3}));
  }(*loop));
}

TEST(CoQueueTest, DestroyedWaiterLeavesTheQueue) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    CoQueue queue;
    std::vector<int> order;
    Task<void> waiter = start(wait_record(queue, order, 1));
    EXPECT_FALSE(queue.empty());
    waiter = Task<void>();
    EXPECT_TRUE(queue.empty());
    EXPECT_FALSE(queue.notify_one());
    co_await settle(loop);
    EXPECT_TRUE(order.empty());
  }(*loop));
}

TEST(CoQueueTest, NotificationOfDestroyedWaiterGoesToTheNext) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    CoQueue queue;
    std::vector<int> order;
    Task<void> first = start(wait_record(queue, order, 1));
    Task<void> second = start(wait_record(queue, order, 2));
    Task<void> third = start(wait_record(queue, order, 3));
    EXPECT_TRUE(queue.notify_one());
    first = Task<void>();
    co_await settle(loop);
    EXPECT_EQ(order, (std::vector<int>{2}));
    EXPECT_FALSE(queue.empty());
    queue.notify_all();
    co_await settle(loop);
    EXPECT_EQ(order, (std::vector<int>{2, 3}));
  }(*loop));
}

// ---------------------------------------------------------------------------------------------
// Event and Latch

Task<void> wait_event(Event& event, int& woken) {
  co_await event.wait();
  ++woken;
}

TEST(EventTest, SetWakesAllAndStaysSetUntilReset) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    Event event;
    int woken = 0;
    TaskGroup group;
    group.spawn(wait_event(event, woken));
    group.spawn(wait_event(event, woken));
    EXPECT_EQ(group.size(), 2u);
    event.set();
    EXPECT_TRUE(event.is_set());
    EXPECT_EQ(woken, 0);
    co_await group.wait();
    EXPECT_EQ(woken, 2);
    // While set, waiting does not suspend.
    group.spawn(wait_event(event, woken));
    EXPECT_EQ(woken, 3);
    EXPECT_TRUE(group.empty());
    event.reset();
    EXPECT_FALSE(event.is_set());
    group.spawn(wait_event(event, woken));
    co_await settle(loop);
    EXPECT_EQ(woken, 3);
    event.set();
    co_await group.wait();
    EXPECT_EQ(woken, 4);
  }(*loop));
}

TEST(EventTest, DestroyedWaitersAreNotResumed) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    Event event;
    int woken = 0;
    Task<void> queued = start(wait_event(event, woken));
    Task<void> woken_then_destroyed = start(wait_event(event, woken));
    Task<void> survivor = start(wait_event(event, woken));
    queued = Task<void>();
    event.set();
    woken_then_destroyed = Task<void>();
    co_await settle(loop);
    EXPECT_EQ(woken, 1);
    EXPECT_TRUE(survivor.done());
  }(*loop));
}

Task<void> wait_latch(Latch& latch, int& woken) {
  co_await latch.wait();
  ++woken;
}

TEST(LatchTest, WaitersResumeWhenCountReachesZero) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    Latch latch(3);
    int woken = 0;
    TaskGroup group;
    group.spawn(wait_latch(latch, woken));
    group.spawn(wait_latch(latch, woken));
    latch.count_down();
    co_await settle(loop);
    EXPECT_EQ(woken, 0);
    EXPECT_EQ(latch.count(), 2u);
    latch.count_down(5);  // past zero: clamps
    EXPECT_EQ(latch.count(), 0u);
    co_await group.wait();
    EXPECT_EQ(woken, 2);
    latch.count_down();
    EXPECT_EQ(latch.count(), 0u);
    group.spawn(wait_latch(latch, woken));  // already open
    EXPECT_EQ(woken, 3);

    Latch open(0);
    group.spawn(wait_latch(open, woken));
    EXPECT_EQ(woken, 4);
  }(*loop));
}

TEST(LatchTest, DestroyedWaiterIsUnlinked) {
  auto loop = make_loop();
  loop->block_on([](EventLoop& loop) -> Task<void> {
    Latch latch(1);
    int woken = 0;
    Task<void> gone = start(wait_latch(latch, woken));
    Task<void> kept = start(wait_latch(latch, woken));
    gone = Task<void>();
    latch.count_down();
    co_await settle(loop);
    EXPECT_EQ(woken, 1);
    EXPECT_TRUE(kept.done());
  }(*loop));
}

}  // namespace
}  // namespace strata::aio
