"""A raw 9P2000.L client playing a hostile holder against diod (run as a script in a node's
network namespace): `python ninep_client.py PORT` attaches to /export as root and prints,
as JSON, the errno (0 for success) of each attempt to plant a setuid file, a device node
or a foreign owner."""

from __future__ import annotations

import json
import socket
import stat
import struct
import sys

NOFID = 0xFFFFFFFF
TVERSION, TATTACH, TWALK, TLCREATE, TSETATTR, TMKNOD, TCLUNK = 100, 104, 110, 14, 26, 18, 120
RLERROR = 7
SETATTR_MODE, SETATTR_UID = 0x1, 0x2


def s(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<H", len(data)) + data


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.tag = 0

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("9P server closed the connection")
            buf += chunk
        return buf

    def call(self, mtype: int, body: bytes) -> tuple[int, bytes]:
        """(errno or 0, reply body)."""
        self.tag = (self.tag + 1) % 0xFFFF
        msg = struct.pack("<BH", mtype, 0xFFFF if mtype == TVERSION else self.tag) + body
        self.sock.sendall(struct.pack("<I", len(msg) + 4) + msg)
        size, rtype, _ = struct.unpack("<IBH", self._recv(7))
        reply = self._recv(size - 7)
        if rtype == RLERROR:
            return struct.unpack("<I", reply[:4])[0], b""
        assert rtype == mtype + 1, (rtype, mtype)
        return 0, reply

    def clone(self, fid: int, newfid: int) -> None:
        assert self.call(TWALK, struct.pack("<IIH", fid, newfid, 0))[0] == 0

    def lcreate(self, dfid: int, newfid: int, name: str, mode: int) -> int:
        self.clone(dfid, newfid)
        err = self.call(TLCREATE, struct.pack("<I", newfid) + s(name) +
                        struct.pack("<III", 0o1 | 0o100, mode, NOFID))[0]  # O_WRONLY|O_CREAT
        return err

    def setattr(self, fid: int, valid: int, mode: int = 0, uid: int = 0) -> int:
        return self.call(TSETATTR, struct.pack("<IIIIIQQQQQ", fid, valid, mode, uid, 0, 0,
                                               0, 0, 0, 0))[0]

    def mknod(self, dfid: int, name: str, mode: int, major: int, minor: int) -> int:
        return self.call(TMKNOD, struct.pack("<I", dfid) + s(name) +
                         struct.pack("<IIII", mode, major, minor, NOFID))[0]


def main(port: int) -> None:
    c = Client(port)
    err, _ = c.call(TVERSION, struct.pack("<I", 65536) + s("9P2000.L"))
    assert err == 0
    err, _ = c.call(TATTACH, struct.pack("<II", 0, NOFID) + s("root") + s("/export") +
                    struct.pack("<I", 0))
    assert err == 0, f"attach failed: errno {err}"
    out = {"create": c.lcreate(0, 1, "plain", 0o755)}
    out["chmod_setuid"] = c.setattr(1, SETATTR_MODE, mode=0o4755)
    out["chmod_setgid"] = c.setattr(1, SETATTR_MODE, mode=0o2755)
    out["chown"] = c.setattr(1, SETATTR_UID, uid=1234)
    out["create_setuid"] = c.lcreate(0, 2, "suid", 0o4755)
    out["mknod_device"] = c.mknod(0, "mem", stat.S_IFCHR | 0o666, 1, 1)
    out["mknod_setuid_file"] = c.mknod(0, "suid2", stat.S_IFREG | 0o4755, 0, 0)
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]))
