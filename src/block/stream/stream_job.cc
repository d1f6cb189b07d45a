#include "block/stream/stream_job.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include "aio/event_loop.h"
#include "aio/task_group.h"
#include "block/io/bounce_buffer.h"
#include "block/io/request.h"

namespace strata::block::stream {

namespace {

// QEMU's STREAM_CHUNK.
constexpr uint64_t kChunk = 512 << 10;
// The longest single sleep of the rate limit, so that pause and cancel stay responsive.

// Copies in flight at once (QEMU copies one chunk at a time).
constexpr size_t kParallel = 4;

class StreamJob : public job::BlockJob, public BlockParent {
 public:
  StreamJob(Graph& graph, StreamOptions options)
      : BlockJob(options.job_id, "stream", options.flags),
        graph_(graph),
        options_(std::move(options)) {}

  ~StreamJob() override { release(); }

  std::string parent_description() const override { return "stream job '" + id() + "'"; }
  bool stays_at_node() const override { return true; }

  Result<void> attach() {
    auto root =
        graph_.attach_root(*this, options_.top, "top", kRoleData,
                           kPermConsistentRead | kPermWriteUnchanged, kPermAll & ~kPermResize);
    if (!root) {
      return std::move(root).error();
    }
    root_ = std::move(root).value();
    if (options_.filter) {
      auto inserted = graph_.replace_node(*options_.top, options_.filter);
      if (!inserted) {
        release();
        return inserted;
      }
      filter_inserted_ = true;
    }
    return ok();
  }

 protected:
  aio::Task<Result<void>> run() override {
    Node& top = *options_.top;
    const uint64_t length = top.length();
    progress_set_remaining(length);
    std::vector<Piece> batch;
    // Page-aligned staging buffers: copy-on-read prefetches read straight into them.
    std::vector<io::BounceBuffer> buffers;
    for (size_t i = 0; i < kParallel; ++i) {
      Result<io::BounceBuffer> buffer = io::BounceBuffer::allocate(kChunk, 4096);
      if (!buffer) {
        co_return buffer.error();
      }
      buffers.push_back(std::move(buffer).value());
    }
    std::optional<Error> first_error;
    for (uint64_t offset = 0; offset < length;) {
      if (is_cancelled()) {
        co_return ok();
      }
      co_await pause_point();
      if (is_cancelled()) {
        co_return ok();
      }
      // The next kParallel regions to copy (regions to skip are accounted on the way).
      batch.clear();
      // Under a speed limit one copy at a time keeps the pace even (and pauses prompt).
      const size_t parallel = speed() == 0 ? kParallel : 1;
      while (offset < length && batch.size() < parallel) {
        Result<Piece> piece = co_await next_piece(offset, length);
        if (!piece) {
          co_return piece.error();
        }
        offset += piece->bytes;
        if (piece->copy) {
          batch.push_back(*piece);
        } else {
          progress_update(piece->bytes);
        }
      }
      // Copy them at once: each is its own copy-on-read request.
      aio::TaskGroup copies;
      for (size_t i = 0; i < batch.size(); ++i) {
        copies.spawn([](Node& node, Piece& piece, char* buffer) -> aio::Task<void> {
          piece.result = co_await io::preadv(node, piece.offset, IoVector(buffer, piece.bytes),
                                             kRequestCopyOnRead | kRequestPrefetch);
        }(top, batch[i], buffers[i].data()));  // (piece.bytes <= kChunk)
      }
      co_await copies.wait();
      uint64_t copied = 0;
      for (const Piece& piece : batch) {
        if (!piece.result) {
          const job::ErrorAction action =
              error_action(options_.on_error, /*is_read=*/true, piece.result.error().errno_value());
          if (action == job::ErrorAction::kStop) {
            offset = piece.offset;  // the job is paused; go on from here after the resume
            break;
          }
          if (!first_error) {
            first_error = piece.result.error();
          }
          if (action == job::ErrorAction::kReport) {
            co_return Error::from_errno(first_error->errno_value(), "");
          }
        }
        progress_update(piece.bytes);
        copied += piece.bytes;
      }
      co_await rate_limit_sleep(copied);
    }
    if (first_error) {
      co_return Error::from_errno(first_error->errno_value(), "");
    }
    co_return co_await change_backing();
  }

