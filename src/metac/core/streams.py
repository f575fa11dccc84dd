"""Streams (paper 3.1): serve byte streams as Stream capabilities, open them, pipe them.

Vocabulary:

* An **endpoint** is one end of a byte stream in this process: an fd to read
  from, an fd to write to (the same fd for a socket), how to end writing
  (half-close) and how to close everything.
* A **source** makes endpoints. ``open()`` gives a fresh one each time (a TCP
  or unix endpoint: every use is a new connection) or the only one it has (a
  file, a process's stdio, one end of a memory pair: "one-shot").
* A **pump** copies both directions between two endpoints until both ended or
  one failed. It uses ``os.splice`` (through a pipe, so bytes never enter
  user space) when both fds allow it, else ``read``/``write``. EOF on one side
  becomes a half-close (``shutdown(SHUT_WR)`` or closing a pipe) on the other.
* ``StreamServer`` serves a source as a Stream capability. ``tcpListen`` opens
  the source, listens on the node address on an ephemeral port and accepts
  exactly one connection, from exactly ``remote:remotePort``; any other
  connection is reset at once, without data; the listener goes away after
  ``StreamHost.listen_timeout``. ``bindTo`` opens the source and the other
  stream (with ``open_stream``) and pumps between them. Both return a holder:
  dropping or releasing it closes everything they opened.
* ``open_stream`` is the client side: bind our address with port 0 (no
  SO_REUSEADDR), ask for ``tcpListen`` with that address and port, connect
  from that socket. The bytes go straight between the two machines, whichever
  node the capability came through.

``StreamHost`` owns every session a process serves (their tasks and sockets);
a service creates one and closes it at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from metac import errors
from metac.core.holder import HolderServer
from metac.core.rpc import rpc_errors
from metac.core.service import Description, PersistableMixin, ServiceContext
from metac.core.supervisor import Child, Supervisor
from metac.schema.load import stream as stream_schema

log = logging.getLogger(__name__)

LISTEN_TIMEOUT = 30.0  # a tcpListen nobody connects to is closed after this
CONNECT_TIMEOUT = 10.0
DRAIN_GRACE = 10.0  # on release, a direction whose source ended may flush this long
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
_PEER_SENT_FIN = {_TCP_TIME_WAIT, _TCP_CLOSE, _TCP_CLOSE_WAIT, _TCP_LAST_ACK, _TCP_CLOSING}
_OUR_FIN_UNACKED = {_TCP_FIN_WAIT1, _TCP_LAST_ACK, _TCP_CLOSING}


def _tcp_state(fd: int) -> int | None:
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
                    self.waits += 1
                    await _wait_fds(self._rwait if not self.eof and buffered < cap else None,
                                    self._wwait if buffered else None)
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
            if direction.eof or _tcp_state(direction.src.read_fd) in _PEER_SENT_FIN:
                draining = True
            else:
                task.cancel()
        return draining


async def pipe_endpoints(a: Endpoint, b: Endpoint, name: str = "pump") -> Pump:
    """Pump between ``a`` and ``b`` until done (closes both); the finished pump."""
    pump = Pump(a, b, name)
    await pump.run()
    return pump


def _problem(exc: BaseException) -> str:
    errno_ = getattr(exc, "errno", None)
    return os.strerror(errno_) if errno_ else "timed out"


# --- sources --------------------------------------------------------------------


class Source:
    """Makes endpoints for a StreamServer."""

    async def open(self) -> Endpoint:
        raise NotImplementedError

    def close(self) -> None:
        """The server is gone: release what was never opened."""


class TcpSource(Source):
    """A TCP endpoint; every ``open`` is a new connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    async def open(self) -> Endpoint:
        loop = asyncio.get_running_loop()
        shown = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise errors.Unavailable(f"cannot resolve {self.host}: {exc}") from None
        problem = "no address"
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, addr), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                sock.close()
                problem = _problem(exc)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return Endpoint.of_socket(sock, name=f"tcp:{shown}")
        raise errors.Unavailable(f"cannot connect to tcp:{shown}: {problem}")


