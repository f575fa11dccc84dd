"""metac.codec.nbdproto: the client side of the NBD fixed-newstyle handshake (sans-IO)."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metac.codec import nbdproto as p

GREETING = b"NBDMAGIC" + struct.pack(">QH", p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)


def reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", p.REPLY_MAGIC, option, rtype, len(data)) + data


def info_export(size: int, flags: int) -> bytes:
    return reply(p.OPT_GO, p.REP_INFO, struct.pack(">HQH", p.INFO_EXPORT, size, flags))


def test_go_one_byte_at_a_time() -> None:
    hs = p.ClientHandshake()
    stream = GREETING + info_export(1 << 30, p.TFLAG_HAS_FLAGS | p.TFLAG_READ_ONLY) + \
        reply(p.OPT_GO, p.REP_ACK)
    for i in range(len(stream)):
        hs.receive_data(stream[i:i + 1])
    sent = hs.data_to_send()
    assert sent[:4] == struct.pack(">I", p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)
    magic, option, length = struct.unpack(">QII", sent[4:20])
    assert (magic, option, length) == (p.IHAVEOPT, p.OPT_GO, 6)
    assert hs.done and hs.export == p.ExportInfo(1 << 30, 3) and hs.export.read_only


def test_falls_back_to_export_name() -> None:
    hs = p.ClientHandshake()
    hs.receive_data(b"NBDMAGIC" + struct.pack(">QH", p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE))
    hs.data_to_send()
    hs.receive_data(reply(p.OPT_GO, p.REP_ERR_UNSUP))
    sent = hs.data_to_send()
    assert struct.unpack(">QII", sent[:16]) == (p.IHAVEOPT, p.OPT_EXPORT_NAME, 0)
    hs.receive_data(struct.pack(">QH", 4096, 1) + b"\0" * 124)
    assert hs.done and hs.export == p.ExportInfo(4096, 1)


@pytest.mark.parametrize("stream", [
    b"NBDMAGIX" + b"\0" * 10,
    b"NBDMAGIC" + struct.pack(">QH", 0x420281861253, 0),
    b"NBDMAGIC" + struct.pack(">QH", p.IHAVEOPT, 0),
    GREETING + struct.pack(">QIII", 1, p.OPT_GO, p.REP_ACK, 0),
    GREETING + reply(p.OPT_GO, p.REP_ACK),
    GREETING + reply(p.OPT_GO, p.REP_FLAG_ERROR | 6, b"no such export"),
    GREETING + reply(p.OPT_GO, p.REP_INFO, struct.pack(">HQ", p.INFO_EXPORT, 1)),
])
def test_protocol_errors(stream: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.ClientHandshake().receive_data(stream)


@given(st.binary(max_size=200))
def test_fuzz_only_protocol_errors(data: bytes) -> None:
    hs = p.ClientHandshake()
    try:
        hs.receive_data(GREETING + data)
    except p.ProtocolError:
        pass


@pytest.mark.skipif(shutil.which("nbdkit") is None, reason="needs nbdkit (Debian package nbdkit)")
@pytest.mark.parametrize("readonly", [False, True])
def test_against_nbdkit(readonly: bool) -> None:
    ours, theirs = socket.socketpair()
    argv = ["nbdkit", "-s", *(["-r"] if readonly else []), "memory", "1M"]
    proc = subprocess.Popen(argv, stdin=theirs, stdout=theirs)
    theirs.close()
    try:
        ours.settimeout(10)
        hs = p.ClientHandshake()
        while not hs.done:
            hs.receive_data(ours.recv(4096))
            ours.sendall(hs.data_to_send())
        assert hs.export is not None
        assert hs.export.size == 1 << 20
        assert hs.export.read_only == readonly
        # Transmission phase: NBD_CMD_DISC (2) ends it cleanly.
        ours.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
    finally:
        ours.close()
        proc.wait(10)
