#include "cli/io_commands.h"

#include <time.h>

#include <cctype>
#include <cerrno>
#include <cinttypes>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "block/io/request.h"

namespace strata::cli {

namespace {

// BDRV_REQUEST_MAX_BYTES: the largest request qemu-io issues.
constexpr int64_t kRequestMaxBytes = 0x7ffffe00;

struct CommandInfo {
  const char* name;
  const char* altname;
  int argmin;
  int argmax;  // -1: unlimited
  uint64_t perm;
  const char* args;
  const char* oneline;
};

constexpr CommandInfo kCommands[] = {
    {"aio_flush", nullptr, 0, 0, 0, "", "completes all outstanding aio requests"},
    {"aio_read", nullptr, 2, -1, 0, "[-Cqv] [-P pattern] off len [len..]",
     "asynchronously reads a number of bytes"},
    {"aio_write", nullptr, 2, -1, block::kPermWrite, "[-Cfquz] [-P pattern] off len [len..]",
     "asynchronously writes a number of bytes"},
    {"discard", nullptr, 2, -1, block::kPermWrite, "[-Cq] off len",
     "discards a number of bytes at a specified offset"},
    {"flush", nullptr, 0, 0, 0, "", "flush all in-core file state to disk"},
    {"length", nullptr, 0, 0, 0, "", "gets the length of the current file"},
    {"map", nullptr, 0, 0, 0, "", "prints the allocated areas of a file"},
    {"quit", "q", 0, 0, 0, "", "exit the program"},
    {"read", "r", 2, -1, 0, "[-Cqv] [-P pattern [-s off] [-l len]] off len",
     "reads a number of bytes at a specified offset"},
    {"readv", nullptr, 2, -1, 0, "[-Cqv] [-P pattern] off len [len..]",
     "reads a number of bytes at a specified offset"},
    {"sigraise", nullptr, 1, 1, 0, "signal", "raises a signal"},
    {"truncate", nullptr, 1, 3, block::kPermResize, "[-m prealloc_mode] off",
     "truncates the current file at the given offset"},
    {"write", "w", 2, -1, block::kPermWrite, "[-Cfquz] [-P pattern] off len",
     "writes a number of bytes at a specified offset"},
    {"writev", nullptr, 2, -1, block::kPermWrite, "[-Cfq] [-P pattern] off len [len..]",
     "writes a number of bytes at a specified offset"},
};

const CommandInfo* find_command(std::string_view name) {
  for (const auto& command : kCommands) {
    if (name == command.name || (command.altname != nullptr && name == command.altname)) {
      return &command;
    }
  }
  return nullptr;
}

int command_usage(const CommandInfo& command) {
  std::printf("%s %s -- %s\n", command.name, command.args, command.oneline);
  return -EINVAL;
}

// qemu-io's cvtnum: a byte count with optional suffix, or -EINVAL/-ERANGE.
int64_t cvtnum(const std::string& text) {
  auto value = parse_size(text);
  if (!value) {
    return value.error().errno_value() == ERANGE ? -ERANGE : -EINVAL;
  }
  if (*value > static_cast<uint64_t>(INT64_MAX)) {
    return -ERANGE;
  }
  return static_cast<int64_t>(*value);
}

void print_cvtnum_err(int64_t rc, const std::string& arg) {
  if (rc == -EINVAL) {
    std::printf("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- %s\n",
                arg.c_str());
  } else if (rc == -ERANGE) {
    std::printf("Parsing error: argument too large -- %s\n", arg.c_str());
  } else {
    std::printf("Parsing error: %s\n", arg.c_str());
  }
}

// The "offset length" operands most commands take, checked as qemu-io does (negative or
// unparsable numbers, lengths above the request limit); `error` is the command's return value
// when they are not acceptable.
struct OffsetAndLength {
  int error = 0;
  int64_t offset = 0;
  int64_t length = 0;
};

OffsetAndLength parse_offset_and_length(const std::vector<std::string>& operands) {
  OffsetAndLength range;
  range.offset = cvtnum(operands[0]);
  if (range.offset < 0) {
    print_cvtnum_err(range.offset, operands[0]);
    range.error = static_cast<int>(range.offset);
    return range;
  }
  range.length = cvtnum(operands[1]);
  if (range.length < 0) {
    print_cvtnum_err(range.length, operands[1]);
    range.error = static_cast<int>(range.length);
    return range;
  }
  if (range.length > kRequestMaxBytes) {
    std::printf("length cannot exceed %" PRIu64 ", given %s\n",
                static_cast<uint64_t>(kRequestMaxBytes), operands[1].c_str());
    range.error = -EINVAL;
  }
  return range;
}

int parse_pattern(const std::string& arg) {
  char* end = nullptr;
  long pattern = std::strtol(arg.c_str(), &end, 0);
  if (pattern < 0 || pattern > 0xff || *end != '\0' || end == arg.c_str()) {
    std::printf("%s is not a valid pattern byte\n", arg.c_str());
    return -1;
  }
  return static_cast<int>(pattern);
}

// qemu-io's cvtstr: "512 bytes", "4 KiB", "174.875 KiB".
std::string cvtstr(double value) {
  struct Unit {
    double size;
    const char* suffix;
  };
  static const Unit kUnits[] = {{0x1p60, " EiB"}, {0x1p50, " PiB"}, {0x1p40, " TiB"},
                                {0x1p30, " GiB"}, {0x1p20, " MiB"}, {0x1p10, " KiB"}};
  char text[64];
  const char* suffix = " bytes";
  bool done = false;
  for (const auto& unit : kUnits) {
    if (value >= unit.size) {
      std::snprintf(text, sizeof(text) - 4, "%.3f", value / unit.size);
      suffix = unit.suffix;
      done = true;
      break;
    }
  }
  if (!done) {
    std::snprintf(text, sizeof(text) - 6, "%f", value);
  }
  std::string out = text;
  size_t trim = out.find(".000");
  if (trim != std::string::npos) {
    out.resize(trim);
  }
  return out + suffix;
}

double seconds(const timespec& t) {
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) / 1e9;
}

timespec now() {
  timespec t{};
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t;
}

timespec elapsed_since(const timespec& start) {
  timespec end = now();
  timespec diff{end.tv_sec - start.tv_sec, end.tv_nsec - start.tv_nsec};
  if (diff.tv_nsec < 0) {
    diff.tv_nsec += 1000000000;
    diff.tv_sec--;
  }
  return diff;
}

std::string timestr(const timespec& t, bool verbose) {
  char text[64];
  double fraction = static_cast<double>(t.tv_nsec) / 1e9;
  auto secs = static_cast<unsigned>(t.tv_sec);
  if (verbose || t.tv_sec != 0) {
    std::snprintf(text, sizeof(text), "%u:%02u:%05.2f", secs / 3600, (secs % 3600) / 60,
                  static_cast<double>(secs % 60) + fraction);
  } else {
    std::snprintf(text, sizeof(text), "%05.2f sec", fraction);
  }
  return text;
}

double per_second(double value, const timespec& t) {
  double s = seconds(t);
  return s > 0 ? value / s : value / 1e-9;
}

void print_report(const char* op, const timespec& t, int64_t offset, int64_t count, int64_t total,
                  int ops, bool terse) {
  std::string ts = timestr(t, terse);
  if (!terse) {
    std::printf("%s %" PRId64 "/%" PRId64 " bytes at offset %" PRId64 "\n", op, total, count,
                offset);
    std::printf("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n",
                cvtstr(static_cast<double>(total)).c_str(), ops, ts.c_str(),
                cvtstr(per_second(static_cast<double>(total), t)).c_str(),
                per_second(static_cast<double>(ops), t));
  } else {
    std::printf("%" PRId64 ",%d,%s,%.3f,%.3f\n", total, ops, ts.c_str(),
                per_second(static_cast<double>(total), t), per_second(static_cast<double>(ops), t));
  }
}

void dump_buffer(const uint8_t* buffer, int64_t offset, int64_t length) {
  for (int64_t i = 0; i < length; i += 16) {
    std::printf("%08" PRIx64 ":  ", static_cast<uint64_t>(offset + i));
    for (int64_t j = 0; j < 16 && i + j < length; ++j) {
      std::printf("%02x ", buffer[i + j]);
    }
    std::printf(" ");
    for (int64_t j = 0; j < 16 && i + j < length; ++j) {
      int c = buffer[i + j];
      std::printf("%c", std::isalnum(c) != 0 ? c : '.');
    }
    std::printf("\n");
  }
}

bool all_bytes(const uint8_t* buffer, size_t length, uint8_t value) {
  for (size_t i = 0; i < length; ++i) {
    if (buffer[i] != value) {
      return false;
    }
  }
  return true;
}

}  // namespace

