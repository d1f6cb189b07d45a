"""blockdev-mirror on strata and qemu-storage-daemon (QEMU iotests 041, 151 and
tests/mirror-top-perms): the events in order, the mirror_top filter in the graph, READY and
job-complete pivoting the users of the source (an NBD export) to the target, soft and hard
cancel after READY, the error policies, write-blocking mode, and a mirror to an NBD target
served by a second daemon (a running disk moved between hosts). Guest writes go through a
writable NBD export of the source while the job runs; the images are checked with qemu-img
afterwards.
"""

import os
import time

import pytest

from test_backup_jobs import (MiB, SIZE, add_qcow2, blkdebug_target, collect_until, compare,
                              img, make_raw, make_source, qio, run_cmd, start_nbd, summary,
                              through)
from helpers import delete_export_after_clients_left
from test_stream import check_clean


def new_qcow2(d, name, size=SIZE, backing=None):
    path = os.path.join(d.dir, name)
    args = ["create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    img(*(args + [path, str(size)]))
    return path


def expected_raw(d, writes, name="expected.raw", size=SIZE, base=None):
    """A raw image with the source's patterns (make_source), then `writes` applied."""
    path = make_raw(d, name, size)
    cmds = []
    if base is None:
        for i in range(size // MiB):
            cmds += ["-c", "write -P 0x%x %d 1M" % (0x11 * (i % 4 + 1), i * MiB)]
    for pattern, offset, length in writes:
        cmds += ["-c", "write -P 0x%x %d %d" % (pattern, offset, length)]
    if cmds:
        qio("-f", "raw", *cmds, path)
    return path


def until_event(q, before, name, timeout=30.0):
    """`before`, completed with later events up to the first event called `name`."""
    out = list(before)
    for ev in q.events:
        if any(isinstance(e, tuple) and e[0] == name for e in out):
            return out
        if not ev.get("_consumed"):
            ev["_consumed"] = True
            out.append(summary(ev))
    deadline = time.monotonic() + timeout
    while not any(isinstance(e, tuple) and e[0] == name for e in out):
        remaining = deadline - time.monotonic()
        assert remaining > 0, "stuck waiting for %s after %r" % (name, out)
        msg = q.recv_msg(remaining)
        if isinstance(msg, dict) and "event" in msg:
            msg["_consumed"] = True
            out.append(summary(msg))
        else:
            q._pending.append(msg)
    return out


def mirror_until_ready(q, args, command="blockdev-mirror"):
    r, before = run_cmd(q, command, args)
    assert r == {"return": {}}, r
    assert before == ["created", "running"], before
    events = until_event(q, before, "BLOCK_JOB_READY")
    ready = [e for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_READY"]
    return events, ready


def source_and_target(d, export=True):
    """src (make_source) and an empty tgt.qcow2 of the same size as nodes "src" and "tgt", and
    a writable NBD export of src (its URI, or None)."""
    q = d.qmp
    src = make_source(d)
    tgt = new_qcow2(d, "tgt.qcow2")
    add_qcow2(q, "src", src)
    add_qcow2(q, "tgt", tgt)
    return src, tgt, start_nbd(d, "src") if export else None


def complete(q, job):
    """job-complete; the events until the job is gone."""
    r, before = run_cmd(q, "job-complete", {"id": job})
    assert r == {"return": {}}, r
    return through(q, before, "null")


def delete_all(q, export=True):
    if export:
        assert "return" in delete_export_after_clients_left(q, "exp-src")
    q.ok("blockdev-del", {"node-name": "tgt"})
    q.ok("blockdev-del", {"node-name": "src"})


def nodes(q):
    return {n["node-name"]: n for n in q.ok("query-named-block-nodes")}


def payload(job, length, kind="mirror", **extra):
    return dict({"device": job, "len": length, "offset": length, "speed": 0, "type": kind},
                **extra)


# -- the success path ---------------------------------------------------------------------------

def test_full_mirror_ready_complete_pivots_the_export(daemon):
    d = daemon()
    q = d.qmp
    src, tgt, uri = source_and_target(d)
    events, ready = mirror_until_ready(q, {"job-id": "m", "device": "src", "target": "tgt",
                                           "sync": "full", "filter-node-name": "mtop"})
    assert events[-2:] == ["ready", ("BLOCK_JOB_READY", payload("m", SIZE))], events
    job = q.ok("query-block-jobs")
    assert job == [{"type": "mirror", "device": "m", "len": SIZE, "offset": SIZE,
                    "busy": False, "paused": False, "speed": 0, "io-status": "ok",
                    "ready": True, "status": "ready", "auto-finalize": True,
                    "auto-dismiss": True, "actively-synced": False}], job
    top = nodes(q)["mtop"]
    assert (top["drv"], top["file"], top["ro"]) == ("mirror_top", src, False), top
    # Guest writes during READY reach the target before the pivot.
    qio("-f", "raw", "-c", "write -P 0x66 512k 1M", uri)
    events = complete(q, "m")
    assert [e for e in events if isinstance(e, str)] == [
        "waiting", "pending", "concluded", "null"], events
    completed = [e[1] for e in events if isinstance(e, tuple)]
    assert len(completed) == 1 and completed[0]["type"] == "mirror", events
    assert completed[0]["len"] == completed[0]["offset"] and "error" not in completed[0]
    assert "mtop" not in nodes(q)
    # The export serves the target now: this write lands there and not on the source.
    assert [e["node-name"] for e in q.ok("query-block-exports")] == ["tgt"]
    qio("-f", "raw", "-c", "write -P 0x77 3M 512k", "-c", "read -P 0x66 512k 1M", uri)
    delete_all(q)
    check_clean(tgt)
    r = compare(tgt, expected_raw(d, [(0x66, 512 << 10, MiB), (0x77, 3 * MiB, 512 << 10)]))
    assert r.returncode == 0, r.stdout + r.stderr
    r = compare(src, expected_raw(d, [(0x66, 512 << 10, MiB)], name="src.raw"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_soft_cancel_after_ready_completes_without_pivot(daemon):
    d = daemon()
    q = d.qmp
    src, tgt, uri = source_and_target(d)
    mirror_until_ready(q, {"job-id": "m", "device": "src", "target": "tgt", "sync": "full",
                           "auto-dismiss": False})
    qio("-f", "raw", "-c", "write -P 0x5a 1M 64k", uri)
    r, before = run_cmd(q, "block-job-cancel", {"device": "m"})
    assert r == {"return": {}}, r
    events = through(q, before, "concluded")
    assert [e for e in events if isinstance(e, str)] == ["waiting", "pending", "concluded"]
    completed = [e for e in events if isinstance(e, tuple)]
    assert [e[0] for e in completed] == ["BLOCK_JOB_COMPLETED"] and "error" not in completed[0][1]
    assert [j["status"] for j in q.ok("query-jobs")] == ["concluded"]
    assert "error" not in q.ok("query-jobs")[0]
    q.ok("job-dismiss", {"id": "m"})
    # The export still serves the source; the target is a consistent copy.
    assert [e["node-name"] for e in q.ok("query-block-exports")] == ["src"]
    delete_all(q)
    check_clean(tgt)
    r = compare(tgt, expected_raw(d, [(0x5a, MiB, 64 << 10)]))
    assert r.returncode == 0, r.stdout + r.stderr


def test_job_cancel_after_ready_is_forced(daemon):
    d = daemon()
    q = d.qmp
    source_and_target(d, export=False)
    mirror_until_ready(q, {"job-id": "m", "device": "src", "target": "tgt", "sync": "full",
                           "auto-dismiss": False})
    r, before = run_cmd(q, "job-cancel", {"id": "m"})
    assert r == {"return": {}}, r
    events = through(q, before, "concluded")
    assert events == ["aborting", ("BLOCK_JOB_CANCELLED", payload("m", SIZE)), "concluded"]
    assert q.ok("query-jobs") == [{"id": "m", "type": "mirror", "status": "concluded",
                                   "current-progress": SIZE, "total-progress": SIZE,
                                   "error": "Operation canceled"}]
    q.ok("job-dismiss", {"id": "m"})
    assert [n for n in nodes(q).values() if n["drv"] == "mirror_top"] == []


def test_sync_top_copies_only_the_top_layer(daemon):
    d = daemon()
    q = d.qmp
    base = make_source(d, "base.qcow2")
    top = new_qcow2(d, "top.qcow2", backing=base)
    qio("-f", "qcow2", "-c", "write -P 0x99 2M 256k", top)
    tgt = new_qcow2(d, "tgt.qcow2", backing=base)
    add_qcow2(q, "src", top)
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "backing": None,
                          "file": {"driver": "file", "filename": tgt}})
    events, ready = mirror_until_ready(q, {"job-id": "m", "device": "src", "target": "tgt",
                                           "sync": "top"})
    assert ready == [("BLOCK_JOB_READY", payload("m", 256 << 10))], events
    complete(q, "m")
    q.ok("blockdev-del", {"node-name": "tgt"})
    q.ok("blockdev-del", {"node-name": "src"})
    check_clean(tgt)
    r = compare(tgt, expected_raw(d, [(0x99, 2 * MiB, 256 << 10)]), fmt_a="qcow2")
    assert r.returncode == 0, r.stdout + r.stderr


def test_write_blocking_mode_is_actively_synced(daemon):
    d = daemon()
    q = d.qmp
    src, tgt, uri = source_and_target(d)
    mirror_until_ready(q, {"job-id": "m", "device": "src", "target": "tgt", "sync": "full",
                           "copy-mode": "write-blocking"})
    # Unaligned guest writes: the edges are read-modify-written, all of it reaches the target.
    qio("-f", "raw", "-c", "write -P 0x3c 100000 300000", "-c", "write -z 2M 64k", uri)
    info = q.ok("query-block-jobs")[0]
    assert info["actively-synced"] is True, info
    complete(q, "m")
    delete_all(q)
    check_clean(tgt)
    r = compare(tgt, expected_raw(d, [(0x3c, 100000, 300000), (0, 2 * MiB, 64 << 10)]))
    assert r.returncode == 0, r.stdout + r.stderr


def test_block_job_change_switches_to_write_blocking(daemon):
    d = daemon()
    q = d.qmp
    src, tgt, uri = source_and_target(d)
    mirror_until_ready(q, {"job-id": "m", "device": "src", "target": "tgt", "sync": "full"})
    change = {"id": "m", "type": "mirror"}
    for args, desc in [
            ({"copy-mode": "background"}, None),
            ({"copy-mode": "write-blocking"}, None),
            ({"copy-mode": "background"}, "Change to copy mode 'background' is not implemented"),
            ({"type": "stream"}, "Change to copy mode 'background' is not implemented"),
            ({}, "Parameter 'copy-mode' is missing")]:
        r = q.cmd_args("block-job-change", dict(change, **args))
        assert r == ({"return": {}} if desc is None else
                     {"error": {"class": "GenericError", "desc": desc}}), (args, r)
    r = q.cmd_args("block-job-change", {"id": "nope", "type": "mirror",
                                        "copy-mode": "write-blocking"})
    assert r == {"error": {"class": "DeviceNotActive", "desc": "Block job 'nope' not found"}}, r
    qio("-f", "raw", "-c", "write -P 0x2d 64k 128k", uri)
    deadline = time.monotonic() + 10
    while not q.ok("query-block-jobs")[0]["actively-synced"]:
        assert time.monotonic() < deadline, q.ok("query-block-jobs")
        time.sleep(0.05)
    complete(q, "m")
    delete_all(q)
    check_clean(tgt)
    r = compare(tgt, expected_raw(d, [(0x2d, 64 << 10, 128 << 10)]))
    assert r.returncode == 0, r.stdout + r.stderr


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,desc", [
    ({"granularity": 1000}, "Parameter 'granularity' expects a power of 2"),
    ({"granularity": 256}, "Parameter 'granularity' expects a value in range [512B, 64MB]"),
    ({"granularity": 1 << 27}, "Parameter 'granularity' expects a value in range [512B, 64MB]"),
    ({"buf-size": -1}, "Invalid parameter 'buf-size'"),
    ({"sync": "incremental"}, "Sync mode 'incremental' not supported"),
    ({"sync": "bitmap"}, "Sync mode 'bitmap' not supported"),
    ({"target": "src"}, "Can't mirror node into itself"),
    ({"replaces": "nope"}, "Failed to find node with node-name='nope'"),
    ({"device": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
    ({"target": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
    ({"job-id": "1x"}, "Invalid job ID '1x'"),
    ({"copy-mode": "bad"}, "Parameter 'copy-mode' does not accept value 'bad'"),
    ({"filter-node-name": "tgt"}, "Duplicate nodes with node-name='tgt'"),
    ({"speed": -1}, "Parameter 'speed' expects a non-negative value"),
])
def test_argument_errors(daemon, args, desc):
    d = daemon()
    q = d.qmp
    source_and_target(d, export=False)
    r = q.cmd_args("blockdev-mirror", dict({"job-id": "m", "device": "src", "target": "tgt",
                                            "sync": "full"}, **args))
    assert r == {"error": {"class": "GenericError", "desc": desc}}, r
    assert q.ok("query-block-jobs") == []
    # Nothing was left in the graph: a mirror can start now.
    mirror_until_ready(q, {"job-id": "m2", "device": "src", "target": "tgt", "sync": "full"})
    q.ok("job-cancel", {"id": "m2"})
    collect_until(q, "null")


def test_source_below_a_filter_needs_a_root_node(daemon):
    d = daemon()
    q = d.qmp
    source_and_target(d, export=False)
    q.ok("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "src"})
    r = q.cmd_args("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                       "sync": "full"})
    assert r == {"error": {"class": "GenericError", "desc": "Need a root block node"}}, r


def test_different_sizes_fail_the_job(daemon):
    d = daemon()
    q = d.qmp
    add_qcow2(q, "src", make_source(d))
    add_qcow2(q, "tgt", new_qcow2(d, "small.qcow2", size=2 * MiB))
    r, before = run_cmd(q, "blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                               "sync": "full"})
    assert r == {"return": {}}, r
    events = through(q, before, "null")
    assert events == ["created", "running", "aborting",
                      ("BLOCK_JOB_COMPLETED", dict(payload("m", 0), error=(
                          "Source and target image have different sizes"))),
                      "concluded", "null"], events


def test_target_in_use_by_a_writer_is_refused(daemon):
    d = daemon()
    q = d.qmp
    source_and_target(d, export=False)
    start_nbd(d, "tgt")
    r = q.cmd_args("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                       "sync": "full"})
    # (QEMU names both users "an unnamed block device"; strata names the export and the job.)
    assert "error" in r and r["error"]["desc"].startswith(
        "Permission conflict on node 'tgt': permissions 'consistent read, write' are both "
        "required by "), r
    assert q.ok("query-block-jobs") == []
    assert [n for n in nodes(q).values() if n["drv"] == "mirror_top"] == []


def test_on_target_error_stop_pauses_and_resume_completes(daemon):
    d = daemon()
    q = d.qmp
    src = make_source(d)
    tgt = make_raw(d)
    add_qcow2(q, "src", src)
    blkdebug_target(q, tgt, 5)
    r, before = run_cmd(q, "blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                               "sync": "full", "on-target-error": "stop"})
    assert r == {"return": {}}, r
    seq = collect_until(q, "paused")
    assert seq[-2:] == [("BLOCK_JOB_ERROR", {"device": "m", "operation": "write",
                                             "action": "stop"}), "paused"], seq
    info = q.ok("query-block-jobs")[0]
    assert info["io-status"] == "failed" and info["paused"] is True, info
    r, before = run_cmd(q, "job-resume", {"id": "m"})
    assert r == {"return": {}} and before == ["running"], (r, before)
    through(q, before, "ready")
    complete(q, "m")
    q.ok("blockdev-del", {"node-name": "tgt"})
    q.ok("blockdev-del", {"node-name": "src"})
    r = compare(src, tgt)
    assert r.returncode == 0, r.stdout + r.stderr


def test_on_target_error_report_fails_the_job(daemon):
    d = daemon()
    q = d.qmp
    add_qcow2(q, "src", make_source(d))
    blkdebug_target(q, make_raw(d), 28)
    r, before = run_cmd(q, "blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                               "sync": "full"})
    assert r == {"return": {}}, r
    seq = collect_until(q, "null")
    assert ("BLOCK_JOB_ERROR", {"device": "m", "operation": "write", "action": "report"}) in seq
    assert seq[-4:-2] == ["aborting", seq[-3]] and seq[-3][0] == "BLOCK_JOB_COMPLETED", seq
    assert seq[-3][1]["error"] == "No space left on device", seq
    assert seq[-2:] == ["concluded", "null"], seq
    assert [n for n in nodes(q).values() if n["drv"] == "mirror_top"] == []


# -- a running disk moved to another daemon ---------------------------------------------------------

def test_mirror_to_an_nbd_target_on_a_second_daemon(daemon):
    here = daemon()
    there = daemon()
    src = make_source(here)
    dest = new_qcow2(there, "dest.qcow2")
    add_qcow2(there.qmp, "dest", dest)
    dest_sock = os.path.join(there.dir, "dest.sock")
    there.qmp.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": dest_sock}}})
    there.qmp.ok("block-export-add", {"type": "nbd", "id": "in", "node-name": "dest",
                                      "writable": True})
    q = here.qmp
    add_qcow2(q, "src", src)
    uri = start_nbd(here, "src")
    q.ok("blockdev-add", {"driver": "nbd", "node-name": "remote", "export": "dest",
                          "server": {"type": "unix", "path": dest_sock}})
    mirror_until_ready(q, {"job-id": "move", "device": "src", "target": "remote",
                           "sync": "full"})
    qio("-f", "raw", "-c", "write -P 0x42 1536k 512k", uri)
    r, before = run_cmd(q, "job-complete", {"id": "move"})
    assert r == {"return": {}}, r
    through(q, before, "null")
    # The guest's export now writes to the other host.
    qio("-f", "raw", "-c", "write -P 0x43 0 64k", uri)
    assert "return" in delete_export_after_clients_left(q, "exp-src")
    q.ok("blockdev-del", {"node-name": "remote"})
    assert "return" in delete_export_after_clients_left(there.qmp, "in")
    there.qmp.ok("blockdev-del", {"node-name": "dest"})
    check_clean(dest)
    r = compare(dest, expected_raw(here, [(0x42, 1536 << 10, 512 << 10), (0x43, 0, 64 << 10)]))
    assert r.returncode == 0, r.stdout + r.stderr
