// `strata vmstate`: describe and check a saved migration stream (docs/migration-format.md).
//
//   strata vmstate info [--output=human|json] [--offset=N] FILE
//   strata vmstate verify [--offset=N] [-q] FILE
//
// Exit status: 0 the stream is valid; 1 it could not be read (usage, open or I/O error); 2 it is
// not a valid stream (damaged, truncated, not a strata stream).
//
// Two test and benchmark modes, left out of the help: `save-test` saves RAM blocks of generated
// data (memfd memory, as a memory-backend-memfd) to FILE; `load-test` restores FILE into such
// blocks and, with --check, compares them with the data save-test generated from the same
// --blocks/--seed/--zero-every. Both print a JSON object with the time taken.

#include <getopt.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/arg_decoder.h"
#include "cli/commands.h"
#include "migration/vmstate_file.h"

namespace strata::cli {

namespace {

namespace mig = strata::migration;

constexpr int kExitInvalid = 2;

void report(const std::string& message) {
  std::fprintf(stderr, "strata vmstate: %s\n", message.c_str());
}

void usage(FILE* out) {
  std::fprintf(
      out,
      "usage: strata vmstate info [--output=human|json] [--offset=N] FILE\n"
      "       strata vmstate verify [--offset=N] [-q] FILE\n"
      "\n"
      "info    print the header, capabilities, RAM blocks and sections of a saved\n"
      "        migration stream (checks every structure and checksum on the way)\n"
      "verify  check every structure and checksum, and read every stored page;\n"
      "        exit 0 when the stream is valid, 2 when it is not, 1 when it cannot be read\n"
      "--offset=N  the stream starts at byte N of FILE (migrate's file:PATH,offset=N)\n");
}

std::string capabilities_text(const mig::FileHeader& header) {
  return header.mapped_ram() ? "mapped-ram" : "none (streaming)";
}

std::string writer_text(const mig::FileHeader& header) {
  std::string text;
  if ((header.writer_flags & mig::kWrittenWithMultifd) != 0) {
    text = "multifd (" + std::to_string(header.multifd_channels) + " channels)";
  } else {
    text = "main channel only";
  }
  if ((header.writer_flags & mig::kWrittenWithDirectIo) != 0) {
    text += ", direct-io";
  }
  return text;
}

nlohmann::json description_json(const std::string& path, const mig::FileDescription& d) {
  nlohmann::json blocks = nlohmann::json::array();
  for (const mig::BlockRecord& block : d.blocks) {
    nlohmann::json entry = {{"name", block.name},
                            {"length", block.length},
                            {"page-size", block.page_size},
                            {"pages", block.page_count()},
                            {"present-pages", block.present_pages}};
    if (d.header.mapped_ram()) {
      entry["bitmap-offset"] = block.bitmap_offset;
      entry["bitmap-size"] = block.bitmap_size;
      entry["pages-offset"] = block.pages_offset;
    }
    blocks.push_back(entry);
  }
  nlohmann::json sections = nlohmann::json::array();
  for (const mig::SectionSummary& section : d.sections) {
    nlohmann::json entry = {{"type", mig::section_type_name(section.type)},
                            {"type-id", section.type},
                            {"length", section.length}};
    if (d.header.mapped_ram()) {
      entry["offset"] = section.offset;
    }
    sections.push_back(entry);
  }
  nlohmann::json capabilities = nlohmann::json::array();
  if (d.header.mapped_ram()) {
    capabilities.push_back("mapped-ram");
  }
  nlohmann::json json = {{"filename", path},
                         {"format-version", d.header.version},
                         {"capabilities", capabilities},
                         {"page-size", d.header.page_size},
                         {"ram-total", d.header.ram_total},
                         {"offset", d.header.base_offset},
                         {"file-size", d.file_size},
                         {"multifd", (d.header.writer_flags & mig::kWrittenWithMultifd) != 0},
                         {"multifd-channels", d.header.multifd_channels},
                         {"direct-io", (d.header.writer_flags & mig::kWrittenWithDirectIo) != 0},
                         {"blocks", blocks}};
  if (d.header.mapped_ram()) {
    json["trailer-offset"] = d.header.trailer_offset;
    json["end-offset"] = d.header.end_offset;
  }
  json["sections"] = sections;
  return json;
}

void print_human(const std::string& path, const mig::FileDescription& d) {
  uint64_t present = 0;
  uint64_t pages = 0;
  for (const mig::BlockRecord& block : d.blocks) {
    present += block.present_pages;
    pages += block.page_count();
  }
  std::printf("file: %s\n", path.c_str());
  std::printf("format version: %u\n", d.header.version);
  std::printf("capabilities: %s\n", capabilities_text(d.header).c_str());
  std::printf("written with: %s\n", writer_text(d.header).c_str());
  std::printf("offset: %" PRIu64 "\n", d.header.base_offset);
  std::printf("page size: %u\n", d.header.page_size);
  std::printf("RAM: %" PRIu64 " bytes in %zu blocks, %" PRIu64 " of %" PRIu64
              " pages present (the rest are zero)\n",
              d.header.ram_total, d.blocks.size(), present, pages);
  std::printf("file size: %" PRIu64 "\n", d.file_size);
  std::printf("blocks:\n");
  for (const mig::BlockRecord& block : d.blocks) {
    std::printf("  %s: length %" PRIu64 ", %" PRIu64 " of %" PRIu64 " pages present",
                block.name.c_str(), block.length, block.present_pages, block.page_count());
    if (d.header.mapped_ram()) {
      std::printf(", bitmap at 0x%" PRIx64 ", pages at 0x%" PRIx64, block.bitmap_offset,
                  block.pages_offset);
    }
    std::printf("\n");
  }
  if (d.header.mapped_ram()) {
    std::printf("sections:\n");
    for (const mig::SectionSummary& section : d.sections) {
      std::printf("  %s at 0x%" PRIx64 ", %" PRIu64 " bytes\n",
                  mig::section_type_name(section.type), section.offset, section.length);
    }
  } else {
    size_t page_sections = static_cast<size_t>(std::count_if(
        d.sections.begin(), d.sections.end(),
        [](const mig::SectionSummary& s) { return s.type == mig::kSectionRamPages; }));
    std::printf("sections: %zu (%zu ram-pages)\n", d.sections.size(), page_sections);
  }
}

int exit_code_for(const Error& error) {
  return error.kind() == ErrorKind::kCorrupt ? kExitInvalid : 1;
}

// Options shared by every mode.
struct Options {
  std::string output = "human";
  uint64_t offset = 0;
  bool quiet = false;
  // save-test / load-test
  std::string blocks = "pc.ram:64M";
  uint64_t seed = 1;
  uint64_t zero_every = 0;
  bool mapped_ram = true;
  unsigned channels = 0;
  bool direct_io = false;
  bool check = false;
  std::string file;
};

enum {
  kOptOutput = 256,
  kOptOffset,
  kOptBlocks,
  kOptSeed,
  kOptZeroEvery,
  kOptNoMappedRam,
  kOptChannels,
  kOptDirectIo,
  kOptCheck,
};

bool parse_options(int argc, char** argv, Options& options) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"output", required_argument, nullptr, kOptOutput},
      {"offset", required_argument, nullptr, kOptOffset},
      {"quiet", no_argument, nullptr, 'q'},
      {"blocks", required_argument, nullptr, kOptBlocks},
      {"seed", required_argument, nullptr, kOptSeed},
      {"zero-every", required_argument, nullptr, kOptZeroEvery},
      {"no-mapped-ram", no_argument, nullptr, kOptNoMappedRam},
      {"channels", required_argument, nullptr, kOptChannels},
      {"direct-io", no_argument, nullptr, kOptDirectIo},
      {"check", no_argument, nullptr, kOptCheck},
      {nullptr, 0, nullptr, 0},
  };
  auto number = [](const char* text, const char* what, uint64_t& value) {
    auto parsed = parse_size(text);
    if (!parsed) {
      report(std::string("invalid ") + what + " '" + text + "'");
      return false;
    }
    value = *parsed;
    return true;
  };
  optind = 1;
  int c;
  uint64_t value = 0;
  while ((c = getopt_long(argc, argv, ":hq", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 'h':
        usage(stdout);
        std::exit(0);
      case 'q':
        options.quiet = true;
        break;
      case kOptOutput:
        options.output = optarg;
        if (options.output != "human" && options.output != "json") {
          report("--output must be used with human or json as argument.");
          return false;
        }
        break;
      case kOptOffset:
        if (!number(optarg, "offset", options.offset)) {
          return false;
        }
        break;
      case kOptBlocks:
        options.blocks = optarg;
        break;
      case kOptSeed:
        if (!number(optarg, "seed", options.seed)) {
          return false;
        }
        break;
      case kOptZeroEvery:
        if (!number(optarg, "zero-every", options.zero_every)) {
          return false;
        }
        break;
      case kOptNoMappedRam:
        options.mapped_ram = false;
        break;
      case kOptChannels:
        if (!number(optarg, "channel count", value) || value > 255) {
          return false;
        }
        options.channels = static_cast<unsigned>(value);
        break;
      case kOptDirectIo:
        options.direct_io = true;
        break;
      case kOptCheck:
        options.check = true;
        break;
      case ':':
        report(std::string("option '") + argv[optind - 1] + "' needs an argument");
        return false;
      default:
        report(std::string("unknown option '") + argv[optind - 1] + "'");
        return false;
    }
  }
  if (optind != argc - 1) {
    report(optind >= argc ? "Expecting one file name" : "Expecting only one file name");
    return false;
  }
  options.file = argv[optind];
  return true;
}

