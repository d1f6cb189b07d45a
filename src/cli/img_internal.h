#pragma once
// Shared by the `strata img` sub-commands (img_*.cc).

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "aio/task.h"
#include "base/result.h"
#include "block/graph/node.h"
#include "cli/block_tool.h"

namespace strata::cli::img {

inline constexpr const char kProgram[] = "strata img";

// qemu-img's error_report: "strata img: message" on stderr.
void report(const std::string& message);
// qemu-img's error_exit: the message, a hint, exit status 1.
int error_exit(const std::string& message);

// The one image a sub-command works on, opened from a file name or (--image-opts) options.
struct OpenedImage {
  std::unique_ptr<BlockSession> session;
  block::Node* node = nullptr;
};
// Opens `name` with `request`'s other settings; reports failures qemu-img's way
// ("Could not open 'x': ...") and returns nullopt after a report.
std::optional<OpenedImage> open_image_or_report(ImageOpenRequest request, const std::string& name,
                                                bool image_opts);

// One run of qemu-img's get_block_status over the backing chain (MapEntry without start).
struct ChainStatus {
  uint64_t bytes = 0;
  bool data = false;
  bool zero = false;
  bool present = false;     // allocated somewhere in the chain
  bool compressed = false;  // stored compressed in the layer that has it
  bool has_offset = false;
  uint64_t offset = 0;
  int depth = 0;
  std::optional<std::string> filename;  // the file the offset is in
  block::Node* file = nullptr;          // the node the offset is in (when has_offset)
};
// Status of [offset, offset + bytes) of `node`, descending into backing files where a layer has
// neither data nor zeroes (QEMU's bdrv_block_status_above with base NULL).
aio::Task<Result<ChainStatus>> chain_status(block::Node& node, uint64_t offset, uint64_t bytes);

int info_main(int argc, char** argv);
int map_main(int argc, char** argv);
int compare_main(int argc, char** argv);
int convert_main(int argc, char** argv);
int create_main(int argc, char** argv);
int check_main(int argc, char** argv);
int bitmap_main(int argc, char** argv);
int rebase_main(int argc, char** argv);
int commit_main(int argc, char** argv);
int amend_main(int argc, char** argv);
int bench_main(int argc, char** argv);
int snapshot_main(int argc, char** argv);
int resize_main(int argc, char** argv);

// qemu-img's snapshot table text (bdrv_snapshot_dump), without the newline: the column header
// and one row.
std::string snapshot_dump_header();
std::string snapshot_dump(const block::Node::SnapshotInfo& snapshot);
int measure_main(int argc, char** argv);

// "-o a=b,c=d" items in order; ",," is a literal comma (QEMU's get_opt_value).
Result<std::vector<std::pair<std::string, std::string>>> split_options(
    const std::vector<std::string>& texts);
// The -o keys qemu-img accepts for qcow2 targets (QEMU's qcow2_create_opts, without encryption
// details).
bool is_qcow2_create_option(const std::string& key);
// qemu-img create -f qcow2 (`given`: the -o options without size). Reports failures as
// "FILENAME: <error_prefix>message" and returns 1; 0 on success. `quiet` drops the
// "Formatting ..." line.
int create_qcow2(const std::string& filename, const std::map<std::string, std::string>& given,
                 std::optional<uint64_t> size, bool unsafe, bool quiet,
                 const std::string& error_prefix);

// Creates (or truncates) a raw image file of `size` bytes with QEMU's raw preallocation modes
// (off, falloc, full); allocates the first block like file-posix's create.
Result<void> create_raw_file(const std::string& filename, uint64_t size,
                             const std::string& preallocation);
// QEMU's create fallback for protocols that cannot create images (bdrv_co_create_opts_simple),
// for NBD URIs: the export must exist and be at least `size` bytes; its first sector is zeroed.
Result<void> create_on_nbd_export(const std::string& uri, uint64_t size,
                                  const std::string& preallocation);

}  // namespace strata::cli::img
