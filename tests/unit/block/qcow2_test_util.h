#pragma once
// Helpers shared by the qcow2 unit tests: the QEMU peer probe, file and shell helpers, and a
// crash stand-in node.

#include <sys/wait.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "aio/event_loop.h"
#include "block/drivers/qcow2/check.h"
#include "block/graph/graph.h"
#include "block/graph/node.h"
#include "block/io/request.h"
#include "graph_test_util.h"

namespace strata::block::testing {

// Whether qemu-img runs here (tests that compare with it skip otherwise).
inline bool have_qemu_img() {
  static const bool have = std::system("qemu-img --version >/dev/null 2>&1") == 0;
  return have;
}

// The whole content of the file at `path` ("" when it cannot be read).
inline std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Runs `command` with /bin/sh in directory `dir`; its stdout and stderr go to `output` when given.
// Returns the exit status (-1 when it did not exit normally).
inline int run_shell_in(const std::string& dir, const std::string& command,
                        std::string* output = nullptr) {
  const std::string log = dir + "/sh.log";
  const int status =
      std::system(("cd '" + dir + "' && (" + command + ") >'" + log + "' 2>&1").c_str());
  if (output != nullptr) {
    *output = slurp(log);
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// A crash stand-in: forwards everything to its child, but after `limit` writes have gone through
// it acknowledges writes and flushes without doing them. Growing still happens (the writes that
// follow need the length); a crashed file that grew reads as zeroes there.
class DropAfterNode final : public Node {
 public:
  DropAfterNode(std::string name, uint64_t limit) : Node(options(std::move(name))), limit_(limit) {}
  const char* driver_name() const override { return "drop-after"; }
  bool is_filter() const override { return true; }
  uint64_t length() const override { return inner().length(); }
  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override {
    (void)bytes;
    Result<void> read = co_await io::preadv(inner(), offset, qiov, flags);
    co_return read;
  }
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t flags) override {
    (void)bytes;
    if (writes_++ >= limit_) {
      co_return ok();
    }
    Result<void> written = co_await io::pwritev(inner(), offset, qiov, flags & kRequestFua);
    co_return written;
  }
  aio::Task<Result<void>> co_flush() override { co_return ok(); }
  aio::Task<Result<void>> co_truncate(uint64_t new_size, bool exact) override {
    Result<void> done = co_await io::truncate(inner(), new_size, exact);
    co_return done;
  }
  uint64_t writes() const { return writes_; }
  // Whether a write has been dropped already (a flush after that is not a real one).
  bool dropping() const { return writes_ > limit_; }

 private:
  static CommonOptions options(std::string name) {
    CommonOptions common;
    common.node_name = std::move(name);
    return common;
  }
  Node& inner() const { return *child("file")->node(); }
  uint64_t limit_;
  uint64_t writes_ = 0;
};

// What the qcow2 fixtures share: a temporary directory, an event loop, a graph and a root user.
// `Base` is ::testing::Test or a ::testing::TestWithParam<...>.
template <typename Base = ::testing::Test>
class Qcow2Fixture : public Base {
 protected:
  void SetUp() override {
    ASSERT_TRUE(dir_.ok());
    auto loop = aio::EventLoop::create();
    ASSERT_TRUE(loop) << loop.error().message();
    loop_ = std::move(loop).value();
    dir_path_ = dir_.file("probe", 0);
    dir_path_ = dir_path_.substr(0, dir_path_.rfind('/'));
  }

  // Runs `command` in the test directory; returns its exit status, output in `output`.
  int sh(const std::string& command, std::string* output = nullptr) {
    return run_shell_in(dir_path_, command, output);
  }

  template <typename T>
  T run(aio::Task<T> task) {
    return loop_->block_on(std::move(task));
  }

  // Opens the node `options` describe and attaches a writing root to it (kept in root_); nullptr
  // and a test failure when either step fails. `image` names the image in failure messages.
  std::shared_ptr<Node> open_with_writer(const nlohmann::json& options, const std::string& image) {
    auto node = open_node(graph_, options);
    if (!node) {
      ADD_FAILURE() << "opening " << image << ": " << node.error().message();
      return nullptr;
    }
    auto root = graph_.attach_root(user_, *node, "root", kRoleImage,
                                   kPermConsistentRead | kPermWrite, kPermAll);
    if (!root) {
      ADD_FAILURE() << root.error().message();
      return nullptr;
    }
    root_ = std::move(root).value();
    return std::move(node).value();
  }

  // A crash stand-in for the image file `image` (in the test directory): a file node under a
  // DropAfterNode dropping every write after the `limit`-th, registered under a fresh name; a
  // qcow2 node opened with {"file": crashing.drop->node_name()} writes through it.
  struct CrashingFile {
    std::shared_ptr<Node> file;
    std::shared_ptr<DropAfterNode> drop;
  };
  CrashingFile open_crashing_file(const std::string& image, uint64_t limit) {
    auto file = open_node(graph_, {{"driver", "file"},
                                   {"node-name", "real" + std::to_string(++counter_)},
                                   {"filename", dir_path_ + "/" + image}});
    if (!file) {
      ADD_FAILURE() << "opening " << image << ": " << file.error().message();
      return {};
    }
    auto drop = std::make_shared<DropAfterNode>("drop" + std::to_string(counter_), limit);
    EXPECT_TRUE(graph_.register_node(*drop));
    graph_.add_monitor_ref(drop);
    auto attached = graph_.attach_child(*drop, *file, "file", kRoleFiltered | kRolePrimary);
    EXPECT_TRUE(attached) << error_of(attached);
    return CrashingFile{std::move(file).value(), std::move(drop)};
  }
  // Drops what open_crashing_file made (after the nodes above it are gone); returns the number
  // of writes that reached the drop node, dropped or not.
  uint64_t close_crashing_file(CrashingFile& crashing) {
    const uint64_t writes = crashing.drop ? crashing.drop->writes() : 0;
    if (crashing.drop) {
      graph_.remove_monitor_ref(*crashing.drop);
    }
    crashing = {};
    return writes;
  }

  // strata's checker over `image` (in the test directory), read-only: "" when it finds no
  // corruption, else the error or the messages. `accept`, when given, may still accept a result
  // with corruptions from its messages (one per line).
  std::string strata_check(const std::string& image,
                           const std::function<bool(const std::string&)>& accept = {}) {
    auto file = open_node(graph_, {{"driver", "file"},
                                   {"node-name", "chk" + std::to_string(++counter_)},
                                   {"read-only", true},
                                   {"filename", dir_path_ + "/" + image}});
    if (!file) {
      return "open: " + error_of(file);
    }
    Result<qcow2::CheckResult> checked = loop_->block_on(qcow2::check_image(**file));
    file->reset();
    if (!checked) {
      return "check failed: " + error_of(checked);
    }
    if (checked->corruptions == 0 && checked->check_errors == 0) {
      return "";
    }
    std::string messages;
    for (const std::string& line : checked->messages) {
      messages += line + "\n";
    }
    if (checked->check_errors == 0 && accept && accept(messages)) {
      return "";
    }
    return std::to_string(checked->corruptions) + " corruptions:\n" + messages;
  }

  // Flushes `node`, detaches the root open_with_writer attached and drops the node.
  void close(std::shared_ptr<Node>& node) {
    if (node) {
      Result<void> flushed = run(io::flush(*node));
      EXPECT_TRUE(flushed) << error_of(flushed);
    }
    if (root_) {
      graph_.detach_root(std::move(root_));
    }
    node.reset();
  }

  TempDir dir_;
  std::string dir_path_;
  std::unique_ptr<aio::EventLoop> loop_;
  Graph graph_;
  TestUser user_{"block device 'test'"};
  int counter_ = 0;
  std::unique_ptr<Child> root_;
};

}  // namespace strata::block::testing
