"""A small initrd to boot: a static busybox, an ``/init`` script and optional kernel modules.

``build_initrd`` returns a gzip'd newc cpio archive (what Linux unpacks into its
initramfs). It is what ``metac vm initrd`` writes, and what the tests boot.
``module_closure`` finds modules and their dependencies in a kernel's module
tree (``modules.dep``), so the initrd can load the drivers the VM needs.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

#: Modules ``metac vm initrd`` puts in by default: virtio disks and NICs, ext4.
DEFAULT_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "crc32c_generic", "ext4")

#: The default /init: loads the modules; with ``root=DEVICE`` on the kernel command line
#: it mounts that device and runs its /sbin/init, else a busybox shell on the console.
DEFAULT_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/load-order 2>/dev/null); do insmod "/modules/$m" 2>/dev/null; done
root=
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=*) root="${arg#root=}" ;; esac
done
if [ -n "$root" ]; then
    mkdir -p /newroot
    for i in 1 2 3 4 5 6 7 8 9 10; do [ -b "$root" ] && break; sleep 0.5; done
    if mount -o rw "$root" /newroot && [ -x /newroot/sbin/init ]; then
        mkdir -p /newroot/dev /newroot/proc /newroot/sys
        mount --move /dev /newroot/dev
        umount /proc /sys
        exec switch_root /newroot /sbin/init
    fi
    echo "metac initrd: cannot boot $root; here is a shell"
fi
echo "metac initrd: busybox shell (poweroff -f stops the VM)"
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


def _module_name(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.replace("-", "_")


def module_closure(modules_dir: Path, names: Iterable[str]) -> list[str]:
    """Paths (relative to ``modules_dir``) of ``names`` and their dependencies, dependencies
    first; modules built into the kernel (``modules.builtin``) are left out. KeyError names
    a module the tree does not have."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            deps[_module_name(path)] = (path, rest.split())
    builtin_file = modules_dir / "modules.builtin"
    builtin = ({_module_name(p) for p in builtin_file.read_text().split()}
               if builtin_file.exists() else set())
    order: list[str] = []

    def visit(name: str) -> None:
        if name in builtin:
            return
        path, needs = deps[name]
        if path in order:
            return
        for dep in reversed(needs):  # modules.dep lists the deepest dependency last
            visit(_module_name(dep))
        if path not in order:
            order.append(path)

    for name in names:
        visit(name.replace("-", "_"))
    return order


def read_module(path: Path) -> tuple[str, bytes]:
    """(file name as insmod takes it, content) of a module file, decompressed (.xz, .gz)."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        import lzma

        return name[:-3], lzma.decompress(data)
    if name.endswith(".gz"):
        return name[:-3], gzip.decompress(data)
    if name.endswith(".zst"):
        raise ValueError(f"{name} is zstd-compressed; unpack it with unzstd first")
    return name, data
