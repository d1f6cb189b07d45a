"""Run state and memory backends (the qemu-system side of the migration issue): query-status,
stop and cont with their STOP/RESUME events, cont activating inactive block nodes, and
memory-backend-ram/-memfd/-file objects with query-memdev. qemu-storage-daemon has none of these
commands (the tests skip there); the expectations are qemu-system-x86_64 10.0.2's, observed with
`-machine none`.
"""

import mmap
import os

import pytest

from test_backup_jobs import add_qcow2, make_source

pytestmark = pytest.mark.needs("query-status", "stop", "cont", "query-memdev")


def events_now(q):
    q.ok("query-version")  # drains what the daemon sent before
    out = [(e["event"], e.get("data")) for e in q.events if not e.get("_seen")]
    for e in q.events:
        e["_seen"] = True
    return out


def test_stop_and_cont_change_the_status_with_events(daemon):
    q = daemon().qmp
    assert q.ok("query-status") == {"status": "running", "running": True}
    q.ok("stop")
    assert events_now(q) == [("STOP", None)]
    assert q.ok("query-status") == {"status": "paused", "running": False}
    q.ok("stop")
    assert events_now(q) == []
    q.ok("cont")
    assert events_now(q) == [("RESUME", None)]
    assert q.ok("query-status") == {"status": "running", "running": True}
    q.ok("cont")
    assert events_now(q) == []


def test_cont_activates_inactive_nodes(daemon):
    d = daemon()
    q = d.qmp
    add_qcow2(q, "disk", make_source(d))
    q.ok("stop")
    q.ok("blockdev-set-active", {"node-name": "disk", "active": False})
    assert not {n["node-name"]: n for n in q.ok("query-named-block-nodes")}["disk"]["active"]
    q.ok("cont")
    assert {n["node-name"]: n for n in q.ok("query-named-block-nodes")}["disk"]["active"]


def test_memory_backends_and_query_memdev(daemon):
    d = daemon()
    q = d.qmp
    path = os.path.join(d.dir, "guest-ram")
    q.ok("object-add", {"qom-type": "memory-backend-ram", "id": "ram0", "size": 1 << 20})
    q.ok("object-add", {"qom-type": "memory-backend-memfd", "id": "m1", "size": 1 << 20,
                        "share": True})
    q.ok("object-add", {"qom-type": "memory-backend-file", "id": "f1", "size": 1 << 20,
                        "mem-path": path, "share": True, "prealloc": True})
    memdevs = {m["id"]: m for m in q.ok("query-memdev")}
    assert memdevs["f1"] == {"id": "f1", "size": 1 << 20, "merge": True, "dump": True,
                             "prealloc": True, "share": True, "reserve": True,
                             "host-nodes": [], "policy": "default"}
    assert sorted(memdevs) == ["f1", "m1", "ram0"]
    # A shared file backend is the file: another process sees what is written to either side.
    assert os.path.getsize(path) == 1 << 20
    with open(path, "r+b") as f:
        with mmap.mmap(f.fileno(), 1 << 20) as m:
            m[0:4] = b"ABCD"
    q.ok("object-del", {"id": "ram0"})
    assert sorted(m["id"] for m in q.ok("query-memdev")) == ["f1", "m1"]


@pytest.mark.parametrize("args,desc", [
    ({"qom-type": "memory-backend-file", "size": 1 << 20}, "Parameter 'mem-path' is missing"),
    ({"qom-type": "memory-backend-ram"}, "Parameter 'size' is missing"),
    ({"qom-type": "memory-backend-ram", "size": 0},
     "property 'size' of memory-backend-ram doesn't take value '0'"),
])
def test_memory_backend_errors(daemon, args, desc):
    q = daemon().qmp
    r = q.cmd_args("object-add", dict({"id": "x"}, **args))
    assert r == {"error": {"class": "GenericError", "desc": desc}}, r
    assert q.ok("query-memdev") == []
