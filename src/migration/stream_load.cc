// Reading the streaming form, section by section: into the destination's memory (a restore) or
// into a scratch buffer (describe/verify).

#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>
#include <map>

#include "migration/crc32c.h"
#include "migration/internal.h"
#include "migration/stream.h"
#include "migration/wire.h"

namespace strata::migration {

Result<void> FdSource::read(std::span<uint8_t> buffer) {
  while (!buffer.empty()) {
    ssize_t n = ::read(fd_, buffer.data(), buffer.size());
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      return Error::from_errno(errno, "read");
    }
    if (n == 0) {
      return Error(ErrorKind::kCorrupt, "stream truncated");
    }
    buffer = buffer.subspan(static_cast<size_t>(n));
  }
  return ok();
}

namespace internal {

namespace {

Error corrupt(std::string message) {
  return Error(ErrorKind::kCorrupt, std::move(message));
}

// The pages of one block that runs have covered, as merged [first, end) ranges: memory grows with
// the number of separate runs in the stream, not with the block size a stream claims.
class CoveredPages {
 public:
  void add(uint64_t first, uint64_t end) {
    auto it = ranges_.upper_bound(first);
    if (it != ranges_.begin() && std::prev(it)->second >= first) {
      --it;
      first = it->first;
      end = std::max(end, it->second);
      it = ranges_.erase(it);
    }
    while (it != ranges_.end() && it->first <= end) {
      end = std::max(end, it->second);
      it = ranges_.erase(it);
    }
    ranges_.emplace(first, end);
  }
  // The first page in [0, pages) not covered, or `pages` when all are.
  uint64_t first_missing(uint64_t pages) const {
    if (ranges_.empty() || ranges_.begin()->first != 0) {
      return 0;
    }
    return std::min(ranges_.begin()->second, pages);
  }

 private:
  std::map<uint64_t, uint64_t> ranges_;
};

class StreamReader {
 public:
  StreamReader(ByteSource& source, std::span<const RamBlock> destination,
               const TransferOptions& options)
      : source_(source), destination_(destination), options_(options) {}

  Result<StreamContents> run();

 private:
  Result<void> read(std::span<uint8_t> buffer) {
    contents_.bytes_read += buffer.size();
    return source_.read(buffer);
  }
  Result<void> read_header_and_blocks();
  // Returns the bytes of RAM the run covers.
  Result<uint64_t> read_pages(const SectionFrame& frame);
  Result<void> skip(const SectionFrame& frame);

