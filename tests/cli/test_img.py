"""`strata img` against qemu-img: info, map, compare, convert and create on the same inputs must
print the same text (with strata's program name), exit with the same status and write the same
images.

Run: STRATA_BIN=build/strata /usr/bin/python3 -m pytest -q tests/cli/test_img.py
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")

pytestmark = pytest.mark.skipif(QEMU_IO is None or QEMU_IMG is None,
                                reason="qemu-io/qemu-img are not installed (Debian package qemu-utils)")


def strata_bin():
    path = Path(os.environ.get("STRATA_BIN", "build/strata"))
    if not path.is_absolute():
        path = REPO / path
    if not path.exists():
        pytest.fail(f"strata binary not found at {path}; build it or set STRATA_BIN")
    return str(path)


def qemu_img(*args, check=False):
    return subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True,
                          check=check, timeout=120)


def strata_img(*args):
    return subprocess.run([strata_bin(), "img", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def assert_same(*args):
    q = qemu_img(*args)
    s = strata_img(*args)
    assert s.stdout == q.stdout
    assert s.stderr == q.stderr.replace("qemu-img: ", "strata img: ")
    assert s.returncode == q.returncode
    return s


def make_raw(path, size, writes=()):
    qemu_img("create", "-q", "-f", "raw", path, size, check=True)
    for command in writes:
        subprocess.run([QEMU_IO, "-f", "raw", "-c", command, str(path)], check=True,
                       capture_output=True)
    return path


@pytest.fixture
def sparse_raw(tmp_path):
    return make_raw(tmp_path / "a.raw", "4M", ["write -P 1 0 64k", "write -P 2 1M 4k",
                                                "write -z 2M 64k", "write -P 3 3146240 512"])


def test_info_human_and_json(sparse_raw):
    os.chdir(sparse_raw.parent)
    for args in (["info", "a.raw"], ["info", "-f", "raw", "--output=json", "a.raw"],
                 ["info", "--output=json", "--backing-chain", "a.raw"],
                 ["info", "-U", "--backing-chain", "a.raw"]):
        assert_same(*args)


def test_info_errors(tmp_path):
    os.chdir(tmp_path)
    s = assert_same("info", "missing.raw")
    assert s.returncode == 1
    assert "strata img: Could not open 'missing.raw'" in s.stderr


def test_map_human_and_json(sparse_raw):
    os.chdir(sparse_raw.parent)
    assert_same("map", "a.raw")
    s = assert_same("map", "-f", "raw", "--output=json", "a.raw")
    assert '"present": true' in s.stdout


def test_compare(tmp_path):
    os.chdir(tmp_path)
    make_raw(tmp_path / "a.raw", "2M", ["write -P 1 0 64k", "write -P 2 1M 4k"])
    shutil.copy(tmp_path / "a.raw", tmp_path / "same.raw")
    make_raw(tmp_path / "b.raw", "2M", ["write -P 1 0 64k", "write -P 2 1M 4k", "write -P 9 1000 1"])
    make_raw(tmp_path / "big.raw", "3M", ["write -P 1 0 64k", "write -P 2 1M 4k"])
    make_raw(tmp_path / "bigger.raw", "3M", ["write -P 1 0 64k", "write -P 2 1M 4k",
                                             "write -P 3 2500k 1"])
    make_raw(tmp_path / "empty.raw", "2M")
    assert assert_same("compare", "a.raw", "same.raw").returncode == 0
    assert assert_same("compare", "-f", "raw", "-F", "raw", "a.raw", "b.raw").returncode == 1
    assert assert_same("compare", "a.raw", "big.raw").returncode == 0
    assert assert_same("compare", "a.raw", "bigger.raw").returncode == 1
    assert assert_same("compare", "-s", "a.raw", "big.raw").returncode == 1
    assert assert_same("compare", "a.raw", "empty.raw").returncode == 1
    assert assert_same("compare", "-s", "empty.raw", "empty.raw").returncode == 0
    assert assert_same("compare", "-q", "a.raw", "b.raw").returncode == 1
    assert assert_same("compare", "a.raw", "missing.raw").returncode == 2


@pytest.mark.parametrize("options", [[], ["-m", "1"], ["-m", "16", "-W"], ["-S", "0"],
                                     ["-S", "64k"], ["-S", "512"]])
def test_convert_raw_matches_qemu_img(sparse_raw, options):
    os.chdir(sparse_raw.parent)
    q = qemu_img("convert", *options, "-f", "raw", "-O", "raw", "a.raw", "q.raw")
    s = strata_img("convert", *options, "-f", "raw", "-O", "raw", "a.raw", "s.raw")
    assert (s.returncode, s.stdout, s.stderr) == (q.returncode, q.stdout, q.stderr) == (0, "", "")
    assert Path("s.raw").read_bytes() == Path("q.raw").read_bytes()
    # Same holes: the map of both outputs is the same.
    assert qemu_img("map", "--output=json", "s.raw").stdout == \
        qemu_img("map", "--output=json", "q.raw").stdout


def test_convert_existing_target_and_progress(sparse_raw):
    os.chdir(sparse_raw.parent)
    make_raw(sparse_raw.parent / "t.raw", "4M", ["write -P 7 0 4M"])
    s = strata_img("convert", "-n", "-p", "-O", "raw", "a.raw", "t.raw")
    assert s.returncode == 0, s.stderr
    assert s.stdout.rstrip().endswith("(100.00/100%)")
    assert qemu_img("compare", "a.raw", "t.raw").returncode == 0


def test_convert_errors(tmp_path):
    os.chdir(tmp_path)
    assert_same("convert", "-O", "raw", "missing.raw", "x.raw")
    make_raw(tmp_path / "a.raw", "1M")
    assert_same("convert", "-n", "-O", "raw", "a.raw", "missing2.raw")


def test_create(tmp_path):
    os.chdir(tmp_path)
    for args in (["create", "-f", "raw", "X.raw", "1.5M"],
                 ["create", "-f", "raw", "-o", "preallocation=falloc", "X.raw", "1M"],
                 ["create", "-f", "raw", "-o", "preallocation=full", "X.raw", "64k"],
                 ["create", "-o", "size=4k", "X.raw"],
                 ["create", "X.raw", "4k"]):
        q = qemu_img(*[a.replace("X", "q") for a in args])
        s = strata_img(*[a.replace("X", "s") for a in args])
        assert s.stdout.replace("s.raw", "q.raw") == q.stdout
        assert s.returncode == q.returncode == 0
        assert Path("s.raw").read_bytes() == Path("q.raw").read_bytes()
        assert Path("s.raw").stat().st_blocks == Path("q.raw").stat().st_blocks
    for args in (["create", "-f", "raw", "-o", "preallocation=metadata", "m.raw", "1M"],
                 ["create", "-f", "raw", "n.raw"], ["create", "-f", "raw", "o.raw", "1x"]):
        assert_same(*args)


def strata_has_qcow2(tmp_path):
    image = tmp_path / "probe.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M", check=True)
    s = strata_img("info", image)
    return s.returncode == 0 and "file format: qcow2" in s.stdout


def test_qcow2_info_map_convert(tmp_path):
    if not strata_has_qcow2(tmp_path):
        pytest.skip("strata has no qcow2 driver yet (strata img info of a qcow2 image fails)")
    os.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "raw", "base.raw", "4M", check=True)
    subprocess.run([QEMU_IO, "-f", "raw", "-c", "write -P 4 0 4M", "base.raw"], check=True,
                   capture_output=True)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2", "4M",
             check=True)
    subprocess.run([QEMU_IO, "-c", "write -P 5 64k 128k", "-c", "write -z 1M 64k",
                    "-c", "discard 2M 64k", "top.qcow2"], check=True, capture_output=True)
    qemu_img("create", "-q", "-f", "qcow2", "plain.qcow2", "4M", check=True)
    subprocess.run([QEMU_IO, "-c", "write -P 6 128k 64k", "plain.qcow2"], check=True,
                   capture_output=True)
    for image in ("top.qcow2", "plain.qcow2"):
        assert_same("info", image)
        assert_same("info", "--output=json", image)
        assert_same("map", "--output=json", image)
        assert_same("map", image)
        q = qemu_img("convert", "-O", "raw", image, "q.raw")
        s = strata_img("convert", "-O", "raw", image, "s.raw")
        assert s.returncode == q.returncode == 0, s.stderr
        assert Path("s.raw").read_bytes() == Path("q.raw").read_bytes()
        assert assert_same("compare", image, "q.raw").returncode == 0
    assert_same("info", "--backing-chain", "top.qcow2")


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_map_reports_compressed_clusters(tmp_path, compression):
    os.chdir(tmp_path)
    make_raw("src.raw", "4M", ["write -P 0x11 0 1M", "write -P 0 2M 1M"])
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression}", "src.raw",
             "c.qcow2", check=True)
    assert '"compressed": true' in assert_same("map", "--output=json", "c.qcow2").stdout
    # The human format cannot show clusters without a host offset.
    assert assert_same("map", "c.qcow2").returncode == 1
