// Feeds arbitrary bytes to the migration stream loaders: as a file (describe_file with every page
// read, and load_from_file into fixed RAM blocks, both on the main channel only) and as a byte
// channel (load_from_stream). Every outcome must be a value: a loaded stream or an error.
//
// The RAM blocks are those of the seed corpus (tests/fuzz/corpus/vmstate_load_fuzz/, written by
// `strata vmstate save-test --blocks=pc.ram:16K,vga:4K`), so mutations reach the restore path.

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "migration/stream.h"
#include "migration/vmstate_file.h"

namespace {

namespace mig = strata::migration;

class SpanSource : public mig::ByteSource {
 public:
  explicit SpanSource(std::span<const uint8_t> bytes) : bytes_(bytes) {}
  strata::Result<void> read(std::span<uint8_t> buffer) override {
    if (buffer.size() > bytes_.size()) {
      return strata::Error(strata::ErrorKind::kCorrupt, "stream truncated");
    }
    if (!buffer.empty()) {
      std::memcpy(buffer.data(), bytes_.data(), buffer.size());
    }
    bytes_ = bytes_.subspan(buffer.size());
    return strata::ok();
  }

 private:
  std::span<const uint8_t> bytes_;
};

struct Destination {
  Destination() {
    ram.resize(20 * 1024);
    blocks.push_back(mig::RamBlock{"pc.ram", ram.data(), 16 * 1024, 4096});
    blocks.push_back(mig::RamBlock{"vga", ram.data() + 16 * 1024, 4 * 1024, 4096});
  }
  std::vector<uint8_t> ram;
  std::vector<mig::RamBlock> blocks;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Destination destination;
  int fd = ::memfd_create("vmstate-fuzz", MFD_CLOEXEC);
  if (fd < 0) {
    return 0;
  }
  size_t written = 0;
  while (written < size) {
    ssize_t n = ::write(fd, data + written, size - written);
    if (n <= 0) {
      ::close(fd);
      return 0;
    }
    written += static_cast<size_t>(n);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);

  auto described = mig::describe_file(path, 0, true);
  if (described.ok()) {
    for (const mig::BlockRecord& block : described->blocks) {
      if (block.present_pages > block.page_count()) {
        __builtin_trap();  // a description must be consistent
      }
    }
  } else {
    (void)described.error().message().size();
  }
  mig::TransferOptions options;
  auto loaded = mig::load_from_file(destination.blocks, path, options);
  if (loaded.ok() != described.ok() && loaded.ok()) {
    __builtin_trap();  // the loader accepted what the checker refused
  }
  ::close(fd);

  SpanSource source(std::span<const uint8_t>(data, size));
  auto streamed = mig::load_from_stream(destination.blocks, source, options);
  (void)streamed.ok();
  return 0;
}
