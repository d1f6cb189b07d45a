#include "block/drivers/file/file_node.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "aio/event_loop.h"

namespace strata::block {

namespace {

constexpr std::array<std::string_view, 3> kLockingValues = {"auto", "on", "off"};
constexpr std::array<std::string_view, 3> kAioValues = {"threads", "native", "io_uring"};
constexpr unsigned kMaxIovecs = IOV_MAX;

Result<aio::EventLoop*> current_loop() {
  aio::EventLoop* loop = aio::EventLoop::current();
  if (loop == nullptr) {
    return make_error(ErrorKind::kIo, "No event loop on this thread");
  }
  return loop;
}

}  // namespace

std::unique_ptr<DriverOptions> FileNode::parse(ArgDecoder& d) {
  auto options = std::make_unique<FileOptions>();
  options->filename = d.str("filename");
  // Accepted for compatibility; persistent reservations are not implemented.
  (void)d.opt_str("pr-manager");
  options->locking = d.opt_enum("locking", kLockingValues).value_or("auto");
  options->aio = d.opt_enum("aio", kAioValues).value_or("threads");
  options->aio_max_batch = d.opt_i64("aio-max-batch");
  options->drop_cache = d.opt_bool("drop-cache").value_or(true);
  (void)d.opt_bool("x-check-cache-dropped");
  return options;
}

Result<std::shared_ptr<Node>> FileNode::open(OpenContext& context, const BlockdevOptions& options) {
  const auto& file_options = static_cast<const FileOptions&>(*options.driver_options);
  if (file_options.aio == "native" && !context.options().cache_direct) {
    return make_error(ErrorKind::kInvalidArgument,
                      "aio=native was specified, but it requires cache.direct=on, which was not "
                      "specified.");
  }
  auto node = std::make_shared<FileNode>(context.options(), file_options);
  auto opened = node->open_files();
  if (!opened) {
    return std::move(opened).error();
  }
  return std::shared_ptr<Node>(std::move(node));
}

FileNode::FileNode(CommonOptions common, const FileOptions& options)
    : Node(std::move(common)), path_(options.filename), locking_(options.locking) {}

FileNode::~FileNode() {
  abort_perm();
  if (lock_) {
    lock_->release();  // see set_perm: close() may release the bytes late
  }
  if (fd_ >= 0) {
    ::close(fd_);
  }
}

Result<int> FileNode::open_data_fd(bool writable) const {
  int flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC;
  if (options_.cache_direct) {
    flags |= O_DIRECT;
  }
  int fd = ::open(path_.c_str(), flags);
  if (fd < 0) {
    return Error::from_errno(errno, "Could not open '" + path_ + "'");
  }
  return fd;
}

Result<void> FileNode::open_files() {
  if (path_.empty()) {
    return make_error(ErrorKind::kInvalidArgument, "The 'file' block driver requires a file name");
  }
  // Read-write from the start only when neither read-only nor auto-read-only: an auto-read-only
  // node becomes writable when its first writer attaches (check_perm).
  bool writable = !options_.read_only && !options_.auto_read_only;
  auto fd = open_data_fd(writable);
  if (!fd) {
    return std::move(fd).error();
  }
  fd_ = *fd;
  fd_writable_ = writable;

  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    return Error::from_errno(errno, "Could not stat '" + path_ + "'");
  }
  is_block_device_ = S_ISBLK(st.st_mode);
  if (is_block_device_) {
    uint64_t size = 0;
    if (::ioctl(fd_, BLKGETSIZE64, &size) != 0) {
      return Error::from_errno(errno, "Could not get the size of '" + path_ + "'");
    }
    length_ = size;
  } else {
    length_ = static_cast<uint64_t>(st.st_size);
  }

  locking_enabled_ = locking_ == "on" || (locking_ == "auto" && ImageLock::ofd_supported());
  if (locking_enabled_) {
    lock_.emplace(fd_, path_);
  }
  if (options_.cache_direct) {
    auto probed = probe_alignment();
    if (!probed) {
      return probed;
    }
  }
  return ok();
}

// O_DIRECT needs aligned offsets, lengths and buffers; find the smallest alignment the file
// accepts, as QEMU's raw_probe_alignment does (EINVAL means "misaligned").
Result<void> FileNode::probe_alignment() {
  constexpr size_t kMaxAlign = 4096;
  void* raw = std::aligned_alloc(kMaxAlign, 2 * kMaxAlign);
  if (raw == nullptr) {
    return Error::from_errno(ENOMEM, "Could not probe alignment");
  }
  std::unique_ptr<void, decltype(&std::free)> buffer(raw, &std::free);
  auto accepted = [&](void* buf, size_t len) {
    ssize_t ret = ::pread(fd_, buf, len, 0);
    return ret >= 0 || errno != EINVAL;
  };
  uint32_t request_alignment = 0;
  for (size_t align = 512; align <= kMaxAlign; align <<= 1) {
    if (accepted(raw, align)) {
      request_alignment = static_cast<uint32_t>(align);
      break;
    }
  }
  uint32_t memory_alignment = 0;
  size_t probe_len = request_alignment != 0 ? request_alignment : kMaxAlign;
  for (size_t align = 512; align <= kMaxAlign; align <<= 1) {
    if (accepted(static_cast<char*>(raw) + align, probe_len)) {
      memory_alignment = static_cast<uint32_t>(align);
      break;
    }
  }
  limits_.request_alignment = request_alignment != 0 ? request_alignment : kMaxAlign;
  limits_.memory_alignment = memory_alignment != 0 ? memory_alignment : kMaxAlign;
  return ok();
}

