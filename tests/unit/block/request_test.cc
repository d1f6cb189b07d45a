// The request layer (block/io/request.h) against an in-memory driver that fails the test on any
// call that breaks the driver contract (misaligned offset, length or buffer, oversized request).
// Concurrency is forced deterministically: the driver can hold every call on an aio::Event.

#include "block/io/request.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "aio/event_loop.h"
#include "aio/sync.h"
#include "aio/task_group.h"
#include "block/bitmap/dirty_bitmap.h"

namespace strata::block {
namespace {

enum class Op { kRead, kWrite, kZeroes, kDiscard, kFlush, kTruncate, kStatus };

struct Call {
  Op op;
  uint64_t offset;
  uint64_t bytes;
  uint32_t flags;
};

CommonOptions test_options(bool read_only = false) {
  CommonOptions options;
  options.node_name = "mem";
  options.read_only = read_only;
  options.discard = "unmap";
  return options;
}

// An aligned heap buffer for callers that want to hand the layer memory it may use directly.
struct AlignedMemory {
  explicit AlignedMemory(size_t size, size_t alignment = 4096) {
    void* p = nullptr;
    if (posix_memalign(&p, alignment, size == 0 ? alignment : size) != 0) {
      std::abort();
    }
    data = static_cast<uint8_t*>(p);
    std::memset(data, 0, size);
  }
  ~AlignedMemory() { std::free(data); }
  AlignedMemory(const AlignedMemory&) = delete;
  AlignedMemory& operator=(const AlignedMemory&) = delete;
  uint8_t* data = nullptr;
};

class MemoryNode : public Node {
 public:
  MemoryNode(uint64_t size, NodeLimits limits, CommonOptions options = test_options())
      : Node(std::move(options)), data_(size, 0) {
    limits_ = limits;
  }

  const char* driver_name() const override { return "test-memory"; }
  uint64_t length() const override { return data_.size(); }

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override {
    check_data_call("read", offset, bytes, &qiov, limits_.max_transfer);
    calls.push_back({Op::kRead, offset, bytes, flags});
    co_await maybe_pause();
    if (fail_reads) {
      co_return Error(ErrorKind::kIo, "injected read error", EIO);
    }
    const uint64_t stored = offset < data_.size() ? std::min(bytes, data_.size() - offset) : 0;
    qiov.copy_from(0, data_.data() + offset, stored);
    qiov.fill(stored, 0, bytes - stored);  // past the end reads as zeroes
    co_return ok();
  }

  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t flags) override {
    check_data_call("write", offset, bytes, &qiov, limits_.max_transfer);
    calls.push_back({Op::kWrite, offset, bytes, flags});
    if (before_write) {
      before_write(qiov);
    }
    co_await maybe_pause();
    if (offset + bytes > data_.size()) {
      data_.resize(offset + bytes);
    }
    qiov.copy_to(0, data_.data() + offset, bytes);
    co_return ok();
  }

  aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                           uint32_t flags) override {
    check_data_call("write-zeroes", offset, bytes, nullptr, limits_.max_pwrite_zeroes);
    calls.push_back({Op::kZeroes, offset, bytes, flags});
    if (!supports_zeroes) {
      co_return Error(ErrorKind::kUnsupported, "no fast zeroes", ENOTSUP);
    }
    co_await maybe_pause();
    std::memset(data_.data() + offset, 0, bytes);
    co_return ok();
  }

  aio::Task<Result<void>> co_pdiscard(uint64_t offset, uint64_t bytes) override {
    check_data_call("discard", offset, bytes, nullptr, limits_.max_pdiscard);
    calls.push_back({Op::kDiscard, offset, bytes, 0});
    std::memset(data_.data() + offset, 0, bytes);
    co_return ok();
  }

  aio::Task<Result<void>> co_flush() override {
    calls.push_back({Op::kFlush, 0, 0, 0});
    co_return ok();
  }

  aio::Task<Result<void>> co_truncate(uint64_t new_size, bool) override {
    calls.push_back({Op::kTruncate, new_size, 0, 0});
    co_await maybe_pause();
    data_.resize(new_size);
    co_return ok();
  }

  aio::Task<Result<BlockStatus>> co_block_status(uint64_t offset, uint64_t bytes) override {
    check_data_call("block-status", offset, bytes, nullptr, 0);
    calls.push_back({Op::kStatus, offset, bytes, 0});
    BlockStatus status;
    status.bytes = status_run != 0 ? status_run : bytes;
    status.flags = unallocated ? 0 : BlockStatus::kData | BlockStatus::kOffsetValid;
    status.map_offset = offset;
    co_return status;
  }

  void set_read_only(bool read_only) { read_only_ = read_only; }
  void set_active(bool active) { active_ = active; }

  // Holds every data call in the driver until release().
  void hold() {
    gate_.reset();
    gated_ = true;
  }
  void release() {
    gated_ = false;
    gate_.set();
  }
  int held() const { return held_; }

  std::vector<uint8_t>& data() { return data_; }
  size_t count(Op op) const {
    size_t n = 0;
    for (const Call& c : calls) {
      n += c.op == op ? 1 : 0;
    }
    return n;
  }

  std::vector<Call> calls;
  // Called with each write's vector before the data is taken from it.
  std::function<void(const IoVector&)> before_write;
  bool unallocated = false;  // block status reports nothing allocated here (copy-on-read copies)
  bool supports_zeroes = true;
  bool fail_reads = false;
  uint64_t status_run = 0;