// One command's arguments after getopt (glibc style: options may follow operands).
struct IoShell::Args {
  const CommandInfo* info = nullptr;
  std::vector<std::string> argv;  // argv[0] is the command name
  std::vector<std::pair<char, std::string>> options;
  std::vector<std::string> operands;

  // Parses argv against `optstring` ("P:vq"); prints getopt's message and returns false on error.
  bool getopt(const char* optstring) {
    bool only_operands = false;
    for (size_t i = 1; i < argv.size(); ++i) {
      const std::string& arg = argv[i];
      if (only_operands || arg.size() < 2 || arg[0] != '-') {
        operands.push_back(arg);
        continue;
      }
      if (arg == "--") {
        only_operands = true;
        continue;
      }
      for (size_t k = 1; k < arg.size(); ++k) {
        char c = arg[k];
        const char* spec = std::strchr(optstring, c);
        if (spec == nullptr || c == ':') {
          std::fprintf(stderr, "%s: invalid option -- '%c'\n", argv[0].c_str(), c);
          return false;
        }
        if (spec[1] == ':') {
          std::string value;
          if (k + 1 < arg.size()) {
            value = arg.substr(k + 1);
          } else if (i + 1 < argv.size()) {
            value = argv[++i];
          } else {
            std::fprintf(stderr, "%s: option requires an argument -- '%c'\n", argv[0].c_str(), c);
            return false;
          }
          options.emplace_back(c, value);
          break;
        }
        options.emplace_back(c, std::string());
      }
    }
    return true;
  }
};

