"""`strata img` and `strata io` with http URLs as filenames and as stored backing file names,
compared with qemu-img and qemu-io against the same lighttpd origin.

Run: STRATA_BIN=build/strata /usr/bin/python3 -m pytest -q tests/cli/test_img_http.py
"""

import json
import os
import sys

import pytest

from img_tools import ok, qemu_img, run, strata_bin, strata_img

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "interop"))
from test_http_origin import HttpOrigin  # noqa: E402

MiB = 1 << 20


@pytest.fixture
def origin(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    raw = root / "disk.raw"
    raw.write_bytes(os.urandom(3 * MiB + 1000))  # not a multiple of 512: the tail reads as zeroes
    ok(qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(root / "disk.qcow2")))
    server = HttpOrigin(str(root), str(tmp_path))
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("name", ["disk.raw", "disk.qcow2"])
def test_info_matches_qemu_img(origin, name):
    url = origin.url(name)
    ours = json.loads(ok(strata_img("info", "--output=json", url)).stdout)
    theirs = json.loads(ok(qemu_img("info", "--output=json", url)).stdout)
    for key in ("virtual-size", "filename", "format", "cluster-size"):
        assert ours.get(key) == theirs.get(key), key
    assert ours["children"][0]["info"]["format"] == "http"


def test_convert_and_compare_from_an_http_origin(origin, tmp_path):
    out = tmp_path / "out.qcow2"
    ok(strata_img("convert", "-O", "qcow2", origin.url("disk.qcow2"), str(out)))
    r = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(out), origin.url("disk.raw"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = strata_img("compare", origin.url("disk.qcow2"), origin.url("disk.raw"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_overlay_with_an_http_backing_file(origin, tmp_path):
    top = tmp_path / "top.qcow2"
    ok(strata_img("create", "-q", "-f", "qcow2", "-b", origin.url("disk.raw"), "-F", "raw",
                  str(top)))
    ours = json.loads(ok(strata_img("info", "--output=json", str(top))).stdout)
    theirs = json.loads(ok(qemu_img("info", "--output=json", str(top))).stdout)
    for key in ("virtual-size", "backing-filename", "full-backing-filename"):
        assert ours[key] == theirs[key], key
    assert ours["full-backing-filename"] == origin.url("disk.raw")
    # Reads through the overlay come from the origin; its tail up to 512 reads as zeroes.
    r = run(strata_bin(), "io", "-r", "-c", "read -P 0 %d 24" % (3 * MiB + 1000), str(top))
    assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
    r = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(top), origin.url("disk.raw"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_missing_file_error_matches_qemu_img(origin):
    url = origin.url("missing.raw")
    ours = strata_img("info", url)
    theirs = qemu_img("info", url)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.replace("strata img:", "qemu-img:") == theirs.stderr
