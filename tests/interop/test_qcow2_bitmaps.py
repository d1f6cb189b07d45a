"""Persistent dirty bitmaps through the daemon, the same on strata and QSD 10.0.2.

A read-write qcow2 node marks its consistent bitmaps in use on disk while it is active;
inactivating it stores them (flags back to what they were), activating it marks them again, and
blockdev-del stores them. `qemu-img info -U` sees every step the same way for both daemons, and
the image checks clean at the end.
"""

import json
import os

from conftest import need_tool, run_tool


def bitmap_flags(path):
    result = run_tool("qemu-img", "info", "-U", "--output=json", path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["format-specific"]["data"]
    return {b["name"]: b["flags"] for b in data.get("bitmaps", [])}


def test_bitmaps_in_use_while_active_and_stored_on_inactivate_and_del(daemon, workdir):
    need_tool("qemu-img")
    path = os.path.join(workdir, "b.qcow2")
    for args in (["create", "-q", "-f", "qcow2", path, "4M"],
                 ["bitmap", "--add", path, "on"],
                 ["bitmap", "--add", "--disable", path, "off"]):
        result = run_tool("qemu-img", *args)
        assert result.returncode == 0, result.stderr
    assert bitmap_flags(path) == {"on": ["auto"], "off": []}

    q = daemon().qmp
    assert q.cmd("blockdev-add", driver="qcow2", node_name="q0",
                 file={"driver": "file", "filename": path}) == {"return": {}}
    assert bitmap_flags(path) == {"on": ["in-use", "auto"], "off": ["in-use"]}
    assert q.cmd("blockdev-set-active", node_name="q0", active=False) == {"return": {}}
    assert bitmap_flags(path) == {"on": ["auto"], "off": []}
    assert q.cmd("blockdev-set-active", node_name="q0", active=True) == {"return": {}}
    assert bitmap_flags(path) == {"on": ["in-use", "auto"], "off": ["in-use"]}
    assert q.cmd("blockdev-del", node_name="q0") == {"return": {}}
    assert bitmap_flags(path) == {"on": ["auto"], "off": []}
    check = run_tool("qemu-img", "check", path)
    assert check.returncode == 0, check.stdout + check.stderr
