#include "block/drivers/qcow2/header_update.h"

#include <cerrno>
#include <cstring>

#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/drivers/qcow2/refcount.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

namespace {

void store_be32(uint8_t* p, uint32_t value) {
  p[0] = static_cast<uint8_t>(value >> 24);
  p[1] = static_cast<uint8_t>(value >> 16);
  p[2] = static_cast<uint8_t>(value >> 8);
  p[3] = static_cast<uint8_t>(value);
}

// QEMU's header_ext_add: magic, length, data padded to 8 bytes.
void append_extension(std::vector<uint8_t>& out, uint32_t magic, const void* data, size_t length) {
  const size_t at = out.size();
  out.resize(at + 8 + ((length + 7) & ~size_t{7}), 0);
  store_be32(out.data() + at, magic);
  store_be32(out.data() + at + 4, static_cast<uint32_t>(length));
  if (length > 0) {
    std::memcpy(out.data() + at + 8, data, length);
  }
}

}  // namespace

std::vector<uint8_t> feature_name_table() {
  struct Feature {
    uint8_t type;
    uint8_t bit;
    const char* name;
  };
  static const Feature kFeatures[] = {
      {0, 0, "dirty bit"},        {0, 1, "corrupt bit"},         {0, 2, "external data file"},
      {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
      {2, 0, "bitmaps"},          {2, 1, "raw external data"},
  };
  constexpr size_t kEntrySize = 48;
  std::vector<uint8_t> table(std::size(kFeatures) * kEntrySize, 0);
  size_t at = 0;
  for (const auto& feature : kFeatures) {
    table[at] = feature.type;
    table[at + 1] = feature.bit;
    std::memcpy(table.data() + at + 2, feature.name, std::strlen(feature.name));
    at += kEntrySize;
  }
  return table;
}

Result<std::vector<uint8_t>> build_header_cluster(const Header& header,
                                                  const HeaderContents& contents) {
  const uint64_t cluster_size = header.cluster_size();
  std::vector<uint8_t> cluster(cluster_size, 0);
  uint8_t* h = cluster.data();
  const uint32_t fixed_length = header.version >= 3 ? kHeaderStructSize : kHeaderV2Length;
  const uint32_t header_length =
      fixed_length +
      static_cast<uint32_t>(header.version >= 3 ? contents.unknown_fields.size() : 0);
  store_be32(h, kMagic);
  store_be32(h + 4, header.version);
  store_be32(h + 20, header.cluster_bits);
  put_be64(h + 24, header.size & ~uint64_t{511});
  store_be32(h + 32, header.crypt_method);
  store_be32(h + 36, header.l1_size);
  put_be64(h + 40, header.l1_table_offset);
  put_be64(h + 48, header.refcount_table_offset);
  store_be32(h + 56, header.refcount_table_clusters);
  store_be32(h + 60, header.nb_snapshots);
  put_be64(h + 64, header.snapshots_offset);
  if (header.version >= 3) {
    put_be64(h + 72, header.incompatible_features);
    put_be64(h + 80, header.compatible_features);
    put_be64(h + 88, header.autoclear_features);
    store_be32(h + 96, header.refcount_order);
    store_be32(h + 100, header_length);
    h[kCompressionTypeOffset] = header.compression_type;
  }

  std::vector<uint8_t> tail;
  if (header.version >= 3) {
    tail = contents.unknown_fields;
  }
  if (!contents.backing_format.empty()) {
    append_extension(tail, kExtBackingFormat, contents.backing_format.data(),
                     contents.backing_format.size());
  }
  if ((header.incompatible_features & kIncompatDataFile) != 0 && contents.data_file) {
    append_extension(tail, kExtDataFile, contents.data_file->data(), contents.data_file->size());
  }
  // QEMU leaves the table out for small clusters, to leave room for a backing file name.
  if (header.version >= 3 && cluster_size > 4096) {
    const std::vector<uint8_t> table = feature_name_table();
    append_extension(tail, kExtFeatureTable, table.data(), table.size());
  }
  if (contents.nb_bitmaps > 0) {
    uint8_t bitmaps[24] = {};
    store_be32(bitmaps, contents.nb_bitmaps);
    put_be64(bitmaps + 8, contents.bitmap_directory_size);
    put_be64(bitmaps + 16, contents.bitmap_directory_offset);
    append_extension(tail, kExtBitmaps, bitmaps, sizeof(bitmaps));
  }
  for (const auto& [magic, data] : contents.unknown_extensions) {
    append_extension(tail, magic, data.data(), data.size());
  }
  append_extension(tail, kExtEnd, nullptr, 0);

  const uint64_t extensions_end = fixed_length + tail.size();
  if (extensions_end + contents.backing_file.size() > cluster_size) {
    return Error(ErrorKind::kIo, "No space left on device", ENOSPC);
  }
  std::memcpy(h + fixed_length, tail.data(), tail.size());
  if (!contents.backing_file.empty()) {
    put_be64(h + 8, extensions_end);
    store_be32(h + 16, static_cast<uint32_t>(contents.backing_file.size()));
    std::memcpy(h + extensions_end, contents.backing_file.data(), contents.backing_file.size());
  }
  return cluster;
}

}  // namespace strata::block::qcow2

// ---- through the node ----------------------------------------------------------------------

namespace strata::block::qcow2 {

aio::Task<Result<void>> Qcow2Node::rewrite_header() {
  Result<std::vector<uint8_t>> cluster = build_header_cluster(header_, header_contents_);
  if (!cluster) {
    co_return std::move(cluster).error();
  }
  Result<void> written =
      co_await io::pwritev(file(), 0, IoVector(cluster->data(), cluster->size()));
  if (!written) {
    co_return written;
  }
  header_.header_length =
      header_.version >= 3
          ? kHeaderStructSize + static_cast<uint32_t>(header_contents_.unknown_fields.size())
          : kHeaderV2Length;
  // The backing file name moved with the extensions.
  header_.backing_file_offset =
      header_contents_.backing_file.empty() ? 0 : load_be64(cluster->data() + 8);
  header_.backing_file_size = static_cast<uint32_t>(header_contents_.backing_file.size());
  Result<void> flushed = co_await io::flush(file());
  co_return flushed;
}

aio::Task<Result<void>> Qcow2Node::change_backing_file(std::string backing_file,
                                                       std::string backing_format) {
  if (!backing_file.empty() && (header_.autoclear_features & kAutoclearDataFileRaw) != 0) {
    co_return Error(ErrorKind::kInvalidArgument, "Invalid argument", EINVAL);
  }
  if (backing_file.size() > kMaxBackingFileNameLength) {
    co_return Error(ErrorKind::kInvalidArgument, "Invalid argument", EINVAL);
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  auto meta = co_await meta_.scoped_lock();
  const HeaderContents old_contents = header_contents_;
  header_contents_.backing_file = backing_file;
  header_contents_.backing_format = backing_format;
  Result<void> written = co_await rewrite_header();
  if (!written) {
    header_contents_ = old_contents;
    co_return written;
  }
  image_backing_file_ = std::move(backing_file);
  image_backing_format_ = std::move(backing_format);
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::sync_metadata() {
  Result<void> written = co_await write_caches();
  if (!written) {
    co_return written;
  }
  Result<void> flushed = co_await meta_flush();
  co_return flushed;
}

}  // namespace strata::block::qcow2
