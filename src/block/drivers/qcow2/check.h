#pragma once
// Consistency check and repair of a qcow2 image (QEMU 10's qcow2_co_check_locked:
// qcow2_check_refcounts and friends in block/qcow2-refcount.c; the writing half is repair.h).
// Builds the in-memory refcount table from every reference (header, active and snapshot L1/L2
// tables with their data and compressed clusters, snapshot table, refcount table and blocks, bitmap
// directory and tables), compares it with the refcounts on disk, and checks OFLAG_COPIED, alignment
// and reserved bits. The classification and the messages are QEMU's: a refcount below the
// references is an error (corruption), above is a leak.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "aio/task.h"
#include "base/result.h"
#include "block/graph/node.h"

namespace strata::block::qcow2 {

// QEMU's BdrvCheckResult.
struct CheckResult {
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;
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

// Receives each message as the check finds it (QEMU prints them to stderr as it goes, so they
// come before "Check failed" too), and whether QEMU prints it through error_report (with the
// program name in front). Without a sink they are collected in CheckResult::messages.
using CheckMessageSink = std::function<void(const std::string& line, bool program_prefixed)>;

// Checks the qcow2 image stored in `file` (the protocol node under an opened qcow2 node, or the
// file of one, so the header has been validated already; it is parsed again here). Fails when
// the header cannot be parsed or an I/O error stops the check (QEMU's "Check failed").
//
// `fix` (kFixLeaks | kFixErrors of repair.h, 0 to only read) repairs as QEMU does: refcounts
// above the references with kFixLeaks, below them with kFixErrors, a refcount structure that
// cannot be patched (a referenced cluster with refcount 0, a broken refcount table entry) is
// rebuilt with kFixErrors ("ERROR need to rebuild refcount structures" and EIO without it),
// OFLAG_COPIED is corrected, unaligned preallocated zero clusters become plain zero clusters, and
// when nothing is left broken the dirty and corrupt bits are cleared. Repair writes `file`
// directly: no Qcow2Node may hold cached metadata of it for writing meanwhile.
aio::Task<Result<CheckResult>> check_image(Node& file, uint32_t fix = 0,
                                           CheckMessageSink sink = {});

}  // namespace strata::block::qcow2
