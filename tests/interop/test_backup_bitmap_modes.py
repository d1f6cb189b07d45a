"""Backup with a bitmap in every bitmap-mode, with and without a failure (QEMU's iotest 257
matrix, reduced to what is deterministic), on strata and qemu-storage-daemon: what the bitmap
holds after the job, and what reached the target.
"""

import pytest

from test_backup_jobs import (SIZE, add_qcow2, add_raw, collect_until, img, make_raw, make_source,
                              qio, run_cmd)

KiB = 1024
CLUSTER = 64 * KiB
# Five dirty clusters: four at 0, one at 2 MiB.
DIRTY = 5 * CLUSTER


def start(d, failure):
    q = d.qmp
    src = make_source(d)
    img("bitmap", "--add", "-g", str(CLUSTER), src, "b0")
    qio("-f", "qcow2", "-c", "write -P 0x71 0 256k", "-c", "write -P 0x72 2M 64k", src)
    add_qcow2(q, "src", src)
    tgt = make_raw(d)
    if failure:
        # The first write into the first cluster of the target fails, once.
        q.ok("blockdev-add", {"driver": "raw", "node-name": "tgt",
                              "file": {"driver": "blkdebug", "inject-error": [
                                  {"event": "write_aio", "errno": 5, "sector": 4,
                                   "once": True}],
                                  "image": {"driver": "file", "filename": tgt}}})
    else:
        add_raw(q, "tgt", tgt)
    return tgt


def bitmap_count(q):
    for node in q.ok("query-named-block-nodes"):
        if node["node-name"] == "src":
            return {b["name"]: b["count"] for b in node.get("dirty-bitmaps", [])}["b0"]
    raise AssertionError("no src node")


CASES = [("bitmap", "on-success"), ("bitmap", "never"), ("bitmap", "always"),
         ("full", "on-success"), ("full", "always")]


@pytest.mark.parametrize("failure", [False, True], ids=["ok", "fail"])
@pytest.mark.parametrize("sync,mode", CASES, ids=["%s-%s" % c for c in CASES])
def test_bitmap_after_backup(daemon, sync, mode, failure):
    d = daemon()
    q = d.qmp
    tgt = start(d, failure)
    r, before = run_cmd(q, "blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                               "sync": sync, "bitmap": "b0",
                                               "bitmap-mode": mode})
    assert r == {"return": {}}, r
    events = before + collect_until(q, "null")
    completed = [e for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert len(completed) == 1, events
    assert ("error" in completed[0][1]) == failure, completed
    count = bitmap_count(q)
    if not failure:
        assert count == (DIRTY if mode == "never" else 0)
        q.ok("blockdev-del", {"node-name": "tgt"})
        copied = ["-c", "read -P 0x71 0 256k", "-c", "read -P 0x72 2M 64k"]
        if sync == "full":
            copied += ["-c", "read -P 0x11 256k 768k", "-c", "read -P 0x33 2112k 960k"]
        else:
            copied += ["-c", "read -P 0 256k 768k"]
        qio("-f", "raw", *copied, tgt)
    elif mode == "always":
        # The clusters that were copied are clean; the failed chunk is dirty (with sync=full,
        # every region the job did not copy becomes dirty, dirty before or not).
        assert CLUSTER <= count <= (DIRTY if sync == "bitmap" else SIZE), count
    else:
        # on-success and never: the bitmap is as it was.
        assert count == DIRTY, count
