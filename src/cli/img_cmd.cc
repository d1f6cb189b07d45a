// `strata img`: qemu-img's command line. This file: the dispatcher and info; map, compare,
// convert, create and check live in img_map.cc, img_compare.cc, img_convert.cc, img_create.cc
// and img_check.cc.

#include <fcntl.h>
#include <getopt.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "base/qemu_json.h"
#include "block/drivers/nbd/nbd_uri.h"
#include "block/info/image_info.h"
#include "block/io/request.h"
#include "cli/commands.h"
#include "cli/img_internal.h"

namespace strata::cli {

namespace img {

void report(const std::string& message) {
  std::fflush(stdout);
  std::fprintf(stderr, "%s: %s\n", kProgram, message.c_str());
}

int error_exit(const std::string& message) {
  report(message);
  std::fprintf(stderr, "Try 'strata img --help' for more information\n");
  return 1;
}

std::optional<OpenedImage> open_image_or_report(ImageOpenRequest request, const std::string& name,
                                                bool image_opts) {
  if (image_opts) {
    request.image_opts = name;
  } else {
    request.filename = name;
  }
  auto session = BlockSession::create();
  if (!session) {
    report(session.error().message());
    return std::nullopt;
  }
  auto opened = (*session)->open(request);
  if (!opened) {
    report("Could not open '" + name + "': " + opened.error().message());
    return std::nullopt;
  }
  return OpenedImage{std::move(session).value(), *opened};
}

aio::Task<Result<ChainStatus>> chain_status(block::Node& top, uint64_t offset, uint64_t bytes) {
  ChainStatus result;
  block::Node* node = &top;
  int depth = 0;
  for (;;) {
    while (node->is_filter() && node->primary_child() != nullptr) {
      node = node->primary_child()->node();
    }
    if (offset >= node->length()) {
      // A shorter backing file reads as zeroes past its end.
      result.bytes = bytes;
      result.zero = true;
      break;
    }
    Result<block::BlockStatus> status = co_await block::io::block_status(*node, offset, bytes);
    if (!status) {
      co_return std::move(status).error();
    }
    bytes = status->bytes;
    const uint32_t flags = status->flags;
    if ((flags & (block::BlockStatus::kData | block::BlockStatus::kZero)) != 0) {
      result.bytes = bytes;
      result.data = (flags & block::BlockStatus::kData) != 0;
      result.zero = (flags & block::BlockStatus::kZero) != 0;
      result.present = (flags & block::BlockStatus::kAllocated) != 0;
      result.compressed = (flags & block::BlockStatus::kCompressed) != 0;
      result.has_offset = (flags & block::BlockStatus::kOffsetValid) != 0;
      result.offset = status->map_offset;
      if (result.has_offset && status->file != nullptr) {
        result.filename = status->file->filename();
        result.file = status->file;
      }
      break;
    }
    block::Child* backing = node->backing_child();
    if (backing == nullptr) {
      // Unallocated in the whole chain: reads as zeroes, present nowhere.
      result.bytes = bytes;
      result.zero = true;
      break;
    }
    node = backing->node();
    ++depth;
  }
  result.depth = depth;
  co_return result;
}

Result<void> create_raw_file(const std::string& filename, uint64_t size,
                             const std::string& preallocation) {
  if (block::is_nbd_uri(filename)) {
    return create_on_nbd_export(filename, size, preallocation);
  }
  if (preallocation != "off" && preallocation != "falloc" && preallocation != "full") {
    return make_error(ErrorKind::kUnsupported,
                      filename + ": Unsupported preallocation mode: " + preallocation);
  }
  int fd = ::open(filename.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return Error::from_errno(errno, "Could not create '" + filename + "'");
  }
  Result<void> result;
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    result = Error::from_errno(errno, "Could not resize file");
  } else if (preallocation == "falloc") {
    int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(size));
    if (rc != 0) {
      result = Error::from_errno(rc, "Could not preallocate data for the new file");
    }
  } else if (preallocation == "full") {
    std::vector<char> zeroes(1 << 20, 0);
    for (uint64_t done = 0; done < size && result.ok();) {
      size_t chunk = static_cast<size_t>(std::min<uint64_t>(zeroes.size(), size - done));
      ssize_t n = ::pwrite(fd, zeroes.data(), chunk, static_cast<off_t>(done));
      if (n < 0) {
        result = Error::from_errno(errno, "Could not write zeros for preallocation");
      } else {
        done += static_cast<uint64_t>(n);
      }
    }
  } else if (size > 0) {
    // file-posix allocates the first block so that later alignment probing finds it.
    std::vector<char> zeroes(static_cast<size_t>(std::min<uint64_t>(size, 4096)), 0);
    if (::pwrite(fd, zeroes.data(), zeroes.size(), 0) < 0) {
      result = Error::from_errno(errno, "Could not allocate the first block");
    }
  }
  if (::close(fd) != 0 && result.ok()) {
    result = Error::from_errno(errno, "Could not close the new file");
  }
  return result;
}

