#include "daemon/blockdev_create.h"

#include <array>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "base/arg_decoder.h"
#include "block/drivers/blockdev_options.h"
#include "block/drivers/driver.h"
#include "block/drivers/file/file_create.h"
#include "block/drivers/qcow2/create.h"
#include "block/drivers/qcow2/format.h"
#include "block/graph/permissions.h"
#include "block/io/request.h"

namespace strata::daemon {

namespace {

namespace qcow2 = block::qcow2;

constexpr std::array<std::string_view, 4> kPreallocModes = {"off", "metadata", "falloc", "full"};
constexpr std::array<std::string_view, 2> kQcow2Versions = {"v2", "v3"};
constexpr std::array<std::string_view, 2> kCompressionTypes = {"zlib", "zstd"};
constexpr std::array<std::string_view, 2> kEncryptFormats = {"qcow", "luks"};

// The job that blockdev-create starts: QEMU's blockdev_create_run (progress 0/1, then 1/1).
class CreateJob : public block::job::Job {
 public:
  using Body = std::function<aio::Task<Result<void>>()>;
  CreateJob(std::string id, Body body)
      : Job(std::move(id), "create", Flags{.auto_finalize = true, .auto_dismiss = false}),
        body_(std::move(body)) {}

 protected:
  aio::Task<Result<void>> run() override {
    progress_set_remaining(1);
    Result<void> result = co_await body_();
    progress_update(1);
    co_return result;
  }

 private:
  Body body_;
};

// A root user of the nodes a qcow2 creation writes (QEMU's anonymous BlockBackend).
class CreateUser : public block::BlockParent {
 public:
  std::string parent_description() const override { return "an unnamed block device"; }
};

struct Qcow2Request {
  block::BlockdevRef file;
  std::optional<block::BlockdevRef> data_file;
  qcow2::CreateOptions options;
  std::optional<std::string> encrypt_key_secret;
  bool encrypt = false;
};

Error cannot_find(const std::string& name) {
  return make_error(ErrorKind::kNotFound,
                    "Cannot find device='" + name + "' nor node-name='" + name + "'");
}

// QEMU's bdrv_co_open_blockdev_ref: an existing node by name, or a new one from inline options
// (released again when the creation ends).
Result<std::shared_ptr<block::Node>> open_ref(block::Graph& graph, const block::BlockdevRef& ref) {
  if (ref.inline_options) {
    return block::open_blockdev(graph, *ref.inline_options);
  }
  block::Node* node = graph.find(ref.node_name);
  if (node == nullptr) {
    return cannot_find(ref.node_name);
  }
  return node->shared_from_this();
}

// Zero-fills [offset, offset + bytes) of `node` with real writes (falloc/full preallocation of
// the data clusters: both must own their blocks).
aio::Task<Result<void>> fill_zeroes(block::Node& node, uint64_t offset, uint64_t bytes) {
  std::vector<uint8_t> zeroes(1 << 20, 0);
  for (uint64_t done = 0; done < bytes;) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(zeroes.size(), bytes - done));
    auto written = co_await block::io::pwrite(node, offset + done, zeroes.data(), chunk);
    if (!written) {
      co_return written;
    }
    done += chunk;
  }
  co_return ok();
}

// qcow2_co_create over the block layer, in QEMU's order of checks.
aio::Task<Result<void>> create_qcow2(block::Graph& graph, Qcow2Request request) {
  // QEMU opens the `file` reference in a coroutine that yields to the main loop first, so even
  // the earliest failure is reported after blockdev-create's reply: do the same.
  co_await aio::EventLoop::current()->yield();
  auto file = open_ref(graph, request.file);
  if (!file) {
    co_return std::move(file).error();
  }
  qcow2::CreateOptions& options = request.options;
  if (options.size % 512 != 0) {
    co_return make_error(ErrorKind::kInvalidArgument, "Image size must be a multiple of 512 bytes");
  }
  if (request.data_file) {
    // A placeholder until the node is known: validation only needs to know there is one.
    options.data_file = std::string("data-file");
  }
  auto valid = qcow2::validate_create_options(options);
  if (!valid) {
    co_return std::move(valid).error();
  }
  std::shared_ptr<block::Node> data_file;
  if (request.data_file) {
    auto opened = open_ref(graph, *request.data_file);
    if (!opened) {
      co_return std::move(opened).error();
    }
    data_file = std::move(opened).value();
    options.data_file = data_file->filename();
  }
  if (request.encrypt) {
    // strata has no secret objects and writes no encrypted images; the messages are QEMU's for
    // a missing key.
    if (!request.encrypt_key_secret) {
      co_return make_error(ErrorKind::kInvalidArgument,
                           "Parameter 'encrypt.key-secret' is required for cipher");
    }
    co_return make_error(ErrorKind::kNotFound,
                         "No secret with id '" + *request.encrypt_key_secret + "'");
  }
  auto layout = qcow2::layout_image(options);
  if (!layout) {
    co_return std::move(layout).error();
  }

  CreateUser user;
  const uint64_t perm = block::kPermWrite | block::kPermResize;
  auto root = graph.attach_root(user, *file, "root", block::kRoleImage, perm, block::kPermAll);
  if (!root) {
    co_return std::move(root).error();
  }
  std::unique_ptr<block::Child> data_root;
  if (data_file && options.data_file_raw) {
    auto attached =
        graph.attach_root(user, data_file, "root", block::kRoleData, perm, block::kPermAll);
    if (!attached) {
      graph.detach_root(std::move(root).value());
      co_return std::move(attached).error();
    }
    data_root = std::move(attached).value();
  }
  block::Node& node = *file.value();
  Result<void> result = co_await block::io::truncate(node, 0, false);
  if (result) {
    result = co_await qcow2::write_image(node, *layout);
  }
  if (result && (options.preallocation == qcow2::Preallocation::kFalloc ||
                 options.preallocation == qcow2::Preallocation::kFull)) {
    for (const auto& [offset, bytes] : layout->data_extents) {
      result = co_await fill_zeroes(node, offset, bytes);
      if (!result) {
        break;
      }
    }
    if (result) {
      result = co_await block::io::flush(node);
    }
  }
  if (result && data_root) {
    // A raw data file holds the guest data at its own offsets. QEMU's metadata preallocation
    // extends it to the disk's end by writing the last sector, which allocates that block.
    const uint64_t end = options.size;
    if (end > 0 && data_file->length() < end) {
      result = co_await block::io::truncate(*data_file, end, false);
      if (result) {
        std::vector<uint8_t> sector(512, 0);
        result = co_await block::io::pwrite(*data_file, end - 512, sector.data(), sector.size());
      }
    }
  }
  if (data_root) {
    graph.detach_root(std::move(data_root));
  }
  graph.detach_root(std::move(root).value());
  co_return result;
}

