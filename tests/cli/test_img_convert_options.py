"""strata img convert's less common options against qemu-img on the same inputs: --bitmaps
(with --skip-broken-bitmaps), several source images, -l (internal snapshots), -C (copy
offloading), -r (rate limit) and --salvage.

Outputs are compared with qemu-img's (raw outputs byte for byte, qcow2 outputs with qemu-img
compare, check and the bitmap list / dirty extents), errors by text and exit code (strata's
messages say "strata img" where qemu-img's say "qemu-img").

Run: STRATA_BIN=build/strata /usr/bin/python3 -m pytest -q tests/cli/test_img_convert_options.py
"""

import filecmp
import json
import os
import shutil
from pathlib import Path

import pytest

from img_tools import ok, qemu_img, qemu_io, run, strata_bin, strata_img

from test_img_bitmap import dirty_map, set_bitmap_flags

QEMU_TOOLS = ("qemu-img", "qemu-io", "qemu-storage-daemon", "nbdinfo")

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in QEMU_TOOLS),
    reason="qemu-img, qemu-io, qemu-storage-daemon or nbdinfo not installed",
)


def as_qemu(text):
    return text.replace("strata img", "qemu-img")


def assert_same_failure(*args):
    """The same convert fails the same way in both tools (targets q.out / s.out)."""
    q = qemu_img("convert", *args, "q.out")
    s = strata_img("convert", *args, "s.out")
    assert as_qemu(s.stderr) == q.stderr
    assert s.returncode == q.returncode == 1
    return s


def convert_both(*args, fmt):
    """Runs the same convert into q.<fmt> (qemu-img) and s.<fmt> (strata); both must succeed
    with the same stdout and stderr."""
    q = qemu_img("convert", *args, "q." + fmt)
    s = strata_img("convert", *args, "s." + fmt)
    assert q.returncode == 0, q.stderr
    assert s.returncode == 0, s.stderr
    assert s.stdout == q.stdout
    assert as_qemu(s.stderr) == q.stderr
    return s


def assert_same_raw_outputs():
    assert filecmp.cmp("q.raw", "s.raw", shallow=False)


def assert_same_qcow2_outputs():
    ok(qemu_img("check", "s.qcow2"))
    ok(qemu_img("compare", "-f", "qcow2", "-F", "qcow2", "q.qcow2", "s.qcow2"))


def bitmaps_of(path):
    info = json.loads(ok(qemu_img("info", "--output=json", path)).stdout)
    return info["format-specific"]["data"].get("bitmaps")


@pytest.fixture
def workdir(tmp_path):
    os.chdir(tmp_path)
    return tmp_path


# ---- --bitmaps ----

@pytest.fixture
def with_bitmaps(workdir):
    """8 MiB qcow2 with three persistent bitmaps: enabled, disabled with 128k granularity, and
    one added after the writes (clean)."""
    ok(qemu_img("create", "-q", "-f", "qcow2", "src.qcow2", "8M"))
    ok(qemu_img("bitmap", "--add", "src.qcow2", "first"))
    ok(qemu_img("bitmap", "--add", "-g", "128k", "--disable", "src.qcow2", "frozen"))
    qemu_io("qcow2", "src.qcow2", "write -P 1 0 64k", "write -P 2 3M 4k", "write -z 5M 256k")
    ok(qemu_img("bitmap", "--enable", "src.qcow2", "frozen"))
    qemu_io("qcow2", "src.qcow2", "write -P 3 7M 512")
    ok(qemu_img("bitmap", "--disable", "src.qcow2", "frozen"))
    ok(qemu_img("bitmap", "--add", "src.qcow2", "clean"))
    return "src.qcow2"


def test_bitmaps_are_copied_like_qemu_img(with_bitmaps, tmp_path):
    convert_both("--bitmaps", "-O", "qcow2", with_bitmaps, fmt="qcow2")
    assert_same_qcow2_outputs()
    assert bitmaps_of("s.qcow2") == bitmaps_of("q.qcow2")
    assert [b["name"] for b in bitmaps_of("s.qcow2")] == ["first", "frozen", "clean"]
    for name in ("first", "frozen", "clean"):
        assert dirty_map("s.qcow2", name, tmp_path) == dirty_map("q.qcow2", name, tmp_path)
    assert dirty_map("s.qcow2", "first", tmp_path) != []


