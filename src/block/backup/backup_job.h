#pragma once
// The backup job (QEMU's block/backup.c): a point-in-time copy of `source` into `target`. From the
// moment the job starts, every write, write-zeroes or discard that reaches the source first has
// block-copy save the old contents of the clusters it touches to the target (copy-before-write,
// hooked as a write notifier of the source so that every writer - exports, other jobs - is
// covered); meanwhile the job copies the remaining clusters in the background.
//
// sync modes: full (every cluster), top (clusters allocated in the source's own layer), none
// (only what guest writes would change: the job runs until cancelled), bitmap (the clusters set in
// `bitmap`; `incremental` is bitmap with bitmap-mode on-success). A sync bitmap is frozen
// (disabled) for the job; writes during the job go to a successor the job keeps, and at the end
// the bitmap becomes the successor (on success or bitmap-mode always, "abdicate") or the union of
// both (otherwise, "reclaim"); with always and a failure, the clusters not copied are added back.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "block/bitmap/dirty_bitmap.h"
#include "block/copy/block_copy.h"
#include "block/graph/graph.h"
#include "block/job/block_job.h"

namespace strata::block::backup {

enum class SyncMode { kTop, kFull, kNone, kIncremental, kBitmap };
enum class BitmapMode { kOnSuccess, kNever, kAlways };

struct BackupOptions {
  std::string job_id;
  std::shared_ptr<Node> source;
  std::shared_ptr<Node> target;
  SyncMode sync = SyncMode::kFull;        // never kIncremental here: the command desugars it
  bitmap::DirtyBitmap* bitmap = nullptr;  // on `source`
  BitmapMode bitmap_mode = BitmapMode::kOnSuccess;
  bool compress = false;
  bool discard_source = false;
  uint64_t speed = 0;
  job::OnError on_source_error = job::OnError::kReport;
  job::OnError on_target_error = job::OnError::kReport;
  job::Job::Flags flags;
  int max_workers = copy::kDefaultMaxWorkers;
  uint64_t max_chunk = 0;
  uint64_t min_cluster_size = 0;
};

// Checks what QEMU's backup_job_create checks (same node, sizes, compression support) and builds
// the job with its root edges on source and target. `warning` receives the cluster-size warning
// QEMU prints for targets without a cluster size. The job is neither registered nor started.
Result<std::unique_ptr<job::BlockJob>> create_backup_job(Graph& graph, BackupOptions options,
                                                         std::optional<std::string>& warning);

}  // namespace strata::block::backup
