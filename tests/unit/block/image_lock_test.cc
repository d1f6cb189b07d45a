// ImageLock against itself (two open file descriptions of one file conflict even inside one process
// with OFD locks), against /proc/locks, and against QEMU's own qemu-io when it is installed.

#include "block/graph/image_lock.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "graph_test_util.h"

#include "block/graph/permissions.h"

extern char** environ;

namespace strata::block {
namespace {

constexpr uint64_t kRead = kPermConsistentRead;
constexpr uint64_t kWrite = kPermWrite;

class ImageLockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!ImageLock::ofd_supported()) {
      GTEST_SKIP() << "kernel without OFD locks: locks do not conflict inside one process";
    }
    const char* tmpdir = std::getenv("TMPDIR");
    path_ = std::string(tmpdir != nullptr ? tmpdir : "/tmp") + "/strata-image-lock-XXXXXX";
    int fd = mkstemp(path_.data());
    ASSERT_GE(fd, 0);
    ASSERT_EQ(ftruncate(fd, 1 << 20), 0);
    ::close(fd);
    fd_a_ = ::open(path_.c_str(), O_RDWR | O_CLOEXEC);
    fd_b_ = ::open(path_.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd_a_, 0);
    ASSERT_GE(fd_b_, 0);
  }

  void TearDown() override {
    if (fd_a_ >= 0) {
      ::close(fd_a_);
    }
    if (fd_b_ >= 0) {
      ::close(fd_b_);
    }
    if (!path_.empty()) {
      ::unlink(path_.c_str());
    }
  }

  // Every locked byte of the temp file in /proc/locks, one entry per holder and byte, sorted.
  std::vector<int> locked_bytes() const { return testing::locked_bytes(testing::inode_of(path_)); }

  std::string path_;
  int fd_a_ = -1;
  int fd_b_ = -1;
};

TEST(PermNamesTest, MatchesQemuBdrvPermNames) {
  EXPECT_EQ(perm_names(kPermConsistentRead), "consistent read");
  EXPECT_EQ(perm_names(kPermWrite), "write");
  EXPECT_EQ(perm_names(kPermWriteUnchanged), "write unchanged");
  EXPECT_EQ(perm_names(kPermResize), "resize");
  EXPECT_EQ(perm_names(kPermAll), "consistent read, write, write unchanged, resize");
  EXPECT_EQ(perm_names(kPermWrite | kPermResize), "write, resize");
  EXPECT_EQ(perm_names(0), "");
}

TEST_F(ImageLockTest, LocksExactlyQemuBytesForWritableQcow2Perms) {
  ImageLock lock(fd_a_, path_);
  ASSERT_TRUE(lock.prepare(kRead | kWrite | kPermResize, kRead | kPermWriteUnchanged).ok());
  lock.commit(kRead | kWrite | kPermResize, kRead | kPermWriteUnchanged);
  // What /proc/locks shows for qemu-storage-daemon holding a writable qcow2 (reliability.md §3.3).
  EXPECT_EQ(locked_bytes(), (std::vector<int>{100, 101, 103, 201, 203}));
  EXPECT_EQ(lock.perm(), kRead | kWrite | kPermResize);
  EXPECT_EQ(lock.shared(), kRead | kPermWriteUnchanged);
}

TEST_F(ImageLockTest, WriteConflictsWithUnsharedWrite) {
  ImageLock a(fd_a_, path_);
  ImageLock b(fd_b_, path_);
  ASSERT_TRUE(a.prepare(kRead, kRead | kPermWriteUnchanged).ok());  // reader that forbids writers
  a.commit(kRead, kRead | kPermWriteUnchanged);

  Result<void> result = b.prepare(kRead | kWrite, kPermAll);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.error().message(), "Failed to get \"write\" lock");
  EXPECT_EQ(result.error().kind(), ErrorKind::kPermission);
  EXPECT_EQ(b.conflict_hint(), "Is another process using the image [" + path_ + "]?");
  // b is back to its committed (empty) set: only a's bytes remain.
  EXPECT_EQ(locked_bytes(), (std::vector<int>{100, 201, 203}));
  EXPECT_EQ(b.perm(), 0u);
}

TEST_F(ImageLockTest, UnsharingWriteConflictsWithWriter) {
  ImageLock a(fd_a_, path_);
  ImageLock b(fd_b_, path_);
  ASSERT_TRUE(a.prepare(kRead | kWrite, kPermAll).ok());
  a.commit(kRead | kWrite, kPermAll);

  Result<void> result = b.prepare(kRead, kRead);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.error().message(), "Failed to get shared \"write\" lock");
  EXPECT_FALSE(b.conflict_hint().empty());
  EXPECT_EQ(locked_bytes(), (std::vector<int>{100, 101}));
}

