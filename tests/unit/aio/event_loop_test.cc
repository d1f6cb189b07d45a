#include "aio/event_loop.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include <gtest/gtest.h>

namespace strata::aio {
namespace {

std::unique_ptr<EventLoop> make_loop() {
  auto loop = EventLoop::create();
  EXPECT_TRUE(loop.ok()) << loop.error().message();
  return std::move(loop).value();
}

Task<int> add_one(int x) { co_return x + 1; }

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
  std::thread other([&] { loop->post([&] { value = 42; loop->stop(); }); });
  loop->run();
  other.join();
  EXPECT_EQ(value, 42);
}

}  // namespace
}  // namespace strata::aio
