"""block-stream and the copy-on-read filter on strata and qemu-storage-daemon (QEMU iotest 030's
scenarios, without a VM: guest writes go through a writable NBD export of the top node).

Each scenario runs on both daemons and checks the events in order, the backing file the top
image records afterwards (qemu-img info), qemu-img check, and the content against what the
chain read before (qemu-img compare with a raw copy made first, plus the guest writes).
"""

import json
import os
import subprocess

import pytest

from conftest import need_tool
from test_backup_jobs import collect_until, compare, img, qio, run_cmd, start_nbd, through

MiB = 1 << 20
SIZE = 8 * MiB


def make_chain(d):
    """base.qcow2 <- mid.qcow2 <- top.qcow2, each layer with data of its own; returns the
    paths and a raw image of what top reads."""
    base, mid, top = (os.path.join(d.dir, n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    img("create", "-q", "-f", "qcow2", base, str(SIZE))
    qio("-f", "qcow2", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x12 5M 2M", base)
    img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    qio("-f", "qcow2", "-c", "write -P 0x21 2M 2M", "-c", "write -z 6M 512k", mid)
    img("create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    qio("-f", "qcow2", "-c", "write -P 0x31 1M 512k", "-c", "write -P 0x32 7M 64k", top)
    expected = os.path.join(d.dir, "expected.raw")
    img("convert", "-O", "raw", top, expected)
    return base, mid, top, expected


def add_chain(q, base, mid, top):
    """Every layer as a named node: base <- mid <- top."""
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "base",
                          "file": {"driver": "file", "filename": base}})
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "mid", "backing": "base",
                          "file": {"driver": "file", "filename": mid}})
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "mid",
                          "file": {"driver": "file", "filename": top}})


def info(path):
    need_tool("qemu-img")
    r = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def check_clean(path):
    r = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def assert_chain_content(top, expected, writes):
    """`top` reads as the raw image `expected` with the guest's (pattern, offset, length)
    writes applied (applied to `expected` here)."""
    with open(expected, "r+b") as f:
        for pattern, offset, length in writes:
            f.seek(offset)
            f.write(bytes([pattern]) * length)
    r = compare(top, expected)
    assert r.returncode == 0, r.stdout + r.stderr


def stream_to_end(q, args):
    r, before = run_cmd(q, "block-stream", args)
    assert r == {"return": {}}, r
    return through(q, before, "null")


