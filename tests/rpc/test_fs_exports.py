"""The fs service's exported objects in one process (no node; no root needed).

Filesystem/File/BlockDevice server classes are called over capnp in-process
clients: the attack suite on getSubtree/getFile (``..``, absolute names, NUL,
symlinks to outside files and directories, one swapped in during the walks),
read-only views, info, and file bytes through openAsStream/openForWrite opened
with ``open_stream`` on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from metac import errors
from metac.core.paths import ServiceEnv
from metac.core.rpc import rpc_errors
from metac.core.service import ServiceContext
from metac.core.streams import open_stream
from metac.core.supervisor import Supervisor
from metac.fs import exports
from metac.fs.exports import OWN_DIRECTORY, FilesystemServer
from metac.fs.resolve import Directory
from metac.fs.squash import Identity
from metac.fs.state import FsState
from metac.schema.load import fs
from metac.testing.fstree import make_export_tree
from metac.testing.inproc import run

LOCAL = "127.0.0.1"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    export = make_export_tree(tmp_path)
    (export / "abs-file-link").symlink_to(str(tmp_path / "outside" / "secret"))
    return export


def make_fs(tmp_path: Path, export: Path, read_only: bool = False,
            owner: Any = OWN_DIRECTORY) -> Any:
    env = ServiceEnv(name="fs", runtime_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "st"),
                     node_address=LOCAL, node_port=901, node_instance="test")
    ctx = ServiceContext(env, None, None, Supervisor(env.state_dir, "fs"))
    state = FsState(ctx)
    server = FilesystemServer(state, Directory.open_absolute(str(export)), read_only, owner)
    return fs.Filesystem._new_client(server), state


async def category(coro: Any) -> str:
    try:
        async with rpc_errors():
            await coro
    except errors.MetacError as exc:
        return exc.category
    return "ok"


async def read_stream(stream: Any) -> bytes:
    loop = asyncio.get_running_loop()
    async with await open_stream(stream, local_address=LOCAL) as opened:
        chunks = []
        while data := await loop.sock_recv(opened.sock, 65536):
            chunks.append(data)
    return b"".join(chunks)


BAD_NAMES = ["..", "a/..", "a/../..", "/etc", "/", "a\0b", "a/b/../../../outside"]
OUTSIDE_DIRS = ["link-out", "abs-out", "link-out/", "a/../link-out"]
OUTSIDE_FILES = ["file-link", "abs-file-link", "link-out/secret", "abs-out/secret"]


def test_names_that_leave_the_directory_are_refused(tmp_path: Path, tree: Path) -> None:
    async def main() -> None:
        cap, _ = make_fs(tmp_path, tree)
        for name in BAD_NAMES:
            assert await category(cap.getSubtree(name)) == "InvalidArgument", name
            assert await category(cap.getFile(name)) == "InvalidArgument", name
        for name in OUTSIDE_DIRS[:2]:
            assert await category(cap.getSubtree(name)) == "PermissionDenied", name
        for name in OUTSIDE_FILES:
            got = await category(cap.getFile(name).file.openAsStream())
            assert got in ("PermissionDenied", "InvalidArgument"), (name, got)
            got = await category(cap.getFile(name).file.openAsBlock())
            assert got in ("PermissionDenied", "FailedPrecondition", "InvalidArgument"), name
            got = await category(cap.getFile(name).file.openForWrite(False))
            assert got in ("PermissionDenied", "InvalidArgument"), name
        assert await category(cap.getSubtree("missing")) == "NotFound"
        assert await category(cap.getFile("missing/file")) == "NotFound"

    run(main())
    assert (tree.parent / "outside" / "secret").read_text() == "SECRET"


def test_file_bytes_through_streams_and_info(tmp_path: Path, tree: Path) -> None:
    async def main() -> None:
        cap, _ = make_fs(tmp_path, tree)
        sub = cap.getSubtree("a").fs
        info = (await sub.info()).info
        assert (info.name, info.readOnly) == ("a", False)
        f = sub.getFile("b/file").file
        assert await read_stream((await f.openAsStream()).stream) == b"inside"
        st = (await f.info()).info
        real = os.stat(tree / "a" / "b" / "file")
        assert (st.exists, st.size, st.mode) == (True, 6, real.st_mode & 0o7777)
        assert int(st.mtime) == int(real.st_mtime)

        new = cap.getFile("a/new.bin").file
        assert not (await new.info()).info.exists
        payload = os.urandom(3 << 20)
        loop = asyncio.get_running_loop()
        async with await open_stream((await new.openForWrite(False)).stream,
                                     local_address=LOCAL) as opened:
            await loop.sock_sendall(opened.sock, payload)
            opened.sock.shutdown(socket.SHUT_WR)
            assert await loop.sock_recv(opened.sock, 10) == b""  # closed after fsync
        assert (tree / "a" / "new.bin").read_bytes() == payload
        assert (await new.info()).info.size == len(payload)

    run(main())


async def write_stream(file: Any, payload: bytes) -> None:
    loop = asyncio.get_running_loop()
    async with await open_stream((await file.openForWrite(False)).stream,
                                 local_address=LOCAL) as opened:
        await loop.sock_sendall(opened.sock, payload)
        opened.sock.shutdown(socket.SHUT_WR)
        assert await loop.sock_recv(opened.sock, 10) == b""  # closed after fsync


USER = Identity(1000, 1000)


@pytest.mark.root
def test_owner_is_fixed_when_exported_and_inherited(tmp_path: Path, tree: Path) -> None:
    """The admin's root gives each subtree its own owner; a ref keeps it all the way down
    (a root-owned directory below a user's export is still served as that user)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    os.chown(tree / "a", *USER.to_json())

    async def main() -> None:
        _, state = make_fs(tmp_path, tree)
        admin_root = FilesystemServer(state, Directory.open_absolute(str(tree)))
        users = admin_root._derived(admin_root.directory.subdir(("a",)), False)
        assert users.owner == USER
        below = users._derived(users.directory.subdir(("b",)), True)  # a/b belongs to root
        assert below.owner == USER and below._describe().data["owner"] == [1000, 1000]
        assert admin_root._describe().data["owner"] == [0, 0]
        keeper = FilesystemServer(state, Directory.open_absolute(str(tree)), owner=None)
        kept = keeper._derived(keeper.directory.subdir(("a",)), False)
        assert kept.owner is None and kept._describe().data["preserveOwners"] is True
        restored = exports.restore_filesystem(state, {"path": str(tree / "a"), "readOnly": False})
        assert restored.owner == USER  # described before owners existed: the directory's owner
        restored = exports.restore_filesystem(state, {"path": str(tree), "preserveOwners": True})
        assert restored.owner is None
        restored = exports.restore_filesystem(state, {"path": str(tree), "owner": [5, 6]})
        assert restored.owner == Identity(5, 6)

    run(main())


@pytest.mark.root
def test_a_file_of_a_squashed_filesystem_acts_as_its_owner(tmp_path: Path, tree: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    users = tree / "a"
    os.chown(users, *USER.to_json())
    (users / "roots-secret").write_bytes(b"secret")
    os.chmod(users / "roots-secret", 0o600)
    (users / "suid").write_bytes(b"#!/bin/sh\n")
    os.chown(users / "suid", *USER.to_json())
    os.chmod(users / "suid", 0o4755)

    async def main() -> None:
        cap, _ = make_fs(tmp_path, users, owner=USER)
        secret = cap.getFile("roots-secret").file
        assert await category(secret.openAsStream()) == "PermissionDenied"
        assert await category(secret.openForWrite(False)) == "PermissionDenied"
        await write_stream(cap.getFile("new").file, b"mine")
        st = os.stat(users / "new")
        assert (st.st_uid, st.st_gid, (users / "new").read_bytes()) == (1000, 1000, b"mine")
        await write_stream(cap.getFile("suid").file, b"#!/bin/sh\nid\n")
        assert stat.S_IMODE(os.stat(users / "suid").st_mode) == 0o755  # as the kernel would
        rooted = cap.getSubtree("b").fs.getFile("new").file  # a/b is root's: no new name
        assert await category(rooted.openForWrite(False)) == "PermissionDenied"
        assert not (users / "b" / "new").exists()
        # the admin's own file refs act as the owner of the file's directory
        admin, _ = make_fs(tmp_path, tree)
        assert await read_stream((await admin.getFile("a/suid").file.openAsStream()).stream)

    run(main())


def test_read_only_views_stay_read_only(tmp_path: Path, tree: Path) -> None:
    async def main() -> None:
        cap, _ = make_fs(tmp_path, tree)
        ro = cap.readOnly().fs
        assert (await ro.info()).info.readOnly
        f = ro.getSubtree("a").fs.getFile("b/file").file
        assert (await f.info()).info.readOnly
        assert await category(f.openForWrite(True)) == "PermissionDenied"
        assert await read_stream((await f.openAsStream()).stream) == b"inside"
        dev = cap.getFile("a/b/file").file.readOnly().file.openAsBlock().device
        info = (await dev.info()).info
        assert (info.size, info.readOnly) == (6, True)

    run(main())


def test_symlink_swapped_in_during_rpc_walks(tmp_path: Path, tree: Path) -> None:
    outside = tree.parent / "outside"
    (outside / "b").mkdir()
    (outside / "b" / "file").write_text("SECRET")
    stop = threading.Event()

    def flipper() -> None:
        while not stop.is_set():
            os.rename(tree / "a", tree / "a-parked")
            os.symlink(str(outside), tree / "a")
            os.unlink(tree / "a")
            os.rename(tree / "a-parked", tree / "a")
            time.sleep(0.0005)  # leave windows in which the walk can succeed too

    async def main() -> dict[str, int]:
        cap, _ = make_fs(tmp_path, tree)
        seen = {"inside": 0, "refused": 0}
        deadline = time.monotonic() + 20
        i = 0
        while min(seen.values()) < 10 and time.monotonic() < deadline:
            i += 1
            try:
                async with rpc_errors():
                    if i % 2:
                        f = cap.getSubtree("a/b").fs.getFile("file").file
                    else:
                        f = cap.getFile("a/b/file").file
                    stream = (await f.openAsStream()).stream
            except (errors.PermissionDenied, errors.NotFound):
                seen["refused"] += 1
                continue
            assert await read_stream(stream) == b"inside"
            seen["inside"] += 1
        return seen

    thread = threading.Thread(target=flipper)
    thread.start()
    try:
        seen = run(main())
    finally:
        stop.set()
        thread.join()
    assert seen["inside"], seen


def test_squashing_fails_at_once_where_there_is_no_filter(tmp_path: Path, tree: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine without a seccomp filter table the stream call itself fails (one line
    naming the ways around), not the connection after tcpListen."""
    monkeypatch.setattr(platform, "machine", lambda: "mips")

    async def main() -> None:
        cap, _ = make_fs(tmp_path, tree, owner=USER)
        for call in (cap.sftpStream(), cap.v9fsStream()):
            try:
                async with rpc_errors():
                    await call
            except errors.Unsupported as exc:
                assert "--preserve-owners" in str(exc)
            else:
                raise AssertionError("a squashed stream was served without its filter")

    run(main())
