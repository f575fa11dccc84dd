"""`metac fs export/mount/umount/ls` across two namespaced nodes (issue 4)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fs_support import create_write_read, eventually, node_pair, settle_without_leaks

from metac.compute import rootfs
from metac.fs import kernel
from metac.testing.nodes import NodeHost, snapshot

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

MiB = 1 << 20


def pattern_chunks(seed: bytes, size: int, chunk: int = 4 * MiB):
    """Deterministic, position-dependent data (a misplaced chunk changes the hash)."""
    block = hashlib.shake_256(seed).digest(chunk)
    for i in range(0, size, chunk):
        yield i.to_bytes(8, "little") + block[8:min(chunk, size - i)]


def write_file(path: Path, seed: bytes, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for data in pattern_chunks(seed, size):
            f.write(data)
            h.update(data)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(4 * MiB):
            h.update(data)
    return h.hexdigest()


def stat_fails_within(path: Path, timeout: float) -> bool:
    """True if `stat path` (in a child: it must not hang us) fails in time."""
    try:
        proc = subprocess.run(["stat", str(path)], capture_output=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode != 0


def mounts(node: NodeHost) -> list[dict]:
    return json.loads(node.metac("fs", "ls", "--json").stdout)


@pytest.fixture
def pair(nodes_factory, tmp_path: Path):
    with node_pair(nodes_factory, tmp_path) as (a, b, export):
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        yield a, b, export, mnt
        for big in export.glob("big*"):
            big.unlink()


def test_mount_file_operations_and_clean_umount(pair) -> None:
    a, b, export, mnt = pair
    (export / "hello.txt").write_text("hello\n")
    ref = a.metac("fs", "export", f"local:{export}").stdout.strip()
    assert ref.startswith(f"ref://{a.address}/fs/")
    before = snapshot(a, b)

    out = b.metac("fs", "mount", ref, str(mnt)).stdout
    assert f"mounted at {mnt}" in out
    (listed,) = mounts(b)
    assert listed["path"] == str(mnt) and listed["state"] == "mounted"
    assert listed["method"] in ("9p", "sftp") and listed["source"] == a.address
    assert (mnt / "hello.txt").read_text() == "hello\n"

    # create, write, read
    create_write_read(mnt, export)
    # modes and mtimes
    os.chmod(mnt / "from-a.txt", 0o640)
    os.utime(mnt / "from-a.txt", (1_600_000_000, 1_500_000_000))
    st = os.stat(export / "from-a.txt")
    assert (st.st_mode & 0o7777, int(st.st_mtime)) == (0o640, 1_500_000_000)
    assert os.stat(mnt / "from-a.txt").st_mode & 0o7777 == 0o640
    assert int(os.stat(mnt / "from-a.txt").st_mtime) == 1_500_000_000
    # rename, delete
    os.rename(mnt / "dir" / "sub" / "f.txt", mnt / "dir" / "g.txt")
    os.rename(mnt / "dir" / "sub", mnt / "dir" / "sub2")
    assert sorted(os.listdir(export / "dir")) == ["g.txt", "sub2"]
    os.unlink(mnt / "dir" / "g.txt")
    os.rmdir(mnt / "dir" / "sub2")
    os.rmdir(mnt / "dir")
    assert sorted(os.listdir(export)) == ["from-a.txt", "hello.txt"]

    # several readers at once
    data_hash = write_file(export / "big-shared", b"readers", 64 * MiB)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(sha256(mnt / "big-shared")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [data_hash] * 4

    b.metac("fs", "umount", str(mnt))
    assert mounts(b) == []
    assert not (mnt / "hello.txt").exists()
    settle_without_leaks(before, a, b)
    again = b.metac("fs", "umount", str(mnt), check=False)
    assert again.returncode == 3 and "not a mount" in again.stderr


def test_symlinks_are_data_through_the_mount(pair, tmp_path: Path) -> None:
    """readlink gives A's link text byte for byte (absolute, relative, dangling, outside
    the export, not UTF-8); symlink stores exactly the text given; an absolute link
    resolves on B inside the root it is used in (a chroot of the mount), never on A."""
    a, b, export, mnt = pair
    root = export / "root"
    rootfs.build_busybox(str(root))  # a `cat` to run in a chroot of the mount
    planted = tmp_path / "planted" / "marker.txt"  # an absolute path that exists twice:
    planted.parent.mkdir()
    planted.write_text("A's own file\n")  # ...on A (and B: one host here)
    inside = root / str(planted).lstrip("/")
    inside.parent.mkdir(parents=True)
    inside.write_text("inside the export\n")  # ...and inside the exported root
    links = {
        b"abs": os.fsencode(str(planted)),
        b"rel": os.fsencode(str(inside.relative_to(root))),
        b"dangling": b"/nonexistent-" + os.urandom(4).hex().encode() + b"/x",
        b"outside": b"../../../../../etc/passwd",
        b"odd": b"/bytes \xff\xfe and spaces/../x",
    }
    for name, text in links.items():
        os.symlink(text, os.fsencode(root) + b"/" + name)
    # Owners are kept so that the lchown below can give the link to another user.
    ref = a.metac("fs", "export", "--preserve-owners", f"local:{export}").stdout.strip()
    b.metac("fs", "mount", ref, str(mnt))
    try:
        seen = os.fsencode(mnt / "root")
        for name, text in links.items():
            assert os.readlink(seen + b"/" + name) == text, name
            assert stat.S_ISLNK(os.lstat(seen + b"/" + name).st_mode), name
        chrooted = b.host.run(["chroot", str(mnt / "root"), "/bin/cat", "/abs"], timeout=60)
        assert chrooted.stdout == "inside the export\n"
        assert b.host.run(["chroot", str(mnt / "root"), "/bin/cat", "/rel"],
                          timeout=60).stdout == "inside the export\n"
        assert planted.read_text() == "A's own file\n"
        # symlink(2) through the mount stores exactly the given text on A.
        made = {b"made-abs": b"/etc/made/target", b"made-rel": b"../up/../made",
                b"made-dangling": b"no/such/thing"}
        for name, text in made.items():
            os.symlink(text, seen + b"/" + name)
            assert os.readlink(os.fsencode(root) + b"/" + name) == text, name
            assert os.readlink(seen + b"/" + name) == text, name
        # Owner and times of a (dangling) link change the link itself.
        os.chown(seen + b"/made-dangling", 4321, 4321, follow_symlinks=False)
        os.utime(seen + b"/made-dangling", (1_400_000_000, 1_400_000_000),
                 follow_symlinks=False)
        st = os.lstat(os.fsencode(root) + b"/made-dangling")
        assert (st.st_uid, int(st.st_mtime)) == (4321, 1_400_000_000)
    finally:
        b.metac("fs", "umount", str(mnt))


def test_one_gib_round_trip_byte_exact(pair) -> None:
    a, b, export, mnt = pair
    ref = a.metac("fs", "export", f"local:{export}").stdout.strip()
    b.metac("fs", "mount", ref, str(mnt))
    size = 1 << 30
    t0 = time.monotonic()
    written = write_file(mnt / "big-from-b", b"B to A", size)
    t1 = time.monotonic()
    assert sha256(export / "big-from-b") == written
    made = write_file(export / "big-from-a", b"A to B", size)
    t2 = time.monotonic()
    assert sha256(mnt / "big-from-a") == made
    t3 = time.monotonic()
    print(f"1 GiB through the mount: write {size / MiB / (t1 - t0):.0f} MiB/s, "
          f"read {size / MiB / (t3 - t2):.0f} MiB/s")
    b.metac("fs", "umount", str(mnt))


def test_read_only_export_and_read_only_mount(pair) -> None:
    a, b, export, mnt = pair
    (export / "f").write_text("x")
    ro_ref = a.metac("fs", "export", "--read-only", f"local:{export}").stdout.strip()
    b.metac("fs", "mount", ro_ref, str(mnt))
    assert (mnt / "f").read_text() == "x"
    with pytest.raises(OSError):
        (mnt / "new").write_text("no")
    with pytest.raises(OSError):
        (mnt / "f").write_text("no")
    b.metac("fs", "umount", str(mnt))
    ref = a.metac("fs", "export", f"local:{export}").stdout.strip()
    b.metac("fs", "mount", "--read-only", ref, str(mnt))
    assert mounts(b)[0]["read_only"] is True
    with pytest.raises(OSError):
        (mnt / "new").write_text("no")
    b.metac("fs", "umount", str(mnt))
    assert sorted(os.listdir(export)) == ["f"]


def test_local_bind_mount_and_forced_methods(pair) -> None:
    a, b, export, mnt = pair
    (export / "f").write_text("local")
    ref = a.metac("fs", "export", f"local:{export}").stdout.strip()
    forced = b.metac("fs", "mount", "--method", "9p", ref, str(mnt), check=False)
    if "9p" in kernel.filesystem_types():
        assert forced.returncode == 0, forced.stderr
        b.metac("fs", "umount", str(mnt))
    else:  # this machine: no 9p module
        assert forced.returncode == 8 and "Unsupported" in forced.stderr, forced.stderr
    bind = b.metac("fs", "mount", "--method", "bind", ref, str(mnt), check=False)
    assert bind.returncode == 2 and "this node" in bind.stderr  # A's directory, not B's
    out = b.metac("fs", "mount", "--method", "sftp", ref, str(mnt)).stdout
    assert "(sftp" in out and (mnt / "f").read_text() == "local"
    b.metac("fs", "umount", str(mnt))

    out = a.metac("fs", "mount", "--read-only", f"local:{export}", str(mnt)).stdout
    assert "(bind" in out
    assert (mnt / "f").read_text() == "local"
    with pytest.raises(OSError):
        (mnt / "g").write_text("no")
    a.metac("fs", "umount", str(mnt))
    assert not (mnt / "f").exists()


def test_killed_server_fails_fast_and_persistent_mount_comes_back(pair) -> None:
    a, b, export, mnt = pair
    (export / "f").write_text("before")
    ref = a.metac("fs", "export", "--persistent", f"local:{export}").stdout.strip()
    out = b.metac("fs", "mount", "--persistent", ref, str(mnt)).stdout
    assert "persistent" in out
    assert mounts(b)[0]["persistent"] is True
    assert (mnt / "f").read_text() == "before"

    a.kill9()
    # Every operation returns (none hangs), and within a bounded time they fail.
    eventually(lambda: stat_fails_within(mnt / "f", 30), 30, "operations on the mount to fail")
    eventually(lambda: mounts(b)[0]["state"] == "disconnected", 30, "state disconnected")
    with pytest.raises(OSError):
        (mnt / "written-while-down").write_text("must not land under the mount point")
    time.sleep(4)  # a few failed reconnects: still one placeholder, not a stack of them
    assert b.mounts().count(str(mnt)) == 1, b.mounts()

    (export / "f").write_text("after")
    a.start()
    eventually(lambda: not stat_fails_within(mnt / "f", 10), 60, "the mount to come back")
    assert (mnt / "f").read_text() == "after"
    assert mounts(b)[0]["state"] == "mounted"

    # A restart of B re-establishes it too.
    b.stop()
    assert not (mnt / "f").exists()
    b.start()
    eventually(lambda: (mnt / "f").exists(), 60, "the mount after B restarted")
    assert (mnt / "f").read_text() == "after"

    b.metac("fs", "umount", str(mnt))
    b.stop()
    b.start()
    time.sleep(2)
    assert mounts(b) == [] and not (mnt / "f").exists(), "an unmounted mount came back"


def test_non_persistent_mount_does_not_survive_restart(pair) -> None:
    a, b, export, mnt = pair
    (export / "f").write_text("x")
    ref = a.metac("fs", "export", "--persistent", f"local:{export}").stdout.strip()
    b.metac("fs", "mount", ref, str(mnt))
    b.stop()
    b.start()
    assert mounts(b) == []
    assert not (mnt / "f").exists()


HOLDER_SCRIPT = """
import asyncio, sys, capnp
from metac import api
from metac.schema.load import fs

