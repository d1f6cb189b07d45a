"""blockdev-backup and the block job commands on strata and qemu-storage-daemon.

Each scenario runs on both daemons (the `daemon` fixture) and checks what a client sees: the
JOB_STATUS_CHANGE and BLOCK_JOB_* events in order (and whether they come before the reply),
query-jobs / query-block-jobs, error texts, and the target's contents with `qemu-img compare`
and qemu-io. Guest writes during a backup go through a writable NBD export of the source.
"""

import os
import shutil
import subprocess
import time

import pytest

from conftest import need_tool

MiB = 1 << 20
SIZE = 4 * MiB


def img(*args):
    need_tool("qemu-img")
    r = subprocess.run(["qemu-img"] + list(args), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def qio(*args, check=True):
    need_tool("qemu-io")
    r = subprocess.run(["qemu-io"] + list(args), capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0 and "failed" not in r.stdout, (args, r.stdout, r.stderr)
    return r


def make_source(d, name="src.qcow2", size=SIZE):
    """A qcow2 image with four 1 MiB patterns (0x11, 0x22, 0x33, 0x44)."""
    path = os.path.join(d.dir, name)
    img("create", "-q", "-f", "qcow2", path, str(size))
    cmds = []
    for i in range(size // MiB):
        cmds += ["-c", "write -P 0x%x %d 1M" % (0x11 * (i % 4 + 1), i * MiB)]
    qio("-f", "qcow2", *cmds, path)
    return path


def make_raw(d, name="tgt.raw", size=SIZE):
    path = os.path.join(d.dir, name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def add_qcow2(q, node, path, **extra):
    q.ok("blockdev-add", dict({"driver": "qcow2", "node-name": node,
                               "file": {"driver": "file", "filename": path}}, **extra))


def add_raw(q, node, path):
    q.ok("blockdev-add", {"driver": "raw", "node-name": node,
                          "file": {"driver": "file", "filename": path}})


def summary(ev):
    """JOB_STATUS_CHANGE -> its status; other events -> (name, data)."""
    if ev["event"] == "JOB_STATUS_CHANGE":
        return ev["data"]["status"]
    return (ev["event"], ev.get("data"))


def events_before(q):
    out = []
    for ev in q.events_before_reply:
        ev["_consumed"] = True
        out.append(summary(ev))
    return out


def run_cmd(q, name, args):
    """(reply, [events before the reply])."""
    r = q.cmd_args(name, args)
    return r, events_before(q)


def collect_until(q, last, timeout=30.0):
    """Events after the last reply until JOB_STATUS_CHANGE `last` (inclusive)."""
    out = []
    for ev in q.events:
        if not ev.get("_consumed"):
            ev["_consumed"] = True
            out.append(summary(ev))
            if out[-1] == last:
                return out
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "stuck waiting for %r after %r" % (last, out)
        msg = q.recv_msg(remaining)
        if isinstance(msg, dict) and "event" in msg:
            msg["_consumed"] = True
            out.append(summary(msg))
            if out[-1] == last:
                return out
        else:
            q._pending.append(msg)


def through(q, before, last):
    """`before` (events before a reply), completed with later events up to `last`."""
    return before if last in before else before + collect_until(q, last)


def backup(q, args):
    """blockdev-backup that must succeed; returns the events before its reply."""
    r, before = run_cmd(q, "blockdev-backup", args)
    assert r == {"return": {}}, r
    return before


def start_nbd(d, node):
    sock = os.path.join(d.dir, "nbd.sock")
    d.qmp.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    d.qmp.ok("block-export-add", {"type": "nbd", "id": "exp-" + node, "node-name": node,
                                  "writable": True})
    return "nbd+unix:///%s?socket=%s" % (node, sock)


def compare(a, b, fmt_a="qcow2", fmt_b="raw"):
    need_tool("qemu-img")
    return subprocess.run(["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, a, b],
                          capture_output=True, text=True, timeout=60)


def strip_drain_pairs(seq):
    """Removes adjacent paused, running pairs (QEMU's drained sections at quit)."""
    out = []
    for item in seq:
        if out and out[-1] == "paused" and item == "running":
            out.pop()
            continue
        out.append(item)
    return out


# -- success paths and event sequences ------------------------------------------------------

def test_full_backup_events_and_contents(daemon):
    d = daemon()
    q = d.qmp
    src = make_source(d)
    tgt = make_raw(d)
    add_qcow2(q, "src", src)
    add_raw(q, "tgt", tgt)
    r, before = run_cmd(q, "blockdev-backup", {"job-id": "b1", "device": "src", "target": "tgt",
                                               "sync": "full"})
    assert r == {"return": {}}, r
    after = collect_until(q, "null")
    seq = before + after
    assert seq[:4] == ["created", "running", "paused", "running"], seq
    assert seq[4:] == ["waiting", "pending",
                       ("BLOCK_JOB_COMPLETED", {"device": "b1", "len": SIZE, "offset": SIZE,
                                                "speed": 0, "type": "backup"}),
                       "concluded", "null"], seq
    assert q.ok("query-jobs") == []
    q.ok("blockdev-del", {"node-name": "tgt"})
    q.ok("blockdev-del", {"node-name": "src"})
    r = compare(src, tgt)
    assert r.returncode == 0, r.stdout + r.stderr


def test_top_backup_copies_only_the_top_layer(daemon):
    d = daemon()
    q = d.qmp
    base = make_source(d, "base.qcow2")
    top = os.path.join(d.dir, "top.qcow2")
    img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qio("-f", "qcow2", "-c", "write -P 0x77 1M 64k", "-c", "write -P 0x78 3M 128k", top)
    tgt = make_raw(d)
    add_qcow2(q, "top", top)
    add_raw(q, "tgt", tgt)
    backup(q, {"job-id": "b1", "device": "top", "target": "tgt", "sync": "top"})
    seq = collect_until(q, "null")
    completed = [e for e in seq if isinstance(e, tuple)]
    assert completed == [("BLOCK_JOB_COMPLETED", {"device": "b1", "len": 192 * 1024,
                                                  "offset": 192 * 1024, "speed": 0,
                                                  "type": "backup"})], seq
    q.ok("blockdev-del", {"node-name": "tgt"})
    qio("-f", "raw", "-c", "read -P 0x77 1M 64k", "-c", "read -P 0x78 3M 128k",
        "-c", "read -P 0 0 1M", "-c", "read -P 0 2M 1M", tgt)


def test_point_in_time_while_guest_writes(daemon):
    """A slow backup (speed limit) while the guest overwrites the source over NBD: the target
    holds the contents from the moment the job started."""
    d = daemon()
    q = d.qmp
    src = make_source(d)
    original = os.path.join(d.dir, "original.qcow2")
    shutil.copy(src, original)
    tgt = make_raw(d)
    add_qcow2(q, "src", src)
    add_raw(q, "tgt", tgt)
    uri = start_nbd(d, "src")
    backup(q, {"job-id": "b1", "device": "src", "target": "tgt", "sync": "full",
                             "speed": 1, "x-perf": {"max-workers": 1, "max-chunk": 65536}})
    # Overwrite every megabyte (full, partial left/right, a run across two clusters).
    qio("-f", "raw", "-c", "write -P 0xa1 0 1M", "-c", "write -P 0xa2 1M 4k",
        "-c", "write -P 0xa3 2047k 1k", "-c", "write -P 0xa4 3M 130k", uri)
    blocks = q.ok("query-block-jobs")
    assert len(blocks) == 1 and blocks[0]["device"] == "b1" and blocks[0]["speed"] == 1
    assert blocks[0]["status"] == "running" and blocks[0]["len"] == SIZE
    q.ok("block-job-set-speed", {"device": "b1", "speed": 0})
    seq = collect_until(q, "null")
    assert ("BLOCK_JOB_COMPLETED", {"device": "b1", "len": SIZE, "offset": SIZE, "speed": 0,
                                    "type": "backup"}) in seq, seq
    q.ok("block-export-del", {"id": "exp-src"})
    q.wait_event("BLOCK_EXPORT_DELETED")
    q.ok("blockdev-del", {"node-name": "tgt"})
    q.ok("blockdev-del", {"node-name": "src"})
    r = compare(original, tgt)
    assert r.returncode == 0, r.stdout + r.stderr
    # ... and the source has the new data.
    qio("-f", "qcow2", "-c", "read -P 0xa1 0 1M", "-c", "read -P 0xa4 3M 130k", src)


def test_sync_none_copies_only_overwritten_clusters(daemon):
    d = daemon()
    q = d.qmp
    src = make_source(d)
    tgt = make_raw(d)
    add_qcow2(q, "src", src)
    add_raw(q, "tgt", tgt)
    uri = start_nbd(d, "src")
    backup(q, {"job-id": "b1", "device": "src", "target": "tgt", "sync": "none"})
    qio("-f", "raw", "-c", "write -P 0xee 1M 4k", uri)
    jobs = q.ok("query-jobs")
    assert jobs == [{"id": "b1", "type": "backup", "status": "running",
                     "current-progress": 65536, "total-progress": SIZE}], jobs
    r, before = run_cmd(q, "job-cancel", {"id": "b1"})
    assert r == {"return": {}}, r
    seq = through(q, before, "null")
    assert seq[-3:] == [("BLOCK_JOB_CANCELLED", {"device": "b1", "len": SIZE, "offset": 65536,
                                                 "speed": 0, "type": "backup"}),
                        "concluded", "null"], seq
    q.ok("block-export-del", {"id": "exp-src"})
    q.wait_event("BLOCK_EXPORT_DELETED")
    q.ok("blockdev-del", {"node-name": "tgt"})
    # The old contents of the overwritten cluster, and nothing else.
    qio("-f", "raw", "-c", "read -P 0x22 1M 64k", "-c", "read -P 0 0 1M",
        "-c", "read -P 0 1088k 2496k", tgt)


# -- lifecycle verbs ------------------------------------------------------------------------

def test_manual_lifecycle_pause_resume_cancel_dismiss(daemon):
    d = daemon()
    q = d.qmp
    add_qcow2(q, "src", make_source(d))
    add_raw(q, "tgt", make_raw(d))
    backup(q, {"job-id": "b1", "device": "src", "target": "tgt", "sync": "full",
                             "speed": 1, "auto-finalize": False, "auto-dismiss": False})
    r, before = run_cmd(q, "job-pause", {"id": "b1"})
    assert r == {"return": {}}, r
    # The job parks when it next runs: QEMU reports paused after the reply.
    seq = through(q, before, "paused")
    assert seq == ["paused"], seq
    info = q.ok("query-block-jobs")[0]
    assert (info["paused"], info["status"], info["auto-finalize"], info["auto-dismiss"],
            info["io-status"], info["ready"]) == (True, "paused", False, False, "ok", False), info
    assert q.err("job-pause", {"id": "b1"})["desc"] == "Job is already paused"
    assert q.err("block-job-cancel", {"device": "b1"})["desc"] == \
        "The block job for device 'b1' is currently paused"
    r, before = run_cmd(q, "block-job-resume", {"device": "b1"})
    assert r == {"return": {}} and before == ["running"], (r, before)
    assert q.err("job-resume", {"id": "b1"})["desc"] == "Can't resume a job that was not paused"
    assert q.err("job-dismiss", {"id": "b1"})["desc"] == \
        "Job 'b1' in state 'running' cannot accept command verb 'dismiss'"
    assert q.err("block-job-complete", {"device": "b1"})["desc"] == \
        "Job 'b1' in state 'running' cannot accept command verb 'complete'"
    r, before = run_cmd(q, "block-job-cancel", {"device": "b1"})
    assert r == {"return": {}}, r
    seq = through(q, before, "concluded")
    assert seq[-3:] == ["aborting", ("BLOCK_JOB_CANCELLED",
                                     {"device": "b1", "len": SIZE, "offset": seq[-2][1]["offset"],
                                      "speed": 1, "type": "backup"}), "concluded"], seq
    jobs = q.ok("query-jobs")
    assert jobs[0]["status"] == "concluded" and jobs[0]["error"] == "Operation canceled", jobs
    assert q.ok("query-block-jobs")[0]["error"] == "Operation canceled"
    r, before = run_cmd(q, "block-job-dismiss", {"id": "b1"})
    assert r == {"return": {}} and before == ["null"], (r, before)
    assert q.ok("query-block-jobs") == []


def test_manual_finalize_sends_events_before_reply(daemon):
    d = daemon()
    q = d.qmp
    src = make_source(d)
    tgt = make_raw(d)
    add_qcow2(q, "src", src)
    add_raw(q, "tgt", tgt)
    backup(q, {"job-id": "b1", "device": "src", "target": "tgt", "sync": "full",
                             "auto-finalize": False, "auto-dismiss": False})
    seq = collect_until(q, "pending")
    assert seq[-2:] == ["waiting", "pending"], seq
    ev = q.wait_event("BLOCK_JOB_PENDING")
    assert ev["data"] == {"type": "backup", "id": "b1"}
    assert q.ok("query-jobs")[0]["status"] == "pending"
    r, before = run_cmd(q, "job-finalize", {"id": "b1"})
    assert r == {"return": {}}, r
    assert before == [("BLOCK_JOB_COMPLETED", {"device": "b1", "len": SIZE, "offset": SIZE,
                                               "speed": 0, "type": "backup"}), "concluded"], before
    r, before = run_cmd(q, "job-dismiss", {"id": "b1"})
    assert before == ["null"], before
    q.ok("blockdev-del", {"node-name": "tgt"})
    q.ok("blockdev-del", {"node-name": "src"})
    r = compare(src, tgt)
    assert r.returncode == 0, r.stdout + r.stderr


# -- error policies with blkdebug on the target -----------------------------------------------

def blkdebug_target(q, path, errno):
    q.ok("blockdev-add", {"driver": "raw", "node-name": "tgt",
                          "file": {"driver": "blkdebug", "inject-error": [
                              {"event": "write_aio", "errno": errno, "sector": 2048,
                               "once": True}],
                              "image": {"driver": "file", "filename": path}}})


def test_on_target_error_stop_pauses_and_resume_completes(daemon):
    d = daemon()
    q = d.qmp
    src = make_source(d)
    tgt = make_raw(d)
    add_qcow2(q, "src", src)
    blkdebug_target(q, tgt, 5)
    backup(q, {"job-id": "b1", "device": "src", "target": "tgt", "sync": "full",
                             "on-target-error": "stop", "auto-dismiss": False,
                             "x-perf": {"max-workers": 1, "max-chunk": 65536}})
    seq = collect_until(q, "paused")
    assert seq[-2:] == [("BLOCK_JOB_ERROR", {"device": "b1", "operation": "write",
                                             "action": "stop"}), "paused"], seq
    assert q.ok("query-jobs") == [{"id": "b1", "type": "backup", "status": "paused",
                                   "current-progress": MiB, "total-progress": SIZE}]
    info = q.ok("query-block-jobs")[0]
    assert info["io-status"] == "failed" and info["paused"] is True, info
    r, before = run_cmd(q, "job-resume", {"id": "b1"})
    assert r == {"return": {}} and before == ["running"], (r, before)
    seq = collect_until(q, "concluded")
    assert seq[-4:] == ["waiting", "pending",
                        ("BLOCK_JOB_COMPLETED", {"device": "b1", "len": SIZE, "offset": SIZE,
                                                 "speed": 0, "type": "backup"}),
                        "concluded"], seq
    q.ok("job-dismiss", {"id": "b1"})
    q.ok("blockdev-del", {"node-name": "tgt"})
    q.ok("blockdev-del", {"node-name": "src"})
    r = compare(src, tgt)
    assert r.returncode == 0, r.stdout + r.stderr


def test_on_target_error_report_fails_the_job(daemon):
    d = daemon()
    q = d.qmp
    add_qcow2(q, "src", make_source(d))
    blkdebug_target(q, make_raw(d), 28)
    backup(q, {"job-id": "b1", "device": "src", "target": "tgt", "sync": "full",
                             "x-perf": {"max-workers": 1, "max-chunk": 65536}})
    seq = collect_until(q, "null")
    assert seq[-6:] == [("BLOCK_JOB_ERROR", {"device": "b1", "operation": "write",
                                             "action": "report"}),
                        "aborting",
                        ("BLOCK_JOB_COMPLETED", {"device": "b1", "len": SIZE, "offset": MiB,
                                                 "speed": 0, "type": "backup",
                                                 "error": "No space left on device"}),
                        "concluded", "null"][-6:], seq


def test_on_target_error_ignore_retries(daemon):
    d = daemon()
    q = d.qmp
    src = make_source(d)
    tgt = make_raw(d)
    add_qcow2(q, "src", src)
    blkdebug_target(q, tgt, 5)
    backup(q, {"job-id": "b1", "device": "src", "target": "tgt", "sync": "full",
                             "on-target-error": "ignore",
                             "x-perf": {"max-workers": 1, "max-chunk": 65536}})
    seq = collect_until(q, "null")
    assert ("BLOCK_JOB_ERROR", {"device": "b1", "operation": "write", "action": "ignore"}) in seq
    assert ("BLOCK_JOB_COMPLETED", {"device": "b1", "len": SIZE, "offset": SIZE, "speed": 0,
                                    "type": "backup"}) in seq, seq
    q.ok("blockdev-del", {"node-name": "tgt"})
    q.ok("blockdev-del", {"node-name": "src"})
    r = compare(src, tgt)
    assert r.returncode == 0, r.stdout + r.stderr


# -- incremental backup with a bitmap made by qemu-img ------------------------------------------

def test_incremental_backup_copies_the_bitmap(daemon):
    d = daemon()
    q = d.qmp
    src = make_source(d)
    img("bitmap", "--add", src, "b0")
    qio("-f", "qcow2", "-c", "write -P 0x99 512k 64k", "-c", "write -P 0x98 3M 4k", src)
    tgt = make_raw(d)
    add_qcow2(q, "src", src)
    add_raw(q, "tgt", tgt)
    backup(q, {"job-id": "b1", "device": "src", "target": "tgt",
                             "sync": "incremental", "bitmap": "b0"})
    seq = collect_until(q, "null")
    assert ("BLOCK_JOB_COMPLETED", {"device": "b1", "len": 128 * 1024, "offset": 128 * 1024,
                                    "speed": 0, "type": "backup"}) in seq, seq
    q.ok("blockdev-del", {"node-name": "tgt"})
    qio("-f", "raw", "-c", "read -P 0x99 512k 64k", "-c", "read -P 0x98 3M 4k",
        "-c", "read -P 0x44 3076k 60k", "-c", "read -P 0 0 512k", "-c", "read -P 0 1M 2M", tgt)


# -- argument errors --------------------------------------------------------------------------

def test_argument_errors(daemon):
    d = daemon()
    q = d.qmp
    add_qcow2(q, "src", make_source(d))
    add_raw(q, "tgt", make_raw(d))
    big = os.path.join(d.dir, "big.qcow2")
    img("create", "-q", "-f", "qcow2", big, str(2 * SIZE))
    add_qcow2(q, "big", big)
    base = {"job-id": "j0", "device": "src", "target": "tgt", "sync": "full"}
    cases = [
        ({"job-id": None}, "Invalid job ID ''"),
        ({"compress": True}, "Compression is not supported for this drive "),
        ({"target": "big"}, "Source and target image have different sizes"),
        ({"target": "src"}, "Source and target cannot be the same"),
        ({"target": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
        ({"sync": "none", "bitmap": "x"}, "Bitmap 'x' could not be found"),
        ({"sync": "incremental"}, "must provide a valid bitmap name for 'incremental' sync mode"),
        ({"sync": "bitmap"}, "must provide a valid bitmap name for 'bitmap' sync mode"),
        ({"bitmap-mode": "always"}, "Cannot specify bitmap sync mode without a bitmap"),
        ({"x-perf": {"max-workers": 0}}, "max-workers must be between 1 and 2147483647"),
        ({"x-perf": {"max-chunk": -1}},
         "max-chunk must be zero (which means no limit) or positive"),
    ]
    for change, desc in cases:
        args = dict(base)
        for k, v in change.items():
            if v is None:
                del args[k]
            else:
                args[k] = v
        r = q.cmd_args("blockdev-backup", args)
        assert r.get("error", {}).get("desc") == desc, (change, r)
    # A negative speed fails after the job was created: created, null.
    r, before = run_cmd(q, "blockdev-backup", dict(base, speed=-1))
    assert r["error"]["desc"] == "Parameter 'speed' expects a non-negative value", r
    assert before == ["created", "null"], before
    for cmd, args in (("block-job-pause", {"device": "nope"}),
                      ("block-job-set-speed", {"device": "nope", "speed": 1})):
        assert q.err(cmd, args) == {"class": "DeviceNotActive",
                                    "desc": "Block job 'nope' not found"}
    assert q.err("job-pause", {"id": "nope"})["desc"] == "Job not found"


def test_target_of_a_running_backup_is_busy(daemon):
    d = daemon()
    q = d.qmp
    add_qcow2(q, "src", make_source(d))
    add_raw(q, "tgt", make_raw(d))
    backup(q, {"job-id": "j0", "device": "src", "target": "tgt", "sync": "full",
                             "speed": 1})
    r = q.cmd_args("blockdev-backup", {"job-id": "j1", "device": "src", "target": "tgt",
                                       "sync": "full"})
    assert r["error"]["desc"] == \
        "Node 'tgt' is busy: block device is in use by block job: backup", r
    q.ok("block-job-set-speed", {"device": "j0", "speed": 0})
    collect_until(q, "null")


def test_quit_cancels_running_jobs_before_its_reply(daemon):
    d = daemon()
    q = d.qmp
    add_qcow2(q, "src", make_source(d))
    add_raw(q, "tgt", make_raw(d))
    backup(q, {"job-id": "j0", "device": "src", "target": "tgt", "sync": "full",
                             "speed": 1})
    r, before = run_cmd(q, "quit", None)
    assert r == {"return": {}}, r
    seq = strip_drain_pairs(before)
    assert seq == ["aborting", ("BLOCK_JOB_CANCELLED", {"device": "j0", "len": SIZE,
                                                         "offset": seq[1][1]["offset"],
                                                         "speed": 1, "type": "backup"}),
                   "concluded", "null"], before
    d.wait_exit()
