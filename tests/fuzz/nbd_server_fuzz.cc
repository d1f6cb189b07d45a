// Feeds arbitrary bytes to the NBD server's handshake and transmission state machine as one
// client's byte stream (an in-memory transport; no sockets). Two exports of a 1 MiB in-memory
// node: "e" writable with qemu:allocation-depth and a bitmap context name, "ro" read-only.
// Each input runs twice: once on a plain server, once on a server that requires TLS (PSK
// credentials), where the bytes meet the forced-TLS option rules and, after STARTTLS, GnuTLS's
// handshake through the TLS transport.
// Expected: the connection ends (end of input, protocol error or DISC) without a crash, a
// sanitizer report, a hang or an allocation beyond the server's per-connection limits.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include "aio/event_loop.h"
#include "block/graph/graph.h"
#include "crypto/tls_creds.h"
#include "nbd/export.h"
#include "nbd/server_connection.h"
#include "nbd/transport.h"

namespace {

using namespace strata;
using namespace strata::block;

class MemoryNode final : public Node {
 public:
  MemoryNode(CommonOptions common, size_t size) : Node(std::move(common)), bytes_(size, 0) {}
  const char* driver_name() const override { return "fuzz-memory"; }
  uint64_t length() const override { return bytes_.size(); }
  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t) override {
    const uint64_t in = offset >= bytes_.size() ? 0 : std::min(bytes, bytes_.size() - offset);
    qiov.copy_from(0, bytes_.data() + offset, in);
    qiov.fill(in, 0, bytes - in);
    co_return ok();
  }
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t) override {
    if (offset < bytes_.size()) {
      qiov.copy_to(0, bytes_.data() + offset, std::min(bytes, bytes_.size() - offset));
    }
    co_return ok();
  }

 private:
  std::vector<uint8_t> bytes_;
};

class Directory final : public nbd::ExportDirectory {
 public:
  std::shared_ptr<nbd::Export> find_export(std::string_view name) const override {
    for (const auto& exp : exports) {
      if (exp->name() == name) {
        return exp;
      }
    }
    return nullptr;
  }
  std::vector<std::shared_ptr<nbd::Export>> list_exports() const override { return exports; }
  std::vector<std::shared_ptr<nbd::Export>> exports;
};

// PSK server credentials from a keys.psk written once to a temporary directory.
std::shared_ptr<const nbd::ServerTls> make_tls() {
  namespace fs = std::filesystem;
  fs::path dir = fs::temp_directory_path() / ("strata-nbd-fuzz-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "keys.psk") << "qemu:0123456789abcdef0123456789abcdef\n";
  crypto::TlsCredsPskOptions options;
  options.dir = dir.string();
  options.endpoint = crypto::TlsEndpoint::kServer;
  auto creds = crypto::load_psk_creds(options);
  if (!creds) {
    return nullptr;
  }
  auto tls = std::make_shared<nbd::ServerTls>();
  tls->creds = std::move(creds).value();
  return tls;
}

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
  auto memory = std::make_shared<MemoryNode>(common, 1u << 20);
  if (!graph.register_node(*memory)) {
    return 0;
  }
  graph.add_monitor_ref(memory);

  Directory directory;
  nbd::ExportConfig writable;
  writable.name = "e";
  writable.description = "fuzz export";
  writable.writable = true;
  writable.allocation_depth = true;
  writable.bitmaps = {"b0"};
  auto bitmap = std::make_shared<block::bitmap::DirtyBitmap>("b0", 1u << 20, 65536);
  bitmap->set(65536, 3 * 65536);
  writable.bitmap_sources = {bitmap};
  directory.exports.push_back(std::make_shared<nbd::Export>("e", writable, memory));
  nbd::ExportConfig read_only;
  read_only.name = "ro";
  directory.exports.push_back(std::make_shared<nbd::Export>("ro", read_only, memory));

  static std::shared_ptr<const nbd::ServerTls> tls = make_tls();
  for (const nbd::ServerTls* mode : {static_cast<const nbd::ServerTls*>(nullptr), tls.get()}) {
    nbd::MemoryTransport transport(std::string(reinterpret_cast<const char*>(data), size));
    transport.set_output_limit(1u << 20);
    nbd::ServerConnection connection(transport, directory);
    connection.set_tls(mode);
    loop->block_on(connection.run());
  }
  return 0;
}
