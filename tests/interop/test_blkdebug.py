"""blkdebug (fault injection filter), verified on QSD 10.0.2.

A blkdebug node reports drv/format "blkdebug", no actual-size, the image's dirty-flag, and as
filename either "blkdebug:CONFIG:IMAGE" (when only image and config define it and the image has a
plain filename) or a json: pseudo-filename whose inject-error/set-state members are flattened
("inject-error.0.event").  take-child-perms / unshare-child-perms change only the image edge.
"""

import os

import pytest

from conftest import make_raw
from helpers import by_name, json_filename, norm

MiB = 1 << 20


def generic(desc):
    return {"error": {"class": "GenericError", "desc": desc}}


def blkdebug_entry(name, filename, size):
    """query-named-block-nodes entry of a blkdebug node, minus the filtered-child view (see
    test_blkdebug_shows_filtered_child_as_backing_image)."""
    return {
        "node-name": name, "drv": "blkdebug", "ro": False, "active": True, "file": filename,
        "encrypted": False, "detect_zeroes": "off",
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {"writeback": True, "direct": False, "no-flush": False},
        "image": {"virtual-size": size, "filename": filename, "format": "blkdebug",
                  "dirty-flag": False},
    }


def without_filtered_child(entry):
    entry = dict(entry)
    entry.pop("backing_file_depth", None)
    entry["image"] = {k: v for k, v in entry["image"].items() if k != "backing-image"}
    return entry


def edges(q):
    graph = q.cmd("x-debug-query-block-graph")["return"]
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    return {(names[e["parent"]], e["name"], names[e["child"]]):
            (sorted(e["perm"]), sorted(e["shared-perm"])) for e in graph["edges"]}


def test_blkdebug_add_and_query(daemon):
    q = daemon().qmp
    w = daemon.workdir
    img = make_raw(os.path.join(w, "a.raw"), MiB)
    conf = os.path.join(w, "rules.conf")
    with open(conf, "w") as f:
        f.write('[inject-error]\nevent = "read_aio"\nerrno = "28"\n')
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img) == {"return": {}}
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b0", image="f0") == {"return": {}}
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b1", config=conf,
                 image="f0") == {"return": {}}
    rules = {"inject-error": [{"event": "read_aio", "sector": 3, "once": True}],
             "set-state": [{"event": "write_aio", "new_state": 2}]}
    assert q.cmd_args("blockdev-add", dict(
        {"driver": "blkdebug", "node-name": "b2",
         "image": {"driver": "file", "filename": img}}, **rules)) == {"return": {}}
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b3", image="f0", align=4096,
                 take_child_perms=["write"], unshare_child_perms=["resize"]) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r3", file="b3") == {"return": {}}

    nodes = by_name(q.cmd("query-named-block-nodes")["return"])
    image = {"driver": "file", "filename": img}
    expected = {
        "b0": blkdebug_entry("b0", "blkdebug::" + img, MiB),
        "b1": blkdebug_entry("b1", "blkdebug:%s:%s" % (conf, img), MiB),
        "b2": blkdebug_entry("b2", json_filename({
            "driver": "blkdebug", "image": image, "inject-error.0.event": "read_aio",
            "inject-error.0.sector": 3, "inject-error.0.once": True,
            "set-state.0.event": "write_aio", "set-state.0.new_state": 2}), MiB),
        "b3": blkdebug_entry("b3", json_filename(
            {"driver": "blkdebug", "image": image, "align": 4096}), MiB),
    }
    for name, entry in expected.items():
        assert norm(without_filtered_child(nodes[name]), w) == norm(entry, w), name
    assert norm(nodes["r3"]["file"], w) == norm(json_filename(
        {"driver": "raw", "file": {"driver": "blkdebug", "image": image, "align": 4096}}), w)


def test_blkdebug_shows_filtered_child_as_backing_image(daemon):
    """QEMU lists a filter's child as its backing image (bdrv_filter_or_cow_bs) and counts it in
    backing_file_depth, without backing_file/backing-filename."""
    q = daemon().qmp
    img = make_raw(os.path.join(daemon.workdir, "a.raw"), MiB)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img) == {"return": {}}
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b0", image="f0") == {"return": {}}
    nodes = by_name(q.cmd("query-named-block-nodes")["return"])
    assert nodes["b0"]["backing_file_depth"] == 1
    assert "backing_file" not in nodes["b0"]
    assert nodes["b0"]["image"]["backing-image"] == nodes["f0"]["image"]
    assert "backing-filename" not in nodes["b0"]["image"]
    flat = by_name(q.cmd("query-named-block-nodes", flat=True)["return"])
    assert flat["b0"]["backing_file_depth"] == 0
    assert "backing-image" not in flat["b0"]["image"]


