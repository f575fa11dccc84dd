"""`metac block attach` through the kernel's NBD client (``NBD_SET_SOCK``, ``NBD_DO_IT``).

Runs only in the QEMU guest (see tests/guest/conftest.py): the host kernel has no nbd.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest
from fs_support import (
    assert_direct_write_fails,
    attachments,
    eventually,
    our_loops,
    read_only_ext4_export,
    settle_without_leaks,
)

from metac.fs import kernel
from metac.testing.nodes import NodeHost, snapshot

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

MiB = 1 << 20


def attach_nbd(b: NodeHost, ref: str, *args: str) -> str:
    device = b.metac("block", "attach", *args, ref).stdout.strip().splitlines()[-1]
    assert device.startswith("/dev/nbd"), device
    (listed,) = attachments(b)
    assert listed["method"] == "nbd" and listed["device"] == device, listed
    assert os.path.exists(f"/sys/block/{os.path.basename(device)}/pid"), "not connected"
    return device


def nbd_free(device: str) -> bool:
    """The kernel has let go of the device (no NBD_DO_IT thread, size 0)."""
    name = os.path.basename(device)
    size = Path(f"/sys/block/{name}/size").read_text().strip()
    return not os.path.exists(f"/sys/block/{name}/pid") and size == "0"


def test_nbd_attach_mkfs_mount_write_read_detach(pair) -> None:
    a, b, export, mnt = pair
    image = export / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    ref = a.metac("block", "export", f"local:{image}").stdout.strip()
    before = snapshot(a, b)

    device = attach_nbd(b, ref)
    assert int(Path(f"/sys/block/{os.path.basename(device)}/size").read_text()) * 512 == 64 * MiB
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, timeout=300)
    b.metac("block", "detach", device)
    assert attachments(b) == []
    eventually(lambda: nbd_free(device), 15, f"{device} to be released")

    out = attach_nbd(b, ref, "--mount", str(mnt))
    assert kernel.top_mount(str(mnt)).source == out
    payload = os.urandom(3 * MiB)
    (mnt / "data.bin").write_bytes(payload)
    (mnt / "dir").mkdir()
    b.metac("block", "detach", str(mnt))
    assert not (mnt / "data.bin").exists() and kernel.mounts_at(str(mnt)) == []

    # Attached again (maybe as another device), the data is there.
    again = attach_nbd(b, ref, "--mount", str(mnt))
    assert (mnt / "data.bin").read_bytes() == payload
    assert (mnt / "dir").is_dir()
    b.metac("block", "detach", str(mnt))
    assert attachments(b) == []
    eventually(lambda: nbd_free(again), 15, f"{again} to be released")
    settle_without_leaks(before, a, b)
    assert not our_loops(a, b)  # the kernel NBD path uses no loop device
    # The data is in A's image: the ext4 superblock magic at 1024 + 56.
    with open(image, "rb") as f:
        f.seek(1024 + 56)
        assert f.read(2) == b"\x53\xef"


def test_nbd_read_only_export_refuses_writes(pair) -> None:
    a, b, export, mnt = pair
    image, digest, ro_ref = read_only_ext4_export(a, export, 32 * MiB)

    device = attach_nbd(b, ro_ref)
    assert attachments(b)[0]["read_only"] is True
    name = os.path.basename(device)
    assert Path(f"/sys/block/{name}/ro").read_text().strip() == "1"
    assert_direct_write_fails(device)
    # Reads work.
    with open(device, "rb") as f:
        f.seek(1024 + 56)
        assert f.read(2) == b"\x53\xef"
    b.metac("block", "detach", device)

    attach_nbd(b, ro_ref, "--mount", str(mnt))
    assert sorted(os.listdir(mnt)) == ["lost+found"]
    with pytest.raises(OSError):
        (mnt / "x").write_text("no")
    b.metac("block", "detach", str(mnt))
    time.sleep(0.5)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest
