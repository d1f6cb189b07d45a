#include "daemon/bitmap_commands.h"

#include <algorithm>
#include <array>
#include <climits>
#include <optional>
#include <vector>

#include "base/sha256.h"
#include "block/bitmap/persistent_store.h"
#include "daemon/daemon.h"
#include "daemon/transaction.h"

namespace strata::daemon {

using block::bitmap::check_bitmap;
using block::bitmap::DirtyBitmap;

namespace {

Error generic(std::string message) {
  return make_error(ErrorKind::kInvalidArgument, std::move(message));
}

// QEMU's bdrv_get_default_bitmap_granularity: the cluster size within [4 KiB, 64 KiB], or 64 KiB
// for nodes without clusters.
uint32_t default_granularity(const block::Node& node) {
  std::optional<uint64_t> cluster = node.cluster_size();
  if (!cluster || *cluster == 0) {
    return 65536;
  }
  return static_cast<uint32_t>(std::clamp<uint64_t>(*cluster, 4096, 65536));
}

// ---- block-dirty-bitmap-add ---------------------------------------------------------------

class AddBitmap : public TransactionAction {
 public:
  AddBitmap(block::Graph& graph, ArgDecoder& d)
      : graph_(graph),
        node_name_(d.str("node")),
        name_(d.str("name")),
        granularity_(d.opt_u64("granularity")),
        persistent_(d.opt_bool("persistent").value_or(false)),
        disabled_(d.opt_bool("disabled").value_or(false)) {
    if (granularity_ && *granularity_ > UINT32_MAX) {
      d.fail(generic("Parameter '" + d.full_name("granularity") + "' expects uint32_t"));
    }
  }

  // QEMU's qmp_block_dirty_bitmap_add, check by check.
  aio::Task<Result<void>> prepare() override {
    if (name_.empty()) {
      co_return generic("Bitmap name cannot be empty");
    }
    node_ = graph_.find(node_name_);
    if (node_ == nullptr) {
      co_return generic("Cannot find device='" + node_name_ + "' nor node-name='" + node_name_ +
                        "'");
    }
    const uint64_t granularity = granularity_.value_or(default_granularity(*node_));
    if (granularity < 512 || (granularity & (granularity - 1)) != 0) {
      co_return generic("Granularity must be power of 2 and at least 512");
    }
    if (persistent_) {
      auto* store = dynamic_cast<block::bitmap::PersistentBitmapStore*>(node_);
      if (store == nullptr) {
        co_return generic("Can't store persistent bitmaps to " + node_name_ +
                          ": Operation not supported");
      }
      Result<void> storable = store->can_store_new_bitmap(name_, granularity);
      if (!storable) {
        co_return std::move(storable).error();
      }
    }
    block::bitmap::BitmapSet& set = node_->dirty_bitmaps();
    Result<void> valid = block::bitmap::check_new_bitmap(set, name_, granularity);
    if (!valid) {
      co_return std::move(valid).error();
    }
    DirtyBitmap& bitmap = set.add(
        std::make_unique<DirtyBitmap>(name_, node_->length(), static_cast<uint32_t>(granularity)));
    bitmap.set_enabled(!disabled_);
    bitmap.set_persistent(persistent_);
    added_ = set.find_shared(name_);
    co_return ok();
  }

  void abort() override {
    // Only the bitmap this action made: a later action may not have replaced it, since names
    // are unique while it exists.
    if (added_ && node_->dirty_bitmaps().find(name_) == added_.get()) {
      node_->dirty_bitmaps().remove(name_);
    }
  }

 private:
  block::Graph& graph_;
  std::string node_name_;
  std::string name_;
  std::optional<uint64_t> granularity_;
  bool persistent_;
  bool disabled_;
  block::Node* node_ = nullptr;
  std::shared_ptr<DirtyBitmap> added_;
};

// ---- actions on one existing bitmap --------------------------------------------------------

// Base of the actions naming one bitmap ({node, name}).
class OneBitmapAction : public TransactionAction {
 public:
  OneBitmapAction(block::Graph& graph, ArgDecoder& d)
      : graph_(graph), node_name_(d.str("node")), name_(d.str("name")) {}

 protected:
  // Looks the bitmap up and checks it with `checks` (QEMU's BDRV_BITMAP_* flags).
  Result<void> find(unsigned checks) {
    Result<FoundBitmap> found = lookup_dirty_bitmap(graph_, node_name_, name_);
    if (!found) {
      return std::move(found).error();
    }
    found_ = std::move(found).value();
    return check_bitmap(*found_.bitmap, checks);
  }