 private:
  aio::Task<void> maybe_pause() {
    if (gated_) {
      ++held_;
      co_await gate_.wait();
      --held_;
    }
  }

  void check_data_call(const char* what, uint64_t offset, uint64_t bytes, const IoVector* qiov,
                       uint64_t max) {
    const uint64_t align = limits_.request_alignment;
    if (offset % align != 0 || bytes % align != 0 || bytes == 0) {
      ADD_FAILURE() << what << " misaligned or empty: offset " << offset << " bytes " << bytes
                    << " alignment " << align;
    }
    if (max != 0 && bytes > max) {
      ADD_FAILURE() << what << " of " << bytes << " bytes exceeds the limit " << max;
    }
    if (offset + bytes > (data_.size() + align - 1) / align * align) {
      ADD_FAILURE() << what << " beyond the end: offset " << offset << " bytes " << bytes;
    }
    if (qiov != nullptr) {
      if (qiov->size() != bytes) {
        ADD_FAILURE() << what << " vector size " << qiov->size() << " != " << bytes;
      }
      for (const iovec& v : qiov->entries()) {
        if (reinterpret_cast<uintptr_t>(v.iov_base) % limits_.memory_alignment != 0 ||
            v.iov_len % limits_.memory_alignment != 0) {
          ADD_FAILURE() << what << " buffer misaligned: " << v.iov_base << " length " << v.iov_len;
        }
      }
    }
  }

  std::vector<uint8_t> data_;
  aio::Event gate_;
  bool gated_ = false;
  int held_ = 0;
};

NodeLimits limits_for(uint32_t align, uint64_t max_transfer = 0) {
  NodeLimits limits;
  limits.request_alignment = align;
  limits.memory_alignment = align;
  limits.max_transfer = max_transfer;
  return limits;
}

std::vector<uint8_t> pattern(size_t size, unsigned seed) {
  std::vector<uint8_t> out(size);
  uint32_t x = seed * 2654435761u + 1;
  for (auto& b : out) {
    x = x * 1103515245u + 12345u;
    b = static_cast<uint8_t>(x >> 16);
  }
  return out;
}

class RequestTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto loop = aio::EventLoop::create();
    ASSERT_TRUE(loop) << loop.error().message();
    loop_ = std::move(*loop);
  }

  template <typename T>
  T run(aio::Task<T> task) {
    return loop_->block_on(std::move(task));
  }
  // Runs `body` from inside a loop iteration (sync.h primitives need a running loop).
  void run_in_loop(aio::Task<void> body) { loop_->block_on(enter(*loop_, std::move(body))); }
  static aio::Task<void> enter(aio::EventLoop& loop, aio::Task<void> body) {
    co_await loop.yield();
    co_await body;
  }

  std::unique_ptr<aio::EventLoop> loop_;
};

// Lets scheduled coroutines run for a few loop iterations.
aio::Task<void> settle(aio::EventLoop& loop) {
  for (int i = 0; i < 8; ++i) {
    co_await loop.yield();
  }
}

aio::Task<void> write_into(Node& node, uint64_t offset, const std::vector<uint8_t>* data,
                           Result<void>* out) {
  Result<void> result = co_await io::pwrite(node, offset, data->data(), data->size());
  *out = std::move(result);
}

aio::Task<void> read_into(Node& node, uint64_t offset, std::vector<uint8_t>* data,
                          Result<void>* out) {
  Result<void> result = co_await io::pread(node, offset, data->data(), data->size());
  *out = std::move(result);
}

// ---- alignment -----------------------------------------------------------------------------

void check_unaligned_io(aio::EventLoop& loop, uint32_t align) {
  const uint64_t size = 16 * align;
  MemoryNode node(size, limits_for(align));
  node.data() = pattern(size, 1);
  std::vector<uint8_t> reference = node.data();

  const uint64_t offsets[] = {0, 1, align / 2, align - 1, align, align + 1, 3 * align - 1};
  const uint64_t lengths[] = {1, align / 2, align - 1, align, align + 1, 2 * align, 3 * align + 7};
  unsigned seed = 2;
  for (uint64_t offset : offsets) {
    for (uint64_t length : lengths) {
      for (bool misaligned_buffer : {false, true}) {
        SCOPED_TRACE("align " + std::to_string(align) + " offset " + std::to_string(offset) +
                     " length " + std::to_string(length) +
                     (misaligned_buffer ? " misaligned buffer" : ""));
        AlignedMemory memory(length + 1, align);
        uint8_t* buffer = memory.data + (misaligned_buffer ? 1 : 0);

        // Write a fresh pattern and mirror it in the reference.
        std::vector<uint8_t> data = pattern(length, seed++);
        std::memcpy(buffer, data.data(), length);
        Result<void> written = loop.block_on(io::pwrite(node, offset, buffer, length));
        EXPECT_TRUE(written) << written.error().message();
        std::memcpy(reference.data() + offset, data.data(), length);
        EXPECT_EQ(node.data(), reference);

        // Read it back, plus one byte either side where possible.
        uint64_t read_offset = offset > 0 ? offset - 1 : 0;
        uint64_t read_length = std::min<uint64_t>(length + 2, size - read_offset);
        AlignedMemory out(read_length + 1, align);
        uint8_t* out_buffer = out.data + (misaligned_buffer ? 1 : 0);
        Result<void> read = loop.block_on(io::pread(node, read_offset, out_buffer, read_length));
        EXPECT_TRUE(read) << read.error().message();
        EXPECT_EQ(0, std::memcmp(out_buffer, reference.data() + read_offset, read_length));
      }
    }
  }
}

