"""Node activation (blockdev-add active=false, blockdev-set-active), QSD 10.0.2 semantics.

Activating a node activates its children first; inactivating a node also
inactivates children no longer used by an active parent; a child with an active
parent cannot be inactivated; inactivating twice is harmless.
"""

import os

import pytest

from conftest import make_raw
from helpers import delete_export_after_clients_left

MiB = 1 << 20


def generic(desc):
    return {"error": {"class": "GenericError", "desc": desc}}


def active(q):
    return {n["node-name"]: n["active"] for n in q.cmd("query-named-block-nodes")["return"]}


@pytest.fixture
def img(workdir):
    return make_raw(os.path.join(workdir, "a.raw"), MiB)


def test_add_inactive_and_parent_rules(daemon, img):
    q = daemon().qmp
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img, active=False) == \
        {"return": {}}
    assert active(q) == {"f0": False}
    # an active parent cannot get an inactive file child
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0") == \
        generic("Inactive 'f0' can't be a file child of active 'r0'")
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0", active=False) == \
        {"return": {}}
    assert active(q) == {"r0": False, "f0": False}
    # activating the parent activates the child first
    assert q.cmd("blockdev-set-active", node_name="r0", active=True) == {"return": {}}
    assert active(q) == {"r0": True, "f0": True}
    assert q.cmd("blockdev-set-active", node_name="f0", active=False) == \
        generic("Node has active parent node")
    assert active(q) == {"r0": True, "f0": True}
    # inactivating the parent inactivates the now unused child
    assert q.cmd("blockdev-set-active", node_name="r0", active=False) == {"return": {}}
    assert active(q) == {"r0": False, "f0": False}
    # twice is harmless
    assert q.cmd("blockdev-set-active", node_name="r0", active=False) == {"return": {}}
    assert q.cmd("blockdev-set-active", node_name="f0", active=False) == {"return": {}}
    assert active(q) == {"r0": False, "f0": False}
    # a child can be activated below an inactive parent
    assert q.cmd("blockdev-set-active", node_name="f0", active=True) == {"return": {}}
    assert active(q) == {"r0": False, "f0": True}
    assert q.cmd("blockdev-set-active", node_name="r0", active=False) == {"return": {}}
    assert active(q) == {"r0": False, "f0": True}


def test_inactive_child_keeps_parent_inactive(daemon, img):
    q = daemon().qmp
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0") == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r1", file="f0") == {"return": {}}
    # f0 stays active while r1 (active) uses it
    assert q.cmd("blockdev-set-active", node_name="r0", active=False) == {"return": {}}
    assert active(q) == {"r1": True, "r0": False, "f0": True}
    assert q.cmd("blockdev-set-active", node_name="f0", active=False) == \
        generic("Node has active parent node")
    assert q.cmd("blockdev-set-active", node_name="r1", active=False) == {"return": {}}
    assert active(q) == {"r1": False, "r0": False, "f0": False}
    # a new active parent over the inactive child is refused; an inactive one is fine
    assert q.cmd("blockdev-add", driver="raw", node_name="r2", file="f0") == \
        generic("Inactive 'f0' can't be a file child of active 'r2'")
    assert q.cmd("blockdev-add", driver="raw", node_name="r2", file="f0", active=False) == \
        {"return": {}}
    assert q.cmd("blockdev-del", node_name="r2") == {"return": {}}


def test_inline_child_of_inactive_add_stays_active(daemon, img):
    q = daemon().qmp
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", active=False,
                 file={"driver": "file", "filename": img, "node-name": "f0"}) == {"return": {}}
    assert active(q) == {"r0": False, "f0": True}
    assert q.cmd("blockdev-set-active", node_name="r0", active=True) == {"return": {}}
    assert active(q) == {"r0": True, "f0": True}


def test_set_active_all(daemon, img):
    q = daemon().qmp
    assert q.cmd("blockdev-add", driver="raw", node_name="r0",
                 file={"driver": "file", "filename": img, "node-name": "f0"}) == {"return": {}}
    assert q.cmd("blockdev-add", driver="null-co", node_name="n0", active=False) == \
        {"return": {}}
    assert q.cmd("blockdev-set-active", active=True) == {"return": {}}
    assert active(q) == {"n0": True, "r0": True, "f0": True}
    assert q.cmd("blockdev-set-active", active=False) == {"return": {}}
    assert active(q) == {"n0": False, "r0": False, "f0": False}
    assert q.cmd("blockdev-set-active", active=False) == {"return": {}}
    assert active(q) == {"n0": False, "r0": False, "f0": False}
    assert q.cmd("blockdev-set-active", active=True) == {"return": {}}
    assert active(q) == {"n0": True, "r0": True, "f0": True}
    # no nodes at all: still fine
    assert q.cmd("blockdev-del", node_name="r0") == {"return": {}}
    assert q.cmd("blockdev-del", node_name="n0") == {"return": {}}
    assert q.cmd("blockdev-set-active", active=False) == {"return": {}}
    assert q.cmd("blockdev-set-active", active=True) == {"return": {}}


