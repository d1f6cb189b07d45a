// Writes to qcow2 images with extended L2 entries (subclusters) and with an external data file,
// against QEMU: the same random workload (writes, write-zeroes, discards over a backing file) is
// applied by strata to one image and by qemu-io to a twin created identically. Both must pass
// `qemu-img check` clean, read back equal to each other and to a raw reference, and -- since
// strata follows QEMU's allocation rules -- `qemu-img map` must report the same allocation
// (subcluster by subcluster) for both, host offsets aside. Skipped without qemu-img/qemu-io.

#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "block/drivers/qcow2/check.h"
#include "block/io/request.h"
#include "graph_test_util.h"
#include "qcow2_test_util.h"

namespace strata::block {
namespace {

using testing::error_of;
using testing::have_qemu_img;
using testing::open_node;
using testing::slurp;

// One guest request of a workload.
struct Op {
  enum Kind { kWrite, kZero, kZeroUnmap, kDiscard } kind;
  uint64_t offset;
  uint64_t bytes;
  uint8_t pattern;  // kWrite: every byte written
};

// Random requests over `disk_size`: writes of any alignment (partial subclusters, several
// clusters), write-zeroes aligned to `zero_align` and discards of whole clusters.
std::vector<Op> random_ops(uint32_t seed, uint64_t disk_size, uint64_t cluster, uint64_t zero_align,
                           size_t count) {
  std::mt19937_64 rng(seed);
  std::vector<Op> ops;
  for (size_t i = 0; i < count; ++i) {
    const uint64_t pick = rng() % 10;
    if (pick < 6) {
      const uint64_t bytes = 1 + rng() % (3 * cluster);
      const uint64_t offset = rng() % (disk_size - bytes);
      ops.push_back(Op{Op::kWrite, offset, bytes, static_cast<uint8_t>(1 + rng() % 250)});
    } else if (pick < 8) {
      const uint64_t units = disk_size / zero_align;
      const uint64_t n = 1 + rng() % std::min<uint64_t>(units / 4, 3 * cluster / zero_align + 1);
      const uint64_t first = rng() % (units - n);
      ops.push_back(
          Op{pick == 6 ? Op::kZero : Op::kZeroUnmap, first * zero_align, n * zero_align, 0});
    } else {
      const uint64_t clusters = disk_size / cluster;
      const uint64_t n = 1 + rng() % 3;
      const uint64_t first = rng() % (clusters - n);
      ops.push_back(Op{Op::kDiscard, first * cluster, n * cluster, 0});
    }
  }
  return ops;
}

class Qcow2SubclusterTest : public testing::Qcow2Fixture<> {
 protected:
  void SetUp() override {
    if (!have_qemu_img() || std::system("qemu-io --version >/dev/null 2>&1") != 0) {
      GTEST_SKIP() << "qemu-img or qemu-io not installed";
    }
    Qcow2Fixture::SetUp();
  }

  std::shared_ptr<Node> open_rw(const std::string& image) {
    nlohmann::json options = {
        {"driver", "qcow2"},
        {"node-name", "q" + std::to_string(++counter_)},
        {"read-only", false},
        {"discard", "unmap"},
        {"file", {{"driver", "file"}, {"filename", dir_path_ + "/" + image}}}};
    return open_with_writer(options, image);
  }

  // Applies `ops` through strata's request layer.
  void apply(Node& node, const std::vector<Op>& ops) {
    for (const Op& op : ops) {
      Result<void> done = ok();
      std::vector<uint8_t> data;
      switch (op.kind) {
        case Op::kWrite:
          data.assign(op.bytes, op.pattern);
          done = run(io::pwrite(node, op.offset, data.data(), data.size()));
          break;
        case Op::kZero:
          done = run(io::pwrite_zeroes(node, op.offset, op.bytes, 0));
          break;
        case Op::kZeroUnmap:
          done = run(io::pwrite_zeroes(node, op.offset, op.bytes, kRequestMayUnmap));
          break;
        case Op::kDiscard:
          done = run(io::pdiscard(node, op.offset, op.bytes));
          break;
      }
      ASSERT_TRUE(done) << "op " << op.kind << " at " << op.offset << "+" << op.bytes << ": "
                        << error_of(done);
    }
  }