TEST_F(RequestTest, UnalignedReadsAndWritesAt512) {
  check_unaligned_io(*loop_, 512);
}

TEST_F(RequestTest, UnalignedReadsAndWritesAt4096) {
  check_unaligned_io(*loop_, 4096);
}

TEST_F(RequestTest, AlignedRequestGoesStraightToTheDriver) {
  MemoryNode node(64 * 1024, limits_for(512));
  AlignedMemory buffer(4096, 512);
  std::memset(buffer.data, 0x5a, 4096);
  Result<void> written = run(io::pwrite(node, 8192, buffer.data, 4096, kRequestFua));
  ASSERT_TRUE(written);
  ASSERT_EQ(node.calls.size(), 1u);
  EXPECT_EQ(node.calls[0].op, Op::kWrite);
  EXPECT_EQ(node.calls[0].offset, 8192u);
  EXPECT_EQ(node.calls[0].bytes, 4096u);
  EXPECT_EQ(node.calls[0].flags, static_cast<uint32_t>(kRequestFua));
}

TEST_F(RequestTest, UnalignedWriteIsOneReadModifyWrite) {
  MemoryNode node(64 * 1024, limits_for(512));
  std::vector<uint8_t> data(1000, 0x11);
  Result<void> written = run(io::pwrite(node, 100, data.data(), data.size()));
  ASSERT_TRUE(written);
  // Head and tail blocks are read, then the aligned superset is written once.
  ASSERT_EQ(node.calls.size(), 3u);
  EXPECT_EQ(node.calls[0].op, Op::kRead);
  EXPECT_EQ(node.calls[0].offset, 0u);
  EXPECT_EQ(node.calls[0].bytes, 512u);
  EXPECT_EQ(node.calls[1].op, Op::kRead);
  EXPECT_EQ(node.calls[1].offset, 1024u);
  EXPECT_EQ(node.calls[2].op, Op::kWrite);
  EXPECT_EQ(node.calls[2].offset, 0u);
  EXPECT_EQ(node.calls[2].bytes, 1536u);
}

TEST_F(RequestTest, MaxTransferSplitsRequests) {
  MemoryNode node(256 * 1024, limits_for(512, 4096));
  node.data() = pattern(node.length(), 7);
  AlignedMemory buffer(20 * 1024, 512);
  Result<void> read = run(io::pread(node, 4096, buffer.data, 20 * 1024));
  ASSERT_TRUE(read);
  ASSERT_EQ(node.calls.size(), 5u);
  for (size_t i = 0; i < node.calls.size(); ++i) {
    EXPECT_EQ(node.calls[i].offset, 4096 + i * 4096);
    EXPECT_EQ(node.calls[i].bytes, 4096u);
  }
  EXPECT_EQ(0, std::memcmp(buffer.data, node.data().data() + 4096, 20 * 1024));

  node.calls.clear();
  std::vector<uint8_t> data = pattern(10000, 8);
  Result<void> written = run(io::pwrite(node, 777, data.data(), data.size()));
  ASSERT_TRUE(written);
  EXPECT_EQ(0, std::memcmp(node.data().data() + 777, data.data(), data.size()));
  uint64_t next_write = 512;
  for (const Call& call : node.calls) {
    if (call.op == Op::kWrite) {
      EXPECT_EQ(call.offset, next_write);
      next_write += call.bytes;
    }
  }
  EXPECT_EQ(next_write, 11264u);  // round_up(777 + 10000, 512)
}

// ---- write-zeroes and discard --------------------------------------------------------------

TEST_F(RequestTest, UnalignedWriteZeroesUsesRmwHeadAndTail) {
  MemoryNode node(64 * 1024, limits_for(512));
  node.data() = pattern(node.length(), 3);
  std::vector<uint8_t> reference = node.data();
  Result<void> zeroed = run(io::pwrite_zeroes(node, 100, 5000));
  ASSERT_TRUE(zeroed) << zeroed.error().message();
  std::memset(reference.data() + 100, 0, 5000);
  EXPECT_EQ(node.data(), reference);
  // Head block [0, 512) and tail block [4608, 5120) are rewritten; the middle is zeroed fast.
  ASSERT_EQ(node.count(Op::kZeroes), 1u);
  for (const Call& call : node.calls) {
    if (call.op == Op::kZeroes) {
      EXPECT_EQ(call.offset, 512u);
      EXPECT_EQ(call.bytes, 4096u);
    }
  }
  EXPECT_GE(node.count(Op::kWrite), 1u);

  // Within one block: a single read-modify-write, no fast zeroing.
  node.calls.clear();
  reference = node.data() = pattern(node.length(), 4);
  zeroed = run(io::pwrite_zeroes(node, 8192 + 10, 20));
  ASSERT_TRUE(zeroed);
  std::memset(reference.data() + 8192 + 10, 0, 20);
  EXPECT_EQ(node.data(), reference);
  EXPECT_EQ(node.count(Op::kZeroes), 0u);
  EXPECT_EQ(node.count(Op::kWrite), 1u);
}

