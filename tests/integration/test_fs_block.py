"""`metac block export/attach/detach` and `metac file export/cat/put` across two namespaced nodes."""

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
    node_pair,
    our_loops,
    read_only_ext4_export,
)

from metac.testing.nodes import assert_no_leaks, metac_argv, snapshot

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

MiB = 1 << 20


@pytest.fixture
def pair(nodes_factory, tmp_path: Path):
    with node_pair(nodes_factory, tmp_path) as (a, b, export):
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        yield a, b, export, mnt


def test_block_attach_mkfs_mount_write_read_detach(pair) -> None:
    a, b, export, mnt = pair
    image = export / "disk.img"
    with open(image, "wb") as f:
        f.truncate(128 * MiB)
    ref = a.metac("block", "export", f"local:{image}").stdout.strip()
    before = snapshot(a, b)

    device = b.metac("block", "attach", ref).stdout.strip()
    assert device.startswith("/dev/")
    assert our_loops(b) == {device} or device.startswith("/dev/nbd")
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, timeout=120)
    (listed,) = attachments(b)
    assert listed["device"] == device and listed["state"] == "attached"
    b.metac("block", "detach", device)
    assert attachments(b) == []

    out = b.metac("block", "attach", "--mount", str(mnt), ref).stdout.strip()
    assert out.startswith("/dev/")
    payload = os.urandom(3 * MiB)
    (mnt / "data.bin").write_bytes(payload)
    (mnt / "dir").mkdir()
    b.metac("block", "detach", str(mnt))
    assert not (mnt / "data.bin").exists()

    # Attached again (maybe as another device), the data is there.
    b.metac("block", "attach", "--mount", str(mnt), ref)
    assert (mnt / "data.bin").read_bytes() == payload
    assert (mnt / "dir").is_dir()
    b.metac("block", "detach", str(mnt))
    deadline = time.monotonic() + 15
    while True:
        try:
            assert_no_leaks(before, snapshot(a, b))
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert not our_loops(b)


def test_read_only_block_export_refuses_writes(pair) -> None:
    a, b, export, mnt = pair
    image, digest, ro_ref = read_only_ext4_export(a, export, 64 * MiB)

    device = b.metac("block", "attach", ro_ref).stdout.strip()
    assert attachments(b)[0]["read_only"] is True
    assert_direct_write_fails(device)
    b.metac("block", "detach", device)

    b.metac("block", "attach", "--mount", str(mnt), ro_ref)
    assert sorted(os.listdir(mnt)) == ["lost+found"]
    with pytest.raises(OSError):
        (mnt / "x").write_text("no")
    b.metac("block", "detach", str(mnt))
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest


def test_block_export_refuses_what_is_not_an_image(pair) -> None:
    # (Symlinks are refused too, see tests/rpc/test_fs_exports.py; the CLI resolves the
    # symlinks of a local: path you type before asking the node.)
    a, _, export, _ = pair
    (export / "dir").mkdir()
    os.mkfifo(export / "fifo")
    # A directory is InvalidArgument with a hint (exit 2), a FIFO FailedPrecondition (6),
    # a missing path NotFound (3).
    for name, code in (("dir", 2), ("fifo", 6), ("missing", 3)):
        proc = a.metac("block", "export", f"local:{export}/{name}", check=False)
        assert proc.returncode == code, proc.stderr
        assert proc.stderr.startswith("metac: ") and len(proc.stderr.splitlines()) == 1
    assert "use metac fs export" in a.metac("block", "export", f"local:{export}/dir",
                                            check=False).stderr


def test_file_export_cat_put(pair) -> None:
    a, b, export, _ = pair
    data = os.urandom(5 * MiB + 123)
    (export / "f.bin").write_bytes(data)
    ref = a.metac("file", "export", f"local:{export}/f.bin").stdout.strip()
    out = b.host.run([*metac_argv(), "file", "cat", ref], env=b.cli_env(), timeout=60,
                     text=False, check=False)
    assert out.returncode == 0 and out.stdout == data

    new_ref = a.metac("file", "export", f"local:{export}/new.txt").stdout.strip()
    b.metac("file", "put", new_ref, input="line 1\n")
    b.metac("file", "put", "--append", new_ref, input="line 2\n")
    assert (export / "new.txt").read_text() == "line 1\nline 2\n"
    assert os.stat(export / "new.txt").st_mode & 0o777 == 0o644
    assert b.metac("file", "cat", new_ref).stdout == "line 1\nline 2\n"

    ro_ref = a.metac("file", "export", "--read-only", f"local:{export}/new.txt").stdout.strip()
    refused = b.metac("file", "put", ro_ref, input="x", check=False)
    assert refused.returncode == 5 and "read-only" in refused.stderr
    missing = a.metac("file", "export", f"local:{export}/missing").stdout.strip()
    gone = b.metac("file", "cat", missing, check=False)
    assert gone.returncode == 3
    assert (export / "new.txt").read_text() == "line 1\nline 2\n"

