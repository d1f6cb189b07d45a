// The qcow2 writer against QEMU's own tools: images made by `qemu-img create`, written through
// strata's request layer, must pass `qemu-img check` (exit 0: no leaks, no corruption) and read
// back (`qemu-img compare`) exactly like a raw file that received the same writes. A file layer
// that drops every write after the k-th stands for a crash: the persisted image may leak clusters
// (check exits 3) but must never be corrupt (exit 2). Skipped when qemu-img is not installed.

#include <sys/wait.h>

#include <cstdio>
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
#include "block/drivers/qcow2/check.h"
#include "block/drivers/qcow2/qcow2_node.h"
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

struct Write {
  uint64_t offset;
  std::vector<uint8_t> data;
};

// Random writes of 512 bytes to 3 clusters at unaligned offsets; about a third rewrite a range an
// earlier write touched.
std::vector<Write> random_workload(uint32_t seed, uint64_t disk_size, uint64_t cluster_size,
                                   size_t count) {
  std::mt19937_64 rng(seed);
  std::vector<Write> writes;
  const uint64_t max_bytes = std::min<uint64_t>(3 * cluster_size, disk_size / 2);
  for (size_t i = 0; i < count; ++i) {
    Write w;
    const uint64_t bytes = 512 + rng() % (max_bytes - 511);
    if (!writes.empty() && rng() % 3 == 0) {
      const Write& earlier = writes[rng() % writes.size()];
      w.offset = std::min(earlier.offset + rng() % 1024, disk_size - bytes);
    } else {
      w.offset = rng() % (disk_size - bytes + 1);
    }
    w.data.resize(bytes);
    const auto fill = static_cast<uint8_t>(rng());
    for (size_t b = 0; b < bytes; ++b) {
      w.data[b] = static_cast<uint8_t>(fill + b / 512 + (b % 7 == 0 ? b : 0));
    }
    writes.push_back(std::move(w));
  }
  return writes;
}

class Qcow2WriteTest : public testing::Qcow2Fixture<> {
 protected:
  void SetUp() override {
    if (!have_qemu_img()) {
      GTEST_SKIP() << "qemu-img not installed";
    }
    Qcow2Fixture::SetUp();
  }

  // Opens `image` read-write (through node `file` when given) and attaches a writing root.
  std::shared_ptr<Node> open_rw(const std::string& image, nlohmann::json extra = {},
                                const std::string& file_node = "") {
    nlohmann::json options = {
        {"driver", "qcow2"}, {"node-name", "q" + std::to_string(++counter_)}, {"read-only", false}};
    if (file_node.empty()) {
      options["file"] = {{"driver", "file"}, {"filename", dir_path_ + "/" + image}};
    } else {
      options["file"] = file_node;
    }
    if (extra.is_object()) {
      options.update(extra);
    }
    return open_with_writer(options, image);
  }

  // Applies `writes` to `node` one after the other (stops at the first error, which it reports
  // unless `expect_ok` is false).
  void apply(Node& node, const std::vector<Write>& writes) {
    for (const Write& w : writes) {
      Result<void> done = run(io::pwrite(node, w.offset, w.data.data(), w.data.size()));
      ASSERT_TRUE(done) << "write at " << w.offset << "+" << w.data.size() << ": "
                        << error_of(done);
    }
  }

  static void apply(std::string& reference, const std::vector<Write>& writes) {
    for (const Write& w : writes) {
      std::copy(w.data.begin(), w.data.end(), reference.begin() + static_cast<ptrdiff_t>(w.offset));
    }
  }

  void write_file(const std::string& name, const std::string& contents) {
    std::ofstream out(dir_path_ + "/" + name, std::ios::binary | std::ios::trunc);
    out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
  }

  // qemu-img check's exit status (0 clean, 2 corrupt, 3 leaks).
  int check(const std::string& image, std::string* output = nullptr) {
    return sh("qemu-img check -f qcow2 '" + image + "'", output);
  }

  void expect_clean_and_equal(const std::string& image, const std::string& reference) {
    std::string output;
    EXPECT_EQ(check(image, &output), 0) << output;
    write_file("reference.raw", reference);
    EXPECT_EQ(sh("qemu-img compare -f qcow2 -F raw '" + image + "' reference.raw", &output), 0)
        << output;
  }

  // refcount_table_clusters from the image header (qcow2.rst: bytes 56-59).
  uint32_t refcount_table_clusters(const std::string& image) {
    const std::string head = slurp(dir_path_ + "/" + image).substr(0, 64);
    return (uint32_t{static_cast<uint8_t>(head[56])} << 24) |
           (uint32_t{static_cast<uint8_t>(head[57])} << 16) |
           (uint32_t{static_cast<uint8_t>(head[58])} << 8) |
           uint32_t{static_cast<uint8_t>(head[59])};
  }
};

struct RandomCase {
  uint32_t cluster_size;
  uint32_t refcount_bits;
  bool backing;
  uint64_t disk_size;
  size_t writes;
};

