#pragma once
// The `file` protocol driver: a regular file or block device, I/O through io_uring.
//
// Read-only handling: the node has one descriptor, read-write only while it must be: an
// auto-read-only node opens read-only and reopens read-write when the first writer attaches, and
// read-only again when the last one leaves (QEMU's dynamic auto-read-only). The QEMU-compatible
// lock bytes live on that descriptor; a reopen copies them to the new descriptor before the old
// one is closed, so they are never dropped.

#include <optional>
#include <string>

#include "block/drivers/driver.h"
#include "block/graph/image_lock.h"

namespace strata::block {

struct FileOptions : DriverOptions {
  std::string filename;
  std::string locking = "auto";  // auto | on | off
  std::string aio = "threads";   // accepted for compatibility; io_uring is always used
  std::optional<int64_t> aio_max_batch;
  bool drop_cache = true;
};

class FileNode final : public Node {
 public:
  static std::unique_ptr<DriverOptions> parse(ArgDecoder& d);
  static Result<std::shared_ptr<Node>> open(OpenContext& context, const BlockdevOptions& options);

  FileNode(CommonOptions common, const FileOptions& options);
  ~FileNode() override;

  const char* driver_name() const override { return "file"; }
  std::optional<std::string> exact_filename() const override { return path_; }
  nlohmann::json strong_options() const override { return {{"filename", path_}}; }
  nlohmann::json format_specific_info() const override {
    return {{"type", "file"}, {"data", nlohmann::json::object()}};
  }
  std::optional<bool> dirty_flag() const override { return false; }

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override;
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t flags) override;
  aio::Task<Result<void>> co_flush() override;
  aio::Task<Result<void>> co_pdiscard(uint64_t offset, uint64_t bytes) override;
  aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                           uint32_t flags) override;
  aio::Task<Result<BlockStatus>> co_block_status(uint64_t offset, uint64_t bytes) override;
  aio::Task<Result<void>> co_truncate(uint64_t new_size, bool exact) override;
  uint64_t length() const override { return length_; }
  std::optional<uint64_t> allocated_size() const override;

  Result<std::function<void()>> prepare_reopen(const DriverOptions& options) override;
  Result<void> check_perm(uint64_t perm, uint64_t shared) override;
  void set_perm(uint64_t perm, uint64_t shared) override;
  void abort_perm() override;

  int data_fd() const { return fd_; }
  bool data_fd_writable() const { return fd_writable_; }

 private:
  Result<void> open_files();
  Result<int> open_data_fd(bool writable) const;
  Result<void> probe_alignment();
  // Writable access is needed for these permissions.
  static bool needs_write(uint64_t perm) {
    return (perm & (kPermWrite | kPermWriteUnchanged | kPermResize)) != 0;
  }

  std::string path_;
  std::string locking_;
  bool locking_enabled_ = false;
  int fd_ = -1;
  bool fd_writable_ = false;
  int pending_fd_ = -1;  // new data descriptor between check_perm and set_perm/abort_perm
  std::optional<ImageLock> pending_fd_lock_;  // the lock bytes, copied onto pending_fd_
  bool pending_lock_ = false;
  uint64_t length_ = 0;
  bool is_block_device_ = false;
  std::optional<ImageLock> lock_;
};

}  // namespace strata::block