  ByteSource& source_;
  std::span<const RamBlock> destination_;
  const TransferOptions& options_;
  StreamContents contents_;
  std::vector<size_t> mapping_;        // stream block -> destination block
  std::vector<CoveredPages> covered_;  // per stream block
  std::vector<uint8_t> scratch_;       // page data when there is no destination
};

Result<void> StreamReader::read_header_and_blocks() {
  std::vector<uint8_t> header_bytes(kHeaderSize);
  auto got = read(header_bytes);
  if (!got.ok()) {
    return got;
  }
  // A later version's header may be longer: its size is the field after the magic and version.
  uint32_t size = static_cast<uint32_t>(load_le(header_bytes.data() + 12, 4));
  if (std::equal(kMagic.begin(), kMagic.end(), header_bytes.begin()) && size > kHeaderSize &&
      size <= kMaxHeaderSize) {
    header_bytes.resize(size);
    got = read(std::span<uint8_t>(header_bytes).subspan(kHeaderSize));
    if (!got.ok()) {
      return got;
    }
  }
  auto header = decode_header(header_bytes);
  if (!header.ok()) {
    return std::move(header).error();
  }
  if (header->mapped_ram()) {
    return Error(ErrorKind::kInvalidArgument,
                 "a mapped-ram stream can only be read from a file (it needs seeks)");
  }
  contents_.header = *header;

  std::array<uint8_t, kSectionFrameSize> head;
  got = read(head);
  if (!got.ok()) {
    return got;
  }
  SectionFrame frame = decode_frame(head);
  if (frame.type != kSectionRamBlocks) {
    return corrupt(
        fmt::format("expected the ram-blocks section after the header, found type {}", frame.type));
  }
  if (frame.length > kMaxMetadataPayload) {
    return corrupt(fmt::format("ram-blocks section of {} bytes is too large", frame.length));
  }
  std::vector<uint8_t> payload(frame.length);
  got = read(payload);
  if (!got.ok()) {
    return got;
  }
  std::span<const uint8_t> parts[] = {payload};
  if (section_crc(frame.type, frame.length, parts) != frame.crc) {
    return corrupt("ram-blocks section: checksum mismatch");
  }
  contents_.sections.push_back(SectionSummary{frame.type, 0, frame.length});
  auto blocks = decode_block_table(payload, header->block_count, false);
  if (!blocks.ok()) {
    return std::move(blocks).error();
  }
  uint64_t ram_total = 0;
  for (BlockRecord& block : *blocks) {
    if (block.page_size != header->page_size) {
      return corrupt(fmt::format("RAM block \"{}\": page size {} differs from the header's {}",
                                 block.name, block.page_size, header->page_size));
    }
    ram_total += block.length;
    block.present_pages = 0;
    covered_.emplace_back();
  }
  if (ram_total != header->ram_total) {
    return corrupt(fmt::format("the blocks hold {:#x} bytes, the header says {:#x}", ram_total,
                               header->ram_total));
  }
  contents_.blocks = std::move(*blocks);
  if (!destination_.empty()) {
    auto mapping = match_blocks(contents_.blocks, destination_);
    if (!mapping.ok()) {
      return std::move(mapping).error();
    }
    mapping_ = std::move(*mapping);
  }
  return ok();
}

Result<uint64_t> StreamReader::read_pages(const SectionFrame& frame) {
  if (frame.length < kPageRunSize) {
    return corrupt(fmt::format("ram-pages section of {} bytes is too short", frame.length));
  }
  std::array<uint8_t, kPageRunSize> record_bytes;
  auto got = read(record_bytes);
  if (!got.ok()) {
    return std::move(got).error();
  }
  PageRun run = decode_page_run(record_bytes);
  if (run.block_index >= contents_.blocks.size()) {
    return corrupt(fmt::format("ram-pages section names block {} of {}", run.block_index,
                               contents_.blocks.size()));
  }
  BlockRecord& block = contents_.blocks[run.block_index];
  const uint64_t pages = block.page_count();
  if (run.page_count == 0 || run.first_page > pages || run.page_count > pages - run.first_page) {
    return corrupt(fmt::format("RAM block \"{}\": pages {}+{} are outside its {} pages", block.name,
                               run.first_page, run.page_count, pages));
  }
  const uint64_t data_bytes = frame.length - kPageRunSize;
  uint8_t* target = nullptr;
  if (run.kind == kPageRunZero) {
    if (data_bytes != 0) {
      return corrupt(fmt::format("RAM block \"{}\": a zero run carries {} bytes of data",
                                 block.name, data_bytes));
    }
  } else if (run.kind == kPageRunData) {
    if (run.page_count > kMaxRunBytes / block.page_size ||
        data_bytes != run.page_count * block.page_size) {
      return corrupt(fmt::format("RAM block \"{}\": a run of {} pages carries {} bytes", block.name,
                                 run.page_count, data_bytes));
    }
    if (destination_.empty()) {
      scratch_.resize(data_bytes);
      target = scratch_.data();
    } else {
      target = destination_[mapping_[run.block_index]].host + run.first_page * block.page_size;
    }
    got = read(std::span<uint8_t>(target, data_bytes));
    if (!got.ok()) {
      return std::move(got).error();
    }
  } else {
    return corrupt(fmt::format("RAM block \"{}\": unknown page run kind {}", block.name, run.kind));
  }
  std::span<const uint8_t> parts[] = {record_bytes,
                                      std::span<const uint8_t>(target, target ? data_bytes : 0)};
  if (section_crc(frame.type, frame.length, parts) != frame.crc) {
    return corrupt(fmt::format("RAM block \"{}\": checksum mismatch in pages {}+{}", block.name,
                               run.first_page, run.page_count));
  }
  if (run.kind == kPageRunZero && !destination_.empty()) {
    std::memset(destination_[mapping_[run.block_index]].host + run.first_page * block.page_size, 0,
                run.page_count * block.page_size);
  }
  covered_[run.block_index].add(run.first_page, run.first_page + run.page_count);
  if (run.kind == kPageRunData) {
    block.present_pages += run.page_count;
  }
  return run.page_count * block.page_size;
}

Result<void> StreamReader::skip(const SectionFrame& frame) {
  uint64_t left = frame.length;
  std::vector<uint8_t> buffer(std::min<uint64_t>(left, 64 * 1024));
  uint32_t crc = section_crc(frame.type, frame.length, {});
  while (left > 0) {
    std::span<uint8_t> piece(buffer.data(), std::min<uint64_t>(left, buffer.size()));
    auto got = read(piece);
    if (!got.ok()) {
      return got;
    }
    crc = crc32c_extend(crc, piece);
    left -= piece.size();
  }
  if (crc != frame.crc) {
    return corrupt(fmt::format("{} section: checksum mismatch", section_type_name(frame.type)));
  }
  return ok();
}

Result<StreamContents> StreamReader::run() {
  auto step = read_header_and_blocks();
  if (!step.ok()) {
    return std::move(step).error();
  }
  Progress progress(options_, contents_.header.ram_total);
  while (true) {
    std::array<uint8_t, kSectionFrameSize> head;
    step = read(head);
    if (!step.ok()) {
      return std::move(step).error();
    }
    SectionFrame frame = decode_frame(head);
    contents_.sections.push_back(SectionSummary{frame.type, 0, frame.length});
    if (frame.type == kSectionRamPages) {
      auto covered = read_pages(frame);
      if (!covered.ok()) {
        return std::move(covered).error();
      }
      progress.add(*covered);
      step = progress.check_cancelled();
    } else if (frame.type == kSectionEnd) {
      if (frame.length != kEndPayloadSize) {
        return corrupt(fmt::format("end section has a {}-byte payload", frame.length));
      }
      std::array<uint8_t, kEndPayloadSize> payload;
      step = read(payload);
      if (!step.ok()) {
        return std::move(step).error();
      }
      std::span<const uint8_t> parts[] = {payload};
      if (section_crc(frame.type, frame.length, parts) != frame.crc) {
        return corrupt("end section: checksum mismatch");
      }
      uint64_t counted = load_le(payload.data(), 8);
      if (counted != contents_.sections.size() - 1) {
        return corrupt(fmt::format("end section counts {} sections, the stream had {}", counted,
                                   contents_.sections.size() - 1));
      }
      break;
    } else if (frame.type == kSectionRamBlocks) {
      return corrupt("a second ram-blocks section");
    } else if (frame.type == kSectionDirtyBitmaps || frame.type == kSectionDaemonState) {
      if (!destination_.empty()) {
        return Error(ErrorKind::kUnsupported,
                     fmt::format("the stream has a {} section, which this strata cannot restore",
                                 section_type_name(frame.type)));
      }
      step = skip(frame);
    } else if ((frame.type & kSectionSkippable) != 0) {
      step = skip(frame);
    } else {
      return corrupt(fmt::format("unknown section type {:#x}", frame.type));
    }
    if (!step.ok()) {
      return std::move(step).error();
    }
  }
  for (size_t b = 0; b < contents_.blocks.size(); ++b) {
    uint64_t missing = covered_[b].first_missing(contents_.blocks[b].page_count());
    if (missing != contents_.blocks[b].page_count()) {
      return corrupt(fmt::format("RAM block \"{}\": the stream ended without page {}",
                                 contents_.blocks[b].name, missing));
    }
  }
  return std::move(contents_);
}

}  // namespace

Result<StreamContents> read_stream(ByteSource& source, std::span<const RamBlock> destination,
                                   const TransferOptions& options) {
  StreamReader reader(source, destination, options);
  return reader.run();
}

}  // namespace internal

Result<TransferStats> load_from_stream(std::span<const RamBlock> blocks, ByteSource& source,
                                       const TransferOptions& options) {
  TransferOptions streaming = options;
  streaming.mapped_ram = false;
  streaming.multifd_channels = 0;
  streaming.direct_io = false;
  auto checked = internal::check_transfer_options(blocks, streaming);
  if (!checked.ok()) {
    return std::move(checked).error();
  }
  auto contents = internal::read_stream(source, blocks, options);
  if (!contents.ok()) {
    return std::move(contents).error();
  }
  TransferStats stats;
  stats.ram_total = contents->header.ram_total;
  stats.bytes_io = contents->bytes_read;
  for (const BlockRecord& block : contents->blocks) {
    stats.pages_total += block.page_count();
    stats.pages_present += block.present_pages;
  }
  return stats;
}

}  // namespace strata::migration
