// The NBD client (handshake and ClientConnection) against strata's own server over a socket
// pair on one loop, and against scripted server byte streams (MemoryTransport) that break the
// protocol in the ways a hostile or buggy server can.

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "aio/event_loop.h"
#include "aio/task_group.h"
#include "block/graph/graph.h"
#include "nbd/client_connection.h"
#include "nbd/client_handshake.h"
#include "nbd/export.h"
#include "nbd/protocol.h"
#include "nbd/server_connection.h"
#include "nbd/transport.h"

namespace strata::nbd {
namespace {

// A 1 MiB node that reports the first 512 KiB as data and the rest as zero holes (the server
// sends holes for those without reading them).
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
  aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes, uint32_t) override {
    std::memset(bytes_.data() + offset, 0, bytes);
    co_return ok();
  }
  aio::Task<Result<block::BlockStatus>> co_block_status(uint64_t offset, uint64_t bytes) override {
    block::BlockStatus status;
    status.file = this;
    status.map_offset = offset;
    if (offset < kDataEnd) {
      status.bytes = std::min<uint64_t>(bytes, kDataEnd - offset);
      status.flags = block::BlockStatus::kData | block::BlockStatus::kAllocated;
    } else {
      status.bytes = bytes;
      status.flags = block::BlockStatus::kZero;
    }
    co_return status;
  }
  static constexpr uint64_t kDataEnd = 512 * 1024;
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

// Starts `tasks` inside the running loop (waits on coroutine primitives need one) and returns
// when all of them have finished.
aio::Task<void> run_all(std::vector<aio::Task<void>> tasks) {
  aio::TaskGroup group;
  for (auto& task : tasks) {
    group.spawn(std::move(task));
  }
  co_await group.wait();
}

// ---- against strata's server ----------------------------------------------------------------

class ClientAgainstServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto created = aio::EventLoop::create(64);
    ASSERT_TRUE(created.ok());
    loop_ = std::move(created).value();
    node_ = std::make_shared<MemoryNode>(1 << 20);
    ASSERT_TRUE(graph_.register_node(*node_).ok());
    graph_.add_monitor_ref(node_);
    ExportConfig config;
    config.name = "e";
    config.description = "the test export";
    config.writable = true;
    exports_.exp = std::make_shared<Export>("e", config, node_);
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds_), 0);
    server_transport_ = std::make_unique<SocketTransport>(*loop_, fds_[0]);
    client_transport_ = std::make_unique<SocketTransport>(*loop_, fds_[1]);
    server_ = std::make_unique<ServerConnection>(*server_transport_, exports_);
    tasks_.spawn(serve());
  }
  void TearDown() override {
    if (client_) {
      client_->shutdown();
    }
    server_->close();
    loop_->block_on(wait_for_tasks());
    client_.reset();
    server_.reset();
    ::close(fds_[0]);
    ::close(fds_[1]);
  }
  aio::Task<void> serve() { co_await server_->run(); }
  aio::Task<void> wait_for_tasks() { co_await tasks_.wait(); }

  // Handshakes for export `name`.
  Result<ExportInfo> connect(const std::string& name = "e") {
    ClientHandshakeRequest request;
    request.export_name = name;
    auto info = loop_->block_on(client_handshake(*client_transport_, request));
    if (info) {
      client_ = std::make_unique<ClientConnection>(*client_transport_, *info);
    }
    return info;
  }

  std::unique_ptr<aio::EventLoop> loop_;
  block::Graph graph_;
  std::shared_ptr<MemoryNode> node_;
  OneExport exports_;
  int fds_[2] = {-1, -1};
  std::unique_ptr<SocketTransport> server_transport_;
  std::unique_ptr<SocketTransport> client_transport_;
  std::unique_ptr<ServerConnection> server_;
  std::unique_ptr<ClientConnection> client_;
  aio::TaskGroup tasks_;
};

