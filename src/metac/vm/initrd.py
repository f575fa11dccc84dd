"""A small initrd to boot: a static busybox, an ``/init`` script and optional kernel modules.

``build_initrd`` returns a gzip'd newc cpio archive (what Linux unpacks into its
initramfs). It is what ``metac vm initrd`` writes, and what the tests boot.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Sequence

#: The default /init: a shell on the console (ttyS0) after mounting the usual filesystems.
DEFAULT_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/load-order 2>/dev/null); do insmod "/modules/$m"; done
echo "metac initrd: busybox shell (poweroff -f to stop the VM)"
setsid cttyhack sh
poweroff -f
"""


class Cpio:
    """A newc ("070701") cpio archive, written in memory."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        raw = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % v for v in fields) + raw)
        self.buf.write(b"\0" * (-(110 + len(raw)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def build_initrd(busybox: bytes, init: str = DEFAULT_INIT,
                 modules: Sequence[tuple[str, bytes]] = ()) -> bytes:
    """The initrd: ``busybox`` (a static binary) as /bin/busybox, ``init`` as /init, and
    ``modules`` (file name, content) in /modules, listed in load order in
    /modules/load-order."""
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)  # the kernel opens it for /init before devtmpfs
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.file("init", init.encode(), 0o755)
    for name, data in modules:
        cpio.file(f"modules/{name}", data)
    cpio.file("modules/load-order", "".join(f"{name}\n" for name, _ in modules).encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)
