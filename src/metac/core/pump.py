"""The pump: copy a byte stream both ways between two endpoints in this process.

* An **endpoint** is one end of a byte stream here: an fd to read from, an fd to
  write to (the same fd for a socket), how to end writing (half-close) and how to
  close everything.
* A **pump** copies both directions between two endpoints until both ended or
  one failed. It uses ``os.splice`` (through a pipe, so bytes never enter user
  space) when both fds allow it, else ``read``/``write``. EOF on one side becomes
  a half-close (``shutdown(SHUT_WR)`` or closing a pipe) on the other.

No RPC here: ``metac.core.sources`` makes endpoints, ``metac.core.streams``
serves and opens them as Stream capabilities.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
from collections.abc import Callable

log = logging.getLogger(__name__)

PIPE_SIZE = 1 << 20  # the splice pipe (fs.pipe-max-size is 1 MiB by default)
COPY_CHUNK = 1 << 17

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_NO_SPLICE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ESPIPE}
_DEV_NULL = os.makedev(1, 3)


# --- endpoints ----------------------------------------------------------------


class Endpoint:
    """One end of a byte stream: read fd, write fd, half-close and close. Owns its fds."""

    def __init__(self, read_fd: int, write_fd: int, *, shutdown_write: Callable[[], None],
                 close: Callable[[], None], name: str = "endpoint") -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.name = name
        self._shutdown_write = shutdown_write
        self._close = close
        self.closed = False

    @classmethod
    def of_socket(cls, sock: socket.socket, name: str = "socket") -> Endpoint:
        sock.setblocking(False)
        fd = sock.fileno()
        return cls(fd, fd, shutdown_write=lambda: sock.shutdown(socket.SHUT_WR),
                   close=sock.close, name=name)

    @classmethod
    def of_fds(cls, read_fd: int, write_fd: int, name: str = "fds") -> Endpoint:
        """Two distinct fds (pipes, a file and /dev/null); ending writing closes ``write_fd``."""
        for fd in (read_fd, write_fd):
            if _pollable(fd):
                os.set_blocking(fd, False)
        open_fds = {read_fd, write_fd}

        def close_fd(fd: int) -> None:
            if fd in open_fds:
                open_fds.discard(fd)
                os.close(fd)

        def close_all() -> None:
            close_fd(read_fd)
            close_fd(write_fd)

        return cls(read_fd, write_fd, shutdown_write=lambda: close_fd(write_fd),
                   close=close_all, name=name)

    @classmethod
    def of_stdio(cls, read_fd: int = 0, write_fd: int = 1) -> Endpoint:
        """This process's stdin/stdout (for the CLI). Ending writing points ``write_fd`` at
        /dev/null, so the reader sees EOF; closing restores the fds' blocking modes."""
        saved = {fd: os.get_blocking(fd) for fd in (read_fd, write_fd)}
        for fd in saved:
            if _pollable(fd):
                os.set_blocking(fd, False)

        def end_writing() -> None:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.dup2(null, write_fd)
            finally:
                os.close(null)

        def close() -> None:
            for fd, blocking in saved.items():
                with contextlib.suppress(OSError):
                    os.set_blocking(fd, blocking)

        return cls(read_fd, write_fd, shutdown_write=end_writing, close=close, name="stdio")

    def shutdown_write(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                self._shutdown_write()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self._close()


def _pollable(fd: int) -> bool:
    """Can epoll wait on fd? (Regular files and /dev/null are always ready instead.)"""
    mode = os.fstat(fd).st_mode
    return stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode) or (stat.S_ISCHR(mode) and os.isatty(fd))


def _can_splice(fd: int, *, write: bool) -> bool:
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):  # splice cannot append (EINVAL on O_APPEND files)
        return not (write and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)
    if stat.S_ISSOCK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return True
    return write and stat.S_ISCHR(st.st_mode) and st.st_rdev == _DEV_NULL


# TCP states (include/net/tcp_states.h), the first byte of struct tcp_info.
_TCP_FIN_WAIT1, _TCP_TIME_WAIT, _TCP_CLOSE, _TCP_CLOSE_WAIT, _TCP_LAST_ACK, _TCP_CLOSING = \
    4, 6, 7, 8, 9, 11
PEER_SENT_FIN = {_TCP_TIME_WAIT, _TCP_CLOSE, _TCP_CLOSE_WAIT, _TCP_LAST_ACK, _TCP_CLOSING}
OUR_FIN_UNACKED = {_TCP_FIN_WAIT1, _TCP_LAST_ACK, _TCP_CLOSING}