TEST_F(ClientAgainstServerTest, HandshakeGrantsStructuredRepliesAndBaseAllocation) {
  auto info = connect();
  ASSERT_TRUE(info.ok()) << info.error().message();
  EXPECT_EQ(info->size, 1u << 20);
  EXPECT_TRUE(info->structured_replies);
  EXPECT_TRUE(info->has_meta_context);
  EXPECT_EQ(info->flags & kFlagReadOnly, 0);
  EXPECT_NE(info->flags & kFlagSendFlush, 0);
  EXPECT_NE(info->min_block, 0u);
  EXPECT_GE(info->max_block, info->min_block);
}

TEST_F(ClientAgainstServerTest, UnknownExportIsRefusedWithTheServersMessage) {
  auto info = connect("missing");
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.error().message().rfind("Requested export not available\nserver reported: ", 0),
            0u)
      << info.error().message();
}

TEST_F(ClientAgainstServerTest, ManyRequestsInFlightReadBackWhatWasWritten) {
  ASSERT_TRUE(connect().ok());
  constexpr int kRequests = 40;  // more than kMaxInFlight: some wait for a slot
  std::vector<std::string> written(kRequests);
  std::vector<std::string> read(kRequests, std::string(4096, '\0'));
  int failures = 0;
  auto write_one = [&](int i) -> aio::Task<void> {
    written[i] = std::string(4096, static_cast<char>('a' + i % 26));
    auto done =
        co_await client_->write(uint64_t(i) * 4096, block::IoVector(written[i].data(), 4096), 0);
    failures += done ? 0 : 1;
  };
  std::vector<aio::Task<void>> writes;
  for (int i = 0; i < kRequests; ++i) {
    writes.push_back(write_one(i));
  }
  loop_->block_on(run_all(std::move(writes)));
  auto read_one = [&](int i) -> aio::Task<void> {
    auto done = co_await client_->read(uint64_t(i) * 4096, block::IoVector(read[i].data(), 4096));
    failures += done ? 0 : 1;
  };
  std::vector<aio::Task<void>> reads;
  for (int i = 0; i < kRequests; ++i) {
    reads.push_back(read_one(i));
  }
  loop_->block_on(run_all(std::move(reads)));
  EXPECT_EQ(failures, 0);
  for (int i = 0; i < kRequests; ++i) {
    EXPECT_EQ(read[i], written[i]) << "request " << i;
  }
  EXPECT_EQ(node_->bytes_[4096], 'b');
}

TEST_F(ClientAgainstServerTest, BlockStatusReportsDataThenZeroHole) {
  ASSERT_TRUE(connect().ok());
  auto data = loop_->block_on(client_->block_status(0, 1 << 20));
  ASSERT_TRUE(data.ok()) << data.error().message();
  EXPECT_EQ(data->length, MemoryNode::kDataEnd);
  EXPECT_EQ(data->flags & (kStateHole | kStateZero), 0u);
  auto hole = loop_->block_on(client_->block_status(MemoryNode::kDataEnd, 4096));
  ASSERT_TRUE(hole.ok()) << hole.error().message();
  EXPECT_EQ(hole->length, 4096u);
  EXPECT_NE(hole->flags & kStateZero, 0u);
}

TEST_F(ClientAgainstServerTest, WriteZeroesAndFlushReachTheNode) {
  ASSERT_TRUE(connect().ok());
  std::memset(node_->bytes_.data(), 0x55, 8192);
  auto zeroed = loop_->block_on(client_->command(kCmdWriteZeroes, kCmdFlagNoHole, 0, 4096));
  ASSERT_TRUE(zeroed.ok()) << zeroed.error().message();
  auto flushed = loop_->block_on(client_->command(kCmdFlush, 0, 0, 0));
  ASSERT_TRUE(flushed.ok()) << flushed.error().message();
  EXPECT_EQ(node_->bytes_[0], 0);
  EXPECT_EQ(node_->bytes_[4095], 0);
  EXPECT_EQ(node_->bytes_[4096], 0x55);
}