  // The same requests through qemu-io (discard=unmap like strata's node).
  void apply_qemu(const std::string& image, const std::vector<Op>& ops) {
    std::string script;
    for (const Op& op : ops) {
      const std::string range = std::to_string(op.offset) + " " + std::to_string(op.bytes);
      switch (op.kind) {
        case Op::kWrite:
          script += "write -q -P " + std::to_string(op.pattern) + " " + range + "\n";
          break;
        case Op::kZero:
          script += "write -q -z " + range + "\n";
          break;
        case Op::kZeroUnmap:
          script += "write -q -z -u " + range + "\n";
          break;
        case Op::kDiscard:
          script += "discard -q " + range + "\n";
          break;
      }
    }
    std::ofstream(dir_path_ + "/qemu-io.cmds") << script;
    std::string output;
    ASSERT_EQ(sh("qemu-io -f qcow2 -d unmap '" + image + "' < qemu-io.cmds", &output), 0) << output;
  }

  static void apply_reference(std::string& reference, const std::vector<Op>& ops) {
    for (const Op& op : ops) {
      const char byte = op.kind == Op::kWrite ? static_cast<char>(op.pattern) : '\0';
      std::fill_n(reference.begin() + static_cast<ptrdiff_t>(op.offset), op.bytes, byte);
    }
  }

  void write_file(const std::string& name, const std::string& contents) {
    std::ofstream out(dir_path_ + "/" + name, std::ios::binary | std::ios::trunc);
    out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
  }

  void expect_clean(const std::string& image) {
    std::string output;
    EXPECT_EQ(sh("qemu-img check -f qcow2 '" + image + "'", &output), 0) << output;
  }

  void expect_equal(const std::string& image, const std::string& other,
                    const std::string& other_format) {
    std::string output;
    EXPECT_EQ(
        sh("qemu-img compare -f qcow2 -F " + other_format + " '" + image + "' '" + other + "'",
           &output),
        0)
        << output;
  }

  // `qemu-img map --output=json` without host offsets, adjacent equal extents merged.
  nlohmann::json allocation_map(const std::string& image) {
    std::string output;
    EXPECT_EQ(sh("qemu-img map -f qcow2 --output=json '" + image + "' 2>/dev/null", &output), 0)
        << output;
    nlohmann::json merged = nlohmann::json::array();
    for (nlohmann::json extent : nlohmann::json::parse(output, nullptr, false)) {
      extent.erase("offset");
      if (!merged.empty()) {
        nlohmann::json last = merged.back();
        const uint64_t last_end = last["start"].get<uint64_t>() + last["length"].get<uint64_t>();
        last.erase("start");
        last.erase("length");
        nlohmann::json attributes = extent;
        attributes.erase("start");
        attributes.erase("length");
        if (last == attributes && last_end == extent["start"].get<uint64_t>()) {
          merged.back()["length"] =
              merged.back()["length"].get<uint64_t>() + extent["length"].get<uint64_t>();
          continue;
        }
      }
      merged.push_back(extent);
    }
    return merged;
  }

