"""Stream service: admin bootstrap (export endpoints) and restorers.

``METAC_STREAM_LISTEN_TIMEOUT`` (seconds, default 30) sets how long a
``tcpListen`` waits for its one connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from typing import Any

from metac import errors
from metac.codec.locators import LocatorError, TcpEndpoint, UnixEndpoint
from metac.core.rpc import Servant, rpc_errors
from metac.core.service import Description, ServiceContext, ServiceDefinition, run_service
from metac.core.sources import TcpSource, UnixSource
from metac.core.streams import LISTEN_TIMEOUT, StreamHost, StreamServer
from metac.schema.load import stream

log = logging.getLogger("metac.stream")


def tcp_stream(host: StreamHost, ctx: ServiceContext, endpoint: TcpEndpoint) -> StreamServer:
    return StreamServer(
        host, TcpSource(endpoint.host, endpoint.port), name=endpoint.format(), ctx=ctx,
        description=Description("tcp", {"host": endpoint.host, "port": endpoint.port}))


def unix_stream(host: StreamHost, ctx: ServiceContext, endpoint: UnixEndpoint) -> StreamServer:
    return StreamServer(host, UnixSource(endpoint.path), name=endpoint.format(), ctx=ctx,
                        description=Description("unix", {"path": endpoint.path}))


RESOLVE_TIMEOUT = 5.0  # seconds; a name server that does not answer leaves the check to use


async def _check_resolves(host: str) -> None:
    """Refuse an endpoint whose host name does not resolve now (checked at export, not at
    restore: a persistent ref outlives a name server's bad day)."""
    try:
        await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
            host, None, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
    except socket.gaierror as exc:
        raise errors.NotFound(f"cannot resolve {host}: {exc.strerror}") from None
    except (TimeoutError, OSError):
        log.info("could not check that %s resolves", host)


def _check_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise errors.NotFound(f"{path}: no such socket") from None
    except OSError:
        return  # e.g. a permission problem: connecting will tell
    if not stat.S_ISSOCK(mode):
        raise errors.InvalidArgument(f"{path}: not a socket")


class StreamAdminServer(Servant, stream.StreamServiceAdmin.Server):
    def __init__(self, host: StreamHost, ctx: ServiceContext) -> None:
        self._host = host
        self._ctx = ctx

    async def tcpEndpoint(self, host: str, port: int, _context: Any, **kwargs: Any) -> None:
        try:
            endpoint = TcpEndpoint(host, port)
        except LocatorError as exc:
            raise errors.InvalidArgument(str(exc)) from None
        await _check_resolves(endpoint.host)
        _context.results.stream = tcp_stream(self._host, self._ctx, endpoint)

    async def unixEndpoint(self, path: str, _context: Any, **kwargs: Any) -> None:
        try:
            endpoint = UnixEndpoint(path)
        except LocatorError as exc:
            raise errors.InvalidArgument(str(exc)) from None
        _check_socket(endpoint.path)
        _context.results.stream = unix_stream(self._host, self._ctx, endpoint)


def _listen_timeout() -> float:
    text = os.environ.get("METAC_STREAM_LISTEN_TIMEOUT", "")
    try:
        value = float(text) if text else LISTEN_TIMEOUT
    except ValueError:
        value = LISTEN_TIMEOUT
    return value if value > 0 else LISTEN_TIMEOUT


class StreamService(ServiceDefinition):
    name = "stream"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.state = StreamHost(ctx.env.node_address, listen_timeout=_listen_timeout(),
                                ctx=ctx)

    def admin(self) -> Any:
        return StreamAdminServer(self.state, self.ctx)

    async def restore_tcp(self, data: dict[str, Any], caps: list[Any]) -> Any:
        try:
            return tcp_stream(self.state, self.ctx, TcpEndpoint(str(data["host"]), int(data["port"])))
        except (KeyError, ValueError, LocatorError):
            raise errors.InvalidArgument("corrupt tcp stream description") from None

    async def restore_unix(self, data: dict[str, Any], caps: list[Any]) -> Any:
        try:
            return unix_stream(self.state, self.ctx, UnixEndpoint(str(data["path"])))
        except (KeyError, ValueError, LocatorError):
            raise errors.InvalidArgument("corrupt unix stream description") from None

    async def restore_bind(self, data: dict[str, Any], caps: list[Any]) -> Any:
        """A persistent bind (``core.streams.BindHolder``): bind the two streams again."""
        if len(caps) != 2:
            raise errors.InvalidArgument("a bind holds exactly two streams")
        first, second = (cap.cast_as(stream.Stream) for cap in caps)
        async with rpc_errors():
            return (await first.bindTo(second)).holder

    async def aclose(self) -> None:
        await self.state.aclose()


def main() -> None:
    run_service(StreamService)
