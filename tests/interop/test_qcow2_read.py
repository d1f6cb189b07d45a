"""Read-only qcow2 on strata and qemu-storage-daemon side by side.

Each scenario starts both daemons in the same test, adds the same read-only qcow2 graph and
compares what they report: query-named-block-nodes (normalised), x-debug-query-block-graph
edges and permissions, and the lock bytes each process holds on the image.

strata's refusal to open qcow2 images it cannot write (extended L2, external data file,
persistent bitmaps) read-write is tested separately and is deliberately NOT a
cross-implementation comparison: QSD opens those images read-write.
"""

import subprocess

import pytest

from conftest import Daemon, _resolve_impl, need_tool
from helpers import lock_bytes, norm

MiB = 1 << 20


@pytest.fixture
def pair(workdir):
    """(strata, qsd) daemons, both negotiated."""
    started = []

    def start():
        for index, name in enumerate(("strata", "qsd")):
            d = Daemon(_resolve_impl(name), workdir, index, [])
            started.append(d)
            d.connect()
            d.negotiate()
        return started

    start.workdir = workdir
    yield start
    problems = []
    for d in reversed(started):
        problems.extend(d.stop())
    if problems:
        pytest.fail("daemon teardown:\n" + "\n".join(problems), pytrace=False)


def sh(workdir, script):
    need_tool("qemu-img")
    need_tool("qemu-io")
    r = subprocess.run(["bash", "-ec", script], cwd=workdir, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def qcow2_args(node, path, **extra):
    args = {"driver": "qcow2", "node-name": node, "read-only": True,
            "file": {"driver": "file", "filename": path}}
    args.update(extra)
    return args


def graph_view(q):
    """x-debug-query-block-graph as {(parent name, child name, edge name): (perm, shared)}."""
    g = q.cmd("x-debug-query-block-graph")["return"]
    names = {n["id"]: norm(n["name"]) for n in g["nodes"]}
    return sorted((names[e["parent"]], names[e["child"]], e["name"], sorted(e["perm"]),
                   sorted(e["shared-perm"])) for e in g["edges"])


def named_nodes(q, workdir):
    nodes = q.cmd("query-named-block-nodes")["return"]
    out = {}
    for n in nodes:
        n = norm(n, workdir)
        if n["drv"] == "file":
            # KNOWN DIFFERENCE of the file driver (not qcow2): QEMU rounds a file's length up to
            # 512 bytes (197120 for a 196616-byte image), strata reports the exact length.
            n["image"]["virtual-size"] = (n["image"]["virtual-size"] + 511) // 512 * 512
        out[n["node-name"]] = n
    return out


IMAGES = {
    "v3": "qemu-img create -q -f qcow2 img.qcow2 4M; qemu-io -c 'write -P 1 0 64k' img.qcow2",
    "v2": "qemu-img create -q -f qcow2 -o compat=0.10 img.qcow2 4M",
    "features": "qemu-img create -q -f qcow2 -o extended_l2=on,refcount_bits=1,"
                "lazy_refcounts=on,compression_type=zstd,cluster_size=128k img.qcow2 4M",
    "data_file": "qemu-img create -q -f qcow2 -o data_file=$PWD/img.data img.qcow2 4M",
    "dirty": "qemu-img create -q -f qcow2 -o lazy_refcounts=on img.qcow2 4M; "
             "qemu-io -c 'write -P 2 0 4k' -c 'sigraise 9' img.qcow2 >/dev/null 2>&1 || true",
}


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_read_only_qcow2_same_as_qsd(pair, kind):
    workdir = pair.workdir
    sh(workdir, IMAGES[kind])
    path = workdir + "/img.qcow2"
    strata, qsd = pair()
    results = []
    for d in (strata, qsd):
        q = d.qmp
        assert q.cmd_args("blockdev-add", qcow2_args("disk", path)) == {"return": {}}, d.impl
        results.append((named_nodes(q, workdir), graph_view(q), lock_bytes(d.pid, path)[0]))
    (s_nodes, s_graph, s_locks), (q_nodes, q_graph, q_locks) = results
    assert s_nodes.keys() == q_nodes.keys()
    for name in q_nodes:
        assert s_nodes[name] == q_nodes[name], name
    assert s_graph == q_graph
    assert s_locks == q_locks == {100, 201, 203}
    for d in (strata, qsd):
        assert d.qmp.cmd("blockdev-del", node_name="disk") == {"return": {}}


def test_backing_chain_same_as_qsd(pair):
    workdir = pair.workdir
    sh(workdir, "qemu-img create -q -f raw base.raw 1M\n"
                "qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 2M\n"
                "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 img.qcow2 4M\n")
    path = workdir + "/img.qcow2"
    strata, qsd = pair()
    views = []
    for d in (strata, qsd):
        q = d.qmp
        assert q.cmd_args("blockdev-add", qcow2_args("top", path)) == {"return": {}}
        top = named_nodes(q, workdir)["top"]
        views.append((top["backing_file_depth"], top["image"].get("backing-filename"),
                      top["image"]["backing-image"]["format"],
                      top["image"]["backing-image"]["backing-image"]["format"], graph_view(q)))
    assert views[0] == views[1]


def test_backing_null_same_as_qsd(pair):
    workdir = pair.workdir
    sh(workdir, "qemu-img create -q -f raw base.raw 1M\n"
                "qemu-img create -q -f qcow2 -b base.raw -F raw img.qcow2 1M\n")
    path = workdir + "/img.qcow2"
    strata, qsd = pair()
    results = []
    for d in (strata, qsd):
        q = d.qmp
        assert q.cmd_args("blockdev-add", qcow2_args("disk", path, backing=None)) == \
            {"return": {}}
        results.append((named_nodes(q, workdir)["disk"], graph_view(q)))
    assert results[0] == results[1]


def test_open_errors_same_as_qsd(pair):
    """Malformed images fail with the same error on both."""
    workdir = pair.workdir
    sh(workdir, "qemu-img create -q -f qcow2 img.qcow2 1M\n"
                "printf '\\xff\\xff\\xff\\xff' | dd of=img.qcow2 bs=1 seek=36 conv=notrunc "
                "status=none\n")
    path = workdir + "/img.qcow2"
    strata, qsd = pair()
    replies = [d.qmp.cmd_args("blockdev-add", qcow2_args("disk", path)) for d in (strata, qsd)]
    assert replies[0] == replies[1] == {
        "error": {"class": "GenericError", "desc": "Active L1 table too large"}}


def test_strata_opens_read_write_qcow2(pair):
    """strata only (no comparison): plain images and images with extended L2 entries open
    read-write, with or without auto-read-only, as in QSD."""
    workdir = pair.workdir
    sh(workdir, "qemu-img create -q -f qcow2 img.qcow2 1M && "
                "qemu-img create -q -f qcow2 -o extended_l2=on ext.qcow2 1M")
    strata, _ = pair()
    args = qcow2_args("plain", workdir + "/img.qcow2")
    args["read-only"] = False
    assert strata.qmp.cmd_args("blockdev-add", args) == {"return": {}}
    for name, extra in (("disk", {}), ("disk2", {"auto-read-only": True})):
        args = qcow2_args(name, workdir + "/ext.qcow2", **extra)
        args["read-only"] = False
        assert strata.qmp.cmd_args("blockdev-add", args) == {"return": {}}
        assert strata.qmp.cmd_args("blockdev-del", {"node-name": name}) == {"return": {}}
