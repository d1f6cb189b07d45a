// The read-only qcow2 driver against images written by QEMU's own tools: every byte read through
// strata equals `qemu-img convert -O raw` of the same image, block status agrees with
// `qemu-img map --output=json`, and malformed headers fail with the message QEMU gives for the
// same bytes. Skipped when qemu-img/qemu-io are not installed.

#include <sys/stat.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "aio/event_loop.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/io/request.h"
#include "graph_test_util.h"

namespace strata::block {
namespace {

using testing::error_of;
using testing::open_node;
using testing::TempDir;
using testing::TestUser;

bool have_qemu_tools() {
  static const bool have = std::system("qemu-img --version >/dev/null 2>&1") == 0 &&
                           std::system("qemu-io --version >/dev/null 2>&1") == 0;
  return have;
}

// Runs `script` with bash in `dir`; returns its exit status.
int run_in(const std::string& dir, const std::string& script) {
  std::string path = dir + "/script.sh";
  {
    std::ofstream out(path);
    out << "set -e\ncd '" << dir << "'\n" << script << "\n";
  }
  return std::system(("bash '" + path + "' >'" + dir + "/script.log' 2>&1").c_str());
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// What QEMU says when it cannot open `path` ("" if it opens).
std::string qemu_open_error(const std::string& dir, const std::string& path) {
  run_in(dir, "qemu-io -r -U -f qcow2 -c quit '" + path + "' >/dev/null 2>qemu-error.txt || true");
  std::string text = slurp(dir + "/qemu-error.txt");
  const std::string prefix = "qemu-io: can't open device " + path + ": ";
  if (text.rfind(prefix, 0) == 0) {
    text = text.substr(prefix.size());
  }
  // The message only: QEMU prints hints on the lines after it.
  return text.substr(0, text.find('\n'));
}

class Qcow2ReadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_qemu_tools()) {
      GTEST_SKIP() << "qemu-img/qemu-io not installed";
    }
    ASSERT_TRUE(dir_.ok());
    auto loop = aio::EventLoop::create();
    ASSERT_TRUE(loop) << loop.error().message();
    loop_ = std::move(loop).value();
    path_ = dir_.file("probe", 0);
    path_ = path_.substr(0, path_.rfind('/'));
  }
  void TearDown() override {
    if (root_) {
      graph_.detach_root(std::move(root_));
    }
  }

  std::string dir() const { return path_; }

  nlohmann::json options_for(const std::string& image, nlohmann::json extra = {}) {
    nlohmann::json options = {{"driver", "qcow2"},
                              {"node-name", "q" + std::to_string(++counter_)},
                              {"read-only", true},
                              {"file", {{"driver", "file"}, {"filename", image}}}};
    if (extra.is_object()) {
      options.update(extra);
    }
    return options;
  }

  std::shared_ptr<Node> open(const std::string& image, nlohmann::json extra = {}) {
    auto node = open_node(graph_, options_for(image, std::move(extra)));
    if (!node) {
      ADD_FAILURE() << "opening " << image << ": " << node.error().message();
      return nullptr;
    }
    auto root = graph_.attach_root(user_, *node, "root", kRoleImage, kPermConsistentRead, kPermAll);
    if (!root) {
      ADD_FAILURE() << root.error().message();
      return nullptr;
    }
    if (root_) {
      graph_.detach_root(std::move(root_));
    }
    root_ = std::move(root).value();
    return std::move(node).value();
  }

  std::string open_error(const std::string& image, nlohmann::json extra = {}) {
    auto node = open_node(graph_, options_for(image, std::move(extra)));
    return error_of(node);
  }

  template <typename T>
  T run(aio::Task<T> task) {
    return loop_->block_on(std::move(task));
  }

  // Reads the whole node in `chunk`-byte requests.
  std::string read_all(Node& node, uint64_t chunk = 3 << 20) {
    std::string out(node.length(), '\0');
    for (uint64_t at = 0; at < node.length(); at += chunk) {
      uint64_t n = std::min<uint64_t>(chunk, node.length() - at);
      Result<void> done = run(io::pread(node, at, out.data() + at, n));
      EXPECT_TRUE(done) << "at " << at << ": " << error_of(done);
      if (!done) {
        break;
      }
    }
    return out;
  }

