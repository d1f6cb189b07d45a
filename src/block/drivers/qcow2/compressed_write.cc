// qcow2 compressed writes (QEMU's qcow2_co_pwritev_compressed_part,
// qcow2_alloc_compressed_cluster_offset and qcow2_alloc_bytes).
//
// A request with kRequestWriteCompressed covers whole clusters (the last one may end at the end
// of the image and is zero-padded). Every cluster is compressed on the compression thread pool,
// all clusters of the request in parallel and outside the metadata lock; then, under the
// exclusive lock, each compressed cluster gets a byte range packed after the previous one (host
// clusters are shared by several compressed clusters, each holding one reference), the data is
// written, flushed, and the L2 entries are published. Clusters that do not compress are written
// like a normal write. Crash ordering is the writer's (qcow2_node.h): refcounts and data, flush,
// L2/L1 entry, flush, release of what the entries replaced.

#include <algorithm>
#include <map>
#include <thread>

#include "aio/task_group.h"
#include "aio/thread_pool.h"
#include "block/drivers/blkdebug/events.h"
#include "block/drivers/qcow2/compressed.h"
#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

namespace {

// Compression runs here, one worker per core, shared by every qcow2 node of the process.
aio::ThreadPool& compression_pool() {
  static aio::ThreadPool pool(std::max(1u, std::thread::hardware_concurrency()));
  return pool;
}

struct CompressJob {
  std::vector<uint8_t> input;  // one cluster
  Result<std::optional<std::vector<uint8_t>>> output = std::optional<std::vector<uint8_t>>();
};

aio::Task<void> compress_on_pool(uint8_t compression_type, CompressJob& job) {
  job.output = co_await compression_pool().run(
      [&job, compression_type] { return compress(compression_type, job.input); });
}

}  // namespace

aio::Task<Result<void>> Qcow2Node::write_compressed(uint64_t offset, uint64_t bytes,
                                                    IoVector qiov) {
  const uint64_t cluster_size = header_.cluster_size();
  if ((offset & (cluster_size - 1)) != 0 ||
      ((bytes & (cluster_size - 1)) != 0 && offset + bytes != length())) {
    co_return Error(ErrorKind::kInvalidArgument,
                    "qcow2: compressed writes must cover whole clusters", EINVAL);
  }
  const uint64_t count = (bytes + cluster_size - 1) / cluster_size;
  std::vector<CompressJob> jobs(count);
  {
    aio::TaskGroup group;
    for (uint64_t i = 0; i < count; ++i) {
      const uint64_t n = std::min(cluster_size, bytes - i * cluster_size);
      jobs[i].input.assign(cluster_size, 0);  // the tail past the image end is zero-padded
      qiov.copy_to(i * cluster_size, jobs[i].input.data(), n);
      group.spawn(compress_on_pool(header_.compression_type, jobs[i]));
    }
    co_await group.wait();
  }
  for (const CompressJob& job : jobs) {
    if (!job.output) {
      co_return job.output.error();
    }
  }

  auto exclusive = co_await lock_.scoped_write_lock();
  // Runs of clusters that do not compress go out first, each as one normal write (which
  // publishes its own entries and takes meta_ itself).
  for (uint64_t i = 0; i < count; ++i) {
    if (*jobs[i].output) {
      continue;
    }
    uint64_t end = i + 1;
    uint64_t run_bytes = std::min(cluster_size, bytes - i * cluster_size);
    while (end < count && !*jobs[end].output) {
      run_bytes += std::min(cluster_size, bytes - end * cluster_size);
      ++end;
    }
    Result<uint64_t> plain = co_await write_clusters(
        offset + i * cluster_size, run_bytes, qiov.slice(i * cluster_size, run_bytes), 0, true);
    if (!plain) {
      co_return std::move(plain).error();
    }
    i = end - 1;
  }
  auto meta = co_await meta_.scoped_lock();
  // Allocation of the compressed clusters in guest order: the cluster's L2 table first, then its
  // compressed bytes (packed after the previous ones). Compressed data that ends up contiguous in
  // the file is written with one request.
  const uint32_t csize_shift = 62 - (header_.cluster_bits - 8);
  std::vector<uint64_t> host(count, 0);
  struct Run {
    uint64_t start = 0;
    IoVector data;
  };
  std::vector<Run> runs;
  std::map<uint64_t, uint64_t> pending_references;
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t guest = offset + i * cluster_size;
    if (!*jobs[i].output) {
      continue;
    }
    Result<L2Ref> table = co_await ensure_l2_table(guest >> header_.cluster_bits);
    if (!table) {
      co_return std::move(table).error();
    }
    std::vector<uint8_t>& data = **jobs[i].output;
    Result<uint64_t> at = co_await allocate_compressed_bytes(data.size(), pending_references);
    if (!at) {
      co_return std::move(at).error();
    }
    host[i] = *at;
    if (runs.empty() || runs.back().start + runs.back().data.size() != *at) {
      runs.push_back(Run{*at, IoVector()});
    }
    runs.back().data.append(data.data(), data.size());
  }
  // The references of packed clusters, one refcount update per host cluster.
  for (const auto& [cluster, references] : pending_references) {
    Result<void> counted = co_await refcounts_->update(cluster << header_.cluster_bits, 1,
                                                       static_cast<int64_t>(references));
    if (!counted) {
      co_return counted;
    }
  }
  for (Run& run : runs) {
    block::debug_event(child("file"), BlkdebugEvent::kWriteCompressed);
    Result<void> written = co_await write_growing(file(), run.start, run.data);
    if (!written) {
      co_return written;
    }
  }
  Result<void> flushed = co_await sync_metadata();
  if (!flushed) {
    co_return flushed;
  }

  // Publish one L2 entry per compressed cluster (no OFLAG_COPIED: the host cluster is shared),
  // consecutive entries of one L2 table with one write.
  std::vector<uint64_t> replaced;
  for (uint64_t i = 0; i < count;) {
    if (!*jobs[i].output) {
      ++i;
      continue;
    }
    Result<L2Ref> first = co_await l2_ref((offset >> header_.cluster_bits) + i);
    if (!first) {
      co_return std::move(first).error();
    }
    std::vector<uint64_t> entries;
    for (uint64_t j = i; j < count && *jobs[j].output; ++j) {
      const uint64_t guest_cluster = (offset >> header_.cluster_bits) + j;
      if (j != i && (guest_cluster >> header_.l2_bits()) != first->l1_index) {
        break;
      }
      Result<L2Ref> ref = co_await l2_ref(guest_cluster);
      if (!ref) {
        co_return std::move(ref).error();
      }
      if (needs_release(ref->entry)) {
        replaced.push_back(ref->entry);
      }
      const uint64_t size = (*jobs[j].output)->size();
      // qcow2.rst: the sector count field holds the number of additional 512-byte sectors.
      const uint64_t sectors = ((host[j] + size - 1) >> 9) - (host[j] >> 9);
      entries.push_back(host[j] | kOflagCompressed | (sectors << csize_shift));
    }
    block::debug_event(child("file"), BlkdebugEvent::kL2UpdateCompressed);
    Result<void> written = co_await write_l2_entries(first->l2_offset, first->l2_index, entries);
    if (!written) {
      co_return written;
    }
    i += entries.size();
  }
  // release_entry orders each drop after the L2 entries that replaced it (write_back.cc).
  for (uint64_t entry : replaced) {
    Result<void> released = co_await release_entry(entry);
    if (!released) {
      co_return released;
    }
  }
  co_return ok();
}

