"""Cap'n Proto RPC plumbing: serving, connecting, and the error boundary.

* ``Servant`` is the base of every schema-facing server class: each public
  coroutine method runs under the error boundary, so a known ``MetacError``
  reaches the client as ``"<Category>: message"`` and anything else is logged
  here with a traceback and reaches the client as ``Internal: <id>``.
* ``serve_unix`` / ``serve_tcp`` run one ``TwoPartyServer`` per connection with
  a bootstrap object made for that connection, and call its ``_disconnected``
  hook when the connection ends so per-connection state is released explicitly.
  Their accept loops never die (accept errors are logged, rate-limited, and
  retried with backoff); TCP connections are held to ``ConnectionLimits``.
* ``connect_unix`` / ``connect_tcp`` open a client connection as an async
  context manager that closes it on exit.

Everything here must run inside ``capnp.kj_loop()`` (see ``core.process``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import ipaddress
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import capnp

from metac import errors
from metac.codec.capnp_frames import FrameError, FrameScanner, aliases
from metac.codec.refs import redact_secrets

log = logging.getLogger(__name__)


def _wire_class(category: str) -> type[Exception]:
    # pycapnp sends a failed server call as the formatted traceback of the
    # exception. A class that hides its traceback and claims to be a builtin
    # formats as just "<Category>: <message>", so no server internals leak.
    return type(
        category,
        (Exception,),
        {"__module__": "builtins", "__traceback__": property(lambda s: None, lambda s, v: None)},
    )


_WIRE_CLASSES: dict[str, type[Exception]] = {}


def wire_exception(err: errors.MetacError) -> Exception:
    cls = _WIRE_CLASSES.get(err.category)
    if cls is None:
        cls = _WIRE_CLASSES[err.category] = _wire_class(err.category)
    return cls(redact_secrets(str(err)))  # what leaves a service never holds a secret


def _guard(name: str, func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(func)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return await func(*args, **kwargs)
        except errors.MetacError as exc:
            raise wire_exception(exc) from None
        except capnp.KjException as exc:
            # An error from a call we made on someone else: pass its meaning on.
            raise wire_exception(errors.from_kj(exc)) from None
        except asyncio.CancelledError:
            raise
        except Exception:
            incident = secrets.token_hex(4)
            log.exception("internal error in %s (incident %s)", name, incident)
            raise wire_exception(errors.Internal(f"incident {incident}")) from None

    return guarded


def _reading_params(cls_name: str, method: str) -> Callable[..., Awaitable[None]]:
    """``<method>_context``, which pycapnp prefers over ``<method>``: the parameters are
    read here, behind the boundary. pycapnp's own reader runs outside any handler, so
    parameters that do not match the schema (a list where Data belongs, say) would
    answer the caller with pycapnp's traceback, native addresses included."""

    async def call(self: Any, context: Any) -> None:
        try:
            params = context.params
            kwargs = {field: getattr(params, field) for field in params.schema.fieldnames}
        except capnp.KjException:
            raise wire_exception(errors.InvalidArgument(
                f"the parameters of {method} do not match its schema")) from None
        # The method is behind the boundary already (its errors leave as they are).
        returned = await getattr(self, method)(_context=context, **kwargs)
        try:
            capnp.lib.capnp.fill_context(method, context, returned)
        except Exception:
            incident = secrets.token_hex(4)
            log.exception("internal error in %s.%s results (incident %s)", cls_name, method,
                          incident)
            raise wire_exception(errors.Internal(f"incident {incident}")) from None

    call.__name__ = method + "_context"
    return call


def _unsupported(cls_name: str, method: str) -> Callable[..., Awaitable[Any]]:
    async def unsupported(self: Any, **kwargs: Any) -> None:
        raise errors.Unsupported(f"{method} is not supported by this object")

    unsupported.__name__ = method
    return _guard(f"{cls_name}.{method}", unsupported)


