// The file driver's data path through the request layer (block/io) on a real io_uring loop:
// reads, writes, write-zeroes, discard, block status over holes, truncate, with and without
// cache.direct; and the raw driver's offset/size window over a file.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "aio/event_loop.h"
#include "block/drivers/file/file_node.h"
#include "block/io/request.h"
#include "graph_test_util.h"

namespace strata::block {
namespace {

using testing::error_of;
using testing::open_node;
using testing::TempDir;
using testing::TestUser;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;

std::vector<uint8_t> pattern(size_t size, uint8_t seed) {
  std::vector<uint8_t> out(size);
  for (size_t i = 0; i < size; ++i) {
    out[i] = static_cast<uint8_t>(seed + i * 7 + i / 251);
  }
  return out;
}

// The file's bytes as another process would read them.
std::vector<uint8_t> file_bytes(const std::string& path, uint64_t offset, size_t size) {
  std::vector<uint8_t> out(size, 0xee);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0 ||
      ::pread(fd, out.data(), size, static_cast<off_t>(offset)) != static_cast<ssize_t>(size)) {
    ADD_FAILURE() << "reading " << path;
  }
  if (fd >= 0) {
    ::close(fd);
  }
  return out;
}

uint64_t file_size(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

class FileIoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(dir_.ok());
    auto loop = aio::EventLoop::create();
    ASSERT_TRUE(loop) << loop.error().message();
    loop_ = std::move(loop).value();
  }
  void TearDown() override {
    if (root_) {
      graph_.detach_root(std::move(root_));
    }
  }

  // Opens `options` and attaches a user taking everything (like a writable export that may
  // resize). Returns nullptr with a skip or failure recorded.
  std::shared_ptr<Node> open_with_user(const nlohmann::json& options) {
    auto node = open_node(graph_, options);
    if (!node) {
      ADD_FAILURE() << node.error().message();
      return nullptr;
    }
    auto root = graph_.attach_root(user_, *node, "root", kRoleImage, kPermAll, kPermAll);
    if (!root) {
      ADD_FAILURE() << root.error().message();
      return nullptr;
    }
    root_ = std::move(root).value();
    return std::move(node).value();
  }

  template <typename T>
  T run(aio::Task<T> task) {
    return loop_->block_on(std::move(task));
  }
  Result<void> write(Node& node, uint64_t offset, const std::vector<uint8_t>& data) {
    return run(io::pwrite(node, offset, data.data(), data.size()));
  }
  std::vector<uint8_t> read(Node& node, uint64_t offset, size_t size) {
    std::vector<uint8_t> out(size, 0xee);
    Result<void> done = run(io::pread(node, offset, out.data(), size));
    EXPECT_TRUE(done) << error_of(done);
    return out;
  }
  BlockStatus status(Node& node, uint64_t offset, uint64_t bytes) {
    Result<BlockStatus> result = run(io::block_status(node, offset, bytes));
    EXPECT_TRUE(result) << error_of(result);
    return result ? *result : BlockStatus{};
  }

  TempDir dir_;
  std::unique_ptr<aio::EventLoop> loop_;
  Graph graph_;
  TestUser user_{"block device 'test'"};
  std::unique_ptr<Child> root_;
};

bool is_hole(const BlockStatus& s) {
  return (s.flags & BlockStatus::kZero) != 0 && (s.flags & BlockStatus::kData) == 0;
}
bool is_data(const BlockStatus& s) {
  return (s.flags & BlockStatus::kData) != 0 && (s.flags & BlockStatus::kZero) == 0;
}

class FileIoModes : public FileIoTest, public ::testing::WithParamInterface<bool> {};

