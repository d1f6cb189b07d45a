// TlsTransport client against TlsTransport server over a socketpair on one event loop, with
// x509 certificates made by certtool (skipped when certtool is missing) and a PSK file; and the
// forced-TLS rules of ServerConnection before STARTTLS over the in-memory transport.

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "aio/event_loop.h"
#include "aio/task_group.h"
#include "crypto/tls_creds.h"
#include "nbd/export.h"
#include "nbd/protocol.h"
#include "nbd/server_connection.h"
#include "nbd/tls_transport.h"
#include "nbd/transport.h"

namespace strata::nbd {
namespace {

namespace fs = std::filesystem;

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
}

bool run_quietly(const std::string& command) {
  return std::system((command + " >/dev/null 2>&1").c_str()) == 0;
}

// A CA, a server certificate for localhost/127.0.0.1 and a client certificate
// (C=GB,O=Test,CN=client) in <root>/server and <root>/client, QEMU's file names; a second CA's
// client certificate in <root>/rogue.
bool make_certificates(const fs::path& root) {
  for (const char* dir : {"server", "client", "rogue", "tmp"}) {
    fs::create_directories(root / dir);
  }
  const fs::path tmp = root / "tmp";
  write_file(tmp / "ca.info", "cn = Test CA\nca\ncert_signing_key\nexpiration_days = 2\n");
  write_file(tmp / "server.info",
             "organization = Test\ncn = localhost\ndns_name = localhost\nip_address = "
             "127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n");
  write_file(tmp / "client.info",
             "country = GB\norganization = Test\ncn = client\ntls_www_client\nencryption_key\n"
             "signing_key\nexpiration_days = 2\n");
  auto key = [&](const fs::path& out) {
    return run_quietly("certtool --generate-privkey --key-type=rsa --bits=2048 --outfile " +
                       out.string());
  };
  auto self_signed = [&](const fs::path& ca_key, const fs::path& out) {
    return run_quietly("certtool --generate-self-signed --load-privkey " + ca_key.string() +
                       " --template " + (tmp / "ca.info").string() + " --outfile " + out.string());
  };
  auto sign = [&](const fs::path& ca_cert, const fs::path& ca_key, const fs::path& key_file,
                  const char* info, const fs::path& out) {
    return run_quietly("certtool --generate-certificate --load-ca-certificate " + ca_cert.string() +
                       " --load-ca-privkey " + ca_key.string() + " --load-privkey " +
                       key_file.string() + " --template " + (tmp / info).string() + " --outfile " +
                       out.string());
  };
  bool made = key(tmp / "ca-key.pem") &&
              self_signed(tmp / "ca-key.pem", root / "server/ca-cert.pem") &&
              key(root / "server/server-key.pem") &&
              sign(root / "server/ca-cert.pem", tmp / "ca-key.pem", root / "server/server-key.pem",
                   "server.info", root / "server/server-cert.pem") &&
              key(root / "client/client-key.pem") &&
              sign(root / "server/ca-cert.pem", tmp / "ca-key.pem", root / "client/client-key.pem",
                   "client.info", root / "client/client-cert.pem") &&
              key(tmp / "rogue-ca-key.pem") &&
              self_signed(tmp / "rogue-ca-key.pem", root / "rogue/ca-cert.pem") &&
              key(root / "rogue/client-key.pem") &&
              sign(root / "rogue/ca-cert.pem", tmp / "rogue-ca-key.pem",
                   root / "rogue/client-key.pem", "client.info", root / "rogue/client-cert.pem");
  if (made) {
    fs::copy_file(root / "server/ca-cert.pem", root / "client/ca-cert.pem");
  }
  return made;
}

class TlsTransportTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ =
        new fs::path(fs::temp_directory_path() / ("strata-tls-test-" + std::to_string(::getpid())));
    have_certs_ = run_quietly("certtool --version") && make_certificates(*root_);
    fs::create_directories(*root_ / "psk-server");
    fs::create_directories(*root_ / "psk-client");
    fs::create_directories(*root_ / "psk-wrong");
    write_file(*root_ / "psk-server/keys.psk", "alice:0123456789abcdef0123456789abcdef\n");
    write_file(*root_ / "psk-client/keys.psk", "alice:0123456789abcdef0123456789abcdef\n");
    write_file(*root_ / "psk-wrong/keys.psk", "alice:ffffffffffffffffffffffffffffffff\n");
  }
  static void TearDownTestSuite() {
    std::error_code ignored;
    fs::remove_all(*root_, ignored);
    delete root_;
  }
  void SetUp() override {
    auto created = aio::EventLoop::create(16);
    ASSERT_TRUE(created.ok());
    loop_ = std::move(created).value();
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds_), 0);
  }
  void TearDown() override {
    ::close(fds_[0]);
    ::close(fds_[1]);
  }

  std::shared_ptr<const crypto::TlsCreds> x509(const char* dir, crypto::TlsEndpoint endpoint) {
    crypto::TlsCredsX509Options options;
    options.dir = (*root_ / dir).string();
    options.endpoint = endpoint;
    auto creds = crypto::load_x509_creds(options);
    EXPECT_TRUE(creds.ok()) << (creds.ok() ? "" : creds.error().message());
    return creds.ok() ? creds.value() : nullptr;
  }
  std::shared_ptr<const crypto::TlsCreds> psk(const char* dir, crypto::TlsEndpoint endpoint) {
    crypto::TlsCredsPskOptions options;
    options.dir = (*root_ / dir).string();
    options.endpoint = endpoint;
    if (endpoint == crypto::TlsEndpoint::kClient) {
      options.username = "alice";
    }
    auto creds = crypto::load_psk_creds(options);
    EXPECT_TRUE(creds.ok()) << (creds.ok() ? "" : creds.error().message());
    return creds.ok() ? creds.value() : nullptr;
  }

  struct Outcome {
    std::optional<Error> server_error;
    std::optional<Error> client_error;
    std::string server_peer;
    std::string echoed;  // what the client read back
  };

  // Handshakes both sides; on success the client sends `payload`, the server echoes it back.
  Outcome exchange(std::shared_ptr<const crypto::TlsCreds> server_creds,
                   crypto::TlsSession::Authorizer authorize,
                   std::shared_ptr<const crypto::TlsCreds> client_creds,
                   std::optional<std::string> hostname, const std::string& payload) {
    Outcome outcome;
    SocketTransport server_socket(*loop_, fds_[0]);
    SocketTransport client_socket(*loop_, fds_[1]);
    auto server = [&]() -> aio::Task<void> {
      auto tls = co_await TlsTransport::accept(server_socket, server_creds, authorize);
      if (!tls) {
        outcome.server_error = tls.error();
        server_socket.shutdown();
        co_return;
      }
      outcome.server_peer = (*tls)->peer_name();
      std::string buffer(payload.size(), '\0');
      if (co_await (*tls)->read_exact(buffer.data(), buffer.size())) {
        iovec iov{buffer.data(), buffer.size()};
        co_await (*tls)->write_all({&iov, 1});
      }
    };
    auto client = [&]() -> aio::Task<void> {
      auto tls = co_await TlsTransport::connect(client_socket, client_creds, hostname);
      if (!tls) {
        outcome.client_error = tls.error();
        client_socket.shutdown();
        co_return;
      }
      std::string data = payload;
      iovec iov{data.data(), data.size()};
      if (co_await (*tls)->write_all({&iov, 1})) {
        std::string back(payload.size(), '\0');
        if (co_await (*tls)->read_exact(back.data(), back.size())) {
          outcome.echoed = back;
        }
      }
    };
    loop_->block_on([&]() -> aio::Task<void> {
      aio::TaskGroup group;
      group.spawn(server());
      group.spawn(client());
      co_await group.wait();
    }());
    return outcome;
  }

  static std::string pattern(size_t size) {
    std::string data(size, '\0');
    for (size_t i = 0; i < size; ++i) {
      data[i] = static_cast<char>(i * 7 + i / 4096);
    }
    return data;
  }

  static fs::path* root_;
  static bool have_certs_;
  std::unique_ptr<aio::EventLoop> loop_;
  int fds_[2] = {-1, -1};
};

