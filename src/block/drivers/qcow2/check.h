#pragma once
// Read-only consistency check of a qcow2 image (QEMU 10's qcow2_co_check_locked without repair:
// qcow2_check_refcounts and friends in block/qcow2-refcount.c). Builds the in-memory refcount
// table from every reference (header, active and snapshot L1/L2 tables with their data and
// compressed clusters, snapshot table, refcount table and blocks, bitmap directory and tables),
// compares it with the refcounts on disk, and checks OFLAG_COPIED, alignment and reserved bits.
// The classification and the messages are QEMU's: a refcount below the references is an error
// (corruption), above is a leak.

#include <cstdint>
#include <string>
#include <vector>

#include "aio/task.h"
#include "base/result.h"
#include "block/graph/node.h"

namespace strata::block::qcow2 {

// QEMU's BdrvCheckResult (without the repair counters).
struct CheckResult {
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t check_errors = 0;
  uint64_t image_end_offset = 0;
  uint64_t total_clusters = 0;  // guest clusters
  uint64_t allocated_clusters = 0;
  uint64_t fragmented_clusters = 0;
  uint64_t compressed_clusters = 0;
  // What qemu-img prints on stderr during the check, one line each ("ERROR cluster 5 refcount=0
  // reference=1", "Leaked cluster 9 refcount=1 reference=0", ...), in QEMU's order.
  std::vector<std::string> messages;
};

// Checks the qcow2 image stored in `file` (the protocol node under an opened qcow2 node, so the
// header has been validated already; it is parsed again here). Reads only. Fails when the
// header cannot be parsed or an I/O error stops the check (QEMU's "Check failed").
aio::Task<Result<CheckResult>> check_image(Node& file);

}  // namespace strata::block::qcow2
