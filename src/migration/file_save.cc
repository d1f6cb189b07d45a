// Saving RAM blocks to a file: mapped-ram with optional multifd workers and direct-io, or the
// streaming form written sequentially.
//
// Order of a mapped-ram save (what makes an interrupted save harmless):
//   1. the main channel zeroes the header and sizes the file to the pages' end;
//   2. the workers write the present pages at their fixed offsets and fill the bitmaps;
//   3. the main channel writes the bitmaps, the block table, the trailer and END, and truncates the
//      file at END;
//   4. fdatasync, then the header, then fdatasync: a readable header means a complete file.

#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>

#include <atomic>

#include "migration/crc32c.h"
#include "migration/internal.h"
#include "migration/stream.h"
#include "migration/wire.h"

namespace strata::migration {

namespace {

using internal::OwnedFd;

Result<void> sync_file(int fd, bool enabled) {
  if (enabled && ::fdatasync(fd) != 0) {
    return Error::from_errno(errno, "fdatasync");
  }
  return ok();
}

Result<void> truncate_file(int fd, uint64_t size) {
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    return Error::from_errno(errno, "ftruncate");
  }
  return ok();
}

// Writes pages [chunk.first_page, +page_count) of `block` that are not zero at their fixed offsets
// through `fd`, as few writes as the zero pages allow; sets their bits in `bitmap`.
Result<uint64_t> save_chunk(int fd, const RamBlock& block, const BlockRecord& record,
                            const internal::Chunk& chunk, std::span<uint8_t> bitmap) {
  const uint64_t page_size = block.page_size;
  uint64_t present = 0;
  uint64_t run_start = 0;
  uint64_t run_pages = 0;
  auto flush = [&]() -> Result<void> {
    if (run_pages == 0) {
      return ok();
    }
    uint64_t offset = run_start * page_size;
    auto written = internal::pwrite_all(fd, block.host + offset, run_pages * page_size,
                                        record.pages_offset + offset);
    run_pages = 0;
    return written;
  };
  for (uint64_t page = chunk.first_page; page < chunk.first_page + chunk.page_count; ++page) {
    if (internal::is_zero_page(block.host + page * page_size, page_size)) {
      auto flushed = flush();
      if (!flushed.ok()) {
        return std::move(flushed).error();
      }
      continue;
    }
    internal::bitmap_set(bitmap, page);
    ++present;
    if (run_pages == 0) {
      run_start = page;
    }
    ++run_pages;
  }
  auto flushed = flush();
  if (!flushed.ok()) {
    return std::move(flushed).error();
  }
  return present;
}

Result<TransferStats> save_mapped_ram(std::span<const RamBlock> blocks, const std::string& path,
                                      int main_fd, const TransferOptions& options) {
  const auto shapes = shapes_of(blocks);
  MappedRamLayout layout = plan_mapped_ram_layout(shapes, options.offset);
  TransferStats stats;
  for (const BlockRecord& record : layout.blocks) {
    stats.ram_total += record.length;
    stats.pages_total += record.page_count();
  }

  FileHeader header;
  header.capabilities = kCapMappedRam;
  header.page_size = blocks[0].page_size;
  header.block_count = static_cast<uint32_t>(blocks.size());
  header.ram_total = stats.ram_total;
  header.base_offset = options.offset;
  header.trailer_offset = layout.trailer_offset;
  header.multifd_channels = options.multifd_channels;
  header.writer_flags = (options.multifd_channels > 0 ? kWrittenWithMultifd : 0) |
                        (options.direct_io ? kWrittenWithDirectIo : 0);

  const std::array<uint8_t, kHeaderSize> no_header{};
  auto step = internal::pwrite_all(main_fd, no_header.data(), no_header.size(), options.offset);
  if (step.ok()) {
    step = truncate_file(main_fd, layout.trailer_offset);
  }
  if (!step.ok()) {
    return std::move(step).error();
  }

  std::vector<OwnedFd> channel_fds;
  for (unsigned i = 0; i < options.multifd_channels; ++i) {
    auto fd = internal::open_file(path, O_WRONLY | (options.direct_io ? O_DIRECT : 0));
    if (!fd.ok()) {
      return std::move(fd).error();
    }
    channel_fds.push_back(std::move(*fd));
  }

  std::vector<std::vector<uint8_t>> bitmaps;
  for (const BlockRecord& record : layout.blocks) {
    bitmaps.emplace_back(record.bitmap_size, 0);
  }
  const auto chunks = internal::split_into_chunks(layout.blocks);
  internal::Progress progress(options, stats.ram_total);
  std::atomic<uint64_t> present{0};
  auto saved = internal::run_on_channels(
      options.multifd_channels, chunks.size(), [&](unsigned channel, uint64_t item) {
        auto cancelled = progress.check_cancelled();
        if (!cancelled.ok()) {
          return cancelled;
        }
        const internal::Chunk& chunk = chunks[item];
        int fd = channel_fds.empty() ? main_fd : channel_fds[channel].get();
        auto pages = save_chunk(fd, blocks[chunk.block], layout.blocks[chunk.block], chunk,
                                bitmaps[chunk.block]);
        if (!pages.ok()) {
          return Result<void>(std::move(pages).error());
        }
        present.fetch_add(*pages, std::memory_order_relaxed);
        progress.add(chunk.page_count * blocks[chunk.block].page_size);
        return ok();
      });
  channel_fds.clear();
  if (!saved.ok()) {
    return std::move(saved).error();
  }
  stats.pages_present = present.load();
  stats.bytes_io = stats.pages_present * header.page_size;

  for (size_t b = 0; b < layout.blocks.size(); ++b) {
    BlockRecord& record = layout.blocks[b];
    record.present_pages = internal::bitmap_count(bitmaps[b]);
    record.bitmap_crc = crc32c(bitmaps[b]);
    step =
        internal::pwrite_all(main_fd, bitmaps[b].data(), bitmaps[b].size(), record.bitmap_offset);
    if (!step.ok()) {
      return std::move(step).error();
    }
    stats.bytes_io += bitmaps[b].size();
  }
  std::vector<uint8_t> table = encode_section(kSectionRamBlocks, encode_block_table(layout.blocks));
  std::array<uint8_t, kEndPayloadSize> end_payload{};
  store_le(end_payload.data(), 1, 8);  // sections before END: the block table
  std::vector<uint8_t> end = encode_section(kSectionEnd, end_payload);
  header.end_offset = layout.trailer_offset + end.size();
  auto header_bytes = encode_header(header);
  step = internal::pwrite_all(main_fd, table.data(), table.size(), layout.table_offset);
  if (step.ok()) {
    step = internal::pwrite_all(main_fd, end.data(), end.size(), layout.trailer_offset);
  }
  if (step.ok()) {
    step = truncate_file(main_fd, header.end_offset);
  }
  if (step.ok()) {
    step = sync_file(main_fd, options.sync);
  }
  if (step.ok()) {
    step = internal::pwrite_all(main_fd, header_bytes.data(), header_bytes.size(), options.offset);
  }
  if (step.ok()) {
    step = sync_file(main_fd, options.sync);
  }
  if (!step.ok()) {
    return std::move(step).error();
  }
  stats.bytes_io += table.size() + end.size() + header_bytes.size();
  stats.file_size = header.end_offset;
  return stats;
}

// The streaming form into a file: the header goes out as zeros and is written for real once the
// rest is durable, as in a mapped-ram save.
class HeaderLastSink : public ByteSink {
 public:
  explicit HeaderLastSink(int fd) : fd_(fd) {}
  Result<void> write(std::span<const uint8_t> data) override {
    if (held_.size() < kHeaderSize) {
      size_t take = std::min(data.size(), kHeaderSize - held_.size());
      held_.insert(held_.end(), data.begin(), data.begin() + static_cast<ptrdiff_t>(take));
      std::vector<uint8_t> zeros(take, 0);
      auto written = inner_.write(zeros);
      if (!written.ok() || take == data.size()) {
        return written;
      }
      data = data.subspan(take);
    }
    return inner_.write(data);
  }
  const std::vector<uint8_t>& header() const { return held_; }

