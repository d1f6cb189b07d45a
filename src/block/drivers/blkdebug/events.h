#pragma once
// Debug events (QAPI BlkdebugEvent, qapi/block-core.json): named points in drivers and the request
// layer that a parent announces on a child (QEMU's BLKDBG_EVENT(bs->file, ...)). Only a blkdebug
// node reacts to them; every other node ignores them (Node::debug_event).

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

namespace strata::block {

// The order is QAPI's (the wire names below are indexed by it).
enum class BlkdebugEvent : uint8_t {
  kL1Update,
  kL1GrowAllocTable,
  kL1GrowWriteTable,
  kL1GrowActivateTable,
  kL2Load,
  kL2Update,
  kL2UpdateCompressed,
  kL2AllocCowRead,
  kL2AllocWrite,
  kReadAio,
  kReadBackingAio,
  kReadCompressed,
  kWriteAio,
  kWriteCompressed,
  kVmstateLoad,
  kVmstateSave,
  kCowRead,
  kCowWrite,
  kReftableLoad,
  kReftableGrow,
  kReftableUpdate,
  kRefblockLoad,
  kRefblockUpdate,
  kRefblockUpdatePart,
  kRefblockAlloc,
  kRefblockAllocHookup,
  kRefblockAllocWrite,
  kRefblockAllocWriteBlocks,
  kRefblockAllocWriteTable,
  kRefblockAllocSwitchTable,
  kClusterAlloc,
  kClusterAllocBytes,
  kClusterFree,
  kFlushToOs,
  kFlushToDisk,
  kPwritevRmwHead,
  kPwritevRmwAfterHead,
  kPwritevRmwTail,
  kPwritevRmwAfterTail,
  kPwritev,
  kPwritevZero,
  kPwritevDone,
  kEmptyImagePrepare,
  kL1ShrinkWriteTable,
  kL1ShrinkFreeL2Clusters,
  kCorWrite,
  kClusterAllocSpace,
  kNone,  // fired once when a blkdebug node opens
};

inline constexpr size_t kBlkdebugEventCount = static_cast<size_t>(BlkdebugEvent::kNone) + 1;

// The QAPI names, indexed by BlkdebugEvent ("l1_update", ..., "none").
std::span<const std::string_view> blkdebug_event_names();
std::optional<BlkdebugEvent> parse_blkdebug_event(std::string_view name);
std::string_view blkdebug_event_name(BlkdebugEvent event);

}  // namespace strata::block