  // Compares the node's bytes with qemu-img convert -O raw and its block status with qemu-img
  // map --output=json.
  void expect_same_as_qemu(Node& node, const std::string& image) {
    ASSERT_EQ(run_in(dir(), "rm -f expected.raw && qemu-img convert -U -O raw '" + image +
                                "' expected.raw && qemu-img map -U --output=json '" + image +
                                "' > map.json"),
              0)
        << slurp(dir() + "/script.log");
    std::string expected = slurp(dir() + "/expected.raw");
    ASSERT_EQ(expected.size(), node.length());
    std::string actual = read_all(node);
    ASSERT_EQ(actual.size(), expected.size());
    if (actual != expected) {
      size_t first = 0;
      while (first < actual.size() && actual[first] == expected[first]) {
        ++first;
      }
      ADD_FAILURE() << image << ": contents differ first at byte " << first;
    }
    // Unaligned small reads across cluster boundaries agree too.
    for (uint64_t at : {uint64_t{1}, uint64_t{511}, uint64_t{4095}, uint64_t{65535}}) {
      if (at + 1000 > node.length()) {
        continue;
      }
      std::string part(1000, '\0');
      Result<void> done = run(io::pread(node, at, part.data(), part.size()));
      ASSERT_TRUE(done) << error_of(done);
      EXPECT_EQ(part, expected.substr(at, 1000)) << "at " << at;
    }
    auto map = nlohmann::json::parse(slurp(dir() + "/map.json"));
    for (const auto& entry : map) {
      const uint64_t start = entry["start"];
      const uint64_t end = start + entry["length"].get<uint64_t>();
      const bool here = entry["depth"] == 0 && entry["present"] == true;
      for (uint64_t at = start; at < end;) {
        Result<BlockStatus> status = run(io::block_status(node, at, end - at));
        ASSERT_TRUE(status) << error_of(status);
        const uint32_t f = status->flags;
        SCOPED_TRACE(image + " at " + std::to_string(at) + " entry " + entry.dump());
        EXPECT_EQ((f & BlockStatus::kAllocated) != 0, here);
        if (here) {
          EXPECT_EQ((f & BlockStatus::kData) != 0, entry["data"].get<bool>());
          EXPECT_EQ((f & BlockStatus::kZero) != 0, entry["zero"].get<bool>());
          EXPECT_EQ((f & BlockStatus::kOffsetValid) != 0, entry.contains("offset"));
          if (entry.contains("offset") && (f & BlockStatus::kOffsetValid)) {
            EXPECT_EQ(status->map_offset, entry["offset"].get<uint64_t>() + (at - start));
          }
        }
        at += std::max<uint64_t>(status->bytes, 1);
      }
    }
  }

  TempDir dir_;
  std::string path_;
  std::unique_ptr<aio::EventLoop> loop_;
  Graph graph_;
  TestUser user_{"block device 'test'"};
  std::unique_ptr<Child> root_;
  int counter_ = 0;
};

// A workload of qemu-io writes that leaves data, holes, zero clusters (plain and preallocated)
// and partial clusters. $1 = image.
const char* kWorkload = R"(
io() { qemu-io -f qcow2 "$@" >/dev/null; }
io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 100k 3k' -c 'write -P 0x33 1M 1536k' \
   -c 'write -z 3M 256k' -c 'write -P 0x44 5M 512' -c 'write -z 1M 64k' \
   -c 'write -z -u 1200k 8k' -c 'write -P 0x55 8388096 512' "$1"
)";

struct ImageCase {
  const char* name;
  const char* create;  // bash, leaves img.qcow2 in the current directory
};

class Qcow2ImageCases : public Qcow2ReadTest, public ::testing::WithParamInterface<ImageCase> {};

TEST_P(Qcow2ImageCases, ReadsAndMapsLikeQemu) {
  const ImageCase& c = GetParam();
  std::string script = std::string("workload() {") + kWorkload + "}\n" + c.create;
  ASSERT_EQ(run_in(dir(), script), 0) << slurp(dir() + "/script.log");
  std::string image = dir() + "/img.qcow2";
  std::shared_ptr<Node> node = open(image);
  ASSERT_NE(node, nullptr);
  expect_same_as_qemu(*node, image);
}

