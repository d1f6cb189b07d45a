// Restoring RAM blocks from a file, and describing/checking a file without restoring it.
//
// A mapped-ram restore reads all metadata first (read_mapped_ram_metadata checks every offset
// against the file size and every checksum), matches the blocks to the destination, and only then
// lets the workers read runs of present pages into the destination and zero-fill the absent ones.

#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cstring>

#include "migration/internal.h"
#include "migration/stream.h"
#include "migration/vmstate_file.h"

namespace strata::migration {

namespace {

using internal::OwnedFd;

// Calls visit(first_page, page_count, present) for each maximal run of pages of one kind in
// [chunk.first_page, +page_count), present runs cut at `max_run_pages`.
template <typename Visit>
Result<void> for_each_run(std::span<const uint8_t> bitmap, const internal::Chunk& chunk,
                          uint64_t max_run_pages, Visit&& visit) {
  const uint64_t end = chunk.first_page + chunk.page_count;
  uint64_t page = chunk.first_page;
  while (page < end) {
    bool present = internal::bitmap_test(bitmap, page);
    uint64_t run_end = page + 1;
    while (run_end < end && internal::bitmap_test(bitmap, run_end) == present &&
           (!present || run_end - page < max_run_pages)) {
      ++run_end;
    }
    auto visited = visit(page, run_end - page, present);
    if (!visited.ok()) {
      return visited;
    }
    page = run_end;
  }
  return ok();
}

Result<std::vector<OwnedFd>> open_channels(const std::string& path, unsigned channels,
                                           bool direct_io) {
  std::vector<OwnedFd> fds;
  for (unsigned i = 0; i < channels; ++i) {
    auto fd = internal::open_file(path, O_RDONLY | (direct_io ? O_DIRECT : 0));
    if (!fd.ok()) {
      return std::move(fd).error();
    }
    fds.push_back(std::move(*fd));
  }
  return fds;
}

Result<TransferStats> load_mapped_ram(std::span<const RamBlock> blocks, const std::string& path,
                                      int main_fd, const FileHeader& header, uint64_t size,
                                      const TransferOptions& options) {
  auto meta = internal::read_mapped_ram_metadata(main_fd, header, size);
  if (!meta.ok()) {
    return std::move(meta).error();
  }
  for (const SectionSummary& section : meta->sections) {
    if (section.type == kSectionDirtyBitmaps || section.type == kSectionDaemonState) {
      return Error(ErrorKind::kUnsupported,
                   fmt::format("the file has a {} section, which this strata cannot restore",
                               section_type_name(section.type)));
    }
  }
  auto mapping = internal::match_blocks(meta->blocks, blocks);
  if (!mapping.ok()) {
    return std::move(mapping).error();
  }
  auto channel_fds = open_channels(path, options.multifd_channels, options.direct_io);
  if (!channel_fds.ok()) {
    return std::move(channel_fds).error();
  }
  TransferStats stats;
  stats.ram_total = header.ram_total;
  stats.bytes_io = meta->metadata_bytes;
  for (const BlockRecord& record : meta->blocks) {
    stats.pages_total += record.page_count();
    stats.pages_present += record.present_pages;
    stats.bytes_io += record.present_pages * record.page_size;
  }
  const auto chunks = internal::split_into_chunks(meta->blocks);
  internal::Progress progress(options, stats.ram_total);
  auto loaded = internal::run_on_channels(
      options.multifd_channels, chunks.size(), [&](unsigned channel, uint64_t item) {
        auto cancelled = progress.check_cancelled();
        if (!cancelled.ok()) {
          return cancelled;
        }
        const internal::Chunk& chunk = chunks[item];
        const BlockRecord& record = meta->blocks[chunk.block];
        const RamBlock& block = blocks[(*mapping)[chunk.block]];
        int fd = channel_fds->empty() ? main_fd : (*channel_fds)[channel].get();
        auto done = for_each_run(meta->bitmaps[chunk.block], chunk, kMaxRunBytes / record.page_size,
                                 [&](uint64_t first, uint64_t count, bool present) -> Result<void> {
                                   uint8_t* target = block.host + first * record.page_size;
                                   if (!present) {
                                     std::memset(target, 0, count * record.page_size);
                                     return ok();
                                   }
                                   return internal::pread_all(
                                       fd, target, count * record.page_size,
                                       record.pages_offset + first * record.page_size);
                                 });
        if (done.ok()) {
          progress.add(chunk.page_count * record.page_size);
        }
        return done;
      });
  if (!loaded.ok()) {
    return std::move(loaded).error();
  }
  return stats;
}

Result<TransferStats> load_streaming_file(std::span<const RamBlock> blocks, int main_fd,
                                          const TransferOptions& options) {
  if (::lseek(main_fd, static_cast<off_t>(options.offset), SEEK_SET) < 0) {
    return Error::from_errno(errno, "seek");
  }
  FdSource source(main_fd);
  return load_from_stream(blocks, source, options);
}

// Reads every present page of a mapped-ram file once (verify --read-pages).
Result<void> read_all_pages(int fd, const internal::MappedRamMetadata& meta) {
  std::vector<uint8_t> buffer(kMaxRunBytes);
  for (const internal::Chunk& chunk : internal::split_into_chunks(meta.blocks)) {
    const BlockRecord& record = meta.blocks[chunk.block];
    auto done =
        for_each_run(meta.bitmaps[chunk.block], chunk, kMaxRunBytes / record.page_size,
                     [&](uint64_t first, uint64_t count, bool present) -> Result<void> {
                       if (!present) {
                         return ok();
                       }
                       return internal::pread_all(fd, buffer.data(), count * record.page_size,
                                                  record.pages_offset + first * record.page_size);
                     });
    if (!done.ok()) {
      return done.error().with_prefix(fmt::format("RAM block \"{}\"", record.name));
    }
  }
  return ok();
}

// The main descriptor of a saved file, its size and its header at `offset`.
struct OpenedStream {
  OwnedFd fd;
  uint64_t size = 0;
  FileHeader header;
};

Result<OpenedStream> open_stream(const std::string& path, uint64_t offset) {
  OpenedStream opened;
  auto fd = internal::open_file(path, O_RDONLY);
  if (!fd.ok()) {
    return std::move(fd).error();
  }
  opened.fd = std::move(*fd);
  auto size = internal::file_size(opened.fd.get());
  if (!size.ok()) {
    return std::move(size).error();
  }
  opened.size = *size;
  auto header = internal::read_file_header(opened.fd.get(), offset, opened.size);
  if (!header.ok()) {
    return std::move(header).error();
  }
  opened.header = *header;
  return opened;
}

}  // namespace

Result<TransferStats> load_from_file(std::span<const RamBlock> blocks, const std::string& path,
                                     const TransferOptions& options) {
  // The file decides the form; check the options as if it were mapped-ram.
  TransferOptions checked_options = options;
  checked_options.mapped_ram = true;
  auto checked = internal::check_transfer_options(blocks, checked_options);
  if (!checked.ok()) {
    return std::move(checked).error();
  }
  auto result = [&]() -> Result<TransferStats> {
    auto opened = open_stream(path, options.offset);
    if (!opened.ok()) {
      return std::move(opened).error();
    }
    if (opened->header.mapped_ram()) {
      return load_mapped_ram(blocks, path, opened->fd.get(), opened->header, opened->size, options);
    }
    return load_streaming_file(blocks, opened->fd.get(), options);
  }();
  if (!result.ok()) {
    return result.error().with_prefix("Failed to load '" + path + "'");
  }
  return result;
}

Result<FileDescription> describe_file(const std::string& path, uint64_t offset, bool read_pages) {
  auto opened = open_stream(path, offset);
  if (!opened.ok()) {
    return std::move(opened).error();
  }
  const int fd = opened->fd.get();
  FileDescription description;
  description.file_size = opened->size;
  if (opened->header.mapped_ram()) {
    auto meta = internal::read_mapped_ram_metadata(fd, opened->header, opened->size);
    if (!meta.ok()) {
      return std::move(meta).error();
    }
    if (read_pages) {
      auto pages = read_all_pages(fd, *meta);
      if (!pages.ok()) {
        return std::move(pages).error();
      }
    }
    description.header = meta->header;
    description.blocks = std::move(meta->blocks);
    description.sections = std::move(meta->sections);
    return description;
  }
  if (::lseek(fd, static_cast<off_t>(offset), SEEK_SET) < 0) {
    return Error::from_errno(errno, "seek");
  }
  FdSource source(fd);
  auto contents = internal::read_stream(source, {}, TransferOptions{});
  if (!contents.ok()) {
    return std::move(contents).error();
  }
  description.header = contents->header;
  description.blocks = std::move(contents->blocks);
  description.sections = std::move(contents->sections);
  return description;
}

}  // namespace strata::migration
