"""block-commit of an intermediate layer on strata and qemu-storage-daemon (QEMU iotest 040's
non-active cases): the data of top (and the layers down to base) lands in base, the overlay then
names base as its backing file, and the content seen through the overlay does not change. The
base is opened read-only with auto-read-only, so the commit reopens it read-write for the job
and read-only afterwards (dynamic read-only).
"""

import os
import subprocess

import pytest

from test_backup_jobs import compare, img, qio, run_cmd, start_nbd, through
from test_stream import check_clean, info, make_chain

MiB = 1 << 20


def add_chain_ro_base(q, base, mid, top, auto_read_only=True):
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "base", "read-only": True,
                          "auto-read-only": auto_read_only,
                          "file": {"driver": "file", "filename": base, "read-only": True,
                                   "auto-read-only": auto_read_only}})
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "mid", "backing": "base",
                          "read-only": True, "auto-read-only": True,
                          "file": {"driver": "file", "filename": mid, "read-only": True,
                                   "auto-read-only": True}})
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "mid",
                          "file": {"driver": "file", "filename": top}})


def test_commit_in_an_implicit_chain(daemon):
    # Backing files opened from the image headers are read-only with auto-read-only, as in
    # QEMU's bdrv_backing_options.
    d = daemon()
    base, mid, top, expected = make_chain(d)
    d.qmp.ok("blockdev-add", {"driver": "qcow2", "node-name": "top",
                              "file": {"driver": "file", "filename": top}})
    events = commit_to_end(d.qmp, {"job-id": "c0", "device": "top", "top": mid})
    completed = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert completed and "error" not in completed[0], events
    nodes = {n["node-name"]: n for n in d.qmp.ok("query-named-block-nodes")}
    assert nodes["top"]["backing_file"] == base
    backing = [n for n in d.qmp.ok("query-named-block-nodes") if n["file"] == base]
    assert backing and all(n["ro"] for n in backing)
    d.qmp.ok("blockdev-del", {"node-name": "top"})
    assert info(top)["backing-filename"] == base
    check_clean(top)
    check_clean(base)
    r = compare(top, expected)
    assert r.returncode == 0, r.stdout + r.stderr


def commit_to_end(q, args):
    r, before = run_cmd(q, "block-commit", args)
    assert r == {"return": {}}, r
    return through(q, before, "null")


def test_commit_intermediate_into_read_only_base(daemon):
    # Every node of the chain added explicitly, read-only with auto-read-only. QEMU reopens the
    # base read-write but keeps its explicitly read-only file child read-only, so its commit
    # fails ("Block node is read-only"); strata also makes auto-read-only storage children of
    # the base writable for the job. (The implicit chain below behaves the same on both.)
    if daemon.impl.name != "strata":
        pytest.skip("qemu-storage-daemon keeps explicitly read-only children read-only")
    d = daemon()
    base, mid, top, expected = make_chain(d)
    add_chain_ro_base(d.qmp, base, mid, top)
    events = commit_to_end(d.qmp, {"job-id": "c0", "device": "top", "top-node": "mid",
                                   "base-node": "base"})
    assert [e for e in events if isinstance(e, str)] == [
        "created", "running", "waiting", "pending", "concluded", "null"]
    completed = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert completed and completed[0]["type"] == "commit" and "error" not in completed[0]
    nodes = {n["node-name"]: n for n in d.qmp.ok("query-named-block-nodes")}
    assert nodes["top"]["backing_file"] == base
    # Dynamic read-only: the base file node is read-only again after the job.
    files = [n for n in d.qmp.ok("query-named-block-nodes", {"flat": True})
             if n["drv"] == "file" and n["file"] == base]
    assert files and all(n["ro"] for n in files)
    d.qmp.ok("blockdev-del", {"node-name": "top"})
    d.qmp.ok("blockdev-del", {"node-name": "mid"})
    d.qmp.ok("blockdev-del", {"node-name": "base"})
    assert info(top)["backing-filename"] == base
    check_clean(top)
    check_clean(base)
    r = compare(top, expected)
    assert r.returncode == 0, r.stdout + r.stderr
    # base now holds what mid held too.
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", mid, base],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_commit_without_auto_read_only_fails_like_qemu(daemon):
    d = daemon()
    base, mid, top, _ = make_chain(d)
    add_chain_ro_base(d.qmp, base, mid, top, auto_read_only=False)
    r = d.qmp.cmd_args("block-commit", {"job-id": "c0", "device": "top", "top-node": "mid",
                                        "base-node": "base"})
    assert "error" in r and "read-only" in r["error"]["desc"], r
    assert d.qmp.ok("query-block-jobs") == []


