#include "block/drivers/qcow2/qcow2_node.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "aio/event_loop.h"
#include "block/drivers/blkdebug/events.h"
#include "block/drivers/qcow2/compressed.h"
#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/overlap.h"
#include "block/drivers/remote_url.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

namespace {

constexpr std::array<std::string_view, 4> kOverlapModes = {"none", "constant", "cached", "all"};
constexpr std::array<std::string_view, 2> kEncryptFormats = {"aes", "luks"};
constexpr const char* kOverlapFlags[] = {
    "main-header",    "active-l1",   "active-l2",   "refcount-table",   "refcount-block",
    "snapshot-table", "inactive-l1", "inactive-l2", "bitmap-directory",
};

constexpr uint64_t kDefaultL2CacheMaxSize = 32ull << 20;  // DEFAULT_L2_CACHE_MAX_SIZE
constexpr uint64_t kMinL2CacheSize = 2;                   // MIN_L2_CACHE_SIZE (entries)
constexpr uint64_t kMinRefcountCacheSize = 4;             // MIN_REFCOUNT_CACHE_SIZE (clusters)

Error invalid(std::string message) {
  return Error(ErrorKind::kInvalidArgument, std::move(message), EINVAL);
}

// Metadata reads while opening. A driver's open is synchronous and may run inside a coroutine
// of the caller's loop, which must not be re-entered; the reads run on a private loop instead
// (children opened moments ago have no requests in flight that could wait for the caller's loop).
class OpenReader {
 public:
  static Result<OpenReader> create() {
    auto loop = aio::EventLoop::create(16);
    if (!loop) {
      return std::move(loop).error();
    }
    return OpenReader(std::move(loop).value());
  }
  // Runs `task` to completion on the private loop.
  Result<void> run(aio::Task<Result<void>> task) { return loop_->block_on(std::move(task)); }
  // `length` bytes at `offset`, zeroes past the end of `node`.
  Result<std::vector<uint8_t>> read(Node& node, uint64_t offset, size_t length) {
    std::vector<uint8_t> buffer(length);
    Result<void> done =
        loop_->block_on(read_zero_padded(node, offset, IoVector(buffer.data(), buffer.size())));
    if (!done) {
      return std::move(done).error();
    }
    return buffer;
  }

 private:
  explicit OpenReader(std::unique_ptr<aio::EventLoop> loop) : loop_(std::move(loop)) {}
  std::unique_ptr<aio::EventLoop> loop_;
};

std::string dirname_of(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) {
    return "";
  }
  return path.substr(0, slash + 1);
}

// QEMU's path_combine for a name stored in an image: absolute names and remote URLs
// (remote_url.h: http, https, nbd) stay, relative names are relative to the image's directory.
// Any other name is a plain local path: never json: or another protocol spec (CVE-2024-4467).
Result<std::string> resolve_image_relative(const Node& file, const std::string& name) {
  if (names_itself(name)) {
    return name;
  }
  auto base = file.exact_filename();
  if (!base) {
    return invalid("Cannot use relative backing file names for '" + file.filename() + "'");
  }
  return dirname_of(*base) + name;
}

// An encrypted image (AES or LUKS crypt_method) cannot be opened: strata implements no
// encryption and has no `secret` objects. The refusal is QEMU's own for what it would lack:
// a format that contradicts the header, no key-secret, or a key-secret naming no secret object.
std::optional<Error> refuse_encrypted_image(const std::vector<uint8_t>& cluster,
                                            const Qcow2Options& options) {
  if (cluster.size() < 36) {
    return std::nullopt;
  }
  const uint32_t method = (uint32_t{cluster[32]} << 24) | (uint32_t{cluster[33]} << 16) |
                          (uint32_t{cluster[34]} << 8) | uint32_t{cluster[35]};
  if (method != kCryptAes && method != kCryptLuks) {
    return std::nullopt;
  }
  const std::string header_format = method == kCryptLuks ? "luks" : "aes";
  if (options.encrypt_format && *options.encrypt_format != header_format) {
    return invalid("Header reported '" + header_format + "' encryption format but options " +
                   "specify '" + *options.encrypt_format + "'");
  }
  if (!options.encrypt_key_secret) {
    return invalid("Parameter 'encrypt.key-secret' is required for cipher");
  }
  return invalid("No secret with id '" + *options.encrypt_key_secret + "'");
}