fs::path* TlsTransportTest::root_ = nullptr;
bool TlsTransportTest::have_certs_ = false;

#define REQUIRE_CERTS()                                       \
  if (!have_certs_) {                                         \
    GTEST_SKIP() << "certtool (gnutls-bin) is not installed"; \
  }

TEST_F(TlsTransportTest, X509EchoesThreeMebibytesAndReportsClientName) {
  REQUIRE_CERTS();
  std::string payload = pattern(3 << 20);
  auto outcome = exchange(x509("server", crypto::TlsEndpoint::kServer), {},
                          x509("client", crypto::TlsEndpoint::kClient), "localhost", payload);
  ASSERT_FALSE(outcome.server_error) << outcome.server_error->message();
  ASSERT_FALSE(outcome.client_error) << outcome.client_error->message();
  EXPECT_EQ(outcome.server_peer, "C=GB,O=Test,CN=client");
  EXPECT_TRUE(outcome.echoed == payload);
}

TEST_F(TlsTransportTest, ClientRefusesWrongHostname) {
  REQUIRE_CERTS();
  auto outcome = exchange(x509("server", crypto::TlsEndpoint::kServer), {},
                          x509("client", crypto::TlsEndpoint::kClient), "example.org", "x");
  ASSERT_TRUE(outcome.client_error);
  EXPECT_EQ(outcome.client_error->message(), "Certificate does not match the hostname example.org");
}