const ImageCase kImageCases[] = {
    {"cluster512",
     "qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 8M; workload img.qcow2"},
    {"cluster1k",
     "qemu-img create -q -f qcow2 -o cluster_size=1k img.qcow2 8M; workload img.qcow2"},
    {"cluster4k",
     "qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 8M; workload img.qcow2"},
    {"cluster64k", "qemu-img create -q -f qcow2 img.qcow2 8M; workload img.qcow2"},
    {"cluster256k",
     "qemu-img create -q -f qcow2 -o cluster_size=256k img.qcow2 8M; workload img.qcow2"},
    {"cluster2M",
     "qemu-img create -q -f qcow2 -o cluster_size=2M img.qcow2 8M; workload img.qcow2"},
    {"v2", "qemu-img create -q -f qcow2 -o compat=0.10 img.qcow2 8M; workload img.qcow2"},
    {"v2_cluster512",
     "qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 img.qcow2 8M; workload "
     "img.qcow2"},
    {"refcount1",
     "qemu-img create -q -f qcow2 -o refcount_bits=1 img.qcow2 8M; workload img.qcow2"},
    {"refcount64",
     "qemu-img create -q -f qcow2 -o refcount_bits=64 img.qcow2 8M; workload img.qcow2"},
    {"extended_l2",
     "qemu-img create -q -f qcow2 -o extended_l2=on img.qcow2 8M; workload img.qcow2; "
     "qemu-io -c 'write -P 0x66 6M 2k' -c 'write -z 6208k 4k' img.qcow2 >/dev/null"},
    {"extended_l2_32k_backing",
     "qemu-img create -q -f qcow2 base.qcow2 8M; workload base.qcow2; "
     "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=32k -b base.qcow2 -F qcow2 "
     "img.qcow2; "
     "qemu-io -c 'write -P 0x77 4k 4k' -c 'write -z 9k 1k' -c 'write -P 0x78 1M 1k' "
     "-c 'write -z -u 1040k 2k' img.qcow2 >/dev/null"},
    {"compressed_zlib",
     "qemu-img create -q -f qcow2 src.qcow2 8M; workload src.qcow2; "
     "qemu-img convert -c -O qcow2 src.qcow2 img.qcow2; "
     "qemu-io -c 'write -P 0x99 2M 4k' img.qcow2 >/dev/null"},
    {"compressed_zstd",
     "qemu-img create -q -f qcow2 src.qcow2 8M; workload src.qcow2; "
     "qemu-img convert -c -O qcow2 -o compression_type=zstd src.qcow2 img.qcow2"},
    {"compressed_512",
     "qemu-img create -q -f qcow2 src.qcow2 8M; workload src.qcow2; "
     "qemu-img convert -c -O qcow2 -o cluster_size=512 src.qcow2 img.qcow2"},
    {"compressed_2M_zstd",
     "qemu-img create -q -f qcow2 src.qcow2 8M; workload src.qcow2; "
     "qemu-img convert -c -O qcow2 -o cluster_size=2M,compression_type=zstd "
     "src.qcow2 img.qcow2"},
    {"backing_chain_smaller",
     "qemu-img create -q -f raw base.raw 1M; qemu-io -f raw -c 'write -P 0xa1 0 1M' base.raw "
     ">/dev/null; "
     "qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 3M; "
     "qemu-io -c 'write -P 0xa2 512k 1M' mid.qcow2 >/dev/null; "
     "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 img.qcow2 8M; "
     "qemu-io -c 'write -P 0xa3 900k 300k' -c 'write -z 64k 64k' img.qcow2 >/dev/null"},
    {"backing_unknown_format",
     "qemu-img create -q -f qcow2 base.qcow2 8M; workload base.qcow2; "
     "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2 8M; "
     "qemu-io -c 'write -P 0xb1 2M 64k' img.qcow2 >/dev/null; "
     "python3 -c \"import struct; f = open('img.qcow2', 'r+b'); d = f.read(65536); "
     "i = d.index(struct.pack('>I', 0xe2792aca)); f.seek(i); f.write(struct.pack('>I', 0x1234)); "
     "f.close()\"; qemu-img info img.qcow2 | grep -v 'backing file format'"},
    {"data_file",
     "qemu-img create -q -f qcow2 -o data_file=$PWD/img.data img.qcow2 8M; workload img.qcow2"},
    {"data_file_raw",
     "qemu-img create -q -f qcow2 -o data_file=$PWD/img.data,data_file_raw=on img.qcow2 8M; "
     "workload img.qcow2"},
    {"preallocated_metadata",
     "qemu-img create -q -f qcow2 -o preallocation=metadata img.qcow2 4M; "
     "qemu-io -c 'write -P 0x12 0 64k' -c 'write -z 128k 64k' img.qcow2 >/dev/null"},
    {"lazy_refcounts_dirty",
     "qemu-img create -q -f qcow2 -o lazy_refcounts=on img.qcow2 8M; "
     "qemu-io -c 'write -P 0x5a 0 512' -c 'write -P 0x5b 1M 64k' "
     "-c 'sigraise 9' img.qcow2 >/dev/null 2>&1 || true"},
};

