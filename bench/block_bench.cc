// 4 KiB random reads through the full strata stack, next to the same reads through the bare
// EventLoop. What the pair shows is the cost of the block layer (request checks, tracking,
// serialisation, the raw filter, the file driver) on top of one io_uring request.
//
// Benchmarks, named <path>/<cache>/qd<depth>:
//   strata/...  a `raw` node over a `file` node opened with open_blockdev from blockdev-add JSON,
//               read with block::io::preadv;
//   loop/...    EventLoop::read on an fd of the same file (no block layer);
//   cache:      direct (O_DIRECT, cache.direct=true) or buffered (page cache);
//   qd1:        one read at a time, reported as time per read (ns/op);
//   qd32:       32 coroutines in an aio::TaskGroup, each reading in a loop until the batch of
//               kBatch reads is used up, reported as items_per_second (IOPS).
// All times are wall-clock (UseRealTime): a read spends most of its time waiting for the device.
//
// The file: $STRATA_BENCH_FILE when set (created with non-zero data when missing or shorter than
// 256 MiB, and kept, so that scripts/run-benchmarks can hand the very same file to fio); otherwise
// a 256 MiB temporary file in $STRATA_BENCH_DIR (default /var/tmp), removed at exit.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>
#include <nlohmann/json.hpp>

#include "aio/event_loop.h"
#include "aio/task.h"
#include "aio/task_group.h"
#include "base/arg_decoder.h"
#include "block/drivers/blockdev_options.h"
#include "block/drivers/driver.h"
#include "block/graph/graph.h"
#include "block/io/request.h"

namespace strata {
namespace {

constexpr uint64_t kFileSize = 256ull << 20;
constexpr uint32_t kBlock = 4096;
constexpr size_t kOffsets = 1 << 16;  // distinct random offsets, cycled
constexpr int kBatch = 4096;          // reads per benchmark iteration at queue depth > 1

// The benchmark file, created once per process.
class BenchFile {
 public:
  static BenchFile& get() {
    static BenchFile file;
    return file;
  }
  const std::string& path() const { return path_; }
  const std::string& error() const { return error_; }

 private:
  BenchFile() {
    if (const char* given = std::getenv("STRATA_BENCH_FILE"); given != nullptr && *given != 0) {
      path_ = given;
      struct stat st {};
      if (::stat(path_.c_str(), &st) == 0 && static_cast<uint64_t>(st.st_size) >= kFileSize) {
        return;
      }
      int fd = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
      if (fd < 0) {
        error_ = "cannot create " + path_;
        return;
      }
      fill(fd);
      ::close(fd);
      return;
    }
    const char* dir = std::getenv("STRATA_BENCH_DIR");
    path_ =
        std::string(dir != nullptr && *dir != 0 ? dir : "/var/tmp") + "/strata-block-bench-XXXXXX";
    int fd = ::mkstemp(path_.data());
    if (fd < 0) {
      error_ = "mkstemp " + path_ + " failed";
      return;
    }
    temporary_ = true;
    fill(fd);
    ::close(fd);
  }
  ~BenchFile() {
    if (temporary_) {
      ::unlink(path_.c_str());
    }
  }

  // Writes non-zero data over the whole file, so that every block is allocated and reads reach
  // the device (unwritten extents would read as zeroes without any I/O).
  void fill(int fd) {
    std::vector<char> chunk(1 << 20);
    for (size_t i = 0; i < chunk.size(); ++i) {
      chunk[i] = static_cast<char>('a' + i % 26);
    }
    for (uint64_t offset = 0; offset < kFileSize; offset += chunk.size()) {
      if (::pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(offset)) !=
          static_cast<ssize_t>(chunk.size())) {
        error_ = "writing " + path_ + " failed";
        return;
      }
    }
    if (::fsync(fd) != 0) {
      error_ = "fsync " + path_ + " failed";
    }
  }

  std::string path_;
  std::string error_;
  bool temporary_ = false;
};

// The same pseudo-random aligned offsets for every benchmark.
const std::vector<uint64_t>& random_offsets() {
  static const std::vector<uint64_t> offsets = [] {
    std::mt19937_64 random(42);
    std::uniform_int_distribution<uint64_t> block(0, kFileSize / kBlock - 1);
    std::vector<uint64_t> out(kOffsets);
    for (auto& offset : out) {
      offset = block(random) * kBlock;
    }
    return out;
  }();
  return offsets;
}

struct AlignedBuffer {
  AlignedBuffer() : data(std::aligned_alloc(kBlock, kBlock)) {}
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  void* data;
};

// One way of reading a 4 KiB block: through the block layer or straight through the loop.
class Reader {
 public:
  virtual ~Reader() = default;
  // Reads kBlock bytes at `offset` into `buffer`; false on failure.
  virtual aio::Task<bool> read(uint64_t offset, void* buffer) = 0;
};

class StrataReader : public Reader {
 public:
  explicit StrataReader(block::Node& node) : node_(node) {}
  aio::Task<bool> read(uint64_t offset, void* buffer) override {
    block::IoVector qiov(buffer, kBlock);
    Result<void> result = co_await block::io::preadv(node_, offset, std::move(qiov));
    co_return result.ok();
  }

