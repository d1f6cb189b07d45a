#pragma once
// The commit job for an intermediate layer (QEMU's block/commit.c, commit_start): copies into
// `base` every region that `top` or a layer between them holds, then makes `base` the backing
// file of `top`'s overlay (image metadata and graph); `top` and the layers in between leave the
// chain. The base is written through a root edge that takes the write permission, so a base
// opened read-only with auto-read-only is reopened read-write for the job and read-only again
// afterwards (dynamic read-only). A base shorter than `top` is grown first.
//
// Committing the active layer (QEMU's commit_active_start) is a mirror job: see
// block/mirror/mirror_job.h.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "block/graph/graph.h"
#include "block/job/block_job.h"

namespace strata::block::commit {

struct CommitOptions {
  std::string job_id;
  std::shared_ptr<Node> top;      // not the active layer: some node has it as backing file
  std::shared_ptr<Node> base;     // in top's backing chain
  std::shared_ptr<Node> overlay;  // the node whose backing file is `top`
  std::optional<std::string> backing_file;  // recorded in the overlay (default base's filename)
  bool backing_mask_protocol = false;
  job::OnError on_error = job::OnError::kReport;
  // The name of the commit_top filter above `top` while the job runs (default: generated).
  std::optional<std::string> filter_node_name;
  job::Job::Flags flags;
};

Result<std::unique_ptr<job::BlockJob>> create_commit_job(Graph& graph, CommitOptions options);

}  // namespace strata::block::commit