aio::Task<Result<void>> FileNode::co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                            uint32_t) {
  auto loop = current_loop();
  if (!loop) {
    co_return std::move(loop).error();
  }
  uint64_t done = 0;
  while (done < bytes) {
    IoVector part = qiov.slice(done, bytes - done);
    unsigned count = part.count() < kMaxIovecs ? part.count() : kMaxIovecs;
    int ret = co_await (*loop)->readv(fd_, part.data(), count, offset + done);
    if (ret == -EINTR || ret == -EAGAIN) {
      continue;
    }
    if (ret < 0) {
      co_return Error::from_errno(-ret, "Could not read from '" + path_ + "'");
    }
    if (ret == 0) {
      // Past the end of the file (it shrank underneath us): reads return zeroes.
      qiov.fill(done, 0, bytes - done);
      break;
    }
    done += static_cast<uint64_t>(ret);
  }
  co_return ok();
}

aio::Task<Result<void>> FileNode::co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                             uint32_t flags) {
  auto loop = current_loop();
  if (!loop) {
    co_return std::move(loop).error();
  }
  if (!fd_writable_) {
    co_return Error::from_errno(EBADF, "Could not write to '" + path_ + "'");
  }
  uint64_t done = 0;
  while (done < bytes) {
    IoVector part = qiov.slice(done, bytes - done);
    unsigned count = part.count() < kMaxIovecs ? part.count() : kMaxIovecs;
    int ret = co_await (*loop)->writev(fd_, part.data(), count, offset + done);
    if (ret == -EINTR || ret == -EAGAIN) {
      continue;
    }
    if (ret < 0) {
      co_return Error::from_errno(-ret, "Could not write to '" + path_ + "'");
    }
    if (ret == 0) {
      co_return Error::from_errno(EIO, "Could not write to '" + path_ + "'");
    }
    done += static_cast<uint64_t>(ret);
  }
  if (offset + bytes > length_) {
    length_ = offset + bytes;
  }
  if ((flags & kRequestFua) != 0) {
    int ret = co_await (*loop)->fdatasync(fd_);
    if (ret < 0) {
      co_return Error::from_errno(-ret, "Could not flush '" + path_ + "'");
    }
  }
  co_return ok();
}

aio::Task<Result<void>> FileNode::co_flush() {
  if (options_.cache_no_flush) {
    co_return ok();
  }
  auto loop = current_loop();
  if (!loop) {
    co_return std::move(loop).error();
  }
  int ret = co_await (*loop)->fdatasync(fd_);
  if (ret < 0) {
    co_return Error::from_errno(-ret, "Could not flush '" + path_ + "'");
  }
  co_return ok();
}

aio::Task<Result<void>> FileNode::co_pdiscard(uint64_t offset, uint64_t bytes) {
  // QEMU only passes discards down when the node was opened with discard=unmap.
  if (options_.discard != "unmap" || is_block_device_) {
    co_return ok();
  }
  auto loop = current_loop();
  if (!loop) {
    co_return std::move(loop).error();
  }
  int ret =
      co_await (*loop)->fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, bytes);
  if (ret < 0 && ret != -EOPNOTSUPP && ret != -ENOTSUP) {
    co_return Error::from_errno(-ret, "Could not discard on '" + path_ + "'");
  }
  co_return ok();
}

aio::Task<Result<void>> FileNode::co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                                   uint32_t flags) {
  auto loop = current_loop();
  if (!loop) {
    co_return std::move(loop).error();
  }
  if (!is_block_device_) {
    if ((flags & kRequestMayUnmap) != 0 && options_.discard == "unmap") {
      int ret = co_await (*loop)->fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                                            bytes);
      if (ret == 0) {
        co_return ok();
      }
    }
    int mode = offset + bytes <= length_ ? FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
                                         : FALLOC_FL_ZERO_RANGE;
    int ret = co_await (*loop)->fallocate(fd_, mode, offset, bytes);
    if (ret == 0) {
      if (offset + bytes > length_) {
        length_ = offset + bytes;
      }
      co_return ok();
    }
    if (ret != -EOPNOTSUPP && ret != -ENOTSUP && ret != -EINVAL) {
      co_return Error::from_errno(-ret, "Could not write zeroes to '" + path_ + "'");
    }
  }
  auto result = co_await Node::co_pwrite_zeroes(offset, bytes, flags);
  co_return result;
}