 private:
  block::Node& node_;
};

class LoopReader : public Reader {
 public:
  LoopReader(aio::EventLoop& loop, int fd) : loop_(loop), fd_(fd) {}
  aio::Task<bool> read(uint64_t offset, void* buffer) override {
    int got = co_await loop_.read(fd_, buffer, kBlock, offset);
    co_return got == static_cast<int>(kBlock);
  }

 private:
  aio::EventLoop& loop_;
  int fd_;
};

// Queue depth 1: one read per benchmark iteration.
aio::Task<void> run_qd1(benchmark::State& state, Reader& reader) {
  AlignedBuffer buffer;
  const auto& offsets = random_offsets();
  size_t i = 0;
  for (auto _ : state) {
    bool ok = co_await reader.read(offsets[i++ % offsets.size()], buffer.data);
    if (!ok) {
      state.SkipWithError("read failed");
      break;
    }
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * kBlock);
}

// Shared by the workers of one batch at queue depth > 1.
struct Batch {
  Reader& reader;
  size_t next = 0;  // index into random_offsets(), keeps advancing across batches
  int remaining = 0;
  bool failed = false;
};

aio::Task<void> worker(Batch& batch) {
  AlignedBuffer buffer;
  const auto& offsets = random_offsets();
  while (batch.remaining > 0 && !batch.failed) {
    --batch.remaining;
    uint64_t offset = offsets[batch.next++ % offsets.size()];
    bool ok = co_await batch.reader.read(offset, buffer.data);
    if (!ok) {
      batch.failed = true;
    }
  }
}

// Queue depth `depth`: each iteration is kBatch reads by `depth` workers.
aio::Task<void> run_qd(benchmark::State& state, Reader& reader, int depth) {
  Batch batch{reader};
  for (auto _ : state) {
    batch.remaining = kBatch;
    aio::TaskGroup group;
    for (int w = 0; w < depth; ++w) {
      group.spawn(worker(batch));
    }
    co_await group.wait();
    if (batch.failed) {
      state.SkipWithError("read failed");
      break;
    }
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * kBatch);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * kBatch * kBlock);
}

aio::Task<void> run(benchmark::State& state, Reader& reader, int depth) {
  if (depth <= 1) {
    co_await run_qd1(state, reader);
  } else {
    co_await run_qd(state, reader, depth);
  }
}

std::unique_ptr<aio::EventLoop> make_loop(benchmark::State& state) {
  auto loop = aio::EventLoop::create();
  if (!loop.ok()) {
    state.SkipWithError(loop.error().message().c_str());
    return nullptr;
  }
  return std::move(loop).value();
}

void BM_StrataRead(benchmark::State& state, bool direct, int depth) {
  const BenchFile& file = BenchFile::get();
  if (!file.error().empty()) {
    state.SkipWithError(file.error().c_str());
    return;
  }
  auto loop = make_loop(state);
  if (!loop) {
    return;
  }
  nlohmann::json options = {
      {"driver", "raw"},
      {"node-name", "r"},
      {"file", {{"driver", "file"}, {"filename", file.path()}, {"cache", {{"direct", direct}}}}}};
  block::Graph graph;
  ArgDecoder d(options);
  auto parsed = block::parse_blockdev_options(d, options);
  auto decoded = d.finish();
  if (!decoded) {
    state.SkipWithError(decoded.error().message().c_str());
    return;
  }
  auto node = block::open_blockdev(graph, *parsed);
  if (!node) {
    state.SkipWithError(node.error().message().c_str());
    return;
  }
  StrataReader reader(**node);
  loop->block_on(run(state, reader, depth));
  node->reset();  // the node goes before its graph
}

void BM_LoopRead(benchmark::State& state, bool direct, int depth) {
  const BenchFile& file = BenchFile::get();
  if (!file.error().empty()) {
    state.SkipWithError(file.error().c_str());
    return;
  }
  auto loop = make_loop(state);
  if (!loop) {
    return;
  }
  int fd = ::open(file.path().c_str(), O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
  if (fd < 0) {
    state.SkipWithError(("cannot open " + file.path()).c_str());
    return;
  }
  LoopReader reader(*loop, fd);
  loop->block_on(run(state, reader, depth));
  ::close(fd);
}

void register_all() {
  for (bool direct : {true, false}) {
    for (int depth : {1, 32}) {
      std::string suffix =
          std::string(direct ? "direct" : "buffered") + "/qd" + std::to_string(depth);
      benchmark::RegisterBenchmark(("strata/" + suffix).c_str(), BM_StrataRead, direct, depth)
          ->UseRealTime();
      benchmark::RegisterBenchmark(("loop/" + suffix).c_str(), BM_LoopRead, direct, depth)
          ->UseRealTime();
    }
  }
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) {
    return 1;
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