// Opens a child given only as a local path with driver `driver` ("file", or a format over a file):
// read-only (a backing file), or with `inherit_read_only` as the parent is opened (the external
// data file, which guest writes go to).
Result<Child*> attach_protocol(OpenContext& context, Node& parent, const std::string& driver,
                               const nlohmann::json& protocol_options,
                               const std::string& child_name, uint32_t role,
                               bool inherit_read_only = false) {
  nlohmann::json options = driver == protocol_options["driver"]
                               ? protocol_options
                               : nlohmann::json{{"driver", driver}, {"file", protocol_options}};
  if (!inherit_read_only) {
    // QEMU's bdrv_backing_options: read-only, but may become writable (block-commit).
    options["read-only"] = true;
    options["auto-read-only"] = true;
  }
  ArgDecoder d(options);
  BlockdevRef ref;
  ref.inline_options = parse_blockdev_options(d, options);
  auto decoded = d.finish();
  if (!decoded) {
    return std::move(decoded).error();
  }
  return context.attach(parent, ref, child_name, role);
}

Result<Child*> attach_path(OpenContext& context, Node& parent, const std::string& driver,
                           const std::string& path, const std::string& child_name, uint32_t role,
                           bool inherit_read_only = false) {
  const nlohmann::json file_options = {{"driver", "file"}, {"filename", path}};
  return attach_protocol(context, parent, driver, file_options, child_name, role,
                         inherit_read_only);
}

// The first bytes of a local file, for probing a backing file without a format.
bool has_qcow2_magic(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return false;
  }
  uint8_t magic[4] = {};
  ssize_t n = ::pread(fd, magic, sizeof(magic), 0);
  ::close(fd);
  return n == 4 && load_be32(magic) == kMagic;
}

}  // namespace

// ---- options -----------------------------------------------------------------------------------

std::unique_ptr<DriverOptions> Qcow2Node::parse(ArgDecoder& d) {
  auto options = std::make_unique<Qcow2Options>();
  if (auto file = parse_blockdev_ref(d, "file", true)) {
    options->file = std::move(*file);
  }
  options->backing = parse_blockdev_ref(d, "backing", false, true);
  options->lazy_refcounts = d.opt_bool("lazy-refcounts");
  options->pass_discard_request = d.opt_bool("pass-discard-request");
  options->pass_discard_snapshot = d.opt_bool("pass-discard-snapshot");
  options->pass_discard_other = d.opt_bool("pass-discard-other");
  options->discard_no_unref = d.opt_bool("discard-no-unref");
  if (const nlohmann::json* overlap = d.opt_any("overlap-check")) {
    // Qcow2OverlapChecks: a mode name, or an object with a template and per-structure flags.
    if (overlap->is_string()) {
      const auto mode = overlap->get<std::string>();
      if (std::find(kOverlapModes.begin(), kOverlapModes.end(), mode) == kOverlapModes.end()) {
        d.fail(invalid("Parameter '" + d.full_name("overlap-check") + "' does not accept value '" +
                       mode + "'"));
      }
      options->overlap_check = mode;
    } else if (overlap->is_object()) {
      ArgDecoder o = d.nested(*overlap, "overlap-check");
      options->overlap_check = o.opt_enum("template", kOverlapModes);
      for (const char* flag : kOverlapFlags) {
        if (std::optional<bool> value = o.opt_bool(flag)) {
          options->overlap_flags[flag] = *value;
        }
      }
      ignore_error(o.finish(), "recorded in the shared decoder state");
    } else {
      d.fail(invalid("Invalid parameter type for '" + d.full_name("overlap-check") +
                     "', expected: Qcow2OverlapChecks"));
    }
  }
  options->cache_size = d.opt_i64("cache-size");
  options->l2_cache_size = d.opt_i64("l2-cache-size");
  options->l2_cache_entry_size = d.opt_i64("l2-cache-entry-size");
  options->refcount_cache_size = d.opt_i64("refcount-cache-size");
  options->cache_clean_interval = d.opt_i64("cache-clean-interval");
  if (auto encrypt = d.opt_object("encrypt")) {
    options->has_encrypt = true;
    options->encrypt_format = encrypt->enumeration("format", kEncryptFormats);
    options->encrypt_key_secret = encrypt->opt_str("key-secret");
    ignore_error(encrypt->finish(), "recorded in the shared decoder state");
  }
  options->data_file = parse_blockdev_ref(d, "data-file", false);
  return options;
}

