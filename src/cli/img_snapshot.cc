// `strata img snapshot`: qemu-img snapshot's options, texts and exit codes (list, create, apply,
// delete of internal snapshots), and the snapshot table text `img info` shares.

#include <getopt.h>
#include <sys/time.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>

#include "block/drivers/qcow2/qcow2_node.h"
#include "block/io/request.h"
#include "cli/commands.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

namespace {

enum { kOptObject = 256, kOptImageOpts };

enum class Action { kList, kCreate, kApply, kDelete };

// QEMUSnapshotInfo.name is 256 bytes: qemu-img's pstrcpy keeps 255.
constexpr size_t kMaxSnapshotName = 255;

std::string dump_row(const std::string& id, const std::string& name, const std::string& size,
                     const std::string& date, const std::string& clock, const std::string& icount) {
  char line[1024];
  std::snprintf(line, sizeof(line), "%-7s %-16s %8s %19s %15s %10s", id.c_str(), name.c_str(),
                size.c_str(), date.c_str(), clock.c_str(), icount.c_str());
  return line;
}

}  // namespace

std::string snapshot_dump_header() {
  return dump_row("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT");
}

std::string snapshot_dump(const block::Node::SnapshotInfo& snapshot) {
  // QEMU's bdrv_snapshot_dump: local date, VM clock as hours:minutes:seconds.milliseconds.
  const time_t date = snapshot.date_sec;
  struct tm local {};
  localtime_r(&date, &local);
  char date_text[64];
  std::strftime(date_text, sizeof(date_text), "%Y-%m-%d %H:%M:%S", &local);
  const uint64_t secs = snapshot.vm_clock_nsec / 1000000000;
  char clock[128];
  std::snprintf(clock, sizeof(clock), "%04d:%02d:%02d.%03d", static_cast<int>(secs / 3600),
                static_cast<int>((secs / 60) % 60), static_cast<int>(secs % 60),
                static_cast<int>((snapshot.vm_clock_nsec / 1000000) % 1000));
  std::string icount;
  if (snapshot.icount != UINT64_MAX) {
    icount = std::to_string(static_cast<int64_t>(snapshot.icount));
  }
  return dump_row(snapshot.id, snapshot.name, size_to_str(snapshot.vm_state_size), date_text, clock,
                  icount);
}

int snapshot_main(int argc, char** argv) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"object", required_argument, nullptr, kOptObject},
      {"image-opts", no_argument, nullptr, kOptImageOpts},
      {"force-share", no_argument, nullptr, 'U'},
      {nullptr, 0, nullptr, 0},
  };
  ImageOpenRequest request;
  request.read_only = false;
  bool image_opts = false;
  bool quiet = false;
  bool have_action = false;
  Action action = Action::kList;
  std::string snapshot_name;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, ":la:c:d:f:hqU", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 'h':
        std::printf(
            "usage: strata img snapshot [--image-opts] [-U] [-q] [-l | -a SNAPSHOT | "
            "-c SNAPSHOT | -d SNAPSHOT] FILENAME\n");
        return 0;
      case 'f':
        request.format = optarg;
        break;
      case 'l':
      case 'a':
      case 'c':
      case 'd':
        if (have_action) {
          return error_exit("Cannot mix '-l', '-a', '-c', '-d'");
        }
        have_action = true;
        action = c == 'l'   ? Action::kList
                 : c == 'a' ? Action::kApply
                 : c == 'c' ? Action::kCreate
                            : Action::kDelete;
        if (c != 'l') {
          snapshot_name = optarg;
        }
        break;
      case 'q':
        quiet = true;
        break;
      case 'U':
        request.force_share = true;
        break;
      case kOptObject:
        if (add_object(optarg) != 0) {
          return 1;
        }
        break;
      case kOptImageOpts:
        image_opts = true;
        break;
      case ':':
        return missing_argument(argv[optind - 1]);
      default:
        return unrecognized_option(argv[optind - 1]);
    }
  }
  (void)quiet;  // qemu-img snapshot prints nothing but errors and the list
  if (optind != argc - 1) {
    return error_exit("Expecting one image file name");
  }
  const std::string filename = argv[optind];
  request.read_only = action == Action::kList;
  auto image = open_image_or_report(request, filename, image_opts);
  if (!image) {
    return 1;
  }
  block::Node& node = *image->node;
  aio::EventLoop& loop = image->session->loop();
  auto* qcow2 = dynamic_cast<block::qcow2::Qcow2Node*>(&node);
  int status = 0;
  switch (action) {
    case Action::kList: {
      const auto snapshots = node.snapshot_list();
      if (!snapshots.empty()) {
        std::printf("Snapshot list:\n%s\n", snapshot_dump_header().c_str());
        for (const auto& snapshot : snapshots) {
          std::printf("%s\n", snapshot_dump(snapshot).c_str());
        }
      }
      break;
    }
    case Action::kCreate: {
      if (qcow2 == nullptr) {
        report("Could not create snapshot '" + snapshot_name + "': " + std::strerror(ENOTSUP));
        status = 1;
        break;
      }
      block::qcow2::SnapshotEntry entry;
      entry.name = snapshot_name.substr(0, kMaxSnapshotName);
      struct timeval now {};
      gettimeofday(&now, nullptr);
      entry.date_sec = static_cast<uint32_t>(now.tv_sec);
      entry.date_nsec = static_cast<uint32_t>(now.tv_usec * 1000);
      entry.icount = 0;  // qemu-img records icount 0 (no record/replay)
      Result<void> created = loop.block_on(qcow2->co_snapshot_create(std::move(entry)));
      if (!created) {
        report("Could not create snapshot '" + snapshot_name + "': " + errno_text(created.error()));
        status = 1;
      }
      break;
    }
    case Action::kApply: {
      if (qcow2 == nullptr) {
        report("Could not apply snapshot '" + snapshot_name +
               "': Block driver does not support snapshots");
        status = 1;
        break;
      }
      Result<void> applied = loop.block_on(qcow2->co_snapshot_goto(snapshot_name));
      if (!applied) {
        report("Could not apply snapshot '" + snapshot_name +
               "': Failed to load snapshot: " + errno_text(applied.error()));
        status = 1;
      }
      break;
    }
    case Action::kDelete: {
      // QEMU's bdrv_snapshot_find: by ID, then by name; then deleted by both.
      int index = -1;
      if (qcow2 != nullptr) {
        index = block::qcow2::find_snapshot_by_id_or_name(qcow2->snapshots(), snapshot_name);
      }
      if (index < 0) {
        report("Could not delete snapshot '" + snapshot_name + "': snapshot not found");
        status = 1;
        break;
      }
      const block::qcow2::SnapshotEntry& found = qcow2->snapshots()[static_cast<size_t>(index)];
      Result<void> deleted = loop.block_on(qcow2->co_snapshot_delete(found.id, found.name));
      if (!deleted) {
        report("Could not delete snapshot '" + snapshot_name + "': " + deleted.error().message());
        status = 1;
      }
      break;
    }
  }
  if (action != Action::kList) {
    Result<void> flushed = loop.block_on(block::io::flush(node));
    if (!flushed && status == 0) {
      report("Could not flush the image: " + errno_text(flushed.error()));
      status = 1;
    }
  }
  return status;
}

}  // namespace strata::cli::img
