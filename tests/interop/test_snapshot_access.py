"""Image fleecing with copy-before-write + snapshot-access, on strata and qemu-storage-daemon
(QEMU's tests/image-fleecing "cbw + snapshot-access" variants and tests/copy-before-write).

The guest writes through a writable NBD export of the filter; a read-only export of the
snapshot-access node serves the disk as it was when the filter was inserted. The temporary image
has no backing link, and may be raw or qcow2.
"""

import os

import pytest

from test_backup_jobs import SIZE, add_qcow2, img, make_raw, make_source, qio
from test_copy_before_write import cbw_options


def fleece(d, temp_format="raw", bitmap=None, on_cbw_error=None, target=None,
           fleece_writable=False, prepare_disk=None, cbw_extra=None):
    """disk (qcow2 with the four patterns), temp, cbw over disk, access over cbw; exports
    'guest' (cbw, writable) and 'fleece' (access; writable for discards). Returns (guest URI,
    fleece URI, disk path, temp path)."""
    q = d.qmp
    disk = make_source(d, "disk.qcow2")
    if prepare_disk:
        prepare_disk(disk)
    add_qcow2(q, "disk", disk)
    if temp_format == "raw":
        temp = make_raw(d, "temp.raw")
    else:
        temp = os.path.join(d.dir, "temp.qcow2")
        img("create", "-q", "-f", "qcow2", temp, str(SIZE))
    if target is None:
        target = {"driver": temp_format, "node-name": "temp",
                  "file": {"driver": "file", "filename": temp}}
    q.ok("blockdev-add", target)
    q.ok("blockdev-add", cbw_options(bitmap, on_cbw_error, **(cbw_extra or {})))
    # discard=unmap: the backup tool's discards reach the node (QEMU's backup-discard-source).
    q.ok("blockdev-add", {"driver": "snapshot-access", "node-name": "access", "file": "cbw",
                          "discard": "unmap"})
    sock = os.path.join(d.dir, "nbd.sock")
    q.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    q.ok("block-export-add", {"type": "nbd", "id": "guest", "node-name": "cbw",
                              "writable": True})
    q.ok("block-export-add", {"type": "nbd", "id": "fleece", "node-name": "access",
                              "writable": fleece_writable})
    return ("nbd+unix:///cbw?socket=%s" % sock, "nbd+unix:///access?socket=%s" % sock, disk,
            temp)


def stop_fleece(q):
    for export in ("fleece", "guest"):
        q.ok("block-export-del", {"id": export})
        q.wait_event("BLOCK_EXPORT_DELETED")
    for node in ("access", "cbw", "temp", "disk"):
        q.ok("blockdev-del", {"node-name": node})


OVERWRITES = ["write -P 0xa1 0 64k",       # a whole cluster
              "write -P 0xa2 1M 4k",        # partial, left of a cluster
              "write -P 0xa3 2044k 4k",     # partial, right of a cluster
              "write -P 0xa4 3008k 128k",   # two adjacent clusters
              "write -P 0xa5 3136k 64k"]    # the cluster right after


@pytest.mark.parametrize("temp_format", ["raw", "qcow2"])
def test_fleece_reads_original_data_after_guest_overwrites(daemon, temp_format):
    d = daemon()
    guest, fleece_uri, disk, temp = fleece(d, temp_format)
    # Read once before the guest writes too: untouched regions come from the disk.
    qio("-f", "raw", "-r", "-c", "read -P 0x11 0 1M", fleece_uri)
    qio("-f", "raw", *sum([["-c", c] for c in OVERWRITES], []), guest)
    qio("-f", "raw", "-r", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M",
        "-c", "read -P 0x33 2M 1M", "-c", "read -P 0x44 3M 1M", fleece_uri)
    qio("-f", "raw", "-r", "-c", "read -P 0xa1 0 64k", "-c", "read -P 0xa2 1M 4k",
        "-c", "read -P 0x22 1028k 60k", "-c", "read -P 0xa3 2044k 4k",
        "-c", "read -P 0xa4 3008k 128k", "-c", "read -P 0xa5 3136k 64k", guest)
    # A second write to a copied cluster copies nothing more; the view still holds.
    qio("-f", "raw", "-c", "write -P 0xb1 0 64k", guest)
    qio("-f", "raw", "-r", "-c", "read -P 0x11 0 64k", fleece_uri)
    stop_fleece(d.qmp)
    qio("-f", "qcow2", "-c", "read -P 0xb1 0 64k", "-c", "read -P 0xa5 3136k 64k", disk)