TEST_F(RequestTest, WriteZeroesFallsBackToBoundedWrites) {
  NodeLimits limits = limits_for(512, 64 * 1024);
  limits.max_pwrite_zeroes = 1024 * 1024;
  MemoryNode node(4 * 1024 * 1024, limits);
  node.supports_zeroes = false;
  node.data() = pattern(node.length(), 5);
  const std::vector<uint8_t> original = node.data();
  Result<void> zeroed = run(io::pwrite_zeroes(node, 0, 3 * 1024 * 1024));
  ASSERT_TRUE(zeroed) << zeroed.error().message();
  for (uint64_t i = 0; i < 3 * 1024 * 1024; ++i) {
    if (node.data()[i] != 0) {
      ADD_FAILURE() << "byte " << i << " not zeroed";
      break;
    }
  }
  EXPECT_TRUE(std::equal(node.data().begin() + 3 * 1024 * 1024, node.data().end(),
                         original.begin() + 3 * 1024 * 1024));
  EXPECT_EQ(node.count(Op::kZeroes), 3u);  // split by max_pwrite_zeroes
  EXPECT_EQ(node.count(Op::kWrite), 48u);  // fallback chunks of max_transfer

  node.calls.clear();
  Result<void> no_fallback = run(io::pwrite_zeroes(node, 0, 4096, kRequestNoFallback));
  ASSERT_FALSE(no_fallback);
  EXPECT_EQ(no_fallback.error().errno_value(), ENOTSUP);
  EXPECT_EQ(node.count(Op::kWrite), 0u);
  Result<void> unaligned = run(io::pwrite_zeroes(node, 1, 4096, kRequestNoFallback));
  ASSERT_FALSE(unaligned);
  EXPECT_EQ(unaligned.error().errno_value(), ENOTSUP);
}

TEST_F(RequestTest, DiscardIsAlignedInwardAndIgnoredWithoutUnmap) {
  MemoryNode node(64 * 1024, limits_for(512));
  node.data() = pattern(node.length(), 6);
  Result<void> discarded = run(io::pdiscard(node, 100, 2000));
  ASSERT_TRUE(discarded);
  ASSERT_EQ(node.count(Op::kDiscard), 1u);
  EXPECT_EQ(node.calls[0].offset, 512u);
  EXPECT_EQ(node.calls[0].bytes, 1536u);
  EXPECT_EQ(node.count(Op::kWrite), 0u);

  CommonOptions ignore = test_options();
  ignore.discard = "ignore";
  MemoryNode ignoring(64 * 1024, limits_for(512), ignore);
  discarded = run(io::pdiscard(ignoring, 0, 4096));
  ASSERT_TRUE(discarded);
  EXPECT_TRUE(ignoring.calls.empty());
}

// ---- dirty bitmaps --------------------------------------------------------------------------

TEST_F(RequestTest, EnabledDirtyBitmapsRecordWritesZeroesAndDiscards) {
  MemoryNode node(1024 * 1024, limits_for(512));
  auto& enabled =
      node.dirty_bitmaps().add(std::make_unique<bitmap::DirtyBitmap>("on", node.length(), 65536));
  auto& disabled =
      node.dirty_bitmaps().add(std::make_unique<bitmap::DirtyBitmap>("off", node.length(), 4096));
  disabled.set_enabled(false);

  std::vector<uint8_t> data(100, 0x5a);
  ASSERT_TRUE(run(io::pwrite(node, 70000, data.data(), data.size())));  // unaligned: RMW path
  ASSERT_TRUE(run(io::pwrite_zeroes(node, 300 * 1024, 4096)));
  ASSERT_TRUE(run(io::pdiscard(node, 512 * 1024, 128 * 1024)));
  std::vector<uint8_t> read(4096);
  ASSERT_TRUE(run(io::pread(node, 0, read.data(), read.size())));  // reads dirty nothing

  EXPECT_FALSE(enabled.test(0));
  EXPECT_TRUE(enabled.test(65536));       // the write at 70000
  EXPECT_TRUE(enabled.test(256 * 1024));  // write-zeroes at 300 KiB (chunk 4)
  EXPECT_TRUE(enabled.test(512 * 1024));
  EXPECT_TRUE(enabled.test(576 * 1024));
  EXPECT_FALSE(enabled.test(640 * 1024));
  EXPECT_EQ(enabled.count(), 4u * 65536);
  EXPECT_EQ(disabled.count(), 0u);
}

// ---- serialisation -------------------------------------------------------------------------

aio::Task<void> overlapping_rmw_body(aio::EventLoop& loop, MemoryNode& node) {
  node.hold();
  aio::TaskGroup group;
  std::vector<uint8_t> a(200, 0xaa);
  std::vector<uint8_t> b(200, 0xbb);
  Result<void> ra = ok();
  Result<void> rb = ok();
  group.spawn(write_into(node, 100, &a, &ra));  // [100, 300): RMW of block 0
  EXPECT_EQ(node.held(), 1);                    // A is reading its head block
  group.spawn(write_into(node, 200, &b, &rb));  // [200, 400): same block
  co_await settle(loop);
  // B waits in the tracker for A (serialising), it never reached the driver.
  EXPECT_EQ(node.held(), 1);
  EXPECT_EQ(node.calls.size(), 1u);
  EXPECT_EQ(node.requests().tracked_count(), 2u);
  node.release();
  co_await group.wait();
  EXPECT_TRUE(ra);
  EXPECT_TRUE(rb);
}

