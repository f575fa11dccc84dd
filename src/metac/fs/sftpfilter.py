"""The requests an SFTP client sends, rewritten before sftp-server reads them.

Two rewrites, independent options of one ``RequestFilter`` (``Rewrites``):

``lsetstat``: never follow a symlink where Linux would not. SFTP v3's ``SETSTAT``
names a path, and OpenSSH's sftp-server applies it with ``chown``/``utimes``, which
follow a symlink. A client that changes the owner or the times of a symlink
(``lchown``, ``utimensat(AT_SYMLINK_NOFOLLOW)``; sshfs forwards both as ``SETSTAT``)
would change the link's target instead: a target inside the export, or, for an
absolute or dangling target, nothing (the server's sandbox root has no such file:
ENOENT). dpkg does both for every symlink it unpacks, so a package with a symlink
fails to install over a mounted root. Each ``SETSTAT`` that sets only owner and/or
times becomes OpenSSH's ``lsetstat@openssh.com`` extension (``fchownat``/
``utimensat`` with ``AT_SYMLINK_NOFOLLOW``) with the same id, path and attributes;
the reply is the same ``STATUS``. ``SETSTAT`` with a size or a mode stays (no system
call changes those on a symlink; Linux never asks to).

``strip_setid``: a squashed export is ``nosuid``. Every request whose attributes
sftp-server turns into a file mode (``OPEN``, whose mode is the new file's;
``SETSTAT``, ``FSETSTAT``, ``MKDIR`` and ``lsetstat@openssh.com``) has ``S_ISUID``
and ``S_ISGID`` cleared from its permissions, so ``chmod 4755`` applies as 0755
instead of failing as a whole (the server's seccomp filter would refuse the bits,
see ``squash``). The sticky bit stays: it gives nobody more power. No other request
carries a mode (sftp-server 9.x: ``SYMLINK`` makes links, ``copy-data`` copies
bytes, writing a file clears its setuid and setgid bits in the kernel).

Because sftp-server parses a request past its declared length when the length is
too short (it reads the following bytes, acts, then exits), a filter that strips
also refuses, and ends the stream at, what would make the server's view of the
bytes differ from ours: a packet of length 0 (the server would take the next
packet's bytes as its type), an attribute-bearing request whose fields run past
its end, and one longer than ``MAX_HELD`` (which the server drops anyway).

Every other packet passes unchanged, streamed without being buffered whole, so the
filter costs one copy of the client-to-server bytes and nothing on the way back
(the server writes its replies straight to the connection). Only the requests a
rewrite may change are held whole, each up to ``MAX_HELD`` bytes.

``pump`` runs the filter between the connection and the server's stdin, in a
thread of its own (blocking reads: the connection's file description is shared
with the server, which needs it blocking).
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass

SSH_FXP_OPEN = 3
SSH_FXP_SETSTAT = 9
SSH_FXP_FSETSTAT = 10
SSH_FXP_MKDIR = 14
SSH_FXP_EXTENDED = 200
ATTR_SIZE = 0x01
ATTR_UIDGID = 0x02
ATTR_PERMISSIONS = 0x04
ATTR_ACMODTIME = 0x08
LSETSTAT = b"lsetstat@openssh.com"
SETID = 0o6000  # S_ISUID | S_ISGID
#: Requests whose attributes become a mode (EXTENDED: only lsetstat@openssh.com).
MODE_REQUESTS = frozenset({SSH_FXP_OPEN, SSH_FXP_SETSTAT, SSH_FXP_FSETSTAT, SSH_FXP_MKDIR,
                           SSH_FXP_EXTENDED})
#: OpenSSH's SFTP_MAX_MSG_LENGTH: sftp-server drops a connection whose packet is longer,
#: so holding up to this much refuses nothing the server would serve.
MAX_HELD = 256 * 1024
READ_CHUNK = 256 * 1024

_U32 = struct.Struct(">I")


class Malformed(ValueError):
    """A request whose fields run past its end."""


@dataclass(frozen=True)
class Rewrites:
    """What a ``RequestFilter`` does (see the module docstring)."""

    lsetstat: bool = False
    strip_setid: bool = False

    def __bool__(self) -> bool:
        return self.lsetstat or self.strip_setid


def _string_end(body: bytes, at: int) -> int:
    """Where the SFTP string (u32 length, bytes) at ``at`` ends."""
    if at + 4 > len(body):
        raise Malformed("string length past the end")
    end = at + 4 + _U32.unpack_from(body, at)[0]
    if end > len(body):
        raise Malformed("string past the end")
    return end


def attrs_offset(body: bytes) -> int | None:
    """Where the ATTRS of a request body (type byte first) start, or None if it is no
    request sftp-server turns into a mode. ``Malformed`` if they are not all there."""
    if not body or body[0] not in MODE_REQUESTS:
        return None
    at = 5  # type, id
    if body[0] == SSH_FXP_EXTENDED:
        name_end = _string_end(body, at)
        if body[at + 4:name_end] != LSETSTAT:
            return None
        at = name_end
    at = _string_end(body, at)  # path or handle
    if body[0] == SSH_FXP_OPEN:
        at += 4  # pflags
    if at + 4 > len(body):
        raise Malformed("attribute flags past the end")
    return at


def permissions_offset(body: bytes, attrs: int) -> int | None:
    """Where the permissions of the ATTRS at ``attrs`` are, or None if it has none."""
    (flags,) = _U32.unpack_from(body, attrs)
    if not flags & ATTR_PERMISSIONS:
        return None
    at = attrs + 4 + (8 if flags & ATTR_SIZE else 0) + (8 if flags & ATTR_UIDGID else 0)
    if at + 4 > len(body):
        raise Malformed("permissions past the end")
    return at


def strip_setid(body: bytes) -> bytes:
    """``body`` with S_ISUID and S_ISGID cleared from the mode it asks for (the same
    object if there is nothing to clear). ``Malformed`` as ``attrs_offset``."""
    attrs = attrs_offset(body)
    if attrs is None:
        return body
    at = permissions_offset(body, attrs)
    if at is None:
        return body
    (mode,) = _U32.unpack_from(body, at)
    if not mode & SETID:
        return body
    return b"".join([body[:at], _U32.pack(mode & ~SETID), body[at + 4:]])


def rewrite_setstat(body: bytes) -> bytes | None:
    """The ``lsetstat@openssh.com`` packet body for a ``SETSTAT`` body (type byte
    first), or None to leave it unchanged (malformed, or it sets size or mode)."""
    if len(body) < 13 or body[0] != SSH_FXP_SETSTAT:
        return None
    request_id = body[1:5]
    (path_len,) = _U32.unpack_from(body, 5)
    attrs_at = 9 + path_len
    if attrs_at + 4 > len(body):
        return None
    (flags,) = _U32.unpack_from(body, attrs_at)
    if not flags or flags & ~(ATTR_UIDGID | ATTR_ACMODTIME):
        return None
    return b"".join([bytes([SSH_FXP_EXTENDED]), request_id, _U32.pack(len(LSETSTAT)), LSETSTAT,
                     body[5:]])


class RequestFilter:
    """Feed it the client's bytes in any pieces; it returns the bytes to pass on.

    Once ``refused`` is set (a reason; only when stripping), it passes nothing more:
    the caller ends the stream."""

    def __init__(self, rewrites: Rewrites | None = None) -> None:
        self.rewrites = rewrites = Rewrites(lsetstat=True) if rewrites is None else rewrites
        self.refused: str | None = None
        self._held_types = (MODE_REQUESTS if rewrites.strip_setid
                            else {SSH_FXP_SETSTAT} if rewrites.lsetstat else set())
        self._head = b""        # the first bytes of a packet (length and type), < 5
        self._passing = 0       # bytes of the current packet still to pass unchanged
        self._held = bytearray()  # a packet a rewrite may change, being collected
        self._held_want = 0     # its total size, length field included

    def _refuse(self, reason: str) -> None:
        self.refused = reason
        self._head, self._held, self._held_want, self._passing = b"", bytearray(), 0, 0

    def _rewrite(self, body: bytes) -> bytes:
        if self.rewrites.strip_setid:
            body = strip_setid(body)  # Malformed: the caller refuses
        if self.rewrites.lsetstat:
            body = rewrite_setstat(body) or body
        return body

    def feed(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        view = memoryview(data)
        strict = self.rewrites.strip_setid
        while view and self.refused is None:
            if self._passing:
                n = min(self._passing, len(view))
                out.append(view[:n])
                view = view[n:]
                self._passing -= n
            elif self._held_want:
                n = min(self._held_want - len(self._held), len(view))
                self._held += view[:n]
                view = view[n:]
                if len(self._held) == self._held_want:
                    packet, self._held, self._held_want = bytes(self._held), bytearray(), 0
                    original = packet[4:]
                    try:
                        body = self._rewrite(original)
                    except Malformed as e:
                        self._refuse(f"request type {packet[4]}: {e}")
                        break
                    out.append(packet if body is original else _U32.pack(len(body)) + body)
            else:
                n = min(5 - len(self._head), len(view))
                self._head += bytes(view[:n])
                view = view[n:]
                if len(self._head) < 5:
                    continue
                (length,) = _U32.unpack_from(self._head)
                head, self._head = self._head, b""
                if length == 0:
                    if strict:
                        self._refuse("a packet of length 0")
                        break
                    # no type byte: pass the 4 length bytes, restart at the 5th
                    out.append(head[:4])
                    view = memoryview(head[4:] + bytes(view))
                elif head[4] in self._held_types and length <= MAX_HELD:
                    self._held = bytearray(head)
                    self._held_want = 4 + length
                elif head[4] in self._held_types and strict:
                    self._refuse(f"request type {head[4]} of {length} bytes")
                    break
                else:
                    out.append(head)
                    self._passing = length - 1
        return out


def pump(read_fd: int, write_fd: int, request_filter: RequestFilter | None = None) -> None:
    """Copy ``read_fd`` (the connection) to ``write_fd`` (the server's stdin) through
    the filter until EOF, an error on either side, or the filter refuses; closes
    ``write_fd``, not ``read_fd``. Blocking: run it in a thread of its own."""
    request_filter = request_filter or RequestFilter()
    try:
        while request_filter.refused is None:
            try:
                data = os.read(read_fd, READ_CHUNK)
            except OSError:
                return
            if not data:
                return
            for piece in request_filter.feed(data):
                view = memoryview(piece)
                while view:
                    view = view[os.write(write_fd, view):]
    except OSError:  # the server is gone (EPIPE)
        return
    finally:
        os.close(write_fd)


@functools.lru_cache(maxsize=4)
def server_has_lsetstat(program: str) -> bool:
    """Does this sftp-server know ``lsetstat@openssh.com`` (OpenSSH 8.0 and later)?"""
    try:
        with open(program, "rb") as f:
            return LSETSTAT in f.read()
    except OSError:
        return False
