#pragma once
// Export: one block node served over NBD under a name (QEMU's NBDExport). The export is a root
// parent of its node (a block::BlockParent); whoever creates it attaches the root edge with the
// permissions it needs (consistent read, plus write when writable) and hands it over with
// set_root(). Connections that selected the export register with it, so deleting the export can
// disconnect them and wait until their requests have finished.
//
// Threading: everything on the node's home loop (the daemon's main loop).

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "aio/event_loop.h"
#include "aio/sync.h"
#include "aio/task.h"
#include "block/bitmap/dirty_bitmap.h"
#include "block/graph/node.h"

namespace strata::nbd {

struct ExportConfig {
  std::string name;                        // the name clients ask for
  std::optional<std::string> description;  // NBD_INFO_DESCRIPTION, when set
  bool writable = false;
  bool writethrough = false;      // every write is FUA
  bool allocation_depth = false;  // offer the qemu:allocation-depth context
  // qemu:dirty-bitmap:NAME contexts: the names, and parallel to them the bitmaps BLOCK_STATUS
  // reads. The creator marks each bitmap busy; the export clears that when it is destroyed.
  std::vector<std::string> bitmaps;
  std::vector<std::shared_ptr<block::bitmap::DirtyBitmap>> bitmap_sources;
  bool multi_conn = true;  // advertise NBD_FLAG_CAN_MULTI_CONN
  // The export's iothread loop (block-export-add `iothread`), or nullptr. Connections that select
  // the export do their socket receives and sends there; the protocol state and every call into
  // the block layer stay on the node's home loop. The loop must outlive the export.
  aio::EventLoop* io_loop = nullptr;
};

// Something that can be told to close (a client connection).
class Closable {
 public:
  virtual ~Closable() = default;
  virtual void close() = 0;
};

class Export : public block::BlockParent {
 public:
  Export(std::string id, ExportConfig config, std::shared_ptr<block::Node> node);
  ~Export() override;

  const std::string& id() const { return id_; }
  const ExportConfig& config() const { return config_; }
  const std::string& name() const { return config_.name; }
  // The node the export serves: the root edge's, which follows graph changes (a mirror's pivot
  // moves it to the mirror's target).
  block::Node& node() const { return root_ ? *root_->node() : *node_; }
  uint64_t size() const { return node().length(); }
  // Transmission flags before per-connection additions (DF, BLOCK_STAT_PAYLOAD).
  uint16_t flags() const;
  std::string parent_description() const override { return "block export '" + id_ + "'"; }
  // Ends the export's use of its dirty bitmaps (clears their busy flag) once its connections are
  // gone; the destructor does it when nobody did. Idempotent.
  void release_bitmaps();

  // The root edge, attached by the creator.
  void set_root(std::unique_ptr<block::Child> root) { root_ = std::move(root); }
  std::unique_ptr<block::Child> take_root() { return std::move(root_); }

  // A range recently found to hold data (not known zero) in the node, [start, end). READ uses it
  // to skip block status: answering a range that has since become a hole with a data chunk is
  // still correct (the bytes read are zeroes), so the hint never needs invalidating. Block status
  // replies never use it.
  bool data_hint_covers(uint64_t offset, uint64_t length) const {
    return offset >= data_hint_start_ && length <= data_hint_end_ - offset &&
           offset < data_hint_end_;
  }
  // Records a data run; one that overlaps or touches the current hint extends it (both were
  // found to be data), any other replaces it.
  void set_data_hint(uint64_t start, uint64_t end) {
    if (start <= data_hint_end_ && end >= data_hint_start_ && data_hint_end_ > data_hint_start_) {
      data_hint_start_ = std::min(data_hint_start_, start);
      data_hint_end_ = std::max(data_hint_end_, end);
    } else {
      data_hint_start_ = start;
      data_hint_end_ = end;
    }
  }

  // Connection bookkeeping: a connection registers when it selects the export and leaves when it
  // has finished every request.
  bool shutting_down() const { return shutting_down_; }
  size_t connection_count() const { return connections_.size(); }
  void add_connection(Closable& connection);
  void remove_connection(Closable& connection);
  // Marks the export as going away (no new clients) and closes every connection.
  void request_shutdown();
  // Resumes once no connection is registered.
  aio::Task<void> wait_idle();

 private:
  std::string id_;
  ExportConfig config_;
  bool bitmaps_released_ = false;
  std::shared_ptr<block::Node> node_;
  std::unique_ptr<block::Child> root_;
  std::vector<Closable*> connections_;
  bool shutting_down_ = false;
  aio::Event idle_;
  uint64_t data_hint_start_ = 0;
  uint64_t data_hint_end_ = 0;
};

// How a connection finds exports by name (the server's export table).
class ExportDirectory {
 public:
  virtual ~ExportDirectory() = default;
  // The export named `name` that accepts new clients, or nullptr.
  virtual std::shared_ptr<Export> find_export(std::string_view name) const = 0;
  // Every export that accepts new clients, in the order NBD_OPT_LIST reports them.
  virtual std::vector<std::shared_ptr<Export>> list_exports() const = 0;
};

}  // namespace strata::nbd
