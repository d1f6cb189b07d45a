#pragma once
// The mirror job (QEMU's block/mirror.c): blockdev-mirror, and block-commit of the active layer,
// which QEMU builds on it (commit_active_start).
//
// The job inserts a mirror_top filter above the source (MirrorTopNode) and copies every dirty
// region of the source to the target, up to 16 copies and buf-size bytes in flight. The source's
// dirty bitmap starts as the sync mode says (full: everything that does not already read the same
// on the target; top: what the source's own layers hold above its backing file; none: nothing)
// and guest writes dirty it further (copy-mode background) or go to the target themselves
// (write-blocking). When nothing is dirty or in flight the job is READY (BLOCK_JOB_READY) and
// keeps the target in sync until:
// - job-complete: with the source drained and nothing dirty, the target replaces the source (or
//   `replaces`) in the graph: every user of the source now uses the target (the pivot);
// - block-job-cancel (not forced) once ready: the same final sync without the pivot; the job
//   completes and the target is a consistent copy;
// - a forced cancel, or a failure under the error policies: the filter goes, nothing else moves.
//
// Active commit: the target is the base of the source's chain; only what lies above the base is
// copied, the base is made writable for the job (auto-read-only), and after the pivot the base is
// the active layer.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "block/graph/graph.h"
#include "block/job/block_job.h"
#include "block/mirror/mirror_core.h"

namespace strata::block::mirror {

// QAPI MirrorSyncMode (the modes a mirror supports).
enum class SyncMode { kFull, kTop, kNone };

struct MirrorOptions {
  std::string job_id;
  std::shared_ptr<Node> source;
  std::shared_ptr<Node> target;
  // The node the target replaces at the pivot (default: the source).
  std::shared_ptr<Node> replaces;
  SyncMode sync = SyncMode::kFull;
  // Granularity of the dirty bitmap (a power of two, 512 B..64 MiB); 0: QEMU's default from
  // the target's cluster size.
  uint64_t granularity = 0;
  // Bytes in flight at most; 0: QEMU's default (16 MiB).
  uint64_t buf_size = 0;
  job::OnError on_source_error = job::OnError::kReport;
  job::OnError on_target_error = job::OnError::kReport;
  std::optional<std::string> filter_node_name;
  CopyMode copy_mode = CopyMode::kBackground;
  // Active commit: the target is the base of the source's chain (job type "commit").
  bool is_commit = false;
  job::Job::Flags flags;
};

// Builds the job and inserts its filter. Fails with QEMU's messages when the filter name is taken
// or the permissions conflict (the graph is then unchanged).
Result<std::unique_ptr<job::BlockJob>> create_mirror_job(Graph& graph, MirrorOptions options);

}  // namespace strata::block::mirror