  void clean() override { release(); }

 private:
  // A region from `offset`: either one to copy (read from the chain above the base) or one to
  // skip (the top holds it, or it comes from the base or below).
  struct Piece {
    uint64_t offset = 0;
    uint64_t bytes = 0;
    bool copy = false;
    Result<void> result = ok();
  };

  aio::Task<Result<Piece>> next_piece(uint64_t offset, uint64_t length) {
    Node& top = *options_.top;
    Piece piece{offset, std::min(kChunk, length - offset), false};
    Result<BlockStatus> own = co_await top.co_block_status(offset, piece.bytes);
    if (!own) {
      co_return own.error();
    }
    piece.bytes = std::min(piece.bytes, std::max<uint64_t>(own->bytes, 1));
    Child* backing = top.backing_child();
    if (!own->allocated_here() && backing != nullptr) {
      Result<io::Allocation> above =
          co_await io::is_allocated_above(*backing->node(), base(), offset, piece.bytes);
      if (!above) {
        co_return above.error();
      }
      piece.bytes = above->bytes;
      piece.copy = above->allocated;
    }
    co_return piece;
  }

  // The base as it is now (nullptr: none).
  Node* base() const { return options_.above_base ? filter_or_cow(*options_.above_base) : nullptr; }

  // QEMU's stream_prepare: the new backing file name and format in the image (the base's, past
  // any filter above it), then the graph.
  aio::Task<Result<void>> change_backing() {
    Node& top = *options_.top;
    Node* new_base = base();
    std::string name;
    std::string format;
    if (new_base != nullptr) {
      Node* unfiltered = new_base;
      while (unfiltered->is_filter() && unfiltered->primary_child() != nullptr) {
        unfiltered = unfiltered->primary_child()->node();
      }
      // The image's own file name: the node's name may be a json: description meanwhile (its
      // backing link is overridden while another job in the chain changes it).
      Child* file = unfiltered->primary_child();
      name = options_.backing_file.value_or(file != nullptr ? file->node()->filename()
                                                            : unfiltered->filename());
      format = unfiltered->format_name();
      if (options_.backing_mask_protocol && unfiltered->primary_child() == nullptr) {
        format = "raw";  // a protocol node: record the data as a raw image
      }
    }
    Result<void> changed = co_await top.co_change_backing_file(name, format);
    if (!changed) {
      co_return changed;
    }
    // Looked up again: a filter above the base may have gone while the header was written.
    new_base = base();
    Child* backing = top.backing_child();
    if (backing == nullptr) {
      co_return ok();
    }
    if (new_base == nullptr) {
      graph_.detach_child(backing);
      co_return ok();
    }
    co_return graph_.replace_child(backing, new_base->shared_from_this());
  }

  void release() {
    if (filter_inserted_) {
      filter_inserted_ = false;
      ignore_error(graph_.replace_node(*options_.filter, options_.top),
                   "the users of the top return to it");
    }
    io::release_when_idle(std::move(options_.filter));
    if (root_) {
      graph_.detach_root(std::move(root_));
    }
  }

  Graph& graph_;
  StreamOptions options_;
  std::unique_ptr<Child> root_;
  bool filter_inserted_ = false;
};

}  // namespace

Result<std::unique_ptr<job::BlockJob>> create_stream_job(Graph& graph, StreamOptions options) {
  auto job = std::make_unique<StreamJob>(graph, std::move(options));
  auto attached = job->attach();
  if (!attached) {
    return std::move(attached).error();
  }
  return std::unique_ptr<job::BlockJob>(std::move(job));
}

}  // namespace strata::block::stream
