#pragma once
// The qcow2 format driver: opens every image QEMU 10 writes (versions 2 and 3, 512 B to 2 MiB
// clusters, extended L2, compressed zlib/zstd clusters, zero clusters, external data files,
// backing chains) and serves reads and block status. Writes: write.cc for plain images;
// subcluster_write.cc and data_file.cc for images with extended L2 entries or an external data
// file (QEMU's subcluster allocation, data clusters at their guest offset). Persistent dirty
// bitmaps (bitmaps.cc) are loaded at open and stored back at close. Internal snapshots
// (snapshot.cc) share clusters with the active L1: a cluster or L2 table without OFLAG_COPIED has
// refcount > 1 and is copied before a guest write changes it.
//
// Writes (write.cc, write_back.cc): metadata is written back (QEMU's qcow2-cache.c model). L2
// entries and refcounts change in the caches (dirty L2 slices, dirty refcount blocks); they reach
// the file on flush (co_flush), when a cache is over capacity, and on close, inactivation and
// reopen. The order in which they reach the file leaves a crashed image with at worst leaked
// clusters:
// - L2 slices depend on the refcounts (and the data) of the clusters they newly use: before a
//   dirty L2 slice is written, the dirty refcount blocks are written and the file is flushed
//   (QEMU's qcow2_cache_set_dependency(l2, refcount) and qcow2_cache_depends_on_flush(l2));
// - refcount drops depend on the L2 entries that stopped using the clusters: before dirty
//   refcount blocks are written after a drop, the dirty L2 slices are written and the file is
//   flushed (QEMU's dependency of the refcount cache on the L2 cache for frees);
// - a new L2 table is written (zeroed) and its refcount made durable before the L1 entry, which
//   is written through, points at it; refcount blocks and table growth are written through with
//   their own barriers (refcount.h).
// Refcounts are always exact; with lazy-refcounts the dirty bit is still set before the first
// allocating write publishes anything and cleared at close, as QEMU does, so QEMU repairs the
// image after a crash (dirty.cc). A read-write open of a dirty image repairs it first
// (repair.h). Before guest data or metadata is written to a host offset, the overlap checks
// (overlap.cc) make sure it is not live metadata; a hit marks the image corrupt.
//
// Locking: lock_ keeps clusters alive. Reads, block status, in-place writes (allocated, refcount
// 1: OFLAG_COPIED) and allocating writes that free nothing hold it shared for their whole
// duration; anything that frees clusters (discard, write-zeroes, overwriting compressed or
// zero-allocated clusters) holds it exclusively. So a cluster is never freed or reused while a
// read or an in-place write still uses it. meta_ (a CoMutex) serialises every change of the
// caches, L1 and refcounts and is held only for the metadata steps, never across guest data I/O.
// Allocating writes register the guest clusters they allocate as in flight (QEMU's QCowL2Meta);
// a write that needs one of those clusters waits for that allocation only, so non-overlapping
// allocating writes run their COW and data I/O in parallel.
//
// Roles: `file` is kRoleImage (kRoleMetadata | kRolePrimary with an external data file, which is
// the kRoleData `data-file` child); `backing` is kRoleCow.

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "aio/sync.h"
#include "aio/task_group.h"
#include "block/bitmap/dirty_bitmap.h"
#include "block/bitmap/persistent_store.h"
#include "block/drivers/driver.h"
#include "block/drivers/qcow2/bitmaps.h"
#include "block/drivers/qcow2/cluster_map.h"
#include "block/drivers/qcow2/create.h"
#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/header.h"
#include "block/drivers/qcow2/header_update.h"
#include "block/drivers/qcow2/refcount.h"
#include "block/drivers/qcow2/snapshot_table.h"

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
  std::optional<std::string> overlap_check;   // the template (mode or the object's `template`)
  std::map<std::string, bool> overlap_flags;  // per-structure flags given ("active-l1": false)
  std::optional<int64_t> cache_size;
  std::optional<int64_t> l2_cache_size;
  std::optional<int64_t> l2_cache_entry_size;
  std::optional<int64_t> refcount_cache_size;
  std::optional<int64_t> cache_clean_interval;
  bool has_encrypt = false;
  std::optional<std::string> encrypt_format;
  std::optional<std::string> encrypt_key_secret;
  std::optional<BlockdevRef> data_file;
};