TEST_F(RequestTest, OverlappingUnalignedWritesAreSerialised) {
  MemoryNode node(8192, limits_for(512));
  run_in_loop(overlapping_rmw_body(*loop_, node));
  // A ran to completion before B read the block: the result is "A then B", never a mix where B's
  // write-back of a stale block erased A's bytes.
  std::vector<uint8_t> expected(8192, 0);
  std::memset(expected.data() + 100, 0xaa, 200);
  std::memset(expected.data() + 200, 0xbb, 200);
  EXPECT_EQ(node.data(), expected);
  ASSERT_EQ(node.calls.size(), 4u);
  EXPECT_EQ(node.calls[0].op, Op::kRead);
  EXPECT_EQ(node.calls[1].op, Op::kWrite);
  EXPECT_EQ(node.calls[2].op, Op::kRead);
  EXPECT_EQ(node.calls[3].op, Op::kWrite);
  EXPECT_EQ(node.requests().tracked_count(), 0u);
  EXPECT_EQ(node.requests().in_flight(), 0u);
}

aio::Task<void> aligned_write_during_rmw_body(aio::EventLoop& loop, MemoryNode& node) {
  // An aligned write to the block an RMW is working on waits for it, and an RMW that starts while
  // an aligned write is in flight waits for that write.
  node.hold();
  aio::TaskGroup group;
  std::vector<uint8_t> aligned(512, 0xcc);
  std::vector<uint8_t> small(10, 0xdd);
  Result<void> r1 = ok();
  Result<void> r2 = ok();
  group.spawn(write_into(node, 0, &aligned, &r1));  // plain write, held in the driver
  group.spawn(write_into(node, 50, &small, &r2));   // RMW of the same block
  co_await settle(loop);
  EXPECT_EQ(node.held(), 1);
  EXPECT_EQ(node.calls.size(), 1u);
  node.release();
  co_await group.wait();
  EXPECT_TRUE(r1);
  EXPECT_TRUE(r2);
}

TEST_F(RequestTest, RmwWaitsForOverlappingPlainWrite) {
  MemoryNode node(4096, limits_for(512));
  run_in_loop(aligned_write_during_rmw_body(*loop_, node));
  std::vector<uint8_t> expected(4096, 0);
  std::memset(expected.data(), 0xcc, 512);
  std::memset(expected.data() + 50, 0xdd, 10);
  EXPECT_EQ(node.data(), expected);
}

aio::Task<void> non_overlapping_body(aio::EventLoop& loop, MemoryNode& node) {
  node.hold();
  aio::TaskGroup group;
  std::vector<uint8_t> a(100, 1);
  std::vector<uint8_t> b(100, 2);
  std::vector<uint8_t> c(512, 0);
  Result<void> ra = ok();
  Result<void> rb = ok();
  Result<void> rc = ok();
  group.spawn(write_into(node, 10, &a, &ra));    // RMW of block 0
  group.spawn(write_into(node, 1034, &b, &rb));  // RMW of block 2
  group.spawn(read_into(node, 4096, &c, &rc));   // unrelated read
  co_await settle(loop);
  // All three are in the driver at the same time: nothing waited for anything.
  EXPECT_EQ(node.held(), 3);
  node.release();
  co_await group.wait();
  EXPECT_TRUE(ra);
  EXPECT_TRUE(rb);
  EXPECT_TRUE(rc);
}

TEST_F(RequestTest, NonOverlappingRequestsDoNotWait) {
  MemoryNode node(8192, limits_for(512));
  run_in_loop(non_overlapping_body(*loop_, node));
  EXPECT_EQ(node.data()[10], 1);
  EXPECT_EQ(node.data()[1034], 2);
}

aio::Task<void> read_waits_for_rmw_body(aio::EventLoop& loop, MemoryNode& node) {
  node.hold();
  aio::TaskGroup group;
  std::vector<uint8_t> small(10, 0xee);
  std::vector<uint8_t> block(512, 0);
  std::vector<uint8_t> other(512, 0);
  Result<void> rw = ok();
  Result<void> rr = ok();
  Result<void> ro = ok();
  group.spawn(write_into(node, 20, &small, &rw));  // RMW, held in its head read
  group.spawn(read_into(node, 0, &block, &rr));    // overlaps: waits for the RMW
  group.spawn(read_into(node, 512, &other, &ro));  // does not overlap: reaches the driver
  co_await settle(loop);
  EXPECT_EQ(node.held(), 2);
  node.release();
  co_await group.wait();
  EXPECT_TRUE(rw);
  EXPECT_TRUE(rr);
  EXPECT_TRUE(ro);
  // The overlapping read saw the finished write.
  EXPECT_EQ(block[20], 0xee);
  EXPECT_EQ(block[29], 0xee);
}

TEST_F(RequestTest, ReadsWaitForOverlappingSerialisingWrites) {
  MemoryNode node(4096, limits_for(512));
  run_in_loop(read_waits_for_rmw_body(*loop_, node));
}

// ---- drain ---------------------------------------------------------------------------------

aio::Task<void> drain_task(Node& node, bool* done) {
  co_await io::drain(node);
  *done = true;
}