int info_main(const Options& options) {
  auto description = mig::describe_file(options.file, options.offset, false);
  if (!description.ok()) {
    report(options.file + ": " + description.error().message());
    return exit_code_for(description.error());
  }
  if (options.output == "json") {
    std::printf("%s\n", description_json(options.file, *description).dump(4).c_str());
  } else {
    print_human(options.file, *description);
  }
  return 0;
}

int verify_main(const Options& options) {
  auto description = mig::describe_file(options.file, options.offset, true);
  if (!description.ok()) {
    report(options.file + ": " + description.error().message());
    return exit_code_for(description.error());
  }
  if (!options.quiet) {
    uint64_t present = 0;
    for (const mig::BlockRecord& block : description->blocks) {
      present += block.present_pages;
    }
    std::printf("No errors were found in %s (%s, %zu RAM blocks, %" PRIu64 " bytes of RAM, %" PRIu64
                " pages stored).\n",
                options.file.c_str(), capabilities_text(description->header).c_str(),
                description->blocks.size(), description->header.ram_total, present);
  }
  return 0;
}

// ---- save-test / load-test ----

// RAM blocks in memfd memory (as a memory-backend-memfd), unmapped on destruction.
class TestGuest {
 public:
  ~TestGuest() {
    for (const mig::RamBlock& block : blocks_) {
      ::munmap(block.host, block.length);
    }
  }
  bool add(const std::string& name, uint64_t length) {
    int fd = ::memfd_create(name.c_str(), MFD_CLOEXEC);
    if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(length)) != 0) {
      report("memfd: " + std::string(std::strerror(errno)));
      if (fd >= 0) {
        ::close(fd);
      }
      return false;
    }
    // Populated up front, like a memory-backend with prealloc=on: the timed save or restore
    // does not pay for allocating the memory.
    void* host = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    ::close(fd);
    if (host == MAP_FAILED) {
      report("mmap: " + std::string(std::strerror(errno)));
      return false;
    }
    blocks_.push_back(mig::RamBlock{name, static_cast<uint8_t*>(host), length, 4096});
    return true;
  }
  std::vector<mig::RamBlock>& blocks() { return blocks_; }

 private:
  std::vector<mig::RamBlock> blocks_;
};

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The page save-test stores at (block, page): zero for one page in `zero_every` (none when 0),
// else pseudo-random words.
void generate_page(uint8_t* page, uint32_t page_size, uint64_t seed, size_t block, uint64_t index,
                   uint64_t zero_every) {
  uint64_t state = mix(seed ^ mix(block * 0x10000000000ull + index));
  if (zero_every != 0 && state % zero_every == 0) {
    std::memset(page, 0, page_size);
    return;
  }
  for (uint32_t i = 0; i < page_size; i += 8) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    std::memcpy(page + i, &state, 8);
  }
}

