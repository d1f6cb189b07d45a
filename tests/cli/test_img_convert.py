"""strata img convert to qcow2 (plain, -c zlib/zstd, -B, -n, --target-is-zero, -S 0, -o) and
strata img measure, against qemu-img on the same inputs.

Every qcow2 image strata writes must pass `qemu-img check` (exit 0: no errors, no leaks) and be
identical to the source for `qemu-img compare`; `qemu-img map --output=json` of strata's output
must equal the map of qemu-img's output for the same convert. Errors must match qemu-img's text
and exit code; measure output must be byte-identical.

Run: STRATA_BIN=build/strata /usr/bin/python3 -m pytest -q tests/cli/test_img_convert.py
"""

import json
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
                          check=check, timeout=300)


def strata_img(*args):
    return subprocess.run([strata_bin(), "img", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def qemu_io(fmt, path, *commands):
    args = [QEMU_IO, "-f", fmt]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def assert_same(*args):
    q = qemu_img(*args)
    s = strata_img(*args)
    assert s.stdout == q.stdout
    assert s.stderr == q.stderr.replace("qemu-img: ", "strata img: ")
    assert s.returncode == q.returncode
    return s


def map_json(path, fmt="qcow2"):
    """qemu-img map's extents without host offsets: strata's allocating writes place a new L2
    table after the data clusters it maps, QEMU before them, so data clusters of the two outputs
    sit one cluster apart per L2 table; which guest ranges are data, zero, compressed or left to
    the backing file must be equal (extents that differ only in host offsets are merged)."""
    result = qemu_img("map", "-f", fmt, "--output=json", path, check=True)
    merged = []
    for extent in json.loads(result.stdout):
        extent.pop("offset", None)
        if merged and all(merged[-1][k] == extent[k] for k in extent if k not in ("start", "length")):
            merged[-1]["length"] += extent["length"]
        else:
            merged.append(extent)
    return merged


def assert_valid_copy(image, source, source_fmt):
    check = qemu_img("check", "-f", "qcow2", image)
    assert check.returncode == 0, check.stdout + check.stderr
    compare = qemu_img("compare", "-f", source_fmt, "-F", "qcow2", source, image)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def convert_both(*args, source, fmt="qcow2"):
    """Runs the same convert with qemu-img (to q.qcow2) and strata (to s.qcow2)."""
    q = qemu_img("convert", *args, source, "q." + fmt)
    s = strata_img("convert", *args, source, "s." + fmt)
    assert q.returncode == 0, q.stderr
    assert s.returncode == 0, s.stderr
    assert s.stdout == q.stdout


@pytest.fixture
def workdir(tmp_path):
    os.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def mixed_raw(workdir):
    """8 MiB raw: data, zero blocks written as data, holes, an unaligned tail of data."""
    qemu_img("create", "-q", "-f", "raw", "src.raw", "8M", check=True)
    qemu_io("raw", "src.raw", "write -P 1 0 192k", "write -P 2 1M 4k", "write -z 2M 1M",
            "write -P 3 3M 64k", "write -P 0 3136k 64k", "write -P 4 5M 2M",
            "write -P 5 8380416 512")
    return "src.raw"


@pytest.mark.parametrize("options", [
    [],
    ["-m", "1"],
    ["-m", "16", "-W"],
    ["-S", "0"],
    ["-S", "64k"],
    ["-o", "cluster_size=4k"],
    ["-o", "compat=0.10,refcount_bits=16"],
    ["-o", "cluster_size=2M"],
    ["-o", "preallocation=metadata"],
    ["-t", "writeback", "-T", "none"],
])
def test_raw_to_qcow2_matches_qemu_img(mixed_raw, options):
    convert_both("-f", "raw", "-O", "qcow2", *options, source=mixed_raw)
    assert_valid_copy("s.qcow2", mixed_raw, "raw")
    assert map_json("s.qcow2") == map_json("q.qcow2")
    q_info = json.loads(qemu_img("info", "--output=json", "q.qcow2", check=True).stdout)
    s_info = json.loads(qemu_img("info", "--output=json", "s.qcow2", check=True).stdout)
    for info in (q_info, s_info):
        info.pop("filename")
        info.pop("children")
        info.pop("actual-size")  # depends on the filesystem's allocation
    assert s_info == q_info


@pytest.fixture
def chain(workdir):
    """base.qcow2 <- top.qcow2: data in both layers, a zeroed and a discarded range in top."""
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "8M", check=True)
    qemu_io("qcow2", "base.qcow2", "write -P 7 0 4M", "write -P 8 6M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2",
             check=True)
    qemu_io("qcow2", "top.qcow2", "write -P 9 64k 128k", "write -z 1M 64k", "write -P 10 5M 192k",
            "write -z 6M 64k")
    return "top.qcow2"


def test_qcow2_chain_to_qcow2(chain):
    convert_both("-O", "qcow2", source=chain)
    assert_valid_copy("s.qcow2", chain, "qcow2")
    assert map_json("s.qcow2") == map_json("q.qcow2")


def test_backing_file_option(chain):
    """-B: only what the top layer allocates is copied; the rest stays with the backing file."""
    convert_both("-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", source=chain)
    assert_valid_copy("s.qcow2", chain, "qcow2")
    assert map_json("s.qcow2") == map_json("q.qcow2")
    s_info = json.loads(qemu_img("info", "--output=json", "s.qcow2", check=True).stdout)
    assert s_info["backing-filename"] == "base.qcow2"
    assert s_info["backing-filename-format"] == "qcow2"


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster_size", ["64k", "4k"])
def test_compressed(mixed_raw, compression, cluster_size):
    qemu_io("raw", mixed_raw, "write -P 11 4M 512k")  # compressible enough, next to random data
    subprocess.run(["dd", "if=/dev/urandom", "of=" + mixed_raw, "bs=64k", "count=4", "seek=72",
                    "conv=notrunc"], check=True, capture_output=True)
    options = ["-c", "-O", "qcow2", "-o", f"compression_type={compression},cluster_size={cluster_size}"]
    convert_both("-f", "raw", *options, source=mixed_raw)
    assert_valid_copy("s.qcow2", mixed_raw, "raw")
    s_map = map_json("s.qcow2")
    q_map = map_json("q.qcow2")
    assert any(extent.get("compressed") for extent in s_map)
    assert s_map == q_map


def test_compressed_parallel_out_of_order(mixed_raw):
    """-W with -c: writes complete in any order; the image is still valid and identical."""
    strata = strata_img("convert", "-c", "-W", "-m", "16", "-f", "raw", "-O", "qcow2", mixed_raw,
                        "s.qcow2")
    assert strata.returncode == 0, strata.stderr
    assert_valid_copy("s.qcow2", mixed_raw, "raw")


def evict_from_page_cache(path, every):
    """Drops every other `every`-byte range of `path` from the page cache (after writing it back),
    so that a convert finds part of its source cached and part not."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        size = os.fstat(fd).st_size
        for offset in range(0, size, 2 * every):
            os.posix_fadvise(fd, offset, every, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("options", [[], ["-c"], ["-m", "16", "-W"]])
def test_source_partly_in_page_cache(chain, options):
    """Source data the page cache holds is used in place, the rest is read: a qcow2 chain (data
    in both layers, so in two files) with every other 64 KiB of each file evicted converts to the
    same image as with qemu-img."""
    for path in ("base.qcow2", "top.qcow2"):
        evict_from_page_cache(path, 65536)
    convert_both("-O", "qcow2", *options, source=chain)
    assert_valid_copy("s.qcow2", chain, "qcow2")
    if "-W" not in options:
        assert map_json("s.qcow2") == map_json("q.qcow2")


def test_existing_target(mixed_raw):
    """-n onto a qcow2 image qemu-img created (with stale data), with and without
    --target-is-zero."""
    for extra in ([], ["--target-is-zero"]):
        for name in ("q.qcow2", "s.qcow2"):
            qemu_img("create", "-q", "-f", "qcow2", name, "8M", check=True)
            if not extra:
                qemu_io("qcow2", name, "write -P 0x55 0 8M")
        convert_both("-n", "-f", "raw", "-O", "qcow2", *extra, source=mixed_raw)
        assert_valid_copy("s.qcow2", mixed_raw, "raw")
        assert map_json("s.qcow2") == map_json("q.qcow2")


def test_convert_errors(mixed_raw):
    assert_same("convert", "-c", "-O", "raw", mixed_raw, "x.raw")
    assert_same("convert", "-O", "qcow2", "-o", "foo=1", mixed_raw, "x.qcow2")
    assert_same("convert", "-O", "qcow2", "-o", "cluster_size=3000", mixed_raw, "x.qcow2")
    assert_same("convert", "-O", "qcow2", "-o", "compression_type=foo", mixed_raw, "x.qcow2")
    assert_same("convert", "-O", "qcow2", "-o", "preallocation=bad", mixed_raw, "x.qcow2")
    assert_same("convert", "-O", "vmdkx", mixed_raw, "x.qcow2")
    assert_same("convert", "-O", "qcow2", "missing", "x.qcow2")
    assert_same("convert", "-n", "-O", "qcow2", mixed_raw, "missing.qcow2")
    assert_same("convert", "-B", mixed_raw, "-O", "raw", mixed_raw, "x.raw")
    assert_same("convert", "-B", mixed_raw, "-O", "qcow2", mixed_raw, "x.qcow2")
    assert_same("convert", "--target-is-zero", "-O", "qcow2", mixed_raw, "x.qcow2")
    assert_same("convert", "-m", "17", mixed_raw, "x.raw")
    assert_same("convert", "-m", "x", mixed_raw, "x.raw")
    assert_same("convert", "-S", "100", mixed_raw, "x.raw")
    assert_same("convert", "-t", "bad", mixed_raw, "x.raw")
    assert_same("convert", "-T", "bad", mixed_raw, "x.raw")
    assert_same("convert", mixed_raw)


def test_measure(chain, mixed_raw):
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "3G", check=True)
    cases = [
        ["--size", "1G", "-O", "qcow2"],
        ["--size", "1G"],
        ["--size", "100T", "-O", "qcow2", "-o", "cluster_size=2M"],
        ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=512,refcount_bits=1"],
        ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=on"],
        ["--size", "1G", "-O", "qcow2", "-o", "preallocation=full"],
        ["--size", "1G", "-O", "raw", "-o", "preallocation=full"],
        ["-O", "qcow2", chain],
        ["-O", "qcow2", "-o", "backing_file=x", chain],
        ["-O", "raw", chain],
        ["-O", "qcow2", mixed_raw],
        ["-O", "qcow2", "-o", "cluster_size=4k", "-f", "raw", mixed_raw],
        ["-O", "qcow2", "-o", "compat=0.10", chain],
        ["-O", "qcow2", "v2.qcow2"],
        ["-U", "-O", "qcow2", "base.qcow2"],
        # errors
        ["-O", "qcow2"],
        ["--size", "1G", "-O", "qcow2", mixed_raw],
        ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=3000"],
        ["--size", "x", "-O", "qcow2"],
        ["--size", "1G", "-O", "foo"],
        ["--size", "1G", "-O", "qcow2", "-o", "foo=1"],
        ["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=3"],
        ["--size", "1G", "-O", "qcow2", "-o", "compat=v4"],
        ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=4k"],
        ["--size", "1G", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=8"],
        ["--size", "1G", "-O", "qcow2", "-o", "preallocation=xx"],
        ["--size", "1G", "-O", "raw", "-o", "cluster_size=4k"],
        ["missing.qcow2"],
    ]
    for case in cases:
        for output in ("human", "json"):
            assert_same("measure", f"--output={output}", *case)
    # qemu-img's hint names its own path ("Try '/usr/bin/qemu-img measure --help'...").
    q = qemu_img("measure", "--output=xml", "--size", "1G")
    s = strata_img("measure", "--output=xml", "--size", "1G")
    assert s.returncode == q.returncode == 1
    assert s.stderr.splitlines()[0] == q.stderr.splitlines()[0].replace("qemu-img: ", "strata img: ")