TEST_P(FileIoModes, ReadWriteZeroesDiscardStatusTruncate) {
  const bool direct = GetParam();
  std::string path = dir_.file("img", kMiB);
  nlohmann::json options = {{"driver", "file"},
                            {"node-name", "f"},
                            {"filename", path},
                            {"discard", "unmap"},
                            {"cache", {{"direct", direct}}}};
  if (direct) {
    auto probe = open_node(graph_, options);
    if (!probe && probe.error().errno_value() == EINVAL) {
      GTEST_SKIP() << "O_DIRECT refused here: " << probe.error().message();
    }
  }
  std::shared_ptr<Node> node = open_with_user(options);
  ASSERT_NE(node, nullptr);
  auto* file = dynamic_cast<FileNode*>(node.get());
  ASSERT_NE(file, nullptr);
  EXPECT_EQ((::fcntl(file->data_fd(), F_GETFL) & O_DIRECT) != 0, direct);
  if (direct) {
    // Probed like QEMU's raw_probe_alignment: a power of two from 512 to 4096.
    uint32_t align = node->limits().request_alignment;
    EXPECT_GE(align, 512u);
    EXPECT_LE(align, 4096u);
    EXPECT_EQ(align & (align - 1), 0u);
    EXPECT_GE(node->limits().memory_alignment, 512u);
  } else {
    EXPECT_EQ(node->limits().request_alignment, 1u);
  }
  EXPECT_EQ(node->length(), kMiB);

  // A fresh sparse file is one hole.
  BlockStatus whole = status(*node, 0, kMiB);
  EXPECT_TRUE(is_hole(whole)) << whole.flags;
  EXPECT_EQ(whole.bytes, kMiB);

  // Data in the middle: a hole, then data, then a hole again.
  std::vector<uint8_t> data = pattern(4 * kKiB, 1);
  ASSERT_TRUE(write(*node, 64 * kKiB, data));
  EXPECT_EQ(read(*node, 64 * kKiB, data.size()), data);
  EXPECT_EQ(file_bytes(path, 64 * kKiB, data.size()), data);
  BlockStatus head = status(*node, 0, kMiB);
  EXPECT_TRUE(is_hole(head)) << head.flags;
  EXPECT_EQ(head.bytes, 64 * kKiB);
  BlockStatus middle = status(*node, 64 * kKiB, kMiB - 64 * kKiB);
  EXPECT_TRUE(is_data(middle)) << middle.flags;
  EXPECT_GE(middle.bytes, 4 * kKiB);
  EXPECT_LT(middle.bytes, kMiB - 64 * kKiB);
  BlockStatus tail = status(*node, 64 * kKiB + middle.bytes, kMiB);
  EXPECT_TRUE(is_hole(tail)) << tail.flags;

  // An unaligned write is merged into the blocks around it.
  std::vector<uint8_t> small = pattern(100, 9);
  ASSERT_TRUE(write(*node, 64 * kKiB + 1000, small));
  std::vector<uint8_t> expected = data;
  std::memcpy(expected.data() + 1000, small.data(), small.size());
  EXPECT_EQ(read(*node, 64 * kKiB, data.size()), expected);
  EXPECT_EQ(file_bytes(path, 64 * kKiB, data.size()), expected);

  // Write-zeroes allowed to unmap punches a hole (discard=unmap).
  auto zeroed = run(io::pwrite_zeroes(*node, 64 * kKiB, 4 * kKiB, kRequestMayUnmap));
  ASSERT_TRUE(zeroed) << error_of(zeroed);
  EXPECT_EQ(read(*node, 64 * kKiB, 4 * kKiB), std::vector<uint8_t>(4 * kKiB, 0));
  EXPECT_TRUE(is_hole(status(*node, 64 * kKiB, 4 * kKiB)));

  // Discard punches a hole too.
  ASSERT_TRUE(write(*node, 128 * kKiB, data));
  EXPECT_TRUE(is_data(status(*node, 128 * kKiB, 4 * kKiB)));
  auto discarded = run(io::pdiscard(*node, 128 * kKiB, 4 * kKiB));
  ASSERT_TRUE(discarded) << error_of(discarded);
  EXPECT_TRUE(is_hole(status(*node, 128 * kKiB, 4 * kKiB)));
  EXPECT_EQ(file_bytes(path, 128 * kKiB, 4 * kKiB), std::vector<uint8_t>(4 * kKiB, 0));

  auto flushed = run(io::flush(*node));
  EXPECT_TRUE(flushed) << error_of(flushed);

  // Grow, then shrink.
  auto grown = run(io::truncate(*node, 2 * kMiB, true));
  ASSERT_TRUE(grown) << error_of(grown);
  EXPECT_EQ(node->length(), 2 * kMiB);
  EXPECT_EQ(file_size(path), 2 * kMiB);
  EXPECT_TRUE(is_hole(status(*node, kMiB, kMiB)));
  auto shrunk = run(io::truncate(*node, 512 * kKiB, true));
  ASSERT_TRUE(shrunk) << error_of(shrunk);
  EXPECT_EQ(node->length(), 512 * kKiB);
  EXPECT_EQ(file_size(path), 512 * kKiB);
}

INSTANTIATE_TEST_SUITE_P(Cache, FileIoModes, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "Direct" : "Buffered";
                         });

// discard=ignore (the default) keeps the data: QEMU passes discards down only with BDRV_O_UNMAP.
TEST_F(FileIoTest, DiscardIgnoredByDefault) {
  std::string path = dir_.file("img", kMiB);
  auto node = open_with_user({{"driver", "file"}, {"node-name", "f"}, {"filename", path}});
  ASSERT_NE(node, nullptr);
  std::vector<uint8_t> data = pattern(4 * kKiB, 3);
  ASSERT_TRUE(write(*node, 0, data));
  auto discarded = run(io::pdiscard(*node, 0, 4 * kKiB));
  ASSERT_TRUE(discarded) << error_of(discarded);
  EXPECT_EQ(read(*node, 0, data.size()), data);
  EXPECT_TRUE(is_data(status(*node, 0, 4 * kKiB)));
}

TEST_F(FileIoTest, ReadOnlyNodeRefusesWrites) {
  std::string path = dir_.file("img", kMiB);
  auto node = open_node(graph_, {{"driver", "file"}, {"filename", path}, {"read-only", true}});
  ASSERT_TRUE(node) << error_of(node);
  std::vector<uint8_t> data = pattern(512, 4);
  auto written = write(**node, 0, data);
  ASSERT_FALSE(written);
  EXPECT_EQ(written.error().message(), "Block node is read-only");
  EXPECT_EQ(file_bytes(path, 0, 512), std::vector<uint8_t>(512, 0));
}