TEST_F(ClientAgainstServerTest, ListShowsTheExportAndItsDescription) {
  auto exports = loop_->block_on(client_list_exports(*client_transport_));
  ASSERT_TRUE(exports.ok()) << exports.error().message();
  ASSERT_EQ(exports->size(), 1u);
  EXPECT_EQ((*exports)[0].name, "e");
  EXPECT_EQ((*exports)[0].description, "the test export");
}

// ---- against scripted servers -----------------------------------------------------------------

constexpr uint32_t kContextId = 7;

std::string option_reply(uint32_t option, uint32_t type, const std::string& data) {
  std::string out;
  WireWriter w(out);
  w.u64(kRepMagic);
  w.u32(option);
  w.u32(type);
  w.u32(static_cast<uint32_t>(data.size()));
  w.bytes(data);
  return out;
}

// The scripted servers below answer structured replies only: the client must not ask for
// extended headers first.
ClientHandshakeRequest structured_only() {
  ClientHandshakeRequest request;
  request.extended_headers = false;
  return request;
}

// A well-behaved server's side of the handshake for a 1 MiB writable export; with `extended`,
// it grants extended headers (the client's first option) instead of structured replies.
std::string server_handshake(bool extended = false) {
  std::string out;
  WireWriter w(out);
  w.u64(kInitMagic);
  w.u64(kOptMagic);
  w.u16(kFlagFixedNewstyle | kFlagNoZeroes);
  out += extended ? option_reply(kOptExtendedHeaders, kRepAck, "")
                  : option_reply(kOptStructuredReply, kRepAck, "");
  std::string context;
  WireWriter(context).u32(kContextId);
  context += "base:allocation";
  out += option_reply(kOptSetMetaContext, kRepMetaContext, context);
  out += option_reply(kOptSetMetaContext, kRepAck, "");
  std::string export_info;
  WireWriter e(export_info);
  e.u16(kInfoExport);
  e.u64(1 << 20);
  e.u16(kFlagHasFlags | kFlagSendFlush);
  out += option_reply(kOptGo, kRepInfo, export_info);
  out += option_reply(kOptGo, kRepAck, "");
  return out;
}

std::string chunk(uint16_t flags, uint16_t type, uint64_t cookie, const std::string& payload) {
  std::string out;
  WireWriter w(out);
  w.u32(kStructuredReplyMagic);
  w.u16(flags);
  w.u16(type);
  w.u64(cookie);
  w.u32(static_cast<uint32_t>(payload.size()));
  w.bytes(payload);
  return out;
}

std::string extended_chunk(uint16_t flags, uint16_t type, uint64_t cookie, uint64_t offset,
                           const std::string& payload, uint64_t length_field = UINT64_MAX) {
  std::string out;
  WireWriter w(out);
  w.u32(kExtendedReplyMagic);
  w.u16(flags);
  w.u16(type);
  w.u64(cookie);
  w.u64(offset);
  w.u64(length_field != UINT64_MAX ? length_field : payload.size());
  w.bytes(payload);
  return out;
}

std::string data_payload(uint64_t offset, const std::string& data) {
  std::string out;
  WireWriter(out).u64(offset);
  return out + data;
}

class ScriptedServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto created = aio::EventLoop::create(16);
    ASSERT_TRUE(created.ok());
    loop_ = std::move(created).value();
  }
  // Runs one READ of `length` bytes at `offset` (cookie 1) against `replies`, after a handshake
  // with extended headers or structured replies.
  Result<void> read(const std::string& replies, uint64_t offset, std::string& buffer,
                    bool extended = false) {
    MemoryTransport transport(server_handshake(extended) + replies);
    ClientHandshakeRequest handshake = structured_only();
    handshake.extended_headers = extended;
    auto info = loop_->block_on(client_handshake(transport, handshake));
    EXPECT_TRUE(info.ok()) << info.error().message();
    if (!info) {
      return std::move(info).error();
    }
    EXPECT_EQ(info->meta_context_id, kContextId);
    ClientConnection connection(transport, *info);
    std::optional<Result<void>> result;
    auto request = [&]() -> aio::Task<void> {
      auto done = co_await connection.read(offset, block::IoVector(buffer.data(), buffer.size()));
      result = std::move(done);
    };
    std::vector<aio::Task<void>> tasks;
    tasks.push_back(request());
    loop_->block_on(run_all(std::move(tasks)));
    broken_ = connection.broken();
    failure_ = connection.failure();
    return *result;
  }

  std::unique_ptr<aio::EventLoop> loop_;
  bool broken_ = false;
  std::string failure_;
};

TEST_F(ScriptedServerTest, DataAndHoleChunksFillTheBuffer) {
  std::string buffer(8, 'x');
  std::string hole;
  WireWriter h(hole);
  h.u64(4);
  h.u32(4);
  auto done = read(chunk(0, kChunkOffsetData, 1, data_payload(0, "ABCD")) +
                       chunk(kReplyFlagDone, kChunkOffsetHole, 1, hole),
                   0, buffer);
  ASSERT_TRUE(done.ok()) << done.error().message();
  EXPECT_EQ(buffer, std::string("ABCD\0\0\0\0", 8));
}

TEST_F(ScriptedServerTest, ReplyForUnknownCookieBreaksTheConnection) {
  std::string buffer(4, 'x');
  auto done = read(chunk(kReplyFlagDone, kChunkOffsetData, 99, data_payload(0, "ABCD")), 0, buffer);
  ASSERT_FALSE(done.ok());
  EXPECT_EQ(done.error().errno_value(), EIO);
  EXPECT_TRUE(broken_);
  EXPECT_NE(failure_.find("unknown cookie 99"), std::string::npos) << failure_;
}

TEST_F(ScriptedServerTest, ChunkPastTheRequestBreaksTheConnection) {
  std::string buffer(4, 'x');
  auto done = read(chunk(kReplyFlagDone, kChunkOffsetData, 1, data_payload(2, "ABCD")), 0, buffer);
  ASSERT_FALSE(done.ok());
  EXPECT_EQ(done.error().errno_value(), EIO);
  EXPECT_NE(failure_.find("exceeding requested region"), std::string::npos) << failure_;
  EXPECT_EQ(buffer, "xxxx");
}

TEST_F(ScriptedServerTest, OversizedChunkLengthIsRefusedBeforeReading) {
  std::string buffer(4, 'x');
  std::string header;
  WireWriter w(header);
  w.u32(kStructuredReplyMagic);
  w.u16(kReplyFlagDone);
  w.u16(kChunkOffsetData);
  w.u64(1);
  w.u32(0xffffffffu);
  auto done = read(header, 0, buffer);
  ASSERT_FALSE(done.ok());
  EXPECT_TRUE(broken_);
  EXPECT_NE(failure_.find("invalid payload length"), std::string::npos) << failure_;
}

TEST_F(ScriptedServerTest, ErrorChunkFailsTheRequestOnly) {
  std::string buffer(4, 'x');
  std::string error;
  WireWriter w(error);
  w.u32(kEnospc);
  w.u16(4);
  w.bytes("full");
  auto done = read(chunk(kReplyFlagDone, kChunkError, 1, error), 0, buffer);
  ASSERT_FALSE(done.ok());
  EXPECT_EQ(done.error().errno_value(), ENOSPC);
  EXPECT_NE(done.error().message().find("full"), std::string::npos);
  // The connection only ends because the script ends.
  EXPECT_EQ(failure_.find("Protocol error"), std::string::npos) << failure_;
}

