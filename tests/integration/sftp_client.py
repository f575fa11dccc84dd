"""A raw SFTP v3 client playing a hostile holder against a squashed sftp-server (run as a
script in a node's network namespace): `python sftp_client.py PORT` asks for setuid and
setgid modes in every request that carries one, then tries to smuggle a chmod past the
request filter, and prints, as JSON, the SFTP status of each request (0 is OK) and
whether the server ended the connection after the smuggling attempt."""

from __future__ import annotations

import json
import socket
import struct
import sys

INIT, VERSION, OPEN, CLOSE, SETSTAT, FSETSTAT, MKDIR, STATUS, HANDLE, EXTENDED = (
    1, 2, 3, 4, 9, 10, 14, 101, 102, 200)
ATTR_PERMISSIONS = 0x04
WRITE_CREAT_TRUNC = 0x02 | 0x08 | 0x10


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def string(b: bytes) -> bytes:
    return u32(len(b)) + b


def mode(m: int) -> bytes:
    return u32(ATTR_PERMISSIONS) + u32(m)


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.next_id = 0

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buf += chunk
        return buf

    def recv_packet(self) -> bytes:
        (n,) = struct.unpack(">I", self._recv(4))
        return self._recv(n)

    def call(self, kind: int, args: bytes) -> tuple[int, bytes]:
        """(status, or 0 with the reply) of one request."""
        self.next_id += 1
        body = bytes([kind]) + u32(self.next_id) + args
        self.sock.sendall(u32(len(body)) + body)
        reply = self.recv_packet()
        assert struct.unpack_from(">I", reply, 1)[0] == self.next_id, reply
        if reply[0] == STATUS:
            return struct.unpack_from(">I", reply, 5)[0], reply
        return 0, reply


def main() -> None:
    c = Client(int(sys.argv[1]))
    c.sock.sendall(u32(5) + bytes([INIT]) + u32(3))
    assert c.recv_packet()[0] == VERSION
    got: dict[str, int | bool] = {}
    got["open_6755"], reply = c.call(OPEN, string(b"/export/opened") + u32(WRITE_CREAT_TRUNC)
                                     + mode(0o6755))
    assert reply[0] == HANDLE, reply
    handle = reply[5:]  # string
    got["fsetstat_4755"], _ = c.call(FSETSTAT, handle + mode(0o4755))
    got["close"], _ = c.call(CLOSE, handle)
    got["setstat_6755"], _ = c.call(SETSTAT, string(b"/export/opened") + mode(0o6755))
    got["mkdir_2775"], _ = c.call(MKDIR, string(b"/export/dir") + mode(0o2775))
    got["lsetstat_3775"], _ = c.call(EXTENDED, string(b"lsetstat@openssh.com")
                                     + string(b"/export/dir") + mode(0o3775))
    # A packet of length 0: sftp-server would take the bytes after it as a request of
    # its own (here a chmod 4755) that the filter framed differently.
    smuggled = bytes([SETSTAT]) + u32(99) + string(b"/export/opened") + mode(0o4755)
    c.sock.sendall(u32(0) + smuggled)
    try:
        c.recv_packet()
        got["closed_after_smuggling"] = False
    except ConnectionError:
        got["closed_after_smuggling"] = True
    print(json.dumps(got))


if __name__ == "__main__":
    main()
