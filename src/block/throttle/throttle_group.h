#pragma once
// Throttle groups (QEMU's util/throttle.c leaky buckets and block/throttle-groups.c): I/O limits
// shared by every `throttle` filter node that names the group.
//
// Limits (QEMU's ThrottleLimits): for bytes and for operations, a total, read and write rate
// (`avg`, per second), each with an optional burst rate (`max`) allowed for `max-length` seconds;
// iops-size makes a large request count as several operations. A bucket fills with each request
// and leaks at its average rate; a request waits while a bucket it fills is over its size (QEMU's
// throttle_compute_wait: avg/10 without a burst rate, max * burst_length with one, and the burst
// bucket max/10 during a burst).
//
// Requests of one direction pass one at a time in arrival order: each waits until the buckets
// allow it, is accounted, and goes on. While the throttle node is drained (graph changes,
// blockdev-del) waits are skipped, as QEMU disables limits in a drained section.
//
// Threading: the main loop (the group is shared by nodes of that loop).

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "aio/sync.h"
#include "aio/task.h"
#include "base/arg_decoder.h"
#include "base/result.h"

namespace strata::block::throttle {

enum class Direction { kRead, kWrite };

// QEMU's BucketType order.
enum BucketIndex { kBpsTotal, kBpsRead, kBpsWrite, kOpsTotal, kOpsRead, kOpsWrite, kBuckets };

struct Bucket {
  double avg = 0;             // units per second; 0: no limit
  double max = 0;             // burst rate; 0: none
  uint64_t burst_length = 1;  // seconds the burst rate may last
  double level = 0;           // filled units
  double burst_level = 0;     // units filled during a burst
};

struct Limits {
  std::array<Bucket, kBuckets> buckets;
  uint64_t op_size = 0;  // iops-size
};

// Decodes a ThrottleLimits object (or the legacy x-* members of throttle-group, with `prefix`
// "x-"), checks it as QEMU's throttle_is_valid does, and returns it.
Result<Limits> decode_limits(ArgDecoder& d, const std::string& prefix);
// Decodes only the members present into `limits` (qom-set merges into the current limits).
void decode_limits_into(ArgDecoder& d, const std::string& prefix, Limits& limits);
// Every member with its value (QEMU's qom-get of `limits`, or the x-* ones with prefix "x-").
nlohmann::json limits_json(const Limits& limits, const std::string& prefix);
Result<void> check_limits(const Limits& limits);

// The buckets of one group and the arithmetic on them (deterministic; times in nanoseconds).
class ThrottleState {
 public:
  explicit ThrottleState(Limits limits) : limits_(std::move(limits)) {}
  // Leaks the buckets up to `now`, then returns how long a request in `direction` must wait.
  uint64_t wait_ns(Direction direction, uint64_t now);
  // Fills the buckets of `direction` with one request of `bytes`.
  void account(Direction direction, uint64_t bytes);
  const Limits& limits() const { return limits_; }

 private:
  void leak(uint64_t now);
  Limits limits_;
  std::optional<uint64_t> previous_leak_;
};

class ThrottleGroup {
 public:
  ThrottleGroup(std::string name, Limits limits) : name_(std::move(name)), state_(limits) {}
  const std::string& name() const { return name_; }
  const Limits& limits() const { return state_.limits(); }

  // qom-set of `limits`: the members given replace the current ones; checked as at creation;
  // the buckets start empty again.
  Result<void> set_limits(ArgDecoder& d);

  // Waits until a request of `bytes` in `direction` may go, then accounts it. `bypass` is asked
  // again after every slice of waiting: true lets the request through at once (a drained node).
  aio::Task<void> intercept(Direction direction, uint64_t bytes,
                            const std::function<bool()>& bypass);

 private:
  std::string name_;
  ThrottleState state_;
  std::array<aio::CoMutex, 2> queues_;  // one per direction: arrival order
};

// The throttle-group objects of a daemon, by id.
class ThrottleGroups {
 public:
  bool contains(const std::string& id) const { return groups_.count(id) != 0; }
  // object-add qom-type=throttle-group: `limits` (ThrottleLimits) or the legacy x-* members.
  // QEMU's order of errors: the members, then a taken id (`id_taken`), then the limits' checks.
  Result<void> add(const std::string& id, ArgDecoder& d,
                   const std::function<bool(const std::string&)>& id_taken);
  // object-del: refused while a throttle node uses the group (QEMU's wording).
  Result<void> remove(const std::string& id);
  std::shared_ptr<ThrottleGroup> find(const std::string& id) const;

 private:
  std::map<std::string, std::shared_ptr<ThrottleGroup>> groups_;
};

}  // namespace strata::block::throttle