IoShell::IoShell(BlockSession& session, block::Node* node, std::string program)
    : session_(session), node_(node), program_(std::move(program)) {}

IoShell::~IoShell() {
  drain();
}

void IoShell::drain() {
  if (!aio_requests_.empty()) {
    session_.loop().block_on(
        [](aio::TaskGroup& group) -> aio::Task<void> { co_await group.wait(); }(aio_requests_));
  }
}

int IoShell::run(std::string_view line) {
  Args args;
  size_t pos = 0;
  while (pos <= line.size()) {
    size_t next = line.find(' ', pos);
    if (next == std::string_view::npos) {
      next = line.size();
    }
    if (next > pos) {
      args.argv.emplace_back(line.substr(pos, next - pos));
    }
    pos = next + 1;
  }
  if (args.argv.empty()) {
    return 0;
  }
  args.info = find_command(args.argv[0]);
  if (args.info == nullptr) {
    std::fprintf(stderr, "command \"%s\" not found\n", args.argv[0].c_str());
    return -EINVAL;
  }
  if (node_ == nullptr && std::string_view(args.info->name) != "quit") {
    std::fprintf(stderr, "no file open, try 'help open'\n");
    return 0;
  }
  const int count = static_cast<int>(args.argv.size()) - 1;
  const int argmin = args.info->argmin;
  const int argmax = args.info->argmax;
  if (count < argmin || (argmax != -1 && count > argmax)) {
    if (argmax == -1) {
      std::fprintf(stderr, "bad argument count %d to %s, expected at least %d arguments\n", count,
                   args.argv[0].c_str(), argmin);
    } else if (argmin == argmax) {
      std::fprintf(stderr, "bad argument count %d to %s, expected %d arguments\n", count,
                   args.argv[0].c_str(), argmin);
    } else {
      std::fprintf(stderr, "bad argument count %d to %s, expected between %d and %d arguments\n",
                   count, args.argv[0].c_str(), argmin, argmax);
    }
    return -EINVAL;
  }
  if (args.info->perm != 0 && node_ != nullptr) {
    auto taken = session_.add_perm(*node_, args.info->perm);
    if (!taken) {
      std::fprintf(stderr, "%s: %s\n", program_.c_str(), taken.error().message().c_str());
      return -EPERM;
    }
  }
  int result = session_.loop().block_on(dispatch(args));
  std::fflush(stdout);
  return result;
}

