#pragma once
// The qcow2 format driver: opens every image QEMU 10 writes (versions 2 and 3, 512 B to 2 MiB
// clusters, extended L2, compressed zlib/zstd clusters, zero clusters, external data files,
// backing chains) and serves reads and block status. Read-write (write.cc) covers images without
// extended L2, external data file, internal snapshots or persistent bitmaps; the others open
// read-only only.
//
// Writes (write.cc): metadata is written through (L2 entries, L1 entries and refcounts reach the
// file when they change; the caches only save reads), in the order that leaves a crashed image
// with at worst leaked clusters: refcount increments and data, then a flush, then the L2/L1 entry
// that publishes them; an L2 entry is cleared (and flushed) before a refcount drops. Refcounts
// are always exact (lazy-refcounts is accepted and never used), so the dirty bit is never set.
//
// Locking: lock_ guards the metadata. Reads, block status and writes that only overwrite
// clusters in place (allocated, refcount 1: OFLAG_COPIED) hold it shared for their whole
// duration, data I/O included; anything that allocates or frees clusters or changes L1/L2/refcount
// entries holds it exclusively, data and COW I/O included. So overlapping allocating writes never
// race (the second one sees the first's L2 entries), a cluster is never freed or reused while a
// read or an in-place write still uses it, and COW ranges need no request-level serialisation.
//
// Roles: `file` is kRoleImage (kRoleMetadata | kRolePrimary with an external data file, which is
// the kRoleData `data-file` child); `backing` is kRoleCow.

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "aio/sync.h"
#include "block/drivers/driver.h"
#include "block/drivers/qcow2/cluster_map.h"
#include "block/drivers/qcow2/header.h"
#include "block/drivers/qcow2/refcount.h"

namespace strata::block::qcow2 {

// blockdev-add's BlockdevOptionsQcow2, in QAPI member order.
struct Qcow2Options : DriverOptions {
  BlockdevRef file;
  std::optional<BlockdevRef> backing;  // absent: the header's backing file; is_null: none
  std::optional<bool> lazy_refcounts;
  std::optional<bool> pass_discard_request;
  std::optional<bool> pass_discard_snapshot;
  std::optional<bool> pass_discard_other;
  std::optional<bool> discard_no_unref;
  std::optional<std::string> overlap_check;  // the template (mode or the object's `template`)
  std::optional<int64_t> cache_size;
  std::optional<int64_t> l2_cache_size;
  std::optional<int64_t> l2_cache_entry_size;
  std::optional<int64_t> refcount_cache_size;
  std::optional<int64_t> cache_clean_interval;
  bool has_encrypt = false;
  std::optional<std::string> encrypt_format;
  std::optional<BlockdevRef> data_file;
};

// The L2 cache geometry QEMU's read_cache_sizes derives from the options and the image.
struct CacheSizes {
  uint64_t l2_slices = 0;
  uint32_t l2_slice_bytes = 0;
  uint64_t refcount_blocks = 0;
};
Result<CacheSizes> compute_cache_sizes(const Header& header, const Qcow2Options& options);

class Qcow2Node final : public Node {
 public:
  static std::unique_ptr<DriverOptions> parse(ArgDecoder& d);
  static Result<std::shared_ptr<Node>> open(OpenContext& context, const BlockdevOptions& options);

  explicit Qcow2Node(CommonOptions common);
  ~Qcow2Node() override;