Result<CacheSizes> compute_cache_sizes(const Header& header, const Qcow2Options& options) {
  // QEMU's read_cache_sizes and qcow2_update_options_prepare.
  const uint64_t cluster_size = header.cluster_size();
  const uint64_t disk_size = header.size & ~uint64_t{511};
  const uint64_t max_l2_entries = (disk_size + cluster_size - 1) / cluster_size;
  const uint64_t max_l2_cache =
      (max_l2_entries * header.l2_entry_size() + cluster_size - 1) / cluster_size * cluster_size;
  const uint64_t min_refcount_cache = kMinRefcountCacheSize * cluster_size;
  auto as_size = [](const std::optional<int64_t>& v) { return static_cast<uint64_t>(*v); };

  const uint64_t l2_cache_max_setting =
      options.l2_cache_size ? as_size(options.l2_cache_size) : kDefaultL2CacheMaxSize;
  uint64_t refcount_cache_size =
      options.refcount_cache_size ? as_size(options.refcount_cache_size) : 0;
  uint64_t entry_size =
      options.l2_cache_entry_size ? as_size(options.l2_cache_entry_size) : cluster_size;
  uint64_t l2_cache_size = std::min(max_l2_cache, l2_cache_max_setting);

  if (options.cache_size) {
    const uint64_t combined = as_size(options.cache_size);
    if (options.l2_cache_size && options.refcount_cache_size) {
      return invalid(
          "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time");
    }
    if (options.l2_cache_size && l2_cache_max_setting > combined) {
      return invalid("l2-cache-size may not exceed cache-size");
    }
    if (refcount_cache_size > combined) {
      return invalid("refcount-cache-size may not exceed cache-size");
    }
    if (options.l2_cache_size) {
      refcount_cache_size = combined - l2_cache_size;
    } else if (options.refcount_cache_size) {
      l2_cache_size = combined - refcount_cache_size;
    } else if (combined >= max_l2_cache + min_refcount_cache) {
      l2_cache_size = max_l2_cache;
      refcount_cache_size = combined - l2_cache_size;
    } else {
      refcount_cache_size = std::min(combined, min_refcount_cache);
      l2_cache_size = combined - refcount_cache_size;
    }
  }
  if (l2_cache_size < max_l2_cache && !options.l2_cache_entry_size) {
    entry_size = std::min<uint64_t>(cluster_size, 4096);
  }
  if (entry_size < 512 || entry_size > cluster_size || (entry_size & (entry_size - 1)) != 0) {
    return invalid("L2 cache entry size must be a power of two between 512 and the cluster size (" +
                   std::to_string(cluster_size) + ")");
  }
  CacheSizes sizes;
  sizes.l2_slice_bytes = static_cast<uint32_t>(entry_size);
  sizes.l2_slices = std::max(l2_cache_size / entry_size, kMinL2CacheSize);
  if (sizes.l2_slices > static_cast<uint64_t>(INT32_MAX)) {
    return invalid("L2 cache size too big");
  }
  sizes.refcount_blocks = std::max(refcount_cache_size / cluster_size, kMinRefcountCacheSize);
  if (sizes.refcount_blocks > static_cast<uint64_t>(INT32_MAX)) {
    return invalid("Refcount cache size too big");
  }
  return sizes;
}

// ---- open ----------------------------------------------------------------------------------

Qcow2Node::Qcow2Node(CommonOptions common) : Node(std::move(common)) {}
Qcow2Node::~Qcow2Node() {
  // QEMU's qcow2_close: the persistent bitmaps of an active node are stored, dirty metadata
  // reaches the file, then the dirty bit of lazy refcounts is cleared (errors can only be
  // reported). A read-only node tries too: a persistent bitmap added to it cannot be stored,
  // and the message says it is lost.
  if (active_) {
    (void)store_bitmaps_now(/*release=*/true);
  }
  ignore_error(write_back_now(), "closing a qcow2 node cannot fail");
  mark_clean_at_close();
}