class Servant:
    """Mixin for pycapnp server classes: wraps public coroutine methods in the
    error boundary. Put it first: ``class Foo(Servant, schema.Foo.Server)``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            if name.startswith("_") or not inspect.iscoroutinefunction(value):
                continue
            if getattr(value, "__wrapped__", None) is not None:
                continue
            setattr(cls, name, _guard(f"{cls.__name__}.{name}", value))
        # A schema method the class does not implement answers Unsupported
        # (pycapnp would otherwise send the client its own traceback).
        schema = getattr(cls, "schema", None)
        for method in getattr(schema, "method_names_inherited", ()) or ():
            if not hasattr(cls, method):
                setattr(cls, method, _unsupported(cls.__name__, method))
            if not hasattr(cls, method + "_context"):
                setattr(cls, method + "_context", _reading_params(cls.__name__, method))


def rpc_error(exc: BaseException) -> errors.MetacError:
    """Client side: the MetacError an RPC failure means."""
    return errors.from_kj(exc)


@contextlib.asynccontextmanager
async def rpc_errors() -> AsyncIterator[None]:
    """Turn RPC failures inside the block into MetacErrors."""
    try:
        yield
    except capnp.KjException as exc:
        raise errors.from_kj(exc) from None
    except BrokenPipeError:
        raise
    except (ConnectionError, OSError) as exc:
        raise errors.Unavailable(f"connection failed: {exc.strerror or exc}") from None


# --- serving ---------------------------------------------------------------

BootstrapFactory = Callable[["Peer"], Any]


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection: a unix peer's uid or a TCP address."""

    kind: str  # "unix" or "tcp"
    address: str = ""
    port: int = 0
    uid: int = -1


