"""Block graph QMP surface: blockdev-add/del/reopen/set-active, queries, objects.

Expectations verified on qemu-storage-daemon 10.0.2.
"""

import os

import pytest

from conftest import make_raw
from helpers import (by_name, file_node, json_filename, norm, null_node, raw_node, actual_size)

MiB = 1 << 20


def generic(desc):
    return {"error": {"class": "GenericError", "desc": desc}}


def image(workdir, name="a.raw", size=MiB, data=True):
    path = make_raw(os.path.join(workdir, name), size)
    if data:  # one allocated block so actual-size is non-zero
        with open(path, "r+b") as f:
            f.write(b"\x55" * 4096)
    return path


def nodes(q, **args):
    r = q.cmd("query-named-block-nodes", **args)
    assert "return" in r, r
    return r["return"]


def names(q):
    return [n["node-name"] for n in nodes(q)]


REQUIRED_COMMANDS = [
    "qmp_capabilities", "query-version", "query-commands", "quit", "blockdev-add",
    "blockdev-del", "blockdev-reopen", "blockdev-set-active", "query-named-block-nodes",
    "x-debug-query-block-graph", "object-add", "object-del",
]


def test_query_commands(daemon):
    q = daemon().qmp
    r = q.cmd("query-commands")
    cmds = r["return"]
    assert all(set(c) == {"name"} for c in cmds), cmds[:3]
    have = [c["name"] for c in cmds]
    assert len(have) == len(set(have))
    missing = [c for c in REQUIRED_COMMANDS if c not in have]
    assert not missing, missing


def test_file_and_raw_window(daemon):
    d = daemon()
    q = d.qmp
    path = image(daemon.workdir)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0",
                 offset=4096, size=65536) == {"return": {}}
    pseudo = json_filename({"driver": "raw", "offset": 4096, "size": 65536,
                            "file": {"driver": "file", "filename": path}})
    act = actual_size(path)
    expected = [
        raw_node("r0", pseudo, 65536, act),
        file_node("f0", path),
    ]
    for flat in (None, False, True):
        got = nodes(q) if flat is None else nodes(q, flat=flat)
        assert norm(got) == norm(expected), flat  # newest first
    # window larger than the file
    assert q.cmd("blockdev-add", driver="raw", node_name="r1", file="f0", offset=1000,
                 size=MiB) == generic(
        "The sum of offset (1000) and size (1048576) has to be smaller or equal to the "
        " actual size of the containing file (1048576)")
    assert q.cmd("blockdev-add", driver="raw", node_name="r1", file="f0",
                 offset=4 * MiB) == generic(
        "Offset (4194304) cannot be greater than size of the containing file (1048576)")
    assert q.cmd("blockdev-add", driver="raw", node_name="r1", file="f0", size=1000) == \
        generic("Specified size is not multiple of 512")
    assert q.cmd("blockdev-add", driver="raw", node_name="r1", file="f0", offset=-1) == \
        generic("Value '-1' is out of range for parameter 'offset'")
    assert names(q) == ["r0", "f0"]
    # offset only: virtual size is the rest of the file; offset == size is allowed (0 bytes)
    assert q.cmd("blockdev-add", driver="raw", node_name="r2", file="f0", offset=512) == \
        {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r3", file="f0", offset=MiB) == \
        {"return": {}}
    got = by_name(nodes(q))
    assert got["r2"]["image"]["virtual-size"] == MiB - 512
    assert norm(got["r2"]["file"]) == norm(json_filename(
        {"driver": "raw", "offset": 512, "file": {"driver": "file", "filename": path}}))
    assert got["r3"]["image"]["virtual-size"] == 0


def test_raw_over_file_plain(daemon):
    q = daemon().qmp
    path = image(daemon.workdir)
    assert q.cmd("blockdev-add", driver="raw", node_name="r0",
                 file={"driver": "file", "filename": path}) == {"return": {}}
    got = nodes(q)
    # a plain raw node takes its child's filename; the inline child gets a generated name
    assert norm(got) == norm([
        raw_node("r0", path, MiB, actual_size(path)),
        file_node("#block000", path),
    ])


def test_null_co_graphs(daemon):
    q = daemon().qmp
    assert q.cmd("blockdev-add", driver="null-co", node_name="n0") == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r1",
                 file={"driver": "null-co", "size": 4096}) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r2", file="n0",
                 read_only=True) == {"return": {}}
    assert q.cmd("blockdev-add", driver="null-co", node_name="n3", size=MiB,
                 read_zeroes=True, read_only=True, cache={"no-flush": True}) == {"return": {}}
    n4 = {"driver": "null-co", "size": 4096}
    expected = [
        null_node("n3", json_filename({"driver": "null-co", "size": MiB, "read-zeroes": True}),
                  MiB, ro=True, no_flush=True),
        raw_node("r2", "null-co://", 1 << 30, 0, dirty_flag=False, ro=True),
        raw_node("r1", json_filename({"driver": "raw", "file": n4}), 4096, 0, dirty_flag=False),
        null_node("#block", json_filename(n4), 4096),
        null_node("n0"),
    ]
    assert norm(nodes(q)) == norm(expected)
    assert norm(nodes(q, flat=True)) == norm(expected)


