#include "cli/block_tool.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>

#include "base/arg_decoder.h"
#include "block/drivers/driver.h"
#include "block/drivers/nbd/nbd_uri.h"
#include "block/drivers/remote_url.h"
#include "block/io/request.h"
#include "qmp/json_stream.h"

namespace strata::cli {

namespace {

constexpr char kQcow2Magic[] = {'Q', 'F', 'I', '\xfb'};

// The protocol layer of a plain filename ("null-co://" and the like, an http(s) URL, else a
// host file).
nlohmann::json protocol_options(const std::string& filename) {
  for (const char* driver : {"null-co", "null-aio"}) {
    std::string prefix = std::string(driver) + "://";
    if (filename.rfind(prefix, 0) == 0) {
      return {{"driver", driver}};
    }
  }
  if (block::is_http_url(filename)) {
    return *block::remote_url_options(filename);
  }
  return {{"driver", "file"}, {"filename", filename}};
}

// QEMU's format probing, reduced to the formats strata has: qcow2 magic, else raw.
std::string probe_format(const std::string& filename) {
  int fd = ::open(filename.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return "raw";
  }
  char header[4] = {};
  ssize_t got = ::pread(fd, header, sizeof(header), 0);
  ::close(fd);
  if (got == static_cast<ssize_t>(sizeof(header)) &&
      std::memcmp(header, kQcow2Magic, sizeof(header)) == 0 &&
      block::find_driver("qcow2") != nullptr) {
    return "qcow2";
  }
  return "raw";
}

// Sets `key` unless the user gave it, as a keyval string or a JSON boolean.
void set_flag(nlohmann::json& options, const char* key, bool value, bool keyval) {
  if (!options.contains(key)) {
    if (keyval) {
      options[key] = value ? "on" : "off";
    } else {
      options[key] = value;
    }
  }
}

// Client credentials for an nbds:// URI: x509 from a directory, else PSK from a keys file.
Result<std::shared_ptr<const crypto::TlsCreds>> uri_tls_creds(const block::NbdUriTls& tls) {
  if (tls.certificates) {
    crypto::TlsCredsX509Options x509;
    x509.endpoint = crypto::TlsEndpoint::kClient;
    x509.dir = *tls.certificates;
    x509.verify_peer = tls.verify_peer;
    return crypto::load_x509_creds(x509);
  }
  crypto::TlsCredsPskOptions psk;
  psk.endpoint = crypto::TlsEndpoint::kClient;
  psk.keys_file = *tls.psk_file;
  psk.username = tls.username;
  return crypto::load_psk_creds(psk);
}

}  // namespace

Result<ImageOptions> image_options(const ImageOpenRequest& request) {
  ImageOptions result;
  if (request.image_opts) {
    auto parsed = qmp::parse_keyval_or_json(*request.image_opts, "");
    if (!parsed) {
      return std::move(parsed).error();
    }
    result.options = std::move(parsed).value();
    result.keyval = !qmp::option_is_json(*request.image_opts);
    if (!result.options.is_object()) {
      return make_error(ErrorKind::kInvalidArgument, "--image-opts must describe an object");
    }
    // As in QEMU, a protocol child given only by filename is a host file.
    for (auto& [key, child] : result.options.items()) {
      if (child.is_object() && child.contains("filename") && !child.contains("driver")) {
        child["driver"] = "file";
      }
    }
  } else {
    nlohmann::json protocol;
    if (block::is_nbd_uri(request.filename)) {
      std::optional<block::NbdUriTls> tls;
      auto nbd = block::nbd_uri_options(request.filename, &tls);
      if (!nbd) {
        return std::move(nbd).error();
      }
      protocol = std::move(nbd).value();
      if (tls) {
        auto creds = uri_tls_creds(*tls);
        if (!creds) {
          return std::move(creds).error();
        }
        result.uri_tls_creds = std::move(creds).value();
        result.tls_creds_id = "nbds-uri:" + request.filename;
        protocol["tls-creds"] = result.tls_creds_id;
        if (tls->hostname) {
          protocol["tls-hostname"] = *tls->hostname;
        } else if (protocol["server"]["type"] == "unix") {
          protocol["tls-hostname"] = "localhost";
        }
      }
    } else {
      protocol = protocol_options(request.filename);
    }
    std::string format;
    if (request.format) {
      format = *request.format;
    } else if (protocol["driver"] == "nbd" || block::is_http_url(request.filename)) {
      // Probed once the connection is up (BlockSession::open); raw until then.
      format = "raw";
      result.probed = true;
      result.probe_through_protocol = true;
    } else if (protocol["driver"] != "file") {
      format = "raw";
    } else {
      format = probe_format(request.filename);
      result.probed = true;
    }
    if (format == protocol["driver"]) {
      result.options = protocol;
    } else {
      result.options = {{"driver", format}, {"file", protocol}};
    }
  }
  const bool keyval = result.keyval;
  if (request.no_backing && !keyval && result.options.value("driver", "") == "qcow2" &&
      !result.options.contains("backing")) {
    result.options["backing"] = nullptr;
  }
  set_flag(result.options, "read-only", request.read_only, keyval);
  if (request.force_share) {
    set_flag(result.options, "force-share", true, keyval);
  }
  if (request.discard_unmap && !result.options.contains("discard")) {
    result.options["discard"] = "unmap";
  }
  if (request.cache_direct || request.cache_no_flush) {
    nlohmann::json& cache = result.options["cache"];
    if (!cache.is_object()) {
      cache = nlohmann::json::object();
    }
    if (request.cache_direct) {
      set_flag(cache, "direct", true, keyval);
    }
    if (request.cache_no_flush) {
      set_flag(cache, "no-flush", true, keyval);
    }
  }
  return result;
}

Result<std::unique_ptr<BlockSession>> BlockSession::create() {
  auto loop = aio::EventLoop::create();
  if (!loop) {
    return std::move(loop).error();
  }
  std::unique_ptr<BlockSession> session(new BlockSession());
  session->loop_ = std::move(loop).value();
  session->graph_ = std::make_unique<block::Graph>();
  session->graph_->set_crypto_objects(&tool_objects());
  return session;
}

crypto::ObjectTable& tool_objects() {
  static crypto::ObjectTable objects;
  return objects;
}

Result<void> add_tool_object(const std::string& spec) {
  auto options = qmp::parse_keyval_or_json(spec, "qom-type");
  if (!options) {
    return std::move(options).error();
  }
  ArgDecoder d(*options, "", !qmp::option_is_json(spec));
  static constexpr std::array<std::string_view, 5> kTypes = {
      "iothread", "tls-creds-x509", "tls-creds-psk", "authz-simple", "authz-list"};
  std::string type = d.enumeration("qom-type", kTypes);
  if (d.failed()) {
    return d.finish();
  }
  if (!crypto::ObjectTable::handles(type)) {
    return make_error(ErrorKind::kInvalidArgument, "invalid object type: " + type);
  }
  std::string id = d.str("id");
  crypto::ObjectTable& objects = tool_objects();
  return objects.add(type, id, d,
                     [&objects](const std::string& name) { return objects.contains(name); });
}

BlockSession::~BlockSession() {
  while (!images_.empty()) {
    close(*images_.back().node);
  }
  graph_.reset();
  loop_.reset();
}

namespace {

// The members of a format node's options that its protocol child inherits when opened inline.
constexpr const char* kInheritedMembers[] = {"read-only", "auto-read-only", "force-share", "cache",
                                             "discard"};

// QEMU's bdrv_open probing through a protocol: opens options["file"] alone, reads its first
// bytes, and rewrites `options` into the probed format over that node (by node name).
Result<std::shared_ptr<block::Node>> probe_through_protocol(aio::EventLoop& loop,
                                                            block::Graph& graph,
                                                            ImageOptions& options) {
  nlohmann::json protocol = options.options["file"];
  for (const char* member : kInheritedMembers) {
    if (options.options.contains(member) && !protocol.contains(member)) {
      protocol[member] = options.options[member];
    }
  }
  ArgDecoder d(protocol, "file", options.keyval);
  auto parsed = block::parse_blockdev_options(d, protocol);
  auto decoded = d.finish();
  if (!decoded) {
    return std::move(decoded).error();
  }
  auto node = block::open_blockdev(graph, *parsed);
  if (!node) {
    return node;
  }
  char header[sizeof(kQcow2Magic)] = {};
  if ((*node)->length() >= sizeof(header)) {
    auto read = loop.block_on(block::io::pread(**node, 0, header, sizeof(header)));
    if (!read) {
      return std::move(read).error();
    }
  }
  if (std::memcmp(header, kQcow2Magic, sizeof(header)) == 0) {
    options.options["driver"] = "qcow2";
  }
  options.options["file"] = (*node)->name();
  return node;
}

}  // namespace

Result<block::Node*> BlockSession::open(const ImageOpenRequest& request) {
  auto options = image_options(request);
  if (!options) {
    return std::move(options).error();
  }
  if (options->uri_tls_creds != nullptr) {
    tool_objects().insert(options->tls_creds_id, options->uri_tls_creds);  // kept if present
  }
  // Keeps the probed protocol node alive until the format node holds it.
  std::shared_ptr<block::Node> probed_protocol;
  if (options->probe_through_protocol) {
    auto node = probe_through_protocol(*loop_, *graph_, *options);
    if (!node) {
      return std::move(node).error();
    }
    probed_protocol = std::move(node).value();
  }
  ArgDecoder d(options->options, "", options->keyval);
  auto parsed = block::parse_blockdev_options(d, options->options);
  auto decoded = d.finish();
  if (!decoded) {
    return std::move(decoded).error();
  }
  auto node = block::open_blockdev(*graph_, *parsed);
  if (!node) {
    return std::move(node).error();
  }
  // QEMU's blk_new_open with BDRV_O_NO_SHARE: consistent read (and write when writable), sharing
  // only consistent read and unchanged writes unless force-share.
  uint64_t perm = 0;
  if (!request.no_io) {
    perm = block::kPermConsistentRead;
    if (!(*node)->is_read_only()) {
      perm |= block::kPermWrite;
    }
  }
  uint64_t shared = request.force_share ? block::kPermAll
                                        : (block::kPermConsistentRead | block::kPermWriteUnchanged);
  auto root = graph_->attach_root(*this, *node, "root", block::kRoleImage, perm, shared);
  if (!root) {
    return std::move(root).error();
  }
  block::Node* raw_node = node->get();
  if (options->probed && request.warn_probed_raw && !raw_node->is_read_only() &&
      std::string_view(raw_node->driver_name()) == "raw") {
    std::fprintf(stderr,
                 "WARNING: Image format was not specified for '%s' and probing guessed raw.\n"
                 "         Automatically detecting the format is dangerous for raw images, "
                 "write operations on block 0 will be restricted.\n"
                 "         Specify the 'raw' format explicitly to remove the restrictions.\n",
                 request.filename.c_str());
  }
  images_.push_back(OpenedImage{std::move(node).value(), std::move(root).value(), options->probed});
  return raw_node;
}

Result<void> BlockSession::add_perm(block::Node& node, uint64_t perm) {
  for (auto& image : images_) {
    if (image.node.get() == &node) {
      if ((image.root->perm() & perm) == perm) {
        return ok();
      }
      if ((perm & (block::kPermWrite | block::kPermResize)) != 0 && node.is_read_only()) {
        return make_error(ErrorKind::kPermission, "Block node is read-only");
      }
      return graph_->set_root_perm(*image.root, image.root->perm() | perm, image.root->shared());
    }
  }
  return make_error(ErrorKind::kNotFound, "image is not open");
}

void BlockSession::close(block::Node& node) {
  for (auto it = images_.begin(); it != images_.end(); ++it) {
    if (it->node.get() == &node) {
      OpenedImage image = std::move(*it);
      images_.erase(it);
      graph_->detach_root(std::move(image.root));
      image.node.reset();
      return;
    }
  }
}

Result<uint64_t> parse_size(std::string_view text) {
  auto invalid = [] { return Error(ErrorKind::kInvalidArgument, "invalid size", EINVAL); };
  std::string s(text);
  if (s.empty() || s[0] == '-' || std::isspace(static_cast<unsigned char>(s[0])) != 0) {
    return invalid();
  }
  const char* begin = s.c_str();
  char* end = nullptr;
  errno = 0;
  bool hex = s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X');
  unsigned long long integer = std::strtoull(begin, &end, hex ? 16 : 10);
  if (end == begin) {
    return invalid();
  }
  if (errno == ERANGE) {
    return Error(ErrorKind::kInvalidArgument, "too large", ERANGE);
  }
  double fraction = 0;
  if (!hex && *end == '.') {
    char* fraction_end = nullptr;
    fraction = std::strtod(end, &fraction_end);
    end = fraction_end;
  }
  uint64_t unit = 1;
  if (*end != '\0') {
    switch (std::tolower(static_cast<unsigned char>(*end))) {
      case 'b':
        unit = 1;
        break;
      case 'k':
        unit = 1ull << 10;
        break;
      case 'm':
        unit = 1ull << 20;
        break;
      case 'g':
        unit = 1ull << 30;
        break;
      case 't':
        unit = 1ull << 40;
        break;
      case 'p':
        unit = 1ull << 50;
        break;
      case 'e':
        unit = 1ull << 60;
        break;
      default:
        return invalid();
    }
    ++end;
    if (hex && unit != 1) {
      return invalid();
    }
  }
  if (*end != '\0') {
    return invalid();
  }
  if (fraction != 0 && unit == 1) {
    return invalid();
  }
  if (integer > std::numeric_limits<uint64_t>::max() / unit) {
    return Error(ErrorKind::kInvalidArgument, "too large", ERANGE);
  }
  double value = static_cast<double>(integer) * static_cast<double>(unit) +
                 fraction * static_cast<double>(unit);
  if (value >= 0x1p64) {
    return Error(ErrorKind::kInvalidArgument, "too large", ERANGE);
  }
  return integer * unit + static_cast<uint64_t>(fraction * static_cast<double>(unit));
}

std::string size_to_str(uint64_t value) {
  static const char* const kSuffixes[] = {"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"};
  int exponent = 0;
  std::frexp(static_cast<double>(value) / (1000.0 / 1024.0), &exponent);
  int index = (exponent - 1) / 10;
  if (index < 0) {
    index = 0;
  }
  uint64_t divisor = 1ull << (index * 10);
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), "%0.3g %sB",
                static_cast<double>(value) / static_cast<double>(divisor), kSuffixes[index]);
  return buffer;
}

std::string errno_text(const Error& error) {
  return std::strerror(error.errno_value());
}

}  // namespace strata::cli
