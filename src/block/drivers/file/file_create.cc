#include "block/drivers/file/file_create.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <vector>

namespace strata::block::file {

namespace {

// FS_IOC_FSSETXATTR's extent size hint, as file-posix sets it on new files (best effort: file
// systems without the ioctl ignore it, like QEMU does).
void set_extent_size_hint(int fd, uint64_t hint) {
#ifdef FS_IOC_FSSETXATTR
  struct fsxattr attr {};
  if (::ioctl(fd, FS_IOC_FSGETXATTR, &attr) == 0) {
    attr.fsx_xflags |= FS_XFLAG_EXTSIZE;
    attr.fsx_extsize = static_cast<uint32_t>(hint);
    (void)::ioctl(fd, FS_IOC_FSSETXATTR, &attr);
  }
#else
  (void)fd;
  (void)hint;
#endif
}

// FS_NOCOW_FL (btrfs): must be set while the file is still empty.
void set_nocow(int fd) {
  int flags = 0;
  if (::ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0) {
    flags |= FS_NOCOW_FL;
    (void)::ioctl(fd, FS_IOC_SETFLAGS, &flags);
  }
}

aio::Task<Result<void>> grow(aio::EventLoop& loop, int fd, uint64_t size,
                             const std::string& preallocation) {
  if (::ftruncate(fd, 0) != 0) {
    co_return Error::from_errno(errno, "Could not resize file");
  }
  if (preallocation == "falloc") {
    if (size > 0) {
      int rc = co_await loop.fallocate(fd, 0, 0, size);
      if (rc < 0) {
        co_return Error::from_errno(-rc, "Could not preallocate data for the new file");
      }
    }
    co_return ok();
  }
  if (preallocation == "full") {
    std::vector<uint8_t> zeroes(1 << 20, 0);
    for (uint64_t done = 0; done < size;) {
      auto chunk = static_cast<uint32_t>(std::min<uint64_t>(zeroes.size(), size - done));
      int n = co_await loop.write(fd, zeroes.data(), chunk, done);
      if (n < 0) {
        co_return Error::from_errno(-n, "Could not write zeros for preallocation");
      }
      done += static_cast<uint64_t>(n);
    }
    int rc = co_await loop.fsync(fd);
    if (rc < 0) {
      co_return Error::from_errno(-rc, "Could not flush file to disk");
    }
    co_return ok();
  }
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    co_return Error::from_errno(errno, "Could not resize file");
  }
  if (size > 0) {
    // file-posix allocates the first block so that later alignment probing finds it.
    std::vector<uint8_t> zeroes(static_cast<size_t>(std::min<uint64_t>(size, 4096)), 0);
    int n = co_await loop.write(fd, zeroes.data(), static_cast<uint32_t>(zeroes.size()), 0);
    if (n < 0) {
      co_return Error::from_errno(-n, "Could not allocate the first block");
    }
  }
  co_return ok();
}

}  // namespace

Result<int> open_new_file(const FileCreateOptions& options) {
  int fd = ::open(options.filename.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    return Error::from_errno(errno, "Could not create '" + options.filename + "'");
  }
  if (options.nocow) {
    set_nocow(fd);
  }
  set_extent_size_hint(fd, options.extent_size_hint.value_or(uint64_t{1} << 20));
  return fd;
}

aio::Task<Result<void>> size_new_file(aio::EventLoop& loop, int fd, FileCreateOptions options) {
  co_await loop.yield();
  Result<void> result;
  if (options.preallocation != "off" && options.preallocation != "falloc" &&
      options.preallocation != "full") {
    result = make_error(ErrorKind::kUnsupported,
                        "Unsupported preallocation mode: " + options.preallocation);
  } else {
    result = co_await grow(loop, fd, options.size, options.preallocation);
  }
  if (::close(fd) != 0 && result.ok()) {
    result = Error::from_errno(errno, "Could not close the new file");
  }
  co_return result;
}

}  // namespace strata::block::file
