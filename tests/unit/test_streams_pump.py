"""metac.core.pump (with metac.core.sources) over local fds: splice, fallback copy, half-close, errors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket

import pytest

from metac.core.pump import Endpoint, Pump, pipe_endpoints
from metac.core.sources import file_source


def run(coro):
    return asyncio.run(coro)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while True:
        data = await loop.sock_recv(sock, 1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


async def _send_all(sock: socket.socket, data: bytes, *, shut: bool = True) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    if shut:
        sock.shutdown(socket.SHUT_WR)


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_sockets_both_ways_with_splice_and_half_close() -> None:
    payload_ab = os.urandom(3 << 20)
    payload_ba = os.urandom(1 << 20) + b"tail"

    async def main() -> None:
        left_user, left_pump = _pair()
        right_pump, right_user = _pair()
        pump = Pump(Endpoint.of_socket(left_pump, "left"), Endpoint.of_socket(right_pump, "right"))
        task = asyncio.get_running_loop().create_task(pump.run())
        got_right, got_left, _, _ = await asyncio.gather(
            _read_all(right_user), _read_all(left_user),
            _send_all(left_user, payload_ab), _send_all(right_user, payload_ba))
        await task
        assert got_right == payload_ab
        assert got_left == payload_ba
        assert pump.spliced and pump.error is None
        assert [d.bytes for d in pump.directions] == [len(payload_ab), len(payload_ba)]
        assert left_pump.fileno() == -1 and right_pump.fileno() == -1  # the pump closed them
        left_user.close()
        right_user.close()

    before = _fd_count()
    run(main())
    assert _fd_count() == before


def test_half_close_keeps_the_other_direction_open() -> None:
    async def main() -> None:
        a_user, a_pump = _pair()
        b_pump, b_user = _pair()
        pump = Pump(Endpoint.of_socket(a_pump), Endpoint.of_socket(b_pump))
        task = asyncio.get_running_loop().create_task(pump.run())
        loop = asyncio.get_running_loop()
        await _send_all(a_user, b"request")
        assert await _read_all(b_user) == b"request"  # EOF arrived: half-closed
        # The answer still flows after the half-close.
        await _send_all(b_user, b"answer", shut=False)
        assert await loop.sock_recv(a_user, 100) == b"answer"
        b_user.shutdown(socket.SHUT_WR)
        assert await _read_all(a_user) == b""
        await asyncio.wait_for(task, 5)
        a_user.close()
        b_user.close()

    run(main())


def test_reset_on_one_side_ends_everything() -> None:
    async def main() -> None:
        a_user, a_pump = _pair()
        b_pump, b_user = _pair()
        pump = Pump(Endpoint.of_socket(a_pump), Endpoint.of_socket(b_pump))
        task = asyncio.get_running_loop().create_task(pump.run())
        await asyncio.get_running_loop().sock_sendall(a_user, b"x" * 1000)
        await asyncio.sleep(0.05)
        b_user.close()  # the pump's next write fails; a_user is closed in turn
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await asyncio.get_running_loop().sock_sendall(a_user, b"y" * (1 << 20))
        await asyncio.wait_for(task, 5)
        assert pump.error is not None
        a_user.close()

    run(main())


def test_stop_aborts_a_live_pump() -> None:
    async def main() -> None:
        a_user, a_pump = _pair()
        b_pump, b_user = _pair()
        pump = Pump(Endpoint.of_socket(a_pump), Endpoint.of_socket(b_pump))
        task = asyncio.get_running_loop().create_task(pump.run())
        await asyncio.sleep(0.05)
        pump.stop()
        await asyncio.wait_for(task, 5)
        assert await _read_all(a_user) == b""
        assert await _read_all(b_user) == b""
        a_user.close()
        b_user.close()

    run(main())


def test_full_pipe_and_blocked_destination_do_not_spin() -> None:
    """Small messages fill the splice pipe by slots (one per message) long before
    PIPE_SIZE bytes; with the destination blocked too, the pump must sleep until the
    destination drains, not wake again and again on its still readable source."""
    message = b"m" * 100

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a_user, a_pump = _pair()
        b_pump, b_user = _pair()
        pump = Pump(Endpoint.of_socket(a_pump), Endpoint.of_socket(b_pump))
        task = loop.create_task(pump.run())
        sent, stalled = 0, 0
        while stalled < 20:  # one skb per message, until everything is full; nobody reads
            try:
                sent += a_user.send(message)
                stalled = 0
            except BlockingIOError:
                stalled += 1
                await asyncio.sleep(0.01)
        assert sent > 300 * len(message)  # more messages than the pipe has slots
        waits = pump.directions[0].waits
        await asyncio.sleep(0.3)
        assert pump.directions[0].waits - waits <= 2, "the pump spins"
        a_user.shutdown(socket.SHUT_WR)
        received = await _read_all(b_user)
        assert len(received) == sent and received == message * (sent // len(message))
        b_user.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 5)
        assert pump.error is None and pump.spliced
        a_user.close()
        b_user.close()

    run(main())


def test_pipes_and_a_file(tmp_path) -> None:
    content = os.urandom(5 << 20)
    path = tmp_path / "data"
    path.write_bytes(content)

    async def main() -> None:
        # File -> socket; what the peer sends goes to /dev/null.
        source = file_source(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        endpoint = await source.open()
        user, ours = _pair()
        task = asyncio.get_running_loop().create_task(
            pipe_endpoints(endpoint, Endpoint.of_socket(ours)))
        got, _ = await asyncio.gather(_read_all(user), _send_all(user, b"ignored"))
        pump = await task
        assert hashlib.sha256(got).digest() == hashlib.sha256(content).digest()
        assert pump.spliced
        user.close()

        # Pipes (a process's stdio) -> socket and back.
        out_r, out_w = os.pipe()
        in_r, in_w = os.pipe()
        stdio = Endpoint.of_fds(out_r, in_w, "stdio")
        user, ours = _pair()
        task = asyncio.get_running_loop().create_task(
            pipe_endpoints(stdio, Endpoint.of_socket(ours)))
        os.write(out_w, b"from the process")
        os.close(out_w)
        await _send_all(user, b"to the process")
        assert await _read_all(user) == b"from the process"
        await asyncio.wait_for(task, 5)
        with os.fdopen(in_r, "rb") as f:
            assert f.read() == b"to the process"  # and EOF: the pump closed in_w
        user.close()

    before = _fd_count()
    run(main())
    assert _fd_count() == before


def test_fallback_copy_for_a_tty() -> None:
    async def main() -> None:
        master, slave = os.openpty()
        os.set_blocking(master, False)
        tty = Endpoint.of_fds(slave, os.dup(slave), "tty")
        user, ours = _pair()
        pump = Pump(tty, Endpoint.of_socket(ours))
        task = asyncio.get_running_loop().create_task(pump.run())
        await _send_all(user, b"hello\n", shut=False)
        seen = b""
        while b"hello" not in seen:
            try:
                seen += os.read(master, 100)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        assert not pump.directions[1].spliced  # socket -> tty is copied
        user.close()
        os.close(master)  # the tty side ends too (reads fail with EIO)
        await asyncio.wait_for(task, 5)

    run(main())


def test_one_shot_source_opens_once() -> None:
    from metac import errors
    from metac.core.sources import OneShotSource

    async def main() -> None:
        a, b = _pair()
        source = OneShotSource(Endpoint.of_socket(a))
        endpoint = await source.open()
        with pytest.raises(errors.FailedPrecondition):
            await source.open()
        endpoint.close()
        b.close()

    run(main())


def test_append_only_file_is_copied_not_spliced(tmp_path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"old ")

    async def main() -> None:
        sink = Endpoint.of_fds(os.open(os.devnull, os.O_RDONLY),
                               os.open(path, os.O_WRONLY | os.O_APPEND), "appended")
        user, ours = _pair()
        task = asyncio.get_running_loop().create_task(
            pipe_endpoints(Endpoint.of_socket(ours), sink))
        await _send_all(user, b"new")
        pump = await asyncio.wait_for(task, 5)
        assert pump.error is None and not pump.directions[0].spliced
        user.close()

    run(main())
    assert path.read_bytes() == b"old new"
