#pragma once
// The qcow2 format driver, read-only for now: opens every image QEMU 10 writes (versions 2 and 3,
// 512 B to 2 MiB clusters, extended L2, compressed zlib/zstd clusters, zero clusters, external
// data files, backing chains) and serves reads and block status. Opening read-write fails until
// the writer lands.
//
// Roles: `file` is kRoleImage (kRoleMetadata | kRolePrimary with an external data file, which is
// the kRoleData `data-file` child); `backing` is kRoleCow.

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "block/drivers/driver.h"
#include "block/drivers/qcow2/cluster_map.h"
#include "block/drivers/qcow2/header.h"

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
