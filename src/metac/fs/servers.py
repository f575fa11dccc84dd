"""Serving one data connection: diod (9P), sftp-server (SFTP), nbdkit (NBD), plain file bytes.

Each ``serve_*`` coroutine is the callback of a ``core.streams.HandoffStreamServer``:
it gets the one authorized connection (an ``Endpoint``), starts the server program
on it through the supervisor, sandboxed (``sandbox``), closes its own copy of the
fd, and waits until the program exits (the peer closed the connection). If it is
cancelled (the stream's holder was released or dropped) it stops the program.
One program serves one connection, so nothing is shared between clients.
sftp-server reads the client's requests through ``sftpfilter`` (a thread of ours
between the connection and its stdin), so that no request makes it follow a symlink
where Linux would not and, squashed, no request sets a setuid or setgid bit (they are
cleared); it writes its replies to the connection directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import stat
import subprocess
import threading
from typing import Any

from metac import errors
from metac.core.pump import Endpoint
from metac.core.supervisor import Supervisor, require_program
from metac.fs import sandbox as sb
from metac.fs import sftpfilter, squash
from metac.fs.resolve import Directory, Entry

log = logging.getLogger(__name__)

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
CHILD_GRACE = 2.0
RECV_CHUNK = 1 << 20
#: diod running as uid 0 sets its threads' supplementary groups at start and exits
#: without CAP_SETGID; squashed to a root-owned export it keeps that one capability
#: (with -S every attach is root with root's groups, and the filter still holds).
DIOD_ROOT_KEEPS = ("setgid",)


async def run_on_connection(supervisor: Supervisor, endpoint: Endpoint, box: sb.Sandbox, *,
                            name: str, stdio: bool,
                            rewrites: sftpfilter.Rewrites | None = None) -> int:
    """Run ``box`` on the connection (as stdin/stdout if ``stdio``); wait for it to end.

    ``rewrites`` (stdio only): the program's stdin is a pipe fed through
    ``sftpfilter`` by a thread of ours; it still writes to the connection directly."""
    fd = endpoint.read_fd
    os.set_blocking(fd, True)  # the program does blocking I/O on it
    requests = RequestPump(fd, rewrites) if stdio and rewrites else None
    extra = {"stdin": fd if requests is None else requests.stdin, "stdout": fd} if stdio else {}
    try:
        # One program per connection: its stderr goes to the service's log (no file each).
        child = await supervisor.spawn(box.argv(sb.bwrap()),
                                       name=f"{name}-{secrets.token_hex(4)}",
                                       pass_fds=[*box.pass_fds, *([] if stdio else [fd])],
                                       log_to_file=False, **extra)
    except BaseException:
        if requests is not None:
            requests.close()
        raise
    endpoint.close()  # the program holds the connection now: its exit closes it
    if requests is not None:
        requests.start(name)
    try:
        return await child.wait()
    finally:
        try:
            await supervisor.stop(child, grace=CHILD_GRACE)
        finally:
            if requests is not None:
                await requests.stop()  # cuts the connection before its first await


class RequestPump:
    """The thread that copies the connection into the server's stdin through
    ``sftpfilter.RequestFilter``. The thread owns its fds once started; ``stop``
    shuts the connection down (through a socket of its own), which ends the thread's
    read, and waits for it. A request the filter refuses ends the server's stdin
    (the server exits, which closes the connection)."""

    def __init__(self, conn_fd: int, rewrites: sftpfilter.Rewrites | None = None) -> None:
        self.request_filter = sftpfilter.RequestFilter(rewrites)
        self._sock = socket.socket(fileno=os.dup(conn_fd))
        self._conn = os.dup(conn_fd)
        self.stdin, self._stdin_w = os.pipe()
        self._done: asyncio.Future[None] | None = None

    def start(self, name: str) -> None:
        os.close(self.stdin)  # the server has its copy
        loop = asyncio.get_running_loop()
        done = self._done = loop.create_future()
        conn, stdin_w, request_filter = self._conn, self._stdin_w, self.request_filter

        def run() -> None:
            try:
                sftpfilter.pump(conn, stdin_w, request_filter)  # closes stdin_w
                if request_filter.refused:
                    log.warning("%s: client's stream refused: %s", name, request_filter.refused)
            finally:
                os.close(conn)
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        threading.Thread(target=run, name=f"{name}-requests", daemon=True).start()

    async def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self._done is not None:
            await asyncio.shield(self._done)

    def close(self) -> None:
        """Instead of ``start``: close everything."""
        self._sock.close()
        for fd in (self._conn, self.stdin, self._stdin_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def squashed_box(program: list[str], files: tuple[str, ...], owner: squash.Identity,
                 binds: list[tuple[int, str, bool]], identity_dir: str,
                 keep: tuple[str, ...] = ()) -> sb.Sandbox:
    """``program`` run as ``owner`` with no capability (but ``keep`` if ``owner`` is
    root) and the setuid/setgid filter (``squash``); the caller closes ``seccomp_fd``."""
    setpriv = require_program("setpriv", "util-linux")
    fd = squash.seccomp_fd()
    return sb.Sandbox([*squash.become_argv(setpriv, owner, keep), *program],
                      (*files, *sb.program_files(setpriv)), squash.CAPS_SWITCH, binds=binds,
                      data_files=sb.identity_files(identity_dir, squash.identity_lines(owner)),
                      chdir=sb.EXPORT_DIR, seccomp_fd=fd)


def diod_argv(diod: str, fd: int, read_only: bool, owner: squash.Identity | None) -> list[str]:
    """diod on one inherited connection. Squashed (``owner`` given), it runs as that
    user (``-S``: every attach is mapped to it, and as a non-root diod it switches no
    ids); preserving owners, it runs as root with ``-N`` and switches fsuid per request."""
    argv = [diod, "-f", "-r", str(fd), "-w", str(fd), "-n", "-L", "stderr", "-e", sb.EXPORT_DIR]
    argv += ["-S", "-U", squash.OWNER_NAME] if owner is not None else ["-N"]
    if read_only:
        argv += ["-o", "ro"]
    return argv


def sftp_argv(read_only: bool) -> list[str]:
    """sftp-server with umask 0 (``-u 0``): the client already applied its own umask to
    the modes it sends, so the server must not mask them again."""
    return [SFTP_SERVER, "-e", "-d", sb.EXPORT_DIR, "-u", "0", *(["-R"] if read_only else [])]


def file_server_box(program: list[str], files: tuple[str, ...], caps: tuple[str, ...],
                    own: Directory, read_only: bool, owner: squash.Identity | None,
                    identity_dir: str, keep: tuple[str, ...] = ()) -> sb.Sandbox:
    """The sandbox of a directory server: squashed to ``owner`` (keeping ``keep`` if
    that is root), or root with ``caps``."""
    binds = [(own.fd, sb.EXPORT_DIR, read_only)]
    if owner is not None:
        return squashed_box(program, files, owner, binds, identity_dir, keep)
    return sb.Sandbox(program, files, caps, binds=binds,
                      data_files=sb.identity_files(identity_dir), chdir=sb.EXPORT_DIR)


async def _serve_directory(supervisor: Supervisor, box_of: Any, directory: Directory,
                           endpoint: Endpoint, *, name: str, stdio: bool,
                           rewrites: sftpfilter.Rewrites | None = None) -> None:
    own = directory.dup()
    box = None
    try:
        box = box_of(own)
        await run_on_connection(supervisor, endpoint, box, name=name, stdio=stdio,
                                rewrites=rewrites)
    finally:
        own.close()
        if box is not None and box.seccomp_fd >= 0:
            os.close(box.seccomp_fd)


async def serve_9p(supervisor: Supervisor, identity_dir: str, directory: Directory,
                   read_only: bool, owner: squash.Identity | None, endpoint: Endpoint) -> None:
    """diod serving ``directory`` (as aname /export) on the connection's fd."""
    diod = require_program("diod", "diod")
    argv = diod_argv(diod, endpoint.read_fd, read_only, owner)
    await _serve_directory(supervisor, lambda own: file_server_box(
        argv, sb.program_files(diod), sb.CAPS_DIOD, own, read_only, owner, identity_dir,
        DIOD_ROOT_KEEPS), directory, endpoint, name="diod", stdio=False)