def test_whole_chain_stream(daemon):
    d = daemon()
    base, mid, top, expected = make_chain(d)
    add_chain(d.qmp, base, mid, top)
    events = stream_to_end(d.qmp, {"job-id": "s0", "device": "top"})
    assert [e for e in events if isinstance(e, str)] == [
        "created", "running", "waiting", "pending", "concluded", "null"]
    completed = [e for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert completed and completed[0][1]["type"] == "stream"
    assert completed[0][1]["len"] == SIZE and completed[0][1]["offset"] == SIZE
    nodes = {n["node-name"]: n for n in d.qmp.ok("query-named-block-nodes")}
    assert "backing_file" not in nodes["top"]["image"]
    d.qmp.ok("blockdev-del", {"node-name": "top"})
    assert "backing-filename" not in info(top)
    check_clean(top)
    r = compare(top, expected)
    assert r.returncode == 0, r.stdout + r.stderr
    # mid and base are free again.
    d.qmp.ok("blockdev-del", {"node-name": "mid"})
    d.qmp.ok("blockdev-del", {"node-name": "base"})


def test_partial_stream_to_base_node(daemon):
    d = daemon()
    base, mid, top, expected = make_chain(d)
    add_chain(d.qmp, base, mid, top)
    stream_to_end(d.qmp, {"job-id": "s0", "device": "top", "base-node": "base"})
    d.qmp.ok("blockdev-del", {"node-name": "top"})
    d.qmp.ok("blockdev-del", {"node-name": "mid"})
    d.qmp.ok("blockdev-del", {"node-name": "base"})
    recorded = info(top)
    assert recorded["backing-filename"] == base
    assert recorded["backing-filename-format"] == "qcow2"
    check_clean(top)
    r = compare(top, expected)
    assert r.returncode == 0, r.stdout + r.stderr
    # Only what mid held (and top already had) is in top now: base's clusters stay in base.
    r = subprocess.run(["qemu-img", "map", "--output=json", "-U", top], capture_output=True,
                       text=True, timeout=60)
    depths = {(e["start"], e["depth"]) for e in json.loads(r.stdout) if e["data"]}
    assert (0, 1) in depths  # base's first MiB is still read from base


def test_stream_with_backing_file_name(daemon):
    d = daemon()
    base, mid, top, _ = make_chain(d)
    add_chain(d.qmp, base, mid, top)
    stream_to_end(d.qmp, {"job-id": "s0", "device": "top", "base-node": "base",
                          "backing-file": "base.qcow2"})
    d.qmp.ok("blockdev-del", {"node-name": "top"})
    assert info(top)["backing-filename"] == "base.qcow2"


def test_stream_under_guest_writes(daemon):
    d = daemon()
    base, mid, top, expected = make_chain(d)
    add_chain(d.qmp, base, mid, top)
    uri = start_nbd(d, "top")
    r, _ = run_cmd(d.qmp, "block-stream", {"job-id": "s0", "device": "top", "speed": 64 * 1024})
    assert r == {"return": {}}, r
    # The guest overwrites regions the stream has not reached yet (and one it may have).
    writes = [(0x41, 6 * MiB + 4096, 8192), (0x42, 3 * MiB, 1 * MiB), (0x43, 0, 4096)]
    for pattern, offset, length in writes:
        qio("-f", "raw", "-c", "write -P 0x%x %d %d" % (pattern, offset, length), uri)
    d.qmp.ok("block-job-set-speed", {"device": "s0", "speed": 0})
    collect_until(d.qmp, "null", timeout=60)
    for pattern, offset, length in writes:
        qio("-f", "raw", "-c", "read -P 0x%x %d %d" % (pattern, offset, length), uri)
    d.qmp.ok("block-export-del", {"id": "exp-top"})
    d.qmp.ok("nbd-server-stop")
    d.qmp.ok("blockdev-del", {"node-name": "top"})
    d.qmp.ok("blockdev-del", {"node-name": "mid"})
    d.qmp.ok("blockdev-del", {"node-name": "base"})
    check_clean(top)
    assert_chain_content(top, expected, writes)


def test_pause_resume_and_cancel(daemon):
    d = daemon()
    base, mid, top, _ = make_chain(d)
    add_chain(d.qmp, base, mid, top)
    r, _ = run_cmd(d.qmp, "block-stream", {"job-id": "s0", "device": "top", "speed": 64 * 1024})
    assert r == {"return": {}}, r
    r = d.qmp.cmd_args("block-job-change", {"id": "s0", "type": "stream"})
    assert r == {"error": {"class": "GenericError",
                           "desc": "Job type does not support change"}}, r
    d.qmp.ok("block-job-pause", {"device": "s0"})
    collect_until(d.qmp, "paused")
    jobs = d.qmp.ok("query-block-jobs")
    assert jobs[0]["paused"] is True and jobs[0]["type"] == "stream"
    d.qmp.ok("block-job-resume", {"device": "s0"})
    collect_until(d.qmp, "running")
    d.qmp.ok("block-job-cancel", {"device": "s0"})
    events = collect_until(d.qmp, "null")
    assert ("BLOCK_JOB_CANCELLED" in [e[0] for e in events if isinstance(e, tuple)])
    # A cancelled stream leaves the chain as it was.
    nodes = {n["node-name"]: n for n in d.qmp.ok("query-named-block-nodes")}
    assert nodes["top"]["backing_file"] == mid


def test_filter_node_name_puts_a_copy_on_read_filter_above_the_top(daemon):
    # QEMU's stream_start: a copy-on-read filter above the top while the job runs; the guest's
    # export goes through it, so guest reads copy into the top too. It goes when the job ends.
    d = daemon()
    base, mid, top, _ = make_chain(d)
    add_chain(d.qmp, base, mid, top)
    uri = start_nbd(d, "top")
    r, _ = run_cmd(d.qmp, "block-stream", {"job-id": "s0", "device": "top", "speed": 64 * 1024,
                                           "filter-node-name": "cor0"})
    assert r == {"return": {}}, r
    nodes = {n["node-name"]: n for n in d.qmp.ok("query-named-block-nodes")}
    assert nodes["cor0"]["drv"] == "copy-on-read", nodes["cor0"]
    assert [e["node-name"] for e in d.qmp.ok("query-block-exports")] == ["cor0"]
    qio("-f", "raw", "-c", "read -P 0x12 5M 1M", uri)
    d.qmp.ok("block-job-cancel", {"device": "s0"})
    collect_until(d.qmp, "null")
    assert "cor0" not in {n["node-name"] for n in d.qmp.ok("query-named-block-nodes")}
    assert [e["node-name"] for e in d.qmp.ok("query-block-exports")] == ["top"]
    d.qmp.ok("block-export-del", {"id": "exp-top"})
    d.qmp.ok("blockdev-del", {"node-name": "top"})
    d.qmp.ok("blockdev-del", {"node-name": "mid"})
    d.qmp.ok("blockdev-del", {"node-name": "base"})
    check_clean(top)
    r = subprocess.run(["qemu-img", "map", "--output=json", top], capture_output=True, text=True,
                       timeout=60)
    here = [e for e in json.loads(r.stdout) if e["depth"] == 0 and e["data"]]
    assert any(e["start"] <= 5 * MiB and e["start"] + e["length"] >= 6 * MiB for e in here), here


@pytest.mark.parametrize("args,needle", [
    ({"base": "x", "base-node": "base"}, "'base' and 'base-node' cannot be specified"),
    ({"bottom": "mid", "base-node": "base"}, "'bottom' and 'base-node' cannot be specified"),
    ({"base-node": "top"}, "is not a backing image of 'top'"),
    ({"backing-file": "x.qcow2"}, "backing file specified, but streaming the entire chain"),
    ({"device": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
])
def test_argument_errors(daemon, args, needle):
    d = daemon()
    base, mid, top, _ = make_chain(d)
    add_chain(d.qmp, base, mid, top)
    full = dict({"job-id": "s0", "device": "top"}, **args)
    r = d.qmp.cmd_args("block-stream", full)
    assert "error" in r and needle in r["error"]["desc"], r
    assert d.qmp.ok("query-block-jobs") == []


def test_copy_on_read_filter_allocates_the_top(daemon):
    d = daemon()
    base, mid, top, expected = make_chain(d)
    d.qmp.ok("blockdev-add", {"driver": "copy-on-read", "node-name": "cor",
                              "file": {"driver": "qcow2", "node-name": "top",
                                       "file": {"driver": "file", "filename": top}}})
    uri = start_nbd(d, "cor")
    qio("-f", "raw", "-r", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x21 2M 2M", uri)
    d.qmp.ok("block-export-del", {"id": "exp-cor"})
    d.qmp.ok("nbd-server-stop")
    d.qmp.ok("blockdev-del", {"node-name": "cor"})
    r = subprocess.run(["qemu-img", "map", "--output=json", top], capture_output=True,
                       text=True, timeout=60)
    top_layer = [(e["start"], e["length"]) for e in json.loads(r.stdout) if e["depth"] == 0
                 and e["data"]]
    covered = sum(length for start, length in top_layer if start < 4 * MiB)
    assert covered >= 3 * MiB  # the reads were copied into the top
    check_clean(top)
    r = compare(top, expected)
    assert r.returncode == 0, r.stdout + r.stderr


def add_chain_with_faulty_mid(q, base, mid, top, once):
    """base <- mid <- top, mid's reads of guest data failing with EIO (blkdebug read_aio)."""
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "base",
                          "file": {"driver": "file", "filename": base}})
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "mid", "backing": "base",
                          "file": {"driver": "blkdebug",
                                   "inject-error": [{"event": "read_aio", "errno": 5,
                                                     "once": once}],
                                   "image": {"driver": "file", "filename": mid}}})
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "mid",
                          "file": {"driver": "file", "filename": top}})


