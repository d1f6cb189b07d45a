// Descriptors and positional I/O for the file transport.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "migration/internal.h"

namespace strata::migration::internal {

OwnedFd& OwnedFd::operator=(OwnedFd&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) {
      ::close(fd_);
    }
    fd_ = other.release();
  }
  return *this;
}

OwnedFd::~OwnedFd() {
  if (fd_ >= 0) {
    ::close(fd_);
  }
}

Result<OwnedFd> open_file(const std::string& path, int flags, mode_t mode) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  if (fd >= 0) {
    return OwnedFd(fd);
  }
  int error = errno;
  const char* action = (flags & O_CREAT) != 0 ? "create" : "open";
  if (error == EINVAL && (flags & O_DIRECT) != 0) {
    // As QEMU's qemu_open_internal: tell "no O_DIRECT here" apart from other EINVALs.
    int plain = ::open(path.c_str(), (flags & ~O_DIRECT) | O_CLOEXEC, mode);
    if (plain >= 0) {
      ::close(plain);
      return Error(ErrorKind::kUnsupported,
                   "Could not " + std::string(action) + " '" + path +
                       "': filesystem does not support O_DIRECT",
                   EINVAL);
    }
  }
  return Error::from_errno(error, "Could not " + std::string(action) + " '" + path + "'");
}

Result<void> pwrite_all(int fd, const uint8_t* data, uint64_t length, uint64_t offset) {
  while (length > 0) {
    ssize_t n = ::pwrite(fd, data, length, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      return Error::from_errno(errno, "write at offset " + std::to_string(offset));
    }
    if (n == 0) {
      return Error(ErrorKind::kIo,
                   "write at offset " + std::to_string(offset) + " made no progress", EIO);
    }
    data += n;
    length -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return ok();
}

Result<void> pread_all(int fd, uint8_t* data, uint64_t length, uint64_t offset) {
  while (length > 0) {
    ssize_t n = ::pread(fd, data, length, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      return Error::from_errno(errno, "read at offset " + std::to_string(offset));
    }
    if (n == 0) {
      return Error(ErrorKind::kCorrupt,
                   "file truncated: read at offset " + std::to_string(offset) + " met its end");
    }
    data += n;
    length -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return ok();
}

Result<uint64_t> file_size(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    return Error::from_errno(errno, "stat");
  }
  return static_cast<uint64_t>(st.st_size);
}

}  // namespace strata::migration::internal
