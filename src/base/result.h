#pragma once
// Errors as values: Result<T> holds either a T or an Error. strata's own small expected-like type
// (std::expected needs C++23, and libstdc++ 12's cannot be used from clang 14, which builds the
// fuzz targets).

#include <cerrno>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

namespace strata {

// The short list of things that go wrong. QMP maps kinds to QEMU's error classes; most become
// GenericError, the text is what the user reads.
enum class ErrorKind {
  kInvalidArgument,  // the caller asked for something malformed or impossible
  kNotFound,         // a named node, export, job, object or file does not exist
  kExists,           // a name is already taken
  kPermission,       // permission conflict, lock conflict, read-only or inactive node
  kBusy,             // in use by another operation
  kIo,               // the operating system or device failed the request
  kCorrupt,          // on-disk data violates its format
  kUnsupported,      // valid but not implemented by this driver or build
  kProtocol,         // a peer broke a wire protocol
  kCancelled,        // the operation was cancelled
  kTimeout,          // a deadline passed
};

const char* error_kind_name(ErrorKind kind);

class Error {
 public:
  Error(ErrorKind kind, std::string message, int errno_value = 0)
      : kind_(kind), errno_(errno_value), message_(std::move(message)) {}

  // An error from the operating system: kind derived from the errno, message is context + strerror
  // in QEMU's "context: Strerror text" shape.
  static Error from_errno(int errno_value, const std::string& context);

  ErrorKind kind() const { return kind_; }
  // The errno a data-path caller should report (EIO when the error did not come from the OS).
  int errno_value() const { return errno_ != 0 ? errno_ : EIO; }
  bool has_errno() const { return errno_ != 0; }
  const std::string& message() const { return message_; }

  // Returns a copy whose message is "prefix: message" (QEMU's error_prepend).
  Error with_prefix(const std::string& prefix) const;

  // The QMP error class when it is not GenericError (e.g. "DeviceNotActive", "CommandNotFound").
  const std::string& qmp_class() const { return qmp_class_; }
  Error with_qmp_class(std::string qmp_class) const {
    Error copy = *this;
    copy.qmp_class_ = std::move(qmp_class);
    return copy;
  }

 private:
  ErrorKind kind_;
  int errno_;
  std::string message_;
  std::string qmp_class_;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : storage_(std::in_place_index<0>, std::move(value)) {}      // NOLINT: implicit
  Result(Error error) : storage_(std::in_place_index<1>, std::move(error)) {}  // NOLINT: implicit
  template <typename U>
  requires(std::is_constructible_v<T, U&&> && !std::is_same_v<std::decay_t<U>, T> &&
           !std::is_same_v<std::decay_t<U>, Error> && !std::is_same_v<std::decay_t<U>, Result<T>>)
      Result(U&& value)  // NOLINT: implicit, e.g. Result<std::string> from a literal
      : storage_(std::in_place_index<0>, T(std::forward<U>(value))) {}

  bool ok() const { return storage_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & { return std::get<0>(storage_); }
  const T& value() const& { return std::get<0>(storage_); }
  T&& value() && { return std::get<0>(std::move(storage_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const& { return std::get<1>(storage_); }
  Error&& error() && { return std::get<1>(std::move(storage_)); }

 private:
  std::variant<T, Error> storage_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)), failed_(true) {}  // NOLINT: implicit

  bool ok() const { return !failed_; }
  explicit operator bool() const { return ok(); }
  void value() const {}
  const Error& error() const& { return error_; }
  Error&& error() && { return std::move(error_); }

 private:
  Error error_{ErrorKind::kIo, {}};
  bool failed_ = false;
};

inline Result<void> ok() {
  return {};
}

// The one greppable place where an error is deliberately dropped; `why` documents the reason at
// the call site.
template <typename T>
inline void ignore_error(Result<T>&& result, const char* why) {
  (void)result;
  (void)why;
}

Error make_error(ErrorKind kind, std::string message);

}  // namespace strata