aio::Task<void> drain_body(aio::EventLoop& loop, MemoryNode& node) {
  node.hold();
  aio::TaskGroup group;
  std::vector<uint8_t> first(512, 1);
  std::vector<uint8_t> second(512, 2);
  Result<void> r1 = ok();
  Result<void> r2 = ok();
  bool drained = false;
  group.spawn(write_into(node, 0, &first, &r1));
  EXPECT_EQ(node.requests().in_flight(), 1u);
  group.spawn(drain_task(node, &drained));
  co_await settle(loop);
  EXPECT_FALSE(drained);  // a request is still in flight
  node.release();
  co_await settle(loop);
  EXPECT_TRUE(drained);
  EXPECT_EQ(node.requests().in_flight(), 0u);

  // While quiesced, a new request waits before entering the gate.
  io::drain_begin(node);
  group.spawn(write_into(node, 1024, &second, &r2));
  co_await settle(loop);
  EXPECT_EQ(node.count(Op::kWrite), 1u);
  EXPECT_EQ(node.requests().in_flight(), 0u);
  co_await io::drain(node);  // nothing in flight: returns at once, and keeps the quiesce
  co_await settle(loop);
  EXPECT_EQ(node.count(Op::kWrite), 1u);
  io::drain_end(node);
  co_await group.wait();
  EXPECT_GE(node.count(Op::kWrite), 1u);
  EXPECT_TRUE(r1);
  EXPECT_TRUE(r2);
}

TEST_F(RequestTest, DrainWaitsForInFlightAndQuiesceBlocksNewRequests) {
  MemoryNode node(4096, limits_for(512));
  run_in_loop(drain_body(*loop_, node));
  EXPECT_EQ(node.data()[0], 1);
  EXPECT_EQ(node.data()[1024], 2);
}

TEST_F(RequestTest, NestedDrainSectionsReleaseAtTheLastEnd) {
  MemoryNode node(4096, limits_for(512));
  io::drain_begin(node);
  io::drain_begin(node);
  io::drain_end(node);
  EXPECT_TRUE(node.requests().quiesced());
  io::drain_end(node);
  EXPECT_FALSE(node.requests().quiesced());
}

// ---- write notifiers -----------------------------------------------------------------------

struct NotifierLog {
  struct Entry {
    uint64_t offset;
    uint64_t bytes;
    uint32_t flags;
    size_t driver_writes_before;
  };
  std::vector<Entry> entries;
};

TEST_F(RequestTest, WriteNotifiersSeeTheChangedRangesBeforeTheDriver) {
  MemoryNode node(64 * 1024, limits_for(512));
  NotifierLog log;
  MemoryNode* node_ptr = &node;
  auto id = io::add_write_notifier(
      node,
      [&log, node_ptr](Node&, uint64_t offset, uint64_t bytes,
                       uint32_t flags) -> aio::Task<Result<void>> {
        log.entries.push_back(
            {offset, bytes, flags, node_ptr->count(Op::kWrite) + node_ptr->count(Op::kZeroes)});
        co_return ok();
      });
  std::vector<uint8_t> data(1000, 7);
  ASSERT_TRUE(run(io::pwrite(node, 100, data.data(), data.size())));
  ASSERT_TRUE(run(io::pwrite_zeroes(node, 8192, 4096)));
  ASSERT_TRUE(run(io::pdiscard(node, 16384 + 1, 4096)));
  std::vector<uint8_t> out(100);
  ASSERT_TRUE(run(io::pread(node, 0, out.data(), out.size())));  // reads do not notify
  ASSERT_EQ(log.entries.size(), 3u);
  EXPECT_EQ(log.entries[0].offset, 100u);
  EXPECT_EQ(log.entries[0].bytes, 1000u);
  EXPECT_EQ(log.entries[0].flags, 0u);
  EXPECT_EQ(log.entries[0].driver_writes_before, 0u);
  EXPECT_EQ(log.entries[1].offset, 8192u);
  EXPECT_EQ(log.entries[1].bytes, 4096u);
  EXPECT_EQ(log.entries[1].flags, static_cast<uint32_t>(kNotifyWriteZeroes));
  EXPECT_EQ(log.entries[1].driver_writes_before, 1u);
  EXPECT_EQ(log.entries[2].offset, 16384u + 512u);  // the part actually discarded
  EXPECT_EQ(log.entries[2].bytes, 3584u);
  EXPECT_EQ(log.entries[2].flags, static_cast<uint32_t>(kNotifyDiscard));

  io::remove_write_notifier(node, id);
  ASSERT_TRUE(run(io::pwrite(node, 0, data.data(), 512)));
  EXPECT_EQ(log.entries.size(), 3u);
}

TEST_F(RequestTest, FailingNotifierFailsTheWriteBeforeTheDriver) {
  MemoryNode node(64 * 1024, limits_for(512));
  io::add_write_notifier(node, [](Node&, uint64_t, uint64_t, uint32_t) -> aio::Task<Result<void>> {
    co_return Error(ErrorKind::kIo, "copy-before-write failed", EIO);
  });
  std::vector<uint8_t> data(4096, 9);
  Result<void> aligned = run(io::pwrite(node, 0, data.data(), 4096));
  ASSERT_FALSE(aligned);
  EXPECT_EQ(aligned.error().message(), "copy-before-write failed");
  Result<void> unaligned = run(io::pwrite(node, 1, data.data(), 100));
  ASSERT_FALSE(unaligned);
  Result<void> zeroes = run(io::pwrite_zeroes(node, 0, 4096));
  ASSERT_FALSE(zeroes);
  EXPECT_EQ(node.count(Op::kWrite), 0u);
  EXPECT_EQ(node.count(Op::kZeroes), 0u);
  EXPECT_EQ(node.data()[0], 0);
  EXPECT_EQ(node.requests().in_flight(), 0u);
  EXPECT_EQ(node.requests().tracked_count(), 0u);
}