def test_blkdebug_child_permissions(daemon):
    q = daemon().qmp
    img = make_raw(os.path.join(daemon.workdir, "a.raw"), MiB)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img) == {"return": {}}
    assert q.cmd("blockdev-add", driver="file", node_name="f1", filename=img,
                 locking="off") == {"return": {}}
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b0", image="f0") == {"return": {}}
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b1", image="f1",
                 take_child_perms=["write", "resize"],
                 unshare_child_perms=["write-unchanged", "consistent-read"]) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r1", file="b1") == {"return": {}}
    all_perms = ["consistent-read", "resize", "write", "write-unchanged"]
    assert edges(q) == {
        ("b0", "image", "f0"): ([], all_perms),
        ("b1", "image", "f1"): (["resize", "write"], ["resize", "write"]),
        ("r1", "file", "b1"): ([], all_perms),
    }
    # the extra permissions go away with the node
    assert q.cmd("blockdev-del", node_name="r1") == {"return": {}}
    assert q.cmd("blockdev-del", node_name="b1") == {"return": {}}
    assert edges(q) == {("b0", "image", "f0"): ([], all_perms)}


OPTION_ERRORS = [
    ({"inject-error": [{"event": "bogus"}]}, "Parameter 'event' does not accept value 'bogus'"),
    ({"inject-error": [{}]}, "Parameter 'inject-error[0].event' is missing"),
    ({"inject-error": [{"event": "read_aio", "iotype": "zz"}]},
     "Parameter 'iotype' does not accept value 'zz'"),
    ({"inject-error": [{"event": "read_aio", "state": "x"}]},
     "Invalid parameter type for 'inject-error[0].state', expected: integer"),
    ({"inject-error": [{"event": "read_aio", "foo": 1}]},
     "Parameter 'inject-error[0].foo' is unexpected"),
    ({"inject-error": {"event": "read_aio"}},
     "Invalid parameter type for 'inject-error', expected: array"),
    ({"set-state": [{"event": "read_aio"}]}, "Parameter 'set-state[0].new_state' is missing"),
    ({"take-child-perms": ["bogus"]}, "Parameter 'null' does not accept value 'bogus'"),
    ({"take-child-perms": "write"},
     "Invalid parameter type for 'take-child-perms', expected: array"),
    ({"align": 3}, "Cannot meet constraints with align 3"),
    ({"align": 1 << 31}, "Cannot meet constraints with align 2147483648"),
    ({"align": -1}, "Value '-1' is out of range for parameter 'align'"),
    ({"align": "4096"}, "Invalid parameter type for 'align', expected: integer"),
    ({"max-transfer": 1 << 31}, "Parameter 'max-transfer' expects int32_t"),
    ({"max-discard": -(1 << 31) - 1}, "Parameter 'max-discard' expects int32_t"),
    ({"max-transfer": -1, "align": -1},
     "Value '-1' is out of range for parameter 'max-transfer'"),
    ({"max-discard": -1, "opt-discard": -1},
     "Value '-1' is out of range for parameter 'opt-discard'"),
    ({"align": 4096, "max-transfer": 1000}, "Cannot meet constraints with max-transfer 1000"),
    ({"opt-write-zero": 1024, "max-write-zero": 1536},
     "Cannot meet constraints with max-write-zero 1536"),
    ({"opt-discard": 1024, "max-discard": 1536}, "Cannot meet constraints with max-discard 1536"),
    ({"config": "/nonexistent/x"},
     "Could not read blkdebug config file: No such file or directory"),
    ({"image": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
    ({"image": "nope", "align": -1}, "Value '-1' is out of range for parameter 'align'"),
    ({"image": "nope", "config": "/nonexistent"},
     "Could not read blkdebug config file: No such file or directory"),
    ({"image": "nope", "align": 3}, "Cannot find device='nope' nor node-name='nope'"),
    ({"inject-error": []}, "Block protocol 'blkdebug' doesn't support the option 'inject-error'"),
    ({"take-child-perms": [], "unshare-child-perms": []},
     "Block protocol 'blkdebug' doesn't support the option 'take-child-perms'"),
    ({"inject-error": [], "set-state": []},
     "Block protocol 'blkdebug' doesn't support the option 'set-state'"),
    ({"align": 3, "set-state": []}, "Cannot meet constraints with align 3"),
    ({"image": {"driver": "blkdebug", "image": "f0", "max-transfer": 1 << 31}},
     "Parameter 'max-transfer' expects int32_t"),
]


@pytest.mark.parametrize("options,desc", OPTION_ERRORS, ids=[d for _, d in OPTION_ERRORS])
def test_blkdebug_option_errors(daemon, options, desc):
    q = daemon().qmp
    img = make_raw(os.path.join(daemon.workdir, "a.raw"), MiB)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img) == {"return": {}}
    args = dict({"driver": "blkdebug", "node-name": "b", "image": "f0"}, **options)
    assert q.cmd_args("blockdev-add", args) == generic(desc)
    assert [n["node-name"] for n in q.cmd("query-named-block-nodes")["return"]] == ["f0"]


def test_blkdebug_accepts_odd_rule_values(daemon):
    """errno 0 / negative, negative sectors and states pass (QEMU checks none of them)."""
    q = daemon().qmp
    img = make_raw(os.path.join(daemon.workdir, "a.raw"), MiB)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img) == {"return": {}}
    assert q.cmd_args("blockdev-add", {
        "driver": "blkdebug", "node-name": "b", "image": "f0", "align": 0,
        "inject-error": [{"event": "read_aio", "errno": -5}, {"event": "none", "errno": 0},
                         {"event": "write_aio", "sector": -7}],
        "set-state": [{"event": "read_aio", "new_state": -1, "state": -3}],
        "unshare-child-perms": ["write", "write"]}) == {"return": {}}


