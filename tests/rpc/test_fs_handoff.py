"""fs.handoff.HandoffStreamServer: the connection goes to a callback."""

from __future__ import annotations

import asyncio
import os
import socket

from metac.core.pump import Endpoint
from metac.core.streams import StreamHost, memory_pair, open_stream
from metac.fs.handoff import HandoffStreamServer
from metac.schema.load import stream
from metac.testing.inproc import run

LOCAL = "127.0.0.1"


def test_each_connection_is_handed_to_the_callback() -> None:
    served: list[int] = []

    async def serve(endpoint: Endpoint) -> None:
        fd = endpoint.read_fd
        os.set_blocking(fd, True)
        served.append(fd)
        os.write(fd, b"hello from the handoff")
        endpoint.close()

    async def main() -> None:
        host = StreamHost(LOCAL)
        cap = stream.Stream._new_client(HandoffStreamServer(host, serve, name="test"))
        loop = asyncio.get_running_loop()
        for _ in range(3):
            async with await open_stream(cap, local_address=LOCAL) as opened:
                data = b""
                while chunk := await loop.sock_recv(opened.sock, 100):
                    data += chunk
                assert data == b"hello from the handoff"
        await host.aclose()

    run(main())
    assert len(served) == 3


def test_releasing_the_holder_cancels_the_callback() -> None:
    state = {"cancelled": False}

    async def main() -> None:
        started = asyncio.Event()

        async def serve(endpoint: Endpoint) -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                state["cancelled"] = True
                raise

        host = StreamHost(LOCAL)
        cap = stream.Stream._new_client(HandoffStreamServer(host, serve, name="test"))
        opened = await open_stream(cap, local_address=LOCAL)
        await asyncio.wait_for(started.wait(), 5)
        await opened.aclose()  # releases the tcpListen holder
        for _ in range(100):
            if state["cancelled"]:
                break
            await asyncio.sleep(0.02)
        await host.aclose()

    run(main())
    assert state["cancelled"]


def test_bind_to_another_stream() -> None:
    async def serve(endpoint: Endpoint) -> None:
        fd = endpoint.read_fd
        os.set_blocking(fd, True)
        os.write(fd, b"bound")
        endpoint.close()

    async def main() -> None:
        host = StreamHost(LOCAL)
        cap = stream.Stream._new_client(HandoffStreamServer(host, serve, name="test"))
        other, ours = memory_pair(host)
        holder = (await cap.bindTo(stream.Stream._new_client(other))).holder
        loop = asyncio.get_running_loop()
        ours.setblocking(False)
        data = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(ours, 100), 5):
            data += chunk
        assert data == b"bound"
        await holder.release()
        ours.close()
        await host.aclose()

    run(main())


def test_wrong_peer_is_refused_like_any_stream() -> None:
    async def serve(endpoint: Endpoint) -> None:
        raise AssertionError("an unauthorized connection reached the callback")

    async def main() -> None:
        host = StreamHost(LOCAL, listen_timeout=2)
        cap = stream.Stream._new_client(HandoffStreamServer(host, serve, name="test"))
        res = await cap.tcpListen(remote={"ip": LOCAL}, remotePort=9)  # nobody has port 9
        loop = asyncio.get_running_loop()
        with socket.socket() as s:
            s.setblocking(False)
            await loop.sock_connect(s, (res.local.ip, res.port))
            try:  # reset without data
                assert await asyncio.wait_for(loop.sock_recv(s, 10), 5) == b""
            except ConnectionResetError:
                pass
        assert host.rejected == 1
        await res.holder.release()
        await host.aclose()

    run(main())