def test_fleece_outside_bitmap_is_not_readable(daemon):
    def add_bitmap(disk):
        img("bitmap", "--add", disk, "b0")
        qio("-f", "qcow2", "-c", "write -P 0x55 0 64k", disk)  # cluster 0 only

    d = daemon()
    guest, fleece_uri, disk, temp = fleece(d, bitmap={"node": "disk", "name": "b0"},
                                           prepare_disk=add_bitmap)
    qio("-f", "raw", "-c", "write -P 0xb1 0 64k", "-c", "write -P 0xb2 2M 64k", guest)
    qio("-f", "raw", "-r", "-c", "read -P 0x55 0 64k", fleece_uri)
    r = qio("-f", "raw", "-r", "-c", "read 2M 64k", fleece_uri, check=False)
    assert "read failed: Invalid argument" in r.stdout, r.stdout + r.stderr
    stop_fleece(d.qmp)


def test_fleece_discard_drops_regions(daemon):
    d = daemon()
    guest, fleece_uri, disk, temp = fleece(d, "qcow2", fleece_writable=True)
    qio("-f", "raw", "-c", "write -P 0xa1 0 128k", guest)  # copies clusters 0 and 1
    # The backup tool is done with the first 1 MiB: discard it from the view.
    qio("-f", "raw", "-c", "discard 0 1M", fleece_uri)
    r = qio("-f", "raw", "-r", "-c", "read 0 64k", fleece_uri, check=False)
    assert "read failed" in r.stdout + r.stderr, r.stdout + r.stderr
    qio("-f", "raw", "-r", "-c", "read -P 0x22 1M 1M", fleece_uri)
    # A later guest write there copies nothing into the temporary image.
    qio("-f", "raw", "-c", "write -P 0xa2 512k 64k", guest)
    stop_fleece(d.qmp)
    r = img("map", "--output=json", "-f", "qcow2", temp)
    for line in r.stdout.replace("},", "}\n").splitlines():
        if '"start": 524288' in line:
            assert '"data": false' in line, r.stdout


@pytest.mark.parametrize("mode", ["break-guest-write", "break-snapshot"])
def test_on_cbw_error(daemon, mode):
    """QEMU's tests/copy-before-write: the first write to the temporary image fails (blkdebug
    EIO); break-guest-write fails the guest write, break-snapshot lets it through and the
    snapshot reads fail from then on."""
    d = daemon()
    temp = None
    target = {"driver": "raw", "node-name": "temp",
              "file": {"driver": "blkdebug",
                       "image": {"driver": "file", "filename": None},
                       "inject-error": [{"event": "write_aio", "errno": 5,
                                         "immediately": False, "once": True}]}}
    temp = make_raw(d, "temp.raw")
    target["file"]["image"]["filename"] = temp
    guest, fleece_uri, disk, _ = fleece(d, "raw", on_cbw_error=mode, target=target)
    r = qio("-f", "raw", "-c", "write -P 0xc1 0 1M", guest, check=False)
    if mode == "break-guest-write":
        assert "write failed: Input/output error" in r.stdout, r.stdout + r.stderr
        qio("-f", "raw", "-r", "-c", "read -P 0x11 0 1M", fleece_uri)
    else:
        assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
        # EACCES has no NBD error code: it travels as EINVAL.
        r = qio("-f", "raw", "-r", "-c", "read 0 1M", fleece_uri, check=False)
        assert "read failed: Invalid argument" in r.stdout, r.stdout + r.stderr
        r = qio("-f", "raw", "-r", "-c", "read 2M 64k", fleece_uri, check=False)
        assert "read failed: Invalid argument" in r.stdout, r.stdout + r.stderr
    stop_fleece(d.qmp)


def test_snapshot_access_refuses_writes_and_cleanup_order(daemon):
    d = daemon()
    q = d.qmp
    guest, fleece_uri, disk, temp = fleece(d, fleece_writable=True)
    r = qio("-f", "raw", "-c", "write 0 4k", fleece_uri, check=False)
    assert "write failed: Operation not supported" in r.stdout, r.stdout + r.stderr
    r = qio("-f", "raw", "-c", "write -z 0 4k", fleece_uri, check=False)
    assert "write failed: Operation not supported" in r.stdout, r.stdout + r.stderr
    q.ok("block-export-del", {"id": "fleece"})
    q.wait_event("BLOCK_EXPORT_DELETED")
    assert q.err("blockdev-del", {"node-name": "cbw"})["desc"] == "Node cbw is in use"
    q.ok("blockdev-del", {"node-name": "access"})
    q.ok("block-export-del", {"id": "guest"})
    q.wait_event("BLOCK_EXPORT_DELETED")
    for node in ("cbw", "temp", "disk"):
        q.ok("blockdev-del", {"node-name": node})


