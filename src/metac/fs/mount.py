"""Mounting a Filesystem capability at a local path, and keeping it mounted.

Three methods, picked by ``choose_method`` unless forced:

* ``bind``: the capability is one of this service's own directories: a bind
  mount of its ``O_PATH`` fd (``mount --bind``; no server, no network).
* ``9p``: where the kernel has the 9p filesystem: ``v9fsStream()`` opened as a
  local socket, handed to the kernel with ``mount -t 9p -o trans=fd``.
* ``sftp``: otherwise (FUSE): ``sftpStream()`` opened as a local socket, given
  to ``sshfs -o passive`` as stdin/stdout (SFTP with no SSH layer).

Symlinks are data on every path: ``readlink`` returns the link text exactly as
the serving side stores it, and ``symlink`` stores exactly the given text. The
kernel of the mounting node resolves a link, inside the mounting process's own
root (for a container, the mounted root); the serving side never follows one
for the client. sshfs needs ``no_contain_symlinks`` for that: Debian's sshfs
(since the fix for CVE-2026-47187) rejects absolute targets and targets with
``..`` by default (``readlink`` fails with EPERM), which breaks every
distribution's root (``/lib64/ld-linux-x86-64.so.2`` is an absolute link).

A ``MountSession`` owns one mount point: the connection (``OpenedStream``, whose
holder keeps the server on the other node), the helper process and the mount.
A watcher notices when the connection dies (sshfs exits; for 9p the TCP state
leaves ESTABLISHED; keepalive bounds both to about 20 s). The dead mount is then
replaced by a read-only empty placeholder, so operations fail instead of
hanging or writing into the directory underneath. A persistent session then
reconnects with backoff (through a persistent ref of the filesystem, restored
anew from its node); a non-persistent one stays disconnected until released.

Reconnecting and the record file that lets the next start of the service
unmount what a crashed run left behind (``sweep``) are the ``Session``'s
(``metac.fs.session``), shared with block attachments.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import subprocess
from typing import Any

from metac import errors
from metac.codec.refs import SturdyRef
from metac.core.streams import open_stream
from metac.core.supervisor import Child, require_program
from metac.core.untrusted import bounded
from metac.fs import kernel
from metac.fs.session import Session, records
from metac.fs.state import FsState
from metac.schema.load import fs as fs_schema

log = logging.getLogger(__name__)

METHODS = ("9p", "sftp", "bind")
MOUNT_WAIT = 15.0
WATCH_INTERVAL = 2.0
NINEP_MSIZE = 512 * 1024
SSHFS_OPTIONS = "passive,allow_other,default_permissions,idmap=none,max_write=262144"


def kernel_has_9p() -> bool:
    """True if the kernel has the 9p filesystem (and so, we assume, its fd transport).

    A stock distribution kernel (Debian 12) has 9p as modules that nothing loads
    until a 9p mount, so ``/proc/filesystems`` does not list it and "auto" would
    pick sftp. The first call loads 9p and its fd transport (9pnet_fd, a module of
    its own since Linux 6.1; it fails harmlessly where 9pnet has fd built in)."""
    kernel.load_modules_once("9pnet_fd", "9p", "9pnet_fd")
    return "9p" in kernel.filesystem_types()


def choose_method(wanted: str, *, local: bool) -> str:
    """The method to use ("" or "auto" picks one); Unsupported if the kernel lacks it."""
    if wanted in ("", "auto"):
        if local:
            return "bind"
        return "9p" if kernel_has_9p() else "sftp"
    if wanted not in METHODS:
        raise errors.InvalidArgument(f"unknown mount method {wanted!r}; use 9p, sftp or bind")
    if wanted == "bind" and not local:
        raise errors.InvalidArgument("a bind mount needs a filesystem of this node")
    if wanted == "9p" and not kernel_has_9p():
        raise errors.Unsupported("this kernel has no 9p filesystem (modules 9p, 9pnet_fd); "
                                 "use --method sftp (FUSE)")
    return wanted


def ninep_options(fd: int) -> str:
    # uname=root: the kernel's first attach names no uid (n_uname unset), only a
    # user name ("nobody" by default), and diod -N (no user database) cannot look
    # a name up except root's. The attaches made per user (access=client) carry
    # each user's uid.
    return ",".join([f"trans=fd,rfdno={fd},wfdno={fd}", "version=9p2000.L", "aname=/export",
                     "uname=root", "access=client", f"msize={NINEP_MSIZE}", "cache=mmap"])


@functools.lru_cache(maxsize=4)
def sshfs_contains_symlinks(sshfs: str) -> bool:
    """True if this sshfs has the ``contain_symlinks`` option (on by default where it
    exists, and then ``no_contain_symlinks`` turns it off; older builds lack both and
    refuse unknown options)."""
    try:
        proc = subprocess.run([sshfs, "-h"], capture_output=True, text=True, timeout=30,
                              check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    return "no_contain_symlinks" in proc.stdout + proc.stderr


def sshfs_argv(sshfs: str, path: str, marker: str, *, read_only: bool,
               contain_symlinks_option: bool = False) -> list[str]:
    """The sshfs command line. ``contain_symlinks_option``: this sshfs has
    ``contain_symlinks`` (see the module docstring), so turn it off: link texts are
    passed through unchanged, as every other filesystem does."""
    opts = f"{SSHFS_OPTIONS},fsname={marker},subtype=metac"
    if contain_symlinks_option:
        opts += ",no_contain_symlinks"
    if read_only:
        opts += ",ro"
    return [sshfs, "-f", "-o", opts, ":/export", path]


class MountSession(Session):
    """One mount point and everything that keeps it mounted (see the module docstring)."""

    RECORD_PREFIX = "mount-"
    INTERFACE = fs_schema.Filesystem

    def __init__(self, state: FsState, *, mount_id: str, path: str, method: str,
                 read_only: bool, fs_cap: Any = None, local: Any = None,
                 source: str = "local", target: SturdyRef | None = None) -> None:
        super().__init__(state, mount_id, cap=fs_cap, source=source, target=target)
        self.path = path
        self.wanted = method
        self.read_only = read_only
        self.local = local  # a FilesystemServer of this process, for bind mounts
        self.marker = f"metac:{mount_id}"
        self._child: Child | None = None
        self._ninep_fd: int | None = None

    @property
    def what(self) -> str:
        return f"mount at {self.path}"

    # --- records (for the sweep after a crash) ---

    def _record(self) -> dict[str, Any]:
        return {"path": self.path, "sources": [self.marker, kernel.PLACEHOLDER_SOURCE],
                "mount_ids": self._mount_ids()}

    def _mount_ids(self) -> list[int]:
        return [e.mount_id for e in kernel.mounts_at(self.path)
                if e.source in (self.marker, kernel.PLACEHOLDER_SOURCE) or self.method == "bind"]

    # --- connecting ---

    async def _connect(self) -> None:
        kernel.need_root()
        self.method = choose_method(self.wanted, local=self.local is not None)
        if self.method == "bind":
            self._bind()
        else:
            fs = self.cap.cast_as(fs_schema.Filesystem)
            stream = (await bounded(fs.v9fsStream() if self.method == "9p" else fs.sftpStream(),
                                    "the filesystem")).stream
            opened = await open_stream(stream, local_address=self.state.ctx.env.node_address,
                                       node=self.node)
            self._undo.add(opened.aclose, "close the connection")
            kernel.keepalive(opened.sock)
            if self.method == "9p":
                self._mount_9p(opened.sock)
            else:
                await self._mount_sshfs(opened.sock)
        self.status = "mounted"
        self._write_record()
        log.info("mounted %s at %s (%s)", self.source, self.path, self.method)

    def _unmount_marked(self) -> None:
        """Unmount (lazily) what this session mounted with its marker."""
        kernel.remove_top(self.path, [self.marker])

    def _bind(self) -> None:
        kernel.remove_top(self.path, [kernel.PLACEHOLDER_SOURCE])
        fd = self.local.directory.fd
        kernel.mount(f"/proc/self/fd/{fd}", self.path, None, kernel.MS_BIND | kernel.MS_REC)
        self._undo.add(self._unmount_bind, "unmount")
        if self.read_only or self.local.read_only:
            kernel.mount("none", self.path, None,
                         kernel.MS_BIND | kernel.MS_REMOUNT | kernel.MS_RDONLY)

    def _mount_9p(self, sock: socket.socket) -> None:
        kernel.remove_top(self.path, [kernel.PLACEHOLDER_SOURCE])
        sock.setblocking(True)
        fd = sock.fileno()
        flags = kernel.MS_NOSUID | kernel.MS_NODEV | (kernel.MS_RDONLY if self.read_only else 0)
        self._undo.add(self._unmount_marked, "unmount")
        try:
            kernel.mount(self.marker, self.path, "9p", flags, ninep_options(fd))
        except OSError as e:  # the kernel's 9p client or the server refused: say so
            raise errors.Unavailable(f"the kernel's 9p mount of {self.path} failed: "
                                     f"{os.strerror(e.errno or 0)}; --method sftp "
                                     "mounts through sshfs instead") from e
        self._ninep_fd = os.dup(fd)  # for watching the TCP state; the kernel has its own
        self._undo.add(self._close_ninep_fd, "close the watched socket")
        sock.close()

    async def _mount_sshfs(self, sock: socket.socket) -> None:
        sshfs = require_program("sshfs", "sshfs")
        has_option = await asyncio.to_thread(sshfs_contains_symlinks, sshfs)  # once: cached
        kernel.remove_top(self.path, [kernel.PLACEHOLDER_SOURCE])
        sock.setblocking(True)
        fd = sock.fileno()
        self._undo.add(self._unmount_marked, "unmount")  # last: after sshfs has gone
        self._child = await self.state.supervisor.spawn(
            sshfs_argv(sshfs, self.path, self.marker, read_only=self.read_only,
                       contain_symlinks_option=has_option),
            name=f"sshfs-{self.id}", stdin=fd, stdout=fd, log_to_file=False)
        self._undo.add(self._stop_sshfs, "stop sshfs")
        sock.close()  # sshfs holds the connection now
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MOUNT_WAIT
        while True:
            top = kernel.top_mount(self.path)
            if top is not None and top.source == self.marker:
                return
            if self._child.returncode is not None or loop.time() > deadline:
                raise errors.Unavailable(f"sshfs did not mount {self.path} "
                                         "(see the fs service log)")
            await asyncio.sleep(0.05)

    # --- watching, tearing down ---

    async def _wait_broken(self) -> None:
        if self.method == "bind":
            await asyncio.Event().wait()
        if self._child is not None:
            await self._child.wait()
            return
        while self._ninep_fd is not None and kernel.tcp_established(self._ninep_fd):
            await asyncio.sleep(WATCH_INTERVAL)

    def _show_disconnected(self) -> None:
        # An empty read-only placeholder: operations fail instead of hanging or
        # landing in the directory underneath.
        with contextlib.suppress(OSError):
            kernel.placeholder(self.path)

    async def _lost(self) -> None:
        await super()._lost()
        self._write_record()

    # undo steps (see Session._teardown)

    def _unmount_bind(self) -> None:
        with contextlib.suppress(OSError):
            kernel.unmount(self.path)

    async def _stop_sshfs(self) -> None:
        self._unmount_marked()  # lazily first: no new calls reach sshfs
        child, self._child = self._child, None
        if child is not None:
            await self.state.supervisor.stop(child, grace=2.0)

    def _close_ninep_fd(self) -> None:
        fd, self._ninep_fd = self._ninep_fd, None
        if fd is not None:
            os.close(fd)

    async def _released(self) -> None:
        kernel.remove_top(self.path, [self.marker, kernel.PLACEHOLDER_SOURCE])


def sweep(records_dir: str) -> list[str]:
    """Unmount what the records of an earlier (crashed) run name; returns the paths."""
    done = []
    for record in records(records_dir, MountSession.RECORD_PREFIX):
        try:
            mountpoint = str(record["path"])
            sources = {str(s) for s in record.get("sources", [])}
            ids = {int(i) for i in record.get("mount_ids", [])}
        except (ValueError, KeyError, TypeError):
            continue
        for _ in range(16):
            top = kernel.top_mount(mountpoint)
            if top is None or not (top.source in sources or top.mount_id in ids):
                break
            with contextlib.suppress(OSError):
                kernel.unmount(mountpoint)
            done.append(mountpoint)
    return done
