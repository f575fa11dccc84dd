"""Handing a stream's connection to a program instead of pumping it (fs data planes).

The fs service does not pump its streams: it runs a program that speaks the
protocol on the connection itself (diod on --rfdno/--wfdno, sftp-server and
`nbdkit -s` on stdin/stdout). ``HandoffStreamServer`` authorizes the one
connection exactly as ``core.streams.StreamServer`` does (same listener, same
peer check, same timeout) and then hands it to a callback instead of a source.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from metac.core.holder import HolderServer
from metac.core.pump import Endpoint
from metac.core.service import Description, ServiceContext
from metac.core.sources import Source
from metac.core.streams import Session, StreamHost, StreamServer
from metac.schema.load import stream as stream_schema

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

    async def _listening_session(self, name: str) -> Session:
        return HandoffSession(self._host, self._serve, name)

    async def bindTo(self, other: Any, _context: Any, **kwargs: Any) -> None:
        remote = await self._host.open_remote(other.cast_as(stream_schema.Stream))
        ours, theirs = socket.socketpair()
        served = HandoffSession(self._host, self._serve, f"{self._name} bound")
        served.start_serving(Endpoint.of_socket(ours, name=self._name))
        piped = Session(self._host, Endpoint.of_socket(theirs, name=self._name),
                        f"{self._name} bound")
        piped.start_pumping(remote)

        async def close() -> None:
            await asyncio.gather(piped.aclose(), served.aclose())

        _context.results.holder = HolderServer(close, f"{self._name} bind")