def test_bitmaps_are_copied_into_an_existing_target(with_bitmaps, tmp_path):
    for name in ("q.qcow2", "s.qcow2"):
        ok(qemu_img("create", "-q", "-f", "qcow2", name, "8M"))
    convert_both("--bitmaps", "-n", "-O", "qcow2", with_bitmaps, fmt="qcow2")
    assert bitmaps_of("s.qcow2") == bitmaps_of("q.qcow2")
    assert dirty_map("s.qcow2", "frozen", tmp_path) == dirty_map("q.qcow2", "frozen", tmp_path)
    # A second copy finds the names taken.
    q = qemu_img("convert", "--bitmaps", "-n", "-O", "qcow2", with_bitmaps, "q.qcow2")
    s = strata_img("convert", "--bitmaps", "-n", "-O", "qcow2", with_bitmaps, "s.qcow2")
    assert as_qemu(s.stderr) == q.stderr
    assert s.returncode == q.returncode == 1
    assert bitmaps_of("s.qcow2") == bitmaps_of("q.qcow2")


def test_bitmap_errors_match_qemu_img(with_bitmaps):
    ok(qemu_img("create", "-q", "-f", "raw", "plain.raw", "1M"))
    assert_same_failure("--skip-broken-bitmaps", "-O", "qcow2", with_bitmaps)
    assert_same_failure("--bitmaps", "-O", "qcow2", "plain.raw")
    assert_same_failure("--bitmaps", "-O", "qcow2", with_bitmaps, "plain.raw")
    assert_same_failure("--bitmaps", "-O", "raw", with_bitmaps)
    assert_same_failure("--bitmaps", "-O", "qcow2", "-o", "compat=0.10", with_bitmaps)
    ok(qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1M"))
    assert_same_failure("--bitmaps", "-O", "qcow2", "v2.qcow2")


def test_inconsistent_bitmaps_fail_or_are_skipped_like_qemu_img(with_bitmaps, tmp_path):
    set_bitmap_flags(with_bitmaps, 0, flags=3)  # in-use | auto: left by a crashed writer
    s = assert_same_failure("--bitmaps", "-O", "qcow2", with_bitmaps)
    assert "Cannot copy inconsistent bitmap 'first'" in s.stderr
    convert_both("--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", with_bitmaps, fmt="qcow2")
    assert bitmaps_of("s.qcow2") == bitmaps_of("q.qcow2")
    assert [b["name"] for b in bitmaps_of("s.qcow2")] == ["frozen", "clean"]
    assert dirty_map("s.qcow2", "frozen", tmp_path) == dirty_map("q.qcow2", "frozen", tmp_path)
    # -q silences nothing here: the warning is qemu-img's warn_report.
    convert_both("-q", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", with_bitmaps,
                 fmt="qcow2")


# ---- several sources ----

@pytest.fixture
def three_sources(workdir):
    ok(qemu_img("create", "-q", "-f", "raw", "a.raw", "1M"))
    qemu_io("raw", "a.raw", "write -P 1 0 64k", "write -P 2 1020k 4k")
    ok(qemu_img("create", "-q", "-f", "qcow2", "b.qcow2", "3M"))
    qemu_io("qcow2", "b.qcow2", "write -P 3 4k 8k", "write -z 1M 1M", "write -P 4 2M 1M")
    ok(qemu_img("create", "-q", "-f", "raw", "c.raw", "1536k"))
    qemu_io("raw", "c.raw", "write -P 5 512k 1M")
    return ["a.raw", "b.qcow2", "c.raw"]


@pytest.mark.parametrize("options", [[], ["-m", "1"], ["-W"], ["-S", "0"]])
def test_several_sources_are_concatenated_to_raw(three_sources, options):
    convert_both("-O", "raw", *options, *three_sources, fmt="raw")
    assert_same_raw_outputs()
    assert os.path.getsize("s.raw") == (1 + 3 + 1.5) * 2**20


@pytest.mark.parametrize("options", [[], ["-c"], ["-o", "cluster_size=4k"]])
def test_several_sources_are_concatenated_to_qcow2(three_sources, options):
    convert_both("-O", "qcow2", *options, *three_sources, fmt="qcow2")
    assert_same_qcow2_outputs()


def test_several_sources_with_a_backing_file_fail_like_qemu_img(three_sources):
    ok(qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "6M"))
    assert_same_failure("-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", *three_sources)


