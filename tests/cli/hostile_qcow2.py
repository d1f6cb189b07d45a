"""Hostile qcow2 images: a valid image from `qemu-img create -f qcow2 IMG 1M` (64 KiB clusters:
header, refcount table, refcount block; the L1 table follows the header at 0x30000 for larger
images) with header fields, extensions or tables overwritten. Shared by test_img_hostile.py and
by `python3 tests/cli/hostile_qcow2.py DIR`, which writes the cases into a fuzz corpus.
"""

import os
import shutil
import struct
import subprocess
import sys

CLUSTER = 65536
TABLE_AT = 0x30000  # the appended fourth cluster: snapshot table, bitmap directory...


def snapshot_entry(l1_offset=0, l1_size=0, id_size=1, name_size=1, extra=16):
    header = struct.pack(">QIHHIIQII", l1_offset, l1_size, id_size, name_size, 0, 0, 0, 0, extra)
    return header + b"\0" * min(extra, 2048) + b"1" * min(id_size, 4096) + b"n" * min(name_size, 4096)


def extension(magic, payload):
    padded = payload.ljust((len(payload) + 7) // 8 * 8, b"\0")
    return struct.pack(">II", magic, len(payload)) + padded


def be32(value):
    return struct.pack(">I", value)


def be64(value):
    return struct.pack(">Q", value)


JSON_NBD = b'json:{"driver":"nbd","server":{"type":"inet","host":"x","port":"1"}}'

# name -> ([(offset, bytes)], bytes of the appended cluster or None)
CASES = {
    "cluster-bits-8": ([(20, be32(8))], None),
    "cluster-bits-22": ([(20, be32(22))], None),
    "version-4": ([(4, be32(4))], None),
    "size-huge": ([(24, be64((1 << 63) - 1))], None),
    "crypt-method-3": ([(32, be32(3))], None),
    "l1-size-huge": ([(36, be32(0x7FFFFFFF))], None),
    "l1-offset-unaligned": ([(40, be64(0x30001))], None),
    "l1-offset-past-eof": ([(36, be32(16)), (40, be64(1 << 50))], None),
    "reftable-offset-unaligned": ([(48, be64(0x10200))], None),
    "reftable-clusters-huge": ([(56, be32(0xFFFFFF))], None),
    "reftable-clusters-zero": ([(56, be32(0))], None),
    "unknown-incompatible": ([(72, be64(1 << 20))], None),
    "refcount-order-7": ([(96, be32(7))], None),
    "header-length-small": ([(100, be32(50))], None),
    "header-length-huge": ([(100, be32(0x100000))], None),
    "header-length-unaligned": ([(100, be32(105))], None),
    "backing-name-long": ([(8, be64(0x1000)), (16, be32(2000))], None),
    "backing-offset-past-cluster": ([(8, be64(0x20000)), (16, be32(10))], None),
    "backing-json": ([(8, be64(0x200)), (16, be32(len(JSON_NBD))), (0x200, JSON_NBD)], None),
    "backing-nbd": ([(8, be64(0x200)), (16, be32(19)), (0x200, b"nbd:localhost:10809")],
                    None),
    "extension-length-huge": ([(112, be32(0xE2792ACA) + be32(0x7FFFFFFF))], None),
    "nb-snapshots-huge": ([(60, be32(0x7FFFFFFF)), (64, be64(0x40000))], None),
    "snapshots-offset-unaligned": ([(60, be32(1)), (64, be64(0x40001))], None),
    "snapshot-extra-too-big": ([(60, be32(1)), (64, be64(TABLE_AT))],
                               snapshot_entry(extra=2000)),
    "snapshot-names-past-eof": ([(60, be32(2)), (64, be64(TABLE_AT))],
                                snapshot_entry(id_size=0xFFFF, name_size=0xFFFF)),
    "snapshot-l1-huge": ([(60, be32(1)), (64, be64(TABLE_AT))],
                         snapshot_entry(l1_offset=0x10000, l1_size=0x7FFFFFFF)),
    "bitmaps-count-huge": ([(88, be64(1)),
                            (112, extension(0x23852875, be32(0x7FFFFFFF) + be32(0)
                                            + be64(0x10000) + be64(TABLE_AT)))], None),
    "bitmaps-directory-huge": ([(88, be64(1)),
                                (112, extension(0x23852875, be32(1) + be32(0) + be64(1 << 40)
                                                + be64(TABLE_AT)))], None),
    "data-file-json": ([(72, be64(4)), (112, extension(0x44415441, JSON_NBD))], None),
}


def make(directory, name, base=None):
    """Writes case `name` as DIRECTORY/NAME.qcow2 and returns its path."""
    path = os.path.join(directory, name + ".qcow2")
    if base is None:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "1M"], check=True)
    else:
        shutil.copy(base, path)
    edits, appended = CASES[name]
    with open(path, "r+b") as f:
        for offset, data in edits:
            f.seek(offset)
            f.write(data)
        if appended is not None:
            f.seek(TABLE_AT)
            f.write(appended.ljust(CLUSTER, b"\0"))
    return path


def compact(path, appended):
    """Fuzz seeds stay small: trailing zeroes go (they read back as zeroes past the end), and
    without an appended table only the header cluster is kept."""
    with open(path, "rb") as f:
        data = f.read()
    if appended is None:
        data = data[:CLUSTER]
    return data.rstrip(b"\0")


if __name__ == "__main__":
    target = sys.argv[1]
    for case, (_, appended) in CASES.items():
        made = make(target, case)
        with open(os.path.join(target, "hostile-" + case), "wb") as out:
            out.write(compact(made, appended))
        os.remove(made)
