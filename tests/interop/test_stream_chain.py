"""QEMU iotest 030's chain scenarios on strata and qemu-storage-daemon: streams on disjoint parts
of one backing chain running in parallel, jobs that would overlap refused with QEMU's op-blocker
error, a backing file shorter than its overlay, and ENOSPC under on-error=enospc. Guest writes
go through an NBD export of the top while the streams run; every image is checked with
qemu-img check and the content compared with qemu-img compare.
"""

import os
import subprocess

import pytest

from helpers import delete_export_after_clients_left
from test_backup_jobs import collect_until, compare, img, qio, run_cmd, start_nbd
from test_stream import check_clean

MiB = 1 << 20
SIZE = 8 * MiB
LAYERS = 7  # node0 (base) .. node6 (top)


def make_long_chain(d):
    """node0 <- node1 <- ... <- node6, layer i holding pattern 0x10+i in its own MiB."""
    paths = []
    for i in range(LAYERS):
        path = os.path.join(d.dir, "img%d.qcow2" % i)
        args = ["create", "-q", "-f", "qcow2"]
        if paths:
            args += ["-b", paths[-1], "-F", "qcow2"]
        img(*(args + [path, str(SIZE)]))
        qio("-f", "qcow2", "-c", "write -P 0x%x %d 1M" % (0x10 + i, i * MiB), path)
        paths.append(path)
    expected = os.path.join(d.dir, "expected.raw")
    img("convert", "-O", "raw", paths[-1], expected)
    return paths, expected


def add_long_chain(q, paths):
    for i, path in enumerate(paths):
        options = {"driver": "qcow2", "node-name": "node%d" % i,
                   "file": {"driver": "file", "filename": path}}
        if i == 0:
            options["backing"] = None
        else:
            options["backing"] = "node%d" % (i - 1)
        q.ok("blockdev-add", options)


def delete_chain(q):
    for i in reversed(range(LAYERS)):
        q.ok("blockdev-del", {"node-name": "node%d" % i})


def test_parallel_streams_on_disjoint_parts_of_the_chain(daemon):
    # 030 TestParallelOps.test_stream_parallel: node2 from node1, node4 from node3, node6 from
    # node5, all at once, with the guest writing through the top.
    d = daemon()
    q = d.qmp
    paths, expected = make_long_chain(d)
    add_long_chain(q, paths)
    uri = start_nbd(d, "node6")
    jobs = []
    for i in (2, 4, 6):
        job = "stream-node%d" % i
        r, _ = run_cmd(q, "block-stream", {"job-id": job, "device": "node%d" % i,
                                           "bottom": "node%d" % (i - 1), "speed": 1024})
        assert r == {"return": {}}, r
        jobs.append(job)
    assert sorted(j["device"] for j in q.ok("query-block-jobs")) == sorted(jobs)
    qio("-f", "raw", "-c", "write -P 0x77 7M 512k", uri)
    for job in jobs:
        q.ok("block-job-set-speed", {"device": job, "speed": 0})
    done = set()
    while len(done) < len(jobs):
        for ev in collect_until(q, "null", timeout=60):
            if isinstance(ev, tuple) and ev[0] == "BLOCK_JOB_COMPLETED":
                assert "error" not in ev[1], ev
                done.add(ev[1]["device"])
    nodes = {n["node-name"]: n for n in q.ok("query-named-block-nodes")}
    for i in (2, 4, 6):
        assert nodes["node%d" % i]["backing_file"] == paths[i - 2], nodes["node%d" % i]
    assert "return" in delete_export_after_clients_left(q, "exp-node6")
    delete_chain(q)
    for path in paths:
        check_clean(path)
    with open(expected, "r+b") as f:
        f.seek(7 * MiB)
        f.write(b"\x77" * (512 << 10))
    r = compare(paths[-1], expected)
    assert r.returncode == 0, r.stdout + r.stderr


BUSY = "Node 'node4' is busy: block device is in use by block job: stream"