class Qcow2RandomWriteTest : public Qcow2WriteTest,
                             public ::testing::WithParamInterface<RandomCase> {};

TEST_P(Qcow2RandomWriteTest, CheckCleanAndContentsMatchRawReference) {
  const RandomCase c = GetParam();
  std::string reference(c.disk_size, '\0');
  std::string create =
      "qemu-img create -q -f qcow2 -o cluster_size=" + std::to_string(c.cluster_size) +
      ",refcount_bits=" + std::to_string(c.refcount_bits);
  if (c.backing) {
    std::mt19937_64 rng(c.cluster_size + c.refcount_bits);
    for (size_t i = 0; i < reference.size(); i += 512) {
      std::fill_n(reference.begin() + static_cast<ptrdiff_t>(i), 512, static_cast<char>(rng()));
    }
    write_file("base.raw", reference);
    create += " -b base.raw -F raw";
  }
  ASSERT_EQ(sh(create + " img.qcow2 " + std::to_string(c.disk_size)), 0);
  const auto writes =
      random_workload(c.cluster_size ^ c.refcount_bits, c.disk_size, c.cluster_size, c.writes);
  auto node = open_rw("img.qcow2");
  ASSERT_NE(node, nullptr);
  // Half the writes, close, reopen, the rest: the second open reads what the first wrote.
  const std::vector<Write> first(writes.begin(),
                                 writes.begin() + static_cast<ptrdiff_t>(writes.size() / 2));
  const std::vector<Write> second(writes.begin() + static_cast<ptrdiff_t>(writes.size() / 2),
                                  writes.end());
  apply(*node, first);
  close(node);
  node = open_rw("img.qcow2");
  ASSERT_NE(node, nullptr);
  apply(*node, second);
  apply(reference, writes);
  // strata reads back what it wrote.
  std::string actual(c.disk_size, '\0');
  Result<void> read = run(io::pread(*node, 0, actual.data(), actual.size()));
  ASSERT_TRUE(read) << error_of(read);
  EXPECT_TRUE(actual == reference) << "strata reads back different data";
  close(node);
  expect_clean_and_equal("img.qcow2", reference);
}

INSTANTIATE_TEST_SUITE_P(
    Geometries, Qcow2RandomWriteTest,
    ::testing::Values(
        RandomCase{512, 16, false, 2 << 20, 300}, RandomCase{512, 1, true, 2 << 20, 300},
        RandomCase{512, 64, false, 2 << 20, 300}, RandomCase{4096, 16, true, 8 << 20, 300},
        RandomCase{4096, 1, false, 8 << 20, 200}, RandomCase{4096, 64, true, 8 << 20, 200},
        RandomCase{65536, 16, false, 32 << 20, 150}, RandomCase{65536, 64, true, 32 << 20, 100},
        RandomCase{65536, 1, false, 32 << 20, 100}, RandomCase{2 << 20, 16, true, 64 << 20, 30},
        RandomCase{2 << 20, 1, false, 64 << 20, 30}, RandomCase{2 << 20, 64, false, 64 << 20, 30}),
    [](const ::testing::TestParamInfo<RandomCase>& info) {
      const RandomCase& c = info.param;
      return "cluster" + std::to_string(c.cluster_size) + "_refcount" +
             std::to_string(c.refcount_bits) + (c.backing ? "_backing" : "");
    });

// 64 MiB written with 512-byte clusters: the refcount table (one cluster, 64 entries of 256
// clusters each with 16-bit refcounts: 8 MiB) has to grow several times.
TEST_F(Qcow2WriteTest, RefcountTableGrowsForLargeWrites) {
  const uint64_t disk_size = 128ull << 20;
  ASSERT_EQ(
      sh("qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 " + std::to_string(disk_size)),
      0);
  std::string reference(disk_size, '\0');
  std::vector<Write> writes;
  std::mt19937_64 rng(7);
  for (uint64_t i = 0; i < 64; ++i) {
    Write w;
    w.offset = (disk_size / 64) * i + (rng() % 4096);
    w.data.assign(1 << 20, static_cast<uint8_t>(i + 1));
    writes.push_back(std::move(w));
  }
  auto node = open_rw("img.qcow2");
  ASSERT_NE(node, nullptr);
  apply(*node, writes);
  apply(reference, writes);
  close(node);
  expect_clean_and_equal("img.qcow2", reference);
  // The table moved (it started as one cluster) and qemu-img check found it consistent.
  EXPECT_GT(refcount_table_clusters("img.qcow2"), 1u);
}

