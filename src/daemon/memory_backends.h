#pragma once
// Memory backend objects (QEMU's memory-backend-ram, -memfd and -file, created by --object or
// object-add): the machine's RAM as mapped memory regions. A shared file or memfd backend can be
// mapped by another process (a hypervisor) that writes into it; migration saves and restores the
// regions. query-memdev lists them.
//
// Threading: the main loop (object-add/-del, query-memdev).

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "base/arg_decoder.h"
#include "base/result.h"

namespace strata::daemon {

class MemoryBackend {
 public:
  ~MemoryBackend();
  MemoryBackend(const MemoryBackend&) = delete;
  MemoryBackend& operator=(const MemoryBackend&) = delete;

  // Decodes the properties of `qom_type` (size, share, prealloc, mem-path for files) with
  // QEMU's checks and maps the memory.
  static Result<std::unique_ptr<MemoryBackend>> create(const std::string& qom_type,
                                                       const std::string& id, ArgDecoder& d);

  const std::string& id() const { return id_; }
  const std::string& qom_type() const { return qom_type_; }
  uint64_t size() const { return size_; }
  bool shared() const { return share_; }
  char* data() const { return static_cast<char*>(memory_); }
  // The query-memdev entry (Memdev).
  nlohmann::json info() const;

 private:
  MemoryBackend() = default;

  std::string id_;
  std::string qom_type_;
  uint64_t size_ = 0;
  bool share_ = false;
  bool prealloc_ = false;
  std::optional<std::string> mem_path_;
  void* memory_ = nullptr;
  int fd_ = -1;
};

class MemoryBackends {
 public:
  static bool handles(const std::string& qom_type);
  // Adds a backend; `id_taken` tells whether another object has the id.
  Result<void> add(const std::string& qom_type, const std::string& id, ArgDecoder& d);
  bool contains(const std::string& id) const { return backends_.count(id) != 0; }
  bool remove(const std::string& id) { return backends_.erase(id) != 0; }
  const MemoryBackend* find(const std::string& id) const;
  // query-memdev: every backend.
  nlohmann::json info() const;

 private:
  std::map<std::string, std::unique_ptr<MemoryBackend>> backends_;
};

}  // namespace strata::daemon