// The L2 cache geometry QEMU's read_cache_sizes derives from the options and the image.
struct CacheSizes {
  uint64_t l2_slices = 0;
  uint32_t l2_slice_bytes = 0;
  uint64_t refcount_blocks = 0;
};
Result<CacheSizes> compute_cache_sizes(const Header& header, const Qcow2Options& options);

class Qcow2Node final : public Node, public bitmap::PersistentBitmapStore {
 public:
  static std::unique_ptr<DriverOptions> parse(ArgDecoder& d);
  static Result<std::shared_ptr<Node>> open(OpenContext& context, const BlockdevOptions& options);

  explicit Qcow2Node(CommonOptions common);
  ~Qcow2Node() override;
  // QEMU's default cache-clean-interval, in seconds.
  static constexpr int64_t kDefaultCacheCleanInterval = 600;

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
  Result<void> check_perm(uint64_t perm, uint64_t shared) override;
  // After a growing truncate from `from` to `to`: gives every unmapped guest cluster of the new
  // area a host cluster (metadata), also reserved in the file (falloc) or filled with zeroes
  // (full), as qemu-img resize --preallocation does (prealloc.cc). Flushes.
  aio::Task<Result<void>> preallocate_growth(uint64_t from, uint64_t to, Preallocation mode);
  uint64_t length() const override { return header_.size & ~uint64_t{511}; }
  std::optional<uint64_t> allocated_size() const override;

  Child* backing_child() const override { return child("backing"); }
  nlohmann::json format_specific_info() const override;
  std::optional<uint64_t> cluster_size() const override { return header_.cluster_size(); }
  // QEMU refuses compressed writes with an external data file.
  bool supports_compressed_writes() const override {
    return refcounts_ != nullptr && data_file_ == nullptr;
  }
  std::optional<bool> dirty_flag() const override {
    return (header_.incompatible_features & (1ull << 0)) != 0;
  }
  // Stores the persistent bitmaps and drops them from memory, then the caches.
  Result<void> on_inactivate() override;
  // Loads the persistent bitmaps again.
  Result<void> on_activate() override;

  // QEMU's qcow2_change_backing_file: records `backing_file` ("" for none) and `backing_format`
  // ("" for none) in the header (rewritten and flushed). Fails with EINVAL for a name over 1023
  // bytes or a backing file on an image with a raw external data file, ENOSPC when the header
  // cluster is full. The attached backing node does not change. Exclusive lock.
  aio::Task<Result<void>> change_backing_file(std::string backing_file, std::string backing_format);
  aio::Task<Result<void>> co_change_backing_file(std::string file, std::string format) override {
    return change_backing_file(std::move(file), std::move(format));
  }

  // QEMU's qcow2_make_empty (the general path, discard with full_discard): every L2 entry becomes
  // 0, so the whole image reads from its backing file (or as zeroes). Each L2 table's entries are
  // cleared and flushed before the clusters they used are released. Exclusive lock.
  aio::Task<Result<void>> make_empty();

  // QEMU's qcow2_amend_options for what strata supports (amend.cc): each member set asks for a
  // change. Upgrades happen first, downgrades (zero clusters expanded, compatible and autoclear
  // features dropped) last, with QEMU's checks and messages. Exclusive lock.
  struct AmendOptions {
    std::optional<uint32_t> version;  // 2 (compat=0.10) or 3 (compat=1.1)
    std::optional<bool> lazy_refcounts;
    std::optional<uint64_t> refcount_bits;
    // The external data file name stored in the image ("" removes it); images with a data file
    // only.
    std::optional<std::string> data_file;
    // data-file-raw may be cleared; set only where it is set already (QEMU's rules).
    std::optional<bool> data_file_raw;
  };
  aio::Task<Result<void>> amend(AmendOptions options);

