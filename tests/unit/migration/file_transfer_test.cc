// Saving and restoring RAM through files: both forms, 0-8 multifd channels, direct-io, a file
// offset, a second save over the first, progress and cancellation.

#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <fstream>
#include <thread>
#include <tuple>

#include "migration/stream.h"
#include "migration/vmstate_file.h"
#include "test_memory.h"

namespace strata::migration {
namespace {

using testing::Guest;
using testing::TempDir;

uint64_t size_of(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

std::vector<std::pair<std::string, uint64_t>> three_blocks() {
  // Lengths that are not multiples of a chunk or of 64 pages.
  return {{"pc.ram", (9 << 20) + 3 * 4096}, {"/rom@etc/acpi/tables", 128 << 10}, {"pc.bios", 4096}};
}

// mapped-ram, channels, direct-io
using Config = std::tuple<bool, unsigned, bool>;

std::string config_name(const ::testing::TestParamInfo<Config>& info) {
  const auto& [mapped_ram, channels, direct_io] = info.param;
  return std::string(mapped_ram ? "MappedRam" : "Streaming") + std::to_string(channels) +
         "Channels" + (direct_io ? "DirectIo" : "");
}

class RoundTripTest : public ::testing::TestWithParam<Config> {};

TEST_P(RoundTripTest, RestoresEveryByte) {
  auto [mapped_ram, channels, direct_io] = GetParam();
  TempDir dir;
  Guest source(three_blocks(), 42);
  TransferOptions options;
  options.mapped_ram = mapped_ram;
  options.multifd_channels = channels;
  options.direct_io = direct_io;
  const std::string path = dir.file("vm.state");
  auto saved = save_to_file(source.blocks(), path, options);
  if (!saved.ok() && direct_io && saved.error().kind() == ErrorKind::kUnsupported) {
    GTEST_SKIP() << "the file system refuses O_DIRECT: " << saved.error().message();
  }
  ASSERT_TRUE(saved.ok()) << saved.error().message();
  EXPECT_EQ(saved->ram_total, source.blocks()[0].length + (128 << 10) + 4096);
  EXPECT_GT(saved->pages_present, 0u);
  EXPECT_LT(saved->pages_present, saved->pages_total);
  EXPECT_EQ(size_of(path), saved->file_size);

  Guest destination = source.empty_twin();
  auto loaded = load_from_file(destination.blocks(), path, options);
  ASSERT_TRUE(loaded.ok()) << loaded.error().message();
  EXPECT_EQ(loaded->pages_present, saved->pages_present);
  EXPECT_TRUE(destination.same_as(source));

  auto description = describe_file(path, 0, true);
  ASSERT_TRUE(description.ok()) << description.error().message();
  EXPECT_EQ(description->header.mapped_ram(), mapped_ram);
  ASSERT_EQ(description->blocks.size(), 3u);
  uint64_t present = 0;
  for (const BlockRecord& block : description->blocks) {
    present += block.present_pages;
  }
  EXPECT_EQ(present, saved->pages_present);
}

INSTANTIATE_TEST_SUITE_P(Forms, RoundTripTest,
                         ::testing::Values(Config{false, 0, false}, Config{true, 0, false},
                                           Config{true, 1, false}, Config{true, 2, false},
                                           Config{true, 4, false}, Config{true, 8, false},
                                           Config{true, 1, true}, Config{true, 2, true},
                                           Config{true, 4, true}, Config{true, 8, true}),
                         config_name);

TEST(FileTransferTest, MappedRamFileSizeIsBoundedByRam) {
  TempDir dir;
  Guest source({{"pc.ram", 16 << 20}}, 1);
  const std::string path = dir.file("vm.state");
  auto saved = save_to_file(source.blocks(), path, TransferOptions{});
  ASSERT_TRUE(saved.ok()) << saved.error().message();
  // Header, table and bitmap pad to the first 1 MiB; pages; the 24-byte END.
  EXPECT_EQ(size_of(path), (1u << 20) + (16u << 20) + 24);
}

TEST(FileTransferTest, OffsetKeepsTheBytesBeforeIt) {
  TempDir dir;
  const std::string path = dir.file("vm.state");
  {
    std::ofstream prefix(path, std::ios::binary);
    prefix << std::string(5000, 'P');
  }
  Guest source(three_blocks(), 7);
  for (bool mapped_ram : {true, false}) {
    TransferOptions options;
    options.mapped_ram = mapped_ram;
    options.multifd_channels = mapped_ram ? 2 : 0;
    options.offset = 4096;
    auto saved = save_to_file(source.blocks(), path, options);
    ASSERT_TRUE(saved.ok()) << saved.error().message();
    std::ifstream in(path, std::ios::binary);
    std::string head(4096, '\0');
    in.read(head.data(), 4096);
    EXPECT_EQ(head, std::string(4096, 'P'));

    Guest destination = source.empty_twin();
    auto loaded = load_from_file(destination.blocks(), path, options);
    ASSERT_TRUE(loaded.ok()) << loaded.error().message();
    EXPECT_TRUE(destination.same_as(source));

    // The offset is part of the stream: another offset does not find it.
    options.offset = 0;
    EXPECT_FALSE(load_from_file(destination.blocks(), path, options).ok());
    EXPECT_TRUE(describe_file(path, 4096, false).ok());
  }
}

TEST(FileTransferTest, SecondSaveOverTheFirstForgetsPagesThatTurnedZero) {
  TempDir dir;
  const std::string path = dir.file("vm.state");
  Guest source({{"pc.ram", 8 << 20}, {"vram", 1 << 20}}, 3, 0);  // no zero pages at first
  TransferOptions options;
  options.multifd_channels = 4;
  auto first = save_to_file(source.blocks(), path, options);
  ASSERT_TRUE(first.ok()) << first.error().message();
  EXPECT_EQ(first->pages_present, first->pages_total);
  const uint64_t first_size = size_of(path);

  // Zero every third page and rewrite a few others, then save again into the same file.
  RamBlock& ram = source.blocks()[0];
  for (uint64_t page = 0; page < ram.length / 4096; page += 3) {
    std::memset(ram.host + page * 4096, 0, 4096);
  }
  std::memset(ram.host + 4096 + 100, 0x5A, 300);
  std::memset(source.blocks()[1].host, 0, source.blocks()[1].length);
  auto second = save_to_file(source.blocks(), path, options);
  ASSERT_TRUE(second.ok()) << second.error().message();
  EXPECT_LT(second->pages_present, first->pages_present);
  EXPECT_EQ(size_of(path), first_size);  // same fixed layout, no growth

  Guest destination = source.empty_twin();
  auto loaded = load_from_file(destination.blocks(), path, options);
  ASSERT_TRUE(loaded.ok()) << loaded.error().message();
  EXPECT_TRUE(destination.same_as(source));
}

TEST(FileTransferTest, SmallerSaveShrinksTheFile) {
  TempDir dir;
  const std::string path = dir.file("vm.state");
  Guest big({{"pc.ram", 8 << 20}}, 3);
  Guest small({{"pc.ram", 2 << 20}}, 4);
  for (bool mapped_ram : {true, false}) {
    TransferOptions options;
    options.mapped_ram = mapped_ram;
    ASSERT_TRUE(save_to_file(big.blocks(), path, options).ok());
    auto saved = save_to_file(small.blocks(), path, options);
    ASSERT_TRUE(saved.ok());
    EXPECT_EQ(size_of(path), saved->file_size);
    EXPECT_LT(size_of(path), 4u << 20);
    Guest destination = small.empty_twin();
    ASSERT_TRUE(load_from_file(destination.blocks(), path, options).ok());
    EXPECT_TRUE(destination.same_as(small));
  }
}

TEST(FileTransferTest, OptionsFollowQemuRules) {
  TempDir dir;
  Guest source({{"pc.ram", 1 << 20}}, 5);
  TransferOptions options;
  options.direct_io = true;  // without multifd
  auto saved = save_to_file(source.blocks(), dir.file("a"), options);
  ASSERT_FALSE(saved.ok());
  EXPECT_EQ(saved.error().message(), "direct-io needs the mapped-ram and multifd capabilities");
  options = TransferOptions{};
  options.mapped_ram = false;
  options.multifd_channels = 2;
  saved = save_to_file(source.blocks(), dir.file("a"), options);
  ASSERT_FALSE(saved.ok());
  EXPECT_EQ(saved.error().message(), "multifd channels to a file need the mapped-ram capability");
}

TEST(FileTransferTest, DirectIoOnTmpfsGivesQemusError) {
  struct stat st;
  if (::stat("/dev/shm", &st) != 0) {
    GTEST_SKIP() << "no /dev/shm";
  }
  char pattern[] = "/dev/shm/strata-mig-XXXXXX";
  int fd = ::mkstemp(pattern);
  ASSERT_GE(fd, 0);
  ::close(fd);
  Guest source({{"pc.ram", 1 << 20}}, 5);
  TransferOptions options;
  options.multifd_channels = 2;
  options.direct_io = true;
  auto saved = save_to_file(source.blocks(), pattern, options);
  ::unlink(pattern);
  if (saved.ok()) {
    GTEST_SKIP() << "this tmpfs accepts O_DIRECT";
  }
  EXPECT_EQ(saved.error().kind(), ErrorKind::kUnsupported);
  EXPECT_EQ(saved.error().message(), "Failed to save to '" + std::string(pattern) +
                                         "': Could not open '" + pattern +
                                         "': filesystem does not support O_DIRECT");
}

TEST(FileTransferTest, ProgressReachesTheTotalAndCancelStops) {
  TempDir dir;
  Guest source({{"pc.ram", 32 << 20}}, 9);
  TransferOptions options;
  options.multifd_channels = 2;
  std::atomic<uint64_t> last{0};
  std::atomic<int> calls{0};
  options.progress = [&](uint64_t done, uint64_t total) {
    EXPECT_EQ(total, 32u << 20);
    EXPECT_GE(done, last.load());
    last = done;
    ++calls;
  };
  auto saved = save_to_file(source.blocks(), dir.file("a"), options);
  ASSERT_TRUE(saved.ok());
  EXPECT_EQ(last.load(), 32u << 20);
  EXPECT_GE(calls.load(), 4);

  std::atomic<bool> cancel{false};
  options.progress = [&](uint64_t, uint64_t) { cancel = true; };
  options.cancel = &cancel;
  saved = save_to_file(source.blocks(), dir.file("b"), options);
  ASSERT_FALSE(saved.ok());
  EXPECT_EQ(saved.error().kind(), ErrorKind::kCancelled);
  // An interrupted save leaves no loadable header.
  Guest destination = source.empty_twin();
  EXPECT_FALSE(load_from_file(destination.blocks(), dir.file("b"), TransferOptions{}).ok());
}

TEST(StreamTransferTest, RoundTripOverASocket) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  Guest source(three_blocks(), 11);
  Guest destination = source.empty_twin();
  Result<TransferStats> saved = Error(ErrorKind::kIo, "not run");
  std::thread writer([&] {
    FdSink sink(fds[0]);
    saved = save_to_stream(source.blocks(), sink, 0, TransferOptions{});
    ::shutdown(fds[0], SHUT_WR);
  });
  FdSource source_channel(fds[1]);
  auto loaded = load_from_stream(destination.blocks(), source_channel, TransferOptions{});
  writer.join();
  ::close(fds[0]);
  ::close(fds[1]);
  ASSERT_TRUE(saved.ok()) << saved.error().message();
  ASSERT_TRUE(loaded.ok()) << loaded.error().message();
  EXPECT_EQ(loaded->bytes_io, saved->bytes_io);
  EXPECT_EQ(loaded->pages_present, saved->pages_present);
  EXPECT_TRUE(destination.same_as(source));
}

}  // namespace
}  // namespace strata::migration