async def serve_sftp(supervisor: Supervisor, identity_dir: str, directory: Directory,
                     read_only: bool, owner: squash.Identity | None, endpoint: Endpoint) -> None:
    """sftp-server (no SSH layer) serving ``directory`` (as /export) on stdin/stdout."""
    if not os.access(SFTP_SERVER, os.X_OK):
        raise errors.MissingDependency(SFTP_SERVER, "openssh-sftp-server")
    # SETSTAT becomes lsetstat (never follows a symlink) where the server has it;
    # squashed, modes lose their setuid/setgid bits (nosuid) instead of failing.
    rewrites = sftpfilter.Rewrites(lsetstat=sftpfilter.server_has_lsetstat(SFTP_SERVER),
                                   strip_setid=owner is not None)
    await _serve_directory(supervisor, lambda own: file_server_box(
        sftp_argv(read_only), sb.program_files(SFTP_SERVER), sb.CAPS_FILE_SERVER, own,
        read_only, owner, identity_dir),
        directory, endpoint, name="sftp-server", stdio=True, rewrites=rewrites)


@functools.lru_cache(maxsize=1)
def _nbdkit_plugin_dir() -> str:
    nbdkit = require_program("nbdkit", "nbdkit")
    proc = subprocess.run([nbdkit, "--dump-config"], capture_output=True, text=True, timeout=30,
                          check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("plugindir="):
            return line.partition("=")[2]
    raise errors.MissingDependency("nbdkit file plugin", "nbdkit")


def open_image(entry: Entry) -> int:
    """An O_PATH fd of the disk image at ``entry`` (a regular file, never a symlink)."""
    fd = entry.open(os.O_PATH)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise errors.FailedPrecondition(f"{entry.name}: not a regular file (symlinks are not "
                                        "followed; only disk image files can be exported)")
    return fd


async def serve_nbd(supervisor: Supervisor, entry: Entry, read_only: bool,
                    endpoint: Endpoint) -> None:
    """``nbdkit -s file`` serving the image on stdin/stdout; ``-r`` for read-only devices."""
    nbdkit = require_program("nbdkit", "nbdkit")
    plugin = os.path.join(_nbdkit_plugin_dir(), "nbdkit-file-plugin.so")
    fd = open_image(entry)
    try:
        argv = [nbdkit, "-s", "-f", *(["-r"] if read_only else []), "file", sb.EXPORT_FILE]
        box = sb.Sandbox(argv, sb.program_files(nbdkit, plugin), sb.CAPS_NBDKIT,
                         binds=[(fd, sb.EXPORT_FILE, read_only)])
        await run_on_connection(supervisor, endpoint, box, name="nbdkit", stdio=True)
    finally:
        os.close(fd)


def _socket_of(endpoint: Endpoint) -> socket.socket:
    sock = socket.socket(fileno=os.dup(endpoint.read_fd))
    endpoint.close()
    sock.setblocking(False)
    return sock


async def _finish(sock: socket.socket, timeout: float = 30.0) -> None:
    """Half-close, then wait for the peer to close (so no unread byte turns into a reset)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(timeout):
            while await loop.sock_recv(sock, 65536):
                pass


async def send_file(entry: Entry, owner: squash.Identity | None, endpoint: Endpoint) -> None:
    """The file's bytes, then EOF (sendfile: no copy through this process)."""
    fd = entry.open_regular(os.O_RDONLY, owner=owner)
    sock = _socket_of(endpoint)
    try:
        with open(fd, "rb", closefd=True) as f:
            await asyncio.get_running_loop().sock_sendfile(sock, f)
        await _finish(sock)
    except (ConnectionError, TimeoutError):
        pass
    finally:
        sock.close()


async def receive_file(entry: Entry, append: bool, owner: squash.Identity | None,
                       endpoint: Endpoint) -> None:
    """Write what arrives until EOF to the file, fsync, then close (see File.openForWrite)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = entry.open_regular(flags, owner=owner)
    sock = _socket_of(endpoint)
    loop = asyncio.get_running_loop()
    buf = bytearray(RECV_CHUNK)
    try:
        while True:
            n = await loop.sock_recv_into(sock, buf)
            if not n:
                break
            view = memoryview(buf)[:n]
            while view:
                view = view[os.write(fd, view):]
        await loop.run_in_executor(None, os.fsync, fd)
        await _finish(sock)
    except (ConnectionError, TimeoutError):
        pass  # the writer went away: what arrived is written, nothing is acknowledged
    finally:
        os.close(fd)
        sock.close()