Result<std::shared_ptr<Node>> Qcow2Node::open(OpenContext& context,
                                              const BlockdevOptions& options) {
  const auto& qcow2 = static_cast<const Qcow2Options&>(*options.driver_options);
  auto node = std::make_shared<Qcow2Node>(context.options());
  auto file = context.attach(*node, qcow2.file, "file", kRoleImage);
  if (!file) {
    return std::move(file).error();
  }
  auto loaded = node->load(context, qcow2);
  if (!loaded) {
    return std::move(loaded).error();
  }
  auto backing = node->open_backing(context, qcow2);
  if (!backing) {
    return std::move(backing).error();
  }
  // QEMU's qcow2_refresh_limits.
  node->limits_.pwrite_zeroes_alignment = static_cast<uint32_t>(node->header_.subcluster_size());
  node->limits_.pdiscard_alignment = static_cast<uint32_t>(node->header_.cluster_size());
  node->start_cache_cleaner(qcow2.cache_clean_interval.value_or(kDefaultCacheCleanInterval));
  return std::shared_ptr<Node>(std::move(node));
}

Result<void> Qcow2Node::load(OpenContext& context, const Qcow2Options& options) {
  auto reader = OpenReader::create();
  if (!reader) {
    return std::move(reader).error();
  }
  auto head = reader->read(file(), 0, kHeaderStructSize);
  if (!head) {
    return head.error().with_prefix("Could not read qcow2 header");
  }
  auto bits = probe_cluster_bits(*head);
  if (!bits) {
    return std::move(bits).error();
  }
  auto cluster = reader->read(file(), 0, size_t{1} << *bits);
  if (!cluster) {
    return cluster.error().with_prefix("Could not read qcow2 header");
  }
  auto header = parse_header(*cluster);
  if (!header) {
    if (auto refused = refuse_encrypted_image(*cluster, options)) {
      return std::move(*refused);
    }
    return std::move(header).error();
  }
  header_ = *header;

  // The active L1 table. Only the entries stored in the file are kept: the rest read as zero
  // (unallocated), so the memory used is bounded by the file size, not by the header.
  std::vector<uint64_t> l1;
  auto read_l1 = [&]() -> Result<void> {
    l1.clear();
    if (header_.l1_size > 0) {
      const uint64_t file_length = file().length();
      const uint64_t l1_bytes = uint64_t{header_.l1_size} * 8;
      const uint64_t stored = header_.l1_table_offset >= file_length
                                  ? 0
                                  : std::min(l1_bytes, file_length - header_.l1_table_offset);
      // QEMU's block layer refuses requests ending past BDRV_MAX_LENGTH with EIO.
      constexpr uint64_t kMaxRequestEnd = (uint64_t{1} << 63) - (uint64_t{1} << 30);
      if (header_.l1_table_offset > kMaxRequestEnd - l1_bytes) {
        return Error(ErrorKind::kIo, "Could not read L1 table: Input/output error", EIO);
      }
      auto raw = reader->read(file(), header_.l1_table_offset, static_cast<size_t>(stored / 8 * 8));
      if (!raw) {
        return raw.error().with_prefix("Could not read L1 table");
      }
      l1.resize(raw->size() / 8);
      for (size_t i = 0; i < l1.size(); ++i) {
        l1[i] = load_be64(raw->data() + i * 8);
      }
    }
    return ok();
  };
  Result<void> l1_read = read_l1();
  if (!l1_read) {
    return l1_read;
  }

  // Options (QEMU's qcow2_update_options_prepare).
  auto caches = compute_cache_sizes(header_, options);
  if (!caches) {
    return std::move(caches).error();
  }
  // QEMU reads the interval as an unsigned number: a negative one wraps and is too big.
  if (options.cache_clean_interval &&
      (*options.cache_clean_interval < 0 || *options.cache_clean_interval > int64_t{UINT32_MAX})) {
    return invalid("Cache clean interval too big");
  }
  if (options.lazy_refcounts.value_or((header_.compatible_features & kCompatLazyRefcounts) != 0) &&
      header_.version < 3) {
    return invalid(
        "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level");
  }
  if (options.discard_no_unref.value_or(false) && header_.version < 3) {
    return invalid("discard-no-unref is only supported since qcow2 version 3");
  }
  if (options.has_encrypt && options.encrypt_format) {
    return invalid("No encryption in image header, but options specified format '" +
                   *options.encrypt_format + "'");
  }

  auto extensions = parse_extensions(header_, *cluster);
  if (!extensions) {
    return std::move(extensions).error();
  }
  image_backing_format_ = extensions->backing_format.value_or("");
  image_data_file_ = extensions->data_file;

  // External data file. As QEMU's qcow2_do_open, a given data-file is opened before the image
  // says whether it has one, so its own errors come first.
  const bool has_data_file_bit = (header_.incompatible_features & kIncompatDataFile) != 0;
  if (options.data_file) {
    auto attached = context.attach(*this, *options.data_file, "data-file", kRoleData);
    if (!attached) {
      return std::move(attached).error();
    }
    data_file_ = *attached;
  }
  if (has_data_file_bit) {
    if (data_file_ != nullptr) {
      // Given as an option and opened above.
    } else if (image_data_file_) {
      // QEMU opens the stored name as given (relative names are relative to the working
      // directory, not to the image), and only ever as a plain local file.
      auto attached =
          attach_path(context, *this, "file", *image_data_file_, "data-file", kRoleData, true);
      if (!attached) {
        return std::move(attached).error();
      }
      data_file_ = *attached;
    } else {
      return invalid("'data-file' is required for this image");
    }
    // The image file holds no guest data now (QEMU drops BDRV_CHILD_DATA from bs->file). A
    // read-only node takes the same permissions either way.
  } else {
    if (options.data_file) {
      return invalid("'data-file' can only be set for images with an external data file");
    }
    if (header_.autoclear_features & kAutoclearDataFileRaw) {
      return invalid("data-file-raw requires a data file");
    }
  }

  auto backing_name = parse_backing_file_name(header_, *cluster);
  if (!backing_name) {
    return std::move(backing_name).error();
  }
  if (*backing_name) {
    image_backing_file_ = **backing_name;
  }

  // The snapshot table (QEMU's qcow2_read_snapshots). Each entry is read from the file, so the
  // work is bounded by nb_snapshots (at most 65536, checked with the header) and the table size
  // by QEMU's limit.
  Result<void> snapshots_read = reader->run(
      [](Node& file, const Header& header, SnapshotTable& out) -> aio::Task<Result<void>> {
        Result<SnapshotTable> table = co_await read_snapshot_table(file, header);
        if (!table) {
          co_return std::move(table).error();
        }
        out = std::move(table).value();
        co_return ok();
      }(file(), header_, snapshots_));
  if (!snapshots_read) {
    return snapshots_read;
  }

  header_contents_.backing_file = image_backing_file_;
  header_contents_.backing_format = image_backing_format_;
  header_contents_.data_file = image_data_file_;
  header_contents_.nb_bitmaps = extensions->nb_bitmaps;
  header_contents_.bitmap_directory_size = extensions->bitmap_directory_size;
  header_contents_.bitmap_directory_offset = extensions->bitmap_directory_offset;
  header_contents_.unknown_extensions = extensions->unknown;
  if (header_.version >= 3 && header_.header_length > kHeaderStructSize) {
    header_contents_.unknown_fields.assign(cluster->begin() + kHeaderStructSize,
                                           cluster->begin() + header_.header_length);
  }

  pass_discard_request_ = options.pass_discard_request.value_or(true);
  discard_no_unref_ = options.discard_no_unref.value_or(false);
  overlap_checks_ = overlap_checks(options.overlap_check, options.overlap_flags);
  lazy_refcounts_ =
      options.lazy_refcounts.value_or((header_.compatible_features & kCompatLazyRefcounts) != 0);
  refcount_cache_blocks_ = caches->refcount_blocks;
  if (!context.options().read_only) {
    const bool was_dirty = (header_.incompatible_features & kIncompatDirty) != 0;
    Result<void> prepared = prepare_writes(
        *extensions, caches->refcount_blocks,
        [&](aio::Task<Result<void>> task) { return reader->run(std::move(task)); },
        context.options().active);
    if (!prepared) {
      return prepared;
    }
    if (was_dirty) {
      // The repair may have rewritten L1 entries (OFLAG_COPIED).
      l1_read = read_l1();
      if (!l1_read) {
        return l1_read;
      }
    }
  }
  map_ = std::make_unique<ClusterMap>(header_, std::move(l1), data_file_ != nullptr,
                                      caches->l2_slices, caches->l2_slice_bytes);
  // QEMU loads the persistent bitmaps of active nodes only (an inactive one is reloaded when it
  // is activated).
  if (context.options().active) {
    return reader->run(load_bitmaps(!context.options().read_only));
  }
  return ok();
}