def _positive(name: str, text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise errors.InvalidArgument(
            f"{name} must be a positive {'whole ' if kind is int else ''}number, not {text!r}")
    return value


@dataclass(frozen=True)
class ConnectionLimits:
    """What one TCP connection (and all of them together) may cost the node.

    Every field can be set from the environment of the serving process
    (``ENV_NAMES``); ``docs/security.md`` explains each one.
    """

    max_message_bytes: int = 1 << 20
    #: What a message may make the node read, every pointer followed counted
    #: (aliased data counts once per alias); 0: four times max_message_bytes.
    max_read_bytes: int = 0
    pending_bytes: int = 16 << 20
    message_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_per_peer: int = 256
    max_total: int = 4096

    ENV_NAMES: ClassVar[dict[str, str]] = {
        "max_message_bytes": "METAC_RPC_MAX_MESSAGE_BYTES",
        "max_read_bytes": "METAC_RPC_MAX_READ_BYTES",
        "pending_bytes": "METAC_RPC_PENDING_BYTES",
        "message_timeout": "METAC_RPC_MESSAGE_TIMEOUT",
        "idle_timeout": "METAC_RPC_IDLE_TIMEOUT",
        "max_per_peer": "METAC_RPC_MAX_CONNECTIONS_PER_PEER",
        "max_total": "METAC_RPC_MAX_CONNECTIONS",
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ConnectionLimits:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = cls.ENV_NAMES[f.name]
            text = environ.get(name, "").strip()
            if text:
                values[f.name] = _positive(name, text, type(f.default))
        return cls(**values)

    @property
    def traversal_limit_words(self) -> int:
        return (self.max_read_bytes or 4 * self.max_message_bytes) // 8

    @property
    def sweep_interval(self) -> float:
        return min(1.0, max(0.05, min(self.message_timeout, self.idle_timeout) / 4))


class _RateLimitedLog:
    """Logs the first of each kind of message, then at most one per ``interval``
    seconds with the number of similar ones left out."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._log = logger
        self._interval = interval
        self._next: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        skipped = self._skipped.pop(key, 0)
        if skipped:
            msg += f" ({skipped} more like this in the last {self._interval:g} s)"
        self._next[key] = now + self._interval
        self._log.warning(msg, *args)


_warn = _RateLimitedLog(log)

# Accept errors that concern one connection only: take the next one at once.
_ACCEPT_SKIP = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN}
ACCEPT_BACKOFF_FIRST = 0.05
ACCEPT_BACKOFF_MAX = 1.0


async def _accept_forever(sock: socket.socket, what: str,
                          accepted: Callable[[socket.socket, Any], None]) -> None:
    """Accept connections until cancelled. An accept error never ends the loop:
    out of fds/memory, it is logged (rate-limited) and retried with backoff."""
    loop = asyncio.get_running_loop()
    delay = 0.0
    while True:
        try:
            conn, addr = await loop.sock_accept(sock)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno in _ACCEPT_SKIP:
                _warn.warning(f"accept-skip {what}", "accept on %s failed: %s", what, reason)
                continue
            delay = min(max(delay * 2, ACCEPT_BACKOFF_FIRST), ACCEPT_BACKOFF_MAX)
            hint = " (see the open files limit, LimitNOFILE)" \
                if exc.errno in (errno.EMFILE, errno.ENFILE) else ""
            _warn.warning(f"accept {what} {exc.errno}",
                          "cannot accept connections on %s: %s; retrying in %.2f s%s",
                          what, reason, delay, hint)
            await asyncio.sleep(delay)
            continue
        delay = 0.0
        try:
            accepted(conn, addr)
        except Exception:
            conn.close()
            log.exception("error setting up a connection on %s", what)


class _Listener:
    """Owns a listening socket, its accept loop and every connection task."""

    def __init__(self, sock: socket.socket, what: str,
                 serve: Callable[[socket.socket, Any], Awaitable[None] | None],
                 sweeper: Callable[[], Awaitable[None]] | None = None) -> None:
        self.sock = sock
        self._serve = serve
        self._tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(_accept_forever(sock, what, self._accepted),
                                        name=f"rpc-accept {what}")]
        if sweeper is not None:
            self._loops.append(loop.create_task(sweeper(), name=f"rpc-sweep {what}"))

    def _accepted(self, conn: socket.socket, addr: Any) -> None:
        coro = self._serve(conn, addr)
        if coro is None:
            return
        task = asyncio.get_running_loop().create_task(coro, name="rpc-conn")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Stop accepting and end every connection (``wait_closed`` waits for them)."""
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        self.sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()


async def _serve_connection(stream: Any, peer: Peer, factory: BootstrapFactory,
                            conn: _GuardedConnection | None = None) -> None:
    bootstrap = factory(peer)
    if conn is None:
        server = capnp.TwoPartyServer(stream, bootstrap=bootstrap)
    else:
        conn.bootstrap = bootstrap
        server = capnp.TwoPartyServer(stream, bootstrap=bootstrap,
                                      traversal_limit_in_words=conn.guard.limits.traversal_limit_words)
    try:
        await server.on_disconnect()
    finally:
        hook = getattr(bootstrap, "_disconnected", None)
        if hook is not None:
            try:
                res = hook()
                if inspect.isawaitable(res):
                    await res
            except Exception:
                log.exception("error releasing a connection's state")
        if conn is not None:
            conn.bootstrap = None
        del server, bootstrap


async def _accepted_stream(sock: socket.socket, wrap: Callable[[Any], Any] | None = None) -> Any:
    """A pycapnp stream over an accepted socket; ``wrap`` may put a protocol in front."""
    streams: list[Any] = []
    # The stream's protocol calls back with the stream once connected; the
    # protocol itself is what asyncio's transport talks to (through ``wrap``).
    protocol = capnp.AsyncIoStream._connect(streams.append)
    loop = asyncio.get_running_loop()
    await loop.connect_accepted_socket(
        (lambda: wrap(protocol)) if wrap is not None else (lambda: protocol), sock=sock)
    return streams[0]


async def serve_unix(path: str, factory: BootstrapFactory, *, mode: int = 0o600) -> _Listener:
    """Listen on a unix socket, root only by default. Returns the listener
    (``close()`` then ``await wait_closed()``, or ``await aclose()``)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)

    async def serve(conn: socket.socket, _addr: Any) -> None:
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            stream = await _accepted_stream(conn)
            await _serve_connection(stream, Peer("unix", uid=uid), factory)
        except Exception:
            log.debug("unix connection ended with an error", exc_info=True)
        finally:
            conn.close()

    return _Listener(sock, path, serve)


def peer_group(address: str) -> str:
    """The key that per-peer limits count under: an IPv4 address, or an IPv6 /64
    (one host commonly owns a whole /64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class _GuardedConnection:
    """Bookkeeping of one TCP connection for ``_ConnectionGuard``."""

    __slots__ = ("guard", "peer", "group", "scanner", "transport", "bootstrap", "pending",
                 "pieces", "messages", "seen_pieces", "seen_messages", "last_seen",
                 "message_started", "closing")

    def __init__(self, guard: _ConnectionGuard, peer: Peer) -> None:
        self.guard = guard
        self.peer = peer
        self.group = peer_group(peer.address)
        self.scanner = FrameScanner(guard.limits.max_message_bytes,
                                    capture_from=ALIAS_CHECK_BYTES)
        self.transport: asyncio.Transport | None = None
        self.bootstrap: Any = None
        self.pending = 0  # what its partial message counts in guard.pending
        # Counted per piece received; the sweeper turns them into times, so the
        # path every message takes does no clock reads.
        self.pieces = self.messages = 0
        self.seen_pieces = self.seen_messages = 0
        self.last_seen = time.monotonic()
        self.message_started: float | None = None
        self.closing = False

    def holds_capabilities(self) -> bool:
        """False only when the bootstrap says it has handed out no capability."""
        probe = getattr(self.bootstrap, "_holds_capabilities", None)
        return True if probe is None else bool(probe())

    def abort(self, key: str, msg: str, *args: Any) -> None:
        if self.closing:
            return
        self.closing = True
        _warn.warning(key, "closing connection from %s: " + msg, self.peer.address, *args)
        self.guard.release(self)
        if self.transport is not None:
            self.transport.abort()


class _GuardedProtocol(asyncio.BufferedProtocol):
    """Sits between asyncio's transport and pycapnp's stream protocol.

    Bytes land straight in pycapnp's buffer (no copy); before pycapnp is told
    about them, the framing scanner checks each message's declared size and
    the guard its pending-memory budget. A refused message is never passed on,
    so pycapnp never allocates room for it.
    """

    def __init__(self, inner: Any, conn: _GuardedConnection) -> None:
        self._inner = inner
        self._conn = conn
        self._buffer: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._conn.transport = transport  # type: ignore[assignment]
        self._inner.connection_made(transport)
        if self._conn.closing:  # timed out before it was even set up
            transport.abort()  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> Any:
        self._buffer = self._inner.get_buffer(sizehint)
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        conn = self._conn
        if conn.closing:
            return
        scanner = conn.scanner
        try:
            conn.messages += scanner.feed(self._buffer, nbytes)
        except FrameError as exc:
            conn.abort("message-size", "%s", exc)
            return
        conn.pieces += 1
        if scanner.captured:
            for message in scanner.take_captured():
                if aliases(message):
                    conn.abort("aliasing", "a message of %d bytes whose pointers share data "
                               "(it would grow when copied)", len(message))
                    return
        if (conn.pending or scanner.pending_bytes > BUFFERED_MESSAGE_BYTES) \
                and not conn.guard.account(conn):
            return
        self._inner.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.guard.release(self._conn)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


#: pycapnp's message stream reads messages up to this size into a buffer each
#: connection has anyway; only larger ones allocate (and count as pending).
BUFFERED_MESSAGE_BYTES = 64 << 10
#: Messages from this size on are checked for pointers that share data (a
#: forwarded call is deep-copied: each alias would become a full copy). A
#: smaller message can grow at most to a few times its size, and the connection's
#: traversal limit bounds every message.
ALIAS_CHECK_BYTES = 1 << 10


class _ConnectionGuard:
    """Enforces ``ConnectionLimits`` over the connections of one TCP listener."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.pending = 0
        self.per_group: dict[str, int] = {}
        self.live: set[_GuardedConnection] = set()

    def admit(self, peer: Peer) -> _GuardedConnection | None:
        group = peer_group(peer.address)
        if len(self.live) >= self.limits.max_total:
            _warn.warning("conn-total", "refusing a connection from %s: %d connections open "
                          "(METAC_RPC_MAX_CONNECTIONS)", peer.address, len(self.live))
            return None
        if self.per_group.get(group, 0) >= self.limits.max_per_peer:
            _warn.warning("conn-peer", "refusing a connection from %s: %d connections "
                          "open from %s (METAC_RPC_MAX_CONNECTIONS_PER_PEER)",
                          peer.address, self.per_group[group], group)
            return None
        conn = _GuardedConnection(self, peer)
        self.live.add(conn)
        self.per_group[group] = self.per_group.get(group, 0) + 1
        return conn

    def release(self, conn: _GuardedConnection) -> None:
        if conn not in self.live:
            return
        self.live.discard(conn)
        left = self.per_group[conn.group] - 1
        if left:
            self.per_group[conn.group] = left
        else:
            del self.per_group[conn.group]
        self.pending -= conn.pending
        conn.pending = 0

    def account(self, conn: _GuardedConnection) -> bool:
        """Count the partial message ``conn`` is receiving against the budget;
        False (connection aborted) if it would take pending memory over it."""
        # Messages up to BUFFERED_MESSAGE_BYTES are read into the connection's own
        # buffer (part of what a connection costs); larger ones get their own, and
        # the scanner keeps a copy of them for the aliasing check: counted twice.
        pending = conn.scanner.pending_bytes
        pending = 0 if pending <= BUFFERED_MESSAGE_BYTES else 2 * pending
        grow = pending - conn.pending
        if grow > 0 and self.pending + grow > self.limits.pending_bytes:
            conn.abort("pending", "its partial message of %d bytes would take the memory "
                       "of unfinished messages over %d bytes (METAC_RPC_PENDING_BYTES)",
                       conn.scanner.pending_bytes, self.limits.pending_bytes)
            return False
        self.pending += grow
        conn.pending = pending
        return True

    def sweep(self) -> None:
        """Close connections past a timeout. Times are those of the sweeps that first
        saw a message under way or a connection silent: up to one interval late."""
        now = time.monotonic()
        limits = self.limits
        for conn in list(self.live):
            if conn.pieces != conn.seen_pieces:
                conn.seen_pieces = conn.pieces
                conn.last_seen = now
            if conn.scanner.in_message:
                if conn.message_started is None or conn.messages != conn.seen_messages:
                    conn.message_started = now
                elif now - conn.message_started > limits.message_timeout:
                    conn.abort("stalled", "a message still unfinished after %g s "
                               "(METAC_RPC_MESSAGE_TIMEOUT)", limits.message_timeout)
            else:
                conn.message_started = None
                if now - conn.last_seen > limits.idle_timeout and not conn.holds_capabilities():
                    conn.abort("idle", "idle for %g s holding no capability "
                               "(METAC_RPC_IDLE_TIMEOUT)", limits.idle_timeout)
            conn.seen_messages = conn.messages

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.limits.sweep_interval)
            self.sweep()


async def serve_tcp(host: str, port: int, factory: BootstrapFactory,
                    limits: ConnectionLimits | None = None) -> _Listener:
    """Listen on TCP host:port; every connection gets ``factory(peer)`` as bootstrap.

    ``limits`` (default: ``ConnectionLimits.from_env()``) bound what peers may
    cost: connections per peer and in total, message size, memory held by
    unfinished messages, and how long a message or an idle connection may take.
    A bootstrap object may define ``_holds_capabilities()``: while it returns
    False the connection is closed after ``idle_timeout`` without traffic.
    """
    guard = _ConnectionGuard(limits if limits is not None else ConnectionLimits.from_env())
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"

    def serve(conn_sock: socket.socket, addr: Any) -> Awaitable[None] | None:
        peer = Peer("tcp", address=addr[0], port=addr[1])
        conn = guard.admit(peer)
        if conn is None:
            conn_sock.close()
            return None
        return _serve_tcp_conn(conn_sock, conn, factory)

    return _Listener(sock, shown, serve, guard.sweep_forever)


async def _serve_tcp_conn(sock: socket.socket, conn: _GuardedConnection,
                          factory: BootstrapFactory) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = await _accepted_stream(sock, lambda inner: _GuardedProtocol(inner, conn))
        await _serve_connection(stream, conn.peer, factory, conn)
    except Exception:
        log.debug("connection from %s ended with an error", conn.peer.address, exc_info=True)
    finally:
        conn.guard.release(conn)
        sock.close()


# --- connecting ------------------------------------------------------------


class Connection:
    """A client connection; ``bootstrap(schema)`` gives the remote bootstrap capability."""

    def __init__(self, client: Any, stream: Any) -> None:
        self._client = client
        self._stream = stream

    def bootstrap(self, interface: Any) -> Any:
        return self._client.bootstrap().cast_as(interface)

    def close(self) -> None:
        # Close the RPC system, then the stream (which owns the socket): the
        # peer sees the disconnect now, not when our capabilities are collected.
        with contextlib.suppress(Exception):
            self._client.close()
        with contextlib.suppress(Exception):
            self._stream.close()


@contextlib.asynccontextmanager
async def connect_unix(path: str) -> AsyncIterator[Connection]:
    try:
        stream = await capnp.AsyncIoStream.create_unix_connection(path)
    except FileNotFoundError:
        raise errors.Unavailable(f"no node is running here (no socket at {path})") from None
    except PermissionError:
        raise errors.PermissionDenied(f"cannot open {path}: the node admin socket is root only") from None
    except OSError as exc:
        raise errors.Unavailable(f"cannot connect to {path}: {exc.strerror or exc}") from None
    conn = Connection(capnp.TwoPartyClient(stream), stream)
    try:
        yield conn
    finally:
        conn.close()


@contextlib.asynccontextmanager
async def connect_tcp(host: str, port: int, *, timeout: float = 10.0) -> AsyncIterator[Connection]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = await capnp.AsyncIoStream.create_connection(sock=sock)
    except TimeoutError:
        sock.close()
        raise errors.Unavailable(f"node {shown} did not answer within {timeout:g} s") from None
    except OSError as exc:
        sock.close()
        raise errors.Unavailable(f"cannot reach node {shown}: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    conn = Connection(capnp.TwoPartyClient(stream), stream)
    try:
        yield conn
    finally:
        conn.close()
