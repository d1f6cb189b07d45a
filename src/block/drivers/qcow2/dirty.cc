// The dirty bit (qcow2.rst "Header", incompatible feature bit 0) and lazy refcounts: repair of a
// dirty image at read-write open, setting the bit before the first allocating write under
// lazy-refcounts, clearing it at close (see qcow2_node.h for the contracts).

#include <cstdio>
#include <cstring>

#include "aio/event_loop.h"
#include "block/drivers/qcow2/check.h"
#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/drivers/qcow2/repair.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

aio::Task<Result<void>> Qcow2Node::repair_dirty_image() {
  auto print = [](const std::string& line, bool) { std::fprintf(stderr, "%s\n", line.c_str()); };
  Result<CheckResult> checked = co_await check_image(file(), kFixErrors | kFixLeaks, print);
  if (!checked || checked->check_errors != 0) {
    const int code = checked ? EIO : checked.error().errno_value();
    co_return Error(ErrorKind::kIo,
                    std::string("Could not repair dirty image: ") + std::strerror(code), code);
  }
  // The repair may have moved the refcount table and cleared the dirty bit: take the header as
  // it is now on disk.
  std::vector<uint8_t> cluster(header_.cluster_size());
  Result<void> read =
      co_await read_zero_padded(file(), 0, IoVector(cluster.data(), cluster.size()));
  if (!read) {
    co_return read.error().with_prefix("Could not read qcow2 header");
  }
  Result<Header> header = parse_header(cluster);
  if (!header) {
    co_return std::move(header).error();
  }
  header_ = *header;
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::mark_dirty() {
  if (!lazy_refcounts_ || (header_.incompatible_features & kIncompatDirty) != 0) {
    co_return ok();
  }
  Result<void> flushed = co_await io::flush(file());
  if (!flushed) {
    co_return flushed;
  }
  const uint64_t features = header_.incompatible_features | kIncompatDirty;
  Result<void> written = co_await write_incompatible_features(file(), features);
  if (!written) {
    co_return written;
  }
  // Only an image whose header says so is treated as dirty.
  header_.incompatible_features = features;
  co_return ok();
}

void Qcow2Node::mark_clean_at_close() {
  if (refcounts_ == nullptr || (header_.incompatible_features & kIncompatDirty) == 0 ||
      child("file") == nullptr || !file().is_writable()) {
    return;
  }
  auto clean = [this]() -> aio::Task<Result<void>> {
    // Metadata the node may still cache goes to disk before the bit says it is all there.
    Result<void> flushed = co_await co_flush();
    if (flushed) {
      flushed = co_await io::flush(file());
    }
    if (!flushed) {
      co_return flushed;
    }
    // Only the dirty bit: a corrupt bit set during this session stays.
    const uint64_t features = header_.incompatible_features & ~kIncompatDirty;
    Result<void> cleared = co_await write_incompatible_features(file(), features);
    if (!cleared) {
      co_return cleared;
    }
    header_.incompatible_features = features;
    co_return ok();
  };
  // Close and inactivation are synchronous: run the update on a private loop, as open does.
  auto loop = aio::EventLoop::create(16);
  Result<void> done = loop ? (*loop)->block_on(clean()) : Result<void>(std::move(loop).error());
  if (!done) {
    std::fprintf(stderr, "qcow2: could not mark the image clean: %s\n",
                 done.error().message().c_str());
  }
}

}  // namespace strata::block::qcow2