// ---- raw window ---------------------------------------------------------------------------------

class RawWindowTest : public FileIoTest {
 protected:
  void SetUp() override {
    FileIoTest::SetUp();
    path_ = dir_.file("img", kMiB);
    contents_ = pattern(kMiB, 5);
    int fd = ::open(path_.c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pwrite(fd, contents_.data(), contents_.size(), 0),
              static_cast<ssize_t>(contents_.size()));
    ::close(fd);
  }
  nlohmann::json raw(nlohmann::json window) const {
    window["driver"] = "raw";
    window["node-name"] = "r";
    window["file"] = {{"driver", "file"}, {"node-name", "f"}, {"filename", path_}};
    return window;
  }

  std::string path_;
  std::vector<uint8_t> contents_;
};

TEST_F(RawWindowTest, ReadsAndWritesAreOffsetByTheWindow) {
  auto node = open_with_user(raw({{"offset", 4096}, {"size", 8192}}));
  ASSERT_NE(node, nullptr);
  EXPECT_EQ(node->length(), 8192u);
  EXPECT_EQ(read(*node, 0, 8192),
            std::vector<uint8_t>(contents_.begin() + 4096, contents_.begin() + 4096 + 8192));

  std::vector<uint8_t> data(1000, 0xab);
  ASSERT_TRUE(write(*node, 100, data));
  std::vector<uint8_t> expected(contents_.begin(), contents_.begin() + 16384);
  std::fill(expected.begin() + 4096 + 100, expected.begin() + 4096 + 1100, 0xab);
  EXPECT_EQ(file_bytes(path_, 0, 16384), expected);
  EXPECT_EQ(read(*node, 0, 8192),
            std::vector<uint8_t>(expected.begin() + 4096, expected.begin() + 4096 + 8192));
}

TEST_F(RawWindowTest, RequestsPastTheWindowFail) {
  auto node = open_with_user(raw({{"offset", 4096}, {"size", 8192}}));
  ASSERT_NE(node, nullptr);
  std::vector<uint8_t> buffer(1024, 0);
  Result<void> read_past = run(io::pread(*node, 8192 - 512, buffer.data(), buffer.size()));
  ASSERT_FALSE(read_past);
  EXPECT_EQ(read_past.error().errno_value(), EIO);

  std::vector<uint8_t> data(1024, 0xcd);
  Result<void> write_past = write(*node, 8192 - 512, data);
  ASSERT_FALSE(write_past);
  EXPECT_EQ(write_past.error().errno_value(), EIO);
  auto zeroes_past = run(io::pwrite_zeroes(*node, 8192, 512));
  EXPECT_FALSE(zeroes_past);
  // Nothing reached the file.
  EXPECT_EQ(file_bytes(path_, 0, kMiB), contents_);

  auto resized = run(io::truncate(*node, 16384, true));
  ASSERT_FALSE(resized);
  EXPECT_EQ(resized.error().message(), "Cannot resize fixed-size raw disks");
}

TEST_F(RawWindowTest, OffsetOnlyWindowEndsWithTheFile) {
  auto node = open_with_user(raw({{"offset", 4096}}));
  ASSERT_NE(node, nullptr);
  EXPECT_EQ(node->length(), kMiB - 4096);
  EXPECT_EQ(read(*node, kMiB - 8192, 4096),
            std::vector<uint8_t>(contents_.end() - 4096, contents_.end()));
  // Resizing sets the file to offset + new size (observed: block_resize of raw offset=4096 to
  // 8192 leaves a 12288-byte file).
  auto resized = run(io::truncate(*node, 8192, true));
  ASSERT_TRUE(resized) << error_of(resized);
  EXPECT_EQ(node->length(), 8192u);
  EXPECT_EQ(file_size(path_), 4096u + 8192u);
}

TEST_F(RawWindowTest, WindowErrors) {
  struct Case {
    nlohmann::json window;
    std::string message;
  };
  const Case cases[] = {
      {{{"offset", 2 * kMiB}},
       "Offset (2097152) cannot be greater than size of the containing file (1048576)"},
      {{{"offset", 512}, {"size", kMiB}},
       "The sum of offset (512) and size (1048576) has to be smaller or equal to the  actual "
       "size of the containing file (1048576)"},
      {{{"size", 1000}}, "Specified size is not multiple of 512"},
      {{{"offset", -1}}, "Value '-1' is out of range for parameter 'offset'"},
      {{{"size", -512}}, "Value '-512' is out of range for parameter 'size'"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.window.dump());
    auto node = open_node(graph_, raw(c.window));
    ASSERT_FALSE(node);
    EXPECT_EQ(node.error().message(), c.message);
    EXPECT_TRUE(graph_.nodes().empty());
  }
  // The whole file is a valid window.
  auto whole = open_node(graph_, raw({{"offset", 0}, {"size", kMiB}}));
  EXPECT_TRUE(whole) << error_of(whole);
}

}  // namespace
}  // namespace strata::block
