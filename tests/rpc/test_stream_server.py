"""StreamServer and open_stream in one process, over 127.0.0.1 (no root needed).

Checks the tcpListen rules (one connection, from exactly remote:remotePort;
others reset without data; timeout), holders (release and drop close both
ends), bindTo, the one-shot sources and fd hygiene.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket

import pytest

from metac import errors
from metac.core.rpc import rpc_errors
from metac.core.sources import TcpSource, file_source
from metac.core.streams import (
    StreamHost,
    StreamServer,
    memory_pair,
    open_stream,
    spawn_with_stdio_stream,
)
from metac.core.supervisor import Supervisor
from metac.schema.load import stream
from metac.testing.inproc import run

LOCAL = "127.0.0.1"


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Backend:
    """A TCP server on 127.0.0.1: echoes in upper case; records connections and EOFs."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Backend:
        self.server = await asyncio.start_server(self._handle, LOCAL, 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                writer.write(data.upper())
                await writer.drain()
            writer.write_eof()
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.closed.set()

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def _recv_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                data = await loop.sock_recv(sock, 65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def _client(server: StreamServer):
    return stream.Stream._new_client(server)


@pytest.mark.parametrize("address", [LOCAL, "::1"])
def test_open_stream_round_trip_and_half_close(address: str) -> None:
    if address == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def main() -> None:
        host = StreamHost(address)
        async with Backend() as backend:
            cap = _client(StreamServer(host, TcpSource(LOCAL, backend.port)))
            for _ in range(2):  # every use is a new connection
                async with await open_stream(cap, local_address=address) as opened:
                    loop = asyncio.get_running_loop()
                    await loop.sock_sendall(opened.sock, b"hello " * 1000)
                    opened.sock.shutdown(socket.SHUT_WR)
                    assert await _recv_all(opened.sock) == b"HELLO " * 1000
            assert backend.connections == 2
        await host.aclose()

    run(main())


def test_other_peers_are_reset_without_data() -> None:
    async def main() -> None:
        host = StreamHost(LOCAL)
        loop = asyncio.get_running_loop()
        async with Backend() as backend:
            cap = _client(StreamServer(host, TcpSource(LOCAL, backend.port)))
            mine = socket.socket()
            mine.setblocking(False)
            mine.bind((LOCAL, 0))
            res = await cap.tcpListen(remote={"ip": LOCAL}, remotePort=mine.getsockname()[1])
            target = (res.local.ip, res.port)
            # Same address, other port; then another address (127.0.0.2 is loopback too).
            for source in ((LOCAL, 0), ("127.0.0.2", 0)):
                intruder = socket.socket()
                intruder.setblocking(False)
                intruder.bind(source)
                await loop.sock_connect(intruder, target)
                assert await _recv_all(intruder) == b""
                intruder.close()
            assert host.rejected == 2
            await loop.sock_connect(mine, target)
            await loop.sock_sendall(mine, b"still works")
            mine.shutdown(socket.SHUT_WR)
            assert await _recv_all(mine) == b"STILL WORKS"
            mine.close()
            # Exactly one connection: the listener is gone.
            late = socket.socket()
            late.setblocking(False)
            with pytest.raises(ConnectionRefusedError):
                await loop.sock_connect(late, target)
            late.close()
            await res.holder.release()
        await host.aclose()

    run(main())


def test_unused_listener_times_out_and_closes_the_source() -> None:
    async def main() -> None:
        host = StreamHost(LOCAL, listen_timeout=0.3)
        loop = asyncio.get_running_loop()
        async with Backend() as backend:
            cap = _client(StreamServer(host, TcpSource(LOCAL, backend.port)))
            res = await cap.tcpListen(remote={"ip": LOCAL}, remotePort=40000)
            await asyncio.wait_for(backend.closed.wait(), 5)  # backend connection closed
            assert not host.sessions
            late = socket.socket()
            late.setblocking(False)
            with pytest.raises(ConnectionRefusedError):
                await loop.sock_connect(late, (res.local.ip, res.port))
            late.close()
        await host.aclose()

    run(main())


@pytest.mark.parametrize("how", ["release", "drop"])
def test_holder_release_or_drop_closes_both_ends(how: str) -> None:
    async def main() -> None:
        host = StreamHost(LOCAL)
        loop = asyncio.get_running_loop()
        async with Backend() as backend:
            cap = _client(StreamServer(host, TcpSource(LOCAL, backend.port)))
            opened = await open_stream(cap, local_address=LOCAL)
            await loop.sock_sendall(opened.sock, b"x")
            assert await loop.sock_recv(opened.sock, 10) == b"X"
            holder, opened.holder = opened.holder, None
            if how == "release":
                await holder.release()
            else:
                del holder
                gc.collect()
            await asyncio.wait_for(backend.closed.wait(), 5)
            assert await _recv_all(opened.sock) == b""
            await opened.aclose()
            assert not host.sessions
        await host.aclose()

    run(main())


def test_bind_two_memory_streams() -> None:
    async def main() -> None:
        host = StreamHost(LOCAL)
        loop = asyncio.get_running_loop()
        server_a, sock_a = memory_pair(host, "a")
        server_b, sock_b = memory_pair(host, "b")
        for s in (sock_a, sock_b):
            s.setblocking(False)
        holder = (await _client(server_a).bindTo(_client(server_b))).holder
        await loop.sock_sendall(sock_a, b"a to b")
        await loop.sock_sendall(sock_b, b"b to a")
        assert await loop.sock_recv(sock_b, 100) == b"a to b"
        assert await loop.sock_recv(sock_a, 100) == b"b to a"
        # Non-persistable: the streams were not exported by a service.
        with pytest.raises(errors.Unsupported):
            async with rpc_errors():
                await holder.createSturdyRef(persistent=False)
        await holder.release()
        assert await _recv_all(sock_a) == b""
        assert await _recv_all(sock_b) == b""
        sock_a.close()
        sock_b.close()
        # A memory stream is one-shot.
        with pytest.raises(errors.FailedPrecondition):
            async with rpc_errors():
                await open_stream(_client(server_a), local_address=LOCAL)
        await host.aclose()

    run(main())


def test_file_and_process_stdio_streams(tmp_path) -> None:
    content = os.urandom(1 << 20)
    (tmp_path / "f").write_bytes(content)

    async def main() -> None:
        host = StreamHost(LOCAL)
        loop = asyncio.get_running_loop()
        fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CLOEXEC)
        cap = _client(StreamServer(host, file_source(fd)))
        async with await open_stream(cap, local_address=LOCAL) as opened:
            assert await _recv_all(opened.sock) == content

        supervisor = Supervisor(str(tmp_path / "state"), "test")
        server, child = await spawn_with_stdio_stream(
            host, supervisor, ["tr", "a-z", "A-Z"], name="tr")
        async with await open_stream(_client(server), local_address=LOCAL) as opened:
            await loop.sock_sendall(opened.sock, b"shout")
            opened.sock.shutdown(socket.SHUT_WR)
            assert await _recv_all(opened.sock) == b"SHOUT"
        assert await asyncio.wait_for(child.wait(), 5) == 0
        supervisor.forget(child)
        await supervisor.aclose()
        await host.aclose()

    run(main())


def test_bad_requests_are_client_errors() -> None:
    async def main() -> None:
        host = StreamHost(LOCAL)
        cap = _client(StreamServer(host, TcpSource(LOCAL, 1)))
        with pytest.raises(errors.InvalidArgument):
            async with rpc_errors():
                await cap.tcpListen(remote={"ip": "not-an-ip"}, remotePort=5)
        with pytest.raises(errors.InvalidArgument):
            async with rpc_errors():
                await cap.tcpListen(remote={"ip": "::1"}, remotePort=5)  # wrong family
        with pytest.raises(errors.Unavailable):  # nothing listens on port 1
            async with rpc_errors():
                await open_stream(cap, local_address=LOCAL)
        with pytest.raises(errors.Unsupported):
            async with rpc_errors():
                await cap.createSturdyRef(persistent=False)
        await host.aclose()

    run(main())


def test_many_open_close_cycles_leave_no_fds() -> None:
    async def main() -> None:
        host = StreamHost(LOCAL)
        loop = asyncio.get_running_loop()
        async with Backend() as backend:
            cap = _client(StreamServer(host, TcpSource(LOCAL, backend.port)))
            before = _fd_count()
            for i in range(200):
                async with await open_stream(cap, local_address=LOCAL) as opened:
                    await loop.sock_sendall(opened.sock, b"%d" % i)
                    opened.sock.shutdown(socket.SHUT_WR)
                    assert await _recv_all(opened.sock) == b"%d" % i
            for _ in range(50):
                if _fd_count() <= before and not host.sessions:
                    break
                await asyncio.sleep(0.05)
            assert not host.sessions
            assert _fd_count() <= before
        await host.aclose()

    with contextlib.suppress(ResourceWarning):
        run(main())