TEST_F(ImageLockTest, WantedPermissionIsReportedBeforeUnsharedOne) {
  ImageLock a(fd_a_, path_);
  ImageLock b(fd_b_, path_);
  ASSERT_TRUE(a.prepare(kRead | kWrite | kPermResize, kRead).ok());
  a.commit(kRead | kWrite | kPermResize, kRead);
  // b both wants resize (a unshares it) and unshares write (a holds it): QEMU tests the wanted
  // permissions first, lowest bit first.
  Result<void> result = b.prepare(kRead | kWrite | kPermResize, kRead);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.error().message(), "Failed to get \"write\" lock");
  result = b.prepare(kRead | kPermResize, kRead);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.error().message(), "Failed to get \"resize\" lock");
  result = b.prepare(kRead, kRead | kPermResize);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.error().message(), "Failed to get shared \"write\" lock");
}

TEST_F(ImageLockTest, SharedReadersCoexist) {
  ImageLock a(fd_a_, path_);
  ImageLock b(fd_b_, path_);
  ASSERT_TRUE(a.prepare(kRead, kRead | kPermWriteUnchanged).ok());
  a.commit(kRead, kRead | kPermWriteUnchanged);
  ASSERT_TRUE(b.prepare(kRead, kRead | kPermWriteUnchanged).ok());
  b.commit(kRead, kRead | kPermWriteUnchanged);
  EXPECT_TRUE(b.conflict_hint().empty());
  // Both hold the same three bytes.
  EXPECT_EQ(locked_bytes(), (std::vector<int>{100, 100, 201, 201, 203, 203}));
}

TEST_F(ImageLockTest, AbortRestoresCommittedSet) {
  ImageLock a(fd_a_, path_);
  ASSERT_TRUE(a.prepare(kRead, kPermAll).ok());
  a.commit(kRead, kPermAll);
  ASSERT_TRUE(a.prepare(kRead | kWrite | kPermResize, kRead).ok());
  EXPECT_EQ(locked_bytes(), (std::vector<int>{100, 101, 103, 201, 202, 203}));
  a.abort();
  EXPECT_EQ(locked_bytes(), (std::vector<int>{100}));
  EXPECT_EQ(a.perm(), kRead);
  EXPECT_EQ(a.shared(), kPermAll);

  // A second party can now take write, which the aborted set would have forbidden.
  ImageLock b(fd_b_, path_);
  EXPECT_TRUE(b.prepare(kRead | kWrite, kPermAll).ok());
  b.abort();
}

TEST_F(ImageLockTest, CommitDropsBytesTheNewSetDoesNotNeed) {
  ImageLock a(fd_a_, path_);
  ASSERT_TRUE(a.prepare(kRead | kWrite, kRead).ok());
  a.commit(kRead | kWrite, kRead);
  // Narrowing never conflicts and is applied at commit.
  ImageLock b(fd_b_, path_);
  ASSERT_FALSE(b.prepare(kRead | kWrite, kPermAll).ok());
  ASSERT_TRUE(a.prepare(kRead, kPermAll).ok());
  EXPECT_EQ(locked_bytes(), (std::vector<int>{100, 101, 201, 202, 203}));
  a.commit(kRead, kPermAll);
  EXPECT_EQ(locked_bytes(), (std::vector<int>{100}));
  EXPECT_TRUE(b.prepare(kRead | kWrite, kPermAll).ok());
  b.commit(kRead | kWrite, kPermAll);
}

TEST_F(ImageLockTest, ReleaseDropsEverythingButKeepsFdUsable) {
  ImageLock a(fd_a_, path_);
  ImageLock b(fd_b_, path_);
  ASSERT_TRUE(a.prepare(kRead | kWrite | kPermResize, kRead).ok());
  a.commit(kRead | kWrite | kPermResize, kRead);
  ASSERT_FALSE(b.prepare(kRead | kWrite, kPermAll).ok());
  a.release();
  EXPECT_TRUE(locked_bytes().empty());
  EXPECT_EQ(a.perm(), 0u);
  EXPECT_EQ(a.shared(), kPermAll);
  ASSERT_TRUE(b.prepare(kRead | kWrite, kPermAll).ok());
  b.commit(kRead | kWrite, kPermAll);
  // a can take its permissions again only if they do not conflict with b's.
  Result<void> result = a.prepare(kRead | kWrite | kPermResize, kRead);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.error().message(), "Failed to get shared \"write\" lock");
  char byte = 0;
  EXPECT_EQ(pread(fd_a_, &byte, 1, 0), 1);
}

TEST_F(ImageLockTest, ClosingTheOtherDescriptionDropsItsLocks) {
  ImageLock a(fd_a_, path_);
  ImageLock b(fd_b_, path_);
  ASSERT_TRUE(a.prepare(kRead | kWrite, kRead).ok());
  a.commit(kRead | kWrite, kRead);
  ::close(fd_a_);
  fd_a_ = -1;
  EXPECT_TRUE(b.prepare(kRead | kWrite, kRead).ok());
  b.commit(kRead | kWrite, kRead);
}

// --- cross-checks with QEMU's own lock code -----------------------------------------------------

