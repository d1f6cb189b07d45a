#pragma once
// The mirror_top filter (QEMU's bdrv_mirror_top driver): a mirror job inserts it above its source
// and moves the source's users onto it, so that every guest write passes it. Reads, flushes and
// block status go straight to the source ("backing" child). A write, write-zeroes or discard
// goes to the source and then, as MirrorCore says, either marks the job's dirty bitmap or is
// written to the target as well before it completes (write-blocking).
//
// The node is created by the job, never by blockdev-add; query-named-block-nodes shows it with
// the driver "mirror_top" under `filter-node-name` or a generated name.

#include <memory>
#include <optional>
#include <string>

#include "block/graph/node.h"
#include "block/mirror/mirror_core.h"

namespace strata::block::mirror {

class MirrorTopNode final : public Node {
 public:
  // `is_commit`: the job is an active commit, whose target is in the source's backing chain.
  MirrorTopNode(CommonOptions common, std::shared_ptr<MirrorCore> core, bool is_commit)
      : Node(std::move(common)), core_(std::move(core)), is_commit_(is_commit) {}

  const char* driver_name() const override { return "mirror_top"; }
  bool is_filter() const override { return true; }
  uint64_t length() const override { return source().length(); }
  // QEMU's bdrv_refresh_filename for a filter without options of its own: the source's name.
  std::optional<std::string> exact_filename() const override { return source().filename(); }

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override;
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t flags) override;
  aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                           uint32_t flags) override;
  aio::Task<Result<void>> co_pdiscard(uint64_t offset, uint64_t bytes) override;
  // QEMU's bdrv_mirror_top_child_perm: the users' permissions pass through; an active commit
  // cannot take consistent read (everything above the base unshares it) and must share write;
  // once the job is ending (MirrorCore::stop) the filter takes nothing.
  void child_perm(const Child& child, uint64_t perm, uint64_t shared, uint64_t& child_perm,
                  uint64_t& child_shared) const override;

 private:
  Node& source() const { return *children().front()->node(); }
  // The write path shared by the three kinds of write.
  aio::Task<Result<void>> write(WriteMethod method, uint64_t offset, uint64_t bytes,
                                const IoVector* qiov, uint32_t flags);

  std::shared_ptr<MirrorCore> core_;
  bool is_commit_;
};

}  // namespace strata::block::mirror