INSTANTIATE_TEST_SUITE_P(Images, Qcow2ImageCases, ::testing::ValuesIn(kImageCases),
                         [](const auto& info) { return std::string(info.param.name); });

TEST_F(Qcow2ReadTest, FormatInfoMatchesQemuImgInfo) {
  struct Case {
    const char* create;
    nlohmann::json expected;
  };
  const Case cases[] = {
      {"qemu-img create -q -f qcow2 img.qcow2 1M",
       {{"compat", "1.1"},
        {"compression-type", "zlib"},
        {"lazy-refcounts", false},
        {"refcount-bits", 16},
        {"corrupt", false},
        {"extended-l2", false}}},
      {"qemu-img create -q -f qcow2 -o compat=0.10 img.qcow2 1M",
       {{"compat", "0.10"}, {"compression-type", "zlib"}, {"refcount-bits", 16}}},
      {"qemu-img create -q -f qcow2 -o extended_l2=on,refcount_bits=1,lazy_refcounts=on,"
       "compression_type=zstd,data_file=$PWD/img.data img.qcow2 1M",
       {{"compat", "1.1"},
        {"compression-type", "zstd"},
        {"lazy-refcounts", true},
        {"refcount-bits", 1},
        {"corrupt", false},
        {"extended-l2", true},
        {"data-file", "DIR/img.data"},
        {"data-file-raw", false}}},
  };
  for (const auto& c : cases) {
    ASSERT_EQ(run_in(dir(), std::string("rm -f img.*; ") + c.create +
                                "; qemu-img info --output=json img.qcow2 > info.json"),
              0);
    auto info = nlohmann::json::parse(slurp(dir() + "/info.json"));
    std::shared_ptr<Node> node = open(dir() + "/img.qcow2");
    ASSERT_NE(node, nullptr);
    nlohmann::json specific = node->format_specific_info();
    if (specific["data"].contains("data-file")) {
      std::string name = specific["data"]["data-file"];
      EXPECT_EQ(name, dir() + "/img.data");
      specific["data"]["data-file"] = "DIR/img.data";
      info["format-specific"]["data"]["data-file"] = "DIR/img.data";
    }
    EXPECT_EQ(specific["data"], c.expected);
    EXPECT_EQ(specific, info["format-specific"]) << c.create;
    EXPECT_EQ(node->cluster_size(), info["cluster-size"].get<uint64_t>());
    EXPECT_EQ(node->dirty_flag(), info["dirty-flag"].get<bool>());
    EXPECT_EQ(node->length(), info["virtual-size"].get<uint64_t>());
    graph_.detach_root(std::move(root_));
  }
}

