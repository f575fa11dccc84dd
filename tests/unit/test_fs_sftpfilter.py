"""metac.fs.sftpfilter: SETSTAT of owner/times becomes lsetstat@openssh.com; squashed, modes
lose S_ISUID/S_ISGID; the rest passes."""

from __future__ import annotations

import os
import select
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


def run(data: bytes, cuts: list[int] = (), rewrites: sf.Rewrites | None = None) -> bytes:
    f = sf.RequestFilter(rewrites)
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


@given(st.binary(max_size=2000), st.lists(st.integers(0, 3000), max_size=8),
       st.sampled_from([None, sf.Rewrites(strip_setid=True),
                        sf.Rewrites(lsetstat=True, strip_setid=True)]))
def test_garbage_never_raises_and_never_grows_unbounded(data: bytes, cuts: list[int],
                                                        rewrites: sf.Rewrites | None) -> None:
    out = run(data, cuts, rewrites)
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


# --- strip_setid: the squashed exports' nosuid ---------------------------------------

STRIP = sf.Rewrites(strip_setid=True)
BOTH = sf.Rewrites(lsetstat=True, strip_setid=True)
OPEN, SETSTAT, FSETSTAT, MKDIR, EXTENDED = 3, 9, 10, 14, 200


def attrs(mode: int | None = None, *, size: int | None = None, owner: tuple[int, int] | None = None,
          times: tuple[int, int] | None = None, ext: list[tuple[bytes, bytes]] | None = None) -> bytes:
    flags = ((sf.ATTR_SIZE if size is not None else 0) | (sf.ATTR_UIDGID if owner else 0)
             | (sf.ATTR_PERMISSIONS if mode is not None else 0)
             | (sf.ATTR_ACMODTIME if times else 0) | (0x80000000 if ext is not None else 0))
    out = u32(flags)
    if size is not None:
        out += struct.pack(">Q", size)
    if owner:
        out += u32(owner[0]) + u32(owner[1])
    if mode is not None:
        out += u32(mode)
    if times:
        out += u32(times[0]) + u32(times[1])
    if ext is not None:
        out += u32(len(ext)) + b"".join(string(k) + string(v) for k, v in ext)
    return out


def request(kind: int, request_id: int, path: bytes, a: bytes) -> bytes:
    """An attribute-bearing request: OPEN gets pflags, EXTENDED is lsetstat."""
    body = bytes([kind]) + u32(request_id)
    if kind == EXTENDED:
        body += string(sf.LSETSTAT)
    body += string(path)
    if kind == OPEN:
        body += u32(0x1A)  # WRITE|CREAT|TRUNC
    return packet(body + a)


def filtered(data: bytes, rewrites: sf.Rewrites = STRIP) -> tuple[bytes, str | None]:
    f = sf.RequestFilter(rewrites)
    out = b"".join(bytes(p) for p in f.feed(data))
    return out, f.refused


def test_every_mode_request_loses_setuid_and_setgid_but_keeps_the_rest() -> None:
    for kind in (OPEN, SETSTAT, FSETSTAT, MKDIR, EXTENDED):
        for mode, want in ((0o4755, 0o755), (0o6755, 0o755), (0o2775, 0o775),
                           (0o7777, 0o1777), (0o104755, 0o100755), (0xFFFFFFFF, 0xFFFFF3FF)):
            for kw in ({}, {"size": 5}, {"owner": (1, 2)}, {"size": 7, "owner": (0, 0),
                                                            "times": (3, 4), "ext": [(b"k", b"v")]}):
                got, refused = filtered(request(kind, 42, b"/export/x", attrs(mode, **kw)))
                assert refused is None
                assert got == request(kind, 42, b"/export/x", attrs(want, **kw)), (kind, oct(mode))


