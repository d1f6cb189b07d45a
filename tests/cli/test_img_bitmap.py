"""strata img bitmap and qcow2 persistent dirty bitmaps, against QEMU's tools.

Bitmaps strata adds, changes and fills (through `strata io` writes) must look to qemu-img exactly
like the bitmaps qemu-img/qemu-io make on a twin image: `qemu-img info` lists the same bitmaps,
`qemu-img check` finds the image clean, and the dirty areas exported by qemu-storage-daemon
(nbdinfo --map=qemu:dirty-bitmap:NAME) are the same. Bitmaps QEMU made load in strata with the
same dirty areas. Errors match qemu-img's text and exit code.
"""

import json
import os
import shutil
import struct
import subprocess
import time

import pytest

STRATA = os.environ.get("STRATA_BIN", "strata")
pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("qemu-img", "qemu-io", "qemu-storage-daemon", "nbdinfo")),
    reason="qemu-img, qemu-io, qemu-storage-daemon or nbdinfo not installed",
)


def run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def strata(*args):
    return run(STRATA, "img", *args)


def qemu_img(*args):
    return run("qemu-img", *args)


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def qemu_io(path, *commands):
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    return ok(run(*args, path))


def strata_io(path, *commands):
    args = [STRATA, "io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    return ok(run(*args, path))


def info(tool, path):
    result = ok(run(tool, *(["img"] if tool == STRATA else []), "info", "--output=json", path))
    return json.loads(result.stdout)


def bitmaps_of(path):
    return info("qemu-img", path)["format-specific"]["data"].get("bitmaps")


def dirty_map(path, name, tmp_path):
    """The dirty extents of bitmap `name` as qemu-storage-daemon exports them over NBD."""
    socket = str(tmp_path / f"nbd-{os.path.basename(path)}-{name}.sock")
    if os.path.exists(socket):
        os.unlink(socket)
    daemon = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,filename={path},node-name=f,read-only=on",
            "--blockdev", "driver=qcow2,file=f,node-name=q,read-only=on",
            "--nbd-server", f"addr.type=unix,addr.path={socket}",
            "--export", f"type=nbd,id=e,node-name=q,bitmaps.0={name}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(100):
            if os.path.exists(socket) or daemon.poll() is not None:
                break
            time.sleep(0.05)
        assert daemon.poll() is None, daemon.communicate()[1]
        for _ in range(100):
            result = run("nbdinfo", f"--map=qemu:dirty-bitmap:{name}",
                         f"nbd+unix:///q?socket={socket}")
            if "Connection refused" not in result.stderr:
                break
            time.sleep(0.05)
        ok(result)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    extents = []
    for line in result.stdout.splitlines():
        offset, length, _, description = line.split()
        if description == "dirty":
            extents.append((int(offset), int(length)))
    return extents


def twin_images(tmp_path, size="16M", *options):
    ours = str(tmp_path / "ours.qcow2")
    theirs = str(tmp_path / "theirs.qcow2")
    for path in (ours, theirs):
        ok(qemu_img("create", "-q", "-f", "qcow2", *options, path, size))
    return ours, theirs


WRITES = ("write -P 1 0 64k", "write -P 2 1M 4k", "write -z 5M 192k", "write -P 3 15M 512")


def test_bitmaps_added_by_strata_look_like_qemu_img_ones(tmp_path):
    ours, theirs = twin_images(tmp_path)
    for tool, path in ((STRATA, ours), ("qemu-img", theirs)):
        prefix = ["img"] if tool == STRATA else []
        ok(run(tool, *prefix, "bitmap", "--add", "-g", "128k", path, "b1"))
        ok(run(tool, *prefix, "bitmap", "--add", "--disable", path, "b2"))
        ok(run(tool, *prefix, "bitmap", "--add", "-g", "512", path, "b3"))
    assert bitmaps_of(ours) == bitmaps_of(theirs)
    assert [b["name"] for b in bitmaps_of(ours)] == ["b1", "b2", "b3"]
    assert ok(qemu_img("check", ours)).returncode == 0
    # strata img info shows the bitmaps as qemu-img does, human and JSON.
    assert info(STRATA, ours)["format-specific"] == info("qemu-img", ours)["format-specific"]
    human = ok(strata("info", ours)).stdout
    assert human.split("Format specific information:")[1].split("Child node")[0] == \
        ok(qemu_img("info", ours)).stdout.split("Format specific information:")[1].split(
            "Child node")[0]


def test_strata_writes_dirty_the_same_areas_as_qemu_io(tmp_path):
    ours, theirs = twin_images(tmp_path)
    for path in (ours, theirs):
        ok(qemu_img("bitmap", "--add", "-g", "64k", path, "fine"))
        ok(qemu_img("bitmap", "--add", "-g", "1M", path, "coarse"))
        ok(qemu_img("bitmap", "--add", "--disable", path, "off"))
    strata_io(ours, *WRITES)
    qemu_io(theirs, *WRITES)
    for name in ("fine", "coarse", "off"):
        expected = dirty_map(theirs, name, tmp_path)
        assert dirty_map(ours, name, tmp_path) == expected, name
    assert dirty_map(ours, "fine", tmp_path) != []
    assert bitmaps_of(ours) == bitmaps_of(theirs)
    assert ok(qemu_img("check", ours)).returncode == 0
    assert ok(qemu_img("compare", ours, theirs)).returncode == 0


def test_qemu_bitmaps_load_in_strata_with_their_dirty_areas(tmp_path):
    ours, theirs = twin_images(tmp_path)
    ok(qemu_img("bitmap", "--add", "-g", "64k", theirs, "b"))
    qemu_io(theirs, *WRITES)
    expected = dirty_map(theirs, "b", tmp_path)
    # Merging QEMU's bitmap from its image reads it in strata; storing writes it for QEMU.
    ok(strata("bitmap", "--add", ours, "copy"))
    ok(strata("bitmap", "--merge", "b", "-b", theirs, "-F", "qcow2", ours, "copy"))
    assert dirty_map(ours, "copy", tmp_path) == expected
    # A read-write open of QEMU's image (load, mark in use, store back) keeps the dirty areas.
    ok(strata("bitmap", "--enable", theirs, "b"))
    assert dirty_map(theirs, "b", tmp_path) == expected
    assert ok(qemu_img("check", theirs)).returncode == 0
    assert ok(qemu_img("check", ours)).returncode == 0


def test_clear_disable_enable_remove_and_merge_match_qemu_img(tmp_path):
    ours, theirs = twin_images(tmp_path)
    steps = [
        ("--add", "a"),
        ("--add", "b"),
        ("WRITE", "write -P 7 2M 64k"),
        ("--disable", "a"),
        ("WRITE", "write -P 8 4M 64k"),
        ("--merge", "b", "a"),
        ("--clear", "b"),
        ("WRITE", "write -P 9 8M 4k"),
        ("--enable", "a"),
        ("--add", "gone"),
        ("--remove", "gone"),
    ]
    for step in steps:
        if step[0] == "WRITE":
            strata_io(ours, step[1])
            qemu_io(theirs, step[1])
            continue
        args = [step[0]] + ([step[1]] if step[0] == "--merge" else [])
        name = step[-1]
        ok(strata("bitmap", *args, ours, name))
        ok(qemu_img("bitmap", *args, theirs, name))
    assert bitmaps_of(ours) == bitmaps_of(theirs)
    for name in ("a", "b"):
        assert dirty_map(ours, name, tmp_path) == dirty_map(theirs, name, tmp_path), name
    check = ok(qemu_img("check", "--output=json", ours))
    assert "leaks" not in json.loads(check.stdout)
    # Removing the last bitmaps drops the extension and every cluster it used.
    for name in ("a", "b"):
        ok(strata("bitmap", "--remove", ours, name))
    assert bitmaps_of(ours) is None
    check = json.loads(ok(qemu_img("check", "--output=json", ours)).stdout)
    assert "leaks" not in check and "corruptions" not in check


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--add", "-g", "1000"],
        ["--add", "-g", "256"],
        ["--add", "-g", "4x"],
        ["--add", "-g", "-5"],
        ["--add", "-g", "9E"],
        ["--add", "EXISTS"],
        ["--remove", "nope"],
        ["--clear", "nope"],
        ["--merge", "nope"],
        ["--remove", "-g", "64k"],
        ["-F", "qcow2", "--add"],
        ["-b", "SRC", "--add"],
        ["--add", "--disable", "--enable", "--clear", "--remove"],
        ["ONLY-FILE", "--add"],
    ],
)
def test_errors_match_qemu_img(tmp_path, args):
    ours, theirs = twin_images(tmp_path)
    results = []
    for tool, path in ((STRATA, ours), ("qemu-img", theirs)):
        prefix = ["img"] if tool == STRATA else []
        ok(run(tool, *prefix, "bitmap", "--add", path, "EXISTS"))
        argv = [path if a == "SRC" else a for a in args if a != "ONLY-FILE"]
        operands = [path] if "ONLY-FILE" in args else [path, "EXISTS" if "EXISTS" in args else "x"]
        argv = [a for a in argv if a != "EXISTS"] + operands
        results.append(run(tool, *prefix, "bitmap", *argv))
    ours_result, theirs_result = results
    assert ours_result.returncode == theirs_result.returncode
    assert ours_result.stderr.replace("strata img:", "qemu-img:") == theirs_result.stderr
    assert bitmaps_of(ours) == bitmaps_of(theirs)


