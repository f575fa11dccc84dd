"""External clients through our capabilities, and the confinement attack suite on the data plane.

diodls/diodcat read a directory through ``v9fsStream``, nbdinfo/nbdcopy a disk
image through ``nbdSetup``, and a hostile SFTP client (``sshfs -o
directport,follow_symlinks``, which makes the *server* resolve symlinks)
through ``sftpStream``, each via `metac fs|block stream` and `metac stream
forward` on node B. Symlinks and ``..`` in the export must never reach what
lies outside it on node A.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from fs_support import forward, stop

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

SECRET = "TOP-SECRET-OUTSIDE-THE-EXPORT"


def need(*programs: str) -> None:
    for prog in programs:
        if shutil.which(prog) is None and not os.path.exists(f"/usr/sbin/{prog}"):
            pytest.skip(f"needs {prog}")


@pytest.fixture
def pair(nodes_factory, tmp_path: Path):
    """Node A exports tmp/export; tmp/secret.txt and tmp/outside/ lie beside it."""
    a, b = nodes_factory(2)
    export = tmp_path / "export"
    (export / "sub").mkdir(parents=True)
    (export / "hello.txt").write_text("hello\n")
    (export / "sub" / "inner.txt").write_text("inner\n")
    (tmp_path / "secret.txt").write_text(SECRET)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret2.txt").write_text(SECRET)
    (export / "abs-file").symlink_to(tmp_path / "secret.txt")
    (export / "rel-file").symlink_to("../secret.txt")
    (export / "abs-dir").symlink_to(tmp_path / "outside")
    (export / "sub" / "rel-dir").symlink_to("../../outside")
    for node in (a, b):
        node.track_mount_root(tmp_path)
    return a, b, export, tmp_path


def test_diodls_and_diodcat_through_v9fs_stream(pair) -> None:
    need("diodls", "diodcat")
    a, b, export, _ = pair
    ref = a.metac("fs", "export", f"local:{export}").stdout.strip()
    stream_ref = b.metac("fs", "stream", "--protocol", "9p", ref).stdout.strip()
    fwd, port = forward(b, stream_ref)
    server = f"127.0.0.1:{port}"
    try:
        listing = b.host.run(["diodls", "-s", server, "-a", "/export"], timeout=30)
        assert {"hello.txt", "sub", "abs-file", "rel-file"} <= set(listing.stdout.split())
        cat = b.host.run(["diodcat", "-s", server, "-a", "/export", "hello.txt",
                          "sub/inner.txt"], timeout=30)
        assert cat.stdout == "hello\ninner\n"
        # The attack suite over 9P: symlinks to outside, "..", another aname.
        for name in ("abs-file", "rel-file", "abs-dir/secret2.txt", "sub/rel-dir/secret2.txt",
                     "../secret.txt", "sub/../../secret.txt", "../../../etc/hostname"):
            bad = b.host.run(["diodcat", "-s", server, "-a", "/export", name], check=False,
                             timeout=30)
            assert bad.returncode != 0, name
            assert SECRET not in bad.stdout
        for aname in ("/", "/export/..", "/etc"):
            bad = b.host.run(["diodls", "-s", server, "-a", aname], check=False, timeout=30)
            assert bad.returncode != 0, aname
    finally:
        stop(fwd)


def test_nbdinfo_and_nbdcopy_through_nbd_setup(pair) -> None:
    need("nbdinfo", "nbdcopy")
    a, b, export, tmp = pair
    image = export / "disk.img"
    image.write_bytes(os.urandom(4 << 20))
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    ref = a.metac("block", "export", f"local:{image}").stdout.strip()
    fwd, port = forward(b, b.metac("block", "stream", ref).stdout.strip())
    try:
        uri = f"nbd://127.0.0.1:{port}"
        # Its content: line is libmagic's guess about random bytes: any byte may appear.
        info = b.host.run(["nbdinfo", uri], timeout=30, errors="replace").stdout
        assert "export-size: 4194304" in info and "is_read_only: false" in info
        copy = tmp / "copy.img"
        b.host.run(["nbdcopy", uri, str(copy)], timeout=60)
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest
        # Write through it, read the image on A.
        new = tmp / "new.img"
        new.write_bytes(os.urandom(4 << 20))
        b.host.run(["nbdcopy", "--flush", str(new), uri], timeout=60)
        assert image.read_bytes() == new.read_bytes()
    finally:
        stop(fwd)

    ro_ref = a.metac("block", "export", "--read-only", f"local:{image}").stdout.strip()
    fwd, port = forward(b, b.metac("block", "stream", ro_ref).stdout.strip())
    try:
        uri = f"nbd://127.0.0.1:{port}"
        assert "is_read_only: true" in b.host.run(["nbdinfo", uri], timeout=30,
                                                   errors="replace").stdout
        refused = b.host.run(["nbdcopy", str(tmp / "copy.img"), uri], check=False, timeout=60)
        assert refused.returncode != 0
        assert image.read_bytes() == (tmp / "new.img").read_bytes()
    finally:
        stop(fwd)


def test_hostile_sftp_client_and_the_mount_stay_inside(pair) -> None:
    need("sshfs")
    a, b, export, tmp = pair
    # Owners kept: the server runs as root, the case where following a link would hurt.
    ref = a.metac("fs", "export", "--preserve-owners", f"local:{export}").stdout.strip()

    # 1. Our own mount on B: symlinks show as symlinks; nothing resolves on A.
    mnt = tmp / "mnt"
    mnt.mkdir()
    b.metac("fs", "mount", ref, str(mnt))
    try:
        for name in ("abs-file", "rel-file", "abs-dir"):
            assert stat.S_ISLNK(os.lstat(mnt / name).st_mode), name
        assert (mnt / "hello.txt").read_text() == "hello\n"
        # A symlink made through the mount is made on A as that symlink, never followed
        # there, and changing its owner changes the link (lsetstat), not A's /etc.
        os.symlink("/etc", mnt / "made-on-b")
        assert os.readlink(export / "made-on-b") == "/etc"
        etc_owner = os.stat("/etc").st_uid
        os.chown(mnt / "made-on-b", 4321, 4321, follow_symlinks=False)
        assert os.lstat(export / "made-on-b").st_uid == 4321
        assert os.stat("/etc").st_uid == etc_owner
        with pytest.raises(OSError):
            os.link(tmp / "secret.txt", mnt / "hard")  # across filesystems: refused locally
    finally:
        b.metac("fs", "umount", str(mnt))

    # 2. A hostile SFTP client that asks the server to follow symlinks and to go up.
    stream_ref = b.metac("fs", "stream", "--protocol", "sftp", ref).stdout.strip()
    fwd, port = forward(b, stream_ref)
    hostile = tmp / "hostile"
    hostile.mkdir()
    try:
        for base in ("/export", "/export/.."):
            b.host.run(["sshfs", "-o", f"directport={port},follow_symlinks,idmap=none",
                        f"127.0.0.1:{base}", str(hostile)], timeout=30)
            try:
                if base == "/export":
                    assert (hostile / "hello.txt").read_text() == "hello\n"
                    for name in ("abs-file", "rel-file", "abs-dir/secret2.txt",
                                 "sub/rel-dir/secret2.txt"):
                        with pytest.raises(OSError):
                            (hostile / name).read_text()
                else:
                    # Above the export is the sandbox's empty root, not A's directory.
                    names = set(os.listdir(hostile))
                    assert "export" in names and "secret.txt" not in names
                    assert not any(SECRET in p.read_text(errors="replace")
                                   for p in hostile.rglob("*.txt") if p.is_file())
            finally:
                subprocess.run(["fusermount3", "-u", "-z", str(hostile)], check=False)
                time.sleep(0.2)
    finally:
        stop(fwd)
    assert (tmp / "secret.txt").read_text() == SECRET
