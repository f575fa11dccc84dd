"""Attaching a BlockDevice capability as a local block device (and optionally mounting it).

* ``nbd``: where the kernel has an NBD client (``/sys/module/nbd``): the
  handshake is done here (``nbdproto``), then the socket is handed to
  ``/dev/nbdN`` with ``NBD_SET_SOCK`` and ``NBD_DO_IT`` runs in a thread.
* ``nbdfuse``: otherwise: ``nbdfuse --fd`` shows the device as one file in a
  FUSE directory under the runtime dir, and a loop device (``losetup``) turns
  that file into ``/dev/loopN``.

An ``Attachment`` owns the connection, the helper, the loop or nbd device and
the optional mount, and undoes them in reverse order. If the connection dies
it is ``disconnected`` (I/O on the device fails); a persistent attachment then
tears down and attaches again (possibly as another device) with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
from typing import Any

from metac import errors
from metac.codec import nbdproto
from metac.codec.refs import SturdyRef
from metac.core.streams import open_stream
from metac.core.supervisor import Child, Supervisor, require_program
from metac.core.untrusted import bounded
from metac.fs import kernel
from metac.fs.session import Session, records
from metac.fs.state import FsState
from metac.schema.load import fs as fs_schema

log = logging.getLogger(__name__)

ATTACH_WAIT = 15.0
#: Read-ahead of the nbdfuse mount, for whoever reads its file through the page cache.
#: The loop device itself uses direct I/O (``losetup --direct-io=on``): its requests go
#: to nbdfuse asynchronously, several at a time, instead of one by one through the
#: page cache (nbdcopy through the device: 1.5x the writes here, reads the same).
FUSE_READ_AHEAD_KIB = 4096

# linux/nbd.h: _IO(0xab, n)
NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_SET_SIZE = 0xAB02
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_DISCONNECT = 0xAB08
NBD_SET_TIMEOUT = 0xAB09
NBD_SET_FLAGS = 0xAB0A


def kernel_has_nbd() -> bool:
    """True if the kernel has an NBD client with device nodes (``/dev/nbd0``).

    On a stock distribution kernel nbd is a module nothing loads until used: the
    first call loads it."""
    kernel.load_modules_once("nbd", "nbd")
    return os.path.isdir("/sys/module/nbd") and os.path.exists("/dev/nbd0")


async def run_tool(supervisor: Supervisor, argv: list[str], name: str,
                   timeout: float = 30.0) -> str:
    """Run a short-lived tool (losetup, mount) under the supervisor; its stdout, or an error."""
    child = await supervisor.spawn(argv, name=f"{name}-{os.urandom(3).hex()}",
                                   stdout=asyncio.subprocess.PIPE)
    try:
        assert child.process.stdout is not None
        out = await asyncio.wait_for(child.process.stdout.read(), timeout)
        code = await asyncio.wait_for(child.wait(), timeout)
    finally:
        await supervisor.stop(child, grace=1.0)
    try:
        with open(child.log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(child.log_path) - 300))
            tail = f.read().decode(errors="replace").strip().splitlines()[-1:]
        os.unlink(child.log_path)  # one file per run would pile up
    except OSError:
        tail = []
    if code != 0:
        raise errors.FailedPrecondition(f"{os.path.basename(argv[0])} failed: "
                                        f"{tail[0] if tail else f'exit {code}'}")
    return out.decode(errors="replace")


def negotiate(sock: socket.socket, timeout: float = 15.0) -> nbdproto.ExportInfo:
    """Blocking NBD handshake on ``sock`` (run it in an executor)."""
    sock.settimeout(timeout)
    hs = nbdproto.ClientHandshake()
    while not hs.done:
        data = sock.recv(65536)
        if not data:
            raise errors.Unavailable("the NBD server closed the connection during the handshake")
        try:
            hs.receive_data(data)
        except nbdproto.ProtocolError as exc:
            raise errors.Unavailable(f"NBD handshake failed: {exc}") from None
        out = hs.data_to_send()
        if out:
            sock.sendall(out)
    sock.settimeout(None)
    assert hs.export is not None
    return hs.export


class Attachment(Session):
    RECORD_PREFIX = "attach-"
    INTERFACE = fs_schema.BlockDevice

    def __init__(self, state: FsState, *, attach_id: str, read_only: bool, mount_path: str,
                 device_cap: Any, source: str, target: SturdyRef | None = None) -> None:
        super().__init__(state, attach_id, cap=device_cap, source=source, target=target)
        self.read_only = read_only
        self.mount_path = mount_path
        self.device = ""
        self.dir = os.path.join(state.run_dir, "nbd", attach_id)
        self._child: Child | None = None
        self._nbd_fd: int | None = None
        self._nbd_thread: asyncio.Future[Any] | None = None

    @property
    def what(self) -> str:
        return f"attachment {self.device or self.id}"

    def _record(self) -> dict[str, Any]:
        return {"dir": self.dir, "device": self.device, "mount": self.mount_path}

    # --- attaching ---

    async def _connect(self) -> None:
        kernel.need_root()
        device = self.cap.cast_as(fs_schema.BlockDevice)
        info = (await bounded(device.info(), "the block device")).info
        self.read_only = self.read_only or bool(info.readOnly)
        stream = (await bounded(device.nbdSetup(), "the block device")).stream
        opened = await open_stream(stream, local_address=self.state.ctx.env.node_address,
                                   node=self.node)
        self._undo.add(opened.aclose, "close the NBD connection")
        kernel.keepalive(opened.sock)
        opened.sock.setblocking(True)
        if kernel_has_nbd():
            self.method = "nbd"
            await self._attach_kernel(opened.sock)
        else:
            self.method = "nbdfuse"
            await self._attach_nbdfuse(opened.sock)
        self._write_record()
        if self.mount_path:
            require_program("mount", "mount")
            opts = ["-o", "ro"] if self.read_only else []
            device, mount_path = self.device, self.mount_path
            self._undo.add(lambda: _unmount_device(mount_path, device), "unmount")
            await run_tool(self.state.supervisor, ["mount", *opts, self.device, self.mount_path],
                           "mount")
            self._write_record()
        self.status = "attached"
        log.info("attached %s as %s (%s)", self.source, self.device, self.method)

    async def _attach_kernel(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        export = await loop.run_in_executor(None, negotiate, sock)
        self.read_only = self.read_only or export.read_only
        for n in range(256):
            dev = f"/dev/nbd{n}"
            if not os.path.exists(dev):
                break
            if os.path.exists(f"/sys/block/nbd{n}/pid"):
                continue
            fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
            try:
                # The logical block size of the device: 512, like a disk or a loop
                # device. 4096 would make every filesystem with smaller blocks on the
                # image unmountable (mkfs.ext4 picks 1 KiB blocks below 512 MiB).
                fcntl.ioctl(fd, NBD_SET_BLKSIZE, 512)
                fcntl.ioctl(fd, NBD_SET_SIZE, export.size)
                flags = export.flags | (nbdproto.TFLAG_READ_ONLY if self.read_only else 0)
                fcntl.ioctl(fd, NBD_SET_FLAGS, flags)
                fcntl.ioctl(fd, NBD_SET_TIMEOUT, kernel.DEAD_PEER_SECONDS)
                fcntl.ioctl(fd, NBD_SET_SOCK, sock.fileno())
            except OSError:
                os.close(fd)
                continue
            self._nbd_fd = fd
            self.device = dev
            self._nbd_thread = loop.run_in_executor(None, _do_it, fd)
            self._undo.add(self._disconnect_nbd, f"disconnect {dev}")
            sock.close()  # the kernel holds the connection now
            return
        raise errors.Unavailable("no free /dev/nbdN device")

    async def _attach_nbdfuse(self, sock: socket.socket) -> None:
        nbdfuse = require_program("nbdfuse", "libnbd-bin")
        losetup = require_program("losetup", "mount")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._undo.add(self._remove_dir, "remove the FUSE directory")
        fd = sock.fileno()
        argv = [nbdfuse, *(["-r"] if self.read_only else []), os.path.join(self.dir, "disk"),
                "--fd", str(fd)]
        self._child = await self.state.supervisor.spawn(argv, name=f"nbdfuse-{self.id}",
                                                        pass_fds=[fd], log_to_file=False)
        self._undo.add(self._stop_nbdfuse, "stop nbdfuse")
        sock.close()
        disk = os.path.join(self.dir, "disk")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ATTACH_WAIT
        while not (kernel.top_mount(self.dir) and os.path.exists(disk)):
            if self._child.returncode is not None or loop.time() > deadline:
                raise errors.Unavailable("nbdfuse did not start (see the fs service log)")
            await asyncio.sleep(0.05)
        kernel.set_read_ahead(self.dir, FUSE_READ_AHEAD_KIB)
        out = await run_tool(self.state.supervisor,
                             [losetup, "--find", "--show", "--direct-io=on",
                              *(["--read-only"] if self.read_only else []), disk], "losetup")
        self.device = out.strip()
        self._undo.add(self._detach_loop, f"detach {self.device}")

    # --- watching ---

    async def _wait_broken(self) -> None:
        if self._child is not None:
            await self._child.wait()
        elif self._nbd_thread is not None:
            await asyncio.shield(self._nbd_thread)

    async def _lost(self) -> None:
        # A non-persistent attachment keeps its (failing) device until it is detached.
        if self.persistent:
            await self._teardown()

    # --- detaching ---

    # undo steps (see Session._teardown)

    async def _detach_loop(self) -> None:
        device, self.device = self.device, ""
        await _detach_loop(self.state.supervisor, device)

    async def _disconnect_nbd(self) -> None:
        fd, self._nbd_fd = self._nbd_fd, None
        thread, self._nbd_thread = self._nbd_thread, None
        self.device = ""
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, NBD_DISCONNECT)
            if thread is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(thread), 10)
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, NBD_CLEAR_SOCK)
        finally:
            os.close(fd)

    async def _stop_nbdfuse(self) -> None:
        child, self._child = self._child, None
        with contextlib.suppress(OSError):
            kernel.unmount(self.dir)
        if child is not None:
            await self.state.supervisor.stop(child, grace=2.0)

    def _remove_dir(self) -> None:
        with contextlib.suppress(OSError):
            kernel.unmount(self.dir)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


def _do_it(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, NBD_DO_IT)


def _unmount_device(mount_path: str, device: str) -> bool:
    """Unmount ``mount_path`` if ``device`` is what is mounted there."""
    if not (mount_path and device):
        return False
    top = kernel.top_mount(mount_path)
    if top is None or top.source != device:
        return False
    with contextlib.suppress(OSError):
        kernel.unmount(mount_path)
    return True


async def _detach_loop(supervisor: Supervisor, device: str) -> None:
    with contextlib.suppress(errors.MetacError):
        await run_tool(supervisor, [require_program("losetup", "mount"), "-d", device], "losetup")


async def sweep(state: FsState) -> list[str]:
    """Undo what attachment records of an earlier (crashed) run name."""
    done = []
    nbd_root = os.path.join(state.run_dir, "nbd")
    for record in records(state.records_dir, Attachment.RECORD_PREFIX):
        mount_path = str(record.get("mount") or "")
        if _unmount_device(mount_path, str(record.get("device") or "")):
            done.append(mount_path)
    for dev, backing in kernel.loop_devices().items():
        if backing.startswith(nbd_root + "/"):
            await _detach_loop(state.supervisor, dev)
            done.append(dev)
    if os.path.isdir(nbd_root):
        for name in os.listdir(nbd_root):
            d = os.path.join(nbd_root, name)
            with contextlib.suppress(OSError):
                kernel.unmount(d)
            with contextlib.suppress(OSError):
                os.rmdir(d)  # never rmtree: it could still be a mount point
            done.append(d)
    return done