TEST_F(Qcow2ReadTest, DirtyAndCorruptImagesOpenReadOnly) {
  ASSERT_EQ(run_in(dir(),
                   "qemu-img create -q -f qcow2 -o lazy_refcounts=on img.qcow2 1M\n"
                   "qemu-io -c 'write -P 0x5a 0 512' -c 'sigraise 9' img.qcow2 >/dev/null 2>&1 "
                   "|| true\n"
                   "qemu-img create -q -f qcow2 bad.qcow2 1M\n"
                   "qemu-io -c 'write -P 0x6b 0 4k' bad.qcow2 >/dev/null\n"
                   "printf '\\x02' | dd of=bad.qcow2 bs=1 seek=79 conv=notrunc status=none\n"),
            0)
      << slurp(dir() + "/script.log");
  std::shared_ptr<Node> dirty = open(dir() + "/img.qcow2");
  ASSERT_NE(dirty, nullptr);
  EXPECT_EQ(dirty->dirty_flag(), true);
  std::string data = read_all(*dirty);
  EXPECT_EQ(data.substr(0, 512), std::string(512, '\x5a'));

  std::shared_ptr<Node> corrupt = open(dir() + "/bad.qcow2");
  ASSERT_NE(corrupt, nullptr);
  EXPECT_EQ(corrupt->format_specific_info()["data"]["corrupt"], true);
  EXPECT_EQ(read_all(*corrupt).substr(0, 4096), std::string(4096, '\x6b'));
}

TEST_F(Qcow2ReadTest, ReadWriteOpenNeedsAWritableImage) {
  // Plain images and images with an external data file open read-write (the writers are tested
  // in qcow2_write_test.cc and qcow2_subcluster_test.cc).
  ASSERT_EQ(run_in(dir(),
                   "qemu-img create -q -f qcow2 img.qcow2 1M && "
                   "qemu-img create -q -f qcow2 -o data_file=$PWD/data.raw df.qcow2 1M"),
            0);
  EXPECT_EQ(open_error(dir() + "/img.qcow2", {{"read-only", false}}), "");
  EXPECT_EQ(open_error(dir() + "/df.qcow2", {{"read-only", false}}), "");
}

TEST_F(Qcow2ReadTest, BackingOptions) {
  ASSERT_EQ(run_in(dir(),
                   "qemu-img create -q -f qcow2 base.qcow2 1M\n"
                   "qemu-io -c 'write -P 0x31 0 1M' base.qcow2 >/dev/null\n"
                   "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2\n"
                   "qemu-io -c 'write -P 0x32 64k 64k' img.qcow2 >/dev/null\n"),
            0);
  const std::string image = dir() + "/img.qcow2";
  // Default: the header's backing file.
  std::shared_ptr<Node> node = open(image);
  ASSERT_NE(node, nullptr);
  ASSERT_NE(node->backing_child(), nullptr);
  EXPECT_EQ(node->backing_child()->node()->format_name(), std::string("qcow2"));
  EXPECT_EQ(node->exact_filename(), image);
  std::string data = read_all(*node);
  EXPECT_EQ(data.substr(0, 64 << 10), std::string(64 << 10, '\x31'));
  EXPECT_EQ(data.substr(64 << 10, 64 << 10), std::string(64 << 10, '\x32'));
  // backing: null reads zeroes where the top image has nothing.
  std::shared_ptr<Node> alone = open(image, {{"backing", nullptr}});
  ASSERT_NE(alone, nullptr);
  EXPECT_EQ(alone->backing_child(), nullptr);
  EXPECT_EQ(alone->exact_filename(), std::nullopt);
  data = read_all(*alone);
  EXPECT_EQ(data.substr(0, 64 << 10), std::string(64 << 10, '\0'));
  EXPECT_EQ(data.substr(64 << 10, 64 << 10), std::string(64 << 10, '\x32'));
  // A backing node given by reference.
  auto base =
      open_node(graph_, {{"driver", "raw"},
                         {"node-name", "rawbase"},
                         {"read-only", true},
                         {"file", {{"driver", "file"}, {"filename", dir() + "/base.qcow2"}}}});
  ASSERT_TRUE(base) << error_of(base);
  std::shared_ptr<Node> by_ref = open(image, {{"backing", "rawbase"}});
  ASSERT_NE(by_ref, nullptr);
  EXPECT_EQ(by_ref->backing_child()->node(), base->get());
  data = read_all(*by_ref);
  EXPECT_EQ(data.substr(0, 4), std::string("QFI\xfb"));
}