  // A raw backing file of `size` bytes, every 512-byte sector a different byte.
  std::string make_base(uint64_t size) {
    std::string base(size, '\0');
    for (uint64_t i = 0; i < size; i += 512) {
      std::fill_n(base.begin() + static_cast<ptrdiff_t>(i), 512,
                  static_cast<char>(0x80 + (i / 512) % 97));
    }
    write_file("base.raw", base);
    return base;
  }
};

// Extended L2 over a backing file: partial-subcluster writes COW only within the subcluster,
// untouched subclusters keep reading from the backing file; zeroes at subcluster granularity.
TEST_F(Qcow2SubclusterTest, ExtendedL2WorkloadMatchesQemu) {
  const uint64_t disk = 4 << 20;
  const uint64_t cluster = 64 << 10;
  std::string reference = make_base(disk);
  const std::string create =
      "qemu-img create -q -f qcow2 -o cluster_size=65536,extended_l2=on -b base.raw -F raw ";
  ASSERT_EQ(sh(create + "strata.qcow2 4M && " + create + "qemu.qcow2 4M"), 0);
  const auto ops = random_ops(7, disk, cluster, cluster / 32, 150);
  auto node = open_rw("strata.qcow2");
  ASSERT_NE(node, nullptr);
  apply(*node, ops);
  close(node);
  apply_qemu("qemu.qcow2", ops);
  apply_reference(reference, ops);
  write_file("reference.raw", reference);
  expect_clean("strata.qcow2");
  expect_clean("qemu.qcow2");
  expect_equal("strata.qcow2", "reference.raw", "raw");
  expect_equal("strata.qcow2", "qemu.qcow2", "qcow2");
  EXPECT_EQ(allocation_map("strata.qcow2"), allocation_map("qemu.qcow2"));
}

// Extended L2 without a backing file and with 32 KiB clusters (1 KiB subclusters), then the same
// image rewritten by a second workload after reopening.
TEST_F(Qcow2SubclusterTest, ExtendedL2WithoutBackingMatchesQemu) {
  const uint64_t disk = 2 << 20;
  const uint64_t cluster = 32 << 10;
  std::string reference(disk, '\0');
  const std::string create = "qemu-img create -q -f qcow2 -o cluster_size=32768,extended_l2=on ";
  ASSERT_EQ(sh(create + "strata.qcow2 2M && " + create + "qemu.qcow2 2M"), 0);
  for (uint32_t round = 0; round < 2; ++round) {
    const auto ops = random_ops(100 + round, disk, cluster, cluster / 32, 120);
    auto node = open_rw("strata.qcow2");
    ASSERT_NE(node, nullptr);
    apply(*node, ops);
    close(node);
    apply_qemu("qemu.qcow2", ops);
    apply_reference(reference, ops);
  }
  write_file("reference.raw", reference);
  expect_clean("strata.qcow2");
  expect_equal("strata.qcow2", "reference.raw", "raw");
  EXPECT_EQ(allocation_map("strata.qcow2"), allocation_map("qemu.qcow2"));
}

// Overwriting compressed clusters of an extended L2 image: the whole cluster is copied (no
// subclusters in compressed clusters).
TEST_F(Qcow2SubclusterTest, ExtendedL2OverCompressedClusters) {
  std::string reference(1 << 20, '\0');
  for (size_t i = 0; i < reference.size(); ++i) {
    reference[i] = static_cast<char>((i / 4096) % 5 + 'a');
  }
  write_file("source.raw", reference);
  ASSERT_EQ(sh("qemu-img convert -c -f raw -O qcow2 -o cluster_size=65536,extended_l2=on "
               "source.raw strata.qcow2 && cp strata.qcow2 qemu.qcow2"),
            0);
  const std::vector<Op> ops{{Op::kWrite, 70000, 1000, 0x11},
                            {Op::kZero, 131072 + 2048 * 3, 2048 * 2, 0},
                            {Op::kZeroUnmap, 262144, 65536, 0},
                            {Op::kDiscard, 393216, 65536, 0},
                            {Op::kWrite, 600000, 200000, 0x22}};
  auto node = open_rw("strata.qcow2");
  ASSERT_NE(node, nullptr);
  apply(*node, ops);
  close(node);
  apply_qemu("qemu.qcow2", ops);
  apply_reference(reference, ops);
  write_file("reference.raw", reference);
  expect_clean("strata.qcow2");
  expect_equal("strata.qcow2", "reference.raw", "raw");
  expect_equal("strata.qcow2", "qemu.qcow2", "qcow2");
}

// An external data file over a backing file: guest clusters at their own offset in the data file,
// no refcounts for them in the image file (qemu-img check clean, no leaks).
TEST_F(Qcow2SubclusterTest, DataFileWorkloadMatchesQemu) {
  const uint64_t disk = 4 << 20;
  const uint64_t cluster = 64 << 10;
  std::string reference = make_base(disk);
  // (A relative data file name is relative to the working directory, as in QEMU.)
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 -o data_file=$PWD/strata.data -b base.raw -F raw "
               "strata.qcow2 4M && qemu-img create -q -f qcow2 -o data_file=$PWD/qemu.data "
               "-b base.raw -F raw qemu.qcow2 4M"),
            0);
  const auto ops = random_ops(11, disk, cluster, cluster, 150);
  auto node = open_rw("strata.qcow2");
  ASSERT_NE(node, nullptr);
  apply(*node, ops);
  close(node);
  apply_qemu("qemu.qcow2", ops);
  apply_reference(reference, ops);
  write_file("reference.raw", reference);
  expect_clean("strata.qcow2");
  expect_clean("qemu.qcow2");
  expect_equal("strata.qcow2", "reference.raw", "raw");
  EXPECT_EQ(allocation_map("strata.qcow2"), allocation_map("qemu.qcow2"));
}

