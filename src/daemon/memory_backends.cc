#include "daemon/memory_backends.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace strata::daemon {

namespace {

Error invalid(std::string message) {
  return make_error(ErrorKind::kInvalidArgument, std::move(message));
}

Error os_error(int error, const std::string& what) {
  return Error::from_errno(error, what);
}

}  // namespace

MemoryBackend::~MemoryBackend() {
  if (memory_ != nullptr) {
    ::munmap(memory_, size_);
  }
  if (fd_ >= 0) {
    ::close(fd_);
  }
}

Result<std::unique_ptr<MemoryBackend>> MemoryBackend::create(const std::string& qom_type,
                                                             const std::string& id, ArgDecoder& d) {
  std::unique_ptr<MemoryBackend> backend(new MemoryBackend());
  backend->id_ = id;
  backend->qom_type_ = qom_type;
  const bool is_file = qom_type == "memory-backend-file";
  const bool is_memfd = qom_type == "memory-backend-memfd";
  std::optional<uint64_t> size = d.opt_size("size");
  backend->share_ = d.opt_bool("share").value_or(is_memfd);
  backend->prealloc_ = d.opt_bool("prealloc").value_or(false);
  if (is_file) {
    backend->mem_path_ = d.opt_str("mem-path");
  }
  // Accepted as QEMU's, with no effect here.
  (void)d.opt_bool("merge");
  (void)d.opt_bool("dump");
  (void)d.opt_bool("reserve");
  auto decoded = d.finish();
  if (!decoded) {
    return std::move(decoded).error();
  }
  if (!size) {
    return invalid("Parameter 'size' is missing");
  }
  if (*size == 0) {
    return invalid("property 'size' of " + qom_type + " doesn't take value '0'");
  }
  if (is_file && !backend->mem_path_) {
    return invalid("Parameter 'mem-path' is missing");
  }
  backend->size_ = *size;

  int flags = backend->share_ ? MAP_SHARED : MAP_PRIVATE;
  if (is_memfd) {
    backend->fd_ = ::memfd_create(id.c_str(), MFD_CLOEXEC);
    if (backend->fd_ < 0) {
      return os_error(errno, "failed to create memfd");
    }
  } else if (is_file) {
    backend->fd_ = ::open(backend->mem_path_->c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (backend->fd_ < 0) {
      return os_error(errno, "can't open backing store " + *backend->mem_path_ + " for guest RAM");
    }
  } else {
    flags |= MAP_ANONYMOUS;
  }
  if (backend->fd_ >= 0) {
    struct stat st {};
    if (::fstat(backend->fd_, &st) != 0) {
      return os_error(errno, "fstat");
    }
    if (static_cast<uint64_t>(st.st_size) < backend->size_ &&
        ::ftruncate(backend->fd_, static_cast<off_t>(backend->size_)) != 0) {
      return os_error(errno, "can't ftruncate backing store for guest RAM");
    }
  }
  if (backend->prealloc_) {
    flags |= MAP_POPULATE;
  }
  void* memory = ::mmap(nullptr, backend->size_, PROT_READ | PROT_WRITE, flags, backend->fd_, 0);
  if (memory == MAP_FAILED) {
    return os_error(errno, "unable to map backing store for guest RAM");
  }
  backend->memory_ = memory;
  return backend;
}

nlohmann::json MemoryBackend::info() const {
  nlohmann::json entry = {{"id", id_},
                          {"size", size_},
                          {"merge", true},
                          {"dump", true},
                          {"prealloc", prealloc_},
                          {"share", share_},
                          {"reserve", true},
                          {"host-nodes", nlohmann::json::array()},
                          {"policy", "default"}};
  return entry;
}

bool MemoryBackends::handles(const std::string& qom_type) {
  return qom_type == "memory-backend-ram" || qom_type == "memory-backend-memfd" ||
         qom_type == "memory-backend-file";
}

Result<void> MemoryBackends::add(const std::string& qom_type, const std::string& id,
                                 ArgDecoder& d) {
  auto backend = MemoryBackend::create(qom_type, id, d);
  if (!backend) {
    return std::move(backend).error();
  }
  backends_.emplace(id, std::move(backend).value());
  return ok();
}

const MemoryBackend* MemoryBackends::find(const std::string& id) const {
  auto it = backends_.find(id);
  return it == backends_.end() ? nullptr : it->second.get();
}

nlohmann::json MemoryBackends::info() const {
  nlohmann::json list = nlohmann::json::array();
  for (const auto& [id, backend] : backends_) {
    list.push_back(backend->info());
  }
  return list;
}

}  // namespace strata::daemon