Result<void> Qcow2Node::open_backing(OpenContext& context, const Qcow2Options& options) {
  if (options.backing) {
    if (options.backing->is_null) {
      return ok();
    }
    auto attached = context.attach(*this, *options.backing, "backing", kRoleCow);
    if (!attached) {
      return std::move(attached).error();
    }
    return ok();
  }
  if (image_backing_file_.empty()) {
    return ok();
  }
  nlohmann::json protocol;
  std::string format = image_backing_format_;
  if (is_remote_url(image_backing_file_)) {
    auto remote = remote_url_options(image_backing_file_);
    if (!remote) {
      return remote.error().with_prefix("Could not open backing file");
    }
    protocol = std::move(remote).value();
    if (format.empty()) {
      // Not probed over the network (QEMU would): a remote file without a format is raw.
      format = "raw";
    }
  } else {
    auto path = resolve_image_relative(file(), image_backing_file_);
    if (!path) {
      return path.error().with_prefix("Could not open backing file");
    }
    protocol = {{"driver", "file"}, {"filename", *path}};
    if (format.empty()) {
      // QEMU probes an image without a backing format; strata knows qcow2 and raw.
      format = has_qcow2_magic(*path) ? "qcow2" : "raw";
    }
  }
  if (find_driver(format) == nullptr) {
    return invalid("Could not open backing file: Unknown driver '" + format + "'");
  }
  auto attached = attach_protocol(context, *this, format, protocol, "backing", kRoleCow);
  if (!attached) {
    return attached.error().with_prefix("Could not open backing file");
  }
  return ok();
}

