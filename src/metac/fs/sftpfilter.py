"""The requests an SFTP client sends, made never to follow a symlink where Linux would not.

SFTP v3's ``SETSTAT`` names a path, and OpenSSH's sftp-server applies it with
``chown``/``utimes``, which follow a symlink. A client that changes the owner or
the times of a symlink (``lchown``, ``utimensat(AT_SYMLINK_NOFOLLOW)``; sshfs
forwards both as ``SETSTAT``) would change the link's target instead: a target
inside the export, or, for an absolute or dangling target, nothing (the server's
sandbox root has no such file: ENOENT). dpkg does both for every symlink it
unpacks, so a package with a symlink fails to install over a mounted root.

``RequestFilter`` rewrites each ``SETSTAT`` that sets only owner and/or times into
OpenSSH's ``lsetstat@openssh.com`` extension (``fchownat``/``utimensat`` with
``AT_SYMLINK_NOFOLLOW``) with the same id, path and attributes; the reply is the
same ``STATUS``. ``SETSTAT`` with a size or a mode stays (no system call changes
those on a symlink; Linux never asks to). Every other packet passes unchanged,
streamed without being buffered whole, so the filter costs one copy of the
client-to-server bytes and nothing on the way back (the server writes its replies
straight to the connection).

``pump`` runs the filter between the connection and the server's stdin, in a
thread of its own (blocking reads: the connection's file description is shared
with the server, which needs it blocking).
"""

from __future__ import annotations

import functools
import os
import struct

SSH_FXP_SETSTAT = 9
SSH_FXP_EXTENDED = 200
ATTR_UIDGID = 0x02
ATTR_ACMODTIME = 0x08
LSETSTAT = b"lsetstat@openssh.com"
MAX_HELD = 64 * 1024  # a SETSTAT longer than this is passed on as it is (the server refuses it)
READ_CHUNK = 256 * 1024

_U32 = struct.Struct(">I")


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
    """Feed it the client's bytes in any pieces; it returns the bytes to pass on."""

    def __init__(self) -> None:
        self._head = b""        # the first bytes of a packet (length and type), < 5
        self._passing = 0       # bytes of the current packet still to pass unchanged
        self._held = bytearray()  # a SETSTAT packet being collected
        self._held_want = 0     # its total size, length field included

    def feed(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        view = memoryview(data)
        while view:
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
                    body = bytes(self._held[4:])
                    new = rewrite_setstat(body)
                    out.append(bytes(self._held) if new is None else _U32.pack(len(new)) + new)
                    self._held = bytearray()
                    self._held_want = 0
            else:
                n = min(5 - len(self._head), len(view))
                self._head += bytes(view[:n])
                view = view[n:]
                if len(self._head) < 5:
                    continue
                (length,) = _U32.unpack_from(self._head)
                head, self._head = self._head, b""
                if length == 0:  # no type byte: pass the 4 length bytes, restart at the 5th
                    out.append(head[:4])
                    view = memoryview(head[4:] + bytes(view))
                elif head[4] == SSH_FXP_SETSTAT and length <= MAX_HELD:
                    self._held = bytearray(head)
                    self._held_want = 4 + length
                else:
                    out.append(head)
                    self._passing = length - 1
        return out


def pump(read_fd: int, write_fd: int, request_filter: RequestFilter | None = None) -> None:
    """Copy ``read_fd`` (the connection) to ``write_fd`` (the server's stdin) through
    the filter until EOF or an error on either side; closes ``write_fd``, not
    ``read_fd``. Blocking: run it in a thread of its own."""
    request_filter = request_filter or RequestFilter()
    try:
        while True:
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