def test_v2_and_raw_images_refuse_persistent_bitmaps(tmp_path):
    v2 = str(tmp_path / "v2.qcow2")
    ok(qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "1M"))
    result = strata("bitmap", "--add", v2, "x")
    assert result.returncode == 1
    assert "Operation add on bitmap x failed: Can't make bitmap 'x' persistent in '" in result.stderr
    assert result.stderr.endswith("': Cannot store dirty bitmaps in qcow2 v2 files\n")
    assert ok(qemu_img("check", v2)).returncode == 0


def set_bitmap_flags(path, index, flags=None, granularity_bits=None):
    """Rewrites the flags / granularity of directory entry `index` (an image QEMU wrote)."""
    with open(path, "r+b") as f:
        head = f.read(65536)
        (header_length,) = struct.unpack(">I", head[100:104])
        at = header_length
        while True:
            magic, length = struct.unpack(">II", head[at:at + 8])
            assert magic != 0, "no bitmaps extension"
            if magic == 0x23852875:
                _, _, _, directory_offset = struct.unpack(">IIQQ", head[at + 8:at + 32])
                break
            at += 8 + (length + 7) // 8 * 8
        entry = directory_offset
        for _ in range(index):
            f.seek(entry + 18)
            name_size, extra = struct.unpack(">HI", f.read(6))
            entry += (24 + name_size + extra + 7) // 8 * 8
        if flags is not None:
            f.seek(entry + 12)
            f.write(struct.pack(">I", flags))
        if granularity_bits is not None:
            f.seek(entry + 17)
            f.write(bytes([granularity_bits]))


