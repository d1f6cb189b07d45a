// qcow2 internal snapshots below the CLI: the snapshot table codec, and guest writes to an image
// whose tables are shared with a snapshot, including a crash (writes dropped after the k-th) at
// every point of such a workload: `qemu-img check` must find leaks at worst, and the snapshot
// must still hold what it held. Skipped when qemu-img is not installed.

#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "aio/event_loop.h"
#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/drivers/qcow2/snapshot_table.h"
#include "block/io/request.h"
#include "graph_test_util.h"
#include "qcow2_test_util.h"

namespace strata::block {
namespace {

using qcow2::SnapshotEntry;
using testing::DropAfterNode;
using testing::error_of;
using testing::have_qemu_img;
using testing::open_node;
using testing::slurp;
using testing::TempDir;
using testing::TestUser;

class Qcow2SnapshotTest : public testing::Qcow2Fixture<> {};

TEST_F(Qcow2SnapshotTest, TableRoundTripKeepsEveryField) {
  std::vector<SnapshotEntry> entries(3);
  entries[0].id = "1";
  entries[0].name = "first";
  entries[0].l1_table_offset = 0x30000;
  entries[0].l1_size = 7;
  entries[0].date_sec = 1795319534;
  entries[0].date_nsec = 511467000;
  entries[0].vm_clock_nsec = 3723004000000;
  entries[0].disk_size = 64 << 20;
  entries[0].icount = 0;
  entries[1].id = "12";
  entries[1].name = std::string(255, 'n');
  entries[1].vm_state_size = uint64_t{5} << 32;  // only vm_state_size_large can hold it
  entries[1].disk_size = 1 << 20;
  entries[1].unknown_extra = {1, 2, 3, 4, 5, 6, 7, 8};
  entries[2].id = "13";
  entries[2].name = "";
  entries[2].disk_size = 512;
  const std::vector<uint8_t> bytes = qcow2::serialize_snapshot_table(entries);
  // The first entry has the 24 known bytes of extra data.
  EXPECT_EQ(qcow2::load_be32(bytes.data() + 36), 24u);

  const std::string path = dir_.file("table", 0);
  const uint64_t table_offset = 4096;
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    const std::string padding(table_offset, '\0');
    out.write(padding.data(), static_cast<std::streamsize>(padding.size()));
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
  }
  auto file = open_node(graph_, {{"driver", "file"}, {"filename", path}, {"read-only", true}});
  ASSERT_TRUE(file) << error_of(file);
  qcow2::Header header;
  header.nb_snapshots = 3;
  header.snapshots_offset = table_offset;
  header.size = 99 << 20;
  Result<qcow2::SnapshotTable> table = run(qcow2::read_snapshot_table(**file, header));
  ASSERT_TRUE(table) << error_of(table);
  EXPECT_EQ(table->size, bytes.size());
  ASSERT_EQ(table->entries.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    const SnapshotEntry& a = entries[i];
    const SnapshotEntry& b = table->entries[i];
    EXPECT_EQ(a.id, b.id);
    EXPECT_EQ(a.name, b.name);
    EXPECT_EQ(a.l1_table_offset, b.l1_table_offset);
    EXPECT_EQ(a.l1_size, b.l1_size);
    EXPECT_EQ(a.date_sec, b.date_sec);
    EXPECT_EQ(a.date_nsec, b.date_nsec);
    EXPECT_EQ(a.vm_clock_nsec, b.vm_clock_nsec);
    EXPECT_EQ(a.vm_state_size, b.vm_state_size);
    EXPECT_EQ(a.disk_size, b.disk_size);
    EXPECT_EQ(a.icount, b.icount);
    EXPECT_EQ(a.unknown_extra, b.unknown_extra);
  }
  EXPECT_EQ(qcow2::find_snapshot_by_id_or_name(table->entries, "12"), 1);
  EXPECT_EQ(qcow2::find_snapshot_by_id_or_name(table->entries, "first"), 0);
  EXPECT_EQ(qcow2::find_snapshot_by_id_or_name(table->entries, "nope"), -1);
  EXPECT_EQ(qcow2::find_snapshot(table->entries, "1", "other"), -1);
}

// A workload of overwrites, write-zeroes and discards on an image whose every table is shared
// with a snapshot, cut short after every k-th file write: qemu-img check exits 0 or 3, and the
// snapshot still reads as it was taken.
TEST_F(Qcow2SnapshotTest, CrashDuringCopyOnWriteLeavesNoCorruption) {
  if (!have_qemu_img()) {
    GTEST_SKIP() << "qemu-img not installed";
  }
  const uint64_t disk_size = 4 << 20;
  const std::string create =
      "rm -f img.qcow2 snap.raw && qemu-img create -q -f qcow2 -o cluster_size=4096 img.qcow2 " +
      std::to_string(disk_size) +
      " && qemu-io -f qcow2 -c 'write -P 0x11 0 1M' -c 'write -P 0x22 3M 512k' img.qcow2 "
      ">/dev/null && qemu-img snapshot -c base img.qcow2";
  std::mt19937_64 rng(7);
  struct Step {
    uint64_t offset;
    uint64_t bytes;
    int kind;  // 0 write, 1 write-zeroes, 2 discard
  };
  std::vector<Step> steps;
  for (int i = 0; i < 60; ++i) {
    const uint64_t bytes = 512 + rng() % (20 << 10);
    const int kind = i % 7 == 3 ? 1 : (i % 7 == 5 ? 2 : 0);
    uint64_t offset = rng() % (disk_size - bytes);
    if (kind != 0) {
      offset &= ~uint64_t{4095};
    }
    steps.push_back(Step{offset, kind == 0 ? bytes : (bytes + 4095) & ~uint64_t{4095}, kind});
  }

  auto run_with_limit = [&](uint64_t limit) -> uint64_t {
    EXPECT_EQ(sh(create), 0);
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
    auto node = open_node(graph_, {{"driver", "qcow2"},
                                   {"node-name", "q" + std::to_string(counter_)},
                                   {"read-only", false},
                                   {"file", drop_name}});
    EXPECT_TRUE(node) << error_of(node);
    if (node) {
      auto root = graph_.attach_root(user_, *node, "root", kRoleImage,
                                     kPermConsistentRead | kPermWrite, kPermAll);
      EXPECT_TRUE(root) << error_of(root);
      for (const Step& step : steps) {
        Result<void> done = ok();
        std::vector<uint8_t> data(step.bytes, static_cast<uint8_t>(step.offset >> 9));
        if (step.kind == 0) {
          done = run(io::pwrite(**node, step.offset, data.data(), data.size()));
        } else if (step.kind == 1) {
          done = run(io::pwrite_zeroes(**node, step.offset, step.bytes, 0));
        } else {
          done = run(io::pdiscard(**node, step.offset, step.bytes));
        }
        EXPECT_TRUE(done) << error_of(done);
      }
      Result<void> flushed = run(io::flush(**node));
      EXPECT_TRUE(flushed) << error_of(flushed);
      if (root) {
        graph_.detach_root(std::move(root).value());
      }
      node->reset();
    }
    const uint64_t writes = drop->writes();
    graph_.remove_monitor_ref(*drop);
    drop.reset();
    file->reset();
    return writes;
  };

  const uint64_t total = run_with_limit(UINT64_MAX);
  std::string output;
  ASSERT_EQ(sh("qemu-img check img.qcow2", &output), 0) << output;
  ASSERT_GT(total, 60u);
  std::vector<uint64_t> limits{0, 1, 2, 3, 5, 8, 13, total - 1, total};
  std::mt19937_64 pick(11);
  for (int i = 0; i < 30; ++i) {
    limits.push_back(pick() % total);
  }
  for (uint64_t limit : limits) {
    run_with_limit(limit);
    const int status = sh("qemu-img check img.qcow2", &output);
    EXPECT_TRUE(status == 0 || status == 3)
        << "after " << limit << " of " << total << " writes: exit " << status << "\n"
        << output;
    // The snapshot is intact: applied, it reads as written before it was taken.
    EXPECT_EQ(sh("qemu-img snapshot -a base img.qcow2 && "
                 "qemu-io -f qcow2 -r -c 'read -P 0x11 0 1M' -c 'read -P 0 1M 2M' "
                 "-c 'read -P 0x22 3M 512k' -c 'read -P 0 3584k 512k' img.qcow2 "
                 "| grep -v 'verification failed' | grep -c '^read' | grep -qx 4",
                 &output),
              0)
        << "after " << limit << " writes:\n"
        << output;
  }
}

}  // namespace
}  // namespace strata::block
