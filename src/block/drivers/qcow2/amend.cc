// `strata img amend` for qcow2 (QEMU's qcow2_amend_options, qcow2_upgrade, qcow2_downgrade).

#include <bit>
#include <cinttypes>
#include <cstdio>

#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

namespace {

Error invalid(std::string message) {
  return Error(ErrorKind::kInvalidArgument, std::move(message), EINVAL);
}

}  // namespace

aio::Task<Result<void>> Qcow2Node::expand_zero_clusters() {
  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t clusters = (length() + cluster_size - 1) >> header_.cluster_bits;
  const bool has_backing = backing_child() != nullptr || !image_backing_file_.empty();
  std::vector<uint8_t> zeroes(cluster_size, 0);
  for (uint64_t cluster = 0; cluster < clusters; ++cluster) {
    Result<L2Ref> ref = co_await l2_ref(cluster);
    if (!ref) {
      co_return std::move(ref).error();
    }
    if (ref->l2_offset == 0) {
      // No table: skip to the next one.
      cluster = ((ref->l1_index + 1) << header_.l2_bits()) - 1;
      continue;
    }
    const uint64_t entry = ref->entry;
    if ((entry & kOflagCompressed) != 0 || (entry & kOflagZero) == 0) {
      continue;
    }
    uint64_t host = entry & kL2OffsetMask;
    uint64_t updated = 0;
    if (host == 0 && !has_backing) {
      updated = 0;  // unallocated reads as zeroes too
    } else {
      if (host == 0) {
        Result<uint64_t> allocated = co_await refcounts_->allocate(1);
        if (!allocated) {
          co_return std::move(allocated).error();
        }
        host = *allocated;
      }
      Result<void> zeroed =
          co_await write_growing(file(), host, IoVector(zeroes.data(), zeroes.size()));
      if (zeroed) {
        zeroed = co_await sync_metadata();
      }
      if (!zeroed) {
        co_return zeroed;
      }
      Result<uint64_t> refcount = co_await refcounts_->get(host >> header_.cluster_bits);
      if (!refcount) {
        co_return std::move(refcount).error();
      }
      updated = host | (*refcount == 1 ? kOflagCopied : 0);
    }
    const std::vector<uint64_t> entries(1, updated);
    Result<void> written = co_await write_l2_entries(ref->l2_offset, ref->l2_index, entries);
    if (!written) {
      co_return written;
    }
  }
  Result<void> flushed = co_await sync_metadata();
  co_return flushed;
}

aio::Task<Result<void>> Qcow2Node::amend(AmendOptions options) {
  if (refcounts_ == nullptr) {
    co_return Error(ErrorKind::kPermission, "Permission denied", EACCES);
  }
  // QEMU's qcow2_amend_options checks these before changing anything.
  const bool has_data_file = (header_.incompatible_features & kIncompatDataFile) != 0;
  if (options.data_file && !has_data_file) {
    co_return invalid("data-file can only be set for images that use an external data file");
  }
  const bool raw = (header_.autoclear_features & kAutoclearDataFileRaw) != 0;
  if (options.data_file_raw.value_or(false) && !raw) {
    co_return invalid("data-file-raw cannot be set on existing images");
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  auto meta = co_await meta_.scoped_lock();
  const uint32_t old_version = header_.version;
  const uint32_t new_version = options.version.value_or(old_version);
  const uint64_t refcount_bits =
      options.refcount_bits.value_or(uint64_t{1} << header_.refcount_order);
  if (options.refcount_bits) {
    if (refcount_bits > 64 || (refcount_bits & (refcount_bits - 1)) != 0 || refcount_bits == 0) {
      co_return invalid("Refcount width must be a power of two and may not exceed 64 bits");
    }
  }
  // Upgrade first, so that the other changes may use version 3 features.
  if (new_version > old_version) {
    header_.version = new_version;
    Result<void> upgraded = co_await rewrite_header();
    if (!upgraded) {
      header_.version = old_version;
      co_return upgraded;
    }
    map_->set_version(new_version);
  }
  if (options.lazy_refcounts) {
    const bool enabled = (header_.compatible_features & kCompatLazyRefcounts) != 0;
    if (*options.lazy_refcounts != enabled) {
      if (new_version < 3 && *options.lazy_refcounts) {
        co_return invalid(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 "
            "or greater)");
      }
      // strata keeps refcounts exact, so the image is clean either way: only the bit changes.
      if (*options.lazy_refcounts) {
        header_.compatible_features |= kCompatLazyRefcounts;
      } else {
        header_.compatible_features &= ~kCompatLazyRefcounts;
      }
      Result<void> written = co_await rewrite_header();
      if (!written) {
        co_return written;
      }
    }
  }
  if (refcount_bits != (uint64_t{1} << header_.refcount_order)) {
    if (new_version < 3 && refcount_bits != 16) {
      co_return invalid(
          "Refcount widths other than 16 bits require compatibility level 1.1 or above (use "
          "compat=1.1 or greater)");
    }
    Result<void> changed =
        co_await change_refcount_order(static_cast<uint32_t>(std::countr_zero(refcount_bits)));
    if (!changed) {
      co_return changed;
    }
  }
  if (new_version < old_version) {
    // QEMU's qcow2_downgrade.
    if (header_.refcount_order != 4) {
      co_return invalid("compat=0.10 requires refcount_bits=16");
    }
    const uint64_t incompatible = header_.incompatible_features & ~kIncompatDirty;
    if (incompatible != 0) {
      char text[128];
      std::snprintf(text, sizeof(text),
                    "Cannot downgrade an image with incompatible features 0x%" PRIx64 " set",
                    incompatible);
      co_return invalid(text);
    }
    if (header_contents_.nb_bitmaps > 0 || !dirty_bitmaps().empty()) {
      // QEMU downgrades and leaves the bitmaps' clusters leaked; strata refuses instead.
      co_return invalid(
          "Cannot downgrade an image with persistent dirty bitmaps (remove them first)");
    }
    Result<void> expanded = co_await expand_zero_clusters();
    if (!expanded) {
      co_return expanded;
    }
    const Header old_header = header_;
    header_.version = new_version;
    header_.compatible_features = 0;
    header_.autoclear_features = 0;
    header_.incompatible_features = 0;
    Result<void> written = co_await rewrite_header();
    if (!written) {
      header_ = old_header;
      co_return written;
    }
    map_->set_version(new_version);
  }
  if (options.data_file || options.data_file_raw) {
    // The data file name in its header extension and the data-file-raw autoclear bit.
    const std::optional<std::string> old_name = image_data_file_;
    const uint64_t old_autoclear = header_.autoclear_features;
    if (options.data_file) {
      image_data_file_ = options.data_file->empty() ? std::nullopt : options.data_file;
      header_contents_.data_file = image_data_file_;
    }
    if (options.data_file_raw && !*options.data_file_raw) {
      header_.autoclear_features &= ~kAutoclearDataFileRaw;
    }
    Result<void> written = co_await rewrite_header();
    if (!written) {
      image_data_file_ = old_name;
      header_contents_.data_file = old_name;
      header_.autoclear_features = old_autoclear;
      co_return written;
    }
  }
  co_return ok();
}

}  // namespace strata::block::qcow2
