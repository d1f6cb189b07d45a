#pragma once

// Zero-copy source reads for `strata img convert`: data the page cache already holds is used in
// place, through a read-only shared mapping of the source's file, instead of being copied into a
// buffer first. The target write then copies it once (page cache to page cache), where a read
// into a buffer costs a second full copy; that read copy was a third of convert's CPU time.

#include <cstdint>
#include <vector>

#include "block/graph/node.h"

namespace strata::cli::img {

class MappedSource {
 public:
  MappedSource() = default;
  MappedSource(const MappedSource&) = delete;
  MappedSource& operator=(const MappedSource&) = delete;
  ~MappedSource();

  // Whether every node under `top` is a driver whose block status offsets map guest bytes to
  // file bytes unchanged (raw, qcow2 — strata opens no encrypted qcow2 —, file). A graph with
  // anything else (filters that inject errors or throttle, network drivers) is read through the
  // block layer only.
  static bool graph_allows(block::Node& top);

  // `bytes` bytes at `offset` of `file` in place, or nullptr: the caller then reads them through
  // the block layer. Not nullptr only when `file` is a regular-file `file` node, the range lies
  // inside the file, and every page of it is in the page cache now (so touching it does not
  // block the event loop on the disk). The pointer stays valid until this object is destroyed;
  // its contents are the file's at the time they are read, as the source is not written during a
  // convert (it is open read-only and locked against writers).
  const uint8_t* view(block::Node& file, uint64_t offset, uint64_t bytes);

 private:
  struct Mapping {
    block::Node* node = nullptr;
    uint8_t* base = nullptr;  // nullptr: the node cannot be mapped
    uint64_t length = 0;
  };
  Mapping& mapping_for(block::Node& file);

  std::vector<Mapping> mappings_;
  std::vector<unsigned char> residency_;  // mincore() output, reused
};

}  // namespace strata::cli::img