def test_set_active_errors(daemon):
    q = daemon().qmp
    assert q.cmd("blockdev-set-active", node_name="nosuch", active=False) == \
        generic("Failed to find node with node-name='nosuch'")
    assert q.cmd("blockdev-set-active", node_name="x") == generic("Parameter 'active' is missing")
    assert q.cmd("blockdev-set-active", active="no") == \
        generic("Invalid parameter type for 'active', expected: boolean")


def test_reopen_and_del_of_inactive_nodes(daemon, img):
    q = daemon().qmp
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img, active=False) == \
        {"return": {}}
    # a node added with active=false refuses every reopen, whatever 'active' says
    f0 = {"driver": "file", "node-name": "f0", "filename": img}
    for extra in ({}, {"read-only": True}, {"active": False}, {"active": True}):
        assert q.cmd("blockdev-reopen", options=[dict(f0, **extra)]) == \
            generic("Option 'active' cannot be reset to its default value"), extra
    assert active(q) == {"f0": False}
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0", active=False) == \
        {"return": {}}
    # inactive nodes can be deleted
    assert q.cmd("blockdev-del", node_name="r0") == {"return": {}}
    assert q.cmd("blockdev-del", node_name="f0") == {"return": {}}
    assert active(q) == {}


def test_reopen_of_node_inactivated_through_parent(daemon, img):
    q = daemon().qmp
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0") == {"return": {}}
    assert q.cmd("blockdev-set-active", node_name="r0", active=False) == {"return": {}}
    r0 = {"driver": "raw", "node-name": "r0", "file": "f0"}
    # inactivated by blockdev-set-active: reopen works as long as it does not ask for active
    assert q.cmd("blockdev-reopen", options=[dict(r0, **{"read-only": True})]) == {"return": {}}
    assert q.cmd("blockdev-reopen", options=[r0]) == {"return": {}}
    assert q.cmd("blockdev-reopen", options=[dict(r0, active=False)]) == {"return": {}}
    assert q.cmd("blockdev-reopen", options=[dict(r0, active=True)]) == \
        generic("Option 'active' cannot be reset to its default value")
    assert q.cmd("blockdev-reopen", options=[
        {"driver": "file", "node-name": "f0", "filename": img}]) == {"return": {}}
    assert active(q) == {"r0": False, "f0": False}
    assert {n["node-name"]: n["ro"] for n in q.cmd("query-named-block-nodes")["return"]} == \
        {"r0": False, "f0": False}


@pytest.mark.needs("block_resize")
def test_resize_inactive_node(daemon, img):
    q = daemon().qmp
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0") == {"return": {}}
    assert q.cmd("blockdev-set-active", node_name="r0", active=False) == {"return": {}}
    err = generic("Permission 'resize' unavailable on inactive node")
    assert q.cmd("block_resize", node_name="r0", size=2 * MiB) == err
    assert q.cmd("block_resize", node_name="f0", size=2 * MiB) == err
    assert os.path.getsize(img) == MiB
    # active file without a parent using it: resize works
    assert q.cmd("blockdev-set-active", node_name="f0", active=True) == {"return": {}}
    assert q.cmd("block_resize", node_name="f0", size=2 * MiB) == {"return": {}}
    assert os.path.getsize(img) == 2 * MiB
    assert q.cmd("block_resize", node_name="nosuch", size=MiB) == \
        generic("Cannot find device='' nor node-name='nosuch'")


@pytest.mark.needs("nbd-server-start", "block-export-add", "block-export-del")
def test_export_blocks_inactivation(daemon, img):
    q = daemon().qmp
    w = daemon.workdir
    assert q.cmd("blockdev-add", driver="raw", node_name="r0",
                 file={"driver": "file", "filename": img}) == {"return": {}}
    assert q.cmd("nbd-server-start",
                 addr={"type": "unix", "data": {"path": w + "/nbd.sock"}}) == {"return": {}}
    assert q.cmd("block-export-add", type="nbd", id="e0", node_name="r0", writable=True) == \
        {"return": {}}
    assert q.cmd("blockdev-set-active", node_name="r0", active=False) == \
        generic("Failed to inactivate node: Operation not permitted")
    assert q.cmd("blockdev-set-active", active=False) == \
        generic("Failed to inactivate all nodes: Operation not permitted")
    assert delete_export_after_clients_left(q, "e0") == {"return": {}}
    q.wait_event("BLOCK_EXPORT_DELETED")
    assert q.cmd("blockdev-set-active", node_name="r0", active=False) == {"return": {}}
