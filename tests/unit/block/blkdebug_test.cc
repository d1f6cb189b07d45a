// The blkdebug filter (block/drivers/blkdebug) in a real graph: raw over blkdebug over a temporary
// file, opened through open_blockdev as blockdev-add does. Expected behaviour was checked against
// QEMU 10.0's blkdebug with qemu-io on the same graphs.

#include "block/drivers/blkdebug/blkdebug_node.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "aio/event_loop.h"
#include "block/drivers/blkdebug/config_file.h"
#include "block/drivers/blkdebug/rules.h"
#include "block/drivers/driver.h"
#include "block/io/request.h"

namespace strata::block {
namespace {

constexpr size_t kImageSize = 1 << 20;

// A guest device on top of the stack: takes read and write like qemu-io's BlockBackend, so that
// flushes reach the children it writes through.
class TestDevice : public BlockParent {
 public:
  std::string parent_description() const override { return "block device 'test'"; }
};

class BlkdebugTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto loop = aio::EventLoop::create();
    ASSERT_TRUE(loop) << loop.error().message();
    loop_ = std::move(*loop);
    char dir_template[] = "/tmp/blkdebug-test-XXXXXX";
    ASSERT_NE(mkdtemp(dir_template), nullptr);
    dir_ = dir_template;
    image_ = dir_ + "/img.raw";
    std::vector<uint8_t> pattern(kImageSize, 0x11);
    write_file(image_, std::string(pattern.begin(), pattern.end()));
  }

  void TearDown() override {
    reset_graph();
    graph_.reset();
    std::string command = "rm -rf " + dir_;
    ASSERT_EQ(std::system(command.c_str()), 0);
  }

  static void write_file(const std::string& path, const std::string& contents) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << contents;
  }

  // blockdev-add `options`; returns the node or the error message.
  Result<std::shared_ptr<Node>> add(const nlohmann::json& options) {
    ArgDecoder d(options);
    auto parsed = parse_blockdev_options(d, options);
    auto decoded = d.finish();
    if (!decoded) {
      return std::move(decoded).error();
    }
    auto node = open_blockdev(*graph_, *parsed);
    if (node) {
      graph_->add_monitor_ref(*node);
    }
    return node;
  }

  // raw (node "r") over blkdebug (node "bd", with `blkdebug` options) over the image file.
  std::shared_ptr<Node> add_stack(nlohmann::json blkdebug) {
    blkdebug["driver"] = "blkdebug";
    blkdebug["node-name"] = "bd";
    blkdebug["image"] = {{"driver", "file"}, {"node-name", "f"}, {"filename", image_}};
    auto node = add({{"driver", "raw"}, {"node-name", "r"}, {"file", blkdebug}});
    EXPECT_TRUE(node) << node.error().message();
    if (!node) {
      return nullptr;
    }
    auto root = graph_->attach_root(device_, *node, "root", kRoleImage,
                                    kPermConsistentRead | kPermWrite, kPermAll);
    EXPECT_TRUE(root) << root.error().message();
    if (root) {
      roots_.push_back(std::move(*root));
    }
    return *node;
  }

  void reset_graph() {
    for (auto& root : roots_) {
      graph_->detach_root(std::move(root));
    }
    roots_.clear();
    graph_ = std::make_unique<Graph>();
  }

  BlkdebugNode& blkdebug() { return static_cast<BlkdebugNode&>(*graph_->find("bd")); }

  // The errno of a failed request, 0 on success.
  int read(Node& node, uint64_t offset, std::vector<uint8_t>& buffer) {
    Result<void> result = loop_->block_on(io::pread(node, offset, buffer.data(), buffer.size()));
    return result ? 0 : result.error().errno_value();
  }
  int write(Node& node, uint64_t offset, const std::vector<uint8_t>& buffer) {
    Result<void> result = loop_->block_on(io::pwrite(node, offset, buffer.data(), buffer.size()));
    return result ? 0 : result.error().errno_value();
  }
  int flush(Node& node) {
    Result<void> result = loop_->block_on(io::flush(node));
    return result ? 0 : result.error().errno_value();
  }

  std::string file_bytes(uint64_t offset, size_t length) {
    std::ifstream in(image_, std::ios::binary);
    in.seekg(static_cast<std::streamoff>(offset));
    std::string data(length, '\0');
    in.read(data.data(), static_cast<std::streamsize>(length));
    return data;
  }

  std::unique_ptr<aio::EventLoop> loop_;
  TestDevice device_;
  std::vector<std::unique_ptr<Child>> roots_;
  std::unique_ptr<Graph> graph_ = std::make_unique<Graph>();
  std::string dir_;
  std::string image_;
};

