// ServerConnection over the in-memory transport: the protocol state machine without sockets.
// Each test scripts a client's bytes, runs the connection to its end and decodes the replies.

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "aio/event_loop.h"
#include "block/graph/graph.h"
#include "nbd/export.h"
#include "nbd/protocol.h"
#include "nbd/server_connection.h"
#include "nbd/transport.h"

namespace strata::nbd {
namespace {

class MemoryNode final : public block::Node {
 public:
  explicit MemoryNode(size_t size) : Node(options()), bytes_(size, 0) {}
  static block::CommonOptions options() {
    block::CommonOptions common;
    common.node_name = "mem";
    return common;
  }
  const char* driver_name() const override { return "test-memory"; }
  uint64_t length() const override { return bytes_.size(); }
  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, block::IoVector qiov,
                                    uint32_t) override {
    qiov.copy_from(0, bytes_.data() + offset, bytes);
    co_return ok();
  }
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, block::IoVector qiov,
                                     uint32_t) override {
    qiov.copy_to(0, bytes_.data() + offset, bytes);
    co_return ok();
  }
  std::vector<uint8_t> bytes_;
};

class OneExport final : public ExportDirectory {
 public:
  std::shared_ptr<Export> find_export(std::string_view name) const override {
    return exp && exp->name() == name ? exp : nullptr;
  }
  std::vector<std::shared_ptr<Export>> list_exports() const override { return {exp}; }
  std::shared_ptr<Export> exp;
};

std::string option(uint32_t opt, const std::string& data) {
  std::string out;
  WireWriter w(out);
  w.u64(kOptMagic);
  w.u32(opt);
  w.u32(static_cast<uint32_t>(data.size()));
  w.bytes(data);
  return out;
}

std::string go_payload(const std::string& name) {
  std::string out;
  WireWriter w(out);
  w.u32(static_cast<uint32_t>(name.size()));
  w.bytes(name);
  w.u16(0);
  return out;
}

std::string request(uint16_t type, uint64_t offset, uint32_t length, uint64_t cookie,
                    uint16_t flags = 0) {
  std::string out;
  WireWriter w(out);
  w.u32(kRequestMagic);
  w.u16(flags);
  w.u16(type);
  w.u64(cookie);
  w.u64(offset);
  w.u32(length);
  return out;
}

std::string client_flags() {
  std::string out;
  WireWriter(out).u32(kClientFixedNewstyle | kClientNoZeroes);
  return out;
}

class ServerConnectionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto created = aio::EventLoop::create(16);
    ASSERT_TRUE(created.ok());
    loop_ = std::move(created).value();
    node_ = std::make_shared<MemoryNode>(1 << 20);
    ASSERT_TRUE(graph_.register_node(*node_).ok());
    graph_.add_monitor_ref(node_);
    ExportConfig config;
    config.name = "e";
    config.writable = true;
    exports_.exp = std::make_shared<Export>("e", config, node_);
  }
  // Runs a connection over `input`; returns everything the server wrote.
  std::string run(const std::string& input) {
    MemoryTransport transport(input);
    {
      ServerConnection connection(transport, exports_);
      loop_->block_on(connection.run());
    }
    return transport.output();
  }

  std::unique_ptr<aio::EventLoop> loop_;
  block::Graph graph_;
  std::shared_ptr<MemoryNode> node_;
  OneExport exports_;
};

// Skips the greeting (18 bytes) and the option replies of one GO (INFO replies + ACK).
size_t skip_go_replies(const std::string& out) {
  size_t pos = 18;
  while (pos + 20 <= out.size()) {
    WireReader r(out.data() + pos, out.size() - pos);
    r.u64();
    r.u32();
    uint32_t type = r.u32();
    uint32_t length = r.u32();
    pos += 20 + length;
    if (type == kRepAck || (type & kRepErrorBit) != 0) {
      break;
    }
  }
  return pos;
}

TEST_F(ServerConnectionTest, WriteThenReadWithSimpleReplies) {
  std::string input = client_flags() + option(kOptGo, go_payload("e"));
  input += request(kCmdWrite, 4096, 8, 1) + "ABCDEFGH";
  input += request(kCmdRead, 4096, 8, 2);
  input += request(kCmdDisc, 0, 0, 3);
  std::string out = run(input);
  size_t pos = skip_go_replies(out);
  ASSERT_EQ(out.size(), pos + 16 + 16 + 8);
  WireReader r(out.data() + pos, out.size() - pos);
  EXPECT_EQ(r.u32(), kSimpleReplyMagic);
  EXPECT_EQ(r.u32(), 0u);
  EXPECT_EQ(r.u64(), 1u);
  EXPECT_EQ(r.u32(), kSimpleReplyMagic);
  EXPECT_EQ(r.u32(), 0u);
  EXPECT_EQ(r.u64(), 2u);
  EXPECT_EQ(r.bytes(8), "ABCDEFGH");
  EXPECT_EQ(std::memcmp(node_->bytes_.data() + 4096, "ABCDEFGH", 8), 0);
}