def test_node_name_errors(daemon):
    q = daemon().qmp
    path = image(daemon.workdir)
    assert q.cmd("blockdev-add", driver="null-co", node_name="n0") == {"return": {}}
    assert q.cmd("blockdev-add", driver="null-co", node_name="n0") == \
        generic("Duplicate nodes with node-name='n0'")
    assert q.cmd("blockdev-add", driver="raw", node_name="r0",
                 file={"driver": "file", "filename": path, "node-name": "n0"}) == \
        generic("Duplicate nodes with node-name='n0'")
    assert q.cmd("blockdev-add", driver="raw", node_name="r0",
                 file={"driver": "file", "filename": path, "node-name": "r0"}) == \
        generic("Duplicate nodes with node-name='r0'")
    assert q.cmd("blockdev-add", driver="null-co") == \
        generic("'node-name' must be specified for the root node")
    for bad in ("1bad", "n 9", "", "#block1"):
        assert q.cmd("blockdev-add", driver="null-co", node_name=bad) == \
            generic("Invalid node-name: '%s'" % bad), bad
    assert q.cmd("blockdev-add", driver="null-co", node_name="x" * 32) == \
        generic("Node name too long")
    assert q.cmd("blockdev-add", driver="null-co", node_name="x" * 31) == {"return": {}}
    assert q.cmd("blockdev-add", driver="null-co", node_name="n-9.x_y") == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r1", file="nosuch") == \
        generic("Cannot find device='nosuch' nor node-name='nosuch'")
    assert sorted(names(q)) == sorted(["n0", "x" * 31, "n-9.x_y"])


def test_file_open_errors(daemon):
    q = daemon().qmp
    w = daemon.workdir
    assert q.cmd("blockdev-add", driver="file", node_name="f0",
                 filename=w + "/missing.raw") == \
        generic("Could not open '%s/missing.raw': No such file or directory" % w)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=w) == \
        generic("Could not open '%s': Is a directory" % w)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename="") == \
        generic("The 'file' block driver requires a file name")
    assert q.cmd("blockdev-add", driver="file", node_name="f0") == \
        generic("Parameter 'filename' is missing")
    path = image(w)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path,
                 locking="bogus") == generic("Parameter 'locking' does not accept value 'bogus'")
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path,
                 force_share=True) == \
        generic("force-share=on can only be used with read-only images")
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path,
                 detect_zeroes="unmap") == generic(
        "setting detect-zeroes to unmap is not allowed without setting discard operation "
        "to unmap")
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path,
                 aio="native") == generic(
        "aio=native was specified, but it requires cache.direct=on, which was not specified.")
    assert names(q) == []


