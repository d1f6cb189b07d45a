#pragma once
// Node: one driver instance in the block graph (QEMU's BlockDriverState). Child: an edge from a
// parent (a node, or a root user such as an export, a job or a monitor device) to a node, with the
// permissions the parent takes and the ones it shares with other users of the same node.
//
// Threading: a node tree is bound to one EventLoop (its home). Graph changes and permission
// updates happen on the main loop with the affected nodes drained; data-path calls run on the home
// loop.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "aio/task.h"
#include "base/result.h"
#include "block/graph/permissions.h"
#include "block/io/io_vector.h"

namespace strata::block {

class Node;
class Graph;
struct DriverOptions;
struct RequestTracker;
namespace bitmap {
class BitmapSet;
}
// Debug events for fault injection, defined in block/drivers/blkdebug/events.h.
enum class BlkdebugEvent : uint8_t;

// What a child is to its parent (QEMU's BdrvChildRole bits).
enum ChildRole : uint32_t {
  kRoleData = 1u << 0,      // guest-visible data lives here
  kRoleMetadata = 1u << 1,  // format metadata lives here
  kRoleFiltered = 1u << 2,  // the parent is a filter of this child
  kRoleCow = 1u << 3,       // a backing file
  kRolePrimary = 1u << 4,   // the parent's main child (bs->file or bs->backing of a filter)
  kRoleImage = kRoleData | kRoleMetadata | kRolePrimary,
};

// A holder of Child edges: a node, or a root user (export, job, device).
class BlockParent {
 public:
  virtual ~BlockParent() = default;
  // Describes the parent in permission errors: "node 'disk'", "an unnamed block device",
  // "block device 'drive0'", "stream job 'job0'".
  virtual std::string parent_description() const = 0;
  // Whether an edge of this parent stays where it is when its node is replaced by another in the
  // graph (QEMU's stay_at_node: block jobs keep the nodes they work on; exports and nodes
  // follow the replacement).
  virtual bool stays_at_node() const { return false; }
};

class Child {
 public:
  Child(BlockParent* parent, Node* parent_node, std::shared_ptr<Node> node, std::string name,
        uint32_t role)
      : parent_(parent),
        parent_node_(parent_node),
        node_(std::move(node)),
        name_(std::move(name)),
        role_(role) {}

  BlockParent* parent() const { return parent_; }
  // The parent node, or nullptr for a root user.
  Node* parent_node() const { return parent_node_; }
  Node* node() const { return node_.get(); }
  const std::shared_ptr<Node>& node_ref() const { return node_; }
  const std::string& name() const { return name_; }
  uint32_t role() const { return role_; }
  uint64_t perm() const { return perm_; }
  uint64_t shared() const { return shared_; }

