#pragma once
// blkdebug's rule engine (QEMU's block/blkdebug.c: add_rule, process_rule, rule_check), kept apart
// from the node so that its state machine can be tested on its own.
//
// Semantics, exactly as QEMU 10.0:
// - The state starts at 1. When an event fires, every rule registered for it whose `state` is 0 or
//   equal to the current state acts; the state itself changes only after all of them ran (the
//   first-added matching set-state rule wins).
// - Matching inject-error rules of one event replace the whole active set (the set is cleared by
//   the first of them); an event without a matching inject-error rule leaves it alone. Active
//   rules stay active until replaced, so one rule keeps failing every later request that matches.
// - A request checks the active rules in the order they were added and takes the first whose
//   sector (-1 = any) lies in the request and whose iotype mask contains the request's type. That
//   rule's errno decides: 0 lets the request through, a positive errno fails it, a negative one
//   completes it without doing any I/O (QEMU returns -errno as a positive "success"). A `once` rule
//   is deleted when it fires.

#include <cstdint>
#include <list>
#include <optional>
#include <vector>

#include "block/drivers/blkdebug/events.h"

namespace strata::block::blkdebug {

// QAPI BlkdebugIOType, in QAPI order (bit i of a rule's mask).
enum class IoType : uint8_t { kRead, kWrite, kWriteZeroes, kDiscard, kFlush, kBlockStatus };

inline constexpr uint64_t io_type_bit(IoType type) {
  return uint64_t{1} << static_cast<unsigned>(type);
}

// QEMU's default when a rule names no iotype: everything but block-status.
inline constexpr uint64_t kDefaultIoTypeMask =
    io_type_bit(IoType::kRead) | io_type_bit(IoType::kWrite) | io_type_bit(IoType::kWriteZeroes) |
    io_type_bit(IoType::kDiscard) | io_type_bit(IoType::kFlush);

struct Rule {
  enum class Action : uint8_t { kInjectError, kSetState };
  Action action = Action::kInjectError;
  BlkdebugEvent event = BlkdebugEvent::kNone;
  int state = 0;  // 0: any state
  // inject-error
  uint64_t iotype_mask = kDefaultIoTypeMask;
  int error = 5;  // errno (EIO by default)
  bool immediately = false;
  bool once = false;
  int64_t offset = -1;  // byte offset of `sector`, -1: any
  // set-state
  int new_state = 0;
};

// What a request that matched an active rule must do.
struct Injection {
  int error;  // > 0: fail with -error; < 0: complete without I/O
  bool immediately;
};

class RuleEngine {
 public:
  // Registers a rule (QEMU inserts at the head of the event's list).
  void add(const Rule& rule);
  // An event reached the node.
  void on_event(BlkdebugEvent event);
  // Checks a request of `bytes` at `offset` (bytes 0: flush, matches only sector -1 rules).
  // nullopt: carry on with the I/O.
  std::optional<Injection> check(uint64_t offset, uint64_t bytes, IoType type);

  int state() const { return state_; }
  size_t rule_count() const;
  size_t active_count() const { return active_.size(); }

 private:
  std::list<Rule> rules_[kBlkdebugEventCount];
  std::vector<Rule*> active_;  // QEMU's active_rules, head first
  int state_ = 1;
};

}  // namespace strata::block::blkdebug