CONFIG_ERRORS = [
    ('[foo]\nx = "1"\n', "There is no option group 'foo'"),
    ("garbage here\n", "no group defined"),
    ("[inject-error]\n   \n", "parse error"),
    ('[inject-error]\nevent="read_aio"\n', "Invalid parameter 'event=\"read_aio\"'"),
    ('[inject-error]\nerrno = "5"\n', "Missing event name for rule"),
    ('[inject-error]\nevent = "bogus"\n', "invalid parameter value: bogus"),
    ('[inject-error]\nevent = "read_aio"\niotype = "zz"\n', "invalid parameter value: zz"),
    ('[set-state]\nevent = "read_aio"\nnew_state = "x"\n',
     "Parameter 'new_state' expects a number"),
    ('[inject-error]\nevent = "read_aio"\nonce = "maybe"\n',
     "Parameter 'once' expects 'on' or 'off'"),
    ('[inject-error "a"]\nevent = "read_aio"\n[inject-error "a"]\nevent = "read_aio"\n',
     "Duplicate ID 'a' for inject-error"),
    ('[inject-error "1a"]\nevent = "read_aio"\n', "Parameter 'id' expects an identifier"),
    ('[inject-error]\nevent = "read_aio"\nerrno = "99999999999999999999"\n',
     "Value '99999999999999999999' is too large for parameter 'errno'"),
]


@pytest.mark.parametrize("text,desc", CONFIG_ERRORS, ids=[d for _, d in CONFIG_ERRORS])
def test_blkdebug_config_file_errors(daemon, text, desc):
    q = daemon().qmp
    w = daemon.workdir
    img = make_raw(os.path.join(w, "a.raw"), MiB)
    conf = os.path.join(w, "rules.conf")
    with open(conf, "w") as f:
        f.write(text)
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b", config=conf,
                 image={"driver": "file", "filename": img}) == generic(desc)
    # a directory opens but cannot be read
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b", config=w,
                 image={"driver": "file", "filename": img}) == \
        generic("Cannot read config file: Is a directory")
    # QMP rules are numbered inject-error.N: a config section may not take such an id
    with open(conf, "w") as f:
        f.write('[inject-error "inject-error.0"]\nevent = "read_aio"\n')
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b", config=conf,
                 inject_error=[{"event": "read_aio"}],
                 image={"driver": "file", "filename": img}) == \
        generic("Duplicate ID 'inject-error.0' for inject-error")
    assert q.cmd("query-named-block-nodes")["return"] == []
