"""`metac fs|file|block ...`: share directories, files and disk images; mount and attach them.

Resources are ``local:/PATH`` (on this node; needs root; symlinks in the path
you type are resolved here, by you, before the node's confined walk starts; the
export commands refuse a last component that is a symlink unless ``--follow``,
since whoever can write its directory may have planted it) or ``ref://…``
sturdy refs (of any node).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from metac import api, errors
from metac.cli.connect import Connection, add_group_flag, connection
from metac.cli.output import (
    as_json,
    local_path,
    progress_enabled,
    redact,
    table,
    waiting,
)
from metac.codec.locators import LocalPath, Locator, RefLocator

KINDS = ("local", "ref")
PROGRESS_MIN = 16 << 20
CHUNK = 1 << 20


def register(sub: Any) -> None:
    _register_fs(sub)
    _register_file(sub)
    _register_block(sub)


def _persistent(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--persistent", action="store_true", help=f"{what} survives node restarts")


def _follow(p: argparse.ArgumentParser) -> None:
    p.add_argument("--follow", action="store_true",
                   help="export what a local:/PATH whose last component is a symlink points "
                        "to (refused otherwise)")


def _add_export(s: Any, what: str, read_only: str | None, resource: str,
                func: Any) -> argparse.ArgumentParser:
    ex = s.add_parser("export", help=f"print a sturdy ref to {what}")
    _persistent(ex, "the ref")
    ex.add_argument("--read-only", action="store_true", help=read_only)
    _follow(ex)
    add_group_flag(ex)
    ex.add_argument("resource", help=f"{resource} or a ref to re-export")
    ex.set_defaults(func=func)
    return ex


def _register_fs(sub: Any) -> None:
    p = sub.add_parser("fs", help="share directories; mount them (9p or sshfs)")
    s = p.add_subparsers(dest="cmd", metavar="SUBCOMMAND", required=True)

    ex = _add_export(s, "a directory", "a read-only view", "local:/PATH", fs_export)
    ex.add_argument("--preserve-owners", action="store_true",
                    help="serve as root, keeping owners, setuid bits and device nodes: the "
                         "holder is root-equivalent on the directory (e.g. a container root "
                         "filesystem); default: act as the directory's owner")

    mo = s.add_parser("mount", help="mount a directory (of any node) here; returns once mounted")
    _persistent(mo, "the mount (re-established when this node restarts)")
    mo.add_argument("--read-only", action="store_true",
                    help="mount read-only (writes fail with EROFS)")
    mo.add_argument("--method", choices=("auto", "9p", "sftp", "bind"), default="auto",
                    help="kernel 9p, sshfs (FUSE) or bind (a local:/ directory); "
                         "default: bind for local, else 9p if the kernel has it, else sftp")
    mo.add_argument("resource", help="local:/PATH or ref://…")
    mo.add_argument("path", type=local_path, help="mount point (an existing directory)")
    mo.set_defaults(func=fs_mount)

    um = s.add_parser("umount", help="unmount a mount made with `metac fs mount`")
    um.add_argument("path", type=local_path, help="the mount point")
    um.set_defaults(func=fs_umount)

    ls = s.add_parser("ls", help="mounts made with `metac fs mount` on this node")
    ls.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    ls.set_defaults(func=fs_ls)

    st = s.add_parser("stream", help="print a ref to a stream that serves the directory with "
                                     "9P or SFTP (for external clients, with `metac stream "
                                     "forward`)")
    _persistent(st, "the ref")
    st.add_argument("--protocol", choices=("9p", "sftp"), default="9p",
                    help="the protocol the stream speaks (default 9p)")
    _follow(st)
    st.add_argument("resource", help="local:/PATH or ref://…")
    st.set_defaults(func=fs_stream)


def _register_file(sub: Any) -> None:
    p = sub.add_parser("file", help="share single files; copy them")
    s = p.add_subparsers(dest="cmd", metavar="SUBCOMMAND", required=True)

    _add_export(s, "a file (it need not exist yet)", "a read-only view", "local:/PATH",
                file_export)

    cat = s.add_parser("cat", help="copy a file to stdout")
    cat.add_argument("resource", help="local:/PATH or ref://…")
    cat.set_defaults(func=file_cat)

    put = s.add_parser("put", help="write stdin to a file (created 0644 if missing)")
    put.add_argument("--append", action="store_true",
                     help="append to the file instead of replacing its content")
    put.add_argument("resource", help="local:/PATH or ref://…")
    put.set_defaults(func=file_put)


def _register_block(sub: Any) -> None:
    p = sub.add_parser("block", help="share disk images; attach them as block devices")
    s = p.add_subparsers(dest="cmd", metavar="SUBCOMMAND", required=True)

    _add_export(s, "a disk image as a block device", "the device refuses writes",
                "local:/PATH/disk.img", block_export)

    at = s.add_parser("attach", help="attach a block device here; prints the device path")
    _persistent(at, "the attachment")
    at.add_argument("--read-only", action="store_true", help="attach the device read-only")
    at.add_argument("--mount", metavar="PATH", default="", type=local_path,
                    help="also mount it at PATH")
    at.add_argument("resource", help="ref://… (or local:/PATH)")
    at.set_defaults(func=block_attach)

    de = s.add_parser("detach", help="detach (and unmount) an attached device")
    de.add_argument("device", type=local_path, help="the device path, or the mount path given to attach")
    de.set_defaults(func=block_detach)

    ls = s.add_parser("ls", help="block devices attached with `metac block attach`")
    ls.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    ls.set_defaults(func=block_ls)

    st = s.add_parser("stream", help="print a ref to an NBD stream of the device (for external "
                                     "NBD clients, with `metac stream forward`)")
    _persistent(st, "the ref")
    _follow(st)
    st.add_argument("resource", help="ref://… or local:/PATH")
    st.set_defaults(func=block_stream)


# --- resolving resources ------------------------------------------------------------------


async def fs_admin(conn: Connection) -> Any:
    return await conn.service_admin("fs", api.schema.fs.FilesystemServiceAdmin)


async def resolve(conn: Connection, text: str, interface: Any, *, follow: bool = True,
                  preserve_owners: bool = False) -> tuple[Any, str]:
    """(capability, our address toward its node) for FS/FILE/BLOCK ``text``.

    ``follow=False`` refuses a ``local:`` path whose last component is a symlink;
    ``preserve_owners`` takes it from the root that serves as root (see
    ``FilesystemNamespace.filesystemPreservingOwners``)."""
    loc = Locator.parse(text, allowed=KINDS)
    if isinstance(loc, RefLocator):
        if preserve_owners:
            raise errors.InvalidArgument("--preserve-owners needs a local:/PATH (a ref "
                                         "keeps the owners rule it was exported with)")
        return await conn.restore(loc.ref, interface), conn.address_toward(loc.ref)
    assert isinstance(loc, LocalPath)
    if not follow and os.path.islink(loc.path):
        raise errors.InvalidArgument(f"{loc.path} is a symlink; use --follow")
    real = LocalPath(os.path.realpath(loc.path))
    ns = (await fs_admin(conn)).rootNamespace().ns
    root = (ns.filesystemPreservingOwners() if preserve_owners else ns.filesystem()).fs
    rel = "/".join(real.parts)
    if interface is api.schema.fs.Filesystem:
        cap = root.getSubtree(rel).fs if rel else root
        await cap.info()
    else:
        if not rel:
            raise errors.InvalidArgument("/ is not a file")
        cap = root.getFile(rel).file
        if interface is api.schema.fs.BlockDevice:
            cap = cap.openAsBlock().device
        await cap.info()
    return cap, await conn.node_address()


async def _print_ref(args: argparse.Namespace, interface: Any,
                     derive: Callable[[Any], Any] = lambda cap: cap) -> int:
    """Print a sturdy ref to ``derive(capability of args.resource)``."""
    async with connection() as conn:
        cap, _ = await resolve(conn, args.resource, interface, follow=args.follow,
                               preserve_owners=getattr(args, "preserve_owners", False))
        await conn.export(derive(cap).cast_as(api.schema.core.Persistable), args)
    return 0


def _check_export_kind(text: str, interface: str) -> None:
    """A ``local:`` directory given to `file|block export`, or a file to `fs export`, is
    refused at once with the command that takes it (a missing path is resolve's NotFound)."""
    loc = Locator.parse(text, allowed=KINDS)
    if not isinstance(loc, LocalPath):
        return
    try:
        is_dir = stat.S_ISDIR(os.stat(loc.path).st_mode)
    except OSError:
        return
    if interface == "Filesystem" and not is_dir:
        raise errors.InvalidArgument(f"{loc.path} is not a directory; use metac file export")
    if interface != "Filesystem" and is_dir:
        raise errors.InvalidArgument(f"{loc.path} is a directory; use metac fs export")


def _exporter(interface: str, field: str) -> Callable[[argparse.Namespace], Awaitable[int]]:
    """`metac fs|file|block export` of ``fs.<interface>``; ``field`` names what
    ``readOnly()`` returns."""

    async def export(args: argparse.Namespace) -> int:
        _check_export_kind(args.resource, interface)
        return await _print_ref(args, getattr(api.schema.fs, interface), lambda cap: (
            getattr(cap.readOnly(), field) if args.read_only else cap))

    return export


async def _list(conn: Connection, what: str) -> Any:
    """The mounts or the block attachments of this node's fs service."""
    admin = await fs_admin(conn)
    if what == "mounts":
        return (await admin.rootNamespace().ns.listMounts()).mounts
    return (await admin.listBlockAttachments()).attachments


async def _release(what: str, match: Callable[[Any], bool], done: Callable[[Any], str]) -> bool:
    """Release the holder of the first of ``what`` that matches; False if none does."""
    async with connection() as conn:
        for item in await _list(conn, what):
            if match(item):
                await item.holder.release()
                print(done(item))
                return True
    return False


async def _show(args: argparse.Namespace, what: str, row: Callable[[Any], dict[str, Any]],
                columns: list[str]) -> int:
    async with connection() as conn:
        rows = [row(item) for item in await _list(conn, what)]
    if args.json:
        as_json(rows)
    else:
        table(rows, columns)
    return 0


# --- fs ---------------------------------------------------------------------------------------


fs_export = _exporter("Filesystem", "fs")


async def fs_mount(args: argparse.Namespace) -> int:
    path = checked_mount_point(args.path)
    async with connection() as conn:
        # A local: directory is the admin's own: bind-mounted as root, as `mount --bind`.
        fs, _ = await resolve(conn, args.resource, api.schema.fs.Filesystem,
                              preserve_owners=args.resource.startswith("local:"))
        ns = (await fs_admin(conn)).rootNamespace().ns
        options = api.schema.fs.MountOptions.new_message()
        options.method = "" if args.method == "auto" else args.method
        options.readOnly = args.read_only
        options.keep = True  # the mount outlives this command
        async with waiting(f"mounting {redact(args.resource)} at {path}"):
            holder = (await ns.mountWith(path, fs, options)).holder
            if args.persistent:
                await holder.createSturdyRef(persistent=True)
            mounts = (await ns.listMounts()).mounts
        method = next((m.method for m in mounts if m.path == path), "?")
    print(f"mounted at {path} ({method}{', persistent' if args.persistent else ''})")
    return 0


async def fs_umount(args: argparse.Namespace) -> int:
    wanted = {os.path.normpath(os.path.abspath(args.path)), os.path.realpath(args.path)}
    if await _release("mounts", lambda m: m.path in wanted, lambda m: f"unmounted {m.path}"):
        return 0
    if not os.path.lexists(args.path):
        raise errors.NotFound(f"{os.path.abspath(args.path)}: no such directory")
    raise errors.NotFound(f"{os.path.abspath(args.path)}: not a mount made by `metac fs mount`")


def checked_mount_point(path: str) -> str:
    """The real path of an existing directory to mount on: NotFound with the whole path if
    it does not exist, InvalidArgument if it is something else."""
    real = os.path.realpath(path)
    if not os.path.lexists(real):
        raise errors.NotFound(f"{os.path.abspath(path)}: no such directory")
    if not os.path.isdir(real):
        raise errors.InvalidArgument(f"{os.path.abspath(path)}: not a directory")
    return real


async def fs_ls(args: argparse.Namespace) -> int:
    return await _show(args, "mounts", lambda m: {
        "path": m.path, "method": m.method, "source": m.source, "state": m.state,
        "persistent": bool(m.persistent), "read_only": bool(m.readOnly)},
        ["path", "method", "source", "state", "persistent", "read_only"])


async def fs_stream(args: argparse.Namespace) -> int:
    return await _print_ref(args, api.schema.fs.Filesystem, lambda fs: (
        fs.v9fsStream().stream if args.protocol == "9p" else fs.sftpStream().stream))


# --- file -------------------------------------------------------------------------------------


file_export = _exporter("File", "file")


class Progress:
    """A one-line progress bar on stderr (see output.progress_enabled) for a copy of
    PROGRESS_MIN bytes or more; ``total`` None: the size is not known in advance."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.done = 0
        self.enabled = progress_enabled()
        self.shown = False
        self.start = self._last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last > 0.2:
            self._last = now
            self._show(now)

    def _show(self, now: float) -> None:
        big = (self.total if self.total is not None else self.done) >= PROGRESS_MIN
        if not (self.enabled and big):
            return
        self.shown = True
        rate = self.done / max(now - self.start, 1e-6) / (1 << 20)
        if self.total is None:
            sys.stderr.write(f"\r{self.done >> 20} MiB  {rate:.0f} MiB/s ")
        else:
            pct = 100 * self.done / self.total if self.total else 100
            sys.stderr.write(f"\r{pct:5.1f}%  {self.done >> 20} / {self.total >> 20} MiB  "
                             f"{rate:.0f} MiB/s ")
        sys.stderr.flush()

    def finish(self) -> None:
        """The final state (however fast the copy was), then a newline."""
        self._show(time.monotonic())
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


async def file_cat(args: argparse.Namespace) -> int:
    import asyncio
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        f, local = await resolve(Connection(stack), args.resource, api.schema.fs.File)
        info = (await f.info()).info
        if not info.exists:
            raise errors.NotFound("no such file")
        stream = (await f.openAsStream()).stream
        opened = await stack.enter_async_context(await api.open_stream(stream, local_address=local))
        progress = Progress(info.size)
        buf = bytearray(CHUNK)
        out = sys.stdout.buffer
        while True:
            n = await loop.sock_recv_into(opened.sock, buf)
            if not n:
                break
            out.write(memoryview(buf)[:n])
            progress.add(n)
        out.flush()
        progress.finish()
    return 0


async def file_put(args: argparse.Namespace) -> int:
    import asyncio
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        f, local = await resolve(Connection(stack), args.resource, api.schema.fs.File)
        stream = (await f.openForWrite(args.append)).stream
        opened = await stack.enter_async_context(await api.open_stream(stream, local_address=local))
        sock = opened.sock
        stdin = sys.stdin.buffer.fileno()
        st = os.fstat(stdin)
        progress = Progress(st.st_size if stat.S_ISREG(st.st_mode) else None)
        try:
            while True:
                data = await loop.run_in_executor(None, os.read, stdin, CHUNK)
                if not data:
                    break
                await loop.sock_sendall(sock, data)
                progress.add(len(data))
            sock.shutdown(socket.SHUT_WR)
            # The node closes its side only once everything is written and flushed.
            while await loop.sock_recv(sock, 4096):
                pass
        except ConnectionError as exc:
            raise errors.Unavailable(f"the write was cut off: {exc.strerror or exc}") from None
        finally:
            progress.finish()
    return 0


# --- block ------------------------------------------------------------------------------------


block_export = _exporter("BlockDevice", "device")


async def block_stream(args: argparse.Namespace) -> int:
    return await _print_ref(args, api.schema.fs.BlockDevice, lambda dev: dev.nbdSetup().stream)


async def block_attach(args: argparse.Namespace) -> int:
    mount_path = checked_mount_point(args.mount) if args.mount else ""
    async with connection() as conn:
        dev, _ = await resolve(conn, args.resource, api.schema.fs.BlockDevice)
        options = api.schema.fs.AttachOptions.new_message()
        options.readOnly = args.read_only
        options.mountPath = mount_path
        options.keep = True  # the attachment outlives this command
        admin = await fs_admin(conn)
        async with waiting(f"attaching {redact(args.resource)}"):
            out = await admin.attachBlock(dev, options)
            if args.persistent:
                await out.holder.createSturdyRef(persistent=True)
    print(out.path)
    return 0


async def block_detach(args: argparse.Namespace) -> int:
    wanted = {args.device, os.path.realpath(args.device)}
    if await _release("attachments",
                      lambda a: a.device in wanted or (a.mountPath and a.mountPath in wanted),
                      lambda a: f"detached {a.device or a.source}"):
        return 0
    raise errors.NotFound(f"{args.device}: not attached with `metac block attach`")


async def block_ls(args: argparse.Namespace) -> int:
    return await _show(args, "attachments", lambda a: {
        "device": a.device, "mount": a.mountPath, "method": a.method, "source": a.source,
        "state": a.state, "persistent": bool(a.persistent), "read_only": bool(a.readOnly)},
        ["device", "mount", "method", "source", "state", "persistent", "read_only"])