def test_in_use_bitmaps_are_inconsistent_like_in_qemu(tmp_path):
    ours, theirs = twin_images(tmp_path)
    for path in (ours, theirs):
        ok(qemu_img("bitmap", "--add", path, "stale"))
        ok(qemu_img("bitmap", "--add", path, "good"))
        qemu_io(path, "write 0 64k")
        set_bitmap_flags(path, 0, flags=3)  # in-use | auto: a crashed writer's bitmap
    assert info(STRATA, ours)["format-specific"] == info("qemu-img", ours)["format-specific"]
    for operation in ("--clear", "--enable", "--disable"):
        mine = strata("bitmap", operation, ours, "stale")
        reference = qemu_img("bitmap", operation, theirs, "stale")
        assert mine.returncode == reference.returncode == 1
        assert mine.stderr.replace("strata img:", "qemu-img:") == reference.stderr
    # The stale bitmap is kept as it is; the good one is stored back; removal works.
    ok(strata("bitmap", "--clear", ours, "good"))
    ok(qemu_img("bitmap", "--clear", theirs, "good"))
    assert bitmaps_of(ours) == bitmaps_of(theirs)
    ok(strata("bitmap", "--remove", ours, "stale"))
    ok(qemu_img("bitmap", "--remove", theirs, "stale"))
    assert bitmaps_of(ours) == bitmaps_of(theirs)
    assert ok(qemu_img("check", ours)).returncode == 0


def test_invalid_directory_entries_fail_open_like_qemu(tmp_path):
    path = str(tmp_path / "bad.qcow2")
    ok(qemu_img("create", "-q", "-f", "qcow2", path, "1M"))
    ok(qemu_img("bitmap", "--add", path, "bad"))
    set_bitmap_flags(path, 0, granularity_bits=40)
    for args in (["info", path], ["bitmap", "--clear", path, "bad"]):
        mine = strata(*args)
        reference = qemu_img(*args)
        assert mine.returncode == reference.returncode == 1
        assert mine.stderr.replace("strata img:", "qemu-img:") == reference.stderr
