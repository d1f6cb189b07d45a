// `strata img create`: qemu-img create for raw and qcow2 (bdrv_img_create: option parsing, the
// backing file's size as default, the "Formatting ..." line, then the format's create).

#include <fcntl.h>
#include <getopt.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "block/drivers/qcow2/create.h"
#include "block/drivers/qcow2/format.h"
#include "block/drivers/remote_url.h"
#include "block/graph/permissions.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

namespace qcow2 = block::qcow2;

Result<std::vector<std::pair<std::string, std::string>>> split_options(
    const std::vector<std::string>& texts) {
  std::vector<std::pair<std::string, std::string>> items;
  for (const auto& text : texts) {
    std::string item;
    auto flush = [&]() {
      if (!item.empty()) {
        size_t eq = item.find('=');
        items.emplace_back(item.substr(0, eq),
                           eq == std::string::npos ? std::string() : item.substr(eq + 1));
      }
      item.clear();
    };
    for (size_t i = 0; i < text.size(); ++i) {
      if (text[i] == ',') {
        if (i + 1 < text.size() && text[i + 1] == ',') {
          item += ',';
          ++i;
          continue;
        }
        flush();
      } else {
        item += text[i];
      }
    }
    flush();
  }
  return items;
}

namespace {

std::optional<bool> parse_bool(const std::string& value) {
  if (value == "on" || value == "yes" || value == "true" || value.empty()) {
    return true;
  }
  if (value == "off" || value == "no" || value == "false") {
    return false;
  }
  return std::nullopt;
}

// The directory part of `path` ("" for none), for backing names relative to the new image.
std::string directory_of(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash + 1);
}

}  // namespace

