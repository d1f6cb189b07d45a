"""strata img create -f qcow2 and strata img check against QEMU's qemu-img.

Images strata creates must pass `qemu-img check` and look to `qemu-img info` exactly like the
images qemu-img creates with the same options; `strata img check` must agree with `qemu-img check`
(exit code, JSON, and the per-cluster messages on stderr) on clean, leaking and corrupt images.
"""

import json
import os
import shutil
import struct
import subprocess

import pytest

STRATA = os.environ.get("STRATA_BIN", "strata")
pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io not installed",
)


def run(*args, cwd=None):
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, timeout=120)


def strata(*args, cwd=None):
    return run(STRATA, "img", *args, cwd=cwd)


def qemu_img(*args, cwd=None):
    return run("qemu-img", *args, cwd=cwd)


def qemu_io(path, *commands):
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    result = run(*args, path)
    assert result.returncode == 0, result.stderr
    return result


def info_json(path):
    result = qemu_img("info", "--output=json", path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)

    def strip(node):
        node.pop("filename", None)
        node.pop("actual-size", None)
        for child in node.get("children", []):
            strip(child["info"])

    strip(info)
    return info


def assert_checks_agree(path, *extra, cwd=None):
    """strata img check and qemu-img check: same exit code, JSON and stderr messages."""
    for output in ("json", "human"):
        ours = strata("check", f"--output={output}", *extra, path, cwd=cwd)
        theirs = qemu_img("check", f"--output={output}", *extra, path, cwd=cwd)
        assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
        assert ours.stdout == theirs.stdout
        assert ours.stderr.replace("strata img:", "qemu-img:") == theirs.stderr
    return theirs.returncode


