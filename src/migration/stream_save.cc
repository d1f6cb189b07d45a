// Writing the streaming form: header, RAM_BLOCKS, runs of data and zero pages, END.

#include <unistd.h>

#include <cerrno>

#include "migration/internal.h"
#include "migration/stream.h"
#include "migration/wire.h"

namespace strata::migration {

Result<void> FdSink::write(std::span<const uint8_t> data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd_, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      return Error::from_errno(errno, "write");
    }
    data = data.subspan(static_cast<size_t>(n));
  }
  return ok();
}

namespace {

// Gathers the small frames and run records into one write; page data of a run goes straight
// through after them.
class BufferedSink {
 public:
  explicit BufferedSink(ByteSink& sink) : sink_(sink) {}

  Result<void> write(std::span<const uint8_t> data) {
    written_ += data.size();
    if (buffer_.size() + data.size() <= kCapacity) {
      buffer_.insert(buffer_.end(), data.begin(), data.end());
      return ok();
    }
    auto flushed = flush();
    if (!flushed.ok()) {
      return flushed;
    }
    if (data.size() >= kCapacity) {
      return sink_.write(data);
    }
    buffer_.assign(data.begin(), data.end());
    return ok();
  }

  Result<void> flush() {
    if (buffer_.empty()) {
      return ok();
    }
    auto written = sink_.write(buffer_);
    buffer_.clear();
    return written;
  }

  uint64_t written() const { return written_; }

 private:
  static constexpr size_t kCapacity = 64 * 1024;
  ByteSink& sink_;
  std::vector<uint8_t> buffer_;
  uint64_t written_ = 0;
};

// Writes the RAM_PAGES section of one run.
Result<void> write_run(BufferedSink& out, const RamBlock& block, const PageRun& run) {
  auto record = encode_page_run(run);
  std::span<const uint8_t> data;
  if (run.kind == kPageRunData) {
    data = std::span<const uint8_t>(block.host + run.first_page * block.page_size,
                                    run.page_count * block.page_size);
  }
  std::span<const uint8_t> parts[] = {record, data};
  uint64_t length = record.size() + data.size();
  auto frame = encode_frame(
      SectionFrame{kSectionRamPages, section_crc(kSectionRamPages, length, parts), length});
  auto step = out.write(frame);
  if (step.ok()) {
    step = out.write(record);
  }
  if (step.ok() && !data.empty()) {
    step = out.write(data);
  }
  return step;
}

}  // namespace

Result<TransferStats> save_to_stream(std::span<const RamBlock> blocks, ByteSink& sink,
                                     uint64_t base_offset, const TransferOptions& options) {
  TransferOptions streaming = options;
  streaming.mapped_ram = false;
  streaming.multifd_channels = 0;
  streaming.direct_io = false;
  auto checked = internal::check_transfer_options(blocks, streaming);
  if (!checked.ok()) {
    return std::move(checked).error();
  }
  TransferStats stats;
  std::vector<BlockRecord> records;
  for (const RamBlock& block : blocks) {
    BlockRecord record;
    record.name = block.name;
    record.length = block.length;
    record.page_size = block.page_size;
    records.push_back(record);
    stats.ram_total += block.length;
    stats.pages_total += record.page_count();
  }
  FileHeader header;
  header.page_size = blocks[0].page_size;
  header.block_count = static_cast<uint32_t>(blocks.size());
  header.ram_total = stats.ram_total;
  header.base_offset = base_offset;

  BufferedSink out(sink);
  auto header_bytes = encode_header(header);
  auto step = out.write(header_bytes);
  if (step.ok()) {
    step = out.write(encode_section(kSectionRamBlocks, encode_block_table(records)));
  }
  uint64_t sections = 1;
  internal::Progress progress(options, stats.ram_total);
  for (uint32_t b = 0; step.ok() && b < blocks.size(); ++b) {
    const RamBlock& block = blocks[b];
    const uint64_t pages = block.length / block.page_size;
    const uint64_t max_run_pages = std::max<uint64_t>(1, kMaxRunBytes / block.page_size);
    PageRun run{b, kPageRunZero, 0, 0};
    auto flush_run = [&]() -> Result<void> {
      if (run.page_count == 0) {
        return ok();
      }
      ++sections;
      if (run.kind == kPageRunData) {
        stats.pages_present += run.page_count;
      }
      auto written = write_run(out, block, run);
      if (written.ok()) {
        progress.add(run.page_count * block.page_size);
        written = progress.check_cancelled();
      }
      run.page_count = 0;
      return written;
    };
    for (uint64_t page = 0; step.ok() && page < pages; ++page) {
      uint32_t kind = internal::is_zero_page(block.host + page * block.page_size, block.page_size)
                          ? kPageRunZero
                          : kPageRunData;
      if (run.page_count > 0 &&
          (kind != run.kind || (kind == kPageRunData && run.page_count == max_run_pages))) {
        step = flush_run();
      }
      if (run.page_count == 0) {
        run.kind = kind;
        run.first_page = page;
      }
      ++run.page_count;
    }
    if (step.ok()) {
      step = flush_run();
    }
  }
  if (step.ok()) {
    std::array<uint8_t, kEndPayloadSize> end_payload{};
    store_le(end_payload.data(), sections, 8);
    step = out.write(encode_section(kSectionEnd, end_payload));
  }
  if (step.ok()) {
    step = out.flush();
  }
  if (!step.ok()) {
    return std::move(step).error();
  }
  stats.bytes_io = out.written();
  return stats;
}

}  // namespace strata::migration