def test_node_options_reported(daemon):
    q = daemon().qmp
    path = image(daemon.workdir)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path,
                 cache={"direct": True, "no-flush": True}, detect_zeroes="unmap",
                 discard="unmap") == {"return": {}}
    assert q.cmd("blockdev-add", driver="file", node_name="f1", filename=path,
                 detect_zeroes="on", read_only=True) == {"return": {}}
    assert q.cmd("blockdev-add", driver="file", node_name="f2", filename=path,
                 read_only=True, force_share=True, locking="off") == {"return": {}}
    assert norm(nodes(q)) == norm([
        file_node("f2", path, ro=True),
        file_node("f1", path, ro=True, detect_zeroes="on"),
        file_node("f0", path, direct=True, no_flush=True, detect_zeroes="unmap"),
    ])


def test_blockdev_del(daemon):
    q = daemon().qmp
    path = image(daemon.workdir)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0") == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r1",
                 file={"driver": "file", "filename": path, "node-name": "f1"}) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r2",
                 file={"driver": "null-co"}) == {"return": {}}
    gen = [n for n in names(q) if n.startswith("#block")]
    assert len(gen) == 1
    assert q.cmd("blockdev-del", node_name="f0") == generic("Block device f0 is in use")
    assert q.cmd("blockdev-del", node_name="f1") == \
        generic("Node f1 is not owned by the monitor")
    assert q.cmd("blockdev-del", node_name=gen[0]) == \
        generic("Node %s is not owned by the monitor" % gen[0])
    assert q.cmd("blockdev-del", node_name="nonode", _id=14) == dict(
        generic("Failed to find node with node-name='nonode'"), id=14)
    # deleting the parent frees the child; inline children vanish with their parent
    assert q.cmd("blockdev-del", node_name="r0") == {"return": {}}
    assert q.cmd("blockdev-del", node_name="r1") == {"return": {}}
    assert q.cmd("blockdev-del", node_name="r2") == {"return": {}}
    assert names(q) == ["f0"]
    assert q.cmd("blockdev-del", node_name="f0") == {"return": {}}
    assert q.cmd("blockdev-del", node_name="f0") == \
        generic("Failed to find node with node-name='f0'")
    assert names(q) == []
    # a freed name can be reused
    assert q.cmd("blockdev-add", driver="null-co", node_name="f0") == {"return": {}}


def test_two_parents_share_a_child(daemon):
    q = daemon().qmp
    path = image(daemon.workdir)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0") == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r1", file="f0") == {"return": {}}
    # the same file opened twice with no user holds no locks -> allowed
    assert q.cmd("blockdev-add", driver="file", node_name="f1", filename=path) == {"return": {}}
    assert names(q) == ["f1", "r1", "r0", "f0"]


def graph(q):
    r = q.cmd("x-debug-query-block-graph")
    g = r["return"]
    assert set(g) == {"nodes", "edges"}
    ids = {}
    for n in g["nodes"]:
        assert set(n) == {"id", "type", "name"}, n
        assert type(n["id"]) is int and n["type"] == "block-driver"
        assert n["id"] not in ids
        ids[n["id"]] = norm(n["name"])
    edges = []
    for e in g["edges"]:
        assert set(e) == {"parent", "child", "name", "perm", "shared-perm"}, e
        edges.append((ids[e["parent"]], ids[e["child"]], e["name"], tuple(e["perm"]),
                      tuple(e["shared-perm"])))
    return [ids[n["id"]] for n in g["nodes"]], sorted(edges)


ALL_SHARED = ("resize", "write-unchanged", "write", "consistent-read")


