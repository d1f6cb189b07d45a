"""Hostile qcow2 images (hostile_qcow2.CASES): strata must refuse them with qemu-img's error text
(or open them when qemu-img does), and never crash, whatever it is asked to do with them.
"""

import json
import os
import shutil

import pytest

from hostile_qcow2 import CASES, make
from test_img_qcow2 import qemu_img, run, STRATA, strata

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")

SANITIZER_MARKERS = ("AddressSanitizer", "runtime error:", "LeakSanitizer")


def assert_no_crash(result):
    assert result.returncode >= 0, result.stderr
    for marker in SANITIZER_MARKERS:
        assert marker not in result.stderr


# Names that QEMU would open as protocols (json:, nbd:). strata opens stored names only as plain
# local files, so it fails where `qemu-img info` (which skips the backing file) succeeds.
PROTOCOL_NAMES = {
    "backing-json": 'json:{"driver":"nbd","server":{"type":"inet","host":"x","port":"1"}}',
    "backing-nbd": "nbd:localhost:10809",
    "data-file-json": 'json:{"driver":"nbd","server":{"type":"inet","host":"x","port":"1"}}',
}


@pytest.mark.parametrize("case", sorted(set(CASES) - set(PROTOCOL_NAMES)))
def test_open_error_matches_qemu_img(tmp_path, case):
    path = make(str(tmp_path), case)
    ours = strata("info", "-f", "qcow2", "--output=json", path)
    theirs = qemu_img("info", "-f", "qcow2", "--output=json", path)
    assert_no_crash(ours)
    assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
    if theirs.returncode != 0:
        expected = theirs.stderr
        # strata's errors carry no hints (QEMU's error_append_hint): the line is left out.
        expected = expected.replace(
            "You can force-remove this extra metadata with qemu-img check -r all\n", "")
        assert ours.stderr.replace("strata img:", "qemu-img:") == expected
    else:
        mine = json.loads(ours.stdout)
        reference = json.loads(theirs.stdout)
        for key in ("virtual-size", "cluster-size", "backing-filename"):
            assert mine.get(key) == reference.get(key), key


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_crash_on_check_map_and_read(tmp_path, case):
    path = make(str(tmp_path), case)
    for args in (["check", path], ["map", "--output=json", "-f", "qcow2", path]):
        assert_no_crash(strata(*args))
    assert_no_crash(run(STRATA, "io", "-r", "-f", "qcow2", "-c", "read 0 64k", path))
    # Protocol-looking backing and data-file names are never opened as protocols.
    info = strata("info", "--backing-chain", path)
    assert_no_crash(info)
    assert "Failed to connect" not in info.stderr


@pytest.mark.parametrize("case", sorted(PROTOCOL_NAMES))
def test_protocol_looking_names_are_plain_files(tmp_path, case):
    path = make(str(tmp_path), case)
    ours = run(STRATA, "io", "-r", "-f", "qcow2", "-c", "read 0 512", path)
    assert_no_crash(ours)
    assert ours.returncode == 1
    name = PROTOCOL_NAMES[case]
    prefix = ""
    if case.startswith("backing"):
        # A backing file name is relative to the image's directory.
        prefix = "Could not open backing file: "
        name = os.path.join(str(tmp_path), name)
    assert ours.stderr == (f"strata io: can't open device {path}: {prefix}"
                           f"Could not open '{name}': No such file or directory\n")
    if case == "data-file-json":  # QEMU opens a stored data file name as a plain file too
        theirs = run("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", path)
        assert ours.stderr.replace("strata io:", "qemu-io:") == theirs.stderr