  block::Graph& graph_;
  std::string node_name_;
  std::string name_;
  FoundBitmap found_;
};

// block-dirty-bitmap-remove. The bitmap leaves the image in prepare (QEMU does the same; an
// aborted removal keeps the bitmap in memory, and it is stored again when the node closes) and
// leaves memory at commit.
class RemoveBitmap : public OneBitmapAction {
 public:
  using OneBitmapAction::OneBitmapAction;

  aio::Task<Result<void>> prepare() override {
    Result<void> usable = find(block::bitmap::kCheckBusy | block::bitmap::kCheckReadonly);
    if (!usable) {
      co_return usable;
    }
    if (found_.bitmap->persistent()) {
      if (auto* store = dynamic_cast<block::bitmap::PersistentBitmapStore*>(found_.node)) {
        std::shared_ptr<block::Node> keep = found_.node->shared_from_this();
        Result<void> removed = co_await store->remove_persistent_bitmap(name_);
        if (!removed) {
          co_return removed;
        }
      }
    }
    co_return ok();
  }

  void commit() override {
    if (found_.node->dirty_bitmaps().find(name_) == found_.bitmap.get()) {
      found_.node->dirty_bitmaps().remove(name_);
    }
  }
};

// block-dirty-bitmap-clear.
class ClearBitmap : public OneBitmapAction {
 public:
  using OneBitmapAction::OneBitmapAction;

  aio::Task<Result<void>> prepare() override {
    Result<void> usable = find(block::bitmap::kCheckDefault);
    if (!usable) {
      co_return usable;
    }
    backup_ = found_.bitmap->save_bits();
    found_.bitmap->clear();
    co_return ok();
  }

  void abort() override { found_.bitmap->restore_bits(std::move(backup_)); }

 private:
  std::vector<uint64_t> backup_;
};

// block-dirty-bitmap-enable and -disable.
class SetRecording : public OneBitmapAction {
 public:
  SetRecording(block::Graph& graph, ArgDecoder& d, bool enable)
      : OneBitmapAction(graph, d), enable_(enable) {}

  aio::Task<Result<void>> prepare() override {
    Result<void> usable = find(block::bitmap::kCheckAllowReadonly);
    if (!usable) {
      co_return usable;
    }
    was_enabled_ = found_.bitmap->enabled();
    found_.bitmap->set_enabled(enable_);
    co_return ok();
  }

  void abort() override { found_.bitmap->set_enabled(was_enabled_); }

 private:
  bool enable_;
  bool was_enabled_ = false;
};

// ---- block-dirty-bitmap-merge --------------------------------------------------------------

// A source of a merge: a bitmap of the target's node (a string) or of any node ({node, name}).
struct MergeSource {
  std::optional<std::string> node;
  std::string name;
};

class MergeBitmaps : public TransactionAction {
 public:
  MergeBitmaps(block::Graph& graph, ArgDecoder& d)
      : graph_(graph), node_name_(d.str("node")), target_(d.str("target")) {
    std::vector<nlohmann::json> list = d.list("bitmaps");
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i].is_object()) {
        ArgDecoder e = d.element_decoder(list[i], i, "bitmaps");
        MergeSource source;
        source.node = e.str("node");
        source.name = e.str("name");
        ignore_error(e.finish(), "recorded in the shared decoder state");
        sources_.push_back(std::move(source));
      } else {
        sources_.push_back(MergeSource{std::nullopt, d.element_str(list[i], i, "bitmaps")});
      }
    }
  }

  // QEMU's block_dirty_bitmap_merge: the sources are merged into a scratch bitmap first (each
  // checked on the way), then the scratch bitmap into the target, so a failure changes nothing.
  aio::Task<Result<void>> prepare() override {
    Result<FoundBitmap> target = lookup_dirty_bitmap(graph_, node_name_, target_);
    if (!target) {
      co_return std::move(target).error();
    }
    target_bitmap_ = target->bitmap;
    DirtyBitmap scratch("", target_bitmap_->size(), target_bitmap_->granularity());
    for (const MergeSource& source : sources_) {
      std::shared_ptr<DirtyBitmap> bitmap;
      if (source.node) {
        Result<FoundBitmap> found = lookup_dirty_bitmap(graph_, *source.node, source.name);
        if (!found) {
          co_return std::move(found).error();
        }
        bitmap = found->bitmap;
      } else {
        bitmap = target->node->dirty_bitmaps().find_shared(source.name);
        if (!bitmap) {
          co_return generic("Dirty bitmap '" + source.name + "' not found");
        }
      }
      Result<void> usable = check_bitmap(*bitmap, block::bitmap::kCheckAllowReadonly);
      if (!usable) {
        co_return usable;
      }
      if (bitmap->size() != scratch.size()) {
        co_return generic("Bitmaps are of different sizes (destination size is " +
                          std::to_string(scratch.size()) + ", source size is " +
                          std::to_string(bitmap->size()) + ") and can't be merged");
      }
      scratch.merge_from(*bitmap);
    }
    Result<void> writable = check_bitmap(*target_bitmap_, block::bitmap::kCheckDefault);
    if (!writable) {
      co_return writable;
    }
    backup_ = target_bitmap_->save_bits();
    target_bitmap_->merge_from(scratch);
    co_return ok();
  }

  void abort() override { target_bitmap_->restore_bits(std::move(backup_)); }

 private:
  block::Graph& graph_;
  std::string node_name_;
  std::string target_;
  std::vector<MergeSource> sources_;
  std::shared_ptr<DirtyBitmap> target_bitmap_;
  std::vector<uint64_t> backup_;
};