 private:
  int fd_;
  FdSink inner_{fd_};
  std::vector<uint8_t> held_;
};

Result<TransferStats> save_streaming(std::span<const RamBlock> blocks, int main_fd,
                                     const TransferOptions& options) {
  if (::lseek(main_fd, static_cast<off_t>(options.offset), SEEK_SET) < 0) {
    return Error::from_errno(errno, "seek");
  }
  HeaderLastSink sink(main_fd);
  auto stats = save_to_stream(blocks, sink, options.offset, options);
  if (!stats.ok()) {
    return stats;
  }
  stats->file_size = options.offset + stats->bytes_io;
  auto step = truncate_file(main_fd, stats->file_size);
  if (step.ok()) {
    step = sync_file(main_fd, options.sync);
  }
  if (step.ok()) {
    step =
        internal::pwrite_all(main_fd, sink.header().data(), sink.header().size(), options.offset);
  }
  if (step.ok()) {
    step = sync_file(main_fd, options.sync);
  }
  if (!step.ok()) {
    return std::move(step).error();
  }
  return stats;
}

}  // namespace

Result<TransferStats> save_to_file(std::span<const RamBlock> blocks, const std::string& path,
                                   const TransferOptions& options) {
  auto checked = internal::check_transfer_options(blocks, options);
  if (!checked.ok()) {
    return std::move(checked).error();
  }
  auto main_fd = internal::open_file(path, O_RDWR | O_CREAT);
  if (!main_fd.ok()) {
    return std::move(main_fd).error();
  }
  auto stats = options.mapped_ram ? save_mapped_ram(blocks, path, main_fd->get(), options)
                                  : save_streaming(blocks, main_fd->get(), options);
  if (!stats.ok()) {
    return stats.error().with_prefix("Failed to save to '" + path + "'");
  }
  return stats;
}

}  // namespace strata::migration