# ---- -l: internal snapshots ----

@pytest.fixture
def with_snapshots(workdir):
    """snap1 holds pattern 7 in the first 64k; the active image pattern 8 and a larger size."""
    ok(qemu_img("create", "-q", "-f", "qcow2", "snaps.qcow2", "2M"))
    qemu_io("qcow2", "snaps.qcow2", "write -P 7 0 64k", "write -P 6 1M 64k")
    ok(qemu_img("snapshot", "-c", "snap1", "snaps.qcow2"))
    qemu_io("qcow2", "snaps.qcow2", "write -P 8 0 64k", "discard 1M 64k")
    ok(qemu_img("resize", "-q", "snaps.qcow2", "3M"))
    ok(qemu_img("snapshot", "-c", "snap2", "snaps.qcow2"))
    qemu_io("qcow2", "snaps.qcow2", "write -P 9 2M 64k")
    return "snaps.qcow2"


@pytest.mark.parametrize("param", ["snap1", "1", "snap2", "snapshot.id=1", "snapshot.name=snap2",
                                   "snapshot.id=2,snapshot.name=snap2"])
def test_snapshot_is_converted_like_qemu_img(with_snapshots, param):
    convert_both("-l", param, "-O", "raw", with_snapshots, fmt="raw")
    assert_same_raw_outputs()
    convert_both("-l", param, "-O", "qcow2", with_snapshots, fmt="qcow2")
    assert_same_qcow2_outputs()


def test_snapshot_content_is_the_snapshots(with_snapshots):
    ok(strata_img("convert", "-l", "snap1", "-O", "raw", with_snapshots, "s.raw"))
    data = Path("s.raw").read_bytes()
    assert data[:65536] == b"\x07" * 65536
    assert data[2**20:2**20 + 65536] == b"\x06" * 65536
    assert data[2 * 2**20:] == bytes(2**20)


@pytest.mark.parametrize("param", ["snap9", "snapshot.id=1,snapshot.name=snap2",
                                   "snapshot.foo=1", "snapshot.name="])
def test_snapshot_errors_match_qemu_img(with_snapshots, param):
    assert_same_failure("-l", param, "-O", "raw", with_snapshots)


def test_snapshot_of_raw_and_of_several_sources_fail_like_qemu_img(with_snapshots):
    ok(qemu_img("create", "-q", "-f", "raw", "plain.raw", "1M"))
    assert_same_failure("-l", "snap1", "plain.raw")
    assert_same_failure("-l", "snap1", with_snapshots, "plain.raw")
    assert_same_failure("-l", "snapshot.id=1", "plain.raw", with_snapshots)
    convert_both("-l", "snapshot.id=1", with_snapshots, "plain.raw", fmt="raw")
    assert_same_raw_outputs()


def test_snapshot_source_is_left_unchanged(with_snapshots):
    before = Path(with_snapshots).read_bytes()
    ok(strata_img("convert", "-l", "snap2", "-O", "qcow2", with_snapshots, "s.qcow2"))
    assert Path(with_snapshots).read_bytes() == before


# ---- -C: copy offloading ----

@pytest.fixture
def raw_source(workdir):
    ok(qemu_img("create", "-q", "-f", "raw", "src.raw", "6M"))
    qemu_io("raw", "src.raw", "write -P 1 0 1M", "write -P 2 3M 2M", "write -P 3 6143k 1k")
    return "src.raw"