TEST_F(RequestTest, NotifierCanReadOldDataDuringSerialisingWrite) {
  // A copy-before-write style notifier reads the range being written; with kRequestNoSerialising
  // it does not wait for the (serialising) RMW that called it.
  MemoryNode node(4096, limits_for(512));
  node.data() = pattern(4096, 11);
  std::vector<uint8_t> old_data = node.data();
  std::vector<uint8_t> copied(100);
  io::add_write_notifier(
      node,
      [&copied](Node& n, uint64_t offset, uint64_t bytes, uint32_t) -> aio::Task<Result<void>> {
        copied.resize(bytes);
        IoVector vector(copied.data(), bytes);
        Result<void> read = co_await io::preadv(n, offset, vector, kRequestNoSerialising);
        co_return read;
      });
  std::vector<uint8_t> data(100, 0x42);
  Result<void> written = run(io::pwrite(node, 30, data.data(), data.size()));
  ASSERT_TRUE(written) << written.error().message();
  EXPECT_EQ(0, std::memcmp(copied.data(), old_data.data() + 30, 100));
  EXPECT_EQ(node.data()[30], 0x42);
}

// ---- refusals and ranges -------------------------------------------------------------------

TEST_F(RequestTest, ReadOnlyAndInactiveNodesRefuseChanges) {
  MemoryNode node(4096, limits_for(512));
  node.set_read_only(true);
  std::vector<uint8_t> data(512, 1);
  Result<void> written = run(io::pwrite(node, 0, data.data(), 512));
  ASSERT_FALSE(written);
  EXPECT_EQ(written.error().kind(), ErrorKind::kPermission);
  EXPECT_EQ(written.error().errno_value(), EPERM);
  EXPECT_EQ(written.error().message(), "Block node is read-only");
  EXPECT_FALSE(run(io::pwrite_zeroes(node, 0, 512)));
  EXPECT_FALSE(run(io::pdiscard(node, 0, 512)));
  EXPECT_FALSE(run(io::truncate(node, 8192, false)));
  EXPECT_TRUE(run(io::pread(node, 0, data.data(), 512)));  // reads are fine
  EXPECT_TRUE(run(io::flush(node)));
  EXPECT_EQ(node.count(Op::kRead), 1u);
  EXPECT_EQ(node.calls.size(), 1u);

  node.set_read_only(false);
  node.set_active(false);
  Result<void> inactive = run(io::pwrite(node, 0, data.data(), 512));
  ASSERT_FALSE(inactive);
  EXPECT_EQ(inactive.error().errno_value(), EPERM);
  EXPECT_NE(inactive.error().message().find("inactive"), std::string::npos);
  EXPECT_EQ(node.count(Op::kWrite), 0u);
}

TEST_F(RequestTest, OutOfRangeRequestsFail) {
  MemoryNode node(4096, limits_for(512));
  std::vector<uint8_t> data(1024, 1);
  Result<void> past_end = run(io::pread(node, 3584, data.data(), 1024));
  ASSERT_FALSE(past_end);
  EXPECT_EQ(past_end.error().errno_value(), EIO);
  past_end = run(io::pwrite(node, 4000, data.data(), 97));
  ASSERT_FALSE(past_end);
  EXPECT_EQ(past_end.error().errno_value(), EIO);
  EXPECT_FALSE(run(io::pwrite_zeroes(node, 4096, 1)));
  EXPECT_FALSE(run(io::pdiscard(node, 0, 4097)));

  const uint64_t huge = uint64_t{1} << 63;
  Result<void> invalid = run(io::pread(node, huge, data.data(), 1));
  ASSERT_FALSE(invalid);
  EXPECT_EQ(invalid.error().errno_value(), EINVAL);
  invalid = run(io::pwrite_zeroes(node, 0, huge));
  ASSERT_FALSE(invalid);
  EXPECT_EQ(invalid.error().errno_value(), EINVAL);
  invalid = run(io::truncate(node, huge, false));
  ASSERT_FALSE(invalid);
  EXPECT_EQ(invalid.error().errno_value(), EINVAL);

  // Zero-length requests succeed without reaching the driver; the last byte is reachable.
  EXPECT_TRUE(run(io::pread(node, 100, data.data(), 0)));
  EXPECT_TRUE(run(io::pwrite(node, 4096, data.data(), 0)));
  EXPECT_TRUE(run(io::pwrite_zeroes(node, 7, 0)));
  EXPECT_TRUE(node.calls.empty());
  EXPECT_TRUE(run(io::pwrite(node, 4095, data.data(), 1)));
}

TEST_F(RequestTest, DriverErrorsPropagateAndReleaseTheRequest) {
  MemoryNode node(4096, limits_for(512));
  node.fail_reads = true;
  std::vector<uint8_t> data(10, 1);
  Result<void> written = run(io::pwrite(node, 5, data.data(), data.size()));
  ASSERT_FALSE(written);
  EXPECT_EQ(written.error().message(), "injected read error");
  EXPECT_EQ(node.count(Op::kWrite), 0u);
  EXPECT_EQ(node.requests().in_flight(), 0u);
  EXPECT_EQ(node.requests().tracked_count(), 0u);
}