async def main(export, path, keep):
    async with api.connect_admin() as admin:
        svc = await api.service_admin(admin, "fs", fs.FilesystemServiceAdmin)
        ns = svc.rootNamespace().ns
        # the admin's own directory, as root: bind-mounted (a squashed one is served)
        sub = ns.filesystemPreservingOwners().fs.getSubtree(export.lstrip("/")).fs
        if keep:
            opts = fs.MountOptions.new_message()
            opts.keep = True
            holder = (await ns.mountWith(path, sub, opts)).holder
        else:
            holder = (await ns.mount(path, sub)).holder
        print("mounted", flush=True)
        sys.stdin.readline()  # hold it until the test says so
        del holder

asyncio.run(capnp.run(main(sys.argv[1], sys.argv[2], sys.argv[3] == "keep")))
"""


@pytest.mark.parametrize("keep", [False, True])
def test_dropping_the_holder_of_mount_unmounts_unless_kept(pair, keep: bool) -> None:
    a, _, export, mnt = pair
    (export / "f").write_text("x")
    proc = a.host.popen([sys.executable, "-c", HOLDER_SCRIPT, str(export), str(mnt),
                         "keep" if keep else "drop"], env=a.cli_env(), stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "mounted"
        assert (mnt / "f").read_text() == "x"
        assert [m["path"] for m in mounts(a)] == [str(mnt)]
    finally:
        proc.communicate("\n", timeout=30)  # the client exits: its reference is dropped
    if keep:
        time.sleep(1)
        assert (mnt / "f").exists() and mounts(a)[0]["method"] == "bind"
        a.metac("fs", "umount", str(mnt))
    eventually(lambda: not (mnt / "f").exists(), 10, "the mount to go with its holder")
    assert mounts(a) == []