class UnixSource(Source):
    """A unix stream socket; every ``open`` is a new connection."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def open(self) -> Endpoint:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, self.path),
                                   CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise errors.Unavailable(
                f"cannot connect to unix:{self.path}: {_problem(exc)}") from None
        return Endpoint.of_socket(sock, name=f"unix:{self.path}")


class OneShotSource(Source):
    """An endpoint that exists once (a file, a process's stdio, a memory pair)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint: Endpoint | None = endpoint

    async def open(self) -> Endpoint:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is None:
            raise errors.FailedPrecondition("this stream can be opened only once and was")
        return endpoint

    def close(self) -> None:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            endpoint.close()


def file_source(fd: int) -> OneShotSource:
    """A file read as a stream (takes ``fd``); what the peer sends is discarded."""
    return OneShotSource(Endpoint.of_fds(fd, os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC),
                                         name="file"))


def stdio_source(stdout_fd: int, stdin_fd: int) -> OneShotSource:
    """A process's stdio, from our ends of its pipes (takes both fds)."""
    return OneShotSource(Endpoint.of_fds(stdout_fd, stdin_fd, name="stdio"))


# --- serving --------------------------------------------------------------------


def _parse_peer(ip: str, port: int) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise errors.InvalidArgument("remote must be an IP address") from None
    if not 1 <= port <= 65535:
        raise errors.InvalidArgument("remotePort must be in 1..65535")
    return addr, port


def _same_peer(sockaddr: Sequence[Any], want: tuple[Any, int]) -> bool:
    try:
        addr = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return (addr, int(sockaddr[1])) == want