@pytest.mark.parametrize("command,args,desc", [
    ("block-stream", {"device": "node4"}, BUSY),
    ("blockdev-mirror", {"device": "node6", "target": "node4", "sync": "full"}, BUSY),
    # A device below another node is refused before any job is looked at.
    ("block-commit", {"device": "node4", "top-node": "node3", "base-node": "node2"},
     "Need a root block node"),
])
def test_overlapping_jobs_are_refused(daemon, command, args, desc):
    # 030 TestParallelOps.test_overlapping_*: a node a job works on is busy for other jobs.
    d = daemon()
    q = d.qmp
    paths, _ = make_long_chain(d)
    add_long_chain(q, paths)
    r, _ = run_cmd(q, "block-stream", {"job-id": "s0", "device": "node4", "bottom": "node3",
                                       "speed": 1024})
    assert r == {"return": {}}, r
    r = q.cmd_args(command, dict({"job-id": "j1"}, **args))
    assert r == {"error": {"class": "GenericError", "desc": desc}}, r
    assert [j["device"] for j in q.ok("query-block-jobs")] == ["s0"]
    q.ok("block-job-cancel", {"device": "s0"})
    collect_until(q, "null")


def test_stream_from_a_smaller_backing_file(daemon):
    # 030 TestSmallerBackingFile: the part of the top beyond the backing file's end reads as
    # zeroes and stays so after the stream.
    d = daemon()
    q = d.qmp
    base = os.path.join(d.dir, "small.qcow2")
    top = os.path.join(d.dir, "big.qcow2")
    img("create", "-q", "-f", "qcow2", base, "1M")
    qio("-f", "qcow2", "-c", "write -P 0x61 0 1M", base)
    img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "4M")
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": top}})
    uri = start_nbd(d, "top")
    r, before = run_cmd(q, "block-stream", {"job-id": "s0", "device": "top"})
    assert r == {"return": {}}, r
    events = before + collect_until(q, "null")
    completed = [e[1] for e in events if isinstance(e, tuple)]
    assert len(completed) == 1 and "error" not in completed[0], events
    qio("-f", "raw", "-c", "read -P 0x61 0 1M", "-c", "read -P 0 1M 3M", uri)
    assert "return" in delete_export_after_clients_left(q, "exp-top")
    q.ok("blockdev-del", {"node-name": "top"})
    check_clean(top)
    info = subprocess.run(["qemu-img", "info", "--output=json", top], capture_output=True,
                          text=True, timeout=60)
    assert "backing-filename" not in info.stdout, info.stdout


def test_enospc_with_on_error_enospc_pauses_and_resume_completes(daemon):
    # 030 TestEIO/TestENOSPC: an ENOSPC reading the chain pauses the job (on-error enospc),
    # io-status "nospace"; resuming finishes the stream.
    d = daemon()
    q = d.qmp
    base = os.path.join(d.dir, "base.qcow2")
    top = os.path.join(d.dir, "top.qcow2")
    img("create", "-q", "-f", "qcow2", base, "4M")
    qio("-f", "qcow2", "-c", "write -P 0x33 0 4M", base)
    img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "base",
                          "file": {"driver": "blkdebug", "inject-error": [
                              {"event": "read_aio", "errno": 28, "once": True}],
                              "image": {"driver": "file", "filename": base}}})
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "base",
                          "file": {"driver": "file", "filename": top}})
    r, before = run_cmd(q, "block-stream", {"job-id": "s0", "device": "top",
                                            "on-error": "enospc"})
    assert r == {"return": {}}, r
    events = before + collect_until(q, "paused")
    assert ("BLOCK_JOB_ERROR", {"device": "s0", "operation": "read", "action": "stop"}) in events
    info = q.ok("query-block-jobs")[0]
    assert info["io-status"] == "nospace" and info["paused"] is True, info
    q.ok("block-job-resume", {"device": "s0"})
    events = collect_until(q, "null")
    completed = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert len(completed) == 1 and "error" not in completed[0], events
    q.ok("blockdev-del", {"node-name": "top"})
    q.ok("blockdev-del", {"node-name": "base"})
    check_clean(top)
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", top, base],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