def test_push_backup_from_the_snapshot(daemon):
    """image-fleecing's push-backup variant: a backup job copies the frozen view to a target
    while the guest keeps writing."""
    from test_backup_jobs import add_raw, collect_until, run_cmd
    d = daemon()
    q = d.qmp
    guest, fleece_uri, disk, temp = fleece(d, "qcow2")
    qio("-f", "raw", "-c", "write -P 0xd1 512k 64k", guest)
    backup = make_raw(d, "backup.raw")
    add_raw(q, "backup", backup)
    r, before = run_cmd(q, "blockdev-backup", {"job-id": "push", "device": "access",
                                               "target": "backup", "sync": "full"})
    assert r == {"return": {}}, r
    qio("-f", "raw", "-c", "write -P 0xd2 2M 1M", guest)
    collect_until(q, "null")
    q.ok("blockdev-del", {"node-name": "backup"})
    qio("-f", "raw", "-r", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M",
        "-c", "read -P 0x33 2M 1M", "-c", "read -P 0x44 3M 1M", backup)
    stop_fleece(q)


@pytest.mark.parametrize("mode", ["break-guest-write", "break-snapshot"])
def test_cbw_timeout(daemon, mode):
    """QEMU's tests/copy-before-write timeout cases: the temporary image sits behind a throttle
    group of 1 byte/s for writes, so the second copy cannot finish within cbw-timeout=1."""
    d = daemon()
    d.qmp.ok("object-add", {"qom-type": "throttle-group", "id": "tg",
                            "limits": {"bps-write": 1}})
    temp = make_raw(d, "temp.raw")
    target = {"driver": "raw", "node-name": "temp",
              "file": {"driver": "throttle", "throttle-group": "tg",
                       "file": {"driver": "file", "filename": temp}}}
    guest, fleece_uri, disk, _ = fleece(d, on_cbw_error=mode, target=target,
                                        cbw_extra={"cbw-timeout": 1})
    qio("-f", "raw", "-c", "write -P 0xe1 0 64k", guest)  # the first copy passes at once
    r = qio("-f", "raw", "-c", "write -P 0xe2 1M 64k", guest, check=False)
    if mode == "break-guest-write":
        # ETIMEDOUT has no NBD error code: it travels as EINVAL.
        assert "write failed: Invalid argument" in r.stdout, r.stdout + r.stderr
        qio("-f", "raw", "-r", "-c", "read -P 0x11 0 64k", "-c", "read -P 0x22 1M 64k",
            fleece_uri)
    else:
        assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
        r = qio("-f", "raw", "-r", "-c", "read 0 64k", fleece_uri, check=False)
        assert "read failed: Invalid argument" in r.stdout, r.stdout + r.stderr
    stop_fleece(d.qmp)
    d.qmp.ok("object-del", {"id": "tg"})


def test_backup_discard_source_empties_the_temporary_image(daemon):
    """QEMU's tests/backup-discard-source: a backup job reading the snapshot with discard-source
    frees each region of the temporary image once it is copied."""
    from test_backup_jobs import add_raw, collect_until, run_cmd
    d = daemon()
    q = d.qmp
    temp = os.path.join(d.dir, "temp.qcow2")
    img("create", "-q", "-f", "qcow2", temp, str(SIZE))
    # discard=unmap on the temporary image too, or its discards are dropped.
    target = {"driver": "qcow2", "node-name": "temp", "discard": "unmap",
              "file": {"driver": "file", "filename": temp}}
    guest, fleece_uri, disk, _ = fleece(d, "qcow2", target=target)
    qio("-f", "raw", "-c", "write -P 0xf1 0 1M", "-c", "write -P 0xf2 3M 512k", guest)
    backup = make_raw(d, "backup.raw")
    add_raw(q, "backup", backup)
    r, before = run_cmd(q, "blockdev-backup", {"job-id": "b0", "device": "access",
                                               "target": "backup", "sync": "full",
                                               "discard-source": True})
    assert r == {"return": {}}, r
    collect_until(q, "null")
    q.ok("blockdev-del", {"node-name": "backup"})
    qio("-f", "raw", "-r", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M",
        "-c", "read -P 0x33 2M 1M", "-c", "read -P 0x44 3M 1M", backup)
    # Every region was read, so every copy in the temporary image was discarded.
    r = qio("-f", "raw", "-r", "-c", "read 0 64k", fleece_uri, check=False)
    assert "read failed" in r.stdout, r.stdout + r.stderr
    stop_fleece(q)
    r = img("map", "--output=json", "-f", "qcow2", temp)
    assert '"data": true' not in r.stdout, r.stdout