@pytest.mark.parametrize("args,needle", [
    ({"top-node": "mid", "top": "x"}, "'top-node' and 'top' are mutually exclusive"),
    ({"top-node": "mid", "base-node": "base", "base": "x"},
     "'base-node' and 'base' are mutually exclusive"),
    ({"top-node": "mid", "base-node": "mid"}, "cannot commit an image into itself"),
    ({"top-node": "mid", "base": "nope"}, "Can't find 'nope' in the backing chain"),
    ({"top": "nope"}, "Top image file nope not found"),
    ({"backing-file": "x"}, "'backing-file' specified, but 'top' is the active layer"),
    ({"device": "nope"}, "Device 'nope' not found"),
])
def test_argument_errors(daemon, args, needle):
    d = daemon()
    base, mid, top, _ = make_chain(d)
    add_chain_ro_base(d.qmp, base, mid, top)
    r = d.qmp.cmd_args("block-commit", dict({"job-id": "c0", "device": "top"}, **args))
    assert "error" in r and needle in r["error"]["desc"], r
    assert d.qmp.ok("query-block-jobs") == []


def test_qcow2_reopened_read_write_takes_writes(daemon):
    # A qcow2 node opened read-only loads what writing needs when a reopen makes it writable.
    d = daemon()
    path = os.path.join(d.dir, "ro.qcow2")
    img("create", "-q", "-f", "qcow2", path, "4M")
    qio("-f", "qcow2", "-c", "write -P 0x51 0 1M", path)
    d.qmp.ok("blockdev-add", {"driver": "file", "node-name": "f", "filename": path,
                              "read-only": True})
    d.qmp.ok("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f",
                              "read-only": True})
    d.qmp.ok("blockdev-reopen", {"options": [
        {"driver": "file", "node-name": "f", "filename": path},
        {"driver": "qcow2", "node-name": "q", "file": "f"}]})
    uri = start_nbd(d, "q")
    qio("-f", "raw", "-c", "write -P 0x52 2M 1M", "-c", "read -P 0x51 0 1M", uri)
    d.qmp.ok("block-export-del", {"id": "exp-q"})
    d.qmp.ok("nbd-server-stop")
    d.qmp.ok("blockdev-del", {"node-name": "q"})
    d.qmp.ok("blockdev-del", {"node-name": "f"})
    check_clean(path)
    qio("-f", "qcow2", "-c", "read -P 0x52 2M 1M", "-c", "read -P 0x51 0 1M", path)


def test_commit_top_filter_sits_above_top_while_the_job_runs(daemon):
    # QEMU's commit_start: a commit_top filter above `top` (named by filter-node-name); the
    # overlay reads through it until the job ends.
    d = daemon()
    q = d.qmp
    base, mid, top, expected = make_chain(d)
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": top}})
    r, before = run_cmd(q, "block-commit", {"job-id": "c0", "device": "top", "top": mid,
                                            "speed": 1024, "filter-node-name": "ctop"})
    assert r == {"return": {}}, r
    nodes = {n["node-name"]: n for n in q.ok("query-named-block-nodes")}
    assert (nodes["ctop"]["drv"], nodes["ctop"]["file"]) == ("commit_top", mid), nodes["ctop"]
    assert nodes["top"]["backing_file"] == mid, nodes["top"]
    q.ok("block-job-set-speed", {"device": "c0", "speed": 0})
    events = through(q, before, "null")
    completed = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert completed and "error" not in completed[0], events
    nodes = {n["node-name"]: n for n in q.ok("query-named-block-nodes")}
    assert "ctop" not in nodes and nodes["top"]["backing_file"] == base
    q.ok("blockdev-del", {"node-name": "top"})
    check_clean(top)
    check_clean(base)
    r = compare(top, expected)
    assert r.returncode == 0, r.stdout + r.stderr
