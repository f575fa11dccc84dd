"""Persistent exports, streams and block attachments across node restarts (issue 4, part 5)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from fs_support import eventually, node_pair

from metac.fs.kernel import loop_devices

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]


@pytest.fixture
def pair(nodes_factory, tmp_path: Path):
    with node_pair(nodes_factory, tmp_path) as (a, b, export):
        yield a, b, export, tmp_path


def test_persistent_exports_survive_a_restart_of_their_node(pair) -> None:
    a, b, export, tmp = pair
    (export / "f.txt").write_text("persisted\n")
    image = export / "disk.img"
    image.write_bytes(b"\1" * (1 << 20))
    fs_ref = a.metac("fs", "export", "--persistent", f"local:{export}").stdout.strip()
    file_ref = a.metac("file", "export", "--persistent", f"local:{export}/f.txt").stdout.strip()
    block_ref = a.metac("block", "export", "--persistent", "--read-only",
                        f"local:{image}").stdout.strip()
    stream_ref = b.metac("fs", "stream", "--persistent", "--protocol", "9p",
                         fs_ref).stdout.strip()
    transient = a.metac("file", "export", f"local:{export}/f.txt").stdout.strip()
    # Re-exporting a ref from another node makes a new ref on the owning node.
    ro_ref = b.metac("fs", "export", "--persistent", "--read-only", fs_ref).stdout.strip()
    assert ro_ref.startswith(f"ref://{a.address}/fs/") and ro_ref != fs_ref

    a.kill9()
    a.start()

    assert b.metac("file", "cat", file_ref).stdout == "persisted\n"
    assert b.metac("file", "cat", transient, check=False).returncode == 3
    mnt = tmp / "mnt"
    mnt.mkdir()
    b.metac("fs", "mount", ro_ref, str(mnt))
    assert (mnt / "f.txt").read_text() == "persisted\n"
    with pytest.raises(OSError):
        (mnt / "g").write_text("read-only")
    b.metac("fs", "umount", str(mnt))
    device = b.metac("block", "attach", block_ref).stdout.strip()
    assert json.loads(b.metac("block", "ls", "--json").stdout)[0]["read_only"] is True
    with open(device, "rb") as f:
        assert f.read(4096) == b"\1" * 4096
    b.metac("block", "detach", device)
    fwd = b.popen("stream", "forward", stream_ref, "127.0.0.1:0")
    try:
        assert fwd.stdout is not None
        port = re.search(r":(\d+)", fwd.stdout.readline()).group(1)
        listing = b.host.run(["diodls", "-s", f"127.0.0.1:{port}", "-a", "/export"], timeout=30)
        assert "f.txt" in listing.stdout.split()
    finally:
        fwd.terminate()
        fwd.wait(10)


def test_persistent_block_attachment_survives_a_restart(pair) -> None:
    a, b, export, tmp = pair
    image = export / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=120)
    ref = a.metac("block", "export", "--persistent", f"local:{image}").stdout.strip()
    mnt = tmp / "mnt"
    mnt.mkdir()
    b.metac("block", "attach", "--persistent", "--mount", str(mnt), ref)
    (mnt / "kept.txt").write_text("kept")
    os.sync()

    b.stop()
    assert not (mnt / "kept.txt").exists()
    assert not [d for d, f in loop_devices().items() if f.startswith(str(b.root))]
    b.start()
    eventually(lambda: (mnt / "kept.txt").exists(), 60, "the attachment to come back")
    assert (mnt / "kept.txt").read_text() == "kept"
    (listed,) = json.loads(b.metac("block", "ls", "--json").stdout)
    assert listed["persistent"] is True and listed["mount"] == str(mnt)

    b.metac("block", "detach", str(mnt))
    b.stop()
    b.start()
    time.sleep(2)
    assert json.loads(b.metac("block", "ls", "--json").stdout) == []
    assert not (mnt / "kept.txt").exists()


def test_a_crash_leaves_nothing_after_the_next_start(pair) -> None:
    a, b, export, tmp = pair
    (export / "f").write_text("x")
    image = export / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=120)
    fs_ref = a.metac("fs", "export", "--persistent", f"local:{export}").stdout.strip()
    block_ref = a.metac("block", "export", f"local:{image}").stdout.strip()
    kept, lost, disk = tmp / "kept", tmp / "lost", tmp / "disk"
    for d in (kept, lost, disk):
        d.mkdir()
    b.metac("fs", "mount", "--persistent", fs_ref, str(kept))
    b.metac("fs", "mount", fs_ref, str(lost))
    b.metac("block", "attach", "--mount", str(disk), block_ref)

    b.kill9()  # sshfs, nbdfuse die with it; their mounts and the loop device stay behind
    eventually(lambda: not b.orphans(), 10, "B's processes to die")
    b.start()
    eventually(lambda: (kept / "f").exists(), 60, "the persistent mount")
    mounted = [m for m in b.mounts() if m.startswith(str(tmp))]
    assert mounted == [str(kept)], mounted  # one mount, no stale ones underneath
    assert [m["path"] for m in json.loads(b.metac("fs", "ls", "--json").stdout)] == [str(kept)]
    assert not [d for d, f in loop_devices().items() if f.startswith(str(b.root))]
    b.metac("fs", "umount", str(kept))
    assert not [m for m in b.mounts() if m.startswith(str(tmp))]


def fs_refs(node, category: str) -> list[dict]:
    return [r for r in json.loads(node.metac("ref", "ls", "--json").stdout)
            if r["service"] == "fs" and r["category"] == category]


def test_revoking_persistent_mounts_with_ref_rm_leaves_nothing_behind(pair) -> None:
    a, b, export, tmp = pair
    (export / "f").write_text("x")
    image = export / "disk.img"
    image.write_bytes(b"\2" * (1 << 20))
    fs_ref = a.metac("fs", "export", "--persistent", f"local:{export}").stdout.strip()
    block_ref = a.metac("block", "export", "--persistent", f"local:{image}").stdout.strip()
    local_dir = tmp / "local"
    local_dir.mkdir()
    (local_dir / "g").write_text("y")
    remote, local = tmp / "remote", tmp / "bind"
    for d in (remote, local):
        d.mkdir()
    b.metac("fs", "mount", "--persistent", fs_ref, str(remote))
    b.metac("fs", "mount", "--persistent", f"local:{local_dir}", str(local))
    device = b.metac("block", "attach", "--persistent", block_ref).stdout.strip()
    assert all(m["persistent"] for m in json.loads(b.metac("fs", "ls", "--json").stdout))
    state_dir = b.state_dir / "fs"
    assert sorted(os.listdir(state_dir)) == ["persistent.key", "records"]
    assert oct(os.stat(state_dir / "persistent.key").st_mode & 0o777) == "0o600"

    # Revoke every ref of the three holders directly, not through umount/detach.
    revoked = fs_refs(b, "mount") + fs_refs(b, "attachment")
    assert len(revoked) == 3
    for r in revoked:
        b.metac("ref", "rm", r["id"])
    # They stay for this run (revoking a ref does not undo the action)...
    assert (remote / "f").read_text() == "x" and (local / "g").read_text() == "y"
    # ...and can still be undone: umount forgets refs that are already gone.
    b.metac("fs", "umount", str(local))
    assert not (local / "g").exists()

    b.stop()
    b.start()
    time.sleep(3)  # time enough for an active object to be restored, were one left
    assert json.loads(b.metac("fs", "ls", "--json").stdout) == []
    assert json.loads(b.metac("block", "ls", "--json").stdout) == []
    assert not [m for m in b.mounts() if m.startswith(str(tmp))], b.mounts()
    assert not [d for d, f in loop_devices().items() if f.startswith(str(b.root))]
    assert fs_refs(b, "mount") == [] and fs_refs(b, "attachment") == []
    assert sorted(os.listdir(state_dir)) == ["persistent.key", "records"]
    assert os.listdir(state_dir / "records") == []
    log = b.log_text()
    assert "cannot restore" not in log and "Traceback" not in log, log[-3000:]

    # The same paths can be mounted and attached again, persistently, and undone for good.
    b.metac("fs", "mount", "--persistent", fs_ref, str(remote))
    device = b.metac("block", "attach", "--persistent", block_ref).stdout.strip()
    assert len(fs_refs(b, "mount")) == 1 and len(fs_refs(b, "attachment")) == 1
    b.metac("fs", "umount", str(remote))
    b.metac("block", "detach", device)
    assert fs_refs(b, "mount") == [] and fs_refs(b, "attachment") == []
    b.stop()
    b.start()
    time.sleep(3)
    assert json.loads(b.metac("fs", "ls", "--json").stdout) == []
    assert json.loads(b.metac("block", "ls", "--json").stdout) == []
    assert not [m for m in b.mounts() if m.startswith(str(tmp))]