TEST_F(BlkdebugTest, OnceRuleFailsOnlyTheFirstReadOfItsSector) {
  auto raw =
      add_stack({{"inject-error", {{{"event", "read_aio"}, {"sector", 8}, {"once", true}}}}});
  ASSERT_TRUE(raw);
  std::vector<uint8_t> buffer(512);
  // The event activates the rule, but the request does not cover sector 8.
  EXPECT_EQ(read(*raw, 0, buffer), 0);
  EXPECT_EQ(read(*raw, 4096, buffer), EIO);
  EXPECT_EQ(read(*raw, 4096, buffer), 0);
  EXPECT_EQ(buffer, std::vector<uint8_t>(512, 0x11));
  EXPECT_EQ(blkdebug().rules().rule_count(), 0u);
}

TEST_F(BlkdebugTest, PersistentEnospcOnWriteAlsoFailsLaterReads) {
  auto raw = add_stack({{"inject-error", {{{"event", "write_aio"}, {"errno", 28}}}}});
  ASSERT_TRUE(raw);
  std::vector<uint8_t> data(512, 0x22);
  EXPECT_EQ(write(*raw, 0, data), ENOSPC);
  EXPECT_EQ(write(*raw, 0, data), ENOSPC);
  EXPECT_EQ(file_bytes(0, 512), std::string(512, '\x11'));
  // QEMU keeps an active rule until another event replaces the active set, and the default
  // iotype mask includes reads: qemu-io shows "read failed: No space left on device" here too.
  std::vector<uint8_t> buffer(512);
  EXPECT_EQ(read(*raw, 0, buffer), ENOSPC);
}

TEST_F(BlkdebugTest, SetStateGatesARuleOnTheNextEvent) {
  auto raw = add_stack({{"set-state", {{{"event", "read_aio"}, {"state", 1}, {"new_state", 2}}}},
                        {"inject-error", {{{"event", "read_aio"}, {"state", 2}, {"once", true}}}}});
  ASSERT_TRUE(raw);
  EXPECT_EQ(blkdebug().rules().state(), 1);
  std::vector<uint8_t> buffer(512);
  // Rules see the state the event found: the first read moves to state 2 without failing.
  EXPECT_EQ(read(*raw, 0, buffer), 0);
  EXPECT_EQ(blkdebug().rules().state(), 2);
  EXPECT_EQ(read(*raw, 0, buffer), EIO);
  EXPECT_EQ(read(*raw, 0, buffer), 0);
}

TEST_F(BlkdebugTest, IotypeSelectsWhichRequestsFail) {
  // `none` fires when the node opens, so the rule is active from the start.
  auto raw = add_stack({{"inject-error", {{{"event", "none"}, {"iotype", "write"}}}}});
  ASSERT_TRUE(raw);
  std::vector<uint8_t> buffer(512);
  EXPECT_EQ(read(*raw, 0, buffer), 0);
  EXPECT_EQ(write(*raw, 0, buffer), EIO);
  Result<void> zeroes = loop_->block_on(io::pwrite_zeroes(*raw, 0, 4096));
  EXPECT_TRUE(zeroes) << zeroes.error().message();
  EXPECT_EQ(file_bytes(0, 4096), std::string(4096, '\0'));
}

TEST_F(BlkdebugTest, FlushFailsOnlyWhenSomethingWasWritten) {
  auto raw = add_stack({{"inject-error", {{{"event", "write_aio"}, {"iotype", "flush"}}}}});
  ASSERT_TRUE(raw);
  EXPECT_EQ(flush(*raw), 0);
  std::vector<uint8_t> data(512, 0x22);
  EXPECT_EQ(write(*raw, 0, data), 0);
  EXPECT_EQ(flush(*raw), EIO);
}

TEST_F(BlkdebugTest, FlushToDiskEventIsAnnouncedByTheParentFlush) {
  auto raw = add_stack({{"set-state", {{{"event", "flush_to_disk"}, {"new_state", 2}}}}});
  ASSERT_TRUE(raw);
  EXPECT_EQ(flush(*raw), 0);
  EXPECT_EQ(blkdebug().rules().state(), 1);  // nothing written: no disk flush due
  std::vector<uint8_t> data(512, 0x22);
  EXPECT_EQ(write(*raw, 0, data), 0);
  EXPECT_EQ(flush(*raw), 0);
  EXPECT_EQ(blkdebug().rules().state(), 2);
}

TEST_F(BlkdebugTest, NegativeErrnoCompletesWithoutIo) {
  auto raw = add_stack({{"inject-error", {{{"event", "read_aio"}, {"errno", -5}}}}});
  ASSERT_TRUE(raw);
  std::vector<uint8_t> buffer(512, 0xab);
  EXPECT_EQ(read(*raw, 0, buffer), 0);
  EXPECT_EQ(buffer, std::vector<uint8_t>(512, 0xab));
}

