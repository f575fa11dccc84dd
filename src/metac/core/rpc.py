"""Cap'n Proto RPC plumbing: serving, connecting, and the error boundary.

* ``Servant`` is the base of every schema-facing server class: each public
  coroutine method runs under the error boundary, so a known ``MetacError``
  reaches the client as ``"<Category>: message"`` and anything else is logged
  here with a traceback and reaches the client as ``Internal: <id>``.
* ``serve_unix`` / ``serve_tcp`` run one ``TwoPartyServer`` per connection with
  a bootstrap object made for that connection, and call its ``_disconnected``
  hook when the connection ends so per-connection state is released explicitly.
* ``connect_unix`` / ``connect_tcp`` open a client connection as an async
  context manager that closes it on exit.

Everything here must run inside ``capnp.kj_loop()`` (see ``core.process``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import capnp

from metac import errors
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


async def _serve_connection(stream: Any, peer: Peer, factory: BootstrapFactory) -> None:
    bootstrap = factory(peer)
    server = capnp.TwoPartyServer(stream, bootstrap=bootstrap)
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
        del server, bootstrap


async def serve_unix(path: str, factory: BootstrapFactory, *, mode: int = 0o600) -> Any:
    """Listen on a unix socket, root only by default. Returns the server (async closeable)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

    async def handle(stream: Any) -> None:
        await _serve_connection(stream, Peer("unix", uid=0), factory)

    old_umask = os.umask(0o177)
    try:
        server = await capnp.AsyncIoStream.create_unix_server(handle, path)
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    return server


async def serve_tcp(host: str, port: int, factory: BootstrapFactory) -> Any:
    """Listen on TCP host:port; every connection gets ``factory(peer)`` as bootstrap."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()

    async def accept_loop() -> None:
        while True:
            conn, addr = await loop.sock_accept(sock)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = Peer("tcp", address=addr[0], port=addr[1])
            task = asyncio.get_running_loop().create_task(
                _serve_tcp_conn(conn, peer, factory), name=f"rpc-conn {addr[0]}:{addr[1]}"
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    return _TcpServer(sock, accept_loop, tasks)


async def _serve_tcp_conn(conn: socket.socket, peer: Peer, factory: BootstrapFactory) -> None:
    try:
        stream = await capnp.AsyncIoStream.create_connection(sock=conn)
        await _serve_connection(stream, peer, factory)
    except Exception:
        log.debug("connection from %s ended with an error", peer.address, exc_info=True)
    finally:
        conn.close()


class _TcpServer:
    """Owns the listening socket, the accept loop and every connection task."""

    def __init__(self, sock: socket.socket, accept_loop: Callable[[], Awaitable[None]],
                 tasks: set[asyncio.Task[None]]) -> None:
        self.sock = sock
        self._tasks = tasks
        self._accept = asyncio.get_running_loop().create_task(accept_loop(), name="rpc-accept")

    async def aclose(self) -> None:
        self._accept.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(self._accept, *self._tasks, return_exceptions=True)
        self.sock.close()


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
