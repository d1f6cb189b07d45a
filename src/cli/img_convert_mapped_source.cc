// Zero-copy source reads for img convert (see img_convert_mapped_source.h).

#include "cli/img_convert_mapped_source.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "block/drivers/file/file_node.h"

namespace strata::cli::img {

MappedSource::~MappedSource() {
  for (const Mapping& mapping : mappings_) {
    if (mapping.base != nullptr) {
      ::munmap(mapping.base, mapping.length);
    }
  }
}

bool MappedSource::graph_allows(block::Node& top) {
  const char* driver = top.driver_name();
  if (std::strcmp(driver, "raw") != 0 && std::strcmp(driver, "qcow2") != 0 &&
      std::strcmp(driver, "file") != 0) {
    return false;
  }
  for (const auto& child : top.children()) {
    if (child->node() != nullptr && !graph_allows(*child->node())) {
      return false;
    }
  }
  return true;
}

MappedSource::Mapping& MappedSource::mapping_for(block::Node& file) {
  for (Mapping& mapping : mappings_) {
    if (mapping.node == &file) {
      return mapping;
    }
  }
  Mapping mapping;
  mapping.node = &file;
  auto* file_node = dynamic_cast<block::FileNode*>(&file);
  struct stat st {};
  if (file_node != nullptr && file_node->data_fd() >= 0 &&
      ::fstat(file_node->data_fd(), &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0) {
    // Only what both the node and the file hold: a byte past the file's end would fault (SIGBUS).
    const uint64_t length = std::min<uint64_t>(file.length(), static_cast<uint64_t>(st.st_size));
    void* base = length == 0
                     ? MAP_FAILED
                     : ::mmap(nullptr, length, PROT_READ, MAP_SHARED, file_node->data_fd(), 0);
    if (base != MAP_FAILED) {
      mapping.base = static_cast<uint8_t*>(base);
      mapping.length = length;
    }
  }
  mappings_.push_back(mapping);
  return mappings_.back();
}

const uint8_t* MappedSource::view(block::Node& file, uint64_t offset, uint64_t bytes) {
  const Mapping& mapping = mapping_for(file);
  if (mapping.base == nullptr || bytes == 0 || offset > mapping.length ||
      bytes > mapping.length - offset) {
    return nullptr;
  }
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t start = offset / page * page;
  const uint64_t end = offset + bytes;
  const uint64_t pages = (end - start + page - 1) / page;
  residency_.resize(pages);
  if (::mincore(mapping.base + start, end - start, residency_.data()) != 0) {
    return nullptr;
  }
  for (unsigned char resident : residency_) {
    if ((resident & 1) == 0) {
      return nullptr;  // a page to read from the disk: leave that to the asynchronous path
    }
  }
#ifdef MADV_POPULATE_READ
  // One call maps the resident pages instead of a page fault per 64 KiB; a failure only means
  // the faults happen on first touch.
  (void)::madvise(mapping.base + start, end - start, MADV_POPULATE_READ);
#endif
  return mapping.base + offset;
}

}  // namespace strata::cli::img