  // ---- persistent dirty bitmaps (bitmaps.cc) ----
  Result<void> can_store_new_bitmap(const std::string& name, uint64_t granularity) override;
  aio::Task<Result<void>> remove_persistent_bitmap(std::string name) override;
  // QEMU's qcow2_store_persistent_dirty_bitmaps: writes every persistent, consistent, writable
  // bitmap of the node (new data clusters, table and directory, then the header; old ones freed
  // last), keeping the directory entries of bitmaps it does not hold. `release` drops the stored
  // bitmaps from memory (close, inactivate). Exclusive lock.
  aio::Task<Result<void>> store_bitmaps(bool release);
  // Writes dirty cached metadata back (refcounts, flush, L2 slices; see above). The request
  // layer flushes the file afterwards. Other writers call it (io::flush) where an on-disk
  // update needs earlier metadata to be durable.
  aio::Task<Result<void>> co_flush() override;
  // Writes the caches back before the options change (QEMU's qcow2_reopen_prepare).
  Result<std::function<void()>> prepare_reopen(const DriverOptions& options) override;

  // ---- internal snapshots (snapshot.cc) ----
  // Each takes the metadata lock exclusively and needs the node opened read-write.
  std::vector<SnapshotInfo> snapshot_list() const override;
  const std::vector<SnapshotEntry>& snapshots() const { return snapshots_.entries; }
  // QEMU's qcow2_snapshot_create: `entry` gives name, date, VM clock, VM state size and icount;
  // the ID (the next unused number), L1 copy and disk size are filled in here. Fails with EEXIST
  // when the generated ID exists and EFBIG past 65536 snapshots.
  aio::Task<Result<void>> co_snapshot_create(SnapshotEntry entry);
  // QEMU's qcow2_snapshot_goto (by ID, then by name): ENOENT when there is no such snapshot.
  aio::Task<Result<void>> co_snapshot_goto(const std::string& id_or_name);
  // QEMU's qcow2_snapshot_delete of the snapshot matching `id` and `name` (either may be "").
  aio::Task<Result<void>> co_snapshot_delete(const std::string& id, const std::string& name);
  // QEMU's qcow2_snapshot_load_tmp (snapshot_load.cc): a read-only node reads the snapshot
  // matching `id` and `name` (each checked when given) from now on; the size does not change.
  // "Can't find snapshot" (ENOENT), EINVAL on a writable node.
  aio::Task<Result<void>> load_snapshot_read_only(std::optional<std::string> id,
                                                  std::optional<std::string> name);

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
    uint64_t bitmap = 0;  // the subcluster bitmap with extended L2 entries, else 0
  };
  // Read-write open: refuses what the writer does not support, loads the refcount table and
  // clears unknown autoclear bits. `run` executes a task to completion (open is synchronous).
  // An active node repairs a dirty image first (dirty.cc).
  Result<void> prepare_writes(const Extensions& extensions, uint64_t refcount_cache_blocks,
                              const std::function<Result<void>(aio::Task<Result<void>>)>& run,
                              bool active);

  // ---- dirty bit and lazy refcounts (dirty.cc) ----
  // QEMU's qcow2_do_open repair: runs the check with kFixErrors | kFixLeaks on the image file
  // (before the refcounts are loaded), printing its messages on stderr as QEMU does; fails with
  // "Could not repair dirty image" when the check fails or hits internal errors. Clears the dirty
  // bit when nothing is left broken, and takes the repaired header.
  aio::Task<Result<void>> repair_dirty_image();
  // QEMU's qcow2_mark_dirty under lazy-refcounts: before the first allocating write publishes
  // anything, flushes the file and sets the dirty bit on disk. No-op without lazy refcounts or
  // when the bit is set. Caller holds lock_ exclusively.
  aio::Task<Result<void>> mark_dirty();
  // QEMU's qcow2_mark_clean at close and inactivation: flushes the node, then clears the dirty
  // bit of a read-write image (strata's refcounts are always exact). Errors are reported on
  // stderr and leave the bit set (the next read-write open repairs).
  void mark_clean_at_close();

  // ---- overlap checks and the corrupt bit (overlap.cc) ----
  // QEMU's qcow2_check_metadata_overlap: the bit (overlap.h) of a structure among the enabled
  // checks minus `ignore` that the clusters of [offset, offset + size) overlap, 0 for none.
  uint32_t metadata_overlap(uint32_t ignore, uint64_t offset, uint64_t size) const;
  // The inactive-L2 check, which reads every snapshot's L1 table as QEMU does (only the `all`
  // template enables it): kOverlapInactiveL2 when [offset, offset + size) overlaps an L2 table
  // a snapshot references, else 0.
  aio::Task<Result<uint32_t>> inactive_l2_overlap(uint64_t offset, uint64_t size);
  // QEMU's qcow2_pre_write_overlap_check: call before writing [offset, offset + size) of the
  // image file (`data_file`: a guest data write, not checked when the data lives in an external
  // data file). On an overlap the image is marked corrupt (signal_corruption) and EIO returned;
  // once corrupt, every further write fails.
  aio::Task<Result<void>> pre_write_overlap_check(uint32_t ignore, uint64_t offset, uint64_t size,
                                                  bool data_file);
  // QEMU's qcow2_signal_corruption: prints QEMU's message on stderr and emits
  // BLOCK_IMAGE_CORRUPTED once; when `fatal` (and the node is writable) sets the corrupt bit on
  // disk and makes the node unusable (check_usable fails every later request, as QEMU's
  // bs->drv = NULL does). `offset`/`size` < 0: not given.
  aio::Task<void> signal_corruption(bool fatal, int64_t offset, int64_t size, std::string message);
  // Fails with ENOMEDIUM ("No medium found") after a fatal corruption.
  Result<void> check_usable() const;
  aio::Task<Result<void>> load_refcounts(uint64_t cache_blocks);
  aio::Task<Result<void>> clear_autoclear_bits();
  // The autoclear bits a read-write open keeps: bitmaps while the extension is valid, and
  // data-file-raw (the writer keeps the raw data file consistent: data_file.cc).
  uint64_t kept_autoclear_bits() const {
    return (header_contents_.nb_bitmaps > 0 ? kAutoclearBitmaps : 0) |
           (data_file_ != nullptr ? kAutoclearDataFileRaw : 0);
  }
  aio::Task<Result<L2Ref>> l2_ref(uint64_t guest_cluster);
  // Reads guest data without taking lock_ (the caller holds it).
  aio::Task<Result<void>> read_unlocked(uint64_t offset, uint64_t bytes, IoVector qiov);
  // Guest bytes for COW: the part past length() reads as zeroes.
  aio::Task<Result<void>> read_for_cow(uint64_t offset, std::vector<uint8_t>& buffer);
  // Writes the whole range in place if every cluster is allocated with OFLAG_COPIED; false (and
  // nothing written) otherwise. Shared lock.
  aio::Task<Result<bool>> write_in_place(uint64_t offset, uint64_t bytes, IoVector qiov,
                                         uint32_t flags);
  // Allocates `old_entries.size()` new clusters for the guest clusters starting at the one
  // holding `offset` (all in one L2 table, the first described by `first`, registered in flight
  // by the caller), fills them with COW data and `data` (`bytes` at `offset`) with `meta`
  // released, publishes them in the L2 cache and releases what they replace. `meta` is held on
  // entry and on return.
  // A preallocated zero cluster with refcount 1 (what discard-no-unref keeps): the guest data
  // and zeroes around it go to its host cluster, then the entry loses its zero flag (QEMU
  // reuses such clusters instead of allocating). The cluster is registered in flight.
  // Every `interval_seconds` (0: never), drops the L2 slices and refcount blocks that no
  // request used since the last time (QEMU's cache_clean_timer); runs on the current loop.
  void start_cache_cleaner(int64_t interval_seconds);
  aio::Task<void> clean_caches_every(std::chrono::seconds interval);
  // Amend of refcount_bits (refcount_order.cc): the refcount structure is rebuilt with
  // 2^`order` bits per entry in free clusters, the header switched to it in one write, then the
  // old structure freed. Fails with QEMU's text, image unchanged, when a refcount does not fit.
  // meta_ and the exclusive lock held.
  aio::Task<Result<void>> change_refcount_order(uint32_t order);
  // QEMU's bdrv_backing_overridden: the backing node attached is not the file the image
  // names (then the node's filename is a json: description).
  bool backing_overridden() const;
  aio::Task<Result<void>> rewrite_zero_cluster(aio::CoMutex::Guard& meta, const L2Ref& ref,
                                               uint64_t offset, uint64_t bytes, IoVector data);
  aio::Task<Result<void>> allocate_run(aio::CoMutex::Guard& meta, const L2Ref& first,
                                       uint64_t offset, uint64_t bytes, IoVector data,
                                       const std::vector<uint64_t>& old_entries);
  // Sets `entries.size()` L2 entries starting at `l2_index` of the table at `l2_offset` in the
  // L2 cache (dirty; written back by co_flush). meta_ held.
  aio::Task<Result<void>> write_l2_entries(uint64_t l2_offset, uint64_t l2_index,
                                           const std::vector<uint64_t>& entries);
  // Writes an L1 entry through to the file and records it. meta_ held.
  aio::Task<Result<void>> write_l1_entry(uint64_t l1_index, uint64_t entry);
  // Drops the references an old L2 entry held (compressed bytes or a host cluster). The caller
  // has cleared or replaced the entry in the L2 cache; the drop reaches the file only after the
  // L2 change (refcounts_depend_on_l2). meta_ and the exclusive lock_ held.
  aio::Task<Result<void>> release_entry(uint64_t entry);
  static bool needs_release(uint64_t entry);
  // Discard (`zero` false) or write-zeroes of whole clusters [offset, offset + bytes).
  aio::Task<Result<void>> zero_or_discard_clusters(uint64_t offset, uint64_t bytes, bool discard,
                                                   bool unmap);

  // ---- extended L2 and external data file writes (subcluster_write.cc, data_file.cc) ----
  // Requests of images with extended L2 entries or an external data file take this path: each
  // holds lock_ exclusively and meta_ throughout (no in-flight allocations).
  bool uses_general_write_path() const { return header_.extended_l2() || data_file_ != nullptr; }
  // QEMU's QCow2ClusterType.
  enum class ClusterKind { kUnallocated, kNormal, kCompressed, kZeroPlain, kZeroAlloc };
  ClusterKind cluster_kind(uint64_t entry) const;
  // QEMU's qcow2_get_subcluster_type of subcluster `sc` (0 without extended L2).
  SubclusterType subcluster_kind(uint64_t entry, uint64_t bitmap, uint32_t sc) const;
  // Guest write: per cluster, in place where the subclusters are allocated, else the COW region
  // QEMU's calculate_l2_meta computes, written with the data before the L2 entry (and bitmap)
  // publishes it.
  aio::Task<Result<void>> write_general(uint64_t offset, uint64_t bytes, IoVector qiov,
                                        uint32_t flags);
  aio::Task<Result<void>> write_one_cluster(uint64_t offset, uint64_t bytes, IoVector data);
  // QEMU's qcow2_subcluster_zeroize (subcluster-aligned; ENOTSUP otherwise, so the request layer
  // writes zero buffers).
  aio::Task<Result<void>> zeroize_general(uint64_t offset, uint64_t bytes, uint32_t flags);
  aio::Task<Result<void>> zero_whole_cluster(const L2Ref& ref, uint32_t flags);
  // QEMU's qcow2_cluster_discard(QCOW2_DISCARD_REQUEST, full_discard=false); whole clusters.
  aio::Task<Result<void>> discard_general(uint64_t offset, uint64_t bytes);
  // Sets the L2 entry (and with extended L2 the bitmap) `ref` describes, in the L2 cache.
  aio::Task<Result<void>> set_l2_entry_and_bitmap(const L2Ref& ref, uint64_t entry,
                                                  uint64_t bitmap);
  // QEMU's qcow2_free_any_cluster for an entry the caller has replaced in the L2 cache: with an
  // external data file the data cluster is not refcounted and is only discarded there (when
  // `pass_discard` and the entry had a host cluster); otherwise release_entry.
  aio::Task<Result<void>> release_data_cluster(uint64_t entry, bool pass_discard);
  // discard-no-unref: the L2 entry kept its cluster; only its data may go (pass-discard-request).
  aio::Task<Result<void>> discard_kept_cluster(uint64_t entry);
  // After a resize from `old_size` (resize_unlocked done, lock_ and meta_ held): QEMU's
  // qcow2_co_truncate for an external data file, which is resized too (`exact` passed on); with
  // data-file-raw the new clusters get their L2 entries at once (metadata preallocation), so
  // the data file keeps reading as the guest disk.
  aio::Task<Result<void>> resize_data_file(uint64_t old_size, uint64_t new_size, bool exact);
  // The image has an external data file that is a valid raw image (autoclear bit data-file-raw).
  bool data_file_raw() const {
    return data_file_ != nullptr && (header_.autoclear_features & kAutoclearDataFileRaw) != 0;
  }

  // ---- bitmaps (bitmaps.cc) ----
  // Reads and checks the bitmap directory the header names (empty without bitmaps).
  aio::Task<Result<std::vector<BitmapDirectoryEntry>>> read_bitmap_directory();
  aio::Task<Result<std::vector<uint64_t>>> read_bitmap_table(const BitmapDirectoryEntry& entry);
  // QEMU's qcow2_load_dirty_bitmaps: creates the node's bitmaps from the image; with `writable`
  // marks the consistent ones IN_USE on disk.
  aio::Task<Result<void>> load_bitmaps(bool writable);
  // QEMU's update_ext_header_and_dir_in_place (flags changed, same directory size).
  aio::Task<Result<void>> rewrite_bitmap_directory_in_place(
      const std::vector<BitmapDirectoryEntry>& entries);
  // QEMU's update_ext_header_and_dir: a new directory (none when `entries` is empty), the header
  // pointing at it, then the old directory freed.
  aio::Task<Result<void>> replace_bitmap_directory(
      const std::vector<BitmapDirectoryEntry>& entries);
  // Writes the dirty parts of `bitmap` to new clusters and its table; sets the entry's table.
  aio::Task<Result<void>> store_bitmap(BitmapDirectoryEntry& entry,
                                       const bitmap::DirtyBitmap& dirty);
  // Frees a bitmap table and the data clusters it references.
  aio::Task<Result<void>> free_bitmap_clusters(uint64_t table_offset, uint32_t table_size);
  // Frees the clusters of `entries` newly stored by a failed store_bitmaps.
  aio::Task<void> free_new_tables(const std::vector<BitmapDirectoryEntry>& entries,
                                  const std::vector<bool>& stored);
  // Stores bitmaps outside any coroutine (close, inactivate): on a private loop, reporting
  // failures on stderr as QEMU's qcow2_inactivate does. Returns whether they were stored.
  bool store_bitmaps_now(bool release);
  // ---- header (header_update.cc) ----
  // QEMU's qcow2_update_header followed by a flush of the file (update_header_sync).
  aio::Task<Result<void>> rewrite_header();
  // Durability point for metadata written so far: the node's dirty caches are written back (in
  // their dependency order), then the file is flushed. lock_ (exclusive) and meta_ held.
  aio::Task<Result<void>> sync_metadata();
  // ---- amend (amend.cc) ----
  // QEMU's qcow2_expand_zero_clusters for the active L1 table: zero clusters become unallocated
  // (no backing file) or allocated clusters filled with zeroes.
  aio::Task<Result<void>> expand_zero_clusters();
  // ---- write-back of cached metadata (write_back.cc); meta_ held ----
  // Dirty L2 slices to the file, after their refcount and data dependencies (flushed).
  aio::Task<Result<void>> write_back_l2();
  // Refcounts::write_back's hook: makes the L2 entries pending refcount drops depend on durable.
  aio::Task<Result<void>> before_refcount_write_back();
  // Both caches (QEMU's qcow2_write_caches). No final flush.
  aio::Task<Result<void>> write_caches();
  // Call before L2 entries start using newly allocated clusters (after their data is written).
  aio::Task<Result<void>> l2_depends_on_new_clusters();
  // Call before dropping refcounts of clusters whose L2 entries were just changed in the cache.
  aio::Task<Result<void>> refcounts_depend_on_l2();
  // Drops every cached slice of the L2 table at `l2_offset`, dirty or not: call when the table's
  // cluster is freed.
  void forget_l2_table(uint64_t l2_offset);
  // Writes a cache back when it holds more than its capacity.
  aio::Task<Result<void>> trim_caches();
  // write_caches + file flush under meta_ (FUA writes).
  aio::Task<Result<void>> write_caches_and_flush();
  // Synchronous write-back on a private loop with direct metadata I/O (close, inactivation,
  // reopen).
  Result<void> write_back_now();
  // Allocates and writes (zeroed) an L2 table for L1 entry `l1_index` and points the L1 entry at
  // it. meta_ held.
  aio::Task<Result<uint64_t>> allocate_l2_table(uint64_t l1_index);
  // Extends the image file past `end` in steps, so that the writes of new clusters do not each
  // resize the file (QEMU's file driver writes past its end; strata's request layer does not).
  // write_back_now shrinks the file back to the clusters in use. meta_ held.
  aio::Task<Result<void>> ensure_file_covers(uint64_t end);
  // Metadata writes and flushes of the node itself (direct during write_back_now).
  aio::Task<Result<void>> meta_write(uint64_t offset, IoVector qiov);
  aio::Task<Result<void>> meta_flush();

  // ---- in-flight allocations (write.cc) ----
  struct InflightAllocation {
    uint64_t first_cluster = 0;
    uint64_t clusters = 0;
    aio::Event done;
  };
  // The in-flight allocation covering guest cluster `cluster`, if any.
  std::shared_ptr<InflightAllocation> inflight_for(uint64_t cluster) const;
  // Writes [offset, offset + bytes), allocating where needed; returns the bytes done. With
  // `may_free` false (shared lock_), stops before a cluster whose old entry must be released.
  aio::Task<Result<uint64_t>> write_clusters(uint64_t offset, uint64_t bytes, IoVector qiov,
                                             uint32_t flags, bool may_free);

  // ---- snapshots and resize (snapshot.cc, resize.cc); the caller holds lock_ exclusively ----
  // QEMU's qcow2_update_snapshot_refcount: adds `addend` (-1, 0, +1) to the refcount of every L2
  // table and cluster the L1 table at `l1_offset` reaches and sets OFLAG_COPIED where the
  // refcount is then 1. `l1_offset` equal to the active table's uses the in-memory active L1.
  // Refcount changes reach the file before the L2/L1 entries whose flags they change; the L1
  // table is rewritten only for addend >= 0 (with -1 it is about to be freed or overwritten).
  aio::Task<Result<void>> update_snapshot_refcount(uint64_t l1_offset, uint64_t l1_size,
                                                   int addend);
  // QEMU's qcow2_write_snapshots: writes `entries` to newly allocated clusters, flushes, points
  // the header at them (flushed) and frees the old table. On success snapshots_ holds `entries`.
  aio::Task<Result<void>> write_snapshot_table(std::vector<SnapshotEntry> entries);
  // The L2 table guest writes may change for L1 entry `l1_index` (table at `l2_offset`): the same
  // table when its refcount is 1 (OFLAG_COPIED set in L1 if missing), else a copy that replaces
  // it in the active L1 (QEMU's l2_allocate with an old table): copy written and flushed before
  // the L1 entry, the old table's refcount dropped after.
  aio::Task<Result<uint64_t>> writable_l2_table(uint64_t l1_index, uint64_t l2_offset);
  // QEMU's qcow2_grow_l1_table: a new active L1 of at least `min_size` entries (exactly, or grown
  // by 1.5x steps) written and flushed before the header points at it; the old one freed after.
  aio::Task<Result<void>> grow_l1_table(uint64_t min_size, bool exact_size);
  // qcow2_co_truncate's body for preallocation off (resize.cc); `new_size` is a multiple of 512.
  aio::Task<Result<void>> resize_unlocked(uint64_t new_size);
  // The active L1 entries as a table of header_.l1_size entries (zeroes past the stored ones).
  std::vector<uint64_t> active_l1_table() const;
  // Writes `bytes` at `offset` of the header and flushes (QEMU's bdrv_pwrite_sync on a field).
  aio::Task<Result<void>> write_header_field(uint64_t offset, const void* data, uint64_t bytes);
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
  aio::CoMutex meta_;
  std::vector<std::shared_ptr<InflightAllocation>> inflight_;
  bool l2_needs_refcounts_ = false;  // dirty L2 slices use clusters with dirty refcounts
  bool l2_needs_flush_ = false;      // dirty L2 slices use clusters whose data is not flushed
  bool refcounts_need_l2_ = false;   // dirty refcount drops wait for dirty L2 slices
  bool direct_io_ = false;           // during write_back_now
  bool file_grown_ahead_ = false;  // ensure_file_covers extended the file past the clusters in use
  std::vector<uint8_t> zero_cluster_;     // zeroes for COW regions (written from, never changed)
  std::unique_ptr<Refcounts> refcounts_;  // only when opened read-write
  bool pass_discard_request_ = true;
  bool discard_no_unref_ = false;
  uint64_t refcount_cache_blocks_ = 0;  // refcount-cache-size, for a later switch to writing  //
                                        // discard-no-unref: discards keep clusters allocated
  bool lazy_refcounts_ = false;         // lazy-refcounts option (default: the image's compat bit)
  uint32_t overlap_checks_ = 0;         // OverlapBits enabled by the overlap-check option
  bool signaled_corruption_ = false;
  bool corrupted_ = false;  // a fatal corruption was signalled: no more I/O
  // Where the next compressed cluster may be packed (0: start a new host cluster). Reset when a
  // compressed cluster is released, since its host cluster may have been freed and reused.
  uint64_t free_byte_offset_ = 0;

  Header header_;
  std::optional<bool> metadata_preallocation_;
  std::string image_backing_file_;
  std::string image_backing_format_;
  std::optional<std::string> image_data_file_;
  Child* data_file_ = nullptr;
  std::unique_ptr<ClusterMap> map_;
  // What a header rewrite keeps (backing names, extensions, the bitmaps extension fields).
  HeaderContents header_contents_;
  // The bitmap directory as last read or written (what `info` reports).
  std::vector<BitmapDirectoryEntry> bitmap_directory_;
  SnapshotTable snapshots_;
  // The cache-clean-interval timer (cache_clean.cc); last, so it stops before anything it uses
  // is destroyed.
  aio::TaskGroup cache_cleaner_;
};

}  // namespace strata::block::qcow2
