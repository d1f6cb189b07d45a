"""qcow2's discard-no-unref option: guest discards and unmapping write-zeroes keep the host
clusters allocated (reading as zeroes) instead of freeing them. The same commands run through
qemu-io and strata io on twin images must give the same allocation map, the same content, the
same disk usage (the kept clusters' data is still discarded in the file) and a clean check."""

import json
import os
import shutil

import pytest

from img_tools import ok, run, strata_bin

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io not installed",
)

COMMANDS = [
    "discard 0 128k",
    "write -z -u 256k 128k",
    "write -z 512k 64k",
    "write -z -u 640k 32k",
    "discard 768k 64k",
]


def make_twin(path, create_options):
    options = create_options.replace("DATA", str(path) + ".data")
    ok(run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, path, "1M"))
    ok(run("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1M", path))


def apply(tool, path, no_unref):
    args = [tool] if tool == "qemu-io" else [strata_bin(), "io"]
    for command in COMMANDS:
        args += ["-c", command]
    opts = f"driver=qcow2,file.filename={path},discard=unmap,discard-no-unref={no_unref}"
    ok(run(*args, "--image-opts", opts))


def allocated_kib(path):
    return os.stat(path).st_blocks // 2


@pytest.mark.parametrize("create_options", ["compat=1.1", "extended_l2=on",
                                            "data_file=DATA,data_file_raw=on"])
@pytest.mark.parametrize("no_unref", ["on", "off"])
def test_matches_qemu_io(tmp_path, create_options, no_unref):
    theirs, ours = tmp_path / "qemu.qcow2", tmp_path / "strata.qcow2"
    make_twin(theirs, create_options)
    make_twin(ours, create_options)
    apply("qemu-io", theirs, no_unref)
    apply("strata", ours, no_unref)

    def layout(path):
        entries = json.loads(ok(run("qemu-img", "map", "--output=json", path)).stdout)
        return [(e["start"], e["length"], e["zero"], e["data"], "offset" in e) for e in entries]

    assert layout(ours) == layout(theirs)
    ok(run("qemu-img", "compare", theirs, ours))
    ok(run("qemu-img", "check", ours))
    assert allocated_kib(ours) == allocated_kib(theirs)
    if create_options.startswith("data_file"):
        assert allocated_kib(str(ours) + ".data") == allocated_kib(str(theirs) + ".data")


def test_kept_clusters_stay_allocated_and_are_reused(tmp_path):
    image = tmp_path / "image.qcow2"
    make_twin(image, "compat=1.1")
    apply("strata", image, "on")
    size_before = os.path.getsize(image)
    # Writing over the discarded range reuses the kept clusters: the file does not grow.
    ok(run(strata_bin(), "io", "-c", "write -P 9 0 1M", "--image-opts",
           f"driver=qcow2,file.filename={image},discard=unmap,discard-no-unref=on"))
    assert os.path.getsize(image) == size_before
    ok(run("qemu-io", "-f", "qcow2", "-c", "read -P 9 0 1M", image))
    ok(run("qemu-img", "check", image))


def test_snapshot_keeps_its_data(tmp_path):
    # A cluster shared with an internal snapshot keeps its data in the file: the snapshot still
    # reads the old contents after the active layer discards it.
    image = tmp_path / "image.qcow2"
    make_twin(image, "compat=1.1")
    ok(run("qemu-img", "snapshot", "-c", "snap", image))
    apply("strata", image, "on")
    ok(run("qemu-img", "check", image))
    ok(run("qemu-io", "-f", "qcow2", "-c", "read -P 0 0 128k", image))
    ok(run("qemu-img", "snapshot", "-a", "snap", image))
    ok(run("qemu-io", "-f", "qcow2", "-c", "read -P 7 0 1M", image))


def test_refused_on_version_2(tmp_path):
    image = tmp_path / "v2.qcow2"
    ok(run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", image, "1M"))
    result = run(strata_bin(), "io", "-c", "discard 0 64k", "--image-opts",
                 f"driver=qcow2,file.filename={image},discard-no-unref=on")
    assert result.returncode != 0
    assert "discard-no-unref is only supported since qcow2 version 3" in result.stderr