TEST_F(TlsTransportTest, ServerRefusesClientOfAnotherCa) {
  REQUIRE_CERTS();
  crypto::TlsCredsX509Options options;
  options.dir = (*root_ / "rogue").string();
  options.endpoint = crypto::TlsEndpoint::kClient;
  auto rogue = crypto::load_x509_creds(options);
  ASSERT_TRUE(rogue.ok()) << rogue.error().message();
  // The rogue client trusts its own CA only, so both sides refuse each other.
  auto outcome =
      exchange(x509("server", crypto::TlsEndpoint::kServer), {}, rogue.value(), "localhost", "x");
  EXPECT_TRUE(outcome.server_error || outcome.client_error);
  EXPECT_TRUE(outcome.echoed.empty());
}

TEST_F(TlsTransportTest, AuthorizerDeniesClient) {
  REQUIRE_CERTS();
  std::string seen;
  auto deny = [&](const std::string& name) -> Result<void> {
    seen = name;
    return make_error(ErrorKind::kPermission, "TLS x509 authz check for " + name + " is denied");
  };
  auto outcome = exchange(x509("server", crypto::TlsEndpoint::kServer), deny,
                          x509("client", crypto::TlsEndpoint::kClient), "localhost", "x");
  ASSERT_TRUE(outcome.server_error);
  EXPECT_EQ(outcome.server_error->message(),
            "TLS x509 authz check for C=GB,O=Test,CN=client is denied");
  EXPECT_EQ(seen, "C=GB,O=Test,CN=client");
  EXPECT_TRUE(outcome.echoed.empty());
}

TEST_F(TlsTransportTest, PskEchoesAndReportsUsername) {
  auto outcome =
      exchange(psk("psk-server", crypto::TlsEndpoint::kServer), {},
               psk("psk-client", crypto::TlsEndpoint::kClient), std::nullopt, pattern(100000));
  ASSERT_FALSE(outcome.server_error) << outcome.server_error->message();
  ASSERT_FALSE(outcome.client_error) << outcome.client_error->message();
  EXPECT_EQ(outcome.server_peer, "alice");
  EXPECT_EQ(outcome.echoed.size(), 100000u);
}

TEST_F(TlsTransportTest, PskWrongKeyFailsBothSides) {
  auto outcome = exchange(psk("psk-server", crypto::TlsEndpoint::kServer), {},
                          psk("psk-wrong", crypto::TlsEndpoint::kClient), std::nullopt, "x");
  EXPECT_TRUE(outcome.server_error);
  EXPECT_TRUE(outcome.client_error);
  EXPECT_TRUE(outcome.echoed.empty());
}

TEST_F(TlsTransportTest, PlaintextInsteadOfClientHelloFailsHandshake) {
  auto creds = psk("psk-server", crypto::TlsEndpoint::kServer);
  std::string garbage = "\x49\x48\x41\x56\x45\x4f\x50\x54 plaintext option bytes";
  ASSERT_EQ(::write(fds_[1], garbage.data(), garbage.size()), static_cast<ssize_t>(garbage.size()));
  SocketTransport server_socket(*loop_, fds_[0]);
  auto result = loop_->block_on(TlsTransport::accept(server_socket, creds, {}));
  ASSERT_FALSE(result.ok());
}

TEST(CredsLoading, MissingFilesUseQemuText) {
  crypto::TlsCredsX509Options options;
  options.dir = "/nonexistent-strata-dir";
  options.endpoint = crypto::TlsEndpoint::kServer;
  auto creds = crypto::load_x509_creds(options);
  ASSERT_FALSE(creds.ok());
  EXPECT_EQ(creds.error().message(),
            "Unable to access credentials /nonexistent-strata-dir/ca-cert.pem: No such file or "
            "directory");
  crypto::TlsCredsPskOptions psk_options;
  psk_options.dir = "/nonexistent-strata-dir";
  psk_options.endpoint = crypto::TlsEndpoint::kServer;
  auto psk = crypto::load_psk_creds(psk_options);
  ASSERT_FALSE(psk.ok());
  EXPECT_EQ(psk.error().message(),
            "Unable to access credentials /nonexistent-strata-dir/keys.psk: No such file or "
            "directory");
}

// ---- Forced TLS before STARTTLS, over the in-memory transport --------------------------------