 private:
  friend class Graph;
  BlockParent* parent_;
  Node* parent_node_;
  std::shared_ptr<Node> node_;
  std::string name_;
  uint32_t role_;
  uint64_t perm_ = 0;
  uint64_t shared_ = kPermAll;
};

// Limits a driver declares at open (QEMU's BlockLimits). All sizes in bytes; 0 means "none".
struct NodeLimits {
  uint32_t request_alignment = 1;  // offsets and lengths of data requests are multiples of this
  uint32_t memory_alignment = 1;   // buffer addresses must be aligned to this (O_DIRECT)
  uint64_t max_transfer = 0;       // largest single request
  uint64_t max_pwrite_zeroes = 0;
  uint64_t max_pdiscard = 0;
  uint32_t pdiscard_alignment = 0;
  uint32_t pwrite_zeroes_alignment = 0;
};

// Flags of data requests.
enum RequestFlags : uint32_t {
  kRequestFua = 1u << 0,          // write through to stable storage before completing
  kRequestMayUnmap = 1u << 1,     // write-zeroes may deallocate
  kRequestNoFallback = 1u << 2,   // write-zeroes must be fast or fail with ENOTSUP
  kRequestSerialising = 1u << 3,  // wait for and block overlapping requests (RMW, COW)
  // Store the data compressed (QEMU's BDRV_REQ_WRITE_COMPRESSED): writes only, honoured by
  // qcow2 for whole, cluster-aligned clusters (the last may end at the image end); other
  // drivers fail with ENOTSUP.
  kRequestWriteCompressed = 1u << 4,
  // A read that does not wait for serialising requests (QEMU's BDRV_REQ_NO_SERIALISING): write
  // notifiers such as copy-before-write read old data while the write that triggered them holds
  // its range.
  kRequestNoSerialising = 1u << 16,
  // A read that copies what it finds below the node into the node (QEMU's
  // BDRV_REQ_COPY_ON_READ): see io::preadv.
  kRequestCopyOnRead = 1u << 17,
  // With kRequestCopyOnRead: only bring the data into the node; the caller's buffer gets
  // nothing (QEMU's BDRV_REQ_PREFETCH, used by block-stream).
  kRequestPrefetch = 1u << 18,
};

// Result of a block-status query over [offset, offset + bytes).
struct BlockStatus {
  enum Flags : uint32_t {
    kData = 1u << 0,       // reads return data stored here (not known zero)
    kZero = 1u << 1,       // reads return zeroes
    kAllocated = 1u << 2,  // allocated at this layer (not from backing)
    kOffsetValid = 1u << 3,
    kRecurse = 1u << 4,     // ask `file` at `map_offset` for the truth
    kCompressed = 1u << 5,  // stored compressed (QEMU's BDRV_BLOCK_COMPRESSED)
  };
  uint64_t bytes = 0;  // length of the run with identical status, > 0
  uint32_t flags = 0;
  uint64_t map_offset = 0;  // offset in `file` when kOffsetValid
  Node* file = nullptr;

  // For a driver's own answer (Node::co_block_status): the node itself holds the run (data or
  // zeroes of its own), rather than its backing file (QEMU's bdrv_is_allocated).
  bool allocated_here() const { return (flags & (kData | kZero | kAllocated)) != 0; }
};

// Options every node has (blockdev-add common members).
struct CommonOptions {
  std::string node_name;
  bool read_only = false;
  bool auto_read_only = false;
  bool force_share = false;
  bool active = true;
  std::string discard = "ignore";     // ignore | unmap
  std::string detect_zeroes = "off";  // off | on | unmap
  bool cache_direct = false;
  bool cache_no_flush = false;
};

class Node : public BlockParent, public std::enable_shared_from_this<Node> {
 public:
  explicit Node(CommonOptions options);
  ~Node() override;
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  // ---- identity and options -------------------------------------------------------------
  const std::string& name() const { return options_.node_name; }
  virtual const char* driver_name() const = 0;
  // The image format name reported in ImageInfo ("raw", "file", "qcow2", "null-co").
  virtual const char* format_name() const { return driver_name(); }
  const CommonOptions& common_options() const { return options_; }
  // The options the node was opened with, as given (used for json: pseudo-filenames and reopen).
  const nlohmann::json& open_options() const { return open_options_; }
  void set_open_options(nlohmann::json options) { open_options_ = std::move(options); }
  // QEMU's bs->filename: the exact filename when there is one, else a json:{...} pseudo-filename
  // built from full_options() (bdrv_refresh_filename).
  std::string filename() const;
  // A plain filename that alone reopens this node ("/path/img", "null-co://"), or nullopt.
  virtual std::optional<std::string> exact_filename() const { return std::nullopt; }
  // {"driver": ..., strong options..., child name: child's full options...}: the options that
  // define what the node reads (QEMU leaves out node-name, read-only, cache and the like).
  nlohmann::json full_options() const;
  // The driver's own options that change what the node reads (QEMU's strong_runtime_opts).
  virtual nlohmann::json strong_options() const { return nlohmann::json::object(); }
  // True when this node is a filter whose only data comes from its filtered child.
  virtual bool is_filter() const { return false; }
  std::string parent_description() const override { return "node '" + name() + "'"; }

