"""Build a root filesystem for `metac run` in a directory (`metac compute rootfs DIR`).

``busybox`` (default): a statically linked busybox (Debian ``busybox-static``)
copied to ``bin/busybox`` with a hard link per applet, the usual directories
and a minimal ``/etc`` (passwd, group, hosts). About 2 MB, ready at once. (Hard
links: one file, and nothing for a client to resolve.)

``debootstrap``: a minimal Debian (``debootstrap --variant=minbase SUITE DIR
[MIRROR]``, Debian package ``debootstrap``); it downloads packages from the
mirror, so it needs network access; about 200 MB, half a minute to a few minutes
depending on the mirror. Its absolute symlinks (``/lib64/ld-linux-x86-64.so.2``,
``/etc/alternatives``) work over every mount path: links are data (see
``metac.fs.mount``).

Then ``metac fs export local:DIR`` gives the ref to pass as ``--mount /=REF``.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

from metac import errors
from metac.core.supervisor import require_program

DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root",
        "home", "var/tmp", "run", "mnt", "data")
FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
    "etc/hostname": "metac\n",
}
_PT_INTERP = 3


def elf_is_static(header: bytes) -> bool:
    """True for an ELF executable without a program interpreter (statically linked).

    ``header`` holds at least the file's program header table (the first few KiB).
    """
    if header[:4] != b"\x7fELF" or len(header) < 64:
        raise ValueError("not an ELF file")
    is64 = header[4] == 2
    endian = "<" if header[5] == 1 else ">"
    if is64:
        phoff, = struct.unpack_from(endian + "Q", header, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", header, 0x36)
    else:
        phoff, = struct.unpack_from(endian + "I", header, 0x1C)
        phentsize, phnum = struct.unpack_from(endian + "HH", header, 0x2A)
    for i in range(phnum):
        offset = phoff + i * phentsize
        if offset + 4 > len(header):
            raise ValueError("program headers beyond the given bytes")
        p_type, = struct.unpack_from(endian + "I", header, offset)
        if p_type == _PT_INTERP:
            return False
    return True


def applet_paths(list_full_output: str) -> list[str]:
    """Relative paths from ``busybox --list-full`` (safe ones only)."""
    out = []
    for line in list_full_output.splitlines():
        path = line.strip().lstrip("/")
        parts = path.split("/")
        if not path or any(p in ("", ".", "..") for p in parts):
            continue
        out.append(path)
    return out


def build_busybox(target: str, busybox: str | None = None) -> list[str]:
    """Fill ``target`` (created if missing, must be empty) with a busybox system."""
    busybox = busybox or require_program("busybox", "busybox-static")
    with open(busybox, "rb") as f:
        head = f.read(8192)
    try:
        static = elf_is_static(head)
    except ValueError:
        static = False
    if not static:
        raise errors.MissingDependency("a statically linked busybox", "busybox-static")
    os.makedirs(target, exist_ok=True)
    if os.listdir(target):
        raise errors.AlreadyExists(f"{target} is not empty")
    for d in DIRS:
        os.makedirs(os.path.join(target, d), exist_ok=True)
    os.chmod(os.path.join(target, "tmp"), 0o1777)
    os.chmod(os.path.join(target, "var/tmp"), 0o1777)
    os.chmod(os.path.join(target, "root"), 0o700)
    shutil.copy2(busybox, os.path.join(target, "bin/busybox"))
    os.chmod(os.path.join(target, "bin/busybox"), 0o755)
    listing = subprocess.run([busybox, "--list-full"], capture_output=True, text=True,
                             check=True).stdout
    links = []
    for rel in applet_paths(listing):
        link = os.path.join(target, rel)
        if os.path.lexists(link):
            continue
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.link(os.path.join(target, "bin/busybox"), link)
        links.append(rel)
    for rel, text in FILES.items():
        with open(os.path.join(target, rel), "w") as f:
            f.write(text)
    return links


def debootstrap_argv(target: str, suite: str, mirror: str | None = None) -> list[str]:
    argv = [require_program("debootstrap", "debootstrap"), "--variant=minbase", suite, target]
    return [*argv, mirror] if mirror else argv


def build_debootstrap(target: str, suite: str, mirror: str | None = None) -> None:
    """A minimal Debian in ``target`` (created if missing, must be empty); debootstrap's
    progress goes to stderr, so stdout stays free for the caller."""
    argv = debootstrap_argv(target, suite, mirror)
    if os.geteuid() != 0:
        raise errors.PermissionDenied("debootstrap needs root (it sets owners and makes "
                                      "device nodes)")
    if os.path.isdir(target) and os.listdir(target):
        raise errors.AlreadyExists(f"{target} is not empty")
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(),
                          check=False)
    if proc.returncode != 0:
        log = os.path.join(target, "debootstrap", "debootstrap.log")
        where = f"; see {log}" if os.path.exists(log) else ""
        raise errors.FailedPrecondition(
            f"debootstrap {suite} failed with exit code {proc.returncode}{where} "
            f"(it needs a reachable Debian mirror; {target} is left as it is)")