// Overwrites of compressed and zero clusters allocate new clusters and free the old ones.
TEST_F(Qcow2WriteTest, OverwritesCompressedAndZeroClusters) {
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 -o cluster_size=4096 src.qcow2 1M && "
               "qemu-io -f qcow2 -c 'write -P 0x11 0 256k' -c 'write -z 256k 64k' src.qcow2 && "
               "qemu-img convert -c -O qcow2 -o cluster_size=4096 src.qcow2 img.qcow2 && "
               "qemu-io -f qcow2 -c 'write -z 64k 8k' -c 'write -P 0x22 512k 16k' "
               "-c 'write -z 512k 4k' img.qcow2"),
            0);
  std::string reference(1 << 20, '\0');
  std::fill_n(reference.begin(), 256 << 10, '\x11');
  std::fill_n(reference.begin() + (64 << 10), 8 << 10, '\0');
  std::fill_n(reference.begin() + (512 << 10) + 4096, 12 << 10, '\x22');
  std::vector<Write> writes;
  for (uint64_t at : {uint64_t{1000}, uint64_t{64 << 10} + 100, uint64_t{(512 << 10) + 10},
                      uint64_t{(256 << 10) + 3000}}) {
    writes.push_back(Write{at, std::vector<uint8_t>(6000, 0x5a)});
  }
  auto node = open_rw("img.qcow2");
  ASSERT_NE(node, nullptr);
  apply(*node, writes);
  apply(reference, writes);
  close(node);
  expect_clean_and_equal("img.qcow2", reference);
}

// Write-zeroes of whole clusters sets zero flags (with and without unmap), discard drops clusters;
// check stays clean and the contents match.
TEST_F(Qcow2WriteTest, WriteZeroesAndDiscard) {
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 -o cluster_size=4096 img.qcow2 1M"), 0);
  std::string reference(1 << 20, '\0');
  std::vector<Write> writes{Write{0, std::vector<uint8_t>(256 << 10, 0x33)}};
  auto node = open_rw("img.qcow2", {{"discard", "unmap"}});
  ASSERT_NE(node, nullptr);
  apply(*node, writes);
  apply(reference, writes);
  Result<void> zeroed = run(io::pwrite_zeroes(*node, 8192, 16384, 0));
  ASSERT_TRUE(zeroed) << error_of(zeroed);
  zeroed = run(io::pwrite_zeroes(*node, 65536, 16384, kRequestMayUnmap));
  ASSERT_TRUE(zeroed) << error_of(zeroed);
  zeroed = run(io::pwrite_zeroes(*node, 100000, 3000, 0));  // partial: zero buffers
  ASSERT_TRUE(zeroed) << error_of(zeroed);
  Result<void> discarded = run(io::pdiscard(*node, 131072, 65536));
  ASSERT_TRUE(discarded) << error_of(discarded);
  for (auto [at, n] : {std::pair<uint64_t, uint64_t>{8192, 16384},
                       {65536, 16384},
                       {100000, 3000},
                       {131072, 65536}}) {
    std::fill_n(reference.begin() + static_cast<ptrdiff_t>(at), n, '\0');
  }
  // Rewrite part of the zeroed, kept cluster and of the discarded range.
  std::vector<Write> more{Write{8192 + 100, std::vector<uint8_t>(300, 0x44)},
                          Write{131072 + 5000, std::vector<uint8_t>(300, 0x55)}};
  apply(*node, more);
  apply(reference, more);
  close(node);
  expect_clean_and_equal("img.qcow2", reference);
}

// T3.1 of reliability.md against the write-back caches: a workload of allocating writes,
// partial-cluster COW, discards and refcount-table growth with flushes in between, where every
// file write after the k-th is dropped (and later flushes do nothing). For every k the image is
// clean or only leaks in both checkers, and every byte that no request touched after the last
// flush that completed before the first dropped write reads back as it was at that flush.
// Runs on two layouts: 512-byte clusters with 64-bit refcounts (a refcount block covers 64
// clusters and the initial table 4096 clusters (2 MiB), so the workload also grows the refcount
// table), and extended L2 entries (16 KiB clusters of 32 subclusters: partial-subcluster COW,
// subcluster allocation bits), and discard-no-unref (discarded clusters stay allocated as zero
// clusters and later writes rewrite them in place).
struct CrashLayout {
  const char* name;
  const char* create_options;  // qemu-img create -o
  uint64_t cluster;
  bool grows_refcount_table;
  int random_crash_points;        // besides the fixed ones (keeps each run within CTest's timeout)
  bool discard_no_unref = false;  // discards keep their clusters; later writes reuse them
};

class Qcow2CrashTest : public Qcow2WriteTest, public ::testing::WithParamInterface<CrashLayout> {};

INSTANTIATE_TEST_SUITE_P(
    Layouts, Qcow2CrashTest,
    ::testing::Values(
        CrashLayout{"small_clusters", "cluster_size=512,refcount_bits=64", 512, true, 12},
        CrashLayout{"extended_l2", "cluster_size=16384,extended_l2=on", 16384, false, 5},
        CrashLayout{"discard_no_unref", "cluster_size=4096", 4096, false, 4, true}),
    [](const ::testing::TestParamInfo<CrashLayout>& info) { return info.param.name; });