namespace {

enum { kOptOutput = 256, kOptBackingChain, kOptImageOpts, kOptObject };

// BlockGraphInfo: ImageInfo plus every non-backing child, recursively (qemu-img info opens
// without backing files, so the backing chain is not a child here).
nlohmann::json graph_info(const block::Node& node) {
  nlohmann::json info = block::image_info(node, /*flat=*/true);
  nlohmann::json children = nlohmann::json::array();
  const block::Child* backing = node.backing_child();
  for (const auto& child : node.children()) {
    if (child.get() == backing) {
      continue;
    }
    children.push_back({{"name", child->name()}, {"info", graph_info(*child->node())}});
  }
  info["children"] = children;
  return info;
}

// qemu-img's bdrv_node_info_dump + dump_human_image_info.
void dump_human(const nlohmann::json& info, int indentation, const std::string& path) {
  const bool protocol = info["children"].empty();
  std::string ind(static_cast<size_t>(indentation * 4), ' ');
  uint64_t virtual_size = info["virtual-size"].get<uint64_t>();
  std::string disk_size = info.contains("actual-size")
                              ? size_to_str(info["actual-size"].get<uint64_t>())
                              : std::string("unavailable");
  std::printf("%s%s: %s\n", ind.c_str(), protocol ? "filename" : "image",
              info["filename"].get<std::string>().c_str());
  std::printf("%s%s: %s\n", ind.c_str(), protocol ? "protocol type" : "file format",
              info["format"].get<std::string>().c_str());
  std::printf("%s%s: %s (%" PRIu64 " bytes)\n", ind.c_str(),
              protocol ? "file length" : "virtual size", size_to_str(virtual_size).c_str(),
              virtual_size);
  std::printf("%sdisk size: %s\n", ind.c_str(), disk_size.c_str());
  if (info.value("encrypted", false)) {
    std::printf("%sencrypted: yes\n", ind.c_str());
  }
  if (info.contains("cluster-size")) {
    std::printf("%scluster_size: %" PRIu64 "\n", ind.c_str(), info["cluster-size"].get<uint64_t>());
  }
  if (info.value("dirty-flag", false)) {
    std::printf("%scleanly shut down: no\n", ind.c_str());
  }
  if (info.contains("backing-filename")) {
    std::string backing = info["backing-filename"].get<std::string>();
    std::printf("%sbacking file: %s", ind.c_str(), backing.c_str());
    if (!info.contains("full-backing-filename")) {
      std::printf(" (cannot determine actual path)");
    } else if (info["full-backing-filename"].get<std::string>() != backing) {
      std::printf(" (actual path: %s)", info["full-backing-filename"].get<std::string>().c_str());
    }
    std::printf("\n");
    if (info.contains("backing-filename-format")) {
      std::printf("%sbacking file format: %s\n", ind.c_str(),
                  info["backing-filename-format"].get<std::string>().c_str());
    }
  }
  if (info.contains("snapshots")) {
    std::printf("%sSnapshot list:\n", ind.c_str());
    std::printf("%s%s\n", ind.c_str(), snapshot_dump_header().c_str());
    for (const auto& entry : info["snapshots"]) {
      block::Node::SnapshotInfo snapshot;
      snapshot.id = entry["id"].get<std::string>();
      snapshot.name = entry["name"].get<std::string>();
      snapshot.vm_state_size = entry["vm-state-size"].get<uint64_t>();
      snapshot.date_sec = entry["date-sec"].get<uint32_t>();
      snapshot.date_nsec = entry["date-nsec"].get<uint32_t>();
      snapshot.vm_clock_nsec = entry["vm-clock-sec"].get<uint64_t>() * 1000000000 +
                               entry["vm-clock-nsec"].get<uint64_t>();
      if (entry.contains("icount")) {
        snapshot.icount = entry["icount"].get<uint64_t>();
      }
      std::printf("%s%s\n", ind.c_str(), snapshot_dump(snapshot).c_str());
    }
  }
  if (info.contains("format-specific")) {
    const nlohmann::json& data = info["format-specific"]["data"];
    if (data.is_object() && !data.empty()) {
      std::printf("%sFormat specific information:\n", ind.c_str());
      std::fputs(qemu_dump_object(data, indentation + 1).c_str(), stdout);
    }
  }
  for (const auto& child : info["children"]) {
    std::string name = child["name"].get<std::string>();
    std::printf("%sChild node '%s%s':\n", ind.c_str(), path.c_str(), name.c_str());
    dump_human(child["info"], indentation + 1, path + name + "/");
  }
}

}  // namespace

