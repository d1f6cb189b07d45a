// The monitor's ordering contract: events raised while a command runs reach every negotiated
// client before that command's reply; clients that have not negotiated see no events.

#include "qmp/monitor.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

namespace strata::qmp {
namespace {

// A blocking QMP client for the test thread.
class TestClient {
 public:
  explicit TestClient(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::snprintf(address.sun_path, sizeof(address.sun_path), "%s", path.c_str());
    for (int attempt = 0; attempt < 200; ++attempt) {
      if (::connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0) {
        connected_ = true;
        break;
      }
      ::usleep(10000);
    }
  }
  ~TestClient() { ::close(fd_); }

  bool connected() const { return connected_; }
  void send(const std::string& text) {
    ssize_t n = ::write(fd_, text.data(), text.size());
    ASSERT_EQ(n, static_cast<ssize_t>(text.size()));
  }
  // Next \r\n-terminated message, parsed.
  nlohmann::json next() {
    while (true) {
      size_t end = buffer_.find("\r\n");
      if (end != std::string::npos) {
        std::string line = buffer_.substr(0, end);
        buffer_.erase(0, end + 2);
        return nlohmann::json::parse(line);
      }
      char chunk[4096];
      ssize_t n = ::read(fd_, chunk, sizeof(chunk));
      if (n <= 0) {
        return nullptr;
      }
      buffer_.append(chunk, static_cast<size_t>(n));
    }
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
  std::string buffer_;
};

TEST(MonitorTest, EventsOfACommandPrecedeItsReply) {
  auto loop = aio::EventLoop::create();
  ASSERT_TRUE(loop.ok());
  CommandTable commands;
  MonitorHub* hub_ptr = nullptr;
  commands.add("emit-two",
               [&](const nlohmann::json&, Monitor&) -> aio::Task<Result<nlohmann::json>> {
                 hub_ptr->emit_event("FIRST", {{"n", 1}});
                 hub_ptr->emit_event("SECOND");
                 co_return nlohmann::json{{"done", true}};
               });
  commands.add("quit", [&](const nlohmann::json&, Monitor&) -> aio::Task<Result<nlohmann::json>> {
    hub_ptr->request_quit();
    co_return nlohmann::json::object();
  });
  MonitorHub hub(**loop, commands, {{"qemu", {{"major", 10}, {"minor", 0}, {"micro", 2}}}});
  hub_ptr = &hub;
  std::string path = "/tmp/strata-monitor-test-" + std::to_string(::getpid()) + ".sock";
  ASSERT_TRUE(hub.listen_unix(path, {}).ok());

  std::vector<nlohmann::json> seen;
  std::thread client_thread([&] {
    TestClient client(path);
    ASSERT_TRUE(client.connected());
    seen.push_back(client.next());  // greeting
    client.send(R"({"execute":"emit-two","id":"early"})");
    seen.push_back(client.next());  // not negotiated: error, no events
    client.send(R"({"execute":"qmp_capabilities"})");
    seen.push_back(client.next());
    client.send(R"({"execute":"emit-two","id":7})");
    for (int i = 0; i < 3; ++i) {
      seen.push_back(client.next());
    }
    client.send(R"({"execute":"quit"})");
    seen.push_back(client.next());
  });

  (*loop)->block_on([](MonitorHub& hub) -> aio::Task<void> {
    co_await hub.quit_event().wait();
    co_await hub.shutdown();
  }(hub));
  client_thread.join();

  ASSERT_EQ(seen.size(), 7u);
  EXPECT_TRUE(seen[0].contains("QMP"));
  EXPECT_EQ(seen[1]["error"]["class"], "CommandNotFound");
  EXPECT_EQ(seen[1]["id"], "early");
  EXPECT_EQ(seen[2], nlohmann::json({{"return", nlohmann::json::object()}}));
  EXPECT_EQ(seen[3]["event"], "FIRST");
  EXPECT_EQ(seen[3]["data"], nlohmann::json({{"n", 1}}));
  EXPECT_TRUE(seen[3]["timestamp"]["seconds"].is_number_integer());
  EXPECT_TRUE(seen[3]["timestamp"]["microseconds"].is_number_integer());
  EXPECT_EQ(seen[4]["event"], "SECOND");
  EXPECT_FALSE(seen[4].contains("data"));
  EXPECT_EQ(seen[5], nlohmann::json({{"return", {{"done", true}}}, {"id", 7}}));
  EXPECT_EQ(seen[6], nlohmann::json({{"return", nlohmann::json::object()}}));
}

}  // namespace
}  // namespace strata::qmp