aio::Task<int> IoShell::dispatch(Args& args) {
  std::string_view name = args.info->name;
  if (name == "read") {
    int r = co_await read_cmd(args);
    co_return r;
  }
  if (name == "write") {
    int r = co_await write_cmd(args);
    co_return r;
  }
  if (name == "readv" || name == "writev") {
    int r = co_await readv_cmd(args, name == "writev");
    co_return r;
  }
  if (name == "aio_read" || name == "aio_write") {
    int r = co_await aio_cmd(args, name == "aio_write");
    co_return r;
  }
  if (name == "aio_flush") {
    co_await aio_requests_.wait();
    co_return 0;
  }
  if (name == "discard") {
    int r = co_await discard_cmd(args);
    co_return r;
  }
  if (name == "flush") {
    int r = co_await flush_cmd();
    co_return r;
  }
  if (name == "map") {
    int r = co_await map_cmd();
    co_return r;
  }
  if (name == "length") {
    int r = co_await length_cmd();
    co_return r;
  }
  if (name == "truncate") {
    int r = co_await truncate_cmd(args);
    co_return r;
  }
  if (name == "sigraise") {
    int64_t signal_number = cvtnum(args.argv[1]);
    if (signal_number < 0) {
      print_cvtnum_err(signal_number, args.argv[1]);
      co_return static_cast<int>(signal_number);
    }
    if (signal_number > INT32_MAX) {
      std::printf("signal argument '%s' is too large to be a valid signal\n", args.argv[1].c_str());
      co_return -EINVAL;
    }
    std::fflush(stdout);
    std::fflush(stderr);
    std::raise(static_cast<int>(signal_number));
    co_return 0;
  }
  if (name == "quit") {
    quit_ = true;
    co_return 0;
  }
  co_return -EINVAL;
}

aio::Task<int> IoShell::read_cmd(Args& args) {
  if (!args.getopt("bCcpP:ql:s:v")) {
    co_return command_usage(*args.info);
  }
  bool terse = false;
  bool quiet = false;
  bool verbose = false;
  int pattern = -1;
  std::optional<int64_t> pattern_offset;
  std::optional<int64_t> pattern_count;
  for (const auto& [option, value] : args.options) {
    switch (option) {
      case 'C':
        terse = true;
        break;
      case 'q':
        quiet = true;
        break;
      case 'v':
        verbose = true;
        break;
      case 'P':
        pattern = parse_pattern(value);
        if (pattern < 0) {
          co_return -EINVAL;
        }
        break;
      case 'l':
      case 's': {
        int64_t number = cvtnum(value);
        if (number < 0) {
          print_cvtnum_err(number, value);
          co_return static_cast<int>(number);
        }
        (option == 'l' ? pattern_count : pattern_offset) = number;
        break;
      }
      case 'b':
        std::printf("-b (vmstate) is not supported by strata io\n");
        co_return -ENOTSUP;
      default:
        break;
    }
  }
  if (args.operands.size() != 2) {
    co_return command_usage(*args.info);
  }
  OffsetAndLength range = parse_offset_and_length(args.operands);
  if (range.error != 0) {
    co_return range.error;
  }
  int64_t offset = range.offset;
  int64_t count = range.length;
  if (pattern < 0 && (pattern_offset || pattern_count)) {
    co_return command_usage(*args.info);
  }
  int64_t check_offset = pattern_offset.value_or(0);
  int64_t check_count = pattern_count.value_or(count - check_offset);
  if (check_count < 0 || check_count + check_offset > count) {
    std::printf("pattern verification range exceeds end of read data\n");
    co_return -EINVAL;
  }
  std::vector<uint8_t> buffer(static_cast<size_t>(count), 0xab);
  timespec start = now();
  Result<void> read = co_await block::io::pread(*node_, static_cast<uint64_t>(offset),
                                                buffer.data(), buffer.size());
  timespec took = elapsed_since(start);
  if (!read) {
    std::printf("read failed: %s\n", errno_text(read.error()).c_str());
    co_return -read.error().errno_value();
  }
  int ret = 0;
  if (pattern >= 0 && !all_bytes(buffer.data() + check_offset, static_cast<size_t>(check_count),
                                 static_cast<uint8_t>(pattern))) {
    std::printf("Pattern verification failed at offset %" PRId64 ", %" PRId64 " bytes\n",
                offset + check_offset, check_count);
    ret = -EINVAL;
  }
  if (quiet) {
    co_return ret;
  }
  if (verbose) {
    dump_buffer(buffer.data(), offset, count);
  }
  print_report("read", took, offset, count, count, 1, terse);
  co_return ret;
}