// ---- flush, truncate, block status ---------------------------------------------------------

TEST_F(RequestTest, FlushSkipsCleanLeafNodes) {
  MemoryNode node(4096, limits_for(512));
  ASSERT_TRUE(run(io::flush(node)));
  EXPECT_EQ(node.count(Op::kFlush), 0u);  // nothing written since open
  std::vector<uint8_t> data(512, 1);
  ASSERT_TRUE(run(io::pwrite(node, 0, data.data(), 512)));
  ASSERT_TRUE(run(io::flush(node)));
  EXPECT_EQ(node.count(Op::kFlush), 1u);
  ASSERT_TRUE(run(io::flush(node)));
  EXPECT_EQ(node.count(Op::kFlush), 1u);
}

aio::Task<void> truncate_task(Node& node, uint64_t size, Result<void>* out) {
  Result<void> result = co_await io::truncate(node, size, true);
  *out = std::move(result);
}

aio::Task<void> truncate_body(aio::EventLoop& loop, MemoryNode& node) {
  // Shrinking waits for a write to the part that goes away.
  node.hold();
  aio::TaskGroup group;
  std::vector<uint8_t> data(512, 3);
  Result<void> rw = ok();
  Result<void> rt = ok();
  group.spawn(write_into(node, 3584, &data, &rw));
  group.spawn(truncate_task(node, 2048, &rt));
  co_await settle(loop);
  EXPECT_EQ(node.count(Op::kTruncate), 0u);
  node.release();
  co_await group.wait();
  EXPECT_TRUE(rw);
  EXPECT_TRUE(rt);
}

TEST_F(RequestTest, TruncateIsSerialisedWithRequestsInTheChangedRange) {
  MemoryNode node(4096, limits_for(512));
  run_in_loop(truncate_body(*loop_, node));
  EXPECT_EQ(node.length(), 2048u);
  ASSERT_EQ(node.calls.size(), 2u);
  EXPECT_EQ(node.calls[0].op, Op::kWrite);
  EXPECT_EQ(node.calls[1].op, Op::kTruncate);
}

TEST_F(RequestTest, BlockStatusIsAlignedAndClamped) {
  MemoryNode node(8192, limits_for(512));
  Result<BlockStatus> status = run(io::block_status(node, 100, 1 << 20));
  ASSERT_TRUE(status) << status.error().message();
  EXPECT_EQ(status->bytes, 8092u);  // clamped to the end
  EXPECT_EQ(status->map_offset, 100u);
  EXPECT_NE(status->flags & BlockStatus::kAllocated, 0u);
  ASSERT_EQ(node.calls.size(), 1u);
  EXPECT_EQ(node.calls[0].offset, 0u);
  EXPECT_EQ(node.calls[0].bytes, 8192u);

  node.status_run = 512;  // the driver reports a shorter run
  status = run(io::block_status(node, 700, 4000));
  ASSERT_TRUE(status);
  EXPECT_EQ(status->bytes, 324u);  // to the end of the driver's run [512, 1024)

  EXPECT_FALSE(run(io::block_status(node, 8192, 1)));
  EXPECT_FALSE(run(io::block_status(node, 0, 0)));
}

// ---- copy-on-read ---------------------------------------------------------------------------

// A guest that rewrites its read buffer while a copy-on-read is in flight (another vCPU, or a
// malicious guest) must not change what is written into the image: the copy is written from a
// private buffer, never from the caller's.
TEST_F(RequestTest, CopyOnReadWritesWhatWasReadWhateverTheCallerDoesToItsBuffer) {
  constexpr uint64_t kSize = 256 * 1024;
  MemoryNode node(kSize, limits_for(512));
  node.data() = pattern(kSize, 7);
  const std::vector<uint8_t> original = node.data();
  node.unallocated = true;
  AlignedMemory guest(96 * 1024, 4096);
  uint8_t* const guest_begin = guest.data;
  uint8_t* const guest_end = guest.data + 96 * 1024;
  std::vector<uint8_t> written;
  node.before_write = [&](const IoVector& qiov) {
    for (const iovec& v : qiov.entries()) {
      auto* base = static_cast<uint8_t*>(v.iov_base);
      EXPECT_FALSE(base < guest_end && guest_begin < base + v.iov_len)
          << "the copy is written from the caller's buffer";
      // The guest scribbles over its buffer while the copy is being written.
      std::memset(guest.data, 0xee, 96 * 1024);
      written.insert(written.end(), base, base + v.iov_len);
    }
  };
  // 96 KiB at 16 KiB: the copy covers the 64 KiB clusters 0 and 1 (128 KiB).
  Result<void> read =
      run(io::preadv(node, 16 * 1024, IoVector(guest.data, 96 * 1024), kRequestCopyOnRead));
  ASSERT_TRUE(read) << read.error().message();
  EXPECT_GE(node.count(Op::kWrite), 1u);
  ASSERT_EQ(written.size(), 128u * 1024);
  EXPECT_EQ(0, std::memcmp(written.data(), original.data(), written.size()));
  EXPECT_EQ(0, std::memcmp(node.data().data(), original.data(), kSize));
}

}  // namespace
}  // namespace strata::block