TEST_P(Qcow2CrashTest, CrashAfterAnyWriteLeavesNoCorruption) {
  const uint64_t disk_size = 8 << 20;
  const uint64_t cluster = GetParam().cluster;
  std::mt19937_64 rng(31);
  std::string base(disk_size, '\0');
  for (size_t i = 0; i < base.size(); i += 512) {
    std::fill_n(base.begin() + static_cast<ptrdiff_t>(i), 512, static_cast<char>(rng()));
  }
  write_file("base.raw", base);
  struct Op {
    enum Kind { kWrite, kDiscard, kFlush } kind;
    Write write;
  };
  std::vector<Op> ops;
  auto writes = random_workload(99, disk_size, cluster * 8, 120);
  for (uint64_t i = 0; i < 8; ++i) {
    writes.push_back(Write{(1 << 20) * i + 777, std::vector<uint8_t>(300 << 10, 0x77)});
  }
  for (size_t i = 0; i < writes.size(); ++i) {
    ops.push_back(Op{Op::kWrite, writes[i]});
    if (i % 9 == 4) {
      // Whole clusters of a range written before: the clusters are freed (zero flag, v3).
      const Write& earlier = writes[rng() % (i + 1)];
      const uint64_t start = (earlier.offset + cluster - 1) / cluster * cluster;
      const uint64_t stop = (earlier.offset + earlier.data.size()) / cluster * cluster;
      if (stop > start) {
        ops.push_back(Op{Op::kDiscard, Write{start, std::vector<uint8_t>(stop - start, 0)}});
      }
    }
    if (i % 13 == 12) {
      ops.push_back(Op{Op::kFlush, {}});
    }
  }
  const std::string create = std::string("rm -f img.qcow2 && qemu-img create -q -f qcow2 -o ") +
                             GetParam().create_options + " -b '" + dir_path_ +
                             "/base.raw' -F raw img.qcow2 " + std::to_string(disk_size);

  // Runs the workload with writes after `limit` dropped; returns the file writes made and fills
  // `expected` with the guest contents and `pinned` with the bytes that must read back so.
  std::string expected;
  std::vector<bool> pinned;
  auto run_with_limit = [&](uint64_t limit) -> uint64_t {
    EXPECT_EQ(sh(create), 0);
    expected = base;
    pinned.assign(disk_size / 512, false);
    std::vector<bool> touched(disk_size / 512, false);
    auto file = open_node(graph_, {{"driver", "file"},
                                   {"node-name", "real" + std::to_string(++counter_)},
                                   {"filename", dir_path_ + "/img.qcow2"}});
    EXPECT_TRUE(file) << error_of(file);
    if (!file) {
      return 0;
    }
    const std::string drop_name = "drop" + std::to_string(counter_);
    auto drop = std::make_shared<DropAfterNode>(drop_name, limit);
    EXPECT_TRUE(graph_.register_node(*drop));
    graph_.add_monitor_ref(drop);
    auto attached = graph_.attach_child(*drop, *file, "file", kRoleFiltered | kRolePrimary);
    EXPECT_TRUE(attached) << error_of(attached);
    // Once writes are dropped the node's metadata and the file's disagree, and the overlap
    // checks (rightly) refuse what follows; they stay on for the run without a crash, which so
    // also shows they never fire on a consistent image.
    nlohmann::json extra = {{"discard", "unmap"}};
    if (GetParam().discard_no_unref) {
      extra["discard-no-unref"] = true;
    }
    if (limit != UINT64_MAX) {
      extra["overlap-check"] = "none";
    }
    auto node = open_rw("img.qcow2", extra, drop_name);
    auto touch = [&](uint64_t offset, uint64_t bytes) {
      for (uint64_t b = offset / 512; b < (offset + bytes + 511) / 512; ++b) {
        touched[b] = true;
      }
    };
    if (node) {
      for (const Op& op : ops) {
        if (drop->dropping()) {
          // The machine has crashed: nothing later reaches the file. (The node itself would now
          // read back metadata that was never written, so its later results mean nothing.)
          break;
        }
        Result<void> done = ok();
        if (op.kind == Op::kWrite) {
          touch(op.write.offset, op.write.data.size());
          done =
              run(io::pwrite(*node, op.write.offset, op.write.data.data(), op.write.data.size()));
          std::copy(op.write.data.begin(), op.write.data.end(),
                    expected.begin() + static_cast<ptrdiff_t>(op.write.offset));
        } else if (op.kind == Op::kDiscard) {
          touch(op.write.offset, op.write.data.size());
          done = run(io::pdiscard(*node, op.write.offset, op.write.data.size()));
          std::fill_n(expected.begin() + static_cast<ptrdiff_t>(op.write.offset),
                      op.write.data.size(), '\0');
        } else {
          done = run(io::flush(*node));
          if (done && !drop->dropping()) {
            // A real flush: everything so far must survive.
            std::fill(touched.begin(), touched.end(), false);
          }
        }
        EXPECT_TRUE(done || drop->dropping()) << error_of(done);
      }
      if (drop->dropping()) {
        if (root_) {
          graph_.detach_root(std::move(root_));
        }
        node.reset();  // the write-back of close is dropped too
      } else {
        close(node);
      }
    }
    for (size_t b = 0; b < touched.size(); ++b) {
      pinned[b] = !touched[b];
    }
    if (!drop->dropping()) {
      std::fill(pinned.begin(), pinned.end(), true);  // the final flush was real
    }
    const uint64_t writes_made = drop->writes();
    graph_.remove_monitor_ref(*drop);
    drop.reset();
    file->reset();
    return writes_made;
  };
  const uint64_t total = run_with_limit(UINT64_MAX);
  std::string output;
  ASSERT_EQ(check("img.qcow2", &output), 0) << output;
  ASSERT_GT(total, 100u);
  if (GetParam().grows_refcount_table) {
    ASSERT_GT(refcount_table_clusters("img.qcow2"), 1u) << "the workload must grow the table";
  }
  std::vector<uint64_t> limits{0, 1, 2, 3, 5, 8, 13, total - 1, total};
  std::mt19937_64 pick(5);
  // (Each crash point replays the workload and runs three tools: keep the test within CTest's
  // timeout under ASan.)
  for (int i = 0; i < GetParam().random_crash_points; ++i) {
    limits.push_back(pick() % total);
  }
  int leaks = 0;
  for (uint64_t limit : limits) {
    run_with_limit(limit);
    const int status = check("img.qcow2", &output);
    EXPECT_TRUE(status == 0 || status == 3)
        << "after " << limit << " of " << total << " writes: exit " << status << "\n"
        << output;
    EXPECT_EQ(strata_check("img.qcow2"), "") << "after " << limit << " of " << total << " writes";
    leaks += status == 3 ? 1 : 0;
    ASSERT_EQ(sh("rm -f out.raw && qemu-img convert -O raw img.qcow2 out.raw", &output), 0)
        << output;
    const std::string actual = slurp(dir_path_ + "/out.raw");
    ASSERT_EQ(actual.size(), disk_size);
    size_t mismatches = 0;
    uint64_t first_mismatch = 0;
    for (size_t b = 0; b < pinned.size(); ++b) {
      if (pinned[b] && actual.compare(b * 512, 512, expected, b * 512, 512) != 0) {
        if (mismatches++ == 0) {
          first_mismatch = b * 512;
        }
      }
    }
    EXPECT_EQ(mismatches, 0u) << "after " << limit << " of " << total
                              << " writes: flushed data lost, first at " << first_mismatch;
  }
  RecordProperty("crash_points", static_cast<int>(limits.size()));
  RecordProperty("crash_points_with_leaks", leaks);
}