aio::Task<Result<BlockStatus>> FileNode::co_block_status(uint64_t offset, uint64_t bytes) {
  BlockStatus status;
  status.file = this;
  status.map_offset = offset;
  status.bytes = bytes;
  status.flags = BlockStatus::kData | BlockStatus::kOffsetValid | BlockStatus::kAllocated;
  if (is_block_device_) {
    co_return status;
  }
  // SEEK_DATA/SEEK_HOLE are quick metadata calls; io_uring has no opcode for them.
  off_t data = ::lseek(fd_, static_cast<off_t>(offset), SEEK_DATA);
  if (data < 0) {
    if (errno == ENXIO) {
      // No data after offset: a hole up to the end of the file.
      status.flags = BlockStatus::kZero | BlockStatus::kOffsetValid | BlockStatus::kAllocated;
    }
    co_return status;  // other errors: report data, the safe answer
  }
  if (static_cast<uint64_t>(data) > offset) {
    uint64_t hole = static_cast<uint64_t>(data) - offset;
    status.bytes = hole < bytes ? hole : bytes;
    status.flags = BlockStatus::kZero | BlockStatus::kOffsetValid | BlockStatus::kAllocated;
    co_return status;
  }
  off_t hole = ::lseek(fd_, static_cast<off_t>(offset), SEEK_HOLE);
  if (hole > static_cast<off_t>(offset)) {
    uint64_t run = static_cast<uint64_t>(hole) - offset;
    status.bytes = run < bytes ? run : bytes;
  }
  co_return status;
}

aio::Task<Result<void>> FileNode::co_truncate(uint64_t new_size, bool exact) {
  if (is_block_device_) {
    if (new_size > length_ || (exact && new_size != length_)) {
      co_return make_error(ErrorKind::kUnsupported, "Cannot grow device files");
    }
    co_return ok();
  }
  if (!exact && new_size <= length_) {
    co_return ok();
  }
  if (::ftruncate(fd_, static_cast<off_t>(new_size)) != 0) {
    co_return Error::from_errno(errno, "Failed to resize the file");
  }
  length_ = new_size;
  co_return ok();
}

std::optional<uint64_t> FileNode::allocated_size() const {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    return std::nullopt;
  }
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

Result<std::function<void()>> FileNode::prepare_reopen(const DriverOptions& options) {
  const auto& file_options = static_cast<const FileOptions&>(options);
  if (file_options.filename != path_) {
    return make_error(ErrorKind::kInvalidArgument, "Cannot change the option 'filename'");
  }
  if (file_options.locking != locking_) {
    return make_error(ErrorKind::kInvalidArgument, "Cannot change the option 'locking'");
  }
  return std::function<void()>([] {});
}

Result<void> FileNode::check_perm(uint64_t perm, uint64_t shared) {
  // Reopen the descriptor when the need for writing changes (dynamic auto-read-only).
  bool want_writable = !options_.read_only && (needs_write(perm) || !options_.auto_read_only);
  if (want_writable != fd_writable_) {
    auto fd = open_data_fd(want_writable);
    if (!fd) {
      return std::move(fd).error();
    }
    pending_fd_ = *fd;
  }
  auto fail = [this](Error error) -> Result<void> {
    abort_perm();
    return error;
  };
  if (!lock_) {
    return ok();
  }
  // Conflicts are probed from the current descriptor, which does not see its own locks. An
  // inactive node keeps its locks as they are (QEMU skips lock changes while inactive).
  uint64_t lock_perm = active_ ? perm : lock_->perm();
  uint64_t lock_shared = active_ ? shared : lock_->shared();
  if (active_) {
    auto locked = lock_->prepare(perm, shared);
    if (!locked) {
      return fail(std::move(locked).error());
    }
    pending_lock_ = true;
  }
  if (pending_fd_ >= 0) {
    pending_fd_lock_.emplace(pending_fd_, path_);
    auto copied = pending_fd_lock_->adopt(lock_perm, lock_shared);
    if (!copied) {
      return fail(std::move(copied).error());
    }
  }
  return ok();
}

void FileNode::set_perm(uint64_t perm, uint64_t shared) {
  if (pending_lock_) {
    lock_->commit(perm, shared);
    pending_lock_ = false;
  }
  if (pending_fd_ >= 0) {
    // The new descriptor already holds the lock bytes. Unlock the old one explicitly: close()
    // alone releases them only when the last reference to the file goes, and io_uring may still
    // hold one for a while.
    if (lock_ && pending_fd_lock_) {
      lock_->release();
    }
    ::close(fd_);
    fd_ = pending_fd_;
    fd_writable_ = !fd_writable_;
    pending_fd_ = -1;
    if (pending_fd_lock_) {
      lock_.reset();
      lock_.emplace(std::move(*pending_fd_lock_));
      pending_fd_lock_.reset();
    }
  }
}

void FileNode::abort_perm() {
  if (pending_lock_) {
    lock_->abort();
    pending_lock_ = false;
  }
  if (pending_fd_lock_) {
    pending_fd_lock_->release();  // see set_perm: close() may release it late
  }
  pending_fd_lock_.reset();
  if (pending_fd_ >= 0) {
    ::close(pending_fd_);
    pending_fd_ = -1;
  }
}

}  // namespace strata::block