def test_block_graph(daemon):
    q = daemon().qmp
    path = image(daemon.workdir)
    assert graph(q) == ([], [])
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0", offset=4096,
                 size=65536) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r1",
                 file={"driver": "null-co"}) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r2",
                 file={"driver": "raw", "file": {"driver": "null-co"}}) == {"return": {}}
    node_list, edges = graph(q)
    # nodes newest first
    assert node_list == ["r2", "#block", "#block", "r1", "#block", "r0", "f0"]
    # without users nobody takes permissions; a raw window does not share 'resize'
    assert edges == sorted([
        ("r0", "f0", "file", (), ("write-unchanged", "write", "consistent-read")),
        ("r1", "#block", "file", (), ALL_SHARED),
        ("r2", "#block", "file", (), ALL_SHARED),
        ("#block", "#block", "file", (), ALL_SHARED),
    ])


def test_blockdev_reopen_file(daemon):
    q = daemon().qmp
    path = image(daemon.workdir)
    other = image(daemon.workdir, "b.raw")
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path) == {"return": {}}

    def reopen(*opts):
        return q.cmd("blockdev-reopen", options=list(opts))

    def ro():
        return {n["node-name"]: n["ro"] for n in nodes(q)}

    f0 = {"driver": "file", "node-name": "f0", "filename": path}
    assert reopen(dict(f0, **{"read-only": True})) == {"return": {}}
    assert ro() == {"f0": True}
    # every omitted option reverts to its default: read-only=false
    assert reopen(f0) == {"return": {}}
    assert ro() == {"f0": False}
    assert reopen({"driver": "file", "node-name": "f0"}) == \
        generic("Parameter 'options[0].filename' is missing")
    assert reopen(dict(f0, filename=other)) == generic("Cannot change the option 'filename'")
    assert reopen(dict(f0, driver="raw")) == generic("Parameter 'options[0].file' is missing")
    assert reopen(dict(f0, **{"node-name": "nope"})) == \
        generic("Failed to find node with node-name='nope'")
    assert reopen({"driver": "file", "filename": path}) == generic("node-name not specified")
    assert reopen(dict(f0, bogus=1)) == generic("Parameter 'options[0].bogus' is unexpected")
    assert ro() == {"f0": False}


def test_blockdev_reopen_raw_over_file(daemon):
    q = daemon().qmp
    path = image(daemon.workdir)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0") == {"return": {}}

    def reopen(*opts):
        return q.cmd("blockdev-reopen", options=list(opts))

    def ro():
        return {n["node-name"]: n["ro"] for n in nodes(q)}

    f0 = {"driver": "file", "node-name": "f0", "filename": path}
    r0 = {"driver": "raw", "node-name": "r0", "file": "f0"}
    # omitting file is an error, it is not "keep"
    assert reopen({"driver": "raw", "node-name": "r0"}) == \
        generic("Parameter 'options[0].file' is missing")
    assert reopen(dict(r0, **{"read-only": True})) == {"return": {}}
    assert ro() == {"r0": True, "f0": False}
    assert reopen(dict(f0, **{"read-only": True})) == {"return": {}}
    assert ro() == {"r0": True, "f0": True}
    # a parent with no users may be rw over a read-only child
    assert reopen(r0) == {"return": {}}
    assert ro() == {"r0": False, "f0": True}
    # both in one atomic call
    assert reopen(r0, f0) == {"return": {}}
    assert ro() == {"r0": False, "f0": False}
    assert reopen(dict(r0, **{"read-only": True}), dict(f0, **{"read-only": True})) == \
        {"return": {}}
    assert ro() == {"r0": True, "f0": True}
    # atomic: a failing entry leaves the others untouched
    assert reopen(r0, dict(f0, filename=path + ".x")) == \
        generic("Cannot change the option 'filename'")
    assert ro() == {"r0": True, "f0": True}
    # raw options can change on reopen
    assert reopen(dict(r0, offset=512)) == {"return": {}}
    got = by_name(nodes(q))
    assert got["r0"]["ro"] is False
    assert got["r0"]["image"]["virtual-size"] == MiB - 512