// 32 writers at once: half on their own ranges, half on one shared range.
aio::Task<void> write_task(Node& node, uint64_t offset, std::vector<uint8_t>* data,
                           Result<void>* result) {
  *result = co_await io::pwrite(node, offset, data->data(), data->size());
}

aio::Task<void> concurrent_body(Node& node, std::vector<Write>& writes,
                                std::vector<Result<void>>& results) {
  aio::TaskGroup group;
  for (size_t i = 0; i < writes.size(); ++i) {
    group.spawn(write_task(node, writes[i].offset, &writes[i].data, &results[i]));
  }
  co_await group.wait();
}

TEST_F(Qcow2WriteTest, ConcurrentWritersOverlappingAndNot) {
  const uint64_t disk_size = 16 << 20;
  const uint64_t cluster = 4096;
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 -o cluster_size=4096 img.qcow2 16M"), 0);
  std::mt19937_64 rng(11);
  std::vector<Write> writes;
  // 16 writers on disjoint 256 KiB regions (unaligned inside them).
  for (uint64_t i = 0; i < 16; ++i) {
    const uint64_t bytes = 512 + rng() % (3 * cluster);
    writes.push_back(Write{(256 << 10) * i + rng() % 1000,
                           std::vector<uint8_t>(bytes, static_cast<uint8_t>(i + 1))});
  }
  // 16 writers inside [8 MiB, 8 MiB + 64 KiB).
  const uint64_t shared = 8 << 20;
  for (uint64_t i = 16; i < 32; ++i) {
    const uint64_t bytes = 512 * (1 + rng() % 40);
    const uint64_t at = shared + 512 * (rng() % ((65536 - bytes) / 512 + 1));
    writes.push_back(Write{at, std::vector<uint8_t>(bytes, static_cast<uint8_t>(i + 1))});
  }
  auto node = open_rw("img.qcow2");
  ASSERT_NE(node, nullptr);
  std::vector<Result<void>> results(writes.size(), ok());
  loop_->block_on(concurrent_body(*node, writes, results));
  for (size_t i = 0; i < results.size(); ++i) {
    EXPECT_TRUE(results[i]) << "writer " << i << ": " << error_of(results[i]);
  }
  close(node);
  std::string output;
  EXPECT_EQ(check("img.qcow2", &output), 0) << output;
  ASSERT_EQ(sh("qemu-img convert -O raw img.qcow2 out.raw"), 0);
  const std::string actual = slurp(dir_path_ + "/out.raw");
  ASSERT_EQ(actual.size(), disk_size);
  std::string disjoint(disk_size, '\0');
  apply(disjoint, std::vector<Write>(writes.begin(), writes.begin() + 16));
  EXPECT_TRUE(actual.substr(0, shared) == disjoint.substr(0, shared));
  EXPECT_TRUE(actual.substr(shared + 65536) == disjoint.substr(shared + 65536));
  // Each 512-byte block of the shared range holds one writer's data (one that covered it), or
  // zeroes where none did.
  for (uint64_t at = shared; at < shared + 65536; at += 512) {
    const auto value = static_cast<uint8_t>(actual[at]);
    EXPECT_EQ(actual.substr(at, 512), std::string(512, static_cast<char>(value))) << at;
    bool allowed = false;
    bool covered = false;
    for (size_t i = 16; i < 32; ++i) {
      if (writes[i].offset <= at && at < writes[i].offset + writes[i].data.size()) {
        covered = true;
        allowed = allowed || value == writes[i].data[0];
      }
    }
    EXPECT_TRUE(covered ? allowed : value == 0) << "block at " << at << " holds " << int{value};
  }
}