def tcp_state(fd: int) -> int | None:
    """The TCP state of a socket fd (None: not a TCP socket)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET,
                                                                      socket.AF_INET6):
                return None
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return None


async def _wait_fds(read_fd: int | None, write_fd: int | None) -> None:
    """Wait until ``read_fd`` is readable or ``write_fd`` is writable (None: not waited on)."""
    if read_fd is None and write_fd is None:
        await asyncio.sleep(0)
        return
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if read_fd is not None:
        loop.add_reader(read_fd, wake)
    if write_fd is not None:
        loop.add_writer(write_fd, wake)
    try:
        await ready
    finally:
        if read_fd is not None:
            loop.remove_reader(read_fd)
        if write_fd is not None:
            loop.remove_writer(write_fd)


# --- pump -----------------------------------------------------------------------


class _Direction:
    """Copies src -> dst until EOF, then half-closes dst."""

    def __init__(self, src: Endpoint, dst: Endpoint) -> None:
        self.src = src
        self.dst = dst
        self.label = f"{src.name} -> {dst.name}"
        self.bytes = 0
        self.eof = False  # src ended: only flushing what was read
        self.spliced = False
        self.waits = 0  # times the direction slept (for the debug log and tuning)
        self._rwait = src.read_fd if _pollable(src.read_fd) else None
        self._wwait = dst.write_fd if _pollable(dst.write_fd) else None

    async def run(self) -> None:
        spliceable = _can_splice(self.src.read_fd, write=False) and \
            _can_splice(self.dst.write_fd, write=True)
        if not (spliceable and await self._splice()):
            await self._copy()
        self.dst.shutdown_write()

    async def _splice(self) -> bool:
        """Zero-copy through a pipe. False if the kernel refused before any byte moved."""
        pr, pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(pw, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            cap = fcntl.fcntl(pw, fcntl.F_GETPIPE_SZ)
            src, dst = self.src.read_fd, self.dst.write_fd
            buffered = 0
            while True:
                moved = False
                if not self.eof and buffered < cap:
                    try:
                        n = os.splice(src, pw, cap - buffered, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        pass
                    except OSError as exc:
                        if exc.errno in _NO_SPLICE and not self.spliced and not buffered:
                            return False
                        raise
                    else:
                        self.spliced = True
                        moved = True
                        if n:
                            buffered += n
                        else:
                            self.eof = True
                if buffered:
                    try:
                        n = os.splice(pr, dst, buffered, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        pass
                    else:
                        buffered -= n
                        self.bytes += n
                        moved = True
                if self.eof and not buffered:
                    return True
                if not moved:
                    # Nothing moved either way. With bytes in the pipe, wait for the
                    # destination only: the pipe can be full below ``cap`` bytes (it has
                    # cap / page-size slots and a socket fills one per skb fragment, which
                    # is often less than a page), and then splicing into it fails with
                    # EAGAIN while the source stays readable, so waiting on the source as
                    # well would spin until the destination drains. Reading resumes after
                    # the next write. With an empty pipe, only the source can unblock us.
                    self.waits += 1
                    if buffered:
                        await _wait_fds(None, self._wwait)
                    else:
                        await _wait_fds(self._rwait, None)
        finally:
            os.close(pr)
            os.close(pw)

    async def _copy(self) -> None:
        src, dst = self.src.read_fd, self.dst.write_fd
        while True:
            try:
                data = os.read(src, COPY_CHUNK)
            except BlockingIOError:
                await _wait_fds(self._rwait, None)
                continue
            if not data:
                self.eof = True
                return
            view = memoryview(data)
            while view:
                try:
                    n = os.write(dst, view)
                except BlockingIOError:
                    await _wait_fds(None, self._wwait)
                    continue
                view = view[n:]
                self.bytes += n


class Pump:
    """Pipes two endpoints both ways until both directions ended or one failed; closes both."""

    def __init__(self, a: Endpoint, b: Endpoint, name: str = "pump") -> None:
        self.name = name
        self.endpoints = (a, b)
        self.directions = (_Direction(a, b), _Direction(b, a))
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self.error: BaseException | None = None

    @property
    def spliced(self) -> bool:
        return all(d.spliced for d in self.directions if d.bytes)

    async def run(self) -> None:
        try:
            if not self._stopped:
                async with asyncio.TaskGroup() as tg:
                    self._tasks = [tg.create_task(d.run(), name=f"{self.name}: {d.label}")
                                   for d in self.directions]
        except* OSError as group:
            self.error = group.exceptions[0]
            log.debug("%s ended: %s", self.name, self.error)
        finally:
            for endpoint in self.endpoints:
                endpoint.close()
            log.debug("%s done (%d / %d bytes, %d / %d waits, splice=%s)", self.name,
                      self.directions[0].bytes, self.directions[1].bytes,
                      self.directions[0].waits, self.directions[1].waits, self.spliced)

    def stop(self) -> bool:
        """Abort the directions whose source may still send; one whose source ended (EOF
        read, or a TCP peer's FIN received) may finish flushing. True if one is left."""
        self._stopped = True
        draining = False
        for direction, task in zip(self.directions, self._tasks, strict=False):
            if task.done():
                continue
            if direction.eof or tcp_state(direction.src.read_fd) in PEER_SENT_FIN:
                draining = True
            else:
                task.cancel()
        return draining


async def pipe_endpoints(a: Endpoint, b: Endpoint, name: str = "pump") -> Pump:
    """Pump between ``a`` and ``b`` until done (closes both); the finished pump."""
    pump = Pump(a, b, name)
    await pump.run()
    return pump
