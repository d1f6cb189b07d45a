#pragma once
// Shared helpers of the block graph tests (graph_test.cc, file_node_test.cc): nodes opened from
// blockdev-add JSON the way the daemon does it, a root user, temporary image files and the lock
// bytes the kernel reports for them.

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "base/arg_decoder.h"
#include "block/drivers/blockdev_options.h"
#include "block/drivers/driver.h"
#include "block/graph/graph.h"

namespace strata::block::testing {

// Decodes `options` like blockdev-add (src/daemon/block_commands.cc) and opens the node.
inline Result<std::shared_ptr<Node>> open_node(Graph& graph, const nlohmann::json& options) {
  ArgDecoder d(options);
  auto parsed = parse_blockdev_options(d, options);
  auto decoded = d.finish();
  if (!decoded) {
    return std::move(decoded).error();
  }
  return open_blockdev(graph, *parsed);
}

// The message of a failed result, or "" when it succeeded.
template <typename T>
std::string error_of(const Result<T>& result) {
  return result ? std::string() : result.error().message();
}

// A root user (export, job, device) as the graph sees it.
class TestUser : public BlockParent {
 public:
  explicit TestUser(std::string description) : description_(std::move(description)) {}
  std::string parent_description() const override { return description_; }

 private:
  std::string description_;
};

// A directory under $TMPDIR removed with everything in it.
class TempDir {
 public:
  TempDir() {
    const char* tmpdir = std::getenv("TMPDIR");
    std::string pattern = std::string(tmpdir != nullptr ? tmpdir : "/tmp") + "/strata-graph-XXXXXX";
    if (::mkdtemp(pattern.data()) != nullptr) {
      path_ = pattern;
    }
  }
  ~TempDir() {
    if (!path_.empty()) {
      std::error_code ignored;
      std::filesystem::remove_all(path_, ignored);
    }
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  bool ok() const { return !path_.empty(); }
  // Creates (or truncates) a sparse file of `size` bytes and returns its path.
  std::string file(const std::string& name, uint64_t size) const {
    std::string path = path_ + "/" + name;
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd >= 0) {
      if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
        ADD_FAILURE() << "ftruncate " << path;
      }
      ::close(fd);
    } else {
      ADD_FAILURE() << "create " << path;
    }
    return path;
  }

 private:
  std::string path_;
};

// The file's identity as /proc/locks prints it: "MAJOR:MINOR:INODE" (major and minor in hex).
inline std::string inode_of(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return "";
  }
  char id[64];
  std::snprintf(id, sizeof(id), "%02x:%02x:%llu", major(st.st_dev), minor(st.st_dev),
                static_cast<unsigned long long>(st.st_ino));
  return id;
}

// Every byte locked on the file `file_id` (see inode_of), from /proc/locks: one entry per holder
// and byte, sorted (two descriptors holding byte 100 give {100, 100}).
inline std::vector<int> locked_bytes(const std::string& file_id) {
  std::ifstream in("/proc/locks");
  std::vector<int> bytes;
  std::string line;
  while (std::getline(in, line)) {
    // "1: OFDLCK ADVISORY  READ -1 fe:00:10954393 100 101"
    std::istringstream fields(line);
    std::string id, kind, mode, type, pid, device, start, end;
    fields >> id >> kind >> mode >> type >> pid >> device >> start >> end;
    if (kind == "->") {
      continue;  // a waiter
    }
    if (device != file_id) {
      continue;
    }
    for (int b = std::stoi(start); b <= std::stoi(end); ++b) {
      bytes.push_back(b);
    }
  }
  std::sort(bytes.begin(), bytes.end());
  return bytes;
}

// O_RDONLY, O_WRONLY or O_RDWR of an open descriptor.
inline int access_mode(int fd) {
  return ::fcntl(fd, F_GETFL) & O_ACCMODE;
}

}  // namespace strata::block::testing
