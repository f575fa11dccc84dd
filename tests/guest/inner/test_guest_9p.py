"""`metac fs mount` through the kernel's 9p client (``mount -t 9p -o trans=fd``).

Runs only in the QEMU guest (see tests/guest/conftest.py): the host kernel has no 9p.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import test_fs_mount as host_tests  # the helpers of the host's mount tests
from fs_support import create_write_read, eventually, settle_without_leaks

from metac.fs import kernel
from metac.testing.fstree import make_export_tree
from metac.testing.nodes import snapshot

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

MiB = 1 << 20
BIG = 64 * MiB  # TCG is slow: 64 MiB each way is enough to cross many msize chunks


def mount_9p(b, ref: str, mnt: Path, *args: str) -> None:
    out = b.metac("fs", "mount", *args, ref, str(mnt)).stdout
    assert "(9p" in out, out
    (listed,) = host_tests.mounts(b)
    assert listed["method"] == "9p" and listed["state"] == "mounted", listed
    top = kernel.top_mount(str(mnt))
    assert top is not None and top.fstype == "9p", top


def test_9p_mount_file_operations_big_file_and_clean_umount(pair) -> None:
    a, b, export, mnt = pair
    (export / "hello.txt").write_text("hello\n")
    ref = a.metac("fs", "export", f"local:{export}").stdout.strip()
    before = snapshot(a, b)

    mount_9p(b, ref, mnt)  # no --method: 9p is picked because the kernel has it
    assert (mnt / "hello.txt").read_text() == "hello\n"

    # create, write, read, both ways
    create_write_read(mnt, export)
    # modes and mtimes: set on B, whole seconds reach A (diod 1.0.24 drops the
    # nanoseconds of a Tsetattr); set on A, B sees them to the nanosecond.
    os.chmod(mnt / "from-a.txt", 0o640)
    os.utime(mnt / "from-a.txt", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    st = os.stat(export / "from-a.txt")
    assert (st.st_mode & 0o7777, int(st.st_mtime)) == (0o640, 1_500_000_000)
    os.utime(export / "from-a.txt", ns=(1_600_000_000_123_456_789, 1_400_000_000_987_654_321))
    st = os.stat(mnt / "from-a.txt")
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o640, 1_400_000_000_987_654_321)
    (mnt / "dir" / "x").mkdir(mode=0o750)
    assert stat.S_IMODE(os.stat(export / "dir" / "x").st_mode) == 0o750
    # rename, delete
    os.rename(mnt / "dir" / "sub" / "f.txt", mnt / "dir" / "g.txt")
    os.rename(mnt / "dir" / "sub", mnt / "dir" / "sub2")
    assert sorted(os.listdir(export / "dir")) == ["g.txt", "sub2", "x"]
    os.unlink(mnt / "dir" / "g.txt")
    for d in ("sub2", "x", ""):
        os.rmdir(mnt / "dir" / d)
    assert sorted(os.listdir(export)) == ["from-a.txt", "hello.txt"]

    # a big file each way, byte-exact
    written = host_tests.write_file(mnt / "big-from-b", b"B to A", BIG)
    assert host_tests.sha256(export / "big-from-b") == written
    made = host_tests.write_file(export / "big-from-a", b"A to B", BIG)
    assert host_tests.sha256(mnt / "big-from-a") == made
    assert os.stat(mnt / "big-from-a").st_size == BIG
    os.unlink(mnt / "big-from-a")
    os.unlink(export / "big-from-b")

    b.metac("fs", "umount", str(mnt))
    assert host_tests.mounts(b) == []
    assert kernel.mounts_at(str(mnt)) == [] and not (mnt / "hello.txt").exists()
    settle_without_leaks(before, a, b)


def test_9p_mount_stays_inside_the_export(pair, tmp_path: Path) -> None:
    """Symlinks leading out of the export are resolved by B's kernel (as on any
    network filesystem), never by A's server: relative ones name paths that do not
    exist around B's mount point, so nothing of A's outside/ is ever read."""
    a, b, _, mnt = pair
    tree = tmp_path / "tree"
    tree.mkdir()
    export = make_export_tree(tree)
    ref = a.metac("fs", "export", f"local:{export}").stdout.strip()
    mount_9p(b, ref, mnt)
    try:
        assert (mnt / "a" / "b" / "file").read_text() == "inside"
        for name, target in (("link-out", "../outside"), ("file-link", "../outside/secret")):
            assert stat.S_ISLNK(os.lstat(mnt / name).st_mode), name
            assert os.readlink(mnt / name) == target
        for name in ("link-out/secret", "file-link", "a/../file-link", "a/b/../../link-out"):
            with pytest.raises(OSError):
                (mnt / name).read_text()
        # ".." at the root of the mount is B's mount point parent, not A's export parent.
        assert sorted(os.listdir(mnt / "..")) == ["mnt"]
        # A symlink made through the mount lands on A as a symlink; A never follows it.
        os.symlink("../outside/secret", mnt / "made-on-b")
        assert stat.S_ISLNK(os.lstat(export / "made-on-b").st_mode)
        with pytest.raises(OSError):
            (mnt / "made-on-b").read_text()
        # Symlinks are data: absolute and dangling link texts come back as stored, and
        # symlink(2) stores exactly the text given; lchown changes the link itself.
        for name, text in (("abs-link", "/etc/hostname"), ("dangling", "/no/such/x")):
            os.symlink(text, export / name)
            assert os.readlink(mnt / name) == text
        os.symlink("/made/absolute", mnt / "made-abs")
        assert os.readlink(export / "made-abs") == "/made/absolute"
        os.chown(mnt / "made-abs", 0, 0, follow_symlinks=False)
        with pytest.raises(OSError):  # a hard link to a file outside: another filesystem
            os.link(tree / "outside" / "secret", mnt / "hard")
        assert (tree / "outside" / "secret").read_text() == "SECRET"
    finally:
        b.metac("fs", "umount", str(mnt))

    # A read-only capability: every write fails, whatever B asks for.
    ro_ref = a.metac("fs", "export", "--read-only", f"local:{export}").stdout.strip()
    mount_9p(b, ro_ref, mnt)
    try:
        assert (mnt / "a" / "b" / "file").read_text() == "inside"
        for write in (lambda: (mnt / "new").write_text("no"),
                      lambda: (mnt / "a" / "b" / "file").write_text("no"),
                      lambda: os.mkdir(mnt / "d"), lambda: os.unlink(mnt / "a" / "b" / "file")):
            with pytest.raises(OSError):
                write()
    finally:
        b.metac("fs", "umount", str(mnt))
    assert (export / "a" / "b" / "file").read_text() == "inside"
    assert not (export / "new").exists()


def test_9p_killed_server_fails_fast_and_umount_cleans_up(pair) -> None:
    a, b, export, mnt = pair
    (export / "f").write_text("before")
    ref = a.metac("fs", "export", f"local:{export}").stdout.strip()
    mount_9p(b, ref, mnt)
    assert (mnt / "f").read_text() == "before"
    fd = os.open(mnt / "f", os.O_RDONLY)  # an open file on the mount when A goes away
    try:
        a.kill9()
        # Every operation returns (none hangs), and within a bounded time they fail.
        eventually(lambda: host_tests.stat_fails_within(mnt / "f", 30), 30,
                   "operations on the mount to fail")
        eventually(lambda: host_tests.mounts(b)[0]["state"] == "disconnected", 30,
                   "state disconnected")
        with pytest.raises(OSError):
            (mnt / "written-while-down").write_text("must not land under the mount point")
        with pytest.raises(OSError):
            os.pread(fd, 100, 0)
    finally:
        os.close(fd)
    b.metac("fs", "umount", str(mnt))
    assert host_tests.mounts(b) == [] and kernel.mounts_at(str(mnt)) == []
    assert os.listdir(mnt) == []