aio::Task<int> IoShell::write_cmd(Args& args) {
  if (!args.getopt("bcCfnpP:quzs:")) {
    co_return command_usage(*args.info);
  }
  bool terse = false;
  bool quiet = false;
  bool zero = false;
  bool pattern_given = false;
  bool source_given = false;
  uint32_t flags = 0;
  int pattern = 0xcd;
  for (const auto& [option, value] : args.options) {
    switch (option) {
      case 'C':
        terse = true;
        break;
      case 'q':
        quiet = true;
        break;
      case 'z':
        zero = true;
        break;
      case 'f':
        flags |= block::kRequestFua;
        break;
      case 'u':
        flags |= block::kRequestMayUnmap;
        break;
      case 'n':
        flags |= block::kRequestNoFallback;
        break;
      case 'P':
        pattern_given = true;
        pattern = parse_pattern(value);
        if (pattern < 0) {
          co_return -EINVAL;
        }
        break;
      case 's':
        source_given = true;
        break;
      case 'b':
      case 'c':
        std::printf("-%c is not supported by strata io\n", option);
        co_return -ENOTSUP;
      default:
        break;
    }
  }
  if (args.operands.size() != 2) {
    co_return command_usage(*args.info);
  }
  if (static_cast<int>(zero) + static_cast<int>(pattern_given) + static_cast<int>(source_given) >
      1) {
    std::printf("Only one of -z, -P, and -s can be specified at the same time\n");
    co_return -EINVAL;
  }
  if (source_given) {
    std::printf("-s is not supported by strata io\n");
    co_return -ENOTSUP;
  }
  if ((flags & block::kRequestMayUnmap) != 0 && !zero) {
    std::printf("-u requires -z to be specified\n");
    co_return -EINVAL;
  }
  if ((flags & block::kRequestNoFallback) != 0 && !zero) {
    std::printf("-n requires -z to be specified\n");
    co_return -EINVAL;
  }
  int64_t offset = cvtnum(args.operands[0]);
  if (offset < 0) {
    print_cvtnum_err(offset, args.operands[0]);
    co_return static_cast<int>(offset);
  }
  int64_t count = cvtnum(args.operands[1]);
  if (count < 0) {
    print_cvtnum_err(count, args.operands[1]);
    co_return static_cast<int>(count);
  }
  if (count > kRequestMaxBytes && !zero) {
    std::printf("length cannot exceed %" PRIu64 ", given %s\n",
                static_cast<uint64_t>(kRequestMaxBytes), args.operands[1].c_str());
    co_return -EINVAL;
  }
  timespec start = now();
  Result<void> written;
  if (zero) {
    written = co_await block::io::pwrite_zeroes(*node_, static_cast<uint64_t>(offset),
                                                static_cast<uint64_t>(count), flags);
  } else {
    std::vector<uint8_t> buffer(static_cast<size_t>(count), static_cast<uint8_t>(pattern));
    written = co_await block::io::pwrite(*node_, static_cast<uint64_t>(offset), buffer.data(),
                                         buffer.size(), flags);
  }
  timespec took = elapsed_since(start);
  if (!written) {
    std::printf("write failed: %s\n", errno_text(written.error()).c_str());
    co_return -written.error().errno_value();
  }
  if (!quiet) {
    print_report("wrote", took, offset, count, count, 1, terse);
  }
  co_return 0;
}

