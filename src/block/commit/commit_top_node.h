#pragma once
// The commit_top filter (QEMU's bdrv_commit_top driver): an intermediate commit puts it above
// `top` for the job's duration, so that the overlay reads `top` through it. It reads from its
// child and takes no permission on it, sharing everything; the job holds what it needs itself.
// query-named-block-nodes shows it with the driver "commit_top" under `filter-node-name` or a
// generated name.

#include <optional>
#include <string>

#include "block/graph/node.h"
#include "block/io/request.h"

namespace strata::block::commit {

class CommitTopNode final : public Node {
 public:
  explicit CommitTopNode(CommonOptions common) : Node(std::move(common)) {}

  const char* driver_name() const override { return "commit_top"; }
  bool is_filter() const override { return true; }
  uint64_t length() const override { return top().length(); }
  std::optional<std::string> exact_filename() const override { return top().filename(); }

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override {
    (void)bytes;
    co_return co_await io::preadv(top(), offset, std::move(qiov), flags & kRequestNoSerialising);
  }
  void child_perm(const Child& child, uint64_t perm, uint64_t shared, uint64_t& child_perm,
                  uint64_t& child_shared) const override {
    (void)child;
    (void)perm;
    (void)shared;
    child_perm = 0;
    child_shared = kPermAll;
  }

 private:
  Node& top() const { return *children().front()->node(); }
};

}  // namespace strata::block::commit
