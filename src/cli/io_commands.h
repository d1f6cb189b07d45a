#pragma once
// qemu-io's command language (qemu-io-cmds.c) over one open image: read/write with patterns,
// readv/writev, aio_read/aio_write/aio_flush, discard, flush, map, length, truncate, sigraise,
// quit. Output and messages are qemu-io's; the timing line of a report depends on the run.

#include <string>
#include <string_view>

#include "aio/task_group.h"
#include "cli/block_tool.h"

namespace strata::cli {

class IoShell {
 public:
  // `node` may be nullptr (no image open: every command reports "no file open").
  IoShell(BlockSession& session, block::Node* node, std::string program);
  ~IoShell();
  IoShell(const IoShell&) = delete;
  IoShell& operator=(const IoShell&) = delete;

  // Runs one command line; returns qemu-io's command result (< 0: the command failed).
  int run(std::string_view line);
  // Waits for the aio requests still in flight (qemu-io drains before it exits).
  void drain();
  bool quit_requested() const { return quit_; }

 private:
  struct Args;
  aio::Task<int> dispatch(Args& args);
  aio::Task<int> read_cmd(Args& args);
  aio::Task<int> write_cmd(Args& args);
  aio::Task<int> readv_cmd(Args& args, bool write);
  aio::Task<int> aio_cmd(Args& args, bool write);
  aio::Task<int> discard_cmd(Args& args);
  aio::Task<int> flush_cmd();
  aio::Task<int> map_cmd();
  aio::Task<int> length_cmd();
  aio::Task<int> truncate_cmd(Args& args);

  BlockSession& session_;
  block::Node* node_;
  std::string program_;
  aio::TaskGroup aio_requests_;
  bool quit_ = false;
};

}  // namespace strata::cli