std::string find_tool(const char* name) {
  const char* path_env = std::getenv("PATH");
  std::istringstream dirs(path_env != nullptr ? path_env : "/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    std::string candidate = dir + "/" + name;
    if (access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
  }
  return {};
}

struct Output {
  int exit_code;
  std::string text;  // stdout and stderr
};

Output run_tool(const std::string& tool, std::vector<std::string> args) {
  std::string command = tool;
  for (const auto& arg : args) {
    command += " '" + arg + "'";  // the test's own arguments, no quotes inside
  }
  command += " 2>&1 </dev/null";
  Output output{-1, {}};
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) {
    return output;
  }
  char buffer[512];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) {
    output.text.append(buffer, n);
  }
  int status = pclose(pipe);
  output.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return output;
}

TEST_F(ImageLockTest, QemuIoSeesOurLocks) {
  std::string qemu_io = find_tool("qemu-io");
  std::string qemu_img = find_tool("qemu-img");
  if (qemu_io.empty() || qemu_img.empty()) {
    GTEST_SKIP() << "qemu-io or qemu-img is not installed";
  }
  // A qcow2 image, because QEMU's read-only qcow2 node (unlike raw) unshares write.
  Output create = run_tool(qemu_img, {"create", "-q", "-f", "qcow2", path_, "1M"});
  ASSERT_EQ(create.exit_code, 0) << create.text;
  ImageLock lock(fd_a_, path_);
  ASSERT_TRUE(lock.prepare(kRead | kWrite | kPermResize, kRead | kPermWriteUnchanged).ok());
  lock.commit(kRead | kWrite | kPermResize, kRead | kPermWriteUnchanged);

  Output writer = run_tool(qemu_io, {"-f", "raw", "-c", "write 0 512", path_});
  EXPECT_NE(writer.exit_code, 0) << writer.text;
  EXPECT_NE(writer.text.find("Failed to get \"write\" lock"), std::string::npos) << writer.text;

  Output reader = run_tool(qemu_io, {"-r", "-f", "qcow2", "-c", "read 0 512", path_});
  EXPECT_NE(reader.exit_code, 0) << reader.text;
  EXPECT_NE(reader.text.find("Failed to get shared \"write\" lock"), std::string::npos)
      << reader.text;

  Output forced = run_tool(qemu_io, {"-r", "-U", "-f", "qcow2", "-c", "read 0 512", path_});
  EXPECT_EQ(forced.exit_code, 0) << forced.text;

  lock.release();
  Output after = run_tool(qemu_io, {"-f", "raw", "-c", "write 0 512", path_});
  EXPECT_EQ(after.exit_code, 0) << after.text;
}

TEST_F(ImageLockTest, WeSeeQemuIoLocks) {
  std::string qemu_io = find_tool("qemu-io");
  std::string qemu_img = find_tool("qemu-img");
  if (qemu_io.empty() || qemu_img.empty()) {
    GTEST_SKIP() << "qemu-io or qemu-img is not installed";
  }
  Output create = run_tool(qemu_img, {"create", "-q", "-f", "qcow2", path_, "1M"});
  ASSERT_EQ(create.exit_code, 0) << create.text;
  // An interactive qemu-io keeps the image open (and locked) until its stdin closes.
  int in_pipe[2];
  ASSERT_EQ(pipe2(in_pipe, O_CLOEXEC), 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in_pipe[0], STDIN_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  std::vector<std::string> args = {qemu_io, "-f", "qcow2", path_};
  std::vector<char*> argv;
  for (auto& arg : args) {
    argv.push_back(arg.data());
  }
  argv.push_back(nullptr);
  pid_t pid = -1;
  ASSERT_EQ(posix_spawn(&pid, qemu_io.c_str(), &actions, nullptr, argv.data(), environ), 0);
  posix_spawn_file_actions_destroy(&actions);
  ::close(in_pipe[0]);

  // qemu-io on a writable qcow2 holds 100,101,103 and unshares write and resize (201,203).
  for (int i = 0; i < 200 && locked_bytes().size() < 5; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  std::vector<int> qemu_bytes = locked_bytes();
  EXPECT_EQ(qemu_bytes, (std::vector<int>{100, 101, 103, 201, 203}));
  ImageLock lock(fd_a_, path_);
  Result<void> want_write = lock.prepare(kRead | kWrite, kPermAll);
  Result<void> forbid_write = lock.prepare(kRead, kRead);
  Result<void> plain_read = lock.prepare(kRead, kPermAll);

  ::close(in_pipe[1]);  // EOF: qemu-io quits
  int status = 0;
  waitpid(pid, &status, 0);

  ASSERT_FALSE(qemu_bytes.empty()) << "qemu-io took no locks";
  ASSERT_FALSE(want_write.ok());
  EXPECT_EQ(want_write.error().message(), "Failed to get \"write\" lock");
  ASSERT_FALSE(forbid_write.ok());
  EXPECT_EQ(forbid_write.error().message(), "Failed to get shared \"write\" lock");
  EXPECT_TRUE(plain_read.ok()) << plain_read.error().message();
}

}  // namespace
}  // namespace strata::block
