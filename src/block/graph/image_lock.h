#pragma once
// QEMU-compatible image locking: one open file description's share of the byte-range lock protocol
// of block/file-posix.c (raw_apply_lock_bytes, raw_check_lock_bytes, raw_handle_perm_lock), so that
// strata and QEMU processes (qemu-img, qemu-io, qemu-storage-daemon, libvirt-run QEMU) see each
// other's permissions on the same image file.
//
// Protocol (must match QEMU bit for bit):
//  - byte 100+i is held while this description holds permission bit i (see permissions.h),
//  - byte 200+i is held while this description does NOT share permission bit i,
//  - every lock is a 1-byte shared (F_RDLCK) open-file-description lock (F_OFD_SETLK), so any
//    number of holders coexist and only the probes below detect conflicts,
//  - a conflict is found by an exclusive (F_WRLCK) F_OFD_GETLK probe on one byte, which reports
//    locks of every other open file description, including ones in this process.
// When the kernel lacks OFD locks (ofd_supported() == false) the class falls back to process-
// associated F_SETLK/F_GETLK like QEMU does; then locks do not conflict within one process and are
// lost when the process closes any descriptor of the file. Warning the user about that is the
// caller's business (QEMU prints "File lock requested but OFD locking syscall is unavailable,
// falling back to POSIX file locks").
//
// The class never opens or closes the file: it borrows `fd`, which must stay open for the lifetime
// of the object. Closing the fd drops every lock (the kernel does it); release() drops them while
// keeping the fd. Nothing here is thread-safe; the owning node serialises permission changes.

#include <cstdint>
#include <string>

#include "base/result.h"

namespace strata::block {

class ImageLock {
 public:
  // Nothing is locked initially: committed perm = 0, shared = kPermAll (QEMU's state after open).
  ImageLock(int fd, std::string filename);
  ImageLock(ImageLock&& other) noexcept;
  ImageLock& operator=(ImageLock&&) = delete;
  ImageLock(const ImageLock&) = delete;
  ImageLock& operator=(const ImageLock&) = delete;
  ~ImageLock() = default;  // deliberately does not unlock: the fd may already be closed or reused

  // Phase 1 of a permission change (RAW_PL_PREPARE). Locks the bytes for (committed ∪ perm) and
  // for the permissions not shared by either the committed or the new set, then probes, in QEMU's
  // order, byte 200+i for every bit i of `perm` (→ `Failed to get "<name>" lock`), then byte 100+i
  // for every bit i missing from `shared` (→ `Failed to get shared "<name>" lock`); the first
  // conflict found is reported. If the new set only drops permissions or shares more, nothing is
  // locked or probed (as in QEMU: such changes cannot conflict).
  // On failure the locked bytes are put back to the committed set and the error is returned:
  // kind kPermission for a conflict (errno text elided, as QEMU does for EAGAIN/EACCES), otherwise
  // the errno's kind with ": <strerror>" appended. After a conflict, conflict_hint() returns QEMU's
  // hint line; QMP never shows hints, the CLI may print it on a second line.
  // At most one prepare may be outstanding; it must be followed by commit() or abort().
  [[nodiscard]] Result<void> prepare(uint64_t perm, uint64_t shared);

  // Phase 2 (RAW_PL_COMMIT): the new set becomes the committed one; bytes it does not need are
  // unlocked. Unlocking cannot conflict; an OS failure leaves the byte locked (safe direction).
  void commit(uint64_t perm, uint64_t shared);

  // RAW_PL_ABORT: back to exactly the committed byte set.
  void abort();

  // Takes the bytes of (perm, shared) without probing for conflicts and makes them the committed
  // set. For a second descriptor of a file whose first descriptor already passed prepare() for
  // the same set (a reopen moves the locks to a new descriptor): probing from the new one would
  // see the old one's locks as conflicts.
  [[nodiscard]] Result<void> adopt(uint64_t perm, uint64_t shared);

  // Drops every byte and resets the committed set to (0, kPermAll). The fd stays open.
  void release();

  uint64_t perm() const { return perm_; }
  uint64_t shared() const { return shared_; }
  const std::string& filename() const { return filename_; }

  // "Is another process using the image [FILENAME]?" after the last prepare() failed on a lock
  // conflict (QEMU's error_append_hint text, without the newline); empty otherwise.
  const std::string& conflict_hint() const { return conflict_hint_; }

  // Whether F_OFD_SETLK/F_OFD_GETLK work on this kernel; probed once (on /dev/null, like QEMU's
  // qemu_probe_lock_ops) and cached for the process lifetime — a fact about the kernel, not state.
  static bool ofd_supported();

 private:
  // Makes the held bytes equal to `perm_bits` on 100+i and `unshared_bits` on 200+i: locks missing
  // bytes; with `unlock`, also unlocks bytes outside those sets. Stops at the first failure.
  Result<void> apply(uint64_t perm_bits, uint64_t unshared_bits, bool unlock);
  Result<void> check(uint64_t perm, uint64_t shared) const;

  int fd_;
  std::string filename_;
  uint64_t perm_ = 0;             // committed
  uint64_t shared_;               // committed
  uint64_t locked_perm_ = 0;      // bits whose byte 100+i is currently locked
  uint64_t locked_unshared_ = 0;  // bits whose byte 200+i is currently locked
  std::string conflict_hint_;
};

}  // namespace strata::block