  const char* driver_name() const override { return "qcow2"; }
  std::optional<std::string> exact_filename() const override;
  // {"backing": null} when the user said so (QEMU keeps it in the json: pseudo-filename).
  nlohmann::json strong_options() const override;
  // ImageInfo's backing-filename / full-backing-filename / backing-filename-format: QEMU reports
  // the names stored in the image, whichever backing node is attached (or none).
  std::optional<std::string> full_backing_filename() const;
  std::optional<BackingFileName> backing_file_name() const override;

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override;
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t flags) override;
  aio::Task<Result<void>> co_pdiscard(uint64_t offset, uint64_t bytes) override;
  aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                           uint32_t flags) override;
  aio::Task<Result<BlockStatus>> co_block_status(uint64_t offset, uint64_t bytes) override;
  aio::Task<Result<void>> co_truncate(uint64_t new_size, bool exact) override;
  uint64_t length() const override { return header_.size & ~uint64_t{511}; }
  std::optional<uint64_t> allocated_size() const override;

  Child* backing_child() const override { return child("backing"); }
  nlohmann::json format_specific_info() const override;
  std::optional<uint64_t> cluster_size() const override { return header_.cluster_size(); }
  bool supports_compressed_writes() const override { return refcounts_ != nullptr; }
  std::optional<bool> dirty_flag() const override {
    return (header_.incompatible_features & (1ull << 0)) != 0;
  }
  Result<void> on_inactivate() override;

  const Header& header() const { return header_; }
  // The backing file name stored in the image ("" when none) and its format extension.
  const std::string& image_backing_file() const { return image_backing_file_; }
  const std::string& image_backing_format() const { return image_backing_format_; }
  ClusterMap& cluster_map() { return *map_; }

 private:
  // Opens the metadata: header, L1, option checks, extensions, data file, backing name, snapshot
  // table; attaches the data-file child.
  Result<void> load(OpenContext& context, const Qcow2Options& options);
  Result<void> open_backing(OpenContext& context, const Qcow2Options& options);
  Node& file() const { return *child("file")->node(); }
  Node& data_file() const { return data_file_ != nullptr ? *data_file_->node() : file(); }
  aio::Task<Result<void>> read_compressed(const Mapping& mapping, uint64_t offset, uint64_t bytes,
                                          IoVector qiov);

  // QEMU's qcow2_detect_metadata_preallocation: true when clearly more clusters have a refcount
  // than the file has allocated, i.e. data clusters were preallocated as holes, so block status
  // must ask the file whether a data cluster reads as zeroes.
  aio::Task<Result<bool>> detect_metadata_preallocation();

  // ---- writing (write.cc) ----
  // Where guest cluster `guest_cluster` is described: its L1 index, its L2 table (0: none) and
  // entry (0 when there is no table).
  struct L2Ref {
    uint64_t l1_index = 0;
    uint64_t l2_offset = 0;
    uint64_t l2_index = 0;
    uint64_t entry = 0;
  };
  // Read-write open: refuses what the writer does not support, loads the refcount table and
  // clears unknown autoclear bits. `run` executes a task to completion (open is synchronous).
  Result<void> prepare_writes(const Extensions& extensions, uint64_t refcount_cache_blocks,
                              const std::function<Result<void>(aio::Task<Result<void>>)>& run);
  aio::Task<Result<void>> load_refcounts(uint64_t cache_blocks);
  aio::Task<Result<void>> clear_autoclear_bits();
  aio::Task<Result<L2Ref>> l2_ref(uint64_t guest_cluster);
  // Reads guest data without taking lock_ (the caller holds it).
  aio::Task<Result<void>> read_unlocked(uint64_t offset, uint64_t bytes, IoVector qiov);
  // Guest bytes for COW: the part past length() reads as zeroes.
  aio::Task<Result<void>> read_for_cow(uint64_t offset, std::vector<uint8_t>& buffer);
  // Writes the whole range in place if every cluster is allocated with OFLAG_COPIED; false (and
  // nothing written) otherwise. Shared lock.
  aio::Task<Result<bool>> write_in_place(uint64_t offset, uint64_t bytes, IoVector qiov,
                                         uint32_t flags);
  // Exclusive lock: writes the range, allocating clusters where needed.
  aio::Task<Result<void>> write_allocating(uint64_t offset, uint64_t bytes, IoVector qiov,
                                           uint32_t flags);
  // Allocates `old_entries.size()` new clusters for the guest clusters starting at the one
  // holding `offset` (all in one L2 table, the first described by `first`), fills them with COW
  // data and `data` (`bytes` at `offset`), publishes them in L2 and frees what they replace.
  aio::Task<Result<void>> allocate_run(const L2Ref& first, uint64_t offset, uint64_t bytes,
                                       IoVector data, const std::vector<uint64_t>& old_entries);
  // Writes `count` L2 entries starting at `l2_index` of the table at `l2_offset` and updates the
  // cache.
  aio::Task<Result<void>> write_l2_entries(uint64_t l2_offset, uint64_t l2_index,
                                           const std::vector<uint64_t>& entries);
  aio::Task<Result<void>> write_l1_entry(uint64_t l1_index, uint64_t entry);
  // Drops the references an old L2 entry held (compressed bytes or a host cluster). The caller
  // has cleared or replaced the entry on disk and flushed.
  aio::Task<Result<void>> release_entry(uint64_t entry);
  static bool needs_release(uint64_t entry);
  // Discard (`zero` false) or write-zeroes of whole clusters [offset, offset + bytes).
  aio::Task<Result<void>> zero_or_discard_clusters(uint64_t offset, uint64_t bytes, bool discard,
                                                   bool unmap);

  // ---- compressed writes (compressed_write.cc) ----
  // kRequestWriteCompressed: whole clusters (the last may end at the image end), compressed in
  // parallel on the compression thread pool; clusters that do not compress are written normally.
  aio::Task<Result<void>> write_compressed(uint64_t offset, uint64_t bytes, IoVector qiov);
  // The L2 reference of `guest_cluster`, first allocating an empty L2 table (flushed before the
  // L1 entry points at it) when there is none. Exclusive lock.
  aio::Task<Result<L2Ref>> ensure_l2_table(uint64_t guest_cluster);
  // QEMU's qcow2_alloc_bytes: `size` (< one cluster) bytes for compressed data, packed after the
  // previous ones; every host cluster the range touches gains one reference. New host clusters
  // are allocated (refcount 1) at once; the other increments are added to `pending` (host
  // cluster index -> references to add), which the caller writes before publishing anything.
  // Exclusive lock.
  aio::Task<Result<uint64_t>> allocate_compressed_bytes(uint64_t size,
                                                        std::map<uint64_t, uint64_t>& pending);

  aio::CoRwLock lock_;
  std::unique_ptr<Refcounts> refcounts_;  // only when opened read-write
  bool pass_discard_request_ = true;
  // Where the next compressed cluster may be packed (0: start a new host cluster). Reset when a
  // compressed cluster is released, since its host cluster may have been freed and reused.
  uint64_t free_byte_offset_ = 0;

  Header header_;
  std::optional<bool> metadata_preallocation_;
  std::string image_backing_file_;
  std::string image_backing_format_;
  std::optional<std::string> image_data_file_;
  bool backing_overridden_ = false;
  bool data_file_given_ = false;
  Child* data_file_ = nullptr;
  std::unique_ptr<ClusterMap> map_;
};

}  // namespace strata::block::qcow2
