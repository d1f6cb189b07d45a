// qcow2 compressed writes (kRequestWriteCompressed) against QEMU's tools: images made by
// `qemu-img create` (zlib and zstd, several cluster sizes), written compressed through strata's
// request layer with parallel requests, read back by strata, then `qemu-img check` must be clean
// (exit 0: exact refcounts, no leaks), `qemu-img compare` must match the reference and
// `qemu-img map` must show compressed exactly the clusters `qemu-img convert -c` compresses.
// Skipped without qemu-img.

#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "aio/event_loop.h"
#include "aio/task_group.h"
#include "block/io/request.h"
#include "graph_test_util.h"
#include "qcow2_test_util.h"

namespace strata::block {
namespace {

using testing::DropAfterNode;
using testing::error_of;
using testing::have_qemu_img;
using testing::open_node;
using testing::slurp;
using testing::TempDir;
using testing::TestUser;

struct CompressedCase {
  const char* compression_type;
  uint32_t cluster_size;
};

class Qcow2CompressedWriteTest
    : public testing::Qcow2Fixture<::testing::TestWithParam<CompressedCase>> {
 protected:
  void SetUp() override {
    if (!have_qemu_img()) {
      GTEST_SKIP() << "qemu-img not installed";
    }
    Qcow2Fixture::SetUp();
  }

  std::shared_ptr<Node> open_rw(const std::string& image, const std::string& driver = "qcow2") {
    nlohmann::json options = {
        {"driver", driver},
        {"node-name", "n" + std::to_string(++counter_)},
        {"read-only", false},
        {"file", {{"driver", "file"}, {"filename", dir_path_ + "/" + image}}}};
    return open_with_writer(options, image);
  }
};

aio::Task<void> write_into(Node& node, uint64_t offset, std::string data, uint32_t flags,
                           Result<void>& result) {
  result = co_await io::pwrite(node, offset, data.data(), data.size(), flags);
}

// Compressible clusters (a repeated pattern), incompressible ones (random bytes), several
// parallel multi-cluster requests, a last cluster that ends at an image end that is not
// cluster-aligned, then normal overwrites of compressed clusters (which release their bytes).
TEST_P(Qcow2CompressedWriteTest, CheckCleanMapCompressedAndReadBack) {
  const CompressedCase c = GetParam();
  const uint64_t cs = c.cluster_size;
  const uint64_t clusters = 40;
  // The last cluster is partial (qcow2 sizes are multiples of 512, so not with 512-byte ones).
  const uint64_t disk_size = clusters * cs - (cs > 512 ? 1536 : 0);
  ASSERT_EQ(
      sh(std::string("qemu-img create -q -f qcow2 -o cluster_size=") + std::to_string(cs) +
         ",compression_type=" + c.compression_type + " img.qcow2 " + std::to_string(disk_size)),
      0);
  std::string reference(disk_size, '\0');
  std::mt19937_64 rng(cs);
  std::vector<bool> compressible(clusters);
  for (uint64_t i = 0; i < clusters; ++i) {
    const uint64_t n = std::min(cs, disk_size - i * cs);
    compressible[i] = i % 5 != 3;
    for (uint64_t b = 0; b < n; ++b) {
      reference[i * cs + b] =
          compressible[i] ? static_cast<char>('a' + (b / 100 + i) % 26) : static_cast<char>(rng());
    }
  }
  auto node = open_rw("img.qcow2");
  ASSERT_NE(node, nullptr);
  // Four parallel requests of 10 clusters each (the last one ends at the image end).
  std::vector<Result<void>> results(4);
  run([&]() -> aio::Task<void> {
    aio::TaskGroup group;
    for (uint64_t r = 0; r < 4; ++r) {
      const uint64_t offset = r * 10 * cs;
      const uint64_t n = std::min(10 * cs, disk_size - offset);
      group.spawn(write_into(*node, offset, reference.substr(offset, n), kRequestWriteCompressed,
                             results[r]));
    }
    co_await group.wait();
  }());
  for (const auto& result : results) {
    ASSERT_TRUE(result) << error_of(result);
  }
  // Strata reads its own compressed clusters back.
  std::string read_back(disk_size, '\0');
  Result<void> read = run(io::pread(*node, 0, read_back.data(), disk_size));
  ASSERT_TRUE(read) << error_of(read);
  EXPECT_TRUE(read_back == reference);
  {
    std::ofstream out(dir_path_ + "/written.raw", std::ios::binary);
    out.write(reference.data(), static_cast<std::streamsize>(reference.size()));
  }
  // Rewrite parts of two compressed clusters uncompressed.
  const std::string patch(std::min<uint64_t>(3000, cs - 200), 'Z');  // inside one cluster
  for (uint64_t at : {cs + 100, 7 * cs}) {
    Result<void> written = run(io::pwrite(*node, at, patch.data(), patch.size()));
    ASSERT_TRUE(written) << error_of(written);
    reference.replace(at, patch.size(), patch);
  }
  close(node);

  std::string output;
  EXPECT_EQ(sh("qemu-img check -f qcow2 img.qcow2", &output), 0) << output;
  {
    std::ofstream out(dir_path_ + "/reference.raw", std::ios::binary);
    out.write(reference.data(), static_cast<std::streamsize>(reference.size()));
  }
  EXPECT_EQ(sh("qemu-img compare -f qcow2 -F raw img.qcow2 reference.raw", &output), 0) << output;
  // Which guest clusters are compressed must be what qemu-img convert -c (one cluster at a time,
  // same libraries and parameters) makes of the same data, except the two rewritten clusters.
  auto compressed_clusters = [&](const std::string& image) {
    std::vector<bool> seen(clusters, false);
    std::string map;
    EXPECT_EQ(sh("qemu-img map -f qcow2 --output=json " + image, &map), 0) << map;
    for (const auto& extent : nlohmann::json::parse(map)) {
      const uint64_t start = extent["start"];
      const uint64_t end = start + extent["length"].get<uint64_t>();
      for (uint64_t at = start; extent.value("compressed", false) && at < end; at += cs) {
        seen[at / cs] = true;
      }
    }
    return seen;
  };
  ASSERT_EQ(
      sh(std::string("qemu-img convert -c -f raw -O qcow2 -o cluster_size=") + std::to_string(cs) +
             ",compression_type=" + c.compression_type + " written.raw qemu.qcow2",
         &output),
      0)
      << output;
  std::vector<bool> expected = compressed_clusters("qemu.qcow2");
  const std::vector<bool> seen = compressed_clusters("img.qcow2");
  EXPECT_GT(std::count(expected.begin(), expected.end(), true),
            static_cast<std::ptrdiff_t>(clusters / 2));
  expected[1] = expected[7] = false;
  for (uint64_t i = 0; i < clusters; ++i) {
    EXPECT_EQ(seen[i], expected[i]) << "guest cluster " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Types, Qcow2CompressedWriteTest,
    ::testing::Values(CompressedCase{"zlib", 65536}, CompressedCase{"zstd", 65536},
                      CompressedCase{"zlib", 4096}, CompressedCase{"zstd", 512}),
    [](const auto& info) {
      return std::string(info.param.compression_type) + std::to_string(info.param.cluster_size);
    });

// Compressed writes must cover whole clusters; drivers without compression refuse the flag.
TEST_P(Qcow2CompressedWriteTest, RefusesPartialClustersAndOtherDrivers) {
  const CompressedCase c = GetParam();
  if (c.cluster_size != 65536 || std::string(c.compression_type) != "zlib") {
    GTEST_SKIP() << "one configuration is enough";
  }
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 img.qcow2 1M && qemu-img create -q -f raw img.raw 1M"),
            0);
  const std::string data(65536, 'x');
  auto node = open_rw("img.qcow2");
  ASSERT_NE(node, nullptr);
  Result<void> written =
      run(io::pwrite(*node, 512, data.data(), data.size(), kRequestWriteCompressed));
  ASSERT_FALSE(written);
  EXPECT_EQ(written.error().errno_value(), EINVAL);
  close(node);
  auto raw = open_rw("img.raw", "raw");
  ASSERT_NE(raw, nullptr);
  written = run(io::pwrite(*raw, 0, data.data(), data.size(), kRequestWriteCompressed));
  ASSERT_FALSE(written);
  EXPECT_EQ(written.error().errno_value(), ENOTSUP);
  EXPECT_EQ(written.error().message(), "Compression is not supported for this drive");
  close(raw);
}

}  // namespace
}  // namespace strata::block
