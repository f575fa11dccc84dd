"""metac.core.rpc limits in-process (loopback only): the accept loop under accept
errors, and each ConnectionLimits defence against a raw socket. The same defences
on real nodes: tests/integration/test_hostile_peers.py."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from typing import Any

import pytest

from metac import errors
from metac.core.rpc import ConnectionLimits, Servant, connect_tcp, peer_group, serve_tcp
from metac.schema.load import demo
from metac.testing.inproc import eventually, run


class Box(Servant, demo.Box.Server):
    def __init__(self, holds: bool = False) -> None:
        self.holds = holds

    def _holds_capabilities(self) -> bool:
        return self.holds

    async def label(self, **kwargs: Any) -> str:
        return "box"


def table(total_bytes: int) -> bytes:
    """Segment table of a one-segment message of ``total_bytes`` (table included)."""
    return struct.pack("<II", 0, (total_bytes - 8) // 8)


async def raw_connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def serving(limits: ConnectionLimits, holds: bool = False) -> tuple[Any, int]:
    server = await serve_tcp("127.0.0.1", 0, lambda peer: Box(holds), limits)
    return server, server.sock.getsockname()[1]


def test_limits_from_env() -> None:
    assert ConnectionLimits.from_env({}) == ConnectionLimits()
    limits = ConnectionLimits.from_env({"METAC_RPC_MAX_MESSAGE_BYTES": "65536",
                                        "METAC_RPC_IDLE_TIMEOUT": "2.5",
                                        "METAC_RPC_MAX_CONNECTIONS_PER_PEER": " 7 "})
    assert (limits.max_message_bytes, limits.idle_timeout, limits.max_per_peer) == (65536, 2.5, 7)
    assert limits.traversal_limit_words == 4 * 65536 // 8
    read = ConnectionLimits.from_env({"METAC_RPC_MAX_READ_BYTES": "8388608"})
    assert read.traversal_limit_words == 1 << 20
    for name, value in [("METAC_RPC_MAX_CONNECTIONS", "many"), ("METAC_RPC_PENDING_BYTES", "0"),
                        ("METAC_RPC_MESSAGE_TIMEOUT", "-1"), ("METAC_RPC_IDLE_TIMEOUT", "nan"),
                        ("METAC_RPC_MAX_CONNECTIONS", "1.5")]:
        with pytest.raises(errors.InvalidArgument, match=f"^{name} must be a positive"):
            ConnectionLimits.from_env({name: value})


def test_peer_group_is_the_address_or_the_ipv6_64() -> None:
    assert peer_group("192.0.2.7") == "192.0.2.7"
    assert peer_group("2001:db8:1:2:3:4:5:6") == peer_group("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    assert peer_group("2001:db8:1:3::1") != peer_group("2001:db8:1:2::1")


def test_accept_loop_survives_accept_errors(caplog, monkeypatch) -> None:
    caplog.set_level(logging.WARNING, logger="metac.core.rpc")
    failures = [OSError(errno.EMFILE, "Too many open files")] * 6 + \
        [ConnectionAbortedError(errno.ECONNABORTED, "Software caused connection abort")]
    calls = []

    async def main() -> str:
        loop = asyncio.get_running_loop()
        real_accept = loop.sock_accept

        async def flaky_accept(sock: socket.socket) -> Any:
            calls.append(1)
            if failures:
                raise failures.pop(0)
            return await real_accept(sock)

        monkeypatch.setattr(loop, "sock_accept", flaky_accept)
        server, port = await serving(ConnectionLimits())
        try:
            async with connect_tcp("127.0.0.1", port) as conn:
                return (await conn.bootstrap(demo.Box).label()).label
        finally:
            await server.aclose()

    assert run(main()) == "box"
    assert not failures and len(calls) >= 8
    text = caplog.text
    # Rate-limited: the first of the six EMFILE errors is logged, not all six.
    assert text.count("cannot accept connections") == 1 and "Too many open files" in text
    assert "retrying in 0.05 s" in text


def test_oversized_message_is_refused_at_its_table() -> None:
    async def main() -> None:
        server, port = await serving(ConnectionLimits(max_message_bytes=4096))
        try:
            sock = await raw_connect(port)
            sock.send(table(4104) + b"\0" * 100)
            await eventually(lambda: closed_by_peer(sock))
            sock.close()
            fits = await raw_connect(port)
            fits.send(table(4096) + b"\0" * 100)
            await asyncio.sleep(0.3)
            assert not closed_by_peer(fits)
            fits.close()
        finally:
            await server.aclose()

    run(main())


def test_stalled_message_and_idle_connection_are_closed_holders_are_kept() -> None:
    async def main() -> None:
        limits = ConnectionLimits(message_timeout=0.3, idle_timeout=0.3)
        server, port = await serving(limits)
        held_server, held_port = await serving(limits, holds=True)
        try:
            stalled = await raw_connect(port)
            stalled.send(table(1024) + b"\0" * 100)
            idle = await raw_connect(port)
            holder = await raw_connect(held_port)
            await eventually(lambda: closed_by_peer(stalled) and closed_by_peer(idle), timeout=10)
            await asyncio.sleep(1.5)
            assert not closed_by_peer(holder)
            # A client that keeps calling is not idle, however long it lasts.
            async with connect_tcp("127.0.0.1", port) as conn:
                box = conn.bootstrap(demo.Box)
                for _ in range(8):
                    assert (await box.label()).label == "box"
                    await asyncio.sleep(0.1)
            for s in (stalled, idle, holder):
                s.close()
        finally:
            await server.aclose()
            await held_server.aclose()

    run(main())


def test_connections_per_peer_are_capped() -> None:
    async def main() -> None:
        server, port = await serving(ConnectionLimits(max_per_peer=2))
        try:
            first, second = await raw_connect(port), await raw_connect(port)
            third = await raw_connect(port)
            await eventually(lambda: closed_by_peer(third))
            assert not closed_by_peer(first) and not closed_by_peer(second)
            first.close()
            await asyncio.sleep(0.3)  # the node notices the close
            async with connect_tcp("127.0.0.1", port) as conn:
                assert (await conn.bootstrap(demo.Box).label()).label == "box"
            second.close()
            third.close()
        finally:
            await server.aclose()

    run(main())


def test_unfinished_large_messages_share_one_budget() -> None:
    async def main() -> None:
        # Large unfinished messages count twice (the node also keeps a copy to check).
        limits = ConnectionLimits(pending_bytes=500 << 10)
        server, port = await serving(limits)
        try:
            big = await raw_connect(port)
            big.send(table(150 << 10) + b"\0" * 1000)
            await asyncio.sleep(0.3)
            over = await raw_connect(port)
            over.send(table(120 << 10) + b"\0" * 1000)
            small = await raw_connect(port)  # up to 64 KiB: not counted
            small.send(table(60 << 10) + b"\0" * 1000)
            await eventually(lambda: closed_by_peer(over))
            assert not closed_by_peer(big) and not closed_by_peer(small)
            for s in (big, over, small):
                s.close()
        finally:
            await server.aclose()

    run(main())
