"""Streams (paper 3.1): serve byte streams as Stream capabilities, and open them.

The byte copying is ``metac.core.pump`` (endpoints, splice, half-close); what a
server serves is a source from ``metac.core.sources``. Here:

* ``StreamServer`` serves a source as a Stream capability. ``tcpListen`` opens
  the source, listens on the node address on an ephemeral port and accepts
  exactly one connection, from exactly ``remote:remotePort``; any other
  connection is reset at once, without data; the listener goes away after
  ``StreamHost.listen_timeout``. ``bindTo`` opens the source and the other
  stream (with ``open_stream``) and pumps between them. Both return a holder:
  dropping or releasing it closes everything they opened.
* ``Session`` is one use of a stream; a subclass may hand its connection to a
  program instead of pumping it (the fs service's ``fs.handoff``).
* ``open_stream`` is the client side: bind our address with port 0 (no
  SO_REUSEADDR), ask for ``tcpListen`` with that address and port, connect
  from that socket. The bytes go straight between the two machines, whichever
  node the capability came through.
* A stream handed in by a client is never opened as it is (``StreamHost.open_remote``):
  it is first restored from the node that serves it (``core.untrusted.locate``),
  its ``tcpListen`` must answer that node's address (no SSRF), every call into
  it is bounded in time and the opens waiting for a peer are bounded in number.

``StreamHost`` owns every session a process serves (their tasks and sockets);
a service creates one and closes it at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from metac import errors
from metac.core.holder import HolderServer
from metac.core.pump import OUR_FIN_UNACKED, Endpoint, Pump, tcp_state
from metac.core.service import Description, PersistableMixin, ServiceContext
from metac.core.sources import (
    CONNECT_TIMEOUT,
    OneShotSource,
    Source,
    connect_problem,
    stdio_source,
)
from metac.core.supervisor import Child, Supervisor
from metac.core.tasks import TaskSet
from metac.core.untrusted import (
    OwnNode,
    PendingLimit,
    PendingSlot,
    bounded,
    check_served_address,
    env_int,
    locate,
)
from metac.schema.load import stream as stream_schema

log = logging.getLogger(__name__)

LISTEN_TIMEOUT = 30.0  # a tcpListen nobody connects to is closed after this
DRAIN_GRACE = 10.0  # on release, a direction whose source ended may flush this long
# Opens of client-handed streams waiting for their peer, in total and per serving node;
# tcpListen calls waiting for their one connection, in total and per remote address.
PENDING_MAX = 128
PENDING_PER_PEER = 32
PENDING_MAX_ENV = "METAC_STREAM_PENDING_MAX"
PENDING_PER_PEER_ENV = "METAC_STREAM_PENDING_PER_PEER"


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
    """Owns the stream sessions one process serves: their tasks, listeners and pumps.

    With a ``ctx`` (a service), streams handed in by clients are located through
    the service's node pool; without one (in-process use), only streams that
    answer this host's own address are opened.
    """

    def __init__(self, address: str, *, listen_timeout: float = LISTEN_TIMEOUT,
                 ctx: ServiceContext | None = None) -> None:
        self.address = str(ipaddress.ip_address(address))
        self.listen_timeout = listen_timeout
        self.ctx = ctx
        self._tasks = TaskSet()
        self.sessions: set[Session] = set()
        self.rejected = 0  # connections reset because they came from the wrong peer
        total = env_int(PENDING_MAX_ENV, PENDING_MAX)
        per_peer = env_int(PENDING_PER_PEER_ENV, PENDING_PER_PEER)
        self.opening = PendingLimit(total, per_peer, "stream opens")
        self.listening = PendingLimit(total, per_peer, "unanswered tcpListen calls")

    async def open_remote(self, cap: Any, *, what: str = "the other stream") -> OpenedStream:
        """Open a Stream a client handed us, safely (see the module docstring)."""
        slot = self.opening.claim()
        try:
            if self.ctx is None:
                node = self.address
            else:
                own = OwnNode(self.ctx.env.node_address, self.ctx.env.node_port)
                located = await locate(self.ctx.pool, own, cap, stream_schema.Stream,
                                       what=what)
                cap, node = located.cap, located.node
            slot.assign(node)
            return await open_stream(cap, local_address=self.address, node=node)
        finally:
            slot.release()

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro, name)

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
        await self._tasks.aclose()


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
        self._slot: PendingSlot | None = None  # a place among the pending tcpListens

    def start_listening(self, listener: socket.socket, peer: tuple[Any, int],
                        slot: PendingSlot | None = None) -> None:
        self._listener = listener
        self._slot = slot
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
        self._release_slot()
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
            self._release_slot()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Endpoint.of_socket(conn, name="peer")

    def _release_slot(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()

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

    async def describe(self, persistent: bool) -> Description:
        if self._ctx is None or self._description is None:
            raise errors.Unsupported(f"{self._name} cannot be persisted")
        return self._description

    async def tcpListen(self, remote: Any, remotePort: int, _context: Any, **kwargs: Any) -> None:
        peer = _parse_peer(remote.ip, remotePort)
        slot = self._host.listening.claim(str(peer[0]))
        try:
            listener = self._host.listen(peer)
        except BaseException:
            slot.release()
            raise
        try:
            session = await self._listening_session(f"{self._name} for {remote.ip}:{remotePort}")
        except BaseException:
            listener.close()
            slot.release()
            raise
        session.start_listening(listener, peer, slot)
        local = _context.results.init("local")
        local.ip = self._host.address
        _context.results.port = listener.getsockname()[1]
        _context.results.holder = HolderServer(session.aclose, f"{self._name} connection")

    async def _listening_session(self, name: str) -> Session:
        """The session for one ``tcpListen`` (it opens the source)."""
        return Session(self._host, await self._source.open(), name)

    async def bindTo(self, other: Any, _context: Any, **kwargs: Any) -> None:
        # `other` is proxied through the caller's connection and says what it likes:
        # open_remote reaches it directly from the node that serves it (so the bind
        # also outlives the caller), checks its address and bounds the wait.
        remote = await self._host.open_remote(other.cast_as(stream_schema.Stream))
        try:
            endpoint = await self._source.open()
        except BaseException:
            await remote.aclose()
            raise
        session = Session(self._host, endpoint, f"{self._name} bound")
        session.start_pumping(remote)
        if self._ctx is not None and self._description is not None:
            _context.results.holder = BindHolder(session, self._ctx, [self, remote.cap])
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

    async def describe(self, persistent: bool) -> Description:
        return Description(self.CATEGORY, {}, caps=list(self._streams), active=True)


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

    def __init__(self, sock: socket.socket, holder: Any, cap: Any = None) -> None:
        self.sock = sock
        self.holder = holder
        self.cap = cap  # the Stream that was opened

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
            if tcp_state(self.sock.fileno()) in OUR_FIN_UNACKED:
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
    while tcp_state(sock.fileno()) in OUR_FIN_UNACKED and loop.time() < deadline:
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


async def open_stream(cap: Any, *, local_address: str, node: str | None = None,
                      timeout: float = CONNECT_TIMEOUT) -> OpenedStream:
    """Open a Stream capability as a connected local socket (see the module docstring).

    ``node`` is the address of the node that serves ``cap``, if known: ``tcpListen``
    must answer it. Whatever ``node``, an answer of a loopback, link-local,
    unspecified or multicast address other than ``local_address`` is refused
    (``PermissionDenied``), and ``tcpListen`` is bounded by ``call_timeout()``.
    """
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
        res = await bounded(cap.tcpListen(remote={"ip": local_address}, remotePort=port),
                            "the stream's tcpListen")
        holder = res.holder
        target = check_served_address(res.local.ip, res.port, node=node,
                                      local_address=local_address)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target), timeout)
        except (OSError, TimeoutError) as exc:
            raise errors.Unavailable(
                f"cannot connect to the stream's node: {connect_problem(exc)}") from None
    except BaseException:
        sock.close()
        if holder is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(holder.release(), 5.0)
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return OpenedStream(sock, holder, cap)
