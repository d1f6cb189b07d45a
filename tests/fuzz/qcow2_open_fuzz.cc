// Opens arbitrary bytes as a qcow2 image held in memory (a tiny in-memory node stands for the
// file), then maps and reads a few ranges. Never touches the file system: backing is null and an
// image that asks for an external data file gets the in-memory node as its data file.
// Expected: an error or data, never a crash, a sanitizer report or an allocation beyond what the
// image's size and QEMU's table limits allow.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include <nlohmann/json.hpp>

#include "aio/event_loop.h"
#include "base/arg_decoder.h"
#include "block/drivers/blockdev_options.h"
#include "block/drivers/driver.h"
#include "block/graph/graph.h"
#include "block/io/request.h"

namespace {

using namespace strata;
using namespace strata::block;

class MemoryNode final : public Node {
 public:
  MemoryNode(CommonOptions common, std::vector<uint8_t> bytes)
      : Node(std::move(common)), bytes_(std::move(bytes)) {}
  const char* driver_name() const override { return "fuzz-memory"; }
  uint64_t length() const override { return bytes_.size(); }
  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t) override {
    const uint64_t in = offset >= bytes_.size() ? 0 : std::min(bytes, bytes_.size() - offset);
    qiov.copy_from(0, bytes_.data() + offset, in);
    qiov.fill(in, 0, bytes - in);
    co_return ok();
  }

 private:
  std::vector<uint8_t> bytes_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static std::unique_ptr<aio::EventLoop> loop = [] {
    auto created = aio::EventLoop::create(16);
    return created ? std::move(created).value() : nullptr;
  }();
  if (!loop) {
    return 0;
  }
  Graph graph;
  CommonOptions common;
  common.node_name = "mem";
  common.read_only = true;
  auto memory = std::make_shared<MemoryNode>(common, std::vector<uint8_t>(data, data + size));
  if (!graph.register_node(*memory)) {
    return 0;
  }
  graph.add_monitor_ref(memory);

  nlohmann::json options = {{"driver", "qcow2"},  {"node-name", "img"},
                            {"read-only", true},  {"file", "mem"},
                            {"backing", nullptr}, {"l2-cache-entry-size", 512}};
  // Incompatible feature bit 2: external data file.
  if (size >= 80 && (data[79] & 0x4) != 0) {
    options["data-file"] = "mem";
  }
  ArgDecoder d(options);
  auto parsed = parse_blockdev_options(d, options);
  if (!d.finish()) {
    return 0;
  }
  auto opened = open_blockdev(graph, *parsed);
  if (!opened) {
    return 0;
  }
  Node& node = **opened;
  const uint64_t length = node.length();
  if (length == 0) {
    return 0;
  }
  std::vector<uint8_t> buffer(64 * 1024);
  // A few ranges chosen from the input, plus the start and the end.
  uint64_t points[4] = {0, length - std::min<uint64_t>(length, buffer.size()), 0, 0};
  if (size >= 16) {
    uint64_t a = 0;
    uint64_t b = 0;
    std::memcpy(&a, data + size - 16, 8);
    std::memcpy(&b, data + size - 8, 8);
    points[2] = a % length;
    points[3] = b % length;
  }
  for (uint64_t at : points) {
    const uint64_t n = std::min<uint64_t>(buffer.size(), length - at);
    ignore_error(loop->block_on(io::pread(node, at, buffer.data(), n)), "fuzzing: errors expected");
    ignore_error(loop->block_on(io::block_status(node, at, n)), "fuzzing: errors expected");
  }
  return 0;
}