// file-posix's raw_co_create: the open at once, then the sizing.
aio::Task<Result<void>> create_file(block::file::FileCreateOptions options) {
  auto fd = block::file::open_new_file(options);
  if (!fd) {
    co_return std::move(fd).error();
  }
  co_return co_await block::file::size_new_file(*aio::EventLoop::current(), *fd, options);
}

qcow2::Preallocation preallocation_of(const std::optional<std::string>& mode) {
  static const std::map<std::string, qcow2::Preallocation> kModes = {
      {"off", qcow2::Preallocation::kOff},
      {"metadata", qcow2::Preallocation::kMetadata},
      {"falloc", qcow2::Preallocation::kFalloc},
      {"full", qcow2::Preallocation::kFull},
  };
  return kModes.at(mode.value_or("off"));
}

}  // namespace

Result<std::unique_ptr<block::job::Job>> make_blockdev_create_job(const nlohmann::json& args,
                                                                  block::Graph& graph) {
  ArgDecoder d(args);
  std::string job_id = d.str("job-id");
  ArgDecoder o = d.object("options");
  std::vector<std::string_view> drivers;
  for (const auto& driver : block::all_drivers()) {
    drivers.push_back(driver.name);
  }
  std::string driver = o.enumeration("driver", drivers);
  CreateJob::Body body;
  if (driver == "file") {
    block::file::FileCreateOptions options;
    options.filename = o.str("filename");
    options.size = o.size("size");
    options.preallocation = o.opt_enum("preallocation", kPreallocModes).value_or("off");
    options.nocow = o.opt_bool("nocow").value_or(false);
    options.extent_size_hint = o.opt_size("extent-size-hint");
    body = [options]() { return create_file(options); };
  } else if (driver == "qcow2") {
    Qcow2Request request;
    if (auto file = block::parse_blockdev_ref(o, "file", true)) {
      request.file = *file;
    }
    request.data_file = block::parse_blockdev_ref(o, "data-file", false);
    qcow2::CreateOptions& options = request.options;
    options.data_file_raw = o.opt_bool("data-file-raw").value_or(false);
    options.extended_l2 = o.opt_bool("extended-l2").value_or(false);
    options.size = o.size("size");
    options.version = o.opt_enum("version", kQcow2Versions).value_or("v3") == "v2" ? 2 : 3;
    options.backing_file = o.opt_str("backing-file");
    if (auto format = o.opt_enum("backing-fmt", drivers)) {
      options.backing_format = *format;
    }
    if (auto encrypt = o.opt_object("encrypt")) {
      request.encrypt = true;
      (void)encrypt->enumeration("format", kEncryptFormats);
      request.encrypt_key_secret = encrypt->opt_str("key-secret");
      // The cipher parameters of QCryptoBlockCreateOptions are accepted and unused: creation
      // fails on the key before they matter.
      for (const char* name : {"cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg",
                               "hash-alg", "iter-time", "detached-header"}) {
        (void)encrypt->opt_any(name);
      }
      ignore_error(encrypt->finish(), "recorded in the shared decoder state");
    }
    options.cluster_size = o.opt_size("cluster-size").value_or(65536);
    options.preallocation = preallocation_of(o.opt_enum("preallocation", kPreallocModes));
    options.lazy_refcounts = o.opt_bool("lazy-refcounts").value_or(false);
    options.refcount_bits = static_cast<uint64_t>(o.opt_i64("refcount-bits").value_or(16));
    if (auto compression = o.opt_enum("compression-type", kCompressionTypes)) {
      options.compression_type =
          *compression == "zstd" ? qcow2::kCompressionZstd : qcow2::kCompressionZlib;
      options.compression_type_given = true;
    }
    body = [&graph, request]() { return create_qcow2(graph, request); };
  }
  ignore_error(o.finish(), "recorded in the shared decoder state");
  auto decoded = d.finish();
  if (!decoded) {
    return std::move(decoded).error();
  }
  if (!body) {
    return make_error(ErrorKind::kUnsupported, "Driver does not support blockdev-create");
  }
  return std::unique_ptr<block::job::Job>(new CreateJob(std::move(job_id), std::move(body)));
}

}  // namespace strata::daemon
