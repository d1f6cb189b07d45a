#pragma once
// The stream job (QEMU's block/stream.c): copies into `top` every region that `top` reads from
// its backing chain above `base`, then makes `base` (or nothing) the backing file of `top`, in
// the image's metadata and in the graph; the nodes in between are released. Copies are
// copy-on-read requests of `top` (io::preadv with kRequestCopyOnRead), so a guest write that
// overlaps a copy waits for it, and a region a guest wrote first is not copied over. Up to four
// 512 KiB copies run at once.
//
// Errors follow `on_error` (QEMU's stream_run: stop pauses and retries the chunk, ignore moves
// on but the job still fails with the first error at the end, report fails at once).

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "block/graph/graph.h"
#include "block/job/block_job.h"

namespace strata::block::stream {

struct StreamOptions {
  std::string job_id;
  std::shared_ptr<Node> top;
  // The node whose backing file is the base (QEMU's above_base), nullptr to stream the whole
  // chain. The base is what lies below it when the job looks: another job's filter above the
  // base may come and go meanwhile.
  std::shared_ptr<Node> above_base;
  // The backing file name recorded in `top` afterwards (default: base's filename).
  std::optional<std::string> backing_file;
  bool backing_mask_protocol = false;  // record "raw" rather than a protocol driver name
  job::OnError on_error = job::OnError::kReport;
  job::Job::Flags flags;
  // A copy-on-read node opened on `top` and not used yet (QEMU's stream filter, named by
  // filter-node-name): while the job runs, every user of `top` goes through it, so guest reads
  // copy too; the users go back to `top` when the job ends. nullptr: no filter.
  std::shared_ptr<Node> filter;
};

// Builds the job with its root edge on `top` (consistent read and unchanged writes) after the
// permission checks, and inserts the filter; neither registered nor started.
Result<std::unique_ptr<job::BlockJob>> create_stream_job(Graph& graph, StreamOptions options);

}  // namespace strata::block::stream
