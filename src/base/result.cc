#include "base/result.h"

namespace strata {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInvalidArgument:
      return "invalid-argument";
    case ErrorKind::kNotFound:
      return "not-found";
    case ErrorKind::kExists:
      return "exists";
    case ErrorKind::kPermission:
      return "permission";
    case ErrorKind::kBusy:
      return "busy";
    case ErrorKind::kIo:
      return "io";
    case ErrorKind::kCorrupt:
      return "corrupt";
    case ErrorKind::kUnsupported:
      return "unsupported";
    case ErrorKind::kProtocol:
      return "protocol";
    case ErrorKind::kCancelled:
      return "cancelled";
    case ErrorKind::kTimeout:
      return "timeout";
  }
  return "unknown";
}

static ErrorKind kind_for_errno(int errno_value) {
  switch (errno_value) {
    case ENOENT:
    case ENODEV:
    case ENXIO:
      return ErrorKind::kNotFound;
    case EEXIST:
      return ErrorKind::kExists;
    case EPERM:
    case EACCES:
    case EROFS:
      return ErrorKind::kPermission;
    case EBUSY:
    case EAGAIN:
      return ErrorKind::kBusy;
    case EINVAL:
    case ERANGE:
    case EFBIG:
      return ErrorKind::kInvalidArgument;
    case ENOTSUP:
    case ENOSYS:
      return ErrorKind::kUnsupported;
    case ECANCELED:
      return ErrorKind::kCancelled;
    case ETIMEDOUT:
      return ErrorKind::kTimeout;
    default:
      return ErrorKind::kIo;
  }
}

// QEMU prints strerror text with an initial capital ("Permission denied", "No such file or
// directory"), which glibc already does.
Error Error::from_errno(int errno_value, const std::string& context) {
  std::string text = std::strerror(errno_value);
  std::string message = context.empty() ? text : context + ": " + text;
  return Error(kind_for_errno(errno_value), std::move(message), errno_value);
}

Error Error::with_prefix(const std::string& prefix) const {
  Error copy = *this;
  copy.message_ = prefix + ": " + message_;
  return copy;
}

Error make_error(ErrorKind kind, std::string message) {
  return Error(kind, std::move(message));
}

}  // namespace strata
