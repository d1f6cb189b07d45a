// The multifd worker pool, progress reporting, and the checks shared by savers and loaders.

#include <fmt/format.h>

#include <optional>
#include <thread>

#include "migration/internal.h"

namespace strata::migration {

std::vector<BlockShape> shapes_of(std::span<const RamBlock> blocks) {
  std::vector<BlockShape> shapes;
  shapes.reserve(blocks.size());
  for (const RamBlock& block : blocks) {
    shapes.push_back(BlockShape{block.name, block.length, block.page_size});
  }
  return shapes;
}

namespace internal {

// QEMU's multifd-channels limit.
constexpr unsigned kMaxChannels = 255;

Result<void> run_on_channels(unsigned channels, uint64_t items,
                             const std::function<Result<void>(unsigned, uint64_t)>& work) {
  if (channels == 0) {
    for (uint64_t item = 0; item < items; ++item) {
      auto done = work(0, item);
      if (!done.ok()) {
        return done;
      }
    }
    return ok();
  }
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::optional<Error> first_error;  // guarded by error_mutex
  auto worker = [&](unsigned channel) {
    while (!failed.load(std::memory_order_relaxed)) {
      uint64_t item = next.fetch_add(1, std::memory_order_relaxed);
      if (item >= items) {
        return;
      }
      auto done = work(channel, item);
      if (!done.ok()) {
        std::lock_guard lock(error_mutex);
        if (!first_error) {
          first_error = std::move(done).error();
        }
        failed.store(true, std::memory_order_relaxed);
        return;
      }
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(channels);
  for (unsigned channel = 0; channel < channels; ++channel) {
    threads.emplace_back(worker, channel);
  }
  for (std::thread& thread : threads) {
    thread.join();
  }
  if (first_error) {
    return std::move(*first_error);
  }
  return ok();
}

void Progress::add(uint64_t bytes) {
  std::lock_guard lock(mutex_);
  done_ += bytes;
  if (options_.progress) {
    options_.progress(done_, total_);
  }
}

Result<void> Progress::check_cancelled() const {
  if (options_.cancel != nullptr && options_.cancel->load(std::memory_order_relaxed)) {
    return Error(ErrorKind::kCancelled, "migration cancelled");
  }
  return ok();
}

Result<std::vector<size_t>> match_blocks(std::span<const BlockRecord> stream_blocks,
                                         std::span<const RamBlock> destination) {
  std::vector<size_t> mapping;
  std::vector<bool> used(destination.size(), false);
  for (const BlockRecord& record : stream_blocks) {
    size_t found = destination.size();
    for (size_t i = 0; i < destination.size(); ++i) {
      if (destination[i].name == record.name) {
        found = i;
        break;
      }
    }
    if (found == destination.size()) {
      return Error(ErrorKind::kInvalidArgument,
                   fmt::format("Unknown RAM block \"{}\", cannot accept migration", record.name));
    }
    const RamBlock& block = destination[found];
    if (block.length != record.length) {
      return Error(ErrorKind::kInvalidArgument,
                   fmt::format("Length mismatch: {}: {:#x} in != {:#x}", record.name, record.length,
                               block.length));
    }
    if (block.page_size != record.page_size) {
      return Error(ErrorKind::kInvalidArgument,
                   fmt::format("Page size mismatch: {}: {} in != {}", record.name, record.page_size,
                               block.page_size));
    }
    used[found] = true;
    mapping.push_back(found);
  }
  for (size_t i = 0; i < destination.size(); ++i) {
    if (!used[i]) {
      return Error(ErrorKind::kInvalidArgument,
                   fmt::format("RAM block \"{}\" is missing from the migration stream",
                               destination[i].name));
    }
  }
  return mapping;
}

Result<void> check_transfer_options(std::span<const RamBlock> blocks,
                                    const TransferOptions& options) {
  auto shapes = shapes_of(blocks);
  auto checked = check_block_shapes(shapes);
  if (!checked.ok()) {
    return checked;
  }
  for (const RamBlock& block : blocks) {
    if (block.host == nullptr) {
      return Error(ErrorKind::kInvalidArgument,
                   fmt::format("RAM block \"{}\" has no memory", block.name));
    }
  }
  if (options.multifd_channels > kMaxChannels) {
    return Error(ErrorKind::kInvalidArgument,
                 fmt::format("multifd-channels must be at most {}", kMaxChannels));
  }
  if (options.multifd_channels > 0 && !options.mapped_ram) {
    return Error(ErrorKind::kInvalidArgument,
                 "multifd channels to a file need the mapped-ram capability");
  }
  if (options.direct_io) {
    if (!options.mapped_ram || options.multifd_channels == 0) {
      return Error(ErrorKind::kInvalidArgument,
                   "direct-io needs the mapped-ram and multifd capabilities");
    }
    for (const RamBlock& block : blocks) {
      if (reinterpret_cast<uintptr_t>(block.host) % kMinPageSize != 0) {
        return Error(ErrorKind::kInvalidArgument,
                     fmt::format("direct-io: the memory of RAM block \"{}\" is not page-aligned",
                                 block.name));
      }
    }
  }
  return ok();
}

}  // namespace internal
}  // namespace strata::migration
