"""In-process RPC helpers for tests: no node, no network, loopback socketpairs only.

* :func:`run`: run a coroutine inside the capnp event loop (``asyncio.run(capnp.run(...))``).
* :func:`eventually`: poll a condition from a coroutine until it holds or time runs out.
* :class:`Pair`: a ``TwoPartyServer`` and a ``TwoPartyClient`` joined by a socketpair.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import capnp

__all__ = ["Pair", "eventually", "run"]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion in a fresh event loop with the capnp loop on top."""
    return asyncio.run(capnp.run(coro))


async def eventually(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    """Wait until ``cond()`` is true, polling every 10 ms; AssertionError after ``timeout`` s.

    It does not call ``gc.collect()``: what it waits for must not depend on the
    garbage collector.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Pair:
    """A TwoPartyServer and TwoPartyClient joined by a socketpair."""

    socks: tuple[socket.socket, socket.socket]
    server_stream: Any
    client_stream: Any
    server: Any
    client: Any

    async def open(self, bootstrap: Any) -> Pair:
        """Serve ``bootstrap`` on one end and connect a client on the other."""
        self.socks = socket.socketpair()
        self.server_stream = await capnp.AsyncIoStream.create_connection(sock=self.socks[0])
        self.client_stream = await capnp.AsyncIoStream.create_connection(sock=self.socks[1])
        self.server = capnp.TwoPartyServer(self.server_stream, bootstrap=bootstrap)
        self.client = capnp.TwoPartyClient(self.client_stream)
        return self

    def bootstrap(self, interface: Any) -> Any:
        """The server's bootstrap capability, cast to ``interface``."""
        return self.client.bootstrap().cast_as(interface)

    def close_client(self) -> None:
        """Close the client side only (the server sees the connection drop)."""
        self.client.close()
        self.client_stream.close()
        self.socks[1].close()

    async def close(self) -> None:
        """Close the client side, then the server side."""
        self.close_client()
        self.server.close()
        self.server_stream.close()
        self.socks[0].close()
