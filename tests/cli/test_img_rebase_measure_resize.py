"""strata img rebase -c (compressed copies into the overlay), strata img measure of sources
with persistent bitmaps or an internal snapshot (-l) and strata img resize --preallocation of raw
and qcow2 images, against qemu-img on the same inputs.

Run: STRATA_BIN=build/strata /usr/bin/python3 -m pytest -q tests/cli/test_img_rebase_measure_resize.py
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from img_tools import ok, qemu_img, qemu_io, strata_img

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("qemu-img", "qemu-io")),
    reason="qemu-img or qemu-io not installed (Debian package qemu-utils)",
)


def assert_same(*args):
    q = qemu_img(*args)
    s = strata_img(*args)
    assert s.stdout == q.stdout
    assert s.stderr.replace("strata img", "qemu-img") == q.stderr
    assert s.returncode == q.returncode
    return s


def map_without_offsets(path):
    """qemu-img map's extents without host offsets (strata places clusters differently)."""
    merged = []
    for extent in json.loads(ok(qemu_img("map", "--output=json", path)).stdout):
        extent.pop("offset", None)
        if merged and all(merged[-1][k] == extent[k] for k in extent if k not in ("start", "length")):
            merged[-1]["length"] += extent["length"]
        else:
            merged.append(extent)
    return merged


@pytest.fixture
def workdir(tmp_path):
    os.chdir(tmp_path)
    return tmp_path


# ---- rebase -c ----

@pytest.fixture
def overlay_pair(workdir):
    """base.qcow2 (data, a zero run, a short tail) under two copies of an overlay with some
    clusters of its own; other.qcow2 a different backing file."""
    ok(qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "5M"))
    qemu_io("qcow2", "base.qcow2", "write -P 1 0 2M", "write -z 2M 1M", "write -P 3 3M 1M",
            "write -P 4 5119k 1k")
    ok(qemu_img("create", "-q", "-f", "qcow2", "other.qcow2", "3M"))
    qemu_io("qcow2", "other.qcow2", "write -P 1 0 1M")
    ok(qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "q.qcow2"))
    qemu_io("qcow2", "q.qcow2", "write -P 2 64k 4k", "write -P 5 1M 128k")
    shutil.copy("q.qcow2", "s.qcow2")
    ok(qemu_img("convert", "-O", "raw", "q.qcow2", "expected.raw"))
    return "q.qcow2", "s.qcow2"


@pytest.mark.parametrize("backing", [[], ["-F", "qcow2", "other.qcow2"]])
def test_compressed_rebase_matches_qemu_img(overlay_pair, backing):
    theirs, ours = overlay_pair
    args = ["-b", backing[-1], "-F", "qcow2"] if backing else ["-b", ""]
    ok(qemu_img("rebase", "-c", *args, theirs))
    ok(strata_img("rebase", "-c", *args, ours))
    ok(qemu_img("check", ours))
    ok(qemu_img("compare", "-f", "raw", "-F", "qcow2", "expected.raw", ours))
    assert map_without_offsets(ours) == map_without_offsets(theirs)
    assert any(extent["compressed"] for extent in map_without_offsets(ours))


def test_compressed_rebase_of_raw_fails_like_qemu_img(workdir):
    ok(qemu_img("create", "-q", "-f", "raw", "plain.raw", "1M"))
    assert_same("rebase", "-c", "-f", "raw", "-u", "-b", "x", "plain.raw")
    assert_same("rebase", "-c", "-f", "raw", "-b", "", "plain.raw")


# ---- measure ----

@pytest.fixture
def with_bitmaps(workdir):
    ok(qemu_img("create", "-q", "-f", "qcow2", "bm.qcow2", "100M"))
    qemu_io("qcow2", "bm.qcow2", "write -P 1 0 1M")
    ok(qemu_img("bitmap", "--add", "bm.qcow2", "a"))
    ok(qemu_img("bitmap", "--add", "-g", "512", "bm.qcow2", "fine-grained-with-a-long-name"))
    ok(qemu_img("bitmap", "--add", "-g", "2M", "--disable", "bm.qcow2", "coarse"))
    return "bm.qcow2"


@pytest.mark.parametrize("options", [
    [],
    ["--output=json"],
    ["-o", "cluster_size=4k"],
    ["-o", "cluster_size=2M"],
    ["-o", "compat=0.10"],
    ["-O", "raw"],
])
def test_measure_counts_persistent_bitmaps_like_qemu_img(with_bitmaps, options):
    out = ["-O", "qcow2"] if "-O" not in options else []
    s = assert_same("measure", *out, *options, with_bitmaps)
    assert s.returncode == 0