int info_main(int argc, char** argv) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"format", required_argument, nullptr, 'f'},
      {"output", required_argument, nullptr, kOptOutput},
      {"backing-chain", no_argument, nullptr, kOptBackingChain},
      {"image-opts", no_argument, nullptr, kOptImageOpts},
      {"object", required_argument, nullptr, kOptObject},
      {"force-share", no_argument, nullptr, 'U'},
      {nullptr, 0, nullptr, 0},
  };
  ImageOpenRequest request;
  request.no_io = true;
  std::string output = "human";
  bool chain = false;
  bool image_opts = false;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, ":f:hU", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 'h':
        std::printf(
            "usage: strata img info [-f FMT] [--output=human|json] [--backing-chain] "
            "[-U] [--image-opts] FILENAME\n");
        return 0;
      case 'f':
        request.format = optarg;
        break;
      case 'U':
        request.force_share = true;
        break;
      case kOptOutput:
        output = optarg;
        break;
      case kOptBackingChain:
        chain = true;
        break;
      case kOptObject:
        if (add_object(optarg) != 0) {
          return 1;
        }
        break;
      case kOptImageOpts:
        image_opts = true;
        break;
      case ':':
        return error_exit(std::string("argument --") + " requires a value");
      default:
        return unrecognized_option(argv[optind - 1]);
    }
  }
  if (optind != argc - 1) {
    return error_exit("Expecting one image file name");
  }
  if (output != "human" && output != "json") {
    return error_exit("--output must be used with human or json as argument.");
  }
  std::string filename = argv[optind];
  auto image = open_image_or_report(request, filename, image_opts);
  if (!image) {
    return 1;
  }
  block::Node* opened_node = image->node;
  std::vector<nlohmann::json> infos;
  for (const block::Node* node = opened_node; node != nullptr;) {
    infos.push_back(graph_info(*node));
    if (!chain) {
      break;
    }
    const block::Child* backing = node->backing_child();
    node = backing != nullptr ? backing->node() : nullptr;
  }
  if (output == "json") {
    nlohmann::json value = chain ? nlohmann::json(infos) : infos.front();
    std::printf("%s\n", qemu_json(value, /*pretty=*/true).c_str());
  } else {
    for (size_t i = 0; i < infos.size(); ++i) {
      if (i > 0) {
        std::printf("\n");
      }
      dump_human(infos[i], 0, "/");
    }
  }
  return 0;
}

}  // namespace img

