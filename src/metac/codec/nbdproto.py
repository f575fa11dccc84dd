"""NBD fixed-newstyle handshake, client side, sans-IO (only what metac itself speaks).

Used to attach a remote block device to the kernel's NBD client, which takes a
socket whose handshake is already done (``NBD_SET_SOCK``) plus the size and
transmission flags the server announced. Feed received bytes to
``receive_data`` and send what ``data_to_send`` returns until ``done``; then
``export`` holds the size and flags, and the socket is in the transmission
phase. The client asks for the default export ("") with ``NBD_OPT_GO`` and falls
back to ``NBD_OPT_EXPORT_NAME`` when the server does not know ``GO``.

``ProtocolError`` is raised for bytes that do not follow the protocol.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_GO = 7

REP_ACK = 1
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1

INFO_EXPORT = 0

#: Transmission flags (the kernel takes them as they are with NBD_SET_FLAGS).
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1


class ProtocolError(Exception):
    """The server's bytes do not follow the NBD handshake."""


@dataclass(frozen=True)
class ExportInfo:
    size: int
    flags: int

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TFLAG_READ_ONLY)


class ClientHandshake:
    """State machine of the client side of a fixed-newstyle handshake."""

    def __init__(self, export_name: str = "") -> None:
        self._name = export_name.encode()
        self._in = bytearray()
        self._out = bytearray()
        self._state = "greeting"
        self._no_zeroes = False
        self._size: int | None = None
        self._flags = 0
        self.export: ExportInfo | None = None

    @property
    def done(self) -> bool:
        return self._state == "done"

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def receive_data(self, data: bytes) -> None:
        if self.done:
            raise ProtocolError("data after the handshake belongs to the transmission phase")
        self._in += data
        while self._step():
            pass

    # --- states ---

    def _take(self, n: int) -> bytes | None:
        if len(self._in) < n:
            return None
        chunk = bytes(self._in[:n])
        del self._in[:n]
        return chunk

    def _step(self) -> bool:
        if self._state == "greeting":
            head = self._take(18)
            if head is None:
                return False
            magic, opt_magic, hflags = struct.unpack(">8sQH", head)
            if magic != NBDMAGIC:
                raise ProtocolError("not an NBD server (bad magic)")
            if opt_magic != IHAVEOPT:
                raise ProtocolError("oldstyle NBD servers are not supported")
            if not hflags & FLAG_FIXED_NEWSTYLE:
                raise ProtocolError("server does not speak fixed newstyle")
            self._no_zeroes = bool(hflags & FLAG_NO_ZEROES)
            cflags = FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if self._no_zeroes else 0)
            self._out += struct.pack(">I", cflags)
            payload = struct.pack(">I", len(self._name)) + self._name + struct.pack(">H", 0)
            self._out += struct.pack(">QII", IHAVEOPT, OPT_GO, len(payload)) + payload
            self._state = "go-reply"
            return True
        if self._state == "go-reply":
            if len(self._in) < 20:
                return False
            magic, option, rtype, length = struct.unpack(">QIII", self._in[:20])
            if magic != REPLY_MAGIC:
                raise ProtocolError("bad option reply magic")
            if length > 1 << 20:
                raise ProtocolError("option reply too long")
            body = self._take(20 + length)
            if body is None:
                return False
            data = body[20:]
            if option != OPT_GO:
                raise ProtocolError("reply to an option we did not send")
            if rtype == REP_INFO:
                if len(data) >= 2 and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                    if len(data) != 12:
                        raise ProtocolError("bad NBD_INFO_EXPORT length")
                    self._size, self._flags = struct.unpack(">QH", data[2:])
                return True
            if rtype == REP_ACK:
                if self._size is None:
                    raise ProtocolError("server acknowledged GO without announcing the size")
                self.export = ExportInfo(self._size, self._flags)
                self._state = "done"
                return False
            if rtype == REP_ERR_UNSUP:
                # An old server: ask the old way (no error reporting, size in the reply).
                self._out += struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, len(self._name))
                self._out += self._name
                self._state = "export-name-reply"
                return True
            if rtype & REP_FLAG_ERROR:
                text = data.decode(errors="replace")[:200]
                raise ProtocolError(f"server refused the export (error {rtype & 0xFFFF}): {text}")
            return True  # another informational reply: ignore
        if self._state == "export-name-reply":
            need = 10 + (0 if self._no_zeroes else 124)
            body = self._take(need)
            if body is None:
                return False
            size, flags = struct.unpack(">QH", body[:10])
            self.export = ExportInfo(size, flags)
            self._state = "done"
            return False
        return False