namespace {

// The offset and lengths of a readv/writev/aio_* command; prints qemu-io's message on error.
struct VectorRequest {
  int64_t offset = 0;
  int64_t total = 0;
};

std::optional<VectorRequest> parse_vector(const std::vector<std::string>& operands, int& error) {
  VectorRequest request;
  request.offset = cvtnum(operands[0]);
  if (request.offset < 0) {
    print_cvtnum_err(request.offset, operands[0]);
    error = static_cast<int>(request.offset);
    return std::nullopt;
  }
  for (size_t i = 1; i < operands.size(); ++i) {
    int64_t length = cvtnum(operands[i]);
    if (length < 0) {
      print_cvtnum_err(length, operands[i]);
      error = -EINVAL;
      return std::nullopt;
    }
    if (length > kRequestMaxBytes) {
      std::printf("Argument '%s' exceeds maximum size %" PRIu64 "\n", operands[i].c_str(),
                  static_cast<uint64_t>(kRequestMaxBytes));
      error = -EINVAL;
      return std::nullopt;
    }
    if (request.total > kRequestMaxBytes - length) {
      std::printf("The total number of bytes exceed the maximum size %" PRIu64 "\n",
                  static_cast<uint64_t>(kRequestMaxBytes));
      error = -EINVAL;
      return std::nullopt;
    }
    request.total += length;
  }
  return request;
}

}  // namespace

aio::Task<int> IoShell::readv_cmd(Args& args, bool write) {
  if (!args.getopt(write ? "CfqP:" : "CP:qv")) {
    co_return command_usage(*args.info);
  }
  bool terse = false;
  bool quiet = false;
  bool verbose = false;
  uint32_t flags = 0;
  int pattern = write ? 0xcd : -1;
  for (const auto& [option, value] : args.options) {
    switch (option) {
      case 'C':
        terse = true;
        break;
      case 'q':
        quiet = true;
        break;
      case 'v':
        verbose = true;
        break;
      case 'f':
        flags |= block::kRequestFua;
        break;
      case 'P':
        pattern = parse_pattern(value);
        if (pattern < 0) {
          co_return -EINVAL;
        }
        break;
      default:
        break;
    }
  }
  if (args.operands.size() < 2) {
    co_return command_usage(*args.info);
  }
  int error = 0;
  auto request = parse_vector(args.operands, error);
  if (!request) {
    co_return error;
  }
  const auto offset = static_cast<uint64_t>(request->offset);
  std::vector<uint8_t> buffer(static_cast<size_t>(request->total),
                              write ? static_cast<uint8_t>(pattern) : 0xab);
  timespec start = now();
  Result<void> done;
  if (write) {
    done = co_await block::io::pwrite(*node_, offset, buffer.data(), buffer.size(), flags);
  } else {
    done = co_await block::io::pread(*node_, offset, buffer.data(), buffer.size());
  }
  timespec took = elapsed_since(start);
  if (!done) {
    std::printf("%s failed: %s\n", write ? "writev" : "readv", errno_text(done.error()).c_str());
    co_return -done.error().errno_value();
  }
  int ret = 0;
  if (!write && pattern >= 0 &&
      !all_bytes(buffer.data(), buffer.size(), static_cast<uint8_t>(pattern))) {
    std::printf("Pattern verification failed at offset %" PRId64 ", %zu bytes\n", request->offset,
                buffer.size());
    ret = -EINVAL;
  }
  if (quiet) {
    co_return ret;
  }
  if (verbose) {
    dump_buffer(buffer.data(), request->offset, request->total);
  }
  print_report(write ? "wrote" : "read", took, request->offset, request->total, request->total, 1,
               terse);
  co_return ret;
}