def test_set_active_basic(daemon):
    q = daemon().qmp
    path = image(daemon.workdir)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0") == {"return": {}}
    assert q.cmd("blockdev-add", driver="null-co", node_name="n0", active=False) == \
        {"return": {}}

    def active():
        return {n["node-name"]: n["active"] for n in nodes(q)}

    assert active() == {"n0": False, "r0": True, "f0": True}
    assert q.cmd("blockdev-set-active", node_name="f0", active=False) == \
        generic("Node has active parent node")
    assert q.cmd("blockdev-set-active", node_name="r0", active=False) == {"return": {}}
    assert active() == {"n0": False, "r0": False, "f0": False}
    assert q.cmd("blockdev-set-active", node_name="r0", active=False) == {"return": {}}
    assert q.cmd("blockdev-set-active", active=True) == {"return": {}}
    assert active() == {"n0": True, "r0": True, "f0": True}
    assert q.cmd("blockdev-set-active", node_name="nosuch", active=False) == \
        generic("Failed to find node with node-name='nosuch'")


def test_iothread_objects(daemon):
    q = daemon().qmp
    assert q.cmd("object-add", qom_type="iothread", id="io0") == {"return": {}}
    assert q.cmd("object-add", qom_type="iothread", id="io0") == generic(
        "attempt to add duplicate property 'io0' to object (type 'container')")
    assert q.cmd("object-add", qom_type="iothread", id="io1", poll_max_ns=0) == {"return": {}}
    assert q.cmd("object-add", qom_type="iothread", id="io2", bogus=0) == \
        generic("Parameter 'bogus' is unexpected")
    assert q.cmd("object-add", qom_type="nosuch", id="x") == \
        generic("Parameter 'qom-type' does not accept value 'nosuch'")
    assert q.cmd("object-add", id="x") == generic("Parameter 'qom-type' is missing")
    assert q.cmd("object-del", id="io0") == {"return": {}}
    assert q.cmd("object-del", id="io0") == generic("object 'io0' not found")
    assert q.cmd("object-del", id="io1") == {"return": {}}
    # the id is free again
    assert q.cmd("object-add", qom_type="iothread", id="io0") == {"return": {}}


def test_command_line_blockdev_and_object(daemon):
    w = daemon.workdir
    path = image(w)
    d = daemon(
        "--blockdev", "driver=file,node-name=f0,filename=%s" % path,
        "--blockdev", "driver=raw,node-name=r0,file=f0,offset=4096,size=65536",
        "--blockdev", '{"driver": "null-co", "node-name": "n0", "read-only": true}',
        "--blockdev", "raw,node-name=r1,file.driver=null-co,file.size=4096",
        "--object", "iothread,id=io0")
    q = d.qmp
    got = nodes(q)
    assert [norm(n["node-name"]) for n in got] == ["r1", "#block", "n0", "r0", "f0"]
    g = by_name(got)
    assert g["n0"]["ro"] is True
    assert g["r0"]["image"]["virtual-size"] == 65536
    assert g["r1"]["image"]["virtual-size"] == 4096
    # --object created the iothread: adding it again collides
    assert q.cmd("object-add", qom_type="iothread", id="io0") == generic(
        "attempt to add duplicate property 'io0' to object (type 'container')")
    # command-line nodes are monitor-owned
    assert q.cmd("blockdev-del", node_name="r0") == {"return": {}}
    assert q.cmd("blockdev-del", node_name="f0") == {"return": {}}


def test_command_line_blockdev_error_exits(daemon):
    w = daemon.workdir
    d = daemon("--blockdev", "driver=file,node-name=f0,filename=%s/missing.raw" % w,
               connect=False)
    rc = d.wait_exit()
    assert rc == 1
    err = d.stderr()
    assert ("--blockdev driver=file,node-name=f0,filename=%s/missing.raw: Could not open "
            "'%s/missing.raw': No such file or directory" % (w, w)) in err, err