// data-file-raw: the data file stays a raw image of the guest disk (byte for byte the reference)
// and the autoclear bit survives a read-write open.
TEST_F(Qcow2SubclusterTest, RawDataFileStaysRaw) {
  const uint64_t disk = 2 << 20;
  std::string reference(disk, '\0');
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 -o data_file=$PWD/img.data,data_file_raw=on "
               "img.qcow2 2M"),
            0);
  const auto ops = random_ops(21, disk, 65536, 65536, 100);
  auto node = open_rw("img.qcow2");
  ASSERT_NE(node, nullptr);
  apply(*node, ops);
  close(node);
  apply_reference(reference, ops);
  write_file("reference.raw", reference);
  expect_clean("img.qcow2");
  expect_equal("img.qcow2", "reference.raw", "raw");
  std::string output;
  EXPECT_EQ(sh("cmp img.data reference.raw", &output), 0) << output;
  ASSERT_EQ(sh("qemu-img info --output=json img.qcow2", &output), 0) << output;
  const auto info = nlohmann::json::parse(output, nullptr, false);
  EXPECT_EQ(info["format-specific"]["data"]["data-file-raw"], true) << output;
}

// Extended L2 together with an external data file.
TEST_F(Qcow2SubclusterTest, ExtendedL2WithDataFileMatchesQemu) {
  const uint64_t disk = 2 << 20;
  const uint64_t cluster = 64 << 10;
  std::string reference = make_base(disk);
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 -o extended_l2=on,data_file=$PWD/strata.data "
               "-b base.raw -F raw strata.qcow2 2M && qemu-img create -q -f qcow2 -o "
               "extended_l2=on,data_file=$PWD/qemu.data -b base.raw -F raw qemu.qcow2 2M"),
            0);
  const auto ops = random_ops(33, disk, cluster, cluster / 32, 120);
  auto node = open_rw("strata.qcow2");
  ASSERT_NE(node, nullptr);
  apply(*node, ops);
  close(node);
  apply_qemu("qemu.qcow2", ops);
  apply_reference(reference, ops);
  write_file("reference.raw", reference);
  expect_clean("strata.qcow2");
  expect_equal("strata.qcow2", "reference.raw", "raw");
  EXPECT_EQ(allocation_map("strata.qcow2"), allocation_map("qemu.qcow2"));
}

}  // namespace
}  // namespace strata::block