TEST_F(BlkdebugTest, AlignMakesUnalignedWritesReadModifyWrite) {
  auto raw = add_stack({{"align", 4096}});
  ASSERT_TRUE(raw);
  EXPECT_EQ(blkdebug().limits().request_alignment, 4096u);
  std::vector<uint8_t> data(512, 0x22);
  EXPECT_EQ(write(*raw, 1024, data), 0);
  EXPECT_EQ(file_bytes(0, 1024), std::string(1024, '\x11'));
  EXPECT_EQ(file_bytes(1024, 512), std::string(512, '\x22'));
  EXPECT_EQ(file_bytes(1536, 4096 - 1536), std::string(4096 - 1536, '\x11'));
  std::vector<uint8_t> buffer(512);
  EXPECT_EQ(read(*raw, 1024, buffer), 0);
  EXPECT_EQ(buffer, data);
}

TEST_F(BlkdebugTest, AlignWidensTheWriteThatReachesTheRule) {
  // Sector 0 lies outside [1024, 1536) but inside the aligned [0, 4096) blkdebug sees.
  nlohmann::json rule = {{"event", "none"}, {"iotype", "write"}, {"sector", 0}};
  auto raw = add_stack({{"align", 4096}, {"inject-error", {rule}}});
  ASSERT_TRUE(raw);
  std::vector<uint8_t> data(512, 0x22);
  EXPECT_EQ(write(*raw, 1024, data), EIO);
  raw.reset();
  reset_graph();
  raw = add_stack({{"inject-error", {rule}}});
  ASSERT_TRUE(raw);
  EXPECT_EQ(write(*raw, 1024, data), 0);
}

TEST_F(BlkdebugTest, ChildPermissionsTakeAndUnshare) {
  auto node = add({{"driver", "blkdebug"},
                   {"node-name", "bd"},
                   {"take-child-perms", {"write"}},
                   {"unshare-child-perms", {"resize"}},
                   {"image", {{"driver", "file"}, {"filename", image_}}}});
  ASSERT_TRUE(node) << node.error().message();
  const Child& edge = *(*node)->children().front();
  EXPECT_EQ(edge.name(), "image");
  EXPECT_EQ(edge.perm(), kPermWrite);
  EXPECT_EQ(edge.shared(), kPermAll & ~kPermResize);
}

TEST_F(BlkdebugTest, ConfigFileRules) {
  const std::string config = dir_ + "/rules.conf";
  write_file(config,
             "# fail reads once the state is 2\n"
             "[set-state]\n"
             "event = \"read_aio\"\n"
             "new_state = \"2\"\n"
             "\n"
             "[inject-error]\n"
             "event = \"read_aio\"\n"
             "state = \"2\"\n"
             "errno = \"0x1c\"\n");
  auto raw = add_stack({{"config", config}});
  ASSERT_TRUE(raw);
  std::vector<uint8_t> buffer(512);
  EXPECT_EQ(read(*raw, 0, buffer), 0);
  EXPECT_EQ(read(*raw, 0, buffer), ENOSPC);
  EXPECT_EQ(raw->filename(), "blkdebug:" + config + ":" + image_);
}

TEST_F(BlkdebugTest, ConfigFileErrorsUseQemuMessages) {
  struct Case {
    const char* text;
    const char* message;
  };
  const Case cases[] = {
      {"[foo]\nx = \"1\"\n", "There is no option group 'foo'"},
      {"garbage here\n", "no group defined"},
      {"[inject-error]\n   \n", "parse error"},
      {"[inject-error]\nevent=\"read_aio\"\n", "Invalid parameter 'event=\"read_aio\"'"},
      {"[inject-error]\nerrno = \"5\"\n", "Missing event name for rule"},
      {"[inject-error]\nevent = \"bogus\"\n", "invalid parameter value: bogus"},
      {"[inject-error]\nevent = \"read_aio\"\niotype = \"zz\"\n", "invalid parameter value: zz"},
      {"[set-state]\nevent = \"read_aio\"\nnew_state = \"x\"\n",
       "Parameter 'new_state' expects a number"},
      {"[inject-error]\nevent = \"read_aio\"\nonce = \"maybe\"\n",
       "Parameter 'once' expects 'on' or 'off'"},
      {"[inject-error \"a\"]\nevent = \"read_aio\"\n[inject-error \"a\"]\nevent = \"read_aio\"\n",
       "Duplicate ID 'a' for inject-error"},
      {"[inject-error]\nevent = \"read_aio\"\nerrno = \"99999999999999999999\"\n",
       "Value '99999999999999999999' is too large for parameter 'errno'"},
      {"[inject-error \"1a\"]\nevent = \"read_aio\"\n", "Parameter 'id' expects an identifier"},
      // Entries are checked in QEMU's QDict order, not file order.
      {"[inject-error]\nevent = \"read_aio\"\nfoo = \"1\"\nerrno = \"x\"\n",
       "Parameter 'errno' expects a number"},
      // A section is checked when the next one starts: the bad line comes first.
      {"[inject-error]\nevent = \"read_aio\"\n[foo]\n   \n", "parse error"},
  };
  for (const Case& c : cases) {
    auto specs = blkdebug::parse_config_text(c.text);
    Result<std::vector<blkdebug::Rule>> rules =
        specs ? blkdebug::make_rules(*specs) : Result<std::vector<blkdebug::Rule>>(specs.error());
    ASSERT_FALSE(rules) << c.text;
    EXPECT_EQ(rules.error().message(), c.message) << c.text;
  }
  auto missing = add({{"driver", "blkdebug"},
                      {"node-name", "bd"},
                      {"config", dir_},
                      {"image", {{"driver", "file"}, {"filename", image_}}}});
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().message(), "Cannot read config file: Is a directory");
}

