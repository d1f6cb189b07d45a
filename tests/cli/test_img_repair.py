"""strata img check -r leaks|all against qemu-img check -r on damaged images.

Each damaged image is copied twice; strata repairs one copy and qemu-img the other. Both runs
must print the same (stdout, stderr, exit code), the image strata repaired must then pass
`qemu-img check`, and both repaired images must read the same guest data.
"""

import os
import shutil

import pytest

from test_img_qcow2 import Image, qemu_image, qemu_img, qemu_io, run, strata

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io not installed",
)


def data_cluster(image, index=0):
    return (image.read64(image.l2_offset() + 8 * index) & 0x00FFFFFFFFFFFE00) // image.cluster_size


def damage_leak_past_end(path):
    image = Image(path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size + image.cluster_size)
    image.set_refcount(size // image.cluster_size, 1)


def damage_refcount_too_high(path):
    image = Image(path)
    image.set_refcount(data_cluster(image), 2)


def damage_refcount_zero(path):
    image = Image(path)
    image.set_refcount(data_cluster(image, 1), 0)


def damage_copied_l2(path):
    image = Image(path)
    image.write64(image.l2_offset(), image.read64(image.l2_offset()) & ~(1 << 63))


def damage_copied_l1(path):
    image = Image(path)
    image.write64(image.l1_offset, image.read64(image.l1_offset) & ~(1 << 63))


def damage_refblock_unaligned(path):
    image = Image(path)
    image.write64(image.reftable_offset, image.read64(image.reftable_offset) + 512)


def damage_refcount_table_entry_outside(path):
    image = Image(path)
    # A second refcount table entry pointing far past the end of the file.
    image.write64(image.reftable_offset + 8, os.path.getsize(path) + 16 * image.cluster_size)


def damage_preallocated_unaligned(path):
    image = Image(path)
    qemu_io(path, "write -z 1M 64k")
    # A zero cluster with an (unaligned) host offset: repaired into a plain zero cluster.
    index = (1 << 20) // image.cluster_size
    image.write64(image.l2_offset() + 8 * index, 0x50000 + 512 | 1)


DAMAGES = {
    "leak": damage_leak_past_end,
    "refcount-too-high": damage_refcount_too_high,
    "refcount-zero": damage_refcount_zero,
    "copied-l2": damage_copied_l2,
    "copied-l1": damage_copied_l1,
    "refblock-unaligned": damage_refblock_unaligned,
    "reftable-entry-outside": damage_refcount_table_entry_outside,
    "preallocated-unaligned": damage_preallocated_unaligned,
}

OPTIONS = [[], ["-o", "refcount_bits=1"], ["-o", "refcount_bits=64,cluster_size=4k"],
           ["-o", "compat=0.10"]]


def damaged_pair(tmp_path, options, damage):
    path = qemu_image(tmp_path, *options)
    qemu_io(path, "write -P 1 0 128k", "write -P 2 4M 64k")
    DAMAGES[damage](path)
    ours = str(tmp_path / "ours.qcow2")
    theirs = str(tmp_path / "theirs.qcow2")
    shutil.copy(path, ours)
    shutil.copy(path, theirs)
    return ours, theirs


@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_repair_matches_qemu_img(tmp_path, options, damage, mode, output):
    if damage == "refcount-too-high" and "refcount_bits=1" in options:
        pytest.skip("refcount_bits=1 cannot hold 2")
    if damage == "preallocated-unaligned" and "compat=0.10" in options:
        pytest.skip("version 2 images have no zero flag")
    ours, theirs = damaged_pair(tmp_path, options, damage)
    mine = strata("check", "-r", mode, f"--output={output}", "ours.qcow2", cwd=tmp_path)
    reference = qemu_img("check", "-r", mode, f"--output={output}", "theirs.qcow2",
                         cwd=tmp_path)
    assert mine.returncode == reference.returncode, (mine.stderr, reference.stderr)
    assert mine.stdout.replace("ours.qcow2", "theirs.qcow2") == reference.stdout
    assert mine.stderr.replace("strata img:", "qemu-img:") == reference.stderr
    # What strata left behind is what qemu-img left behind, to qemu-img.
    after_ours = qemu_img("check", "--output=json", ours)
    after_theirs = qemu_img("check", "--output=json", theirs)
    assert after_ours.returncode == after_theirs.returncode, after_ours.stderr
    assert after_ours.stdout.replace("ours", "theirs") == after_theirs.stdout
    if after_theirs.returncode == 0:
        assert qemu_img("compare", ours, theirs).returncode == 0
    # Same algorithm, same allocation order, same discards: the very same bytes.
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()


def test_repair_all_leaves_image_clean(tmp_path):
    # An unaligned refcount block pointer is a fatal corruption to QEMU: it marks the image
    # corrupt and its repair fails (test_repair_matches_qemu_img checks strata does the same).
    for damage in sorted(set(DAMAGES) - {"refblock-unaligned"}):
        ours, _ = damaged_pair(tmp_path, [], damage)
        assert strata("check", "-r", "all", ours).returncode == 0, damage
        assert qemu_img("check", ours).returncode == 0, damage


def test_repair_quiet_and_bad_mode(tmp_path):
    ours, theirs = damaged_pair(tmp_path, [], "refcount-too-high")
    mine = strata("check", "-q", "-r", "leaks", ours)
    reference = qemu_img("check", "-q", "-r", "leaks", theirs)
    assert (mine.returncode, mine.stdout) == (reference.returncode, reference.stdout)
    assert mine.stderr == reference.stderr
    result = strata("check", "-r", "bogus", ours)
    assert result.returncode == 1
    assert "--repair (-r) expects 'leaks' or 'all' not 'bogus'" in result.stderr


def test_repair_clears_dirty_bit(tmp_path):
    path = qemu_image(tmp_path, "-o", "lazy_refcounts=on")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 512", "-c", "sigraise 9", path)
    ours = str(tmp_path / "ours.qcow2")
    theirs = str(tmp_path / "theirs.qcow2")
    shutil.copy(path, ours)
    shutil.copy(path, theirs)
    mine = strata("check", "-r", "all", ours)
    reference = qemu_img("check", "-r", "all", theirs)
    assert (mine.returncode, mine.stdout, mine.stderr) == (
        reference.returncode, reference.stdout.replace("theirs", "ours"), reference.stderr)
    info = qemu_img("info", "--output=json", ours)
    assert '"dirty-flag": false' in info.stdout
    assert qemu_img("check", ours).returncode == 0
