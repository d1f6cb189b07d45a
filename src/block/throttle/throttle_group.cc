#include "block/throttle/throttle_group.h"

#include <algorithm>
#include <chrono>
#include <climits>

#include "aio/event_loop.h"

namespace strata::block::throttle {

namespace {

constexpr double kValueMax = 1e15;  // QEMU's THROTTLE_VALUE_MAX
constexpr double kNsPerSecond = 1e9;
// A throttled request re-checks `bypass` at least this often.
constexpr uint64_t kMaxSliceNs = 50'000'000;

Error generic(std::string message) {
  return make_error(ErrorKind::kInvalidArgument, std::move(message));
}

struct MemberNames {
  BucketIndex bucket;
  const char* name;  // "bps-total"
};
constexpr MemberNames kMembers[] = {
    {kOpsTotal, "iops-total"}, {kOpsRead, "iops-read"}, {kOpsWrite, "iops-write"},
    {kBpsTotal, "bps-total"},  {kBpsRead, "bps-read"},  {kBpsWrite, "bps-write"},
};

bool in_direction(int bucket, Direction direction) {
  switch (bucket) {
    case kBpsTotal:
    case kOpsTotal:
      return true;
    case kBpsRead:
    case kOpsRead:
      return direction == Direction::kRead;
    default:
      return direction == Direction::kWrite;
  }
}

// QEMU's throttle_compute_wait for one bucket.
uint64_t bucket_wait(const Bucket& b) {
  if (b.avg == 0) {
    return 0;
  }
  double bucket_size;
  double burst_bucket_size;
  if (b.max == 0) {
    bucket_size = b.avg / 10;
    burst_bucket_size = 0;
  } else {
    bucket_size = b.max * static_cast<double>(b.burst_length);
    burst_bucket_size = b.max / 10;
  }
  double extra = b.level - bucket_size;
  if (extra > 0) {
    return static_cast<uint64_t>(extra * kNsPerSecond / b.avg);
  }
  if (b.burst_length > 1) {
    extra = b.burst_level - burst_bucket_size;
    if (extra > 0) {
      return static_cast<uint64_t>(extra * kNsPerSecond / b.max);
    }
  }
  return 0;
}

uint64_t monotonic_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

}  // namespace

Result<Limits> decode_limits(ArgDecoder& d, const std::string& prefix) {
  Limits limits;
  decode_limits_into(d, prefix, limits);
  return limits;
}

void decode_limits_into(ArgDecoder& d, const std::string& prefix, Limits& limits) {
  // QAPI's member order: iops-total, -max, -max-length, iops-read..., bps..., iops-size.
  for (const MemberNames& m : kMembers) {
    Bucket& b = limits.buckets[m.bucket];
    std::string base = prefix + m.name;
    if (auto avg = d.opt_i64(base)) {
      b.avg = static_cast<double>(static_cast<uint64_t>(*avg));
    }
    if (auto max = d.opt_i64(base + "-max")) {
      b.max = static_cast<double>(static_cast<uint64_t>(*max));
    }
    if (auto length = d.opt_i64(base + "-max-length")) {
      if (*length < 0 || *length > UINT_MAX) {
        d.fail(generic(base + "-max-length value must be in the range [0, " +
                       std::to_string(UINT_MAX) + "]"));
      } else {
        b.burst_length = static_cast<uint64_t>(*length);
      }
    }
  }
  if (auto size = d.opt_i64(prefix + "iops-size")) {
    limits.op_size = static_cast<uint64_t>(*size);
  }
}

nlohmann::json limits_json(const Limits& limits, const std::string& prefix) {
  nlohmann::json out = nlohmann::json::object();
  for (const MemberNames& m : kMembers) {
    const Bucket& b = limits.buckets[m.bucket];
    const std::string base = prefix + m.name;
    out[base] = static_cast<int64_t>(b.avg);
    out[base + "-max"] = static_cast<int64_t>(b.max);
    out[base + "-max-length"] = static_cast<int64_t>(b.burst_length);
  }
  out[prefix + "iops-size"] = static_cast<int64_t>(limits.op_size);
  return out;
}

Result<void> ThrottleGroup::set_limits(ArgDecoder& d) {
  Limits limits = state_.limits();
  for (Bucket& b : limits.buckets) {
    b.level = 0;
    b.burst_level = 0;
  }
  decode_limits_into(d, "", limits);
  auto finished = d.finish();
  if (!finished) {
    return finished;
  }
  auto valid = check_limits(limits);
  if (!valid) {
    return valid;
  }
  state_ = ThrottleState(limits);
  return ok();
}

Result<void> check_limits(const Limits& limits) {
  const auto& b = limits.buckets;
  const bool bps = b[kBpsTotal].avg != 0 && (b[kBpsRead].avg != 0 || b[kBpsWrite].avg != 0);
  const bool ops = b[kOpsTotal].avg != 0 && (b[kOpsRead].avg != 0 || b[kOpsWrite].avg != 0);
  const bool bps_max = b[kBpsTotal].max != 0 && (b[kBpsRead].max != 0 || b[kBpsWrite].max != 0);
  const bool ops_max = b[kOpsTotal].max != 0 && (b[kOpsRead].max != 0 || b[kOpsWrite].max != 0);
  if (bps || ops || bps_max || ops_max) {
    return generic(
        "bps/iops/max total values and read/write values cannot be used at the same "
        "time");
  }
  if (limits.op_size != 0 && b[kOpsTotal].avg == 0 && b[kOpsRead].avg == 0 &&
      b[kOpsWrite].avg == 0) {
    return generic("iops size requires an iops value to be set");
  }
  for (const Bucket& bucket : b) {
    if (bucket.avg > kValueMax || bucket.max > kValueMax) {
      return generic("bps/iops/max values must be within [0, 1000000000000000]");
    }
    if (bucket.burst_length == 0) {
      return generic("the burst length cannot be 0");
    }
    if (bucket.burst_length > 1 && bucket.max == 0) {
      return generic("burst length set without burst rate");
    }
    if (bucket.max != 0 && static_cast<double>(bucket.burst_length) > kValueMax / bucket.max) {
      return generic("burst length too high for this burst rate");
    }
    if (bucket.max != 0 && bucket.avg == 0) {
      return generic("bps_max/iops_max require corresponding bps/iops values");
    }
    if (bucket.max != 0 && bucket.max < bucket.avg) {
      return generic("bps_max/iops_max cannot be lower than bps/iops");
    }
  }
  return ok();
}

void ThrottleState::leak(uint64_t now) {
  if (previous_leak_ && now > *previous_leak_) {
    const double delta = static_cast<double>(now - *previous_leak_);
    for (Bucket& b : limits_.buckets) {
      b.level = std::max(b.level - b.avg * delta / kNsPerSecond, 0.0);
      if (b.burst_length > 1) {
        b.burst_level = std::max(b.burst_level - b.max * delta / kNsPerSecond, 0.0);
      }
    }
  }
  if (!previous_leak_ || now > *previous_leak_) {
    previous_leak_ = now;
  }
}

uint64_t ThrottleState::wait_ns(Direction direction, uint64_t now) {
  leak(now);
  uint64_t wait = 0;
  for (int i = 0; i < kBuckets; ++i) {
    if (in_direction(i, direction)) {
      wait = std::max(wait, bucket_wait(limits_.buckets[i]));
    }
  }
  return wait;
}

void ThrottleState::account(Direction direction, uint64_t bytes) {
  double units = 1.0;
  if (limits_.op_size != 0 && bytes > limits_.op_size) {
    units = static_cast<double>(bytes) / static_cast<double>(limits_.op_size);
  }
  for (int i = 0; i < kBuckets; ++i) {
    if (!in_direction(i, direction)) {
      continue;
    }
    Bucket& b = limits_.buckets[i];
    const double amount = i <= kBpsWrite ? static_cast<double>(bytes) : units;
    b.level += amount;
    if (b.burst_length > 1) {
      b.burst_level += amount;
    }
  }
}

aio::Task<void> ThrottleGroup::intercept(Direction direction, uint64_t bytes,
                                         const std::function<bool()>& bypass) {
  auto turn = co_await queues_[direction == Direction::kRead ? 0 : 1].scoped_lock();
  aio::EventLoop* loop = aio::EventLoop::current();
  for (;;) {
    if (bypass()) {
      break;
    }
    const uint64_t wait = state_.wait_ns(direction, monotonic_ns());
    if (wait == 0) {
      break;
    }
    (void)co_await loop->sleep_for(std::chrono::nanoseconds(std::min(wait, kMaxSliceNs)));
  }
  state_.account(direction, bytes);
}

Result<void> ThrottleGroups::add(const std::string& id, ArgDecoder& d,
                                 const std::function<bool(const std::string&)>& id_taken) {
  Limits limits;
  bool have_limits = false;
  if (auto object = d.opt_object("limits")) {
    auto decoded = decode_limits(*object, "");
    ignore_error(object->finish(), "recorded in the shared decoder state");
    if (decoded) {
      limits = *decoded;
      have_limits = true;
    }
  }
  auto legacy = decode_limits(d, "x-");
  auto finished = d.finish();
  if (!finished) {
    return finished;
  }
  if (!have_limits && legacy) {
    limits = *legacy;
  }
  if (id_taken(id)) {
    return make_error(ErrorKind::kExists, "attempt to add duplicate property '" + id +
                                              "' to object (type 'container')");
  }
  auto valid = check_limits(limits);
  if (!valid) {
    return valid;
  }
  groups_[id] = std::make_shared<ThrottleGroup>(id, limits);
  return ok();
}

Result<void> ThrottleGroups::remove(const std::string& id) {
  auto it = groups_.find(id);
  if (it == groups_.end()) {
    return make_error(ErrorKind::kNotFound, "object '" + id + "' not found");
  }
  if (it->second.use_count() > 1) {
    return make_error(ErrorKind::kBusy, "object '" + id + "' is in use, can not be deleted");
  }
  groups_.erase(it);
  return ok();
}

std::shared_ptr<ThrottleGroup> ThrottleGroups::find(const std::string& id) const {
  auto it = groups_.find(id);
  return it == groups_.end() ? nullptr : it->second;
}

}  // namespace strata::block::throttle
