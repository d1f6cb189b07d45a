// The list of drivers built into strata. A new driver adds one line here.

#include "block/drivers/blkdebug/blkdebug_node.h"
#include "block/drivers/cbw/cbw_node.h"
#include "block/drivers/cor/cor_node.h"
#include "block/drivers/driver.h"
#include "block/drivers/file/file_node.h"
#include "block/drivers/http/http_node.h"
#include "block/drivers/nbd/nbd_node.h"
#include "block/drivers/null/null_node.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/drivers/raw/raw_node.h"
#include "block/drivers/snapshot_access/snapshot_access_node.h"
#include "block/drivers/throttle/throttle_node.h"

namespace strata::block {

namespace {
const Driver kDrivers[] = {
    {"blkdebug", &BlkdebugNode::parse, &BlkdebugNode::open},
    {"copy-before-write", &CbwNode::parse, &CbwNode::open},
    {"copy-on-read", &CorNode::parse, &CorNode::open},
    {"file", &FileNode::parse, &FileNode::open},
    {"http", &HttpNode::parse_http, &HttpNode::open},
    {"https", &HttpNode::parse_https, &HttpNode::open},
    {"nbd", &NbdNode::parse, &NbdNode::open},
    {"null-aio", &NullNode::parse, &NullNode::open_aio},
    {"null-co", &NullNode::parse, &NullNode::open_co},
    {"qcow2", &qcow2::Qcow2Node::parse, &qcow2::Qcow2Node::open},
    {"raw", &RawNode::parse, &RawNode::open},
    {"snapshot-access", &SnapshotAccessNode::parse, &SnapshotAccessNode::open},
    {"throttle", &ThrottleNode::parse, &ThrottleNode::open},
};
}  // namespace

std::span<const Driver> all_drivers() {
  return kDrivers;
}

}  // namespace strata::block