def _reject(conn: socket.socket) -> None:
    """Close an unauthorized connection at once, without data (RST)."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    conn.close()


class StreamHost:
    """Owns the stream sessions one process serves: their tasks, listeners and pumps."""

    def __init__(self, address: str, *, listen_timeout: float = LISTEN_TIMEOUT) -> None:
        self.address = str(ipaddress.ip_address(address))
        self.listen_timeout = listen_timeout
        self._tasks: set[asyncio.Task[Any]] = set()
        self.sessions: set[Session] = set()
        self.rejected = 0  # connections reset because they came from the wrong peer

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def listen(self, peer: tuple[Any, int]) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        if (peer[0].version == 6) != (family == socket.AF_INET6):
            raise errors.InvalidArgument(
                f"remote is IPv{peer[0].version} but this node listens on {self.address}")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((self.address, 0))
            sock.listen(8)
        except OSError as exc:
            sock.close()
            raise errors.Unavailable(f"cannot listen on {self.address}: {exc.strerror}") from None
        sock.setblocking(False)
        return sock

    async def aclose(self) -> None:
        for session in list(self.sessions):
            session.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Session:
    """One use of a stream: wait for the one peer (or take an opened stream), then pump."""

    def __init__(self, host: StreamHost, endpoint: Endpoint, name: str) -> None:
        self.host = host
        self.endpoint = endpoint
        self.name = name
        self.pump: Pump | None = None
        self.finished = asyncio.Event()
        self._listener: socket.socket | None = None
        self._remote: OpenedStream | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start_listening(self, listener: socket.socket, peer: tuple[Any, int]) -> None:
        self._listener = listener
        self._start(self._accept(listener, peer))

    def start_pumping(self, remote: OpenedStream) -> None:
        self._remote = remote

        async def opened() -> Endpoint:
            return remote.endpoint("peer")

        self._start(opened())

    def _start(self, get_peer: Any) -> None:
        self.host.sessions.add(self)
        self._task = self.host.spawn(self._run(get_peer), self.name)

    async def _run(self, get_peer: Any) -> None:
        peer: Endpoint | None = None
        try:
            peer = await get_peer
            if peer is not None and not self._stopping:
                self.pump = Pump(self.endpoint, peer, self.name)
                await self.pump.run()
        except Exception:  # nobody awaits this task: a bug must at least be logged
            log.exception("%s failed", self.name)
        finally:
            if peer is not None:
                peer.close()
            await self._cleanup()

    async def _cleanup(self) -> None:
        self.endpoint.close()
        if self._listener is not None:
            self._listener.close()
        self.host.sessions.discard(self)
        self.finished.set()
        remote, self._remote = self._remote, None
        if remote is not None:
            await remote.aclose()

    async def _accept(self, listener: socket.socket, peer: tuple[Any, int]) -> Endpoint | None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.host.listen_timeout):
                while True:
                    conn, addr = await loop.sock_accept(listener)
                    if _same_peer(addr, peer):
                        break
                    self.host.rejected += 1
                    log.info("%s: reset a connection from an unauthorized peer", self.name)
                    _reject(conn)
        except TimeoutError:
            log.info("%s: nobody connected within %g s; closed", self.name,
                     self.host.listen_timeout)
            return None
        finally:
            listener.close()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Endpoint.of_socket(conn, name="peer")

    def stop(self) -> bool:
        """Close what may still carry new data; a finite remainder may flush (bounded).
        True if such a flush goes on."""
        self._stopping = True
        if self.pump is not None and self.pump.stop():
            asyncio.get_running_loop().call_later(DRAIN_GRACE, self._abort)
            return True
        self._abort()
        return False

    def _abort(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def aclose(self) -> None:
        """Stop; returns once everything is closed or only a bounded flush is left."""
        if self.stop():
            return
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await self._cleanup()  # also when the task was cancelled before it ran


class StreamServer(PersistableMixin, stream_schema.Stream.Server):
    """A source served as a Stream capability (persistable if given a description)."""

    def __init__(self, host: StreamHost, source: Source, *, name: str = "stream",
                 ctx: ServiceContext | None = None,
                 description: Description | None = None) -> None:
        self._host = host
        self._source = source
        self._name = name
        self._ctx = ctx  # type: ignore[assignment]
        self._description = description

    def _describe(self) -> Description:
        if self._ctx is None or self._description is None:
            raise errors.Unsupported(f"{self._name} cannot be persisted")
        return self._description

    async def tcpListen(self, remote: Any, remotePort: int, _context: Any, **kwargs: Any) -> None:
        peer = _parse_peer(remote.ip, remotePort)
        listener = self._host.listen(peer)
        try:
            endpoint = await self._source.open()
        except BaseException:
            listener.close()
            raise
        session = Session(self._host, endpoint, f"{self._name} for {remote.ip}:{remotePort}")
        session.start_listening(listener, peer)
        local = _context.results.init("local")
        local.ip = self._host.address
        _context.results.port = listener.getsockname()[1]
        _context.results.holder = HolderServer(session.aclose, f"{self._name} connection")

    async def bindTo(self, other: Any, _context: Any, **kwargs: Any) -> None:
        other = other.cast_as(stream_schema.Stream)
        if self._ctx is not None:
            # `other` is proxied through the caller's connection; the bind must outlive
            # the caller, so reach the stream directly if it is persistable.
            try:
                async with rpc_errors():
                    other = await self._ctx.adopt(other, stream_schema.Stream)
            except errors.MetacError as exc:
                log.debug("%s: keeping the caller's reference to the other stream (%s)",
                          self._name, exc)
        endpoint = await self._source.open()
        try:
            remote = await open_stream(other, local_address=self._host.address)
        except BaseException:
            endpoint.close()
            raise
        session = Session(self._host, endpoint, f"{self._name} bound")
        session.start_pumping(remote)
        if self._ctx is not None and self._description is not None:
            _context.results.holder = BindHolder(session, self._ctx, [self, other])
        else:
            _context.results.holder = HolderServer(session.aclose, f"{self._name} bind")

    def __del__(self) -> None:
        self._source.close()


class BindHolder(PersistableMixin, HolderServer):
    """Holder of a bind that can be made persistent: restored (re-bound) at service start."""

    CATEGORY = "bind"

    def __init__(self, session: Session, ctx: ServiceContext, streams: list[Any]) -> None:
        super().__init__(session.aclose, "stream bind")
        self._ctx = ctx
        self._streams = streams

    def _describe(self) -> Description:
        return Description(self.CATEGORY, {}, caps=list(self._streams), active=True)


async def restore_bind(ctx: ServiceContext, data: dict[str, Any], caps: list[Any]) -> Any:
    """Restorer for ``BindHolder.CATEGORY``: bind the two streams again."""
    if len(caps) != 2:
        raise errors.InvalidArgument("a bind holds exactly two streams")
    first, second = (cap.cast_as(stream_schema.Stream) for cap in caps)
    async with rpc_errors():
        return (await first.bindTo(second)).holder


def memory_pair(host: StreamHost, name: str = "memory") -> tuple[StreamServer, socket.socket]:
    """A Stream whose other end is a socket in this process."""
    ours, theirs = socket.socketpair()
    return StreamServer(host, OneShotSource(Endpoint.of_socket(theirs, name)), name=name), ours


async def spawn_with_stdio_stream(host: StreamHost, supervisor: Supervisor, argv: Sequence[str],
                                  *, name: str, **kwargs: Any) -> tuple[StreamServer, Child]:
    """Start a program (through the supervisor) whose stdin/stdout are a Stream."""
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    try:
        child = await supervisor.spawn(argv, name=name, stdin=in_r, stdout=out_w, **kwargs)
    except BaseException:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)
        raise
    os.close(in_r)
    os.close(out_w)
    return StreamServer(host, stdio_source(out_r, in_w), name=f"{name} stdio"), child


# --- client side ----------------------------------------------------------------


class OpenedStream:
    """A Stream opened as a local socket; keeps the remote holder until ``aclose``."""

    def __init__(self, sock: socket.socket, holder: Any) -> None:
        self.sock = sock
        self.holder = holder

    def endpoint(self, name: str = "stream") -> Endpoint:
        """The socket for a pump. It stays open when the pump ends: ``aclose`` closes it."""
        sock = self.sock
        fd = sock.fileno()
        return Endpoint(fd, fd, shutdown_write=lambda: sock.shutdown(socket.SHUT_WR),
                        close=lambda: None, name=name)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Close the socket and release the holder.

        If we half-closed, wait (bounded) until the remote kernel acknowledged our FIN:
        then every byte we sent is on the stream's node, and releasing the holder there
        lets it flush them instead of cutting them off.
        """
        if self.sock.fileno() != -1:
            if _tcp_state(self.sock.fileno()) in _OUR_FIN_UNACKED:
                await _wait_fin_acked(self.sock, timeout)
            self.sock.close()
        holder, self.holder = self.holder, None
        if holder is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(holder.release(), timeout)

    async def __aenter__(self) -> OpenedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _wait_fin_acked(sock: socket.socket, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.001
    while _tcp_state(sock.fileno()) in _OUR_FIN_UNACKED and loop.time() < deadline:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def local_address_for(ip: str) -> str:
    """Our source address toward ``ip`` (a route lookup: a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((ip, 9))
            return str(probe.getsockname()[0])
    except OSError as exc:
        raise errors.Unavailable(f"no route to {ip}: {exc.strerror}") from None


async def open_stream(cap: Any, *, local_address: str,
                      timeout: float = CONNECT_TIMEOUT) -> OpenedStream:
    """Open a Stream capability as a connected local socket (see the module docstring)."""
    family = socket.AF_INET6 if ":" in local_address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    holder = None
    try:
        try:
            sock.bind((local_address, 0))
        except OSError as exc:
            raise errors.Unavailable(f"cannot bind {local_address}: {exc.strerror}") from None
        port = sock.getsockname()[1]
        async with rpc_errors():
            res = await cap.tcpListen(remote={"ip": local_address}, remotePort=port)
        holder = res.holder
        target = (res.local.ip, res.port)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target), timeout)
        except (OSError, TimeoutError) as exc:
            raise errors.Unavailable(
                f"cannot connect to the stream's node: {_problem(exc)}") from None
    except BaseException:
        sock.close()
        if holder is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(holder.release(), 5.0)
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return OpenedStream(sock, holder)


# --- handing the connection to a program (added for the fs service) -----------------
#
# Some services do not pump a stream: they run a program that speaks the protocol on
# the connection itself (diod on --rfdno/--wfdno, sftp-server and `nbdkit -s` on
# stdin/stdout). ``HandoffStreamServer`` authorizes the one connection exactly as
# ``StreamServer`` does (same listener, same peer check, same timeout) and then hands
# it to a callback instead of a source.

Serve = Callable[[Endpoint], Awaitable[None]]


class HandoffSession(Session):
    """A Session that gives its connection to ``serve(endpoint)`` instead of pumping it.

    ``serve`` owns the connection while it runs (the endpoint's fd is non-blocking; it
    may pass the fd to a child and close its own copy with ``endpoint.close()``). The
    session ends when ``serve`` returns; stopping it (holder released or dropped)
    cancels ``serve``, which must then stop what it started.
    """

    def __init__(self, host: StreamHost, serve: Serve, name: str) -> None:
        super().__init__(host, Endpoint(-1, -1, shutdown_write=lambda: None,
                                        close=lambda: None, name="handoff"), name)
        self._serve = serve

    def start_serving(self, endpoint: Endpoint) -> None:
        """Serve an endpoint that is already connected (one end of a bindTo pair)."""

        async def given() -> Endpoint:
            return endpoint

        self._start(given())

    async def _run(self, get_peer: Any) -> None:
        peer: Endpoint | None = None
        try:
            peer = await get_peer
            if peer is not None and not self._stopping:
                await self._serve(peer)
        finally:
            if peer is not None:
                peer.close()
            await self._cleanup()


class HandoffStreamServer(StreamServer):
    """A Stream whose every use hands one new connection to ``serve`` (see HandoffSession)."""

    def __init__(self, host: StreamHost, serve: Serve, *, name: str = "stream",
                 ctx: ServiceContext | None = None,
                 description: Description | None = None) -> None:
        super().__init__(host, Source(), name=name, ctx=ctx, description=description)
        self._serve = serve

    async def tcpListen(self, remote: Any, remotePort: int, _context: Any, **kwargs: Any) -> None:
        peer = _parse_peer(remote.ip, remotePort)
        listener = self._host.listen(peer)
        session = HandoffSession(self._host, self._serve,
                                 f"{self._name} for {remote.ip}:{remotePort}")
        session.start_listening(listener, peer)
        local = _context.results.init("local")
        local.ip = self._host.address
        _context.results.port = listener.getsockname()[1]
        _context.results.holder = HolderServer(session.aclose, f"{self._name} connection")

    async def bindTo(self, other: Any, _context: Any, **kwargs: Any) -> None:
        remote = await open_stream(other.cast_as(stream_schema.Stream),
                                   local_address=self._host.address)
        ours, theirs = socket.socketpair()
        served = HandoffSession(self._host, self._serve, f"{self._name} bound")
        served.start_serving(Endpoint.of_socket(ours, name=self._name))
        piped = Session(self._host, Endpoint.of_socket(theirs, name=self._name),
                        f"{self._name} bound")
        piped.start_pumping(remote)

        async def close() -> None:
            await asyncio.gather(piped.aclose(), served.aclose())

        _context.results.holder = HolderServer(close, f"{self._name} bind")
