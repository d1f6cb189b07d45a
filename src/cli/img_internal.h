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
// The getopt results every sub-command handles alike (img_options.cc): a missing option
// argument (":"), an unknown option ("?"), and --object (created at once, as qemu-img does:
// TLS credentials and authz objects for NBD images). Each returns exit status 1 after reporting
// a failure, add_object 0 on success.
int missing_argument(const char* option);
int unrecognized_option(const char* option);
int add_object(const char* spec);

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

// The QMP block-dirty-bitmap-* semantics `strata img bitmap` and `convert --bitmaps` share
// (img_bitmap.cc), with QEMU's messages. add_bitmap: a new persistent bitmap (granularity 0: the
// node's default), disabled when asked. remove_bitmap: also from the image at once.
// merge_bitmap: ORs `source_name` of `source_node` into `name` of `node`.
Result<void> add_bitmap(block::Node& node, const std::string& name, uint32_t granularity,
                        bool disabled);
// The checks of add_bitmap alone (the error add_bitmap would return).
Result<void> can_add_bitmap(block::Node& node, const std::string& name, uint32_t granularity);
Result<void> remove_bitmap(BlockSession& session, block::Node& node, const std::string& name);
Result<void> merge_bitmap(block::Node& node, const std::string& name, block::Node& source_node,
                          const std::string& source_name);
// QEMU's bdrv_supports_persistent_dirty_bitmap: a format that stores bitmaps (qcow2 version 3).
bool supports_persistent_bitmaps(block::Node& node);

// convert --bitmaps (img_convert_bitmaps.cc), reporting qemu-img's messages: whether every
// persistent bitmap of `source` can be copied (inconsistent ones only with `skip_broken`), and
// the copy itself, after the data.
bool check_bitmaps_copyable(block::Node& source, bool skip_broken);
bool copy_bitmaps(BlockSession& session, block::Node& source, block::Node& target,
                  bool skip_broken);

// convert -C (img_plain_file.cc): copies `bytes` with copy_file_range when both nodes are
// plain files (file, or raw without a window over file); false when that is not possible or
// fails part-way (the caller copies the whole range the ordinary way then).
bool copy_file_range_between(block::Node& source, uint64_t source_offset, block::Node& target,
                             uint64_t target_offset, uint64_t bytes);

// Whether `node` is a plain file for the helpers here (file, or raw without a window over file).
bool is_plain_file(block::Node& node);
// resize --preallocation=falloc: posix_fallocate of [offset, offset + bytes) in the file under
// `node` (a plain file); "Could not preallocate new data" with the errno otherwise.
Result<void> fallocate_plain_file(block::Node& node, uint64_t offset, uint64_t bytes);

// qemu-img's cvtnum_full: `text` as a number (with size suffixes when `suffixes`) in [min, max];
// reports "Invalid <what> specified: '<text>'." or "Invalid <what> specified. Must be between
// <min> and <max>." and returns nullopt.
std::optional<int64_t> parse_number(const char* text, const char* what, bool suffixes, int64_t min,
                                    int64_t max);

// qemu-img's -l SNAPSHOT_PARAM ("snapshot.id=ID,snapshot.name=NAME", or an ID or name).
struct SnapshotSelector {
  std::optional<std::string> id;
  std::optional<std::string> name;
  std::optional<std::string> id_or_name;
};
// Parses -l; reports QEMU's messages ("Invalid parameter 'x'", then "Failed in parsing snapshot
// param 'TEXT'") and returns nullopt.
std::optional<SnapshotSelector> parse_snapshot_param(const std::string& text);
// QEMU's bdrv_snapshot_load_tmp(_by_id_or_name) on a read-only image: `node` reads the snapshot
// from now on. The error is QEMU's text (callers prefix "Failed to load snapshot: ").
Result<void> load_snapshot(BlockSession& session, block::Node& node,
                           const SnapshotSelector& selector);

}  // namespace strata::cli::img