namespace {

constexpr const char kImgUsage[] =
    "usage: strata img <command> [options]\n"
    "\n"
    "qemu-img's syntax on strata's block layer. Commands:\n"
    "  info     [-f FMT] [--output=human|json] [--backing-chain] [-U] [--image-opts] FILE\n"
    "  map      [-f FMT] [--output=human|json] [-U] [--image-opts] [--start-offset=OFF]\n"
    "           [--max-length=LEN] FILE\n"
    "  compare  [-f FMT] [-F FMT] [-s] [-q] [-U] FILE1 FILE2\n"
    "  convert  [-f FMT] [-O raw|qcow2] [-o OPTIONS] [-c] [-B BACKING [-F FMT]] [-n]\n"
    "           [--target-is-zero] [-S SIZE] [-p] [-q] [-m N] [-W] [-t CACHE] [-T CACHE]\n"
    "           [-U] [--image-opts] SRC DST\n"
    "  measure  [--output=human|json] [-O raw|qcow2] [-o OPTIONS]\n"
    "           [--size N | [-f FMT] [-U] [--image-opts] FILE]\n"
    "  create   [-f raw|qcow2] [-o OPTIONS] [-b BACKING [-F FMT]] [-u] [-q] FILE [SIZE]\n"
    "  check    [-f FMT] [--output=human|json] [-q] [-U] [--image-opts] FILE\n"
    "  bitmap   (--add [-g SIZE] | --remove | --clear | --enable | --disable |\n"
    "           --merge SOURCE [-b SRC_FILE [-F SRC_FMT]])... [-f FMT] [--image-opts] FILE BITMAP\n"
    "  rebase   [-f FMT] [-F BACKING_FMT] (-b BACKING | -u [-b BACKING]) [-p] [-q] [-U] FILE\n"
    "  commit   [-f FMT] [-b BASE] [-d] [-p] [-q] FILE\n"
    "  amend    [-f FMT] [-p] [-q] [--image-opts] -o compat=..,lazy_refcounts=.. FILE\n"
    "  bench    [-f FMT] [-t CACHE] [-c COUNT] [-d DEPTH] [-o OFFSET] [-s BUFFER_SIZE]\n"
    "           [-S STEP_SIZE] [-i AIO] [-n] [-U] [-q] [-w [--pattern PATTERN]\n"
    "           [--flush-interval INTERVAL [--no-drain]]] FILE\n"
    "  snapshot [-f FMT] [-U] [-q] [--image-opts] [-l | -a NAME | -c NAME | -d NAME] FILE\n"
    "  resize   [-f FMT] [--shrink] [--preallocation=off] [-q] [--image-opts] FILE [+|-]SIZE\n"
    "\n"
    "See docs/img.md for what is supported.\n";

}  // namespace

int img_main(int argc, char** argv) {
  if (argc < 2) {
    std::fputs(kImgUsage, stderr);
    return 1;
  }
  std::string_view command = argv[1];
  if (command == "--help" || command == "-h" || command == "help") {
    std::fputs(kImgUsage, stdout);
    return 0;
  }
  struct Entry {
    const char* name;
    int (*main)(int, char**);
  };
  static const Entry kEntries[] = {
      {"info", img::info_main},       {"map", img::map_main},
      {"compare", img::compare_main}, {"convert", img::convert_main},
      {"create", img::create_main},   {"check", img::check_main},
      {"bitmap", img::bitmap_main},   {"rebase", img::rebase_main},
      {"commit", img::commit_main},   {"amend", img::amend_main},
      {"bench", img::bench_main},     {"snapshot", img::snapshot_main},
      {"resize", img::resize_main},   {"measure", img::measure_main},
  };
  for (const auto& entry : kEntries) {
    if (command == entry.name) {
      return entry.main(argc - 1, argv + 1);
    }
  }
  return img::error_exit("Command not found: " + std::string(command));
}

}  // namespace strata::cli