TEST_F(ServerConnectionTest, StructuredReadIsOneDataChunkWithDone) {
  std::string input = client_flags() + option(kOptStructuredReply, "") +
                      option(kOptGo, go_payload("e")) + request(kCmdRead, 0, 512, 7);
  std::string out = run(input);
  size_t pos = 18 + 20;  // greeting, STRUCTURED_REPLY ack
  pos = skip_go_replies(out.substr(0, 18) + out.substr(pos)) + 20;
  WireReader r(out.data() + pos, out.size() - pos);
  EXPECT_EQ(r.u32(), kStructuredReplyMagic);
  EXPECT_EQ(r.u16(), kReplyFlagDone);
  EXPECT_EQ(r.u16(), kChunkOffsetData);
  EXPECT_EQ(r.u64(), 7u);
  EXPECT_EQ(r.u32(), 8u + 512u);
  EXPECT_EQ(r.u64(), 0u);
  EXPECT_EQ(r.remaining(), 512u);
}

TEST_F(ServerConnectionTest, OversizedWriteGetsEinvalAndEndsTheConnection) {
  std::string input = client_flags() + option(kOptGo, go_payload("e"));
  input += request(kCmdWrite, 0, kMaxBufferSize + 1, 1);
  input += request(kCmdRead, 0, 8, 2);  // never read: the stream is lost after the bad write
  std::string out = run(input);
  size_t pos = skip_go_replies(out);
  ASSERT_EQ(out.size(), pos + 16);
  WireReader r(out.data() + pos, 16);
  EXPECT_EQ(r.u32(), kSimpleReplyMagic);
  EXPECT_EQ(r.u32(), uint32_t{kEinval});
  EXPECT_EQ(r.u64(), 1u);
}

TEST_F(ServerConnectionTest, OversizedReadGetsEinvalAndTheConnectionLives) {
  std::string input = client_flags() + option(kOptGo, go_payload("e"));
  input += request(kCmdRead, 0, kMaxBufferSize + 1, 1);
  input += request(kCmdRead, (1ull << 20) - 4, 8, 2);  // past the end
  input += request(kCmdRead, 0, 4, 3);
  std::string out = run(input);
  size_t pos = skip_go_replies(out);
  ASSERT_EQ(out.size(), pos + 16 * 3 + 4);
  WireReader r(out.data() + pos, out.size() - pos);
  for (uint64_t cookie : {1u, 2u}) {
    EXPECT_EQ(r.u32(), kSimpleReplyMagic);
    EXPECT_EQ(r.u32(), uint32_t{kEinval});
    EXPECT_EQ(r.u64(), cookie);
  }
  EXPECT_EQ(r.u32(), kSimpleReplyMagic);
  EXPECT_EQ(r.u32(), 0u);
}

TEST_F(ServerConnectionTest, LongNamesAreRefusedWithShortMessages) {
  std::string name(4097, 'a');
  std::string input = client_flags() + option(kOptGo, go_payload(name)) +
                      option(kOptGo, go_payload(std::string(4096, 'a')));
  std::string out = run(input);
  WireReader r(out.data() + 18, out.size() - 18);
  r.u64();
  r.u32();
  EXPECT_EQ(r.u32(), uint32_t{kRepErrInvalid});
  uint32_t length = r.u32();
  EXPECT_EQ(r.bytes(length), "Invalid name length: 4097");
  r.u64();
  r.u32();
  EXPECT_EQ(r.u32(), uint32_t{kRepErrUnknown});
  length = r.u32();
  EXPECT_EQ(r.bytes(length), "export '" + std::string(80, 'a') + "...' not present");
}

TEST_F(ServerConnectionTest, OptionOver32MiBEndsTheConnection) {
  std::string input = client_flags();
  WireWriter w(input);
  w.u64(kOptMagic);
  w.u32(kOptList);
  w.u32(kMaxBufferSize + 1);
  input += option(kOptList, "");
  std::string out = run(input);
  EXPECT_EQ(out.size(), 18u);  // the greeting only
}

TEST_F(ServerConnectionTest, DataHintGrowsOverTouchingRunsOnly) {
  Export& exp = *exports_.exp;
  EXPECT_FALSE(exp.data_hint_covers(0, 1));
  exp.set_data_hint(4096, 8192);
  EXPECT_TRUE(exp.data_hint_covers(4096, 4096));
  EXPECT_FALSE(exp.data_hint_covers(4095, 2));
  exp.set_data_hint(0, 4096);  // touches: extends
  EXPECT_TRUE(exp.data_hint_covers(0, 8192));
  exp.set_data_hint(16384, 20480);  // apart: replaces
  EXPECT_FALSE(exp.data_hint_covers(0, 4096));
  EXPECT_TRUE(exp.data_hint_covers(16384, 4096));
  EXPECT_FALSE(exp.data_hint_covers(16384, 4097));
}

TEST(WireReaderTest, ReadsPastTheEndFail) {
  const char bytes[3] = {1, 2, 3};
  WireReader r(bytes, sizeof(bytes));
  EXPECT_EQ(r.u16(), 0x0102u);
  EXPECT_FALSE(r.failed());
  EXPECT_EQ(r.u16(), 0u);
  EXPECT_TRUE(r.failed());
  EXPECT_EQ(r.bytes(1), "");
}

}  // namespace
}  // namespace strata::nbd