  // ---- data path ---------------------------------------------------------------------------
  // Contract for every co_* method: called only through the request layer (block/io), which has
  // checked the range against length(), entered the node's gate, aligned offset and length to
  // limits().request_alignment and split them to limits().max_transfer.
  virtual aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                            uint32_t flags) = 0;
  virtual aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                             uint32_t flags);
  // Default: nothing to flush (the request layer flushes the children written through).
  virtual aio::Task<Result<void>> co_flush();
  virtual aio::Task<Result<void>> co_pdiscard(uint64_t offset, uint64_t bytes);
  // Default: ENOTSUP, and the request layer writes zeroed buffers instead.
  virtual aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes, uint32_t flags);
  // Default: everything is data (or delegated to the primary child for filters).
  virtual aio::Task<Result<BlockStatus>> co_block_status(uint64_t offset, uint64_t bytes);
  virtual aio::Task<Result<void>> co_truncate(uint64_t new_size, bool exact);
  // Current virtual size in bytes.
  virtual uint64_t length() const = 0;
  // Bytes allocated on the host, if known (ImageInfo actual-size).
  virtual std::optional<uint64_t> allocated_size() const;

  const NodeLimits& limits() const { return limits_; }

  // A parent announces a debug event on this node (QEMU's bdrv_co_debug_event). Only blkdebug
  // reacts; events are not forwarded to children.
  virtual void debug_event(BlkdebugEvent event) { (void)event; }

  // ---- permissions ------------------------------------------------------------------------
  // The permissions this node takes on `child` and shares with others, given the cumulative
  // permissions its own parents take (`perm`) and share (`shared`). Default: QEMU's
  // bdrv_default_perms by role.
  virtual void child_perm(const Child& child, uint64_t perm, uint64_t shared, uint64_t& child_perm,
                          uint64_t& child_shared) const;
  // Phase 1 of a permission change of this node: may fail (lock conflict, cannot reopen
  // read-write). Exactly one of set_perm/abort_perm follows a successful check_perm.
  virtual Result<void> check_perm(uint64_t perm, uint64_t shared);
  virtual void set_perm(uint64_t perm, uint64_t shared);
  virtual void abort_perm();
  // Cumulative permissions of all parents (committed state).
  uint64_t cumulative_perm() const;
  uint64_t cumulative_shared() const;

  // ---- read-only and activation -------------------------------------------------------------
  // QEMU's bdrv_is_read_only: configured read-only (auto-read-only nodes are not).
  bool is_read_only() const { return read_only_; }
  // Whether writers may attach (QEMU's bdrv_is_writable_after_reopen without a queue).
  bool is_writable() const { return !read_only_ && active_; }
  bool is_active() const { return active_; }
  // Driver hooks for activation changes: drop/re-read caches, release/take locks.
  virtual Result<void> on_inactivate() { return ok(); }
  virtual Result<void> on_activate() { return ok(); }

  // ---- reopen ---------------------------------------------------------------------------------
  // blockdev-reopen: checks the driver's new options against the open node and returns the action
  // that applies them, run only when the whole reopen commits. The default accepts nothing but
  // unchanged options ("Cannot change the option 'x'").
  virtual Result<std::function<void()>> prepare_reopen(const DriverOptions& options);
  // Replaces the common options (read-only, auto-read-only, ...) during a reopen; the graph
  // refreshes permissions afterwards and restores the old ones if that fails.
  void set_common_options(const CommonOptions& options) {
    options_ = options;
    read_only_ = options.read_only;
  }
  // Whether blockdev-add created the node with active=false (such nodes refuse reopen).
  bool created_inactive() const { return created_inactive_; }

  // ---- graph ------------------------------------------------------------------------------
  const std::vector<std::unique_ptr<Child>>& children() const { return children_; }
  const std::vector<Child*>& parents() const { return parents_; }
  Child* child(std::string_view name) const;
  // The child that holds this node's data for a filter/raw node (file or image), or nullptr.
  virtual Child* primary_child() const;
  // Backing child, if this format supports backing files.
  virtual Child* backing_child() const { return nullptr; }

  // ---- info -------------------------------------------------------------------------------
  // ImageInfo "format-specific" member, or null.
  virtual nlohmann::json format_specific_info() const { return nullptr; }
  virtual std::optional<uint64_t> cluster_size() const { return std::nullopt; }
  // Whether co_pwritev honours kRequestWriteCompressed (QEMU: bdrv_co_pwritev_compressed_part).
  virtual bool supports_compressed_writes() const { return false; }
  // The backing file the image's own metadata names (QEMU's bs->backing_file and
  // bs->backing_format), reported whichever backing node is attached, or none.
  struct BackingFileName {
    std::string name;       // as stored ("base.qcow2")
    std::string full_name;  // resolved against the image's directory
    std::string format;     // "" when the image stores none
  };
  virtual std::optional<BackingFileName> backing_file_name() const { return std::nullopt; }
  // QEMU's bdrv_change_backing_file: records another backing file name and format ("" for
  // none) in the image's metadata; the attached backing node does not change. Formats without
  // backing files fail with ENOTSUP.
  virtual aio::Task<Result<void>> co_change_backing_file(std::string file, std::string format);
  // ImageInfo "dirty-flag" for drivers that report image info (QEMU: drivers with get_info).
  virtual std::optional<bool> dirty_flag() const { return std::nullopt; }
  // Internal snapshots (QEMU's QEMUSnapshotInfo from bdrv_snapshot_list), in table order; empty
  // for drivers without them.
  struct SnapshotInfo {
    std::string id;
    std::string name;
    uint64_t vm_state_size = 0;
    uint32_t date_sec = 0;
    uint32_t date_nsec = 0;
    uint64_t vm_clock_nsec = 0;
    uint64_t icount = UINT64_MAX;  // UINT64_MAX: not recorded
  };
  virtual std::vector<SnapshotInfo> snapshot_list() const { return {}; }

  // The graph the node is registered in, or nullptr before registration.
  Graph* graph() const { return graph_; }

  // In-flight request bookkeeping of the request layer (block/io); opaque to drivers.
  RequestTracker& requests() { return *requests_; }
  // The node's dirty bitmaps (block/bitmap): the request layer marks every write, write-zeroes
  // and discard in them; format drivers load and store the persistent ones.
  bitmap::BitmapSet& dirty_bitmaps() const { return *dirty_bitmaps_; }

 protected:
  NodeLimits limits_;
  CommonOptions options_;
  bool read_only_ = false;
  bool active_ = true;
  bool created_inactive_ = false;

 private:
  friend class Graph;
  std::vector<std::unique_ptr<Child>> children_;
  std::vector<Child*> parents_;
  Graph* graph_ = nullptr;
  nlohmann::json open_options_;
  std::unique_ptr<RequestTracker> requests_;
  std::unique_ptr<bitmap::BitmapSet> dirty_bitmaps_;
};

// QEMU's BLKDBG_EVENT(child, event): announces `event` on the child's node, if there is a child.
void debug_event(Child* child, BlkdebugEvent event);

// QEMU's bdrv_filter_or_cow_bs: the backing file of a format node, or the filtered child of a
// filter, or nullptr (the next node down a backing chain).
Node* filter_or_cow(const Node& node);
// Whether `wanted` is `top` or a node below it along filter_or_cow (QEMU's bdrv_chain_contains).
bool chain_contains(const Node& top, const Node& wanted);
// QEMU's bdrv_find_backing_image: the node below `top` (along filter_or_cow) whose filename is
// `filename`, or nullptr.
Node* find_backing_image(const Node& top, const std::string& filename);

}  // namespace strata::block
