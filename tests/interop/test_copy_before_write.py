"""The copy-before-write filter on strata and qemu-storage-daemon: image fleecing as in QEMU's
tests/image-fleecing (the cbw variant without snapshot-access). The guest writes through a
writable NBD export of the filter; a read-only export of the temporary image (backed by the
disk) keeps serving the disk as it was when the filter was added.
"""

import os

import pytest

from test_backup_jobs import SIZE, MiB, add_qcow2, img, make_source, qio


def cbw_options(bitmap=None, on_cbw_error=None, **extra):
    """blockdev-add arguments of filter 'cbw' over 'disk' with target 'temp'."""
    cbw = {"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "temp"}
    cbw.update(extra)
    if bitmap:
        cbw["bitmap"] = bitmap
    if on_cbw_error:
        cbw["on-cbw-error"] = on_cbw_error
    return cbw


def fleece(d, bitmap=None, on_cbw_error=None):
    q = d.qmp
    disk = make_source(d, "disk.qcow2")
    temp = os.path.join(d.dir, "temp.qcow2")
    img("create", "-q", "-f", "qcow2", temp, str(SIZE))
    add_qcow2(q, "disk", disk)
    add_qcow2(q, "temp", temp, backing="disk")
    q.ok("blockdev-add", cbw_options(bitmap, on_cbw_error))
    sock = os.path.join(d.dir, "nbd.sock")
    q.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    q.ok("block-export-add", {"type": "nbd", "id": "guest", "node-name": "cbw",
                              "writable": True})
    q.ok("block-export-add", {"type": "nbd", "id": "fleece", "node-name": "temp"})
    return ("nbd+unix:///cbw?socket=%s" % sock, "nbd+unix:///temp?socket=%s" % sock, disk)


def stop_fleece(q):
    for export in ("fleece", "guest"):
        q.ok("block-export-del", {"id": export})
        q.wait_event("BLOCK_EXPORT_DELETED")
    for node in ("cbw", "temp", "disk"):
        q.ok("blockdev-del", {"node-name": node})


def test_fleece_reads_original_data_after_guest_overwrites(daemon):
    d = daemon()
    guest, fleece_uri, disk = fleece(d)
    # Full cluster, partial left, partial right, and a write across two clusters.
    qio("-f", "raw", "-c", "write -P 0xa1 0 64k", "-c", "write -P 0xa2 1M 4k",
        "-c", "write -P 0xa3 2044k 4k", "-c", "write -P 0xa4 3008k 128k", guest)
    qio("-f", "raw", "-r", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M",
        "-c", "read -P 0x33 2M 1M", "-c", "read -P 0x44 3M 1M", fleece_uri)
    qio("-f", "raw", "-r", "-c", "read -P 0xa1 0 64k", "-c", "read -P 0xa2 1M 4k",
        "-c", "read -P 0x22 1028k 60k", "-c", "read -P 0xa3 2044k 4k",
        "-c", "read -P 0xa4 3008k 128k", guest)
    stop_fleece(d.qmp)
    # Copies landed in the temporary image only for the clusters the guest touched.
    r = img("map", "--output=json", "-f", "qcow2", os.path.join(d.dir, "temp.qcow2"))
    assert '"data": true' in r.stdout or '"data":true' in r.stdout
    qio("-f", "qcow2", "-c", "read -P 0xa4 3008k 128k", disk)


def test_fleece_with_bitmap_freezes_only_bitmap_regions(daemon):
    d = daemon()
    q = d.qmp
    disk = make_source(d, "disk.qcow2")
    img("bitmap", "--add", disk, "b0")
    qio("-f", "qcow2", "-c", "write -P 0x55 0 64k", disk)  # bit set for cluster 0 only
    temp = os.path.join(d.dir, "temp.qcow2")
    img("create", "-q", "-f", "qcow2", temp, str(SIZE))
    add_qcow2(q, "disk", disk)
    add_qcow2(q, "temp", temp, backing="disk")
    q.ok("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "disk",
                          "target": "temp", "bitmap": {"node": "disk", "name": "b0"}})
    sock = os.path.join(d.dir, "nbd.sock")
    q.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    q.ok("block-export-add", {"type": "nbd", "id": "guest", "node-name": "cbw",
                              "writable": True})
    q.ok("block-export-add", {"type": "nbd", "id": "fleece", "node-name": "temp"})
    guest = "nbd+unix:///cbw?socket=%s" % sock
    fleece_uri = "nbd+unix:///temp?socket=%s" % sock
    qio("-f", "raw", "-c", "write -P 0xb1 0 64k", "-c", "write -P 0xb2 2M 64k", guest)
    # Cluster 0 was frozen; the cluster at 2 MiB was not in the bitmap, so it is not copied
    # and the fleece shows the new data there.
    qio("-f", "raw", "-r", "-c", "read -P 0x55 0 64k", "-c", "read -P 0xb2 2M 64k", fleece_uri)
    stop_fleece(q)


def test_cbw_argument_errors(daemon):
    d = daemon()
    q = d.qmp
    disk = make_source(d, "disk.qcow2")
    temp = os.path.join(d.dir, "temp.qcow2")
    img("create", "-q", "-f", "qcow2", temp, str(SIZE))
    add_qcow2(q, "disk", disk)
    add_qcow2(q, "temp", temp)
    base = {"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "temp"}
    r = q.cmd_args("blockdev-add", dict(base, bitmap={"node": "disk", "name": "nope"}))
    assert r["error"]["desc"] == "Dirty bitmap 'nope' not found", r
    r = q.cmd_args("blockdev-add", dict(base, target="nope"))
    assert "nope" in r["error"]["desc"], r
    q.ok("blockdev-add", base)
    r = q.cmd_args("blockdev-del", {"node-name": "disk"})
    assert r["error"]["desc"] == "Block device disk is in use", r
    q.ok("blockdev-del", {"node-name": "cbw"})
