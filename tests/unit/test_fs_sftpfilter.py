"""metac.fs.sftpfilter: SETSTAT of owner/times becomes lsetstat@openssh.com; the rest passes."""

from __future__ import annotations

import os
import struct
import threading

from hypothesis import given
from hypothesis import strategies as st

from metac.fs import sftpfilter as sf


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def string(b: bytes) -> bytes:
    return u32(len(b)) + b


def packet(body: bytes) -> bytes:
    return u32(len(body)) + body


def setstat(request_id: int, path: bytes, flags: int, rest: bytes = b"") -> bytes:
    return packet(bytes([sf.SSH_FXP_SETSTAT]) + u32(request_id) + string(path) + u32(flags) + rest)


def run(data: bytes, cuts: list[int] = ()) -> bytes:
    f = sf.RequestFilter()
    out = []
    last = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        out += f.feed(data[last:cut])
        last = cut
    out += f.feed(data[last:])
    return b"".join(bytes(p) for p in out)


def test_owner_and_times_become_lsetstat() -> None:
    times = u32(1) + u32(2)
    owner = u32(0) + u32(0)
    for flags, rest in ((sf.ATTR_UIDGID, owner), (sf.ATTR_ACMODTIME, times),
                        (sf.ATTR_UIDGID | sf.ATTR_ACMODTIME, owner + times)):
        got = run(setstat(7, b"/export/usr/bin/link", flags, rest))
        want = packet(bytes([sf.SSH_FXP_EXTENDED]) + u32(7) + string(b"lsetstat@openssh.com")
                      + string(b"/export/usr/bin/link") + u32(flags) + rest)
        assert got == want


def test_size_mode_and_other_packets_pass_unchanged() -> None:
    unchanged = [
        setstat(1, b"/export/f", 0x01, u32(0) + u32(5)),           # size
        setstat(2, b"/export/f", 0x04, u32(0o644)),                # mode
        setstat(3, b"/export/f", 0x04 | 0x02, u32(0) * 2 + u32(0o644)),
        setstat(4, b"/export/f", 0),
        packet(bytes([sf.SSH_FXP_SETSTAT]) + u32(5) + u32(1000) + b"x"),  # truncated path
        packet(bytes([1]) + u32(3)),                               # INIT
        packet(bytes([6]) + u32(9) + string(b"handle") + u32(0) * 2 + string(b"x" * 5000)),
    ]
    for p in unchanged:
        assert run(p) == p


def test_a_huge_setstat_is_not_held() -> None:
    big = setstat(1, b"p" * (sf.MAX_HELD + 10), sf.ATTR_UIDGID, u32(0) * 2)
    assert run(big) == big


packets = st.one_of(
    st.builds(setstat, st.integers(0, 2**32 - 1), st.binary(max_size=40),
              st.sampled_from([0, 1, 2, 4, 8, 10, 0x80000002]), st.binary(max_size=16)),
    st.builds(lambda t, b: packet(bytes([t]) + b), st.integers(0, 255), st.binary(max_size=300)),
)


@given(st.lists(packets, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_gives_the_same_stream(stream: list[bytes], cuts: list[int]) -> None:
    data = b"".join(stream)
    whole = run(data)
    assert run(data, cuts) == whole
    assert whole == b"".join(run(p) for p in stream)  # framing kept packet by packet


@given(st.binary(max_size=2000), st.lists(st.integers(0, 3000), max_size=8))
def test_garbage_never_raises_and_never_grows_unbounded(data: bytes, cuts: list[int]) -> None:
    out = run(data, cuts)
    assert len(out) <= len(data) + len(data) // 13 * 24 + 24


def test_pump_copies_until_eof_and_closes_the_writer() -> None:
    conn_r, conn_w = os.pipe()
    stdin_r, stdin_w = os.pipe()
    data = setstat(1, b"/export/l", sf.ATTR_UIDGID, u32(0) * 2) + packet(b"\x05" + b"y" * 30000)
    thread = threading.Thread(target=sf.pump, args=(conn_r, stdin_w))
    thread.start()
    os.write(conn_w, data[:3])
    os.write(conn_w, data[3:])
    os.close(conn_w)
    got = b""
    while chunk := os.read(stdin_r, 65536):
        got += chunk
    thread.join(10)
    assert got == run(data) and b"lsetstat@openssh.com" in got
    os.close(conn_r)
    os.close(stdin_r)


def test_request_pump_stop_cuts_the_connection_it_shares() -> None:
    """The server's stdin pump holds a copy of the connection: stopping it must still
    end the connection for the peer (a cancelled stream, a revoked ref)."""
    import asyncio
    import socket

    from metac.fs.servers import RequestPump

    async def main() -> None:
        ours, peer = socket.socketpair()
        pump = RequestPump(ours.fileno())
        ours.close()  # like endpoint.close(): only the pump's copies are left
        server_stdin = os.fdopen(os.dup(pump.stdin), "rb")  # what the server would read
        pump.start("test")
        peer.sendall(setstat(3, b"/export/l", sf.ATTR_UIDGID, u32(0) * 2))
        got = await asyncio.to_thread(server_stdin.read1, 65536)
        assert b"lsetstat@openssh.com" in got
        await asyncio.wait_for(pump.stop(), 10)
        peer.settimeout(10)
        assert peer.recv(1) == b""  # the peer sees the end
        assert await asyncio.to_thread(server_stdin.read) == b""  # and the server its EOF
        server_stdin.close()
        peer.close()

    asyncio.run(main())