aio::Task<int> IoShell::aio_cmd(Args& args, bool write) {
  if (!args.getopt(write ? "CfiqP:uz" : "CiP:qv")) {
    co_return command_usage(*args.info);
  }
  struct Context {
    block::Node* node = nullptr;
    bool write = false;
    bool terse = false;
    bool quiet = false;
    bool verbose = false;
    bool zero = false;
    bool pattern_given = false;
    uint32_t flags = 0;
    int pattern = -1;
    VectorRequest request;
    std::vector<uint8_t> buffer;
    timespec start{};
  };
  auto context = std::make_unique<Context>();
  context->node = node_;
  context->write = write;
  context->pattern = write ? 0xcd : -1;
  for (const auto& [option, value] : args.options) {
    switch (option) {
      case 'C':
        context->terse = true;
        break;
      case 'q':
        context->quiet = true;
        break;
      case 'v':
        context->verbose = true;
        break;
      case 'z':
        context->zero = true;
        break;
      case 'f':
        context->flags |= block::kRequestFua;
        break;
      case 'u':
        context->flags |= block::kRequestMayUnmap;
        break;
      case 'i':
        std::printf("-i (io_uring submission mode) is not supported by strata io\n");
        co_return -ENOTSUP;
      case 'P':
        context->pattern_given = true;
        context->pattern = parse_pattern(value);
        if (context->pattern < 0) {
          co_return -EINVAL;
        }
        break;
      default:
        break;
    }
  }
  if (args.operands.size() < 2) {
    co_return command_usage(*args.info);
  }
  if (context->zero && context->pattern_given) {
    std::printf("-z and -P cannot be specified at the same time\n");
    co_return -EINVAL;
  }
  if ((context->flags & block::kRequestMayUnmap) != 0 && !context->zero) {
    std::printf("-u requires -z to be specified\n");
    co_return -EINVAL;
  }
  if (context->zero && args.operands.size() > 2) {
    std::printf("-z supports only a single length parameter\n");
    co_return -EINVAL;
  }
  int error = 0;
  auto request = parse_vector(args.operands, error);
  if (!request) {
    co_return error;
  }
  context->request = *request;
  if (!context->zero) {
    context->buffer.assign(static_cast<size_t>(request->total),
                           write ? static_cast<uint8_t>(context->pattern) : 0xab);
  }
  context->start = now();
  // Runs concurrently with the commands that follow; reports when it completes, like qemu-io's
  // aio callbacks (a failure here does not change the exit status).
  aio_requests_.spawn([](std::unique_ptr<Context> c) -> aio::Task<void> {
    const auto offset = static_cast<uint64_t>(c->request.offset);
    const auto total = static_cast<uint64_t>(c->request.total);
    Result<void> done;
    if (c->zero) {
      done = co_await block::io::pwrite_zeroes(*c->node, offset, total, c->flags);
    } else if (c->write) {
      done = co_await block::io::pwrite(*c->node, offset, c->buffer.data(), total, c->flags);
    } else {
      done = co_await block::io::pread(*c->node, offset, c->buffer.data(), total);
    }
    timespec took = elapsed_since(c->start);
    if (!done) {
      std::printf("%s failed: %s\n", c->write ? "aio_write" : "readv",
                  errno_text(done.error()).c_str());
      co_return;
    }
    if (!c->write && c->pattern >= 0 &&
        !all_bytes(c->buffer.data(), c->buffer.size(), static_cast<uint8_t>(c->pattern))) {
      std::printf("Pattern verification failed at offset %" PRId64 ", %zu bytes\n",
                  c->request.offset, c->buffer.size());
    }
    if (c->quiet) {
      co_return;
    }
    if (c->verbose) {
      dump_buffer(c->buffer.data(), c->request.offset, c->request.total);
    }
    print_report(c->write ? "wrote" : "read", took, c->request.offset, c->request.total,
                 c->request.total, 1, c->terse);
  }(std::move(context)));
  co_return 0;
}

