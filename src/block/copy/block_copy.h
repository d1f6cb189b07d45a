#pragma once
// Block-copy (QEMU's block/block-copy.c): copies the clusters marked in a copy bitmap from a
// source node to a target node, in chunks, with several chunks in flight at once. It serves the
// backup job (one background call over the whole image) and copy-before-write (a call over the
// clusters a guest write is about to change, made before that write reaches the source).
//
// Region states. Every cluster is in exactly one of:
//   not started - its bit is set in copy_bitmap(): a call may claim it;
//   in flight   - claimed by a task of some call: a call that needs it waits for that task;
//   done        - its bit is clear and no task holds it: nothing waits, nothing copies it.
// A task that fails sets its bits again (the region is "not started" once more), so a waiter
// retries it itself. state_of() reports a cluster's state for tests and fleecing readers.
//
// Chunks: the cluster size is max(64 KiB, min_cluster_size, target cluster size) (QEMU's
// block_copy_calculate_cluster_size); a task covers whole clusters, at most
// min(max_chunk, 1 MiB, target max_transfer) bytes, or one cluster with compression. A source
// run that reads as zeroes is written with write-zeroes. With skip_unallocated (sync=top), runs
// not allocated in the source's own layer are marked done without copying.
//
// Threading: one event loop (the source's home loop); calls may be concurrent coroutines.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "aio/sync.h"
#include "aio/task.h"
#include "base/result.h"
#include "block/bitmap/dirty_bitmap.h"
#include "block/graph/node.h"
#include "block/job/rate_limit.h"

namespace strata::block::copy {

// QEMU's BLOCK_COPY_CLUSTER_SIZE_DEFAULT and BLOCK_COPY_MAX_BUFFER.
inline constexpr uint64_t kDefaultClusterSize = 64 * 1024;
inline constexpr uint64_t kMaxBuffer = 1024 * 1024;
// QEMU's BLOCK_COPY_MAX_WORKERS (the x-perf max-workers default).
inline constexpr int kDefaultMaxWorkers = 64;

struct ClusterSizeResult {
  uint64_t cluster_size;
  // QEMU's warning when the target reports no cluster size and has no backing file.
  std::optional<std::string> warning;
};
// QEMU's block_copy_calculate_cluster_size.
ClusterSizeResult calculate_cluster_size(const Node& target, uint64_t min_cluster_size);

struct BlockCopyOptions {
  uint64_t min_cluster_size = 0;
  bool compress = false;
  // Write to the target with kRequestSerialising (copy-before-write into a target backed by the
  // source, so that reads of the target wait for the copy).
  bool serialise_target_writes = false;
};

enum class RegionState { kNotStarted, kInFlight, kDone };

class BlockCopy {
 public:
  // Progress reports: `done` after each copied (or skipped) chunk; `remaining` when the amount
  // left changes other than by copying (a failed task, skipped unallocated runs).
  struct Progress {
    std::function<void(uint64_t bytes)> done;
    std::function<void(uint64_t remaining)> set_remaining;
  };

  // Every cluster starts "not started" (the copy bitmap is full); callers narrow it with
  // copy_bitmap() (sync=bitmap/incremental) or reset_unallocated() (sync=top).
  static Result<std::unique_ptr<BlockCopy>> create(Node& source, Node& target,
                                                   const BlockCopyOptions& options);
  ~BlockCopy();
  BlockCopy(const BlockCopy&) = delete;
  BlockCopy& operator=(const BlockCopy&) = delete;