int create_qcow2(const std::string& filename, const std::map<std::string, std::string>& given,
                 std::optional<uint64_t> size, bool unsafe, bool quiet,
                 const std::string& error_prefix) {
  auto fail = [&](const std::string& message) {
    report(filename + ": " + error_prefix + message);
    return 1;
  };
  qcow2::CreateOptions options;
  // Typed parsing first (QEMU's qemu_opts_absorb: before the "Formatting" line).
  auto get = [&](const char* key) -> const std::string* {
    auto it = given.find(key);
    return it == given.end() ? nullptr : &it->second;
  };
  static const char* const kSizeKeys[] = {"cluster_size"};
  for (const char* key : kSizeKeys) {
    if (const std::string* value = get(key)) {
      auto parsed = parse_size(*value);
      if (!parsed) {
        return fail(std::string("Parameter '") + key +
                    "' expects a non-negative number below 2^64\n"
                    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                    "and exabytes, respectively.");
      }
      options.cluster_size = *parsed;
    }
  }
  if (const std::string* value = get("refcount_bits")) {
    char* end = nullptr;
    errno = 0;
    unsigned long long bits = std::strtoull(value->c_str(), &end, 0);
    if (value->empty() || *end != '\0' || errno != 0) {
      return fail("Parameter 'refcount_bits' expects a number");
    }
    options.refcount_bits = bits;
  }
  for (const char* key : {"lazy_refcounts", "extended_l2", "data_file_raw"}) {
    if (const std::string* value = get(key)) {
      auto parsed = parse_bool(*value);
      if (!parsed) {
        return fail(std::string("Parameter '") + key + "' expects 'on' or 'off'");
      }
      if (std::string_view(key) == "lazy_refcounts") {
        options.lazy_refcounts = *parsed;
      } else if (std::string_view(key) == "extended_l2") {
        options.extended_l2 = *parsed;
      } else {
        options.data_file_raw = *parsed;
      }
    }
  }
  if (const std::string* value = get("backing_file")) {
    options.backing_file = *value;
  }
  if (const std::string* value = get("backing_fmt")) {
    options.backing_format = *value;
  }
  if (const std::string* value = get("data_file")) {
    options.data_file = *value;
  }
  if (const std::string* value = get("encryption"); value != nullptr && *value != "off") {
    return fail("Encryption is not supported by strata img");
  }
  if (get("encrypt.format") != nullptr) {
    return fail("Encryption is not supported by strata img");
  }

  // The backing file: its format is required, and it gives the default size.
  if (options.backing_file) {
    if (!unsafe) {
      std::string path = *options.backing_file;
      if (!block::names_itself(path)) {
        path = directory_of(filename) + path;
      }
      auto session = BlockSession::create();
      if (!session) {
        return fail(session.error().message());
      }
      ImageOpenRequest request;
      request.filename = path;
      request.format = options.backing_format;
      request.no_io = true;
      request.force_share = true;
      auto opened = (*session)->open(request);
      if (!opened) {
        return fail(opened.error().message() + "\nCould not open backing image.");
      }
      if (!options.backing_format) {
        return fail(std::string("Backing file specified without backing format\nDetected format "
                                "of ") +
                    (*opened)->format_name() + ".");
      }
      if (!size) {
        size = (*opened)->length();
      }
    } else if (!options.backing_format) {
      return fail("Backing file specified without backing format");
    }
  }
  if (!size) {
    return fail("Image creation needs a size parameter");
  }
  options.size = *size;

  if (!quiet) {
    std::string line = "Formatting '" + filename + "', fmt=qcow2";
    if (const std::string* value = get("encryption")) {
      line += " encryption=" + *value;
    }
    line += " cluster_size=" + std::to_string(options.cluster_size);
    line += " extended_l2=" + (get("extended_l2") ? *get("extended_l2") : std::string("off"));
    if (const std::string* value = get("preallocation")) {
      line += " preallocation=" + *value;
    }
    line += " compression_type=" +
            (get("compression_type") ? *get("compression_type") : std::string("zlib"));
    line += " size=" + std::to_string(*size);
    for (const char* key :
         {"compat", "backing_file", "backing_fmt", "data_file", "data_file_raw"}) {
      if (const std::string* value = get(key)) {
        line += std::string(" ") + key + "=" + *value;
      }
    }
    line +=
        " lazy_refcounts=" + (get("lazy_refcounts") ? *get("lazy_refcounts") : std::string("off"));
    line += " refcount_bits=" + std::to_string(options.refcount_bits);
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  }

  // Enumerated values are checked by the create job (after the "Formatting" line).
  if (const std::string* value = get("compat")) {
    if (*value == "0.10" || *value == "v2") {
      options.version = 2;
    } else if (*value == "1.1" || *value == "v3") {
      options.version = 3;
    } else {
      return fail("Parameter 'version' does not accept value '" + *value + "'");
    }
  }
  if (const std::string* value = get("preallocation")) {
    static const std::map<std::string, qcow2::Preallocation> kModes = {
        {"off", qcow2::Preallocation::kOff},
        {"metadata", qcow2::Preallocation::kMetadata},
        {"falloc", qcow2::Preallocation::kFalloc},
        {"full", qcow2::Preallocation::kFull},
    };
    auto mode = kModes.find(*value);
    if (mode == kModes.end()) {
      return fail("Parameter 'preallocation' does not accept value '" + *value + "'");
    }
    options.preallocation = mode->second;
  }
  if (const std::string* value = get("compression_type")) {
    if (*value == "zlib") {
      options.compression_type = qcow2::kCompressionZlib;
    } else if (*value == "zstd") {
      options.compression_type = qcow2::kCompressionZstd;
    } else {
      return fail("Parameter 'compression-type' does not accept value '" + *value + "'");
    }
    options.compression_type_given = true;
  }
  Result<void> valid = qcow2::validate_create_options(options);
  if (!valid) {
    return fail(valid.error().message());
  }
  auto layout = qcow2::layout_image(options);
  if (!layout) {
    return fail(layout.error().message());
  }

  if (options.data_file) {
    Result<void> data =
        create_raw_file(*options.data_file, (options.size + 511) & ~uint64_t{511}, "off");
    if (!data) {
      return fail(data.error().message());
    }
  }
  // The image file: created empty like file-posix's create, then written through a `file` node.
  Result<void> created = create_raw_file(filename, 0, "off");
  if (!created) {
    return fail(created.error().message());
  }
  {
    auto session = BlockSession::create();
    if (!session) {
      return fail(session.error().message());
    }
    ImageOpenRequest request;
    request.filename = filename;
    request.format = "file";
    request.read_only = false;
    auto opened = (*session)->open(request);
    if (!opened) {
      return fail(opened.error().message());
    }
    Result<void> perm = (*session)->add_perm(**opened, block::kPermResize);
    if (!perm) {
      return fail(perm.error().message());
    }
    Result<void> written = (*session)->loop().block_on(qcow2::write_image(**opened, *layout));
    if (!written) {
      return fail("Could not write qcow2 image: " + written.error().message());
    }
  }
  // falloc/full: the preallocated data clusters get real blocks too.
  if (options.preallocation == qcow2::Preallocation::kFalloc ||
      options.preallocation == qcow2::Preallocation::kFull) {
    int fd = ::open(filename.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) {
      return fail(Error::from_errno(errno, "Could not open '" + filename + "'").message());
    }
    std::vector<char> zeroes(options.preallocation == qcow2::Preallocation::kFull ? 1 << 20 : 0);
    Result<void> result;
    for (const auto& [offset, bytes] : layout->data_extents) {
      if (options.preallocation == qcow2::Preallocation::kFalloc) {
        int rc = ::posix_fallocate(fd, static_cast<off_t>(offset), static_cast<off_t>(bytes));
        if (rc != 0) {
          result = Error::from_errno(rc, "Could not preallocate data for the new file");
          break;
        }
        continue;
      }
      for (uint64_t done = 0; done < bytes && result.ok();) {
        size_t chunk = static_cast<size_t>(std::min<uint64_t>(zeroes.size(), bytes - done));
        ssize_t n = ::pwrite(fd, zeroes.data(), chunk, static_cast<off_t>(offset + done));
        if (n < 0) {
          result = Error::from_errno(errno, "Could not write zeros for preallocation");
        } else {
          done += static_cast<uint64_t>(n);
        }
      }
    }
    ::close(fd);
    if (!result) {
      return fail(result.error().message());
    }
  }
  return 0;
}