def test_modes_without_the_bits_and_requests_without_a_mode_pass_byte_identical() -> None:
    same = [request(k, 1, b"/export/f", attrs(m)) for k in (OPEN, SETSTAT, FSETSTAT, MKDIR,
                                                              EXTENDED)
            for m in (0o755, 0o1777, 0o644, 0)]
    same += [request(k, 2, b"/export/f", attrs(size=9)) for k in (OPEN, FSETSTAT)]
    same += [request(OPEN, 3, b"/export/f", attrs()),
             packet(bytes([EXTENDED]) + u32(4) + string(b"posix-rename@openssh.com")
                    + string(b"/a") + string(b"/b")),
             # another extension: its data is not ATTRS, whatever it looks like
             packet(bytes([EXTENDED]) + u32(5) + string(b"copy-data") + string(b"p")
                    + attrs(0o4755)),
             packet(bytes([6]) + u32(9) + string(b"h") + u32(0) * 2 + string(u32(0o4755) * 9)),
             packet(bytes([1]) + u32(3))]
    for p in same:
        assert filtered(p) == (p, None)


def test_strip_and_lsetstat_together() -> None:
    """A chmod stays SETSTAT (stripped); an owner or times change still becomes lsetstat."""
    got, _ = filtered(request(SETSTAT, 1, b"/export/x", attrs(0o4755)), BOTH)
    assert got == request(SETSTAT, 1, b"/export/x", attrs(0o755))
    got, _ = filtered(request(SETSTAT, 2, b"/export/l", attrs(owner=(0, 0))), BOTH)
    assert got == request(EXTENDED, 2, b"/export/l", attrs(owner=(0, 0)))
    # without strip_setid, the mode passes as it is (--preserve-owners)
    p = request(SETSTAT, 3, b"/export/x", attrs(0o4755))
    assert filtered(p, sf.Rewrites(lsetstat=True)) == (p, None)
    p = request(SETSTAT, 4, b"/export/l", attrs(owner=(0, 0)))
    assert filtered(p, STRIP) == (p, None)  # without lsetstat, SETSTAT stays SETSTAT


def test_what_the_server_would_read_past_is_refused() -> None:
    """sftp-server parses past a too-short packet into the next one: stripping refuses
    those, and passes nothing after them."""
    after = packet(bytes([5]) + u32(1) + string(b"h") + struct.pack(">QI", 0, 10))
    first = request(MKDIR, 1, b"/export/ok", attrs(0o4755))
    bad = [
        u32(0) + request(SETSTAT, 2, b"/x", attrs(0o4755))[4:],             # length 0
        packet(bytes([SETSTAT]) + u32(2) + u32(100) + b"/x"),              # path past the end
        packet(bytes([SETSTAT]) + u32(2) + string(b"/x")),                 # no flags
        packet(bytes([SETSTAT]) + u32(2) + string(b"/x") + u32(sf.ATTR_PERMISSIONS)),
        packet(bytes([OPEN]) + u32(2) + string(b"/x") + u32(0x1A)[:2]),
        packet(bytes([MKDIR])),
        packet(bytes([EXTENDED]) + u32(2) + u32(len(sf.LSETSTAT))),        # name past the end
        packet(bytes([EXTENDED]) + u32(2) + string(sf.LSETSTAT) + string(b"/x")),
        request(OPEN, 2, b"p" * sf.MAX_HELD, attrs(0o644)),                # longer than held
    ]
    for b in bad:
        out, refused = filtered(first + b + after)
        assert refused, b[:40]
        assert out == request(MKDIR, 1, b"/export/ok", attrs(0o755))
    # without strip_setid these pass as before (the lsetstat rewrite needs no such care)
    for b in bad[1:]:
        assert filtered(b + after, sf.Rewrites(lsetstat=True)) == (b + after, None)


def test_a_refused_stream_ends_the_pump() -> None:
    conn_r, conn_w = os.pipe()
    stdin_r, stdin_w = os.pipe()
    f = sf.RequestFilter(STRIP)
    thread = threading.Thread(target=sf.pump, args=(conn_r, stdin_w, f))
    thread.start()
    ok = request(MKDIR, 1, b"/export/d", attrs(0o2755))
    os.write(conn_w, ok + u32(0) + b"\x09more")
    got = b""
    try:
        while select.select([stdin_r], [], [], 10)[0]:  # EOF although conn_w is open
            chunk = os.read(stdin_r, 65536)
            if not chunk:
                break
            got += chunk
        else:
            raise AssertionError("the pump did not end the server's stdin")
    finally:
        os.close(conn_w)  # ends the pump's read if it did not stop
        thread.join(10)
    assert not thread.is_alive() and f.refused == "a packet of length 0"
    assert got == request(MKDIR, 1, b"/export/d", attrs(0o755))
    for fd in (conn_r, stdin_r):
        os.close(fd)