  uint64_t cluster_size() const { return cluster_size_; }
  uint64_t length() const { return length_; }
  // Set bits: clusters still to copy. Change only while no call runs, or to set bits.
  bitmap::DirtyBitmap& copy_bitmap() { return *copy_bitmap_; }
  // Bytes not started plus bytes in flight (QEMU's dirty count + in_flight_bytes).
  uint64_t remaining_bytes() const;
  RegionState state_of(uint64_t offset) const;
  // Whether every cluster overlapping [offset, offset + bytes) is done (nothing to copy or wait
  // for): copy-before-write's fast path once a region has been copied.
  bool range_done(uint64_t offset, uint64_t bytes) const;
  void set_progress(Progress progress) { progress_ = std::move(progress); }
  // Speed limit for calls that do not ignore it; 0 is unlimited. Wakes throttled calls.
  void set_speed(uint64_t bytes_per_second);
  void set_skip_unallocated(bool skip) { skip_unallocated_ = skip; }

  // QEMU's block_copy_reset_unallocated: if the run at `offset` is not allocated in the source's
  // own layer, marks it done. Returns the run's length (a multiple of the cluster size, or up to
  // the end), whether or not it was reset.
  aio::Task<Result<uint64_t>> reset_unallocated(uint64_t offset);

  // One call (QEMU's BlockCopyCallState): copies every not-started cluster of
  // [offset, offset + bytes) and waits for clusters of the range that other calls have in flight,
  // until the whole range is done or an error occurs. offset and bytes are cluster-aligned (bytes
  // may end at length()).
  struct Call {
    uint64_t offset = 0;
    uint64_t bytes = 0;
    int max_workers = kDefaultMaxWorkers;
    uint64_t max_chunk = 0;  // 0: no limit beyond the engine's
    bool ignore_ratelimit = false;
    // Set by cancel(): no new task starts; tasks in flight finish.
    bool cancelled = false;
    // The first failure and whether it was a read of the source.
    std::optional<Error> error;
    bool error_is_read = false;
  };
  // Returns ok when the range is done, the first error otherwise (details in `call`), or
  // kCancelled when the call was cancelled first. `call` must outlive the coroutine.
  aio::Task<Result<void>> run(Call& call);
  // Stops `call` early: no new tasks, and a throttled call wakes up.
  void cancel(Call& call);
  // Convenience for copy-before-write: one call over the clusters covering [offset, offset+bytes)
  // that ignores the speed limit.
  aio::Task<Result<void>> copy_range(uint64_t offset, uint64_t bytes);

 private:
  struct Task;

  BlockCopy(Node& source, Node& target, uint64_t cluster_size, const BlockCopyOptions& options);
  // Claims the first not-started run inside [offset, end) (at most `max_bytes`), or nullptr.
  std::shared_ptr<Task> claim(uint64_t offset, uint64_t end, uint64_t max_bytes);
  // A task in flight that overlaps [offset, offset + bytes), or nullptr.
  std::shared_ptr<Task> find_in_flight(uint64_t offset, uint64_t bytes) const;
  // Narrows a claimed task to its first run of equal block status; false when the task was
  // ended instead (an unallocated run skipped for sync=top).
  aio::Task<bool> classify(Task& task);
  aio::Task<void> run_task(Call& call, std::shared_ptr<Task> task, int& workers,
                           aio::CoQueue& worker_done);
  aio::Task<Result<void>> copy_chunk(Task& task, bool& error_is_read);
  // Ends a task: `copied` counts it as done progress; otherwise, unless `skipped`, its clusters
  // become not started again.
  void end_task(Task& task, bool copied, bool skipped = false);
  uint64_t chunk_limit(const Call& call) const;
  aio::Task<void> throttle_sleep(Call& call, uint64_t ns);

  Node& source_;
  Node& target_;
  const uint64_t cluster_size_;
  const uint64_t length_;
  const BlockCopyOptions options_;
  std::unique_ptr<bitmap::DirtyBitmap> copy_bitmap_;
  std::vector<std::shared_ptr<Task>> in_flight_;
  uint64_t in_flight_bytes_ = 0;
  bool skip_unallocated_ = false;
  job::RateLimit rate_limit_;
  // Bumped by set_speed() and cancel(): a throttled call sleeping in slices notices it.
  uint64_t wake_generation_ = 0;
  Progress progress_;
};

}  // namespace strata::block::copy
