"""The throttle filter and throttle-group objects on strata and qemu-storage-daemon: QEMU's
ThrottleLimits checks and messages, the filter's options, object-del of a group in use, data
through the filter, and a group slow enough to make copy-before-write time out (QEMU's
tests/copy-before-write uses the same setup).
"""

import os

import pytest

from test_backup_jobs import make_raw, qio

GROUP_ERRORS = [
    ({"limits": {"iops-total": 10, "iops-read": 5}},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"limits": {"bps-total-max": 10, "bps-write-max": 5, "bps-total": 1, "bps-write": 1}},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"limits": {"iops-size": 4096}}, "iops size requires an iops value to be set"),
    ({"limits": {"bps-total": 10 ** 16}}, "bps/iops/max values must be within [0, 1000000000000000]"),
    ({"limits": {"bps-total": -1}}, "bps/iops/max values must be within [0, 1000000000000000]"),
    ({"limits": {"iops-total": 10, "iops-total-max-length": 0}}, "the burst length cannot be 0"),
    ({"limits": {"iops-total": 10, "iops-total-max-length": 5}},
     "burst length set without burst rate"),
    ({"limits": {"bps-write-max": 100}},
     "bps_max/iops_max require corresponding bps/iops values"),
    ({"limits": {"bps-write": 100, "bps-write-max": 10}},
     "bps_max/iops_max cannot be lower than bps/iops"),
    ({"limits": {"bps-total": 1, "bps-total-max": 10 ** 14, "bps-total-max-length": 100}},
     "burst length too high for this burst rate"),
    ({"limits": {"iops-total": "x"}}, "Invalid parameter type for 'limits.iops-total', expected: integer"),
    ({"limits": {"bogus": 1}}, "Parameter 'limits.bogus' is unexpected"),
    ({"x-iops-total": 10, "x-iops-read": 5},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
]


@pytest.mark.parametrize("props,message", GROUP_ERRORS,
                         ids=[str(i) for i in range(len(GROUP_ERRORS))])
def test_group_limits_are_checked(daemon, props, message):
    d = daemon()
    args = {"qom-type": "throttle-group", "id": "tg"}
    args.update(props)
    assert d.qmp.err("object-add", args)["desc"] == message


def test_filter_options_and_group_lifetime(daemon):
    d = daemon()
    q = d.qmp
    raw = make_raw(d, "disk.raw")
    file_node = {"driver": "file", "filename": raw}
    assert q.err("blockdev-add", {"driver": "throttle", "node-name": "t",
                                  "file": file_node})["desc"] == "Parameter 'throttle-group' is missing"
    assert q.err("blockdev-add", {"driver": "throttle", "node-name": "t", "file": file_node,
                                  "throttle-group": "nosuch"})["desc"] \
        == "Throttle group 'nosuch' does not exist"
    q.ok("object-add", {"qom-type": "throttle-group", "id": "tg",
                        "limits": {"iops-total": 1000, "bps-total": 100 << 20}})
    assert q.err("object-add", {"qom-type": "throttle-group", "id": "tg"})["desc"] \
        == "attempt to add duplicate property 'tg' to object (type 'container')"
    q.ok("blockdev-add", {"driver": "throttle", "node-name": "t", "throttle-group": "tg",
                          "file": file_node})
    assert q.err("object-del", {"id": "tg"})["desc"] == "object 'tg' is in use, can not be deleted"
    # Data passes through unchanged.
    sock = os.path.join(d.dir, "nbd.sock")
    q.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    q.ok("block-export-add", {"type": "nbd", "id": "t", "node-name": "t", "writable": True})
    uri = "nbd+unix:///t?socket=%s" % sock
    qio("-f", "raw", "-c", "write -P 0x3e 0 256k", "-c", "read -P 0x3e 0 256k", uri)
    q.ok("block-export-del", {"id": "t"})
    q.wait_event("BLOCK_EXPORT_DELETED")
    q.ok("blockdev-del", {"node-name": "t"})
    q.ok("object-del", {"id": "tg"})
    assert q.err("object-del", {"id": "tg"})["desc"] == "object 'tg' not found"
    with open(raw, "rb") as f:
        assert f.read(256 << 10) == b"\x3e" * (256 << 10)


def test_qom_get_and_set_limits(daemon):
    d = daemon()
    q = d.qmp
    q.ok("object-add", {"qom-type": "throttle-group", "id": "tg",
                        "limits": {"iops-total": 100, "bps-write": 5000, "bps-write-max": 6000,
                                   "bps-write-max-length": 3}})
    full = {"iops-total": 100, "iops-total-max": 0, "iops-total-max-length": 1,
            "iops-read": 0, "iops-read-max": 0, "iops-read-max-length": 1,
            "iops-write": 0, "iops-write-max": 0, "iops-write-max-length": 1,
            "bps-total": 0, "bps-total-max": 0, "bps-total-max-length": 1,
            "bps-read": 0, "bps-read-max": 0, "bps-read-max-length": 1,
            "bps-write": 5000, "bps-write-max": 6000, "bps-write-max-length": 3,
            "iops-size": 0}
    assert q.ok("qom-get", {"path": "tg", "property": "limits"}) == full
    assert q.ok("qom-get", {"path": "/objects/tg", "property": "limits"}) == full
    assert q.ok("qom-get", {"path": "tg", "property": "x-iops-total"}) == 100
    r = q.cmd_args("qom-get", {"path": "nosuch", "property": "limits"})
    assert r["error"] == {"class": "DeviceNotFound", "desc": "Device 'nosuch' not found"}, r
    assert q.err("qom-get", {"path": "tg", "property": "nope"})["desc"] \
        == "Property 'throttle-group.nope' not found"
    # qom-set merges the members given into the current limits.
    q.ok("qom-set", {"path": "tg", "property": "limits", "value": {"iops-total": 50}})
    full["iops-total"] = 50
    assert q.ok("qom-get", {"path": "tg", "property": "limits"}) == full
    assert q.err("qom-set", {"path": "tg", "property": "limits",
                             "value": {"iops-total": 50, "iops-read": 3}})["desc"] \
        == "bps/iops/max total values and read/write values cannot be used at the same time"
    assert q.ok("qom-get", {"path": "tg", "property": "limits"}) == full
    assert q.err("qom-set", {"path": "tg", "property": "x-iops-total", "value": 7})["desc"] \
        == "Property cannot be set after initialization"
    r = q.cmd_args("qom-set", {"path": "nosuch", "property": "limits", "value": {}})
    assert r["error"]["class"] == "DeviceNotFound", r