// Many allocating writers at once on a small, shared range of a fresh image over a backing file
// (COW from the backing file, writers waiting on each other's in-flight clusters, new L2 tables),
// with flushes and readers mixed in. Every 512-byte block ends up holding the data of one writer
// that covered it, or the backing file's where none did; the image is clean. Run under ASan, it
// also checks the lifetime of in-flight allocations and cache slices.
aio::Task<void> flush_task(Node& node, Result<void>* result) {
  *result = co_await io::flush(node);
}

aio::Task<void> read_task(Node& node, uint64_t offset, std::vector<uint8_t>* buffer,
                          Result<void>* result) {
  *result = co_await io::pread(node, offset, buffer->data(), buffer->size());
}

TEST_F(Qcow2WriteTest, ManyConcurrentOverlappingAllocatingWriters) {
  for (const uint64_t cluster : {uint64_t{4096}, uint64_t{65536}}) {
    SCOPED_TRACE("cluster size " + std::to_string(cluster));
    const uint64_t disk_size = 4 << 20;
    std::mt19937_64 rng(cluster);
    std::string base(disk_size, '\0');
    for (size_t i = 0; i < base.size(); i += 512) {
      std::fill_n(base.begin() + static_cast<ptrdiff_t>(i), 512, static_cast<char>(rng() | 1));
    }
    write_file("base.raw", base);
    ASSERT_EQ(sh("rm -f img.qcow2 && qemu-img create -q -f qcow2 -o cluster_size=" +
                 std::to_string(cluster) + " -b base.raw -F raw img.qcow2 4M"),
              0);
    // 256 writers inside 512 KiB (plus 16 far away), sizes from 512 bytes to 3 clusters.
    std::vector<Write> writes;
    const uint64_t region = 512 << 10;
    for (uint64_t i = 0; i < 272; ++i) {
      const uint64_t bytes = 512 * (1 + rng() % (3 * cluster / 512));
      const uint64_t area = i < 256 ? 0 : (2 << 20);
      const uint64_t at = area + 512 * (rng() % ((region - bytes) / 512 + 1));
      // Value 0 never appears: the backing file bytes are odd, writer values even and non-zero.
      writes.push_back(
          Write{at, std::vector<uint8_t>(bytes, static_cast<uint8_t>(2 * (1 + i % 127)))});
    }
    auto node = open_rw("img.qcow2");
    ASSERT_NE(node, nullptr);
    std::vector<Result<void>> results(writes.size(), ok());
    std::vector<Result<void>> side_results(32, ok());
    std::vector<std::vector<uint8_t>> read_buffers(16, std::vector<uint8_t>(3 * cluster));
    auto body = [&]() -> aio::Task<void> {
      aio::TaskGroup group;
      for (size_t i = 0; i < writes.size(); ++i) {
        group.spawn(write_task(*node, writes[i].offset, &writes[i].data, &results[i]));
        if (i % 17 == 0) {
          group.spawn(flush_task(*node, &side_results[i / 17]));
        }
        if (i % 17 == 8) {
          group.spawn(read_task(*node, writes[i].offset, &read_buffers[i / 17],
                                &side_results[16 + i / 17]));
        }
      }
      co_await group.wait();
    };
    loop_->block_on(body());
    for (size_t i = 0; i < results.size(); ++i) {
      EXPECT_TRUE(results[i]) << "writer " << i << ": " << error_of(results[i]);
    }
    for (size_t i = 0; i < side_results.size(); ++i) {
      EXPECT_TRUE(side_results[i]) << "flush/read " << i << ": " << error_of(side_results[i]);
    }
    close(node);
    std::string output;
    EXPECT_EQ(check("img.qcow2", &output), 0) << output;
    ASSERT_EQ(sh("rm -f out.raw && qemu-img convert -O raw img.qcow2 out.raw"), 0);
    const std::string actual = slurp(dir_path_ + "/out.raw");
    ASSERT_EQ(actual.size(), disk_size);
    size_t bad = 0;
    for (uint64_t at = 0; at < disk_size; at += 512) {
      bool covered = false;
      bool allowed = false;
      const auto value = static_cast<uint8_t>(actual[at]);
      for (const Write& w : writes) {
        if (w.offset <= at && at < w.offset + w.data.size()) {
          covered = true;
          allowed = allowed || value == w.data[0];
        }
      }
      const bool whole = actual.compare(at, 512, std::string(512, static_cast<char>(value))) == 0;
      const bool ok_block =
          covered ? (allowed && whole) : actual.compare(at, 512, base, at, 512) == 0;
      if (!ok_block && bad++ < 5) {
        ADD_FAILURE() << "block at " << at << " holds " << int{value}
                      << (covered ? " (covered by writers)" : " (not written)");
      }
    }
    EXPECT_EQ(bad, 0u);
  }
}

