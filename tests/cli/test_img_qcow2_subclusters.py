"""qcow2 images with extended L2 entries and with external data files, written by strata.

The same random workload (writes, write-zeroes with and without unmap, discards) goes through
`strata io` into one image and through `qemu-io` into a twin that qemu-img created identically.
Both must pass `qemu-img check` cleanly, `qemu-img compare` equal to each other and to a raw
reference, and `qemu-img map` must show the same allocation (host offsets aside). `strata img
check` must agree with `qemu-img check` on them, and `strata img amend` of data_file,
data_file_raw and size must do what `qemu-img amend` does.
"""

import json
import os
import random
import shutil
import subprocess

import pytest

STRATA = os.environ.get("STRATA_BIN", "strata")
pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io not installed",
)

DISK = 4 << 20


def run(*args, cwd=None):
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, timeout=300)


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def workload(seed, cluster, zero_align, count):
    """qemu-io commands and the raw reference changes they make: (command, offset, len, byte)."""
    rng = random.Random(seed)
    ops = []
    for _ in range(count):
        pick = rng.randrange(10)
        if pick < 6:
            length = 1 + rng.randrange(3 * cluster)
            offset = rng.randrange(DISK - length)
            pattern = 1 + rng.randrange(250)
            ops.append((f"write -q -P {pattern} {offset} {length}", offset, length, pattern))
        elif pick < 8:
            units = DISK // zero_align
            n = 1 + rng.randrange(min(units // 4, 3 * cluster // zero_align + 1))
            first = rng.randrange(units - n)
            unmap = " -u" if pick == 7 else ""
            ops.append((f"write -q -z{unmap} {first * zero_align} {n * zero_align}",
                        first * zero_align, n * zero_align, 0))
        else:
            n = 1 + rng.randrange(3)
            first = rng.randrange(DISK // cluster - n)
            ops.append((f"discard -q {first * cluster} {n * cluster}", first * cluster,
                        n * cluster, 0))
    return ops


def apply_ops(tool, image, ops, cwd):
    # strata io passes discards down by default; qemu-io needs discard=unmap.
    argv = [STRATA, "io", "-f", "qcow2"] if tool == "strata" else ["qemu-io", "-f", "qcow2",
                                                                    "-d", "unmap"]
    for op in ops:
        argv += ["-c", op[0]]
    ok(run(*argv, image, cwd=cwd))


def reference_after(base, ops):
    data = bytearray(base)
    for _, offset, length, byte in ops:
        data[offset:offset + length] = bytes([byte]) * length
    return bytes(data)


def allocation(path, cwd):
    """qemu-img map without host offsets, adjacent equal extents merged."""
    merged = []
    for extent in json.loads(ok(run("qemu-img", "map", "--output=json", path, cwd=cwd)).stdout):
        extent.pop("offset", None)
        if merged:
            last = merged[-1]
            same = {k: v for k, v in last.items() if k not in ("start", "length")} == \
                {k: v for k, v in extent.items() if k not in ("start", "length")}
            if same and last["start"] + last["length"] == extent["start"]:
                last["length"] += extent["length"]
                continue
        merged.append(extent)
    return merged


def assert_checks_agree(path, cwd):
    for output in ("json", "human"):
        ours = run(STRATA, "img", "check", f"--output={output}", path, cwd=cwd)
        theirs = run("qemu-img", "check", f"--output={output}", path, cwd=cwd)
        assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
        assert ours.stdout == theirs.stdout
        assert ours.stderr.replace("strata img:", "qemu-img:") == theirs.stderr


def make_base(path):
    data = b"".join(bytes([0x80 + (i % 97)]) * 512 for i in range(DISK // 512))
    with open(path, "wb") as f:
        f.write(data)
    return data


LAYOUTS = {
    # name: (create options with {name} for per-image files, cluster size, zero alignment,
    #        backing file)
    "extended_l2_backing": ("cluster_size=65536,extended_l2=on", 65536, 2048, True),
    "extended_l2_32k": ("cluster_size=32768,extended_l2=on", 32768, 1024, False),
    "data_file_backing": ("data_file={name}.data", 65536, 65536, True),
    "data_file_extended_l2": ("data_file={name}.data,extended_l2=on", 65536, 2048, False),
    "data_file_raw": ("data_file={name}.data,data_file_raw=on", 65536, 65536, False),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_workload_matches_qemu(tmp_path, layout):
    options, cluster, zero_align, backing = LAYOUTS[layout]
    base = make_base(tmp_path / "base.raw") if backing else bytes(DISK)
    for name in ("strata", "qemu"):
        args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", options.format(name=name)]
        if backing:
            args += ["-b", "base.raw", "-F", "raw"]
        ok(run(*args, f"{name}.qcow2", str(DISK), cwd=tmp_path))
    ops = workload(sum(map(ord, layout)), cluster, zero_align, 120)
    apply_ops("strata", "strata.qcow2", ops, tmp_path)
    apply_ops("qemu", "qemu.qcow2", ops, tmp_path)
    (tmp_path / "reference.raw").write_bytes(reference_after(base, ops))
    ok(run("qemu-img", "check", "strata.qcow2", cwd=tmp_path))
    ok(run("qemu-img", "compare", "-F", "raw", "strata.qcow2", "reference.raw", cwd=tmp_path))
    ok(run("qemu-img", "compare", "strata.qcow2", "qemu.qcow2", cwd=tmp_path))
    assert allocation("strata.qcow2", tmp_path) == allocation("qemu.qcow2", tmp_path)
    assert_checks_agree("strata.qcow2", tmp_path)
    if "data_file_raw" in options:
        # The data file itself is the guest disk.
        assert (tmp_path / "strata.data").read_bytes() == (tmp_path / "reference.raw").read_bytes()
        info = json.loads(ok(run("qemu-img", "info", "--output=json", "strata.qcow2",
                                 cwd=tmp_path)).stdout)
        assert info["format-specific"]["data"]["data-file-raw"] is True
    # QEMU reads strata's image as strata reads QEMU's.
    ok(run(STRATA, "img", "convert", "-O", "raw", "qemu.qcow2", "qemu-by-strata.raw",
           cwd=tmp_path))
    assert (tmp_path / "qemu-by-strata.raw").read_bytes() == \
        (tmp_path / "reference.raw").read_bytes()


def amend_twins(tmp_path, create_options, amend_options):
    """Runs the same amend on two identical images; returns both results."""
    results = []
    for name in ("strata", "qemu"):
        ok(run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
               create_options.format(name=name), f"{name}.qcow2", "1M", cwd=tmp_path))
        ok(run("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 100k", f"{name}.qcow2",
               cwd=tmp_path))
        tool = [STRATA, "img"] if name == "strata" else ["qemu-img"]
        results.append(run(*tool, "amend", "-o", amend_options.format(name=name),
                           f"{name}.qcow2", cwd=tmp_path))
    return results


def info_of(path, cwd):
    info = json.loads(ok(run("qemu-img", "info", "--output=json", path, cwd=cwd)).stdout)
    for key in ("filename", "actual-size", "children"):
        info.pop(key, None)
    data = info["format-specific"]["data"]
    if "data-file" in data:
        data["data-file"] = data["data-file"].replace("strata", "NAME").replace("qemu", "NAME")
    return info


@pytest.mark.parametrize("create_options,amend_options", [
    ("data_file={name}.data", "data_file={name}.data2"),
    ("data_file={name}.data,data_file_raw=on", "data_file_raw=off"),
    ("data_file={name}.data,data_file_raw=on", "data_file_raw=on"),
    ("data_file={name}.data", "data_file_raw=on"),
    ("cluster_size=65536", "data_file={name}.data"),
    ("data_file={name}.data", "size=3M"),
    ("data_file={name}.data,data_file_raw=on", "size=2M"),
    ("extended_l2=on", "size=3M"),
    ("extended_l2=on", "size=512k"),
])
def test_amend_matches_qemu(tmp_path, create_options, amend_options):
    ours, theirs = amend_twins(tmp_path, create_options, amend_options)
    assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
    assert ours.stderr.replace("strata img:", "qemu-img:") == theirs.stderr
    if theirs.returncode != 0:
        return
    if "data2" in amend_options:
        for name in ("strata", "qemu"):
            os.rename(tmp_path / f"{name}.data", tmp_path / f"{name}.data2")
    assert info_of("strata.qcow2", tmp_path) == info_of("qemu.qcow2", tmp_path)
    ok(run("qemu-img", "check", "strata.qcow2", cwd=tmp_path))
    ok(run("qemu-img", "compare", "strata.qcow2", "qemu.qcow2", cwd=tmp_path))
    assert allocation("strata.qcow2", tmp_path) == allocation("qemu.qcow2", tmp_path)
    if "data_file_raw=on" in create_options and "size=" in amend_options:
        assert os.path.getsize(tmp_path / "strata.data") == os.path.getsize(tmp_path / "qemu.data")


def test_check_and_repair_data_file_leak(tmp_path):
    """A leaked metadata cluster in an image with a data file: strata img check and -r all agree
    with qemu-img's (data clusters are not refcounted, so nothing else is reported)."""
    for name in ("strata", "qemu"):
        ok(run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={name}.data",
               f"{name}.qcow2", "4M", cwd=tmp_path))
        ok(run("qemu-io", "-f", "qcow2", "-c", "write -P 3 0 1M", "-c", "write -P 4 3M 300k",
               f"{name}.qcow2", cwd=tmp_path))
    assert_checks_agree("strata.qcow2", tmp_path)
    # Leak: raise the refcount of the header cluster (16-bit refcounts, first refcount block).
    for name in ("strata", "qemu"):
        path = tmp_path / f"{name}.qcow2"
        with open(path, "r+b") as f:
            f.seek(48)
            reftable = int.from_bytes(f.read(8), "big")
            f.seek(reftable)
            block = int.from_bytes(f.read(8), "big")
            f.seek(block)
            f.write((2).to_bytes(2, "big"))
    assert_checks_agree("strata.qcow2", tmp_path)
    ours = run(STRATA, "img", "check", "-r", "all", "strata.qcow2", cwd=tmp_path)
    theirs = run("qemu-img", "check", "-r", "all", "qemu.qcow2", cwd=tmp_path)
    assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
    assert ours.stdout.replace("strata", "qemu") == theirs.stdout
    ok(run("qemu-img", "check", "strata.qcow2", cwd=tmp_path))


def test_snapshots_refused_with_data_file(tmp_path):
    """Internal snapshots cannot share data clusters that are not refcounted: qemu-img's errors."""
    for name in ("strata", "qemu"):
        ok(run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={name}.data",
               f"{name}.qcow2", "1M", cwd=tmp_path))
    for args in (["-c", "s1"], ["-a", "s1"], ["-l"]):
        ours = run(STRATA, "img", "snapshot", *args, "strata.qcow2", cwd=tmp_path)
        theirs = run("qemu-img", "snapshot", *args, "qemu.qcow2", cwd=tmp_path)
        assert ours.returncode == theirs.returncode, (args, ours.stderr, theirs.stderr)
        assert ours.stderr.replace("strata img:", "qemu-img:") == theirs.stderr
        assert ours.stdout == theirs.stdout
