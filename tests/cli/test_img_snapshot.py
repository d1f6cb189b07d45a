"""strata img snapshot / resize against qemu-img and qemu-io.

Snapshots made by either tool are listed, applied and deleted by the other; after every step
`qemu-img check` finds no errors and no leaks, the guest data matches what was written before
each snapshot, and `strata img snapshot -l` / `img info` print what qemu-img prints. Resize is
compared with qemu-img resizing a twin image.

Run: STRATA_BIN=build/strata /usr/bin/python3 -m pytest -q tests/cli/test_img_snapshot.py
"""

import json
import os
import shutil
import subprocess

import pytest

STRATA = os.environ.get("STRATA_BIN", "strata")
pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io not installed",
)


def run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def strata(*args):
    return run(STRATA, "img", *args)


def qemu_img(*args):
    return run("qemu-img", *args)


def io(tool, path, *commands):
    """qemu-io or strata io with `commands` on the qcow2 image `path`; asserts success."""
    argv = ["qemu-io"] if tool == "qemu" else [STRATA, "io"]
    argv += ["-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    result = run(*argv, str(path))
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stdout.lower() and "fail" not in result.stdout.lower(), (
        result.stdout)
    return result


def snap(tool, *args):
    result = (strata if tool == "strata" else qemu_img)("snapshot", *[str(a) for a in args])
    assert result.returncode == 0, result.stderr
    return result


def assert_clean(path):
    """qemu-img check: no errors, no leaks (exit 0), and strata img check agrees."""
    theirs = qemu_img("check", str(path))
    assert theirs.returncode == 0, theirs.stdout + theirs.stderr
    ours = strata("check", str(path))
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert ours.stdout == theirs.stdout


def assert_pattern(path, pattern, offset, length):
    result = run("qemu-io", "-f", "qcow2", "-r", "-c",
                 f"read -P {pattern} {offset} {length}", str(path))
    assert result.returncode == 0 and "Pattern verification failed" not in result.stdout, (
        result.stdout + result.stderr)


def assert_lists_agree(path):
    ours = strata("snapshot", "-l", str(path))
    theirs = qemu_img("snapshot", "-l", str(path))
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    assert ours.stdout == theirs.stdout
    for output in ("human", "json"):
        ours = strata("info", f"--output={output}", str(path))
        theirs = qemu_img("info", f"--output={output}", str(path))
        assert ours.returncode == theirs.returncode == 0
        if output == "json":
            ours_json, theirs_json = json.loads(ours.stdout), json.loads(theirs.stdout)
            for info in (ours_json, theirs_json):
                info.pop("actual-size", None)
                # The file's length: strata's file node does not round it up to 512 bytes as
                # QEMU's bdrv_getlength does (the snapshot table may end mid-sector).
                info["children"][0]["info"].pop("actual-size", None)
                info["children"][0]["info"].pop("virtual-size", None)
            assert ours_json == theirs_json
            assert ours_json.get("snapshots") == theirs_json.get("snapshots")
        else:
            strip = lambda text: [l for l in text.splitlines() if "disk size" not in l and "file length" not in l]
            assert strip(ours.stdout) == strip(theirs.stdout)


def make_image(tmp_path, name="a.qcow2", size="8M", *options):
    path = tmp_path / name
    result = qemu_img("create", "-f", "qcow2", *options, str(path), size)
    assert result.returncode == 0, result.stderr
    return path


ROUND_TRIPS = [
    ("strata", "qemu", []),
    ("qemu", "strata", []),
    ("strata", "strata", ["-o", "cluster_size=4096,refcount_bits=4"]),
    ("qemu", "strata", ["-o", "cluster_size=4096,refcount_bits=4"]),
    ("strata", "qemu", ["-o", "compat=0.10"]),
    ("qemu", "strata", ["-o", "compat=0.10"]),
]


@pytest.mark.parametrize("maker,user,options", ROUND_TRIPS,
                         ids=lambda v: v if isinstance(v, str) else ",".join(v) or "default")
def test_snapshot_round_trip(tmp_path, maker, user, options):
    """`maker` writes and snapshots, `user` lists, overwrites, applies and deletes."""
    path = make_image(tmp_path, "a.qcow2", "8M", *options)
    writer = "qemu" if maker == "qemu" else "strata"
    io(writer, path, "write -P 1 0 1M", "write -P 2 4M 64k")
    snap(maker, "-c", "first", path)
    assert_clean(path)
    io(writer, path, "write -P 3 0 512k", "write -P 4 6M 128k")
    snap(maker, "-c", "second", path)
    assert_clean(path)
    assert_lists_agree(path)

    # The other tool overwrites everything (COW of shared L2 tables and clusters).
    other = "qemu" if user == "qemu" else "strata"
    io(other, path, "write -P 5 0 8M")
    assert_clean(path)
    assert_pattern(path, 5, 0, 8 << 20)

    snap(user, "-a", "first", path)
    assert_clean(path)
    assert_pattern(path, 1, 0, 1 << 20)
    assert_pattern(path, 2, 4 << 20, 64 << 10)
    assert_pattern(path, 0, 6 << 20, 128 << 10)

    snap(user, "-a", "2", path)  # by ID
    assert_clean(path)
    assert_pattern(path, 3, 0, 512 << 10)
    assert_pattern(path, 1, 512 << 10, 512 << 10)
    assert_pattern(path, 4, 6 << 20, 128 << 10)

    snap(user, "-d", "first", path)
    assert_clean(path)
    assert_lists_agree(path)
    io(other, path, "write -P 6 0 64k", "discard 4M 64k")
    assert_clean(path)
    snap(user, "-d", "second", path)
    assert_clean(path)
    assert_pattern(path, 6, 0, 64 << 10)
    assert_pattern(path, 4, 6 << 20, 128 << 10)
    assert qemu_img("snapshot", "-l", str(path)).stdout == ""
    assert strata("snapshot", "-l", str(path)).stdout == ""


def test_snapshot_compare_with_qemu_twin(tmp_path):
    """The same snapshot sequence by strata and by qemu-img yields the same guest content."""
    ours, theirs = make_image(tmp_path, "ours.qcow2"), make_image(tmp_path, "theirs.qcow2")
    for path, tool in ((ours, "strata"), (theirs, "qemu")):
        io("qemu", path, "write -P 7 0 2M")
        snap(tool, "-c", "base", path)
        io("qemu", path, "write -P 8 1M 2M", "write -z 3M 64k")
        snap(tool, "-c", "top", path)
        io("qemu", path, "discard 0 4M")
        snap(tool, "-a", "base", path)
    assert qemu_img("compare", str(ours), str(theirs)).returncode == 0
    assert_clean(ours)
    for path, tool in ((ours, "strata"), (theirs, "qemu")):
        snap(tool, "-a", "top", path)
    assert qemu_img("compare", str(ours), str(theirs)).returncode == 0
    assert_clean(ours)


def test_snapshot_many_and_l1_growth(tmp_path):
    """Snapshots of a grown image, and apply of a snapshot taken before the growth."""
    path = make_image(tmp_path, "a.qcow2", "1M", "-o", "cluster_size=512")
    io("strata", path, "write -P 1 0 1M")
    snap("strata", "-c", "small", path)
    assert strata("resize", str(path), "3M").returncode == 0
    io("strata", path, "write -P 2 1M 2M")
    for i in range(5):
        snap("strata", "-c", f"s{i}", path)
    assert_clean(path)
    assert_lists_agree(path)
    snap("strata", "-a", "small", path)
    assert_clean(path)
    # Applying the snapshot taken at 1 MiB brings the image back to 1 MiB (as QEMU 10 does).
    assert json.loads(qemu_img("info", "--output=json", str(path)).stdout)["virtual-size"] == 1 << 20
    assert_pattern(path, 1, 0, 1 << 20)
    snap("qemu", "-a", "s4", path)
    assert_clean(path)
    assert json.loads(qemu_img("info", "--output=json", str(path)).stdout)["virtual-size"] == 3 << 20
    assert_pattern(path, 2, 1 << 20, 2 << 20)


@pytest.mark.parametrize("args,message", [
    (["-a", "nope"], "Could not apply snapshot 'nope': Failed to load snapshot: "
                     "No such file or directory"),
    (["-d", "nope"], "Could not delete snapshot 'nope': snapshot not found"),
    (["-l", "-c", "x"], "Cannot mix '-l', '-a', '-c', '-d'"),
    (["-U", "-c", "x"], None),
])
def test_snapshot_errors_match_qemu(tmp_path, args, message):
    path = make_image(tmp_path)
    snap("qemu", "-c", "s1", path)
    ours = strata("snapshot", *args, str(path))
    theirs = qemu_img("snapshot", *args, str(path))
    assert ours.returncode == theirs.returncode == 1
    if message is not None:
        assert message in ours.stderr
        assert message in theirs.stderr
    assert_clean(path)


def test_snapshot_refcount_overflow_matches_qemu(tmp_path):
    """refcount_bits=1 cannot count a second reference: both tools fail alike and leak the new
    L1 copy only (qemu-img check exit 3, the same leaked cluster)."""
    ours, theirs = make_image(tmp_path, "ours.qcow2", "8M", "-o", "refcount_bits=1"), make_image(
        tmp_path, "theirs.qcow2", "8M", "-o", "refcount_bits=1")
    for path in (ours, theirs):
        io("qemu", path, "write -P 1 0 1M")
    a = strata("snapshot", "-c", "first", str(ours))
    b = qemu_img("snapshot", "-c", "first", str(theirs))
    assert a.returncode == b.returncode == 1
    assert a.stderr.replace("strata img:", "qemu-img:") == b.stderr
    checks = [qemu_img("check", str(p)) for p in (ours, theirs)]
    assert checks[0].returncode == checks[1].returncode == 3
    assert checks[0].stdout == checks[1].stdout and checks[0].stderr == checks[1].stderr
    assert_pattern(ours, 1, 0, 1 << 20)


def test_snapshot_raw_matches_qemu(tmp_path):
    path = tmp_path / "a.raw"
    path.write_bytes(bytes(1 << 20))
    for args in (["-l"], ["-c", "x"], ["-a", "x"], ["-d", "x"]):
        ours = strata("snapshot", "-f", "raw", *args, str(path))
        theirs = qemu_img("snapshot", "-f", "raw", *args, str(path))
        assert ours.returncode == theirs.returncode, (args, ours.stderr, theirs.stderr)
        assert ours.stdout == theirs.stdout
        assert ours.stderr.replace("strata img:", "qemu-img:") == theirs.stderr


def test_duplicate_names_and_id_lookup(tmp_path):
    """qemu-img allows two snapshots with one name; -a/-d find by ID first, then by name."""
    path = make_image(tmp_path)
    io("strata", path, "write -P 1 0 64k")
    snap("strata", "-c", "dup", path)
    io("strata", path, "write -P 2 0 64k")
    snap("strata", "-c", "dup", path)
    snap("strata", "-c", "1", path)  # a name that looks like the first ID
    assert_lists_agree(path)
    snap("strata", "-a", "1", path)  # ID 1, not the snapshot named "1"
    assert_pattern(path, 1, 0, 64 << 10)
    snap("strata", "-d", "dup", path)  # the first one named "dup"
    listing = qemu_img("snapshot", "-l", str(path)).stdout
    assert [line.split()[0] for line in listing.splitlines()[2:]] == ["2", "3"]
    assert_clean(path)


# ---- resize -----------------------------------------------------------------------------------

def twin_images(tmp_path, fmt, size, *options):
    paths = []
    for name in ("ours", "theirs"):
        path = tmp_path / f"{name}.{fmt}"
        result = qemu_img("create", "-f", fmt, *options, str(path), size)
        assert result.returncode == 0, result.stderr
        paths.append(path)
    return paths


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("steps", [
    [["+1G"]],
    [["200M"], ["--shrink", "10M"]],
    [["--shrink", "--", "-3M"], ["+5000"]],
    [["-3M", "--shrink"]],
    [["--shrink", "1M"]],
])
def test_resize_matches_qemu(tmp_path, fmt, steps):
    ours, theirs = twin_images(tmp_path, fmt, "64M")
    for path in (ours, theirs):
        run("qemu-io", "-f", fmt, "-c", "write -P 9 0 2M", "-c", "write -P 10 60M 2M",
            str(path))
    for args in steps:
        a = strata("resize", "-f", fmt, str(ours), *args[:-1], args[-1])
        b = qemu_img("resize", "-f", fmt, str(theirs), *args[:-1], args[-1])
        assert (a.returncode, a.stdout) == (b.returncode, b.stdout), (a.stderr, b.stderr)
        assert a.stderr.replace("strata img:", "qemu-img:") == b.stderr
    size = lambda p: json.loads(qemu_img("info", "-f", fmt, "--output=json", str(p)).stdout)[
        "virtual-size"]
    assert size(ours) == size(theirs)
    assert qemu_img("compare", "-f", fmt, "-F", fmt, str(ours), str(theirs)).returncode == 0
    if fmt == "qcow2":
        assert_clean(ours)
        assert os.path.getsize(ours) <= os.path.getsize(theirs) + 65536


@pytest.mark.parametrize("args", [["32M"], ["--", "-100G"], ["abc"], ["--shrink", "0"],
                                  ["--preallocation=bogus", "+1M"],
                                  ["--preallocation=full", "--shrink", "1M"]])
def test_resize_errors_match_qemu(tmp_path, args):
    ours, theirs = twin_images(tmp_path, "qcow2", "64M")
    a = strata("resize", str(ours), *args)
    b = qemu_img("resize", str(theirs), *args)
    assert a.returncode == b.returncode == 1
    assert a.stdout == b.stdout
    assert a.stderr.replace("strata img:", "qemu-img:") == b.stderr
    assert_clean(ours)


def test_resize_shrink_with_snapshot_then_apply(tmp_path):
    """QEMU 10 shrinks images with snapshots; applying the older snapshot restores its size."""
    ours, theirs = twin_images(tmp_path, "qcow2", "64M")
    for path, tool in ((ours, "strata"), (theirs, "qemu")):
        io("qemu", path, "write -P 3 40M 1M")
        snap(tool, "-c", "s", path)
        shrink = (strata if tool == "strata" else qemu_img)("resize", "--shrink", str(path), "32M")
        assert shrink.returncode == 0, shrink.stderr
        assert_clean(path)
        snap(tool, "-a", "s", path)
        assert_clean(path)
        assert_pattern(path, 3, 40 << 20, 1 << 20)
    assert qemu_img("compare", str(ours), str(theirs)).returncode == 0