// What stays read-only, with a precise reason.
TEST_F(Qcow2WriteTest, RefusesReadWriteForUnsupportedImages) {
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 -o extended_l2=on ext.qcow2 1M && "
               "qemu-img create -q -f qcow2 snap.qcow2 1M && qemu-img snapshot -c s1 snap.qcow2 && "
               "qemu-img create -q -f qcow2 bitmap.qcow2 1M && "
               "qemu-img bitmap --add bitmap.qcow2 b0"),
            0);
  auto error = [&](const std::string& image) {
    auto node =
        open_node(graph_, {{"driver", "qcow2"},
                           {"read-only", false},
                           {"file", {{"driver", "file"}, {"filename", dir_path_ + "/" + image}}}});
    return error_of(node);
  };
  // Extended L2 entries are written per subcluster (subcluster_write.cc).
  EXPECT_EQ(error("ext.qcow2"), "");
  // Internal snapshots are written with copy-on-write of shared tables (snapshot.cc).
  EXPECT_EQ(error("snap.qcow2"), "");
  // Persistent bitmaps are loaded and stored back: the image opens read-write, and once closed
  // QEMU finds it clean with the bitmap no longer in use.
  EXPECT_EQ(error("bitmap.qcow2"), "");
  EXPECT_EQ(sh("qemu-img check -q bitmap.qcow2 && "
               "! (qemu-img info --output=json bitmap.qcow2 | grep -q in-use) && "
               "qemu-img info --output=json bitmap.qcow2 | grep -q '\"auto\"'"),
            0);
  // A corrupt image: QEMU's refusal.
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 corrupt.qcow2 1M && "
               "printf '\\000\\000\\000\\000\\000\\000\\000\\002' | "
               "dd of=corrupt.qcow2 bs=1 seek=72 conv=notrunc status=none"),
            0);
  EXPECT_EQ(error("corrupt.qcow2"), "qcow2: Image is corrupt; cannot be opened read/write");
}

// ---- dirty bit, lazy refcounts, overlap checks (dirty.cc, overlap.cc) ------------------------

// Incompatible feature bits of `image` as stored (qcow2.rst: bytes 72-79).
uint64_t incompatible_features(const std::string& path) {
  const std::string head = slurp(path).substr(0, 80);
  uint64_t value = 0;
  for (int i = 72; i < 80; ++i) {
    value = (value << 8) | static_cast<uint8_t>(head[i]);
  }
  return value;
}

TEST_F(Qcow2WriteTest, DirtyImageIsRepairedByReadWriteOpen) {
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on dirty.qcow2 4M && "
               "(qemu-io -f qcow2 -c 'write -P 0x5a 0 192k' -c 'sigraise 9' dirty.qcow2 || true)"),
            0);
  const std::string path = dir_path_ + "/dirty.qcow2";
  ASSERT_EQ(incompatible_features(path) & 1, 1u);
  std::string output;
  ASSERT_NE(check("dirty.qcow2", &output), 0) << output;  // the refcounts were never written
  auto node = open_rw("dirty.qcow2");
  ASSERT_NE(node, nullptr);
  EXPECT_EQ(node->dirty_flag(), false);
  EXPECT_EQ(incompatible_features(path) & 1, 0u);
  std::vector<Write> writes{Write{256 << 10, std::vector<uint8_t>(4096, 0x11)}};
  apply(*node, writes);
  close(node);
  std::string reference(4 << 20, '\0');
  std::fill(reference.begin(), reference.begin() + (192 << 10), '\x5a');
  apply(reference, writes);
  expect_clean_and_equal("dirty.qcow2", reference);
}