def test_measure_without_bitmaps_and_of_v2_sources(workdir):
    ok(qemu_img("create", "-q", "-f", "qcow2", "plain.qcow2", "10M"))
    ok(qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "10M"))
    for image in ("plain.qcow2", "v2.qcow2"):
        assert_same("measure", "-O", "qcow2", image)


@pytest.fixture
def with_snapshots(workdir):
    ok(qemu_img("create", "-q", "-f", "qcow2", "snaps.qcow2", "4M"))
    qemu_io("qcow2", "snaps.qcow2", "write -P 7 0 1M")
    ok(qemu_img("snapshot", "-c", "small", "snaps.qcow2"))
    qemu_io("qcow2", "snaps.qcow2", "write -P 8 1M 3M")
    return "snaps.qcow2"


@pytest.mark.parametrize("param", ["small", "1", "snapshot.name=small", "snapshot.id=1",
                                   "missing", "snapshot.id=1,snapshot.name=other",
                                   "snapshot.bad=1"])
def test_measure_of_a_snapshot_matches_qemu_img(with_snapshots, param):
    assert_same("measure", "-O", "qcow2", "-l", param, with_snapshots)
    assert_same("measure", "-O", "qcow2", "--output=json", "-l", param, with_snapshots)


# ---- resize --preallocation (raw) ----

@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_raw_resize_preallocates_like_qemu_img(workdir, mode):
    for name in ("q.raw", "s.raw"):
        ok(qemu_img("create", "-q", "-f", "raw", name, "1M"))
        qemu_io("raw", name, "write -P 1 0 64k")
    q = qemu_img("resize", "-f", "raw", f"--preallocation={mode}", "q.raw", "+3M")
    s = strata_img("resize", "-f", "raw", f"--preallocation={mode}", "s.raw", "+3M")
    assert (s.returncode, s.stdout, s.stderr) == (q.returncode, q.stdout, q.stderr)
    assert Path("s.raw").read_bytes() == Path("q.raw").read_bytes()
    assert ok(qemu_img("map", "-f", "raw", "--output=json", "s.raw")).stdout == \
        ok(qemu_img("map", "-f", "raw", "--output=json", "q.raw")).stdout
    # The new area is allocated in the file (du), not a hole.
    assert os.stat("s.raw").st_blocks * 512 >= 3 * 2**20
    assert os.stat("s.raw").st_blocks == os.stat("q.raw").st_blocks


@pytest.mark.parametrize("args", [
    ["--preallocation=metadata", "plain.raw", "2M"],
    ["--preallocation=falloc", "plain.raw", "512k"],
    ["--preallocation=bogus", "plain.raw", "2M"],
])
def test_raw_resize_preallocation_errors_match_qemu_img(workdir, args):
    ok(qemu_img("create", "-q", "-f", "raw", "plain.raw", "1M"))
    assert_same("resize", "-f", "raw", *args)


# ---- resize --preallocation (qcow2) ----

@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("options", ["cluster_size=64k", "cluster_size=4k,refcount_bits=1"])
def test_qcow2_resize_preallocates_like_qemu_img(workdir, mode, options):
    # The old size ends inside a cluster and inside an L2 table's reach, so the partial cluster
    # and new L2 tables are both covered.
    for name in ("q.qcow2", "s.qcow2"):
        ok(qemu_img("create", "-q", "-f", "qcow2", "-o", options, name, "1000k"))
        qemu_io("qcow2", name, "write -P 1 0 100k", "write -P 2 900k 100k")
    q = qemu_img("resize", f"--preallocation={mode}", "q.qcow2", "+5M")
    s = strata_img("resize", f"--preallocation={mode}", "s.qcow2", "+5M")
    assert (s.returncode, s.stdout) == (q.returncode, q.stdout)
    assert map_without_offsets("s.qcow2") == map_without_offsets("q.qcow2")
    ok(qemu_img("compare", "q.qcow2", "s.qcow2"))
    check = json.loads(qemu_img("check", "--output=json", "s.qcow2").stdout)
    assert check.get("leaks", 0) == 0 and check.get("corruptions", 0) == 0
    if mode != "metadata":
        # The new area's clusters hold space in the file.
        assert os.stat("s.qcow2").st_blocks * 512 >= 5 * 2**20
    # Writes into the preallocated area do not grow the image.
    size = os.path.getsize("s.qcow2")
    qemu_io("qcow2", "s.qcow2", "write -P 3 2M 1M")
    assert os.path.getsize("s.qcow2") == size


def test_qcow2_resize_preallocation_needs_growth(workdir):
    ok(qemu_img("create", "-q", "-f", "qcow2", "plain.qcow2", "1M"))
    assert_same("resize", "--preallocation=metadata", "--shrink", "plain.qcow2", "512k")
