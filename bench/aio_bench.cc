// Costs of the coroutine runtime in src/aio, in ns per operation: a Task round trip, a trip through
// the loop's ready queue, a TaskGroup spawn of a task that finishes at once, and a 4 KiB read
// through io_uring. The read uses a 64 MiB file in $STRATA_BENCH_DIR (default /var/tmp), with
// O_DIRECT when the filesystem accepts it; the label says which.

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "aio/event_loop.h"
#include "aio/task.h"
#include "aio/task_group.h"

namespace strata::aio {
namespace {

std::unique_ptr<EventLoop> make_loop(benchmark::State& state) {
  auto loop = EventLoop::create();
  if (!loop.ok()) {
    state.SkipWithError(loop.error().message().c_str());
    return nullptr;
  }
  return std::move(loop).value();
}

Task<int> returns_at_once(int x) {
  co_return x + 1;
}

Task<void> task_round_trips(benchmark::State& state) {
  int x = 0;
  for (auto _ : state) {
    x = co_await returns_at_once(x);
    benchmark::DoNotOptimize(x);
  }
}

void BM_TaskRoundTrip(benchmark::State& state) {
  auto loop = make_loop(state);
  if (loop) {
    loop->block_on(task_round_trips(state));
  }
}
BENCHMARK(BM_TaskRoundTrip);

Task<void> yield_round_trips(EventLoop& loop, benchmark::State& state) {
  for (auto _ : state) {
    co_await loop.yield();
  }
}

void BM_YieldRoundTrip(benchmark::State& state) {
  auto loop = make_loop(state);
  if (loop) {
    loop->block_on(yield_round_trips(*loop, state));
  }
}
BENCHMARK(BM_YieldRoundTrip);

Task<void> finishes_at_once(int& count) {
  ++count;
  co_return;
}

Task<void> spawns(benchmark::State& state) {
  TaskGroup group;
  int count = 0;
  for (auto _ : state) {
    group.spawn(finishes_at_once(count));
  }
  benchmark::DoNotOptimize(count);
  co_await group.wait();
}

void BM_TaskGroupSpawn(benchmark::State& state) {
  auto loop = make_loop(state);
  if (loop) {
    loop->block_on(spawns(state));
  }
}
BENCHMARK(BM_TaskGroupSpawn);

constexpr uint64_t kFileSize = 64 << 20;
constexpr uint32_t kBlock = 4096;

// A 64 MiB file of non-zero data, unlinked at once; returns the fd to read from and whether it
// is O_DIRECT.
std::pair<int, bool> open_bench_file(std::string& error) {
  const char* dir = std::getenv("STRATA_BENCH_DIR");
  std::string path = std::string(dir != nullptr ? dir : "/var/tmp") + "/strata-aio-bench-XXXXXX";
  int fd = mkstemp(path.data());
  if (fd < 0) {
    error = "mkstemp " + path + " failed";
    return {-1, false};
  }
  std::vector<char> chunk(1 << 20, 'x');
  for (uint64_t offset = 0; offset < kFileSize; offset += chunk.size()) {
    if (pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(offset)) !=
        static_cast<ssize_t>(chunk.size())) {
      error = "writing the benchmark file failed";
      close(fd);
      unlink(path.c_str());
      return {-1, false};
    }
  }
  fsync(fd);
  int direct = open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  unlink(path.c_str());
  if (direct >= 0) {
    close(fd);
    return {direct, true};
  }
  return {fd, false};
}

Task<void> random_reads(EventLoop& loop, benchmark::State& state, int fd, void* buffer) {
  std::mt19937_64 random(42);
  std::uniform_int_distribution<uint64_t> block(0, kFileSize / kBlock - 1);
  std::vector<uint64_t> offsets(4096);
  for (auto& offset : offsets) {
    offset = block(random) * kBlock;
  }
  size_t i = 0;
  for (auto _ : state) {
    int got = co_await loop.read(fd, buffer, kBlock, offsets[i++ % offsets.size()]);
    if (got != static_cast<int>(kBlock)) {
      state.SkipWithError("short or failed read");
      break;
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * kBlock);
}

void BM_Pread4K(benchmark::State& state) {
  auto loop = make_loop(state);
  if (!loop) {
    return;
  }
  std::string error;
  auto [fd, direct] = open_bench_file(error);
  if (fd < 0) {
    state.SkipWithError(error.c_str());
    return;
  }
  state.SetLabel(direct ? "O_DIRECT" : "buffered (O_DIRECT refused)");
  void* buffer = std::aligned_alloc(kBlock, kBlock);
  loop->block_on(random_reads(*loop, state, fd, buffer));
  std::free(buffer);
  close(fd);
}
BENCHMARK(BM_Pread4K);

}  // namespace
}  // namespace strata::aio

BENCHMARK_MAIN();