aio::Task<int> IoShell::discard_cmd(Args& args) {
  if (!args.getopt("Cq")) {
    co_return command_usage(*args.info);
  }
  bool terse = false;
  bool quiet = false;
  for (const auto& [option, value] : args.options) {
    if (option == 'C') {
      terse = true;
    } else if (option == 'q') {
      quiet = true;
    }
  }
  if (args.operands.size() != 2) {
    co_return command_usage(*args.info);
  }
  OffsetAndLength range = parse_offset_and_length(args.operands);
  if (range.error != 0) {
    co_return range.error;
  }
  int64_t offset = range.offset;
  int64_t bytes = range.length;
  if (static_cast<uint64_t>(offset) + static_cast<uint64_t>(bytes) > node_->length()) {
    std::printf("discard failed: %s\n", std::strerror(EIO));
    co_return -EIO;
  }
  timespec start = now();
  Result<void> discarded = co_await block::io::pdiscard(*node_, static_cast<uint64_t>(offset),
                                                        static_cast<uint64_t>(bytes));
  timespec took = elapsed_since(start);
  if (!discarded) {
    std::printf("discard failed: %s\n", errno_text(discarded.error()).c_str());
    co_return -discarded.error().errno_value();
  }
  if (!quiet) {
    print_report("discard", took, offset, bytes, bytes, 1, terse);
  }
  co_return 0;
}

aio::Task<int> IoShell::flush_cmd() {
  Result<void> flushed = co_await block::io::flush(*node_);
  if (!flushed) {
    co_return -flushed.error().errno_value();
  }
  co_return 0;
}

aio::Task<int> IoShell::map_cmd() {
  const uint64_t length = node_->length();
  uint64_t offset = 0;
  while (offset < length) {
    // map_is_allocated: extend the run while the allocation status stays the same.
    Result<block::BlockStatus> first =
        co_await block::io::block_status(*node_, offset, length - offset);
    if (!first) {
      std::fprintf(stderr, "%s: Failed to get allocation status: %s\n", program_.c_str(),
                   errno_text(first.error()).c_str());
      co_return -first.error().errno_value();
    }
    const bool allocated = (first->flags & block::BlockStatus::kAllocated) != 0;
    uint64_t run = first->bytes;
    while (offset + run < length) {
      Result<block::BlockStatus> next =
          co_await block::io::block_status(*node_, offset + run, length - offset - run);
      if (!next) {
        std::fprintf(stderr, "%s: Failed to get allocation status: %s\n", program_.c_str(),
                     errno_text(next.error()).c_str());
        co_return -next.error().errno_value();
      }
      if (((next->flags & block::BlockStatus::kAllocated) != 0) != allocated) {
        break;
      }
      run += next->bytes;
    }
    std::printf("%s (0x%" PRIx64 ") bytes %s at offset %s (0x%" PRIx64 ")\n",
                cvtstr(static_cast<double>(run)).c_str(), run,
                allocated ? "    allocated" : "not allocated",
                cvtstr(static_cast<double>(offset)).c_str(), offset);
    offset += run;
  }
  co_return 0;
}

aio::Task<int> IoShell::length_cmd() {
  std::printf("%s\n", cvtstr(static_cast<double>(node_->length())).c_str());
  co_return 0;
}

aio::Task<int> IoShell::truncate_cmd(Args& args) {
  if (!args.getopt("m:")) {
    co_return command_usage(*args.info);
  }
  for (const auto& [option, value] : args.options) {
    if (option == 'm' && value != "off") {
      std::fprintf(stderr, "%s: preallocation mode '%s' is not supported by strata io\n",
                   program_.c_str(), value.c_str());
      co_return -ENOTSUP;
    }
  }
  if (args.operands.size() != 1) {
    co_return command_usage(*args.info);
  }
  int64_t offset = cvtnum(args.operands[0]);
  if (offset < 0) {
    print_cvtnum_err(offset, args.operands[0]);
    co_return static_cast<int>(offset);
  }
  Result<void> truncated =
      co_await block::io::truncate(*node_, static_cast<uint64_t>(offset), /*exact=*/true);
  if (!truncated) {
    std::fprintf(stderr, "%s: %s\n", program_.c_str(), truncated.error().message().c_str());
    co_return -truncated.error().errno_value();
  }
  co_return 0;
}

}  // namespace strata::cli