aio::Task<Result<Qcow2Node::L2Ref>> Qcow2Node::ensure_l2_table(uint64_t guest_cluster) {
  Result<L2Ref> ref = co_await l2_ref(guest_cluster);
  if (!ref) {
    co_return ref;
  }
  // A table shared with a snapshot is copied first (snapshot.cc); a missing one is allocated
  // empty and made durable before the L1 entry points at it (write.cc).
  // (Not a ?: of two co_awaits: GCC 12 miscompiles that.)
  Result<uint64_t> table = uint64_t{0};
  if (ref->l2_offset != 0) {
    table = co_await writable_l2_table(ref->l1_index, ref->l2_offset);
  } else {
    table = co_await allocate_l2_table(ref->l1_index);
  }
  if (!table) {
    co_return std::move(table).error();
  }
  co_return co_await l2_ref(guest_cluster);
}

aio::Task<Result<uint64_t>> Qcow2Node::allocate_compressed_bytes(
    uint64_t size, std::map<uint64_t, uint64_t>& pending) {
  // QEMU's qcow2_alloc_bytes: pack after the previous compressed cluster when the rest of its
  // host cluster (plus, if it is free, the next host cluster) holds `size` bytes; every host
  // cluster the range touches gains one reference.
  const uint64_t cluster_size = header_.cluster_size();
  const uint32_t cluster_bits = header_.cluster_bits;
  uint64_t offset = free_byte_offset_;
  if (offset != 0) {
    Result<uint64_t> refcount = co_await refcounts_->get(offset >> cluster_bits);
    if (!refcount) {
      co_return std::move(refcount).error();
    }
    const uint64_t max_refcount =
        header_.refcount_order >= 6 ? ~uint64_t{0}
                                    : (uint64_t{1} << (uint64_t{1} << header_.refcount_order)) - 1;
    auto waiting = pending.find(offset >> cluster_bits);
    const uint64_t counted = *refcount + (waiting == pending.end() ? 0 : waiting->second);
    if (*refcount == 0 || counted >= max_refcount) {
      offset = 0;  // freed meanwhile, or no reference left to hand out
    }
  }
  const uint64_t free_in_cluster = offset == 0 ? 0 : cluster_size - (offset & (cluster_size - 1));
  uint64_t result = 0;
  if (offset != 0 && free_in_cluster >= size) {
    ++pending[offset >> cluster_bits];
    result = offset;
  } else {
    // allocate() hands out the new host cluster with refcount 1: this range's reference.
    Result<uint64_t> fresh = co_await refcounts_->allocate(1);
    if (!fresh) {
      co_return std::move(fresh).error();
    }
    if (offset != 0 && offset + free_in_cluster == *fresh) {
      ++pending[offset >> cluster_bits];
      result = offset;
    } else {
      result = *fresh;
    }
  }
  free_byte_offset_ = result + size;
  if ((free_byte_offset_ & (cluster_size - 1)) == 0) {
    free_byte_offset_ = 0;
  }
  co_return result;
}

}  // namespace strata::block::qcow2