# Properties over streams of valid and hostile packets.

def parse_packets(data: bytes) -> list[bytes]:
    """Split a (filtered) stream into packet bodies; trailing partial bytes dropped."""
    bodies = []
    while len(data) >= 4:
        (n,) = struct.unpack_from(">I", data)
        if len(data) < 4 + n:
            break
        bodies.append(data[4:4 + n])
        data = data[4 + n:]
    return bodies


modes = st.one_of(st.integers(0, 0o7777), st.integers(0, 2**32 - 1))
attr_blobs = st.builds(
    lambda mode, size, owner, times, ext: attrs(mode, size=size, owner=owner, times=times,
                                                ext=ext),
    st.one_of(st.none(), modes), st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    st.one_of(st.none(), st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))),
    st.one_of(st.none(), st.tuples(st.integers(0, 9), st.integers(0, 9))),
    st.one_of(st.none(), st.lists(st.tuples(st.binary(max_size=5), st.binary(max_size=5)),
                                  max_size=2)))
mode_requests = st.builds(request, st.sampled_from([OPEN, SETSTAT, FSETSTAT, MKDIR, EXTENDED]),
                          st.integers(0, 2**32 - 1), st.binary(max_size=30), attr_blobs)
other_packets = st.builds(lambda t, b: packet(bytes([t]) + b),
                          st.integers(0, 255).filter(lambda t: t not in sf.MODE_REQUESTS),
                          st.binary(max_size=300))
hostile = st.one_of(
    st.builds(lambda p, cut: packet(p[4:][:max(1, cut)]), mode_requests, st.integers(0, 60)),
    st.builds(lambda b: u32(0) + b, st.binary(max_size=40)),
    st.builds(lambda t, b: packet(bytes([t]) + b), st.sampled_from(sorted(sf.MODE_REQUESTS)),
              st.binary(max_size=60)),
)
streams = st.lists(st.one_of(mode_requests, other_packets, hostile), max_size=8)


def mode_of(body: bytes) -> int | None:
    """The mode sftp-server would apply for this request body (the server's reading)."""
    try:
        a = sf.attrs_offset(body)
        at = None if a is None else sf.permissions_offset(body, a)
    except sf.Malformed:
        raise AssertionError(f"a malformed mode request was passed on: {body[:40]!r}") from None
    return None if at is None else struct.unpack_from(">I", body, at)[0]


@given(streams, st.lists(st.integers(0, 10_000), max_size=12),
       st.sampled_from([STRIP, BOTH, sf.Rewrites(lsetstat=True)]))
def test_stripping_any_split_gives_the_same_stream(stream: list[bytes], cuts: list[int],
                                                   rewrites: sf.Rewrites) -> None:
    data = b"".join(stream)
    assert run(data, cuts, rewrites) == run(data, (), rewrites)


@given(streams, st.lists(st.integers(0, 10_000), max_size=12), st.sampled_from([STRIP, BOTH]))
def test_no_setid_mode_ever_reaches_the_server(stream: list[bytes], cuts: list[int],
                                               rewrites: sf.Rewrites) -> None:
    out = run(b"".join(stream), cuts, rewrites)
    bodies = parse_packets(out)
    assert b"".join(u32(len(b)) + b for b in bodies) == out  # whole packets only
    for body in bodies:
        assert body, "a packet of length 0 was passed on"
        mode = mode_of(body)
        assert mode is None or not mode & sf.SETID, oct(mode)


@given(st.lists(st.one_of(mode_requests, other_packets), max_size=10),
       st.sampled_from([STRIP, BOTH]))
def test_valid_streams_keep_every_packet_and_other_packets_byte_identical(
        stream: list[bytes], rewrites: sf.Rewrites) -> None:
    out = parse_packets(run(b"".join(stream), (), rewrites))
    assert len(out) == len(stream)
    for sent, got in zip(stream, out, strict=True):
        if sent[4] not in sf.MODE_REQUESTS:
            assert got == sent[4:]
        else:
            mode = mode_of(sent[4:])
            if not (mode or 0) & sf.SETID and rewrites.lsetstat is False:
                assert got == sent[4:]
            if mode is not None and got[0] == sent[4]:
                assert mode_of(got) == mode & ~sf.SETID
