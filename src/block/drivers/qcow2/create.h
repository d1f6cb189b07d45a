#pragma once
// Creating a qcow2 image (QEMU's qcow2_co_create and the metadata preallocation of
// qcow2_co_truncate): the options of `qemu-img create -o` / blockdev-create, validated with
// QEMU's messages, turned into a layout (the bytes of every metadata cluster and where they go),
// then written through the block layer into an empty `file` node.
//
// Layout, as QEMU's for the same options whenever its refcount table does not have to grow:
// cluster 0 header (extensions and backing file name included), then the refcount table, the
// first refcount block, the L1 table; with preallocation each L2 table followed by the data
// clusters it maps; refcount blocks beyond the first go after everything they describe.

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "aio/task.h"
#include "base/result.h"
#include "block/graph/node.h"

namespace strata::block::qcow2 {

enum class Preallocation { kOff, kMetadata, kFalloc, kFull };

struct CreateOptions {
  uint64_t size = 0;  // guest bytes; rounded up to 512 like QEMU
  uint32_t version = 3;
  uint64_t cluster_size = 65536;
  uint64_t refcount_bits = 16;
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  uint8_t compression_type = 0;  // kCompressionZlib / kCompressionZstd
  bool compression_type_given = false;
  std::optional<std::string> backing_file;
  std::optional<std::string> backing_format;
  std::optional<std::string> data_file;
  bool data_file_raw = false;
  Preallocation preallocation = Preallocation::kOff;
};

// QEMU's checks of qcow2_co_create, in its order and with its messages. May adjust `options`
// (data_file_raw implies metadata preallocation, as in QEMU).
Result<void> validate_create_options(CreateOptions& options);

struct ImageLayout {
  // Byte ranges to write, in order; everything else in [0, file_length) reads as zeroes.
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> writes;
  uint64_t file_length = 0;
  // Preallocated data clusters (offset, bytes) in the image file (empty with a data file).
  std::vector<std::pair<uint64_t, uint64_t>> data_extents;
};

// The image `options` describe (already validated). Fails only when the image would exceed
// qcow2's table limits ("Image size too large" style messages from QEMU).
Result<ImageLayout> layout_image(const CreateOptions& options);

// Writes `layout` into `file` (empty, opened writable with resize permission) and sets its
// length; flushes before returning.
aio::Task<Result<void>> write_image(Node& file, const ImageLayout& layout);

}  // namespace strata::block::qcow2
