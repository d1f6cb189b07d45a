#include "aio/thread_pool.h"

#include <atomic>
#include <future>
#include <memory>
#include <string>
#include <thread>

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

TEST(ThreadPoolTest, RunsOnWorkerAndResumesOnLoopThread) {
  auto loop = make_loop();
  ThreadPool pool(2);
  EXPECT_EQ(pool.threads(), 2u);
  loop->block_on([](ThreadPool& pool) -> Task<void> {
    std::thread::id loop_thread = std::this_thread::get_id();
    std::thread::id worker_thread = co_await pool.run([] { return std::this_thread::get_id(); });
    EXPECT_NE(worker_thread, loop_thread);
    EXPECT_EQ(std::this_thread::get_id(), loop_thread);

    std::string text = co_await pool.run([] { return std::string(100, 'x'); });
    EXPECT_EQ(text.size(), 100u);

    bool ran = false;
    co_await pool.run([&ran] { ran = true; });
    EXPECT_TRUE(ran);

    // A move-only function. (g++ 12 destroys a lambda temporary with captures twice when it is
    // created inside the co_await expression: bind it to a local first.)
    auto owned = std::make_unique<int>(7);
    auto multiply = [p = std::move(owned)] { return *p * 6; };
    int moved = co_await pool.run(std::move(multiply));
    EXPECT_EQ(moved, 42);
  }(pool));
}

Task<void> square(ThreadPool& pool, int i, std::atomic<long>& sum) {
  int result = co_await pool.run([i] { return i * i; });
  sum += result;
}

TEST(ThreadPoolTest, ManyConcurrentCalls) {
  auto loop = make_loop();
  ThreadPool pool(3);
  std::atomic<long> sum{0};
  loop->block_on([](ThreadPool& pool, std::atomic<long>& sum) -> Task<void> {
    TaskGroup group;
    for (int i = 0; i < 500; ++i) {
      group.spawn(square(pool, i, sum));
    }
    co_await group.wait();
  }(pool, sum));
  EXPECT_EQ(sum.load(), 499L * 500 * 999 / 6);
}

Task<void> call_blocking(ThreadPool& pool, const std::shared_future<void>& gate, bool& fn_done,
                         bool& resumed) {
  auto blocking = [gate, &fn_done] {
    gate.wait();
    fn_done = true;
  };
  co_await pool.run(std::move(blocking));
  resumed = true;
}

TEST(ThreadPoolTest, WaiterDestroyedWhileFunctionRuns) {
  auto loop = make_loop();
  auto pool = std::make_unique<ThreadPool>(1);
  std::promise<void> open_gate;
  std::shared_future<void> gate = open_gate.get_future().share();
  bool fn_done = false;
  bool resumed = false;
  {
    TaskGroup group;
    loop->block_on([](TaskGroup& group, ThreadPool& pool, const std::shared_future<void>& gate,
                      bool& fn_done, bool& resumed) -> Task<void> {
      group.spawn(call_blocking(pool, gate, fn_done, resumed));
      co_return;
    }(group, *pool, gate, fn_done, resumed));
    EXPECT_EQ(group.size(), 1u);
  }  // the awaiting frame is destroyed while fn is blocked on the gate
  open_gate.set_value();
  pool.reset();  // joins: fn has finished and its completion is posted to the loop
  EXPECT_TRUE(fn_done);
  // Running the loop delivers the completion, which finds no waiter.
  loop->block_on([](EventLoop& loop) -> Task<void> { co_await loop.yield(); }(*loop));
  EXPECT_FALSE(resumed);
}

Task<void> increment(ThreadPool& pool, std::atomic<int>& counter, int& resumed) {
  co_await pool.run([&counter] { ++counter; });
  ++resumed;
}

TEST(ThreadPoolTest, DestructorFinishesQueuedWork) {
  auto loop = make_loop();
  std::atomic<int> counter{0};
  int resumed = 0;
  loop->block_on([](std::atomic<int>& counter, int& resumed) -> Task<void> {
    auto pool = std::make_unique<ThreadPool>(1);
    TaskGroup group;
    for (int i = 0; i < 50; ++i) {
      group.spawn(increment(*pool, counter, resumed));
    }
    pool.reset();  // nothing has been resumed yet; every queued call still runs
    EXPECT_EQ(counter.load(), 50);
    EXPECT_EQ(resumed, 0);
    co_await group.wait();
    EXPECT_EQ(resumed, 50);
  }(counter, resumed));
}

}  // namespace
}  // namespace strata::aio