// Runs fn(block, first_page, end_page) over all pages on every core.
template <typename Fn>
void for_pages_in_parallel(const std::vector<mig::RamBlock>& blocks, Fn&& fn) {
  unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      for (size_t b = 0; b < blocks.size(); ++b) {
        uint64_t pages = blocks[b].length / blocks[b].page_size;
        fn(b, pages * t / threads, pages * (t + 1) / threads);
      }
    });
  }
  for (std::thread& worker : workers) {
    worker.join();
  }
}

bool build_guest(const Options& options, TestGuest& guest) {
  std::string spec = options.blocks;
  size_t start = 0;
  while (start <= spec.size()) {
    size_t comma = spec.find(',', start);
    std::string item = spec.substr(start, comma == std::string::npos ? comma : comma - start);
    size_t colon = item.rfind(':');
    auto length = colon == std::string::npos ? std::nullopt : parse_size(item.substr(colon + 1));
    if (!length || *length == 0 || *length % 4096 != 0) {
      report("--blocks wants NAME:SIZE[,NAME:SIZE...] with sizes in whole 4 KiB pages, not '" +
             item + "'");
      return false;
    }
    if (!guest.add(item.substr(0, colon), *length)) {
      return false;
    }
    if (comma == std::string::npos) {
      break;
    }
    start = comma + 1;
  }
  return true;
}