std::string option(uint32_t opt, const std::string& data) {
  std::string out;
  WireWriter w(out);
  w.u64(kOptMagic);
  w.u32(opt);
  w.u32(static_cast<uint32_t>(data.size()));
  w.bytes(data);
  return out;
}

struct Reply {
  uint32_t option;
  uint32_t type;
  std::string data;
};

std::vector<Reply> option_replies(const std::string& out) {
  std::vector<Reply> replies;
  size_t pos = 18;  // greeting
  while (pos + 20 <= out.size()) {
    WireReader r(out.data() + pos, out.size() - pos);
    r.u64();
    Reply reply;
    reply.option = r.u32();
    reply.type = r.u32();
    uint32_t length = r.u32();
    reply.data = out.substr(pos + 20, length);
    replies.push_back(reply);
    pos += 20 + length;
  }
  return replies;
}

class NoExports final : public ExportDirectory {
 public:
  std::shared_ptr<Export> find_export(std::string_view) const override { return nullptr; }
  std::vector<std::shared_ptr<Export>> list_exports() const override { return {}; }
};

class ForcedTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto created = aio::EventLoop::create(16);
    ASSERT_TRUE(created.ok());
    loop_ = std::move(created).value();
    fs::path dir = fs::temp_directory_path() / ("strata-forced-tls-" + std::to_string(::getpid()));
    fs::create_directories(dir);
    write_file(dir / "keys.psk", "alice:0123456789abcdef0123456789abcdef\n");
    crypto::TlsCredsPskOptions options;
    options.dir = dir.string();
    options.endpoint = crypto::TlsEndpoint::kServer;
    auto creds = crypto::load_psk_creds(options);
    ASSERT_TRUE(creds.ok());
    tls_.creds = creds.value();
    fs::remove_all(dir);
  }
  std::string run(const std::string& input) {
    MemoryTransport transport(input);
    {
      ServerConnection connection(transport, exports_);
      connection.set_tls(&tls_);
      loop_->block_on(connection.run());
    }
    return transport.output();
  }
  static std::string flags() {
    std::string out;
    WireWriter(out).u32(kClientFixedNewstyle | kClientNoZeroes);
    return out;
  }
  std::unique_ptr<aio::EventLoop> loop_;
  NoExports exports_;
  ServerTls tls_;
};

TEST_F(ForcedTlsTest, OptionsBeforeStartTlsGetTlsRequired) {
  std::string input = flags() + option(kOptStructuredReply, "") + option(kOptList, "") +
                      option(kOptGo, std::string(6, '\0')) + option(kOptAbort, "") +
                      option(kOptList, "");
  auto replies = option_replies(run(input));
  ASSERT_EQ(replies.size(), 4u);  // nothing after ABORT
  const uint32_t expected[] = {kOptStructuredReply, kOptList, kOptGo, kOptAbort};
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(replies[i].option, expected[i]);
    EXPECT_EQ(replies[i].type, kRepErrTlsReqd);
  }
  EXPECT_EQ(replies[0].data, "Option 0x8 not permitted before TLS");
  EXPECT_EQ(replies[2].data, "Option 0x7 not permitted before TLS");
}

TEST_F(ForcedTlsTest, ExportNameBeforeTlsDisconnectsWithoutReply) {
  std::string input = flags() + option(kOptExportName, "e") + option(kOptList, "");
  auto out = run(input);
  EXPECT_EQ(out.size(), 18u);  // the greeting only
}

TEST_F(ForcedTlsTest, StartTlsWithPayloadIsInvalidAndDisconnects) {
  std::string input = flags() + option(kOptStartTls, "x") + option(kOptList, "");
  auto replies = option_replies(run(input));
  ASSERT_EQ(replies.size(), 1u);
  EXPECT_EQ(replies[0].type, kRepErrInvalid);
  EXPECT_EQ(replies[0].data, "option 'starttls' has unexpected length");
}

TEST_F(ForcedTlsTest, PlaintextAfterStartTlsIsNeverParsedAsOptions) {
  // CVE-2021-3716 style: options queued behind STARTTLS must go to TLS, not to the parser.
  std::string input =
      flags() + option(kOptStartTls, "") + option(kOptStructuredReply, "") + option(kOptList, "");
  auto replies = option_replies(run(input));
  ASSERT_GE(replies.size(), 1u);
  EXPECT_EQ(replies[0].option, kOptStartTls);
  EXPECT_EQ(replies[0].type, kRepAck);
  // Whatever follows the ACK is TLS (an alert at most), never an option reply.
  EXPECT_EQ(replies.size(), 1u);
}

}  // namespace
}  // namespace strata::nbd
