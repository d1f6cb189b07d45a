#pragma once
// What `strata img` and `strata io` share: one event loop and graph per process, images opened
// the way qemu-img/qemu-io open them (a BlockBackend-like root edge with their permissions), and
// QEMU's number parsing and formatting.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "aio/event_loop.h"
#include "base/result.h"
#include "block/graph/graph.h"
#include "crypto/object_table.h"

namespace strata::cli {

// How to open one image (qemu-img's img_open / qemu-io's openfile).
struct ImageOpenRequest {
  std::string filename;                   // FILE, or "" with image_opts
  std::optional<std::string> format;      // -f; nullopt probes
  std::optional<std::string> image_opts;  // --image-opts text (keyval or JSON)
  bool read_only = true;
  bool force_share = false;   // -U
  bool cache_direct = false;  // -n / -t none
  bool cache_no_flush = false;
  bool discard_unmap = false;    // qemu-io opens with BDRV_O_UNMAP
  bool no_io = false;            // qemu-img info: take no permissions (BDRV_O_NO_IO)
  bool warn_probed_raw = false;  // print QEMU's warning when probing guessed raw on a writable node
  bool no_backing = false;       // BDRV_O_NO_BACKING: a qcow2 image opens without its backing file
};

// One opened image: the root node and the edge that holds it.
struct OpenedImage {
  std::shared_ptr<block::Node> node;
  std::unique_ptr<block::Child> root;
  bool probed = false;
};

// The objects of a tool process (qemu-img's and qemu-io's --object): TLS credentials and authz
// objects, which the images' nbd nodes name, and the credentials of nbds:// URIs. One table per
// process, like QEMU's object root; every BlockSession's graph looks names up in it.
crypto::ObjectTable& tool_objects();
// --object SPEC (keyval or JSON): creates the object now, with QEMU's errors ("invalid object
// type: iothread" for objects tools do not create).
Result<void> add_tool_object(const std::string& spec);

// The process's loop and graph; images opened here are closed (flushed by their users first) in
// reverse order when the session ends.
class BlockSession : public block::BlockParent {
 public:
  static Result<std::unique_ptr<BlockSession>> create();
  ~BlockSession() override;
  BlockSession(const BlockSession&) = delete;
  BlockSession& operator=(const BlockSession&) = delete;

  std::string parent_description() const override { return "an unnamed block device"; }

  aio::EventLoop& loop() { return *loop_; }
  block::Graph& graph() { return *graph_; }

  // Opens an image; the error message is the driver's (callers add their tool's prefix).
  Result<block::Node*> open(const ImageOpenRequest& request);
  // Adds permissions to the root edge of `node` (qemu-io takes write/resize on demand).
  Result<void> add_perm(block::Node& node, uint64_t perm);
  // Closes one image now.
  void close(block::Node& node);

 private:
  BlockSession() = default;

  std::unique_ptr<aio::EventLoop> loop_;
  std::unique_ptr<block::Graph> graph_;
  std::vector<OpenedImage> images_;
};

// The blockdev options `request` stands for, or an error for bad --image-opts; `probed` tells
// whether the format was guessed. `keyval` is set when the result must be decoded as keyval.
struct ImageOptions {
  nlohmann::json options;
  bool keyval = false;
  bool probed = false;
  // The format must be probed by reading through the protocol node (NBD URIs): open
  // options["file"] first, then choose options["driver"].
  bool probe_through_protocol = false;
  // An nbds:// URI's client credentials, which the nbd node names by `tls_creds_id`; the
  // session registers them before opening.
  std::shared_ptr<const crypto::TlsCreds> uri_tls_creds;
  std::string tls_creds_id;
};
Result<ImageOptions> image_options(const ImageOpenRequest& request);

// QEMU's qemu_strtosz with default unit bytes: "4096", "4k", "1.5M", "0x1000". Errors carry
// EINVAL (bad number or suffix) or ERANGE (too large).
Result<uint64_t> parse_size(std::string_view text);
// QEMU's size_to_str: "2 MiB", "68 KiB", "1.5 GiB" ("%0.3g %sB").
std::string size_to_str(uint64_t value);

// strerror(errno) of an error.
std::string errno_text(const Error& error);

}  // namespace strata::cli
