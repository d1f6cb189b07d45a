"""strata img amend against qemu-img amend on twin images: same exit code and messages, and the
same result (qemu-img info, compare, map) with qemu-img check clean."""

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


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def info(path):
    data = json.loads(ok(run("qemu-img", "info", "--output=json", path)).stdout)
    data.pop("filename")
    data.pop("actual-size")
    data["children"][0]["info"].pop("filename")
    data["children"][0]["info"].pop("actual-size")
    data["children"][0]["info"].pop("virtual-size")  # file length may differ
    return data


def allocation(path):
    entries = json.loads(ok(run("qemu-img", "map", "--output=json", path)).stdout)
    return [(e["start"], e["length"], e["data"], e["zero"]) for e in entries]


def make(path, create_options, with_backing, tmp_path):
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if create_options:
        args += ["-o", create_options]
    if with_backing:
        base = str(tmp_path / "base.qcow2")
        if not os.path.exists(base):
            ok(run("qemu-img", "create", "-q", "-f", "qcow2", base, "8M"))
            ok(run("qemu-io", "-f", "qcow2", "-c", "write -P 6 0 8M", base))
        args += ["-b", base, "-F", "qcow2"]
    ok(run(*args, path, "8M"))
    version3 = "compat=0.10" not in (create_options or "")
    commands = ["write -P 1 64k 128k", "write -P 2 1M 4k"]
    if version3:
        commands += ["write -z 0 64k", "write -z 1M 64k", "write -z 3M 256k"]
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    ok(run(*args, path))


CASES = {
    "downgrade": ("", False, "compat=0.10"),
    "downgrade-over-backing": ("", True, "compat=0.10"),
    "downgrade-lazy": ("lazy_refcounts=on", False, "compat=0.10"),
    "upgrade": ("compat=0.10", False, "compat=1.1"),
    "upgrade-v3-name": ("compat=0.10", False, "compat=v3"),
    "lazy-on": ("", False, "lazy_refcounts=on"),
    "lazy-off": ("lazy_refcounts=on", False, "lazy_refcounts=off"),
    "lazy-on-v2": ("compat=0.10", False, "lazy_refcounts=on"),
    "lazy-bad-value": ("", False, "lazy_refcounts=maybe"),
    "upgrade-and-lazy": ("compat=0.10", False, "compat=1.1,lazy_refcounts=on"),
    "same-refcount-bits": ("", False, "refcount_bits=16"),
    "bad-refcount-bits": ("", False, "refcount_bits=12"),
    "refcount-bits-v2": ("compat=0.10", False, "refcount_bits=8"),
    "downgrade-refcount-8": ("refcount_bits=8", False, "compat=0.10"),
    "refcount-bits-1": ("", False, "refcount_bits=1"),
    "refcount-bits-64-small-clusters": ("cluster_size=4k", False, "refcount_bits=64"),
    "refcount-bits-64-to-2": ("refcount_bits=64", True, "refcount_bits=2"),
    "upgrade-and-refcount-bits": ("compat=0.10", False, "compat=1.1,refcount_bits=4"),
    "refcount-bits-and-downgrade": ("refcount_bits=8", False, "compat=0.10,refcount_bits=16"),
    "unknown-compat": ("", False, "compat=2"),
    "creation-only": ("", False, "cluster_size=4k"),
    "unknown-option": ("", False, "foo=bar"),
    "backing": ("", False, "backing_file=x.qcow2"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_amend_matches_qemu_img(tmp_path, name):
    create_options, with_backing, amend = CASES[name]
    ours = str(tmp_path / "ours.qcow2")
    theirs = str(tmp_path / "theirs.qcow2")
    make(ours, create_options, with_backing, tmp_path)
    make(theirs, create_options, with_backing, tmp_path)
    before = str(tmp_path / "before.raw")
    ok(run("qemu-img", "convert", "-O", "raw", theirs, before))
    mine = run(STRATA, "img", "amend", "-o", amend, ours)
    reference = run("qemu-img", "amend", "-o", amend, theirs)
    assert mine.returncode == reference.returncode
    assert mine.stderr.replace("strata img", "qemu-img") == reference.stderr
    assert info(ours) == info(theirs)
    assert allocation(ours) == allocation(theirs)
    assert ok(run("qemu-img", "check", ours)).returncode == 0
    ok(run("qemu-img", "compare", "-F", "raw", ours, before))


def test_amend_argument_errors_match_qemu_img(tmp_path):
    path = str(tmp_path / "a.qcow2")
    ok(run("qemu-img", "create", "-q", "-f", "qcow2", path, "1M"))
    raw = str(tmp_path / "a.raw")
    ok(run("qemu-img", "create", "-q", "-f", "raw", raw, "1M"))
    for args in ([path], ["-o", "compat=1.1"], ["-o", "compat=1.1", path, path],
                 ["-f", "raw", "-o", "size=1M", raw]):
        mine = run(STRATA, "img", "amend", *args)
        reference = run("qemu-img", "amend", *args)
        assert mine.returncode == reference.returncode
        assert mine.stderr.replace("strata img", "qemu-img") == reference.stderr


def test_refcount_width_too_small_for_a_snapshot(tmp_path):
    # A cluster shared with an internal snapshot has refcount 2: 1-bit refcounts cannot hold it,
    # and the image stays as it was.
    paths = [str(tmp_path / name) for name in ("ours.qcow2", "theirs.qcow2")]
    for path in paths:
        ok(run("qemu-img", "create", "-q", "-f", "qcow2", path, "4M"))
        ok(run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", path))
        ok(run("qemu-img", "snapshot", "-c", "snap", path))
    mine = run(STRATA, "img", "amend", "-o", "refcount_bits=1", paths[0])
    reference = run("qemu-img", "amend", "-o", "refcount_bits=1", paths[1])
    assert mine.returncode == reference.returncode == 1
    assert mine.stderr.replace("strata img", "qemu-img") == reference.stderr
    for path in paths:
        assert info(path)["format-specific"]["data"]["refcount-bits"] == 16
    ok(run("qemu-img", "check", paths[0]))
    # Widening keeps the snapshot intact.
    ok(run(STRATA, "img", "amend", "-o", "refcount_bits=64", paths[0]))
    ok(run("qemu-img", "check", paths[0]))
    ok(run("qemu-img", "snapshot", "-a", "snap", paths[0]))
    ok(run("qemu-io", "-f", "qcow2", "-c", "read -P 1 0 1M", paths[0]))