TEST_F(Qcow2WriteTest, LazyRefcountsSetTheDirtyBitUntilClose) {
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 4M && "
               "qemu-img create -q -f qcow2 plain.qcow2 4M"),
            0);
  for (const std::string image : {"lazy.qcow2", "plain.qcow2"}) {
    const bool lazy = image == "lazy.qcow2";
    auto node = open_rw(image);
    ASSERT_NE(node, nullptr);
    EXPECT_EQ(incompatible_features(dir_path_ + "/" + image) & 1, 0u) << image;
    apply(*node, {Write{0, std::vector<uint8_t>(70000, 0x22)}});
    EXPECT_EQ(incompatible_features(dir_path_ + "/" + image) & 1, lazy ? 1u : 0u) << image;
    EXPECT_EQ(node->dirty_flag(), lazy) << image;
    close(node);
    EXPECT_EQ(incompatible_features(dir_path_ + "/" + image) & 1, 0u) << image;
    std::string reference(4 << 20, '\0');
    std::fill(reference.begin(), reference.begin() + 70000, '\x22');
    expect_clean_and_equal(image, reference);
  }
  // lazy-refcounts=off overrides the image's compat bit.
  auto node = open_rw("lazy.qcow2", {{"lazy-refcounts", false}});
  ASSERT_NE(node, nullptr);
  apply(*node, {Write{1 << 20, std::vector<uint8_t>(512, 0x33)}});
  EXPECT_EQ(incompatible_features(dir_path_ + "/lazy.qcow2") & 1, 0u);
  close(node);
}

TEST_F(Qcow2WriteTest, OverlapCheckMarksTheImageCorrupt) {
  // 64 KiB clusters: header, refcount table, refcount block, L1 (0x30000), L2 (0x40000), data.
  ASSERT_EQ(
      sh("qemu-img create -q -f qcow2 c.qcow2 4M && qemu-io -f qcow2 -c 'write 0 64k' "
         "c.qcow2 >/dev/null && cp c.qcow2 none.qcow2 && "
         "for f in c.qcow2 none.qcow2; do printf '\\200\\000\\000\\000\\000\\003\\000\\000' | "
         "dd of=$f bs=1 seek=262144 conv=notrunc status=none; done"),
      0);
  const std::string l1_before = slurp(dir_path_ + "/c.qcow2").substr(0x30000, 4096);
  std::vector<std::pair<std::string, nlohmann::json>> events;
  graph_.set_event_sink(
      [&](std::string name, nlohmann::json data) { events.emplace_back(name, data); });
  auto node = open_rw("c.qcow2");
  ASSERT_NE(node, nullptr);
  std::string data(512, '\x44');
  Result<void> written = run(io::pwrite(*node, 0, data.data(), data.size()));
  ASSERT_FALSE(written);
  EXPECT_EQ(written.error().errno_value(), EIO);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].first, "BLOCK_IMAGE_CORRUPTED");
  EXPECT_EQ(events[0].second,
            nlohmann::json({{"device", ""},
                            {"node-name", node->name()},
                            {"msg",
                             "Preventing invalid write on metadata (overlaps with active L1 "
                             "table)"},
                            {"offset", 0x30000},
                            {"size", 512},
                            {"fatal", true}}));
  EXPECT_EQ(incompatible_features(dir_path_ + "/c.qcow2") & 2, 2u);
  // Unusable from now on, without a second event.
  written = run(io::pwrite(*node, 1 << 20, data.data(), data.size()));
  ASSERT_FALSE(written);
  EXPECT_EQ(written.error().errno_value(), ENOMEDIUM);
  Result<void> read = run(io::pread(*node, 0, data.data(), data.size()));
  ASSERT_FALSE(read);
  EXPECT_EQ(read.error().errno_value(), ENOMEDIUM);
  EXPECT_EQ(events.size(), 1u);
  if (root_) {
    graph_.detach_root(std::move(root_));
  }
  node.reset();
  EXPECT_EQ(incompatible_features(dir_path_ + "/c.qcow2") & 2, 2u);
  // The L1 table was not touched.
  EXPECT_EQ(slurp(dir_path_ + "/c.qcow2").substr(0x30000, 4096), l1_before);

  // overlap-check=none: the same write goes through (and overwrites the L1 table).
  node = open_rw("none.qcow2", {{"overlap-check", "none"}});
  ASSERT_NE(node, nullptr);
  written = run(io::pwrite(*node, 0, data.data(), data.size()));
  EXPECT_TRUE(written) << error_of(written);
  EXPECT_EQ(incompatible_features(dir_path_ + "/none.qcow2") & 2, 0u);
  EXPECT_EQ(events.size(), 1u);
  close(node);
}

}  // namespace
}  // namespace strata::block