def test_copy_offloading_raw_to_raw_matches_qemu_img(raw_source):
    convert_both("-C", "-O", "raw", raw_source, fmt="raw")
    assert_same_raw_outputs()


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_copy_offloading_uses_copy_file_range(raw_source):
    os.environ["ASAN_OPTIONS"] = "detect_leaks=0"  # LeakSanitizer cannot run under ptrace
    traced = run("strace", "-f", "-e", "trace=copy_file_range", "-o", "trace.txt",
                 strata_bin(), "img", "convert", "-C", "-O", "raw", raw_source, "s.raw")
    ok(traced)
    calls = [line for line in Path("trace.txt").read_text().splitlines()
             if "copy_file_range(" in line and "= -1" not in line]
    assert calls, "no successful copy_file_range call"
    plain = run("strace", "-f", "-e", "trace=copy_file_range", "-o", "plain.txt",
                strata_bin(), "img", "convert", "-O", "raw", raw_source, "p.raw")
    ok(plain)
    assert "copy_file_range(" not in Path("plain.txt").read_text()
    assert filecmp.cmp("s.raw", "p.raw", shallow=False)


def test_copy_offloading_falls_back_where_it_cannot_offload(raw_source, three_sources):
    convert_both("-C", "-O", "qcow2", raw_source, fmt="qcow2")
    assert_same_qcow2_outputs()
    convert_both("-C", "-O", "raw", *three_sources, fmt="raw")
    assert_same_raw_outputs()


@pytest.mark.parametrize("options", [["-C", "-c"], ["-C", "-S", "4k"], ["-C", "--salvage"]])
def test_copy_offloading_conflicts_match_qemu_img(raw_source, options):
    assert_same_failure("-O", "qcow2", *options, raw_source)


# ---- -r: rate limit ----

@pytest.mark.parametrize("rate", ["abc", "-5", "1x"])
def test_rate_limit_errors_match_qemu_img(raw_source, rate):
    assert_same_failure("-r", rate, raw_source)


@pytest.mark.parametrize("rate", ["0", "64M", "1G"])
def test_rate_limited_convert_matches_qemu_img(raw_source, rate):
    convert_both("-r", rate, "-O", "raw", raw_source, fmt="raw")
    assert_same_raw_outputs()
    convert_both("-r", rate, "-O", "qcow2", raw_source, fmt="qcow2")
    assert_same_qcow2_outputs()


# ---- --salvage ----

def failing_reads(path, *sectors):
    """--image-opts for raw over blkdebug that fails reads touching `sectors`."""
    spec = f"driver=raw,file.driver=blkdebug,file.image.driver=file,file.image.filename={path}"
    for i, sector in enumerate(sectors):
        spec += (f",file.inject-error.{i}.event=none,file.inject-error.{i}.sector={sector}"
                 f",file.inject-error.{i}.iotype=read")
    return spec


@pytest.mark.parametrize("options", [[], ["-m", "1"], ["-q"]])
def test_salvage_turns_unreadable_sectors_into_zeroes_like_qemu_img(raw_source, options):
    spec = failing_reads(raw_source, 130, 8000, 6143 * 2 + 1)
    # Without --salvage both fail (qemu-img reports every coroutine's error, strata the first).
    q = qemu_img("convert", "-O", "raw", "--image-opts", spec, "q.out")
    s = strata_img("convert", "-O", "raw", "--image-opts", spec, "s.out")
    assert s.returncode == q.returncode == 1
    assert as_qemu(s.stderr).splitlines()[0] in q.stderr.splitlines()
    convert_both("--salvage", *options, "-O", "raw", "--image-opts", spec, fmt="raw")
    assert_same_raw_outputs()
    data = Path("s.raw").read_bytes()
    assert data[130 * 512:131 * 512] == bytes(512)
    assert data[129 * 512:130 * 512] == b"\x01" * 512
    convert_both("--salvage", *options, "-O", "qcow2", "--image-opts", spec, fmt="qcow2")
    assert_same_qcow2_outputs()