def test_read_error_reports_and_keeps_the_chain(daemon):
    d = daemon()
    base, mid, top, _ = make_chain(d)
    add_chain_with_faulty_mid(d.qmp, base, mid, top, once=False)
    events = stream_to_end(d.qmp, {"job-id": "s0", "device": "top"})
    assert [e for e in events if isinstance(e, str)] == [
        "created", "running", "aborting", "concluded", "null"]
    errors = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_ERROR"]
    assert errors and errors[0]["operation"] == "read" and errors[0]["action"] == "report"
    completed = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert completed[0]["error"] == "Input/output error"
    nodes = {n["node-name"]: n for n in d.qmp.ok("query-named-block-nodes")}
    assert mid in nodes["top"]["backing_file"]  # (a json: name, since mid is over blkdebug)


def test_read_error_stop_then_resume(daemon):
    d = daemon()
    base, mid, top, expected = make_chain(d)
    add_chain_with_faulty_mid(d.qmp, base, mid, top, once=True)
    r, before = run_cmd(d.qmp, "block-stream", {"job-id": "s0", "device": "top",
                                                "on-error": "stop"})
    assert r == {"return": {}}, r
    events = through(d.qmp, before, "paused")
    errors = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_ERROR"]
    assert errors and errors[0]["action"] == "stop"
    assert d.qmp.ok("query-block-jobs")[0]["io-status"] == "failed"
    d.qmp.ok("block-job-resume", {"device": "s0"})
    events = collect_until(d.qmp, "null")
    completed = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert completed and "error" not in completed[0]
    d.qmp.ok("blockdev-del", {"node-name": "top"})
    d.qmp.ok("blockdev-del", {"node-name": "mid"})
    d.qmp.ok("blockdev-del", {"node-name": "base"})
    check_clean(top)
    r = compare(top, expected)
    assert r.returncode == 0, r.stdout + r.stderr


def test_stream_from_raw_backing_file(daemon):
    """A raw backing file is allocated everywhere (QEMU's block status recursion into its file):
    the stream copies all of it before dropping the backing file."""
    d = daemon()
    base = os.path.join(d.dir, "base.raw")
    with open(base, "wb") as f:
        f.write(bytes(range(256)) * (SIZE // 256))
    top = os.path.join(d.dir, "top.qcow2")
    img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    d.qmp.ok("blockdev-add", {"driver": "qcow2", "node-name": "top",
                              "file": {"driver": "file", "filename": top}})
    events = stream_to_end(d.qmp, {"job-id": "s0", "device": "top"})
    completed = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert completed and "error" not in completed[0]
    d.qmp.ok("blockdev-del", {"node-name": "top"})
    assert "backing-filename" not in info(top)
    check_clean(top)
    r = compare(top, base)
    assert r.returncode == 0, r.stdout + r.stderr