class Image:
    """Just enough of a qcow2 parser to poke refcounts and table entries."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(112)
        (self.version,) = struct.unpack(">I", head[4:8])
        (self.cluster_bits,) = struct.unpack(">I", head[20:24])
        (self.l1_size,) = struct.unpack(">I", head[36:40])
        (self.l1_offset, self.reftable_offset) = struct.unpack(">QQ", head[40:56])
        self.refcount_order = struct.unpack(">I", head[96:100])[0] if self.version >= 3 else 4
        self.cluster_size = 1 << self.cluster_bits

    def read64(self, offset):
        with open(self.path, "rb") as f:
            f.seek(offset)
            return struct.unpack(">Q", f.read(8))[0]

    def write64(self, offset, value):
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(struct.pack(">Q", value))

    def refcount_location(self, cluster):
        entries = self.cluster_size * 8 >> self.refcount_order
        block = self.read64(self.reftable_offset + 8 * (cluster // entries))
        assert block != 0
        return block, cluster % entries

    def set_refcount(self, cluster, value):
        block, index = self.refcount_location(cluster)
        bits = 1 << self.refcount_order
        with open(self.path, "r+b") as f:
            if bits < 8:
                per_byte = 8 // bits
                f.seek(block + index // per_byte)
                byte = f.read(1)[0]
                shift = (index % per_byte) * bits
                mask = ((1 << bits) - 1) << shift
                byte = (byte & ~mask) | ((value << shift) & mask)
                f.seek(block + index // per_byte)
                f.write(bytes([byte]))
            else:
                f.seek(block + index * bits // 8)
                f.write(value.to_bytes(bits // 8, "big"))

    def l2_offset(self, index=0):
        return self.read64(self.l1_offset + 8 * index) & 0x00FFFFFFFFFFFE00


CREATE_MATRIX = [
    [],
    ["-o", "cluster_size=512"],
    ["-o", "cluster_size=512,refcount_bits=64"],
    ["-o", "cluster_size=2M"],
    ["-o", "compat=0.10"],
    ["-o", "compat=v2,preallocation=metadata"],
    ["-o", "refcount_bits=1"],
    ["-o", "refcount_bits=64,lazy_refcounts=on"],
    ["-o", "extended_l2=on"],
    ["-o", "extended_l2=on,cluster_size=16k,preallocation=metadata"],
    ["-o", "compression_type=zstd"],
    ["-o", "preallocation=metadata"],
    ["-o", "preallocation=falloc,cluster_size=4k"],
    ["-o", "preallocation=full"],
]


@pytest.mark.parametrize("options", CREATE_MATRIX, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("size", ["0", "1000", "64M", "1G"])
def test_create_matches_qemu(tmp_path, options, size):
    if size == "1G" and any("full" in o or "metadata" in o for o in options):
        size = "100M"  # keep preallocated test images small
    if size == "0" and any("falloc" in o or "full" in o for o in options):
        pytest.skip("QEMU sizes an empty falloc/full image from qcow2_calc_prealloc_size")
    ours = strata("create", "-f", "qcow2", *options, str(tmp_path / "s.qcow2"), size)
    theirs = qemu_img("create", "-f", "qcow2", *options, str(tmp_path / "q.qcow2"), size)
    assert ours.returncode == 0, ours.stderr
    assert theirs.returncode == 0, theirs.stderr
    assert ours.stdout.replace("s.qcow2", "q.qcow2") == theirs.stdout
    assert qemu_img("check", str(tmp_path / "s.qcow2")).returncode == 0
    assert info_json(str(tmp_path / "s.qcow2")) == info_json(str(tmp_path / "q.qcow2"))
    assert assert_checks_agree(str(tmp_path / "s.qcow2")) == 0
    # The image is usable: QEMU writes to it, and both checkers still agree.
    if size != "0":
        qemu_io(str(tmp_path / "s.qcow2"), "write -P 0x5a 0 512")
        assert assert_checks_agree(str(tmp_path / "s.qcow2")) == 0


def test_create_header_cluster_is_qemus(tmp_path):
    (tmp_path / "base.qcow2").write_bytes(b"")
    assert qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "10M").returncode == 0
    for options in (
        ["-b", "base.qcow2", "-F", "qcow2"],
        ["-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2"],
        ["-o", "compression_type=zstd,lazy_refcounts=on", "-b", "base.qcow2", "-F", "qcow2"],
        ["-o", "extended_l2=on", "-b", "base.qcow2", "-F", "qcow2", "5M"],
    ):
        ours = strata("create", "-f", "qcow2", *options[:-1] if options[-1] == "5M" else options,
                      "s.qcow2", *(["5M"] if options[-1] == "5M" else []), cwd=tmp_path)
        theirs = qemu_img("create", "-f", "qcow2",
                          *options[:-1] if options[-1] == "5M" else options, "q.qcow2",
                          *(["5M"] if options[-1] == "5M" else []), cwd=tmp_path)
        assert ours.returncode == 0, ours.stderr
        assert theirs.returncode == 0, theirs.stderr
        assert ours.stdout.replace("s.qcow2", "q.qcow2") == theirs.stdout
        # Every byte QEMU wrote is the same (header, extensions, tables).
        assert (tmp_path / "s.qcow2").read_bytes() == (tmp_path / "q.qcow2").read_bytes()


def test_create_backing_size_default_and_data_file(tmp_path):
    assert qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "b.qcow2"), "7M").returncode == 0
    result = strata("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "s.qcow2",
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = info_json(str(tmp_path / "s.qcow2"))
    assert info["virtual-size"] == 7 * 1024 * 1024
    assert info["backing-filename-format"] == "qcow2"
    for options in ("data_file=d1.raw", "data_file=d2.raw,data_file_raw=on"):
        ours = strata("create", "-q", "-f", "qcow2", "-o", options, "s2.qcow2", "1M", cwd=tmp_path)
        assert ours.returncode == 0, ours.stderr
        assert qemu_img("check", "s2.qcow2", cwd=tmp_path).returncode == 0
        theirs = qemu_img("create", "-q", "-f", "qcow2", "-o", options.replace("=d", "=e"),
                          "q2.qcow2", "1M", cwd=tmp_path)
        assert theirs.returncode == 0
        ours_bytes = (tmp_path / "s2.qcow2").read_bytes()
        assert ours_bytes.replace(b"d1.raw", b"e1.raw").replace(b"d2.raw", b"e2.raw") == (
            tmp_path / "q2.qcow2").read_bytes()
        assert assert_checks_agree("s2.qcow2", cwd=tmp_path) == 0


@pytest.mark.parametrize(
    "args",
    [
        ["-o", "cluster_size=1000"],
        ["-o", "cluster_size=4M"],
        ["-o", "refcount_bits=3"],
        ["-o", "refcount_bits=128"],
        ["-o", "compat=0.10,refcount_bits=8"],
        ["-o", "compat=0.10,lazy_refcounts=on"],
        ["-o", "compat=0.10,compression_type=zstd"],
        ["-o", "compat=0.10,extended_l2=on"],
        ["-o", "extended_l2=on,cluster_size=4k"],
        ["-o", "preallocation=bogus"],
        ["-o", "compat=2"],
        ["-o", "compression_type=lz4"],
        ["-o", "foo=1"],
        ["-o", "lazy_refcounts=maybe"],
        ["-o", "data_file_raw=on"],
        ["-o", "backing_fmt=raw"],
        ["-o", "size=3M"],
    ],
    ids=lambda a: a[-1],
)
def test_create_errors_match_qemu(tmp_path, args):
    ours = strata("create", "-f", "qcow2", *args, "x.qcow2", "1M", cwd=tmp_path)
    theirs = qemu_img("create", "-f", "qcow2", *args, "x.qcow2", "1M", cwd=tmp_path)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stdout == theirs.stdout
    assert ours.stderr.replace("strata img:", "qemu-img:") == theirs.stderr


def test_create_backing_errors_match_qemu(tmp_path):
    assert qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "b.qcow2"), "1M").returncode == 0
    for args in (
        ["-b", "b.qcow2", "x.qcow2"],
        ["-b", "b.qcow2", "-F", "qcow2", "-o", "preallocation=metadata", "x.qcow2"],
        ["-u", "-b", "nonexist", "-F", "qcow2", "x.qcow2"],
        ["x.qcow2"],
    ):
        ours = strata("create", "-f", "qcow2", *args, cwd=tmp_path)
        theirs = qemu_img("create", "-f", "qcow2", *args, cwd=tmp_path)
        assert ours.returncode == theirs.returncode == 1, args
        assert ours.stdout == theirs.stdout
        assert ours.stderr.replace("strata img:", "qemu-img:") == theirs.stderr
    # -u with a size: the backing file is not opened.
    ours = strata("create", "-q", "-f", "qcow2", "-u", "-b", "nonexist", "-F", "qcow2",
                  "x.qcow2", "1M", cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr


def qemu_image(tmp_path, *options, size="64M"):
    path = str(tmp_path / "t.qcow2")
    assert qemu_img("create", "-q", "-f", "qcow2", *options, path, size).returncode == 0
    return path


@pytest.mark.parametrize(
    "options",
    [[], ["-o", "compat=0.10"], ["-o", "refcount_bits=1"], ["-o", "refcount_bits=64"],
     ["-o", "cluster_size=512"], ["-o", "extended_l2=on"], ["-o", "compression_type=zstd"]],
    ids=lambda o: ",".join(o) or "default",
)
def test_check_agrees_on_written_images(tmp_path, options):
    path = qemu_image(tmp_path, *options)
    assert assert_checks_agree(path) == 0
    qemu_io(path, "write -P 1 0 1M", "write -c -P 2 4M 64k", "write -z 8M 64k",
            "write -P 3 20M 4k", "discard 0 64k")
    assert assert_checks_agree(path) == 0
    if "refcount_bits=1" in options:
        return  # a snapshot needs refcounts above 1
    assert qemu_img("snapshot", "-c", "snap1", path).returncode == 0
    qemu_io(path, "write -P 4 0 128k", "write -c -P 5 5M 64k")
    assert qemu_img("snapshot", "-c", "snap2", path).returncode == 0
    qemu_io(path, "write -P 6 20M 4k")
    assert assert_checks_agree(path) == 0


def test_check_leak(tmp_path):
    path = qemu_image(tmp_path)
    qemu_io(path, "write 0 64k")
    image = Image(path)
    data = image.read64(image.l2_offset()) & 0x00FFFFFFFFFFFE00
    image.set_refcount(data // image.cluster_size, 2)  # refcount 2, one reference
    # OFLAG_COPIED no longer matches either: qemu-img reports that as an error.
    assert assert_checks_agree(path) == 2
    path2 = qemu_image(tmp_path, "-o", "cluster_size=4k")
    image = Image(path2)
    # An unreferenced cluster with refcount 1 past the last one in use: a pure leak.
    size = os.path.getsize(path2)
    with open(path2, "r+b") as f:
        f.truncate(size + 2 * image.cluster_size)
    image.set_refcount(size // image.cluster_size + 1, 1)
    assert assert_checks_agree(path2) == 3


@pytest.mark.parametrize("options", [[], ["-o", "refcount_bits=1"], ["-o", "refcount_bits=64"],
                                     ["-o", "compat=0.10"]],
                         ids=lambda o: ",".join(o) or "default")
def test_check_refcount_too_low(tmp_path, options):
    path = qemu_image(tmp_path, *options)
    qemu_io(path, "write 0 128k")
    image = Image(path)
    data = image.read64(image.l2_offset()) & 0x00FFFFFFFFFFFE00
    image.set_refcount(data // image.cluster_size, 0)
    assert assert_checks_agree(path) == 2


def test_check_l2_entry_outside_image(tmp_path):
    path = qemu_image(tmp_path)
    qemu_io(path, "write 0 64k")
    image = Image(path)
    image.write64(image.l2_offset() + 8, (1 << 40) | (1 << 63))
    assert assert_checks_agree(path) == 2


def test_check_oflag_copied_mismatch(tmp_path):
    path = qemu_image(tmp_path)
    qemu_io(path, "write 0 64k")
    image = Image(path)
    entry = image.read64(image.l2_offset())
    image.write64(image.l2_offset(), entry & ~(1 << 63))
    assert assert_checks_agree(path) == 2
    l1_entry = image.read64(image.l1_offset)
    image.write64(image.l1_offset, l1_entry & ~(1 << 63))
    assert assert_checks_agree(path) == 2


def test_check_unaligned_and_reserved_entries(tmp_path):
    path = qemu_image(tmp_path)
    qemu_io(path, "write 0 128k")
    image = Image(path)
    entry = image.read64(image.l2_offset())
    image.write64(image.l2_offset(), entry + 512)  # unaligned data cluster
    image.write64(image.l2_offset() + 8, image.read64(image.l2_offset() + 8) | 2)  # reserved bit
    assert assert_checks_agree(path) == 2


def test_check_lazy_refcounts_dirty(tmp_path):
    path = qemu_image(tmp_path, "-o", "lazy_refcounts=on")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 512", "-c", "sigraise 9", path)
    assert assert_checks_agree(path) == 2


def test_check_raw_and_repair(tmp_path):
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\0" * 65536)
    for extra in ([], ["-f", "raw"]):
        ours = strata("check", *extra, str(raw))
        theirs = qemu_img("check", *extra, str(raw))
        assert ours.returncode == theirs.returncode == 63
        assert ours.stderr == "strata img: This image format does not support checks\n"
    path = qemu_image(tmp_path)
    assert assert_checks_agree(path, "-r", "leaks") == 0  # nothing to repair
    result = strata("check", "-r", "bogus", path)
    assert result.returncode == 1
    assert "--repair (-r) expects 'leaks' or 'all' not 'bogus'" in result.stderr
