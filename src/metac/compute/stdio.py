"""A process's file descriptors 0, 1 and 2 as streams (ProcessDescription.files).

Each entry without a terminal is one end of a unix socket pair: the process
gets one end as its fd (a socket reads and writes, like the bidirectional
Stream it stands for); our end is either served as a new Stream
(``Process.file(i)``, opened once by whoever asks) or, when the caller gave a
Stream, pumped to it at once. Missing entries are /dev/null.

``isPty`` gives the process a terminal as fds 0-2: the runtime allocates it in
the container and sends us its master end over a unix socket
(``--console-socket``). The master is served (or bound) like any other stream;
a half-close from the peer is ignored (a terminal cannot be half-closed; a
program sees end of input when the user types the EOF character), and the
stream ends when the last process holding the terminal is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
import termios
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from metac import errors
from metac.core.pump import Endpoint
from metac.core.sources import OneShotSource
from metac.core.streams import Session, StreamHost, StreamServer

log = logging.getLogger(__name__)

STDIO_FDS = 3
CONSOLE_TIMEOUT = 30.0


@dataclass
class FdSpec:
    """One entry of ProcessDescription.files: a terminal or not, a Stream to use or None."""

    is_pty: bool = False
    stream: Any = None


def check_fd_specs(specs: Sequence[FdSpec]) -> bool:
    """Validate; True if the process gets a terminal."""
    if len(specs) > STDIO_FDS:
        raise errors.Unsupported(f"at most {STDIO_FDS} files (stdin, stdout, stderr) are "
                                 "supported")
    terminal = bool(specs) and specs[0].is_pty
    for i, spec in enumerate(specs):
        if spec.is_pty != terminal:
            raise errors.InvalidArgument(
                "a terminal is fds 0, 1 and 2 at once: set isPty on every entry of files or "
                "on none")
        if terminal and i > 0 and spec.stream is not None:
            raise errors.InvalidArgument("with isPty, only files[0] may carry a stream: the "
                                         "terminal is one stream")
    return terminal


def set_window_size(fd: int, rows: int, cols: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _terminal_endpoint(master: int, name: str) -> Endpoint:
    os.set_blocking(master, False)
    return Endpoint(master, master, shutdown_write=lambda: None,
                    close=lambda: os.close(master), name=name)


class Stdio:
    """fds 0-2 of one process; ``child_fds`` go to the runtime, ``stream(i)`` to callers."""

    def __init__(self, host: StreamHost, specs: Sequence[FdSpec], name: str,
                 console_size: tuple[int, int] | None = None) -> None:
        self.host = host
        self.name = name
        self.specs = list(specs)
        self.terminal = check_fd_specs(self.specs)
        self.console_size = console_size
        self.child_fds: list[int] = []
        self._servers: list[Any] = [None] * STDIO_FDS
        self._sessions: list[Session] = []
        self._pending: list[tuple[int, Endpoint]] = []  # (index, endpoint) to bind
        self._owned: list[Any] = []  # endpoints not yet handed to a server or session

    def prepare(self) -> None:
        """Create the fds the runtime passes to the process."""
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            if self.terminal:
                self.child_fds = [devnull] * STDIO_FDS
                return
            for i in range(STDIO_FDS):
                if i >= len(self.specs):
                    self.child_fds.append(devnull)
                    continue
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                self.child_fds.append(theirs.detach())
                endpoint = Endpoint.of_socket(ours, name=f"{self.name} fd {i}")
                self._adopt(i, endpoint)
        except BaseException:
            self.close_child_fds()
            os.close(devnull)
            raise
        self._devnull = devnull

    def _adopt(self, index: int, endpoint: Endpoint) -> None:
        spec = self.specs[index] if index < len(self.specs) else FdSpec()
        if spec.stream is not None:
            self._pending.append((index, endpoint))
            self._servers[index] = spec.stream
        else:
            server = StreamServer(self.host, OneShotSource(endpoint),
                                  name=f"{self.name} fd {index}")
            self._servers[index] = server
        self._owned.append(endpoint)

    def attach_terminal(self, master: int) -> None:
        """The runtime sent the terminal's master end: serve it as fds 0-2."""
        if self.console_size is not None:
            set_window_size(master, *self.console_size)
        endpoint = _terminal_endpoint(master, f"{self.name} terminal")
        self._adopt(0, endpoint)
        for i in range(1, len(self.specs)):
            self._servers[i] = self._servers[0]

    def close_child_fds(self) -> None:
        """After the runtime has passed them on (or failed): close our copies."""
        for fd in set(self.child_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.child_fds = []
        devnull = getattr(self, "_devnull", None)
        if devnull is not None:
            with contextlib.suppress(OSError):
                os.close(devnull)
            self._devnull = None

    async def bind_given_streams(self) -> None:
        """Pump the fds whose caller gave a Stream to that stream (starts at once)."""
        pending, self._pending = self._pending, []
        for index, endpoint in pending:
            try:
                remote = await self.host.open_remote(self.specs[index].stream,
                                                     what=f"the stream given for fd {index}")
            except BaseException:
                endpoint.close()
                for _, other in pending:
                    other.close()
                raise
            session = Session(self.host, endpoint, f"{self.name} fd {index} bound")
            session.start_pumping(remote)
            self._sessions.append(session)

    def stream(self, index: int) -> Any:
        if not 0 <= index < len(self.specs):
            raise errors.NotFound(f"the process has no file {index} (it has {len(self.specs)})")
        server = self._servers[index]
        if server is None:
            raise errors.FailedPrecondition("the terminal is not ready")
        return server

    async def aclose(self) -> None:
        """Close everything: bound pumps, served-but-unopened ends, our copies."""
        self.close_child_fds()
        owned, self._owned = self._owned, []
        sessions, self._sessions = self._sessions, []
        # Sessions a peer opened through tcpListen use our endpoints too.
        sessions += [s for s in self.host.sessions if any(s.endpoint is e for e in owned)]
        await asyncio.gather(*(s.aclose() for s in sessions), return_exceptions=True)
        for endpoint in owned:
            endpoint.close()  # idempotent; closes the ends nobody opened
        self._servers = [None] * STDIO_FDS


class ConsoleReceiver:
    """A unix socket the runtime connects to, to hand over a terminal's master fd."""

    def __init__(self, path: str) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(1)
        self._sock.setblocking(False)

    async def receive(self, timeout: float = CONSOLE_TIMEOUT) -> int:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            conn, _ = await loop.sock_accept(self._sock)
            with conn:
                while True:
                    try:
                        _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
                    except BlockingIOError:
                        ready = loop.create_future()
                        loop.add_reader(conn.fileno(), ready.set_result, None)
                        try:
                            await ready
                        finally:
                            loop.remove_reader(conn.fileno())
                        continue
                    if not fds:
                        raise errors.Internal("the runtime sent no terminal")
                    for extra in fds[1:]:
                        os.close(extra)
                    return fds[0]

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