bool is_qcow2_create_option(const std::string& key) {
  static const char* const kQcow2Keys[] = {
      "size",          "compat",         "backing_file",   "backing_fmt",     "data_file",
      "data_file_raw", "encryption",     "encrypt.format", "cluster_size",    "extended_l2",
      "preallocation", "lazy_refcounts", "refcount_bits",  "compression_type"};
  return std::find(std::begin(kQcow2Keys), std::end(kQcow2Keys), key) != std::end(kQcow2Keys);
}

int create_main(int argc, char** argv) {
  enum { kOptObject = 256 };
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"object", required_argument, nullptr, kOptObject},
      {nullptr, 0, nullptr, 0},
  };
  std::string format = "raw";
  std::vector<std::string> option_strings;
  std::optional<std::string> backing_file;
  std::optional<std::string> backing_format;
  bool quiet = false;
  bool unsafe = false;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, ":F:b:f:ho:qu", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 'h':
        std::printf(
            "usage: strata img create [-f raw|qcow2] [-o OPTIONS] [-b BACKING [-F FMT]] [-u] "
            "[-q] FILENAME [SIZE]\n");
        return 0;
      case kOptObject:
        if (add_object(optarg) != 0) {
          return 1;
        }
        break;
      case 'f':
        format = optarg;
        break;
      case 'o':
        option_strings.emplace_back(optarg);
        break;
      case 'q':
        quiet = true;
        break;
      case 'b':
        backing_file = optarg;
        break;
      case 'F':
        backing_format = optarg;
        break;
      case 'u':
        unsafe = true;
        break;
      case ':':
        return missing_argument(argv[optind - 1]);
      default:
        return unrecognized_option(argv[optind - 1]);
    }
  }
  if (optind >= argc) {
    return error_exit("Expecting image file name");
  }
  std::string filename = argv[optind++];
  std::optional<uint64_t> size;
  if (optind < argc) {
    auto parsed = parse_size(argv[optind]);
    if (!parsed || *parsed > static_cast<uint64_t>(INT64_MAX)) {
      report(std::string("Invalid image size specified: '") + argv[optind] + "'.");
      return 1;
    }
    size = *parsed;
    ++optind;
  }
  if (optind < argc) {
    return error_exit(std::string("Unexpected argument: ") + argv[optind]);
  }
  if (format != "raw" && format != "qcow2") {
    report("Formatting '" + format + "' images is not supported by strata img yet");
    return 1;
  }
  auto items = split_options(option_strings);
  if (!items) {
    report(filename + ": " + items.error().message());
    return 1;
  }
  std::map<std::string, std::string> given;
  for (const auto& [key, value] : *items) {
    bool known = key == "size" || key == "preallocation";
    if (format == "qcow2") {
      known = is_qcow2_create_option(key);
    }
    if (!known) {
      report(filename + ": Invalid parameter '" + key + "'");
      return 1;
    }
    given[key] = value;
  }
  if (backing_file) {
    if (format == "raw") {
      report(filename + ": Backing file not supported for file format 'raw'");
      return 1;
    }
    given["backing_file"] = *backing_file;
  }
  if (backing_format) {
    given["backing_fmt"] = *backing_format;
  }
  if (auto it = given.find("size"); it != given.end()) {
    if (size) {
      report(filename + ": The image size must be specified only once");
      return 1;
    }
    auto parsed = parse_size(it->second);
    if (!parsed) {
      report(filename + ": Parameter 'size' expects a non-negative number below 2^64");
      return 1;
    }
    size = *parsed;
  }
  if (format == "qcow2") {
    std::map<std::string, std::string> qcow2_options = given;
    qcow2_options.erase("size");
    return create_qcow2(filename, qcow2_options, size, unsafe, quiet, "");
  }

  if (!size) {
    report(filename + ": Image creation needs a size parameter");
    return 1;
  }
  std::string preallocation = "off";
  auto prealloc = given.find("preallocation");
  if (prealloc != given.end()) {
    preallocation = prealloc->second;
  }
  if (!quiet) {
    std::printf("Formatting '%s', fmt=raw size=%" PRIu64 "%s\n", filename.c_str(), *size,
                prealloc != given.end() ? (" preallocation=" + preallocation).c_str() : "");
    std::fflush(stdout);
  }
  auto created = create_raw_file(filename, *size, preallocation);
  if (!created) {
    report(created.error().message());
    return 1;
  }
  return 0;
}

}  // namespace strata::cli::img