// Runs the action a standalone command decoded as a one-action transaction.
aio::Task<Result<nlohmann::json>> run_single(Daemon& daemon, std::string type,
                                             nlohmann::json args) {
  const TransactionActionTable::Entry* entry = daemon.transaction_actions().find(type);
  ArgDecoder d(args);
  std::vector<std::unique_ptr<TransactionAction>> actions;
  actions.push_back(entry->factory(daemon, d));
  auto decoded = d.finish();
  if (!decoded) {
    co_return std::move(decoded).error();
  }
  std::vector<const TransactionActionTable::Entry*> entries(1, entry);
  std::vector<std::string> types(1, type);
  Result<void> result =
      co_await run_transaction(std::move(actions), std::move(entries), std::move(types), false);
  if (!result) {
    co_return std::move(result).error();
  }
  co_return nlohmann::json::object();
}

}  // namespace

Result<FoundBitmap> lookup_dirty_bitmap(block::Graph& graph, const std::string& node,
                                        const std::string& name) {
  block::Node* found = graph.find(node);
  if (found == nullptr) {
    return generic("Node '" + node + "' not found");
  }
  std::shared_ptr<DirtyBitmap> bitmap = found->dirty_bitmaps().find_shared(name);
  if (!bitmap) {
    return generic("Dirty bitmap '" + name + "' not found");
  }
  return FoundBitmap{found, std::move(bitmap)};
}

void register_bitmap_commands(Daemon& daemon) {
  TransactionActionTable& table = daemon.transaction_actions();
  table.add("block-dirty-bitmap-add", [](Daemon& owner, ArgDecoder& d) {
    return std::make_unique<AddBitmap>(owner.graph(), d);
  });
  table.add("block-dirty-bitmap-remove", [](Daemon& owner, ArgDecoder& d) {
    return std::make_unique<RemoveBitmap>(owner.graph(), d);
  });
  table.add("block-dirty-bitmap-clear", [](Daemon& owner, ArgDecoder& d) {
    return std::make_unique<ClearBitmap>(owner.graph(), d);
  });
  table.add("block-dirty-bitmap-enable", [](Daemon& owner, ArgDecoder& d) {
    return std::make_unique<SetRecording>(owner.graph(), d, true);
  });
  table.add("block-dirty-bitmap-disable", [](Daemon& owner, ArgDecoder& d) {
    return std::make_unique<SetRecording>(owner.graph(), d, false);
  });
  table.add("block-dirty-bitmap-merge", [](Daemon& owner, ArgDecoder& d) {
    return std::make_unique<MergeBitmaps>(owner.graph(), d);
  });
  for (const char* type :
       {"block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge"}) {
    daemon.command_table().add(
        type, [&daemon, type = std::string(type)](const nlohmann::json& args, qmp::Monitor&) {
          return run_single(daemon, type, args);
        });
  }
  daemon.command_table().add(
      "x-debug-block-dirty-bitmap-sha256",
      [&daemon](const nlohmann::json& args, qmp::Monitor&) -> aio::Task<Result<nlohmann::json>> {
        ArgDecoder d(args);
        std::string node = d.str("node");
        std::string name = d.str("name");
        auto decoded = d.finish();
        if (!decoded) {
          co_return std::move(decoded).error();
        }
        Result<FoundBitmap> found = lookup_dirty_bitmap(daemon.graph(), node, name);
        if (!found) {
          co_return std::move(found).error();
        }
        co_return nlohmann::json{{"sha256", sha256_hex(found->bitmap->hbitmap_bytes())}};
      });
}

}  // namespace strata::daemon