// ---- data path ---------------------------------------------------------------------------

aio::Task<Result<void>> Qcow2Node::co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                             uint32_t) {
  Result<void> usable = check_usable();
  if (!usable) {
    co_return usable;
  }
  auto shared = co_await lock_.scoped_read_lock();
  Result<void> read = co_await read_unlocked(offset, bytes, qiov);
  co_return read;
}

aio::Task<Result<void>> Qcow2Node::read_unlocked(uint64_t offset, uint64_t bytes, IoVector qiov) {
  uint64_t done = 0;
  while (done < bytes) {
    Result<Mapping> mapped = co_await map_->map(file(), offset + done, bytes - done);
    if (!mapped) {
      co_return std::move(mapped).error();
    }
    const Mapping m = *mapped;
    const uint64_t n = std::min(m.bytes, bytes - done);
    IoVector part = qiov.slice(done, n);
    switch (m.type) {
      case SubclusterType::kZeroPlain:
      case SubclusterType::kZeroAlloc:
        part.fill(0, 0, n);
        break;
      case SubclusterType::kUnallocatedPlain:
      case SubclusterType::kUnallocatedAlloc:
        if (Child* backing = backing_child(); backing != nullptr) {
          block::debug_event(child("file"), BlkdebugEvent::kReadBackingAio);
          Result<void> read = co_await read_zero_padded(*backing->node(), offset + done, part);
          if (!read) {
            co_return read;
          }
        } else {
          part.fill(0, 0, n);
        }
        break;
      case SubclusterType::kNormal: {
        block::debug_event(child("file"), BlkdebugEvent::kReadAio);
        Result<void> read = co_await read_zero_padded(data_file(), m.host_offset, part);
        if (!read) {
          co_return read;
        }
        break;
      }
      case SubclusterType::kCompressed: {
        Result<void> read = co_await read_compressed(m, offset + done, n, part);
        if (!read) {
          co_return read;
        }
        break;
      }
    }
    done += n;
  }
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::read_compressed(const Mapping& mapping, uint64_t offset,
                                                   uint64_t bytes, IoVector qiov) {
  block::debug_event(child("file"), BlkdebugEvent::kReadCompressed);
  const uint64_t cluster_size = header_.cluster_size();
  // compressed_size is at most two clusters (qcow2.rst: the sector count has cluster_bits - 8
  // bits).
  std::vector<uint8_t> compressed(mapping.compressed_size);
  Result<void> read = co_await read_zero_padded(file(), mapping.compressed_offset,
                                                IoVector(compressed.data(), compressed.size()));
  if (!read) {
    co_return read;
  }
  std::vector<uint8_t> cluster(cluster_size);
  Result<void> inflated = decompress(header_.compression_type, compressed, cluster);
  if (!inflated) {
    co_return std::move(inflated).error();
  }
  const uint64_t in_cluster = offset & (cluster_size - 1);
  qiov.copy_from(0, cluster.data() + in_cluster, bytes);
  co_return ok();
}

aio::Task<Result<bool>> Qcow2Node::detect_metadata_preallocation() {
  const uint64_t cluster_size = header_.cluster_size();
  auto allocated = file().allocated_size();
  if (!allocated) {
    co_return false;
  }
  const uint64_t real_clusters = *allocated / cluster_size;
  const uint64_t threshold = std::max(real_clusters * 10 / 9, real_clusters + 2);
  const uint64_t end_cluster = (file().length() + cluster_size - 1) / cluster_size;
  const uint32_t refcount_bits = 1u << header_.refcount_order;
  // Entries per refcount block: cluster_size * 8 / refcount_bits.
  const uint64_t block_entries = (cluster_size * 8) >> header_.refcount_order;
  const uint64_t table_entries = uint64_t{header_.refcount_table_clusters} * cluster_size / 8;
  std::vector<uint8_t> block(cluster_size);
  uint64_t loaded_index = UINT64_MAX;
  uint64_t count = 0;
  for (uint64_t i = 0; i < end_cluster && count < threshold; ++i) {
    const uint64_t table_index = i / block_entries;
    if (table_index >= table_entries) {
      break;
    }
    if (table_index != loaded_index) {
      uint8_t entry[8];
      Result<void> read = co_await read_zero_padded(
          file(), header_.refcount_table_offset + table_index * 8, IoVector(entry, 8));
      if (!read) {
        co_return std::move(read).error();
      }
      const uint64_t block_offset = load_be64(entry) & kRefcountTableOffsetMask;
      if (block_offset == 0) {
        std::fill(block.begin(), block.end(), 0);
      } else {
        Result<void> loaded =
            co_await read_zero_padded(file(), block_offset, IoVector(block.data(), block.size()));
        if (!loaded) {
          co_return std::move(loaded).error();
        }
      }
      loaded_index = table_index;
    }
    const uint64_t index = i % block_entries;
    const uint64_t bit = index * refcount_bits;
    bool nonzero = false;
    for (uint32_t b = 0; b < refcount_bits && !nonzero; b += 8) {
      if (refcount_bits < 8) {
        // Sub-byte refcounts are packed from the least significant bit (QEMU's get_refcount_ro0).
        nonzero = ((block[bit / 8] >> (bit % 8)) & ((1u << refcount_bits) - 1)) != 0;
      } else {
        nonzero = block[bit / 8 + b / 8] != 0;
      }
    }
    count += nonzero ? 1 : 0;
  }
  co_return count >= threshold;
}

aio::Task<Result<BlockStatus>> Qcow2Node::co_block_status(uint64_t offset, uint64_t bytes) {
  Result<void> usable = check_usable();
  if (!usable) {
    co_return std::move(usable).error();
  }
  if (!metadata_preallocation_) {
    Result<bool> detected = co_await detect_metadata_preallocation();
    if (!detected) {
      co_return std::move(detected).error();
    }
    metadata_preallocation_ = *detected;
  }
  auto shared = co_await lock_.scoped_read_lock();
  Result<Mapping> mapped = co_await map_->map(file(), offset, bytes);
  if (!mapped) {
    co_return std::move(mapped).error();
  }
  // QEMU's qcow2_co_block_status.
  BlockStatus status;
  status.bytes = std::min(mapped->bytes, bytes);
  switch (mapped->type) {
    case SubclusterType::kNormal:
      status.flags = BlockStatus::kData | BlockStatus::kOffsetValid;
      break;
    case SubclusterType::kZeroAlloc:
      status.flags = BlockStatus::kZero | BlockStatus::kOffsetValid;
      break;
    case SubclusterType::kUnallocatedAlloc:
      status.flags = BlockStatus::kOffsetValid;
      break;
    case SubclusterType::kZeroPlain:
      status.flags = BlockStatus::kZero;
      break;
    case SubclusterType::kCompressed:
      status.flags = BlockStatus::kData | BlockStatus::kCompressed;
      break;
    case SubclusterType::kUnallocatedPlain:
      status.flags = 0;
      break;
  }
  if (status.flags & BlockStatus::kOffsetValid) {
    status.map_offset = mapped->host_offset;
    status.file = &data_file();
    if (*metadata_preallocation_ && (status.flags & BlockStatus::kData)) {
      status.flags |= BlockStatus::kRecurse;
    }
  }
  co_return status;
}

// ---- info ----------------------------------------------------------------------------------

std::optional<std::string> Qcow2Node::exact_filename() const {
  // QEMU's bdrv_refresh_filename: a plain filename unless the backing file is overridden. A
  // data-file option does not change it (qemu-storage-daemon 10.0.2 reports the image file's
  // name whichever data-file node is given).
  if (backing_overridden()) {
    return std::nullopt;
  }
  return file().exact_filename();
}

Result<void> Qcow2Node::check_perm(uint64_t perm, uint64_t shared) {
  // A node opened read-only that becomes writable (reopen, or block-commit making its base
  // writable) loads what writing needs first, as a read-write open does.
  const bool writes = (perm & (kPermWrite | kPermWriteUnchanged)) != 0;
  if (writes && refcounts_ == nullptr && !is_read_only() && is_active()) {
    auto reader = OpenReader::create();
    if (!reader) {
      return std::move(reader).error();
    }
    Extensions unused;
    Result<void> prepared = prepare_writes(
        unused, refcount_cache_blocks_,
        [&](aio::Task<Result<void>> task) { return reader->run(std::move(task)); }, true);
    if (!prepared) {
      return prepared;
    }
  }
  return Node::check_perm(perm, shared);
}

bool Qcow2Node::backing_overridden() const {
  // QEMU's bdrv_backing_overridden: the attached backing node is not the one the image names.
  const std::optional<std::string> named = full_backing_filename();
  if (Child* backing = backing_child()) {
    return !named || *named != backing->node()->filename();
  }
  return named.has_value();
}

nlohmann::json Qcow2Node::strong_options() const {
  nlohmann::json options = nlohmann::json::object();
  if (backing_child() == nullptr && backing_overridden()) {
    options["backing"] = nullptr;
  }
  return options;
}

std::optional<std::string> Qcow2Node::full_backing_filename() const {
  if (image_backing_file_.empty()) {
    return std::nullopt;
  }
  auto path = resolve_image_relative(file(), image_backing_file_);
  if (!path) {
    return std::nullopt;
  }
  return *path;
}

std::optional<Node::BackingFileName> Qcow2Node::backing_file_name() const {
  if (image_backing_file_.empty()) {
    return std::nullopt;
  }
  BackingFileName name;
  name.name = image_backing_file_;
  name.full_name = full_backing_filename().value_or(image_backing_file_);
  name.format = image_backing_format_;
  return name;
}

std::optional<uint64_t> Qcow2Node::allocated_size() const {
  auto size = file().allocated_size();
  if (data_file_ != nullptr && size) {
    auto data = data_file_->node()->allocated_size();
    if (data) {
      return *size + *data;
    }
  }
  return size;
}

nlohmann::json Qcow2Node::format_specific_info() const {
  // QEMU's qcow2_get_specific_info.
  nlohmann::json data;
  const char* compression = header_.compression_type == kCompressionZstd ? "zstd" : "zlib";
  if (header_.version == 2) {
    data = {{"compat", "0.10"},
            {"refcount-bits", uint64_t{1} << header_.refcount_order},
            {"compression-type", compression}};
  } else {
    data["compat"] = "1.1";
    if (image_data_file_) {
      data["data-file"] = *image_data_file_;
    }
    if (header_.incompatible_features & kIncompatDataFile) {
      data["data-file-raw"] = (header_.autoclear_features & kAutoclearDataFileRaw) != 0;
    }
    data["extended-l2"] = header_.extended_l2();
    data["lazy-refcounts"] = (header_.compatible_features & kCompatLazyRefcounts) != 0;
    if (!bitmap_directory_.empty()) {
      // Qcow2BitmapInfo: the flags QEMU knows, in its order (in-use, auto).
      nlohmann::json bitmaps = nlohmann::json::array();
      for (const auto& entry : bitmap_directory_) {
        nlohmann::json flags = nlohmann::json::array();
        if (entry.flags & kBitmapFlagInUse) {
          flags.push_back("in-use");
        }
        if (entry.flags & kBitmapFlagAuto) {
          flags.push_back("auto");
        }
        bitmaps.push_back({{"flags", flags},
                           {"name", entry.name},
                           {"granularity", uint64_t{1} << entry.granularity_bits}});
      }
      data["bitmaps"] = bitmaps;
    }
    data["corrupt"] = (header_.incompatible_features & kIncompatCorrupt) != 0;
    data["refcount-bits"] = uint64_t{1} << header_.refcount_order;
    data["compression-type"] = compression;
  }
  return {{"type", "qcow2"}, {"data", data}};
}

}  // namespace strata::block::qcow2
