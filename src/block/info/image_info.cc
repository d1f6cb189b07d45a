#include "block/info/image_info.h"

namespace strata::block {

nlohmann::json image_info(const Node& node, bool flat) {
  nlohmann::json info;
  info["filename"] = node.filename();
  info["format"] = node.format_name();
  info["virtual-size"] = node.length();
  if (auto actual = node.allocated_size()) {
    info["actual-size"] = *actual;
  }
  if (auto dirty = node.dirty_flag()) {
    info["dirty-flag"] = *dirty;
  }
  if (auto cluster = node.cluster_size()) {
    info["cluster-size"] = *cluster;
  }
  nlohmann::json specific = node.format_specific_info();
  if (!specific.is_null()) {
    info["format-specific"] = specific;
  }
  if (auto stored = node.backing_file_name()) {
    info["backing-filename"] = stored->name;
    info["full-backing-filename"] = stored->full_name;
    if (!stored->format.empty()) {
      info["backing-filename-format"] = stored->format;
    }
  } else if (Child* backing = node.backing_child(); backing != nullptr) {
    info["backing-filename"] = backing->node()->filename();
    info["full-backing-filename"] = backing->node()->filename();
    info["backing-filename-format"] = backing->node()->format_name();
  }
  // QEMU's bdrv_query_image_info: "snapshots" only when there are some.
  if (auto snapshots = node.snapshot_list(); !snapshots.empty()) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& snapshot : snapshots) {
      nlohmann::json entry = {
          {"id", snapshot.id},
          {"name", snapshot.name},
          {"vm-state-size", snapshot.vm_state_size},
          {"date-sec", snapshot.date_sec},
          {"date-nsec", snapshot.date_nsec},
          {"vm-clock-sec", snapshot.vm_clock_nsec / 1000000000},
          {"vm-clock-nsec", snapshot.vm_clock_nsec % 1000000000},
      };
      if (snapshot.icount != UINT64_MAX) {
        entry["icount"] = snapshot.icount;
      }
      list.push_back(std::move(entry));
    }
    info["snapshots"] = std::move(list);
  }
  if (const Node* below = filter_or_cow(node); below != nullptr && !flat) {
    info["backing-image"] = image_info(*below, false);
  }
  return info;
}

}  // namespace strata::block
