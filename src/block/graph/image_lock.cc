#include "block/graph/image_lock.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <utility>

#include "block/graph/permissions.h"

namespace strata::block {
namespace {

// block/file-posix.c: "Libvirt takes byte 0, we start from higher bytes, leaving a few more bytes
// for its future use."
constexpr int kLockPermBase = 100;
constexpr int kLockSharedBase = 200;
constexpr int kPermBits = 4;  // bits of kPermAll

int setlk_op() {
  return ImageLock::ofd_supported() ? F_OFD_SETLK : F_SETLK;
}
int getlk_op() {
  return ImageLock::ofd_supported() ? F_OFD_GETLK : F_GETLK;
}

// 0 or an errno (qemu_lock_fd / qemu_unlock_fd).
int set_byte(int fd, int offset, short type) {
  struct flock fl = {};
  fl.l_whence = SEEK_SET;
  fl.l_start = offset;
  fl.l_len = 1;
  fl.l_type = type;
  return fcntl(fd, setlk_op(), &fl) == -1 ? errno : 0;
}

// 0 when no other open file description holds a lock overlapping `offset`, EAGAIN when one does,
// another errno when the probe itself failed (qemu_lock_fd_test with exclusive = true).
int test_byte(int fd, int offset) {
  struct flock fl = {};
  fl.l_whence = SEEK_SET;
  fl.l_start = offset;
  fl.l_len = 1;
  fl.l_type = F_WRLCK;
  if (fcntl(fd, getlk_op(), &fl) == -1) {
    return errno;
  }
  return fl.l_type == F_UNLCK ? 0 : EAGAIN;
}

// QEMU's raw_lock_error_setg_errno: EAGAIN/EACCES mean "someone else holds it", a common case
// whose errno text is elided.
Error lock_error(int err, const std::string& message) {
  if (err == EAGAIN || err == EACCES) {
    return Error(ErrorKind::kPermission, message, err);
  }
  return Error::from_errno(err, message);
}

}  // namespace

bool ImageLock::ofd_supported() {
  static const bool supported = [] {
    int fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
      return false;
    }
    struct flock fl = {};
    fl.l_whence = SEEK_SET;
    fl.l_start = 0;
    fl.l_len = 0;
    fl.l_type = F_WRLCK;
    bool ok = fcntl(fd, F_OFD_GETLK, &fl) == 0;
    ::close(fd);
    return ok;
  }();
  return supported;
}

ImageLock::ImageLock(int fd, std::string filename)
    : fd_(fd), filename_(std::move(filename)), shared_(kPermAll) {}

ImageLock::ImageLock(ImageLock&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      filename_(std::move(other.filename_)),
      perm_(std::exchange(other.perm_, 0)),
      shared_(std::exchange(other.shared_, kPermAll)),
      locked_perm_(std::exchange(other.locked_perm_, 0)),
      locked_unshared_(std::exchange(other.locked_unshared_, 0)),
      conflict_hint_(std::move(other.conflict_hint_)) {}

Result<void> ImageLock::apply(uint64_t perm_bits, uint64_t unshared_bits, bool unlock) {
  struct Side {
    int base;
    uint64_t wanted;
    uint64_t* locked;
  };
  const Side sides[] = {{kLockPermBase, perm_bits, &locked_perm_},
                        {kLockSharedBase, unshared_bits, &locked_unshared_}};
  for (const Side& side : sides) {
    for (int i = 0; i < kPermBits; ++i) {
      const uint64_t bit = uint64_t{1} << i;
      const int offset = side.base + i;
      if ((side.wanted & bit) != 0 && (*side.locked & bit) == 0) {
        if (int err = set_byte(fd_, offset, F_RDLCK); err != 0) {
          return lock_error(err, "Failed to lock byte " + std::to_string(offset));
        }
        *side.locked |= bit;
      } else if (unlock && (*side.locked & bit) != 0 && (side.wanted & bit) == 0) {
        if (int err = set_byte(fd_, offset, F_UNLCK); err != 0) {
          return Error::from_errno(err, "Failed to unlock byte " + std::to_string(offset));
        }
        *side.locked &= ~bit;
      }
    }
  }
  return ok();
}

Result<void> ImageLock::check(uint64_t perm, uint64_t shared) const {
  for (int i = 0; i < kPermBits; ++i) {
    const uint64_t bit = uint64_t{1} << i;
    if ((perm & bit) != 0) {
      if (int err = test_byte(fd_, kLockSharedBase + i); err != 0) {
        return lock_error(err, "Failed to get \"" + perm_names(bit) + "\" lock");
      }
    }
  }
  for (int i = 0; i < kPermBits; ++i) {
    const uint64_t bit = uint64_t{1} << i;
    if ((shared & bit) == 0) {
      if (int err = test_byte(fd_, kLockPermBase + i); err != 0) {
        return lock_error(err, "Failed to get shared \"" + perm_names(bit) + "\" lock");
      }
    }
  }
  return ok();
}

Result<void> ImageLock::prepare(uint64_t perm, uint64_t shared) {
  conflict_hint_.clear();
  if ((perm_ | perm) == perm_ && (shared_ & shared) == shared_) {
    // Only unlocking ahead; commit() does it, abort() has nothing to undo.
    return ok();
  }
  Result<void> result = apply(perm_ | perm, (~shared_ | ~shared) & kPermAll, /*unlock=*/false);
  if (result.ok()) {
    result = check(perm, shared);
    if (result.ok()) {
      return ok();
    }
    conflict_hint_ = "Is another process using the image [" + filename_ + "]?";
  }
  abort();
  return result;
}

void ImageLock::commit(uint64_t perm, uint64_t shared) {
  perm_ = perm & kPermAll;
  shared_ = shared & kPermAll;
  // Only unlocks (prepare locked everything the new set needs) or re-locks bytes a failed unlock
  // left behind; a failure leaves a byte locked, which errs on the safe side, as in QEMU (which
  // only warns).
  ignore_error(apply(perm_, ~shared_ & kPermAll, /*unlock=*/true),
               "unlocking cannot conflict; a leftover byte only over-reports our permissions");
}

void ImageLock::abort() {
  ignore_error(apply(perm_, ~shared_ & kPermAll, /*unlock=*/true),
               "unlocking cannot conflict; a leftover byte only over-reports our permissions");
}

void ImageLock::release() {
  perm_ = 0;
  shared_ = kPermAll;
  ignore_error(apply(0, 0, /*unlock=*/true),
               "closing the fd drops any byte a failed unlock left behind");
}

Result<void> ImageLock::adopt(uint64_t perm, uint64_t shared) {
  auto applied = apply(perm & kPermAll, ~shared & kPermAll, /*unlock=*/true);
  if (!applied) {
    return applied;
  }
  perm_ = perm & kPermAll;
  shared_ = shared & kPermAll;
  return ok();
}

}  // namespace strata::block