TEST_F(Qcow2ReadTest, JsonNamesInTheImageArePlainLocalPathsAndUrlsOpenTheirProtocol) {
  // CVE-2024-4467: a name that looks like a json: spec is only ever a (missing) local file. A
  // backing name that is an NBD or http(s) URL opens through that protocol, as in QEMU
  // (path_has_protocol), and is not combined with the image's directory.
  ASSERT_EQ(run_in(dir(),
                   "qemu-img create -q -f qcow2 -u -b 'nbd://127.0.0.1:1/x' -F raw b.qcow2 1M\n"
                   "qemu-img create -q -f qcow2 -u -b 'json:{\"driver\":\"null-co\"}' "
                   "-F raw j.qcow2 1M\n"),
            0)
      << slurp(dir() + "/script.log");
  std::string json_message = open_error(dir() + "/j.qcow2");
  EXPECT_NE(json_message.find(dir() + "/json:{"), std::string::npos) << json_message;
  EXPECT_EQ(open_error(dir() + "/b.qcow2"),
            "Could not open backing file: Failed to connect to '127.0.0.1:1': Connection refused");
}

TEST_F(Qcow2ReadTest, OptionsAreValidated) {
  ASSERT_EQ(run_in(dir(),
                   "qemu-img create -q -f qcow2 img.qcow2 1M\n"
                   "qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M\n"),
            0);
  const std::string image = dir() + "/img.qcow2";
  EXPECT_EQ(open_error(image, {{"l2-cache-entry-size", 100}}),
            "L2 cache entry size must be a power of two between 512 and the cluster size (65536)");
  EXPECT_EQ(
      open_error(image, {{"cache-size", 1}, {"l2-cache-size", 1}, {"refcount-cache-size", 1}}),
      "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time");
  EXPECT_EQ(open_error(image, {{"cache-size", 1000}, {"l2-cache-size", 2000}}),
            "l2-cache-size may not exceed cache-size");
  EXPECT_EQ(open_error(image, {{"encrypt", {{"format", "luks"}}}}),
            "No encryption in image header, but options specified format 'luks'");
  EXPECT_EQ(open_error(image, {{"overlap-check", "sometimes"}}),
            "Parameter 'overlap-check' does not accept value 'sometimes'");
  EXPECT_EQ(open_error(dir() + "/v2.qcow2", {{"lazy-refcounts", true}}),
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level");
  EXPECT_EQ(open_error(image, {{"data-file", {{"driver", "file"}, {"filename", image}}}}),
            "'data-file' can only be set for images with an external data file");
  EXPECT_EQ(open_error(image, {{"overlap-check", {{"template", "all"}, {"main-header", false}}},
                               {"cache-clean-interval", 0},
                               {"l2-cache-size", 1 << 20},
                               {"l2-cache-entry-size", 4096},
                               {"pass-discard-request", true},
                               {"discard-no-unref", true}}),
            "");
  // A tiny L2 cache still reads correctly (slices are evicted and reloaded).
  ASSERT_EQ(run_in(dir(),
                   "qemu-io -c 'write -P 0x42 0 512k' -c 'write -P 0x43 768k 64k' "
                   "img.qcow2 >/dev/null"),
            0);
  std::shared_ptr<Node> node = open(image, {{"l2-cache-size", 1024}, {"l2-cache-entry-size", 512}});
  ASSERT_NE(node, nullptr);
  auto& map = static_cast<qcow2::Qcow2Node&>(*node).cluster_map();
  EXPECT_EQ(map.l2_cache().capacity(), 2u);
  EXPECT_EQ(map.l2_cache().slice_bytes(), 512u);
  expect_same_as_qemu(*node, image);
  EXPECT_LE(map.l2_cache().cached(), 2u);
}

// cache-clean-interval: slices nobody used for a whole interval are dropped (QEMU drops them
// after one to two intervals); with 0 they stay.
TEST_F(Qcow2ReadTest, CacheCleanIntervalDropsUnusedSlices) {
  const std::string image = dir() + "/img.qcow2";
  ASSERT_EQ(run_in(dir(),
                   "qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 8M && "
                   "qemu-io -c 'write -P 0x42 0 1M' -c 'write -P 0x43 6M 1M' "
                   "img.qcow2 >/dev/null"),
            0);
  auto sleep = [this](std::chrono::milliseconds duration) {
    run([](aio::EventLoop& loop, std::chrono::milliseconds d) -> aio::Task<void> {
      co_await loop.sleep_for(d);
    }(*loop_, duration));
  };
  for (int interval : {1, 0}) {
    std::shared_ptr<Node> node;
    // Opened on the loop, as the daemon does, so that the timer runs there.
    run([&]() -> aio::Task<void> {
      node = open(image, {{"cache-clean-interval", interval}, {"l2-cache-entry-size", 4096}});
      co_return;
    }());
    ASSERT_NE(node, nullptr);
    auto& cache = static_cast<qcow2::Qcow2Node&>(*node).cluster_map().l2_cache();
    expect_same_as_qemu(*node, image);
    const size_t loaded = cache.cached();
    EXPECT_GE(loaded, 2u);
    sleep(std::chrono::milliseconds(3500));
    EXPECT_EQ(cache.cached(), interval == 0 ? loaded : 0u) << "interval " << interval;
    expect_same_as_qemu(*node, image);  // reloaded on demand
  }
}

// iotest 080-style malformed headers: each poke must give QEMU's own message for the same bytes.
struct Poke {
  const char* name;
  const char* python;  // statements run with `f` open on img.qcow2 (r+b) and `struct` imported
};

class Qcow2MalformedHeaders : public Qcow2ReadTest, public ::testing::WithParamInterface<Poke> {};

TEST_P(Qcow2MalformedHeaders, FailLikeQemu) {
  const Poke& poke = GetParam();
  std::string script = std::string(
                           "rm -f img.qcow2\n"
                           "qemu-img create -q -f qcow2 -b base.raw -F raw -u img.qcow2 64M\n"
                           "qemu-io -c 'write 0 512' img.qcow2 >/dev/null 2>&1 || true\n"
                           "python3 - <<'PY'\nimport struct\nf = open('img.qcow2', 'r+b')\n") +
                       poke.python + "\nf.close()\nPY\n";
  ASSERT_EQ(run_in(dir(), "qemu-img create -q -f raw base.raw 64M"), 0);
  ASSERT_EQ(run_in(dir(), script), 0) << slurp(dir() + "/script.log");
  const std::string image = dir() + "/img.qcow2";
  std::string qemu = qemu_open_error(dir(), image);
  ASSERT_FALSE(qemu.empty()) << "QEMU opened the poked image";
  EXPECT_EQ(open_error(image, {{"backing", nullptr}}), qemu);
}

const Poke kPokes[] = {
    {"magic", "f.seek(0); f.write(b'QFI\\0')"},
    {"version", "f.seek(4); f.write(struct.pack('>I', 4))"},
    {"cluster_bits_small", "f.seek(20); f.write(struct.pack('>I', 8))"},
    {"cluster_bits_large", "f.seek(20); f.write(struct.pack('>I', 22))"},
    {"header_length_short", "f.seek(100); f.write(struct.pack('>I', 100))"},
    {"header_length_huge", "f.seek(100); f.write(struct.pack('>I', 0xffffffff))"},
    {"backing_offset", "f.seek(8); f.write(struct.pack('>Q', 0x20000))"},
    {"extension_too_large", "f.seek(112 + 4); f.write(struct.pack('>I', 0x7fffffff))"},
    {"compression_bit", "f.seek(72); f.write(struct.pack('>Q', 8))"},
    {"compression_type", "f.seek(104); f.write(b'\\x05')"},
    {"unknown_feature", "f.seek(72); f.write(struct.pack('>Q', 1 << 40))"},
    {"unknown_feature_named",
     "f.seek(72); f.write(struct.pack('>Q', (1 << 40) | (1 << 41)))\n"
     "f.seek(112 + 8); data = bytearray(f.read(0x10000 - 120))\n"
     "import re\n"
     "i = 0\n"
     "while True:\n"
     "    magic, length = struct.unpack('>II', data[i:i+8])\n"
     "    if magic == 0x6803f857:\n"
     "        data[i+8:i+8+48] = bytes([0, 40]) + b'future feature'.ljust(46, b'\\0')\n"
     "        break\n"
     "    i += 8 + ((length + 7) & ~7)\n"
     "f.seek(112 + 8); f.write(data)"},
    {"subcluster_size",
     "f.seek(72); f.write(struct.pack('>Q', 1 << 4)); f.seek(20); "
     "f.write(struct.pack('>I', 13))"},
    {"refcount_order", "f.seek(96); f.write(struct.pack('>I', 7))"},
    {"encryption_method", "f.seek(32); f.write(struct.pack('>I', 3))"},
    {"no_refcount_table", "f.seek(56); f.write(struct.pack('>I', 0))"},
    {"refcount_table_too_large", "f.seek(56); f.write(struct.pack('>I', 0xffffffff))"},
    {"refcount_table_offset_unaligned", "f.seek(48); f.write(struct.pack('>Q', 0x10001))"},
    {"refcount_table_offset_huge", "f.seek(48); f.write(struct.pack('>Q', 0x7fffffffffff0000))"},
    {"too_many_snapshots", "f.seek(60); f.write(struct.pack('>I', 0xffffffff))"},
    {"snapshot_offset_unaligned",
     "f.seek(60); f.write(struct.pack('>I', 1)); f.seek(64); f.write(struct.pack('>Q', 0x123))"},
    {"snapshot_extra_data",
     "f.seek(60); f.write(struct.pack('>I', 1)); f.seek(64); f.write(struct.pack('>Q', 0x50000))\n"
     "f.seek(0x50000 + 32); f.write(struct.pack('>I', 4096))"},
    {"l1_too_large", "f.seek(36); f.write(struct.pack('>I', 0xffffffff))"},
    {"l1_offset_huge", "f.seek(40); f.write(struct.pack('>Q', 0x7fffffffffff0000))"},
    {"l1_offset_unaligned", "f.seek(40); f.write(struct.pack('>Q', 0x30001))"},
    {"l1_too_small", "f.seek(36); f.write(struct.pack('>I', 0))"},
    {"backing_name_too_long", "f.seek(16); f.write(struct.pack('>I', 0xffffffff))"},
    {"backing_format_too_long", "f.seek(112 + 4); f.write(struct.pack('>I', 20))"},
    {"data_file_bit_without_name", "f.seek(72); f.write(struct.pack('>Q', 4))"},
    {"data_file_raw_without_data_file", "f.seek(88); f.write(struct.pack('>Q', 2))"},
};

INSTANTIATE_TEST_SUITE_P(Pokes, Qcow2MalformedHeaders, ::testing::ValuesIn(kPokes),
                         [](const auto& info) { return std::string(info.param.name); });

// Corrupt tables found while reading: the request fails with EIO, nothing crashes.
TEST_F(Qcow2ReadTest, CorruptTablesFailReadsWithEio) {
  ASSERT_EQ(run_in(dir(),
                   "qemu-img create -q -f qcow2 img.qcow2 4M\n"
                   "qemu-io -c 'write -P 0x11 0 64k' img.qcow2 >/dev/null\n"
                   "python3 - <<'PY'\nimport struct\nf = open('img.qcow2', 'r+b')\n"
                   "f.seek(40); l1 = struct.unpack('>Q', f.read(8))[0]\n"
                   "f.seek(l1); l2 = struct.unpack('>Q', f.read(8))[0] & 0x00fffffffffffe00\n"
                   "f.seek(l2); f.write(struct.pack('>Q', (1 << 63) | 0x50200))\n"
                   "f.close()\nPY\n"),
            0)
      << slurp(dir() + "/script.log");
  std::shared_ptr<Node> node = open(dir() + "/img.qcow2");
  ASSERT_NE(node, nullptr);
  std::string buffer(512, '\0');
  Result<void> read = run(io::pread(*node, 0, buffer.data(), buffer.size()));
  ASSERT_FALSE(read);
  EXPECT_EQ(read.error().errno_value(), EIO);
  EXPECT_NE(read.error().message().find("Cluster allocation offset 0x50200 unaligned"),
            std::string::npos)
      << read.error().message();
  // Other clusters still read.
  read = run(io::pread(*node, 1 << 20, buffer.data(), buffer.size()));
  EXPECT_TRUE(read) << error_of(read);
}

}  // namespace
}  // namespace strata::block