TEST_F(ScriptedServerTest, ErrorChunkWithErrorZeroIsAProtocolError) {
  std::string buffer(4, 'x');
  std::string error;
  WireWriter w(error);
  w.u32(0);
  w.u16(0);
  auto done = read(chunk(kReplyFlagDone, kChunkError, 1, error), 0, buffer);
  ASSERT_FALSE(done.ok());
  EXPECT_NE(failure_.find("error = 0"), std::string::npos) << failure_;
}

TEST_F(ScriptedServerTest, ReadNotCoveredCompletelyFails) {
  std::string buffer(8, 'x');
  auto done = read(chunk(kReplyFlagDone, kChunkOffsetData, 1, data_payload(0, "ABCD")), 0, buffer);
  ASSERT_FALSE(done.ok());
  EXPECT_EQ(done.error().errno_value(), EIO);
  EXPECT_NE(done.error().message().find("does not cover"), std::string::npos);
}

TEST_F(ScriptedServerTest, ServerThatHangsUpMidReplyFailsPendingRequests) {
  std::string buffer(8, 'x');
  std::string partial = chunk(kReplyFlagDone, kChunkOffsetData, 1, data_payload(0, "ABCDEFGH"));
  partial.resize(partial.size() - 3);
  auto done = read(partial, 0, buffer);
  ASSERT_FALSE(done.ok());
  EXPECT_EQ(done.error().errno_value(), EIO);
  EXPECT_TRUE(broken_);
}

TEST(ClientHandshakeTest, BadBlockSizesAreRefused) {
  auto created = aio::EventLoop::create(16);
  ASSERT_TRUE(created.ok());
  std::string bytes;
  WireWriter w(bytes);
  w.u64(kInitMagic);
  w.u64(kOptMagic);
  w.u16(kFlagFixedNewstyle | kFlagNoZeroes);
  bytes += option_reply(kOptStructuredReply, kRepErrUnsup, "");
  std::string sizes;
  WireWriter s(sizes);
  s.u16(kInfoBlockSize);
  s.u32(3);  // not a power of two
  s.u32(4096);
  s.u32(1 << 20);
  bytes += option_reply(kOptGo, kRepInfo, sizes);
  MemoryTransport transport(bytes);
  auto info = (*created)->block_on(client_handshake(transport, structured_only()));
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.error().message(), "server minimum block size 3 is not a power of two");
}

// CVE-2017-2630: a LIST reply whose name length exceeds the reply must be refused, not trusted.
TEST(ClientHandshakeTest, ListReplyWithNameLongerThanTheReplyIsRefused) {
  auto created = aio::EventLoop::create(16);
  ASSERT_TRUE(created.ok());
  std::string bytes;
  WireWriter w(bytes);
  w.u64(kInitMagic);
  w.u64(kOptMagic);
  w.u16(kFlagFixedNewstyle | kFlagNoZeroes);
  std::string entry;
  WireWriter e(entry);
  e.u32(0x7fffffff);
  e.bytes("abc");
  bytes += option_reply(kOptList, kRepServer, entry);
  MemoryTransport transport(bytes);
  auto exports = (*created)->block_on(client_list_exports(transport));
  ASSERT_FALSE(exports.ok());
  EXPECT_EQ(exports.error().message(), "incorrect option length 7");
}

TEST(ClientHandshakeTest, HugeOptionReplyIsRefusedBeforeReading) {
  auto created = aio::EventLoop::create(16);
  ASSERT_TRUE(created.ok());
  std::string bytes;
  WireWriter w(bytes);
  w.u64(kInitMagic);
  w.u64(kOptMagic);
  w.u16(kFlagFixedNewstyle | kFlagNoZeroes);
  w.u64(kRepMagic);
  w.u32(kOptStructuredReply);
  w.u32(kRepAck);
  w.u32(0xffffffffu);
  MemoryTransport transport(bytes);
  auto info = (*created)->block_on(client_handshake(transport, structured_only()));
  ASSERT_FALSE(info.ok());
  EXPECT_NE(info.error().message().find("is too long (4294967295 bytes)"), std::string::npos)
      << info.error().message();
}