mig::TransferOptions transfer_options(const Options& options) {
  mig::TransferOptions transfer;
  transfer.mapped_ram = options.mapped_ram;
  transfer.multifd_channels = options.channels;
  transfer.direct_io = options.direct_io;
  transfer.offset = options.offset;
  return transfer;
}

void print_stats(const mig::TransferStats& stats, double seconds, const char* extra_key,
                 bool extra_value) {
  nlohmann::json json = {{"seconds", seconds},
                         {"ram-total", stats.ram_total},
                         {"pages", stats.pages_total},
                         {"pages-present", stats.pages_present},
                         {"bytes", stats.bytes_io},
                         {"file-size", stats.file_size},
                         {"mb-per-second", static_cast<double>(stats.ram_total) / 1e6 / seconds}};
  if (extra_key != nullptr) {
    json[extra_key] = extra_value;
  }
  std::printf("%s\n", json.dump().c_str());
}

int save_test_main(const Options& options) {
  TestGuest guest;
  if (!build_guest(options, guest)) {
    return 1;
  }
  for_pages_in_parallel(guest.blocks(), [&](size_t b, uint64_t first, uint64_t end) {
    const mig::RamBlock& block = guest.blocks()[b];
    for (uint64_t page = first; page < end; ++page) {
      generate_page(block.host + page * block.page_size, block.page_size, options.seed, b, page,
                    options.zero_every);
    }
  });
  auto begin = std::chrono::steady_clock::now();
  auto saved = mig::save_to_file(guest.blocks(), options.file, transfer_options(options));
  std::chrono::duration<double> took = std::chrono::steady_clock::now() - begin;
  if (!saved.ok()) {
    report(saved.error().message());
    return 1;
  }
  print_stats(*saved, took.count(), nullptr, false);
  return 0;
}

int load_test_main(const Options& options) {
  TestGuest guest;
  if (!build_guest(options, guest)) {
    return 1;
  }
  auto begin = std::chrono::steady_clock::now();
  auto loaded = mig::load_from_file(guest.blocks(), options.file, transfer_options(options));
  std::chrono::duration<double> took = std::chrono::steady_clock::now() - begin;
  if (!loaded.ok()) {
    report(loaded.error().message());
    return exit_code_for(loaded.error());
  }
  bool matches = true;
  if (options.check) {
    std::atomic<bool> all_equal{true};
    for_pages_in_parallel(guest.blocks(), [&](size_t b, uint64_t first, uint64_t end) {
      const mig::RamBlock& block = guest.blocks()[b];
      std::vector<uint8_t> expected(block.page_size);
      for (uint64_t page = first; page < end && all_equal; ++page) {
        generate_page(expected.data(), block.page_size, options.seed, b, page, options.zero_every);
        if (std::memcmp(expected.data(), block.host + page * block.page_size, block.page_size) !=
            0) {
          all_equal = false;
        }
      }
    });
    matches = all_equal;
  }
  print_stats(*loaded, took.count(), options.check ? "matches" : nullptr, matches);
  return matches ? 0 : 3;
}

}  // namespace

int vmstate_main(int argc, char** argv) {
  if (argc < 2) {
    usage(stderr);
    return 1;
  }
  std::string mode = argv[1];
  if (mode == "--help" || mode == "-h" || mode == "help") {
    usage(stdout);
    return 0;
  }
  Options options;
  if (!parse_options(argc - 1, argv + 1, options)) {
    return 1;
  }
  if (mode == "info") {
    return info_main(options);
  }
  if (mode == "verify") {
    return verify_main(options);
  }
  if (mode == "save-test") {
    return save_test_main(options);
  }
  if (mode == "load-test") {
    return load_test_main(options);
  }
  report("unknown command '" + mode + "' (info or verify)");
  usage(stderr);
  return 1;
}

}  // namespace strata::cli
