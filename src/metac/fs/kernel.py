"""Kernel objects the fs service creates: mounts, loop devices, and what it asks the kernel.

* ``mount`` / ``unmount``: mount(2) and umount2(2) through libc (no ``mount``
  binary), so a 9P mount can take the connection's fd (``trans=fd``) and a bind
  mount can take an ``O_PATH`` fd (``/proc/self/fd/N``) instead of a path.
* ``mountinfo``: the parsed ``/proc/self/mountinfo`` (mount id, source, type,
  mount point), to wait for a FUSE mount, and to find our own mounts again by
  their source marker (``metac:<id>``) after a crash.
* ``placeholder``: an empty, read-only tmpfs put over a mount point while the
  mount's server is unreachable, so nothing lands in the directory underneath.
* ``keepalive``: TCP keepalive and user timeout on a data connection, so a
  vanished peer is noticed within about ``DEAD_PEER_SECONDS``.
* Loop devices: ``losetup`` through the supervisor; ``loop_devices`` lists them
  with their backing files (sysfs), for detaching and for the startup sweep.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable

from metac import errors
from metac.codec.mountinfo import PATH as MOUNTINFO
from metac.codec.mountinfo import MountEntry, parse_mountinfo

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2

DEAD_PEER_SECONDS = 20
PLACEHOLDER_SOURCE = "metac-unavailable"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _b(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def mount(source: str, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} on {target}: {os.strerror(err)}")


def unmount(target: str, *, lazy: bool = True) -> bool:
    """umount2; True if something was unmounted, False if nothing was mounted there."""
    if _libc.umount2(_b(target), MNT_DETACH if lazy else 0) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, f"umount {target}: {os.strerror(err)}")


def mountinfo() -> list[MountEntry]:
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def mounts_at(path: str, entries: Iterable[MountEntry] | None = None) -> list[MountEntry]:
    """Mounts whose mount point is ``path`` (oldest first; the last one is visible)."""
    return [e for e in (mountinfo() if entries is None else entries) if e.mountpoint == path]


def top_mount(path: str) -> MountEntry | None:
    found = mounts_at(path)
    return found[-1] if found else None


def placeholder(path: str) -> None:
    """An empty read-only tmpfs over ``path``: reads find nothing, writes fail (one only)."""
    top = top_mount(path)
    if top is not None and top.source == PLACEHOLDER_SOURCE:
        return
    mount(PLACEHOLDER_SOURCE, path, "tmpfs",
          MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")


def remove_top(path: str, sources: Iterable[str]) -> int:
    """Lazily unmount every mount at ``path`` whose source is one of ``sources`` (top first)."""
    wanted = set(sources)
    removed = 0
    for _ in range(16):
        top = top_mount(path)
        if top is None or top.source not in wanted:
            break
        try:
            if not unmount(path):
                break
        except OSError:
            break
        removed += 1
    return removed


def filesystem_types() -> set[str]:
    try:
        with open("/proc/filesystems") as f:
            return {line.split()[-1] for line in f if line.strip()}
    except OSError:
        return set()


_modprobed: set[str] = set()


def load_modules_once(loaded_marker: str, *modules: str) -> None:
    """``modprobe -q`` each of ``modules``, once per process, unless
    ``/sys/module/<loaded_marker>`` says they are in already or this kernel has no
    module tree (``/lib/modules/<release>``). A stock distribution kernel has 9p and
    nbd as modules nothing loads until used. Never raises."""
    if (loaded_marker in _modprobed or os.path.isdir(f"/sys/module/{loaded_marker}")
            or not os.path.isdir(f"/lib/modules/{os.uname().release}")):
        return
    _modprobed.add(loaded_marker)
    modprobe = shutil.which("modprobe") or "/sbin/modprobe"
    for module in modules:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([modprobe, "-q", module], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=10, check=False)


def keepalive(sock: socket.socket) -> None:
    """Notice a dead peer within about DEAD_PEER_SECONDS, idle or not."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, DEAD_PEER_SECONDS * 1000)


_TCP_ESTABLISHED = 1


def tcp_established(fd: int) -> bool:
    """Is the TCP connection on ``fd`` still established (TCP_INFO)? Reads no data."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return False
    finally:
        sock.close()
    return struct.unpack("B", info[:1])[0] == _TCP_ESTABLISHED


def set_read_ahead(path: str, kib: int) -> None:
    """Read-ahead of the filesystem mounted at ``path`` (its bdi), e.g. a FUSE mount."""
    st = os.stat(path)
    with contextlib.suppress(OSError), \
            open(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb",
                 "w") as f:
        f.write(str(kib))


# --- loop devices ---------------------------------------------------------------------


def loop_devices() -> dict[str, str]:
    """``/dev/loopN`` -> backing file, for every bound loop device (from sysfs)."""
    found = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/sys/block"):
            if not name.startswith("loop"):
                continue
            try:
                with open(f"/sys/block/{name}/loop/backing_file") as f:
                    found[f"/dev/{name}"] = f.read().strip()
            except OSError:
                continue
    return found


def need_root() -> None:
    if os.geteuid() != 0:
        raise errors.PermissionDenied("mounting needs root (run the node as root)")