// The client's STARTTLS request (QEMU's nbd_receive_starttls wording) answered by `reply`.
std::string starttls_refusal(const std::string& reply) {
  auto created = aio::EventLoop::create(16);
  EXPECT_TRUE(created.ok());
  std::string bytes;
  WireWriter w(bytes);
  w.u64(kInitMagic);
  w.u64(kOptMagic);
  w.u16(kFlagFixedNewstyle | kFlagNoZeroes);
  bytes += reply;
  MemoryTransport transport(bytes);
  ClientTls tls;  // never reaches the TLS handshake, so no credentials are needed
  auto info = (*created)->block_on(client_handshake(transport, ClientHandshakeRequest{}, &tls));
  EXPECT_FALSE(info.ok());
  EXPECT_EQ(tls.transport, nullptr);
  return info.ok() ? std::string() : info.error().message();
}

TEST(ClientHandshakeTest, StartTlsRefusalsNameTheReason) {
  EXPECT_EQ(starttls_refusal(option_reply(kOptStartTls, kRepErrUnsup, "")),
            "Server don't support STARTTLS option");
  EXPECT_EQ(starttls_refusal(option_reply(kOptStartTls, kRepErrPolicy, "")),
            "Denied by server for option 5 (starttls)");
  EXPECT_EQ(starttls_refusal(option_reply(kOptStartTls, kRepServer, "")),
            "Server answered option 5 (starttls) with unexpected reply 2 (server)");
  EXPECT_EQ(starttls_refusal(option_reply(kOptStartTls, kRepAck, "xy")),
            "Option 5 ('starttls') response length is 2 (it should be zero)");
  // A reply to another option is a protocol error, not a TLS session.
  EXPECT_FALSE(starttls_refusal(option_reply(kOptGo, kRepAck, "")).empty());
}

TEST_F(ScriptedServerTest, ExtendedChunksFillTheBuffer) {
  std::string buffer(8, 'x');
  std::string hole;
  WireWriter h(hole);
  h.u64(4);
  h.u32(4);
  auto done = read(extended_chunk(0, kChunkOffsetData, 1, 0, data_payload(0, "ABCD")) +
                       extended_chunk(kReplyFlagDone, kChunkOffsetHole, 1, 0, hole),
                   0, buffer, /*extended=*/true);
  ASSERT_TRUE(done.ok()) << done.error().message();
  EXPECT_EQ(buffer, std::string("ABCD\0\0\0\0", 8));
}

TEST_F(ScriptedServerTest, ExtendedChunkLengthIsCheckedBeforeReading) {
  std::string buffer(8, 'x');
  auto done = read(extended_chunk(kReplyFlagDone, kChunkOffsetData, 1, 0, "", 1ull << 40), 0,
                   buffer, /*extended=*/true);
  ASSERT_FALSE(done.ok());
  EXPECT_TRUE(broken_);
  EXPECT_NE(failure_.find("invalid payload length 1099511627776"), std::string::npos) << failure_;
}

TEST_F(ScriptedServerTest, StructuredReplyAfterExtendedHeadersIsAProtocolError) {
  std::string buffer(8, 'x');
  auto done = read(chunk(kReplyFlagDone, kChunkOffsetData, 1, data_payload(0, "ABCDEFGH")), 0,
                   buffer, /*extended=*/true);
  ASSERT_FALSE(done.ok());
  EXPECT_TRUE(broken_);
  EXPECT_NE(failure_.find("invalid reply magic"), std::string::npos) << failure_;
}

TEST_F(ClientAgainstServerTest, ExtendedHeadersAreNegotiatedAndCarryEveryCommand) {
  auto info = connect();
  ASSERT_TRUE(info.ok()) << info.error().message();
  EXPECT_TRUE(info->extended_headers);
  EXPECT_TRUE(info->structured_replies);
}

}  // namespace
}  // namespace strata::nbd