TEST_F(BlkdebugTest, OptionErrorsUseQemuMessages) {
  const nlohmann::json image = {{"driver", "file"}, {"filename", image_}};
  struct Case {
    nlohmann::json options;
    const char* message;
  };
  const Case cases[] = {
      {{{"align", 3}}, "Cannot meet constraints with align 3"},
      {{{"align", 2147483648}}, "Cannot meet constraints with align 2147483648"},
      {{{"align", -1}}, "Value '-1' is out of range for parameter 'align'"},
      {{{"align", -1}, {"max-transfer", -1}},
       "Value '-1' is out of range for parameter 'max-transfer'"},
      {{{"max-transfer", 2147483648}}, "Parameter 'max-transfer' expects int32_t"},
      {{{"align", 4096}, {"max-transfer", 1000}}, "Cannot meet constraints with max-transfer 1000"},
      {{{"opt-write-zero", 1024}, {"max-write-zero", 1536}},
       "Cannot meet constraints with max-write-zero 1536"},
      {{{"opt-discard", 1024}, {"max-discard", 1536}},
       "Cannot meet constraints with max-discard 1536"},
      {{{"inject-error", {{{"event", "bogus"}}}}},
       "Parameter 'event' does not accept value 'bogus'"},
      {{{"inject-error", {nlohmann::json::object()}}},
       "Parameter 'inject-error[0].event' is missing"},
      {{{"set-state", {{{"event", "read_aio"}}}}}, "Parameter 'set-state[0].new_state' is missing"},
      {{{"take-child-perms", {"bogus"}}}, "Parameter 'null' does not accept value 'bogus'"},
      {{{"config", "/nonexistent/x"}},
       "Could not read blkdebug config file: No such file or directory"},
      {{{"inject-error", nlohmann::json::array()}, {"set-state", nlohmann::json::array()}},
       "Block protocol 'blkdebug' doesn't support the option 'set-state'"},
      {{{"unshare-child-perms", nlohmann::json::array()},
        {"take-child-perms", nlohmann::json::array()}},
       "Block protocol 'blkdebug' doesn't support the option 'take-child-perms'"},
  };
  for (const Case& c : cases) {
    nlohmann::json options = c.options;
    options["driver"] = "blkdebug";
    options["node-name"] = "bd";
    options["image"] = image;
    auto node = add(options);
    ASSERT_FALSE(node) << options.dump();
    EXPECT_EQ(node.error().message(), c.message) << options.dump();
    EXPECT_EQ(graph_->find("bd"), nullptr);
  }
}

TEST(BlkdebugRuleEngineTest, EventWithoutMatchingInjectRuleKeepsTheActiveSet) {
  blkdebug::RuleEngine engine;
  blkdebug::Rule first;
  first.event = BlkdebugEvent::kReadAio;
  first.error = 5;
  blkdebug::Rule second = first;
  second.error = 28;
  engine.add(first);
  engine.add(second);
  engine.on_event(BlkdebugEvent::kReadAio);
  // Active rules are checked in the order they were added.
  auto injection = engine.check(0, 512, blkdebug::IoType::kRead);
  ASSERT_TRUE(injection);
  EXPECT_EQ(injection->error, 5);
  engine.on_event(BlkdebugEvent::kWriteAio);
  EXPECT_EQ(engine.active_count(), 2u);
  // Flush has no range: only sector -1 rules apply.
  blkdebug::RuleEngine sector_engine;
  blkdebug::Rule sector_rule = first;
  sector_rule.offset = 0;
  sector_engine.add(sector_rule);
  sector_engine.on_event(BlkdebugEvent::kReadAio);
  EXPECT_FALSE(sector_engine.check(0, 0, blkdebug::IoType::kFlush));
  EXPECT_TRUE(sector_engine.check(0, 512, blkdebug::IoType::kRead));
}

}  // namespace
}  // namespace strata::block
