"""The sandbox the data-plane servers run in: bubblewrap with only what they need.

A server that exports a directory or a file (diod, sftp-server, nbdkit) runs as

    bwrap --die-with-parent --new-session --unshare-{ipc,pid,net,uts,cgroup-try}
          --cap-drop ALL --cap-add <the few it needs>
          --ro-bind <each file of the program and its libraries> ...
          --symlink <each symlink on the way to them> ...
          --dev /dev --ro-bind <synthetic passwd/group> /etc/...
          --bind-fd <fd of the export> /export      (or --ro-bind-fd for read-only views)
          --remount-ro / --chdir /export
          PROGRAM ARGS...

The new root is an empty tmpfs, so the only things the server can reach are the
export (bound from the fd the confined walk of ``resolve`` opened: no path is
resolved again) and, read-only, its own program files. A symlink inside the
export that points elsewhere resolves inside this root and finds nothing.
Binds are ``nodev,nosuid``; the root is remounted read-only; the network, pid,
ipc and uts namespaces are private (the data connection is an fd the server
inherits, so it needs no network). Capabilities are dropped except those the
program needs to serve files of several owners as root; never
``CAP_DAC_READ_SEARCH`` (``open_by_handle_at`` escapes bind mounts),
``CAP_SYS_ADMIN`` or ``CAP_MKNOD``. A squashed server (the default, see
``squash``) gets only what ``setpriv`` needs to become the export's owner, and a
seccomp filter (``--seccomp FD``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from metac.core.supervisor import require_program

EXPORT_DIR = "/export"
EXPORT_FILE = "/disk"

#: Capabilities each server keeps (everything else is dropped).
CAPS_FILE_SERVER = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID")
CAPS_DIOD = (*CAPS_FILE_SERVER, "CAP_SETUID", "CAP_SETGID")
CAPS_NBDKIT = ("CAP_DAC_OVERRIDE",)

PASSWD = "root:x:0:0:root:/:/nonexistent\nnobody:x:65534:65534:nobody:/:/nonexistent\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def symlink_chain(path: str) -> tuple[list[tuple[str, str]], str]:
    """Resolve ``path`` like realpath, recording every symlink met as (link, target).

    Each recorded link has a parent that is a real directory, so the links can be
    recreated one by one in an empty root (``bwrap --symlink``).
    """
    links: list[tuple[str, str]] = []
    todo = [p for p in path.split("/") if p]
    cur = "/"
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, part)
        if os.path.islink(nxt):
            hops += 1
            if hops > 40:
                raise OSError(f"too many symlinks resolving {path}")
            target = os.readlink(nxt)
            links.append((nxt, target))
            if target.startswith("/"):
                cur = "/"
            todo = [p for p in target.split("/") if p] + todo
        else:
            cur = nxt
    return links, cur


def parse_ldd(output: str) -> list[str]:
    """Absolute library paths from ``ldd`` output (the vdso has none)."""
    found = []
    for line in output.splitlines():
        line = line.strip()
        if "=>" in line:
            line = line.split("=>", 1)[1].strip()
        path = line.split(" (", 1)[0].strip()
        if path.startswith("/"):
            found.append(path)
    return found


@functools.lru_cache(maxsize=16)
def program_files(*paths: str) -> tuple[str, ...]:
    """The given files plus every shared library they load (by ``ldd``), deduplicated."""
    out: list[str] = []
    for path in paths:
        out.append(path)
        proc = subprocess.run(["ldd", path], capture_output=True, text=True, check=False,
                              timeout=30)
        if proc.returncode == 0:
            out.extend(parse_ldd(proc.stdout))
    return tuple(dict.fromkeys(out))


@dataclass
class Sandbox:
    """What one sandboxed server gets; ``argv()`` builds the bwrap command line."""

    program: list[str]
    files: Sequence[str]
    caps: Sequence[str]
    binds: list[tuple[int, str, bool]] = field(default_factory=list)  # (fd, dest, read_only)
    data_files: list[tuple[str, str]] = field(default_factory=list)  # (host path, dest), ro
    chdir: str = "/"
    seccomp_fd: int = -1  # a compiled filter bwrap loads before exec (squash.seccomp_fd)

    def argv(self, bwrap: str = "bwrap") -> list[str]:
        argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid",
                "--unshare-net", "--unshare-uts", "--unshare-cgroup-try", "--cap-drop", "ALL"]
        for cap in self.caps:
            argv += ["--cap-add", cap]
        if self.seccomp_fd >= 0:
            argv += ["--seccomp", str(self.seccomp_fd)]
        links: dict[str, str] = {}
        reals: list[str] = []
        for path in self.files:
            chain, real = symlink_chain(path)
            links.update(chain)
            reals.append(real)
        # Directories bwrap would make on the way are 0700: a server that runs as the
        # export's owner (not root) could not reach its own program. Make them 0755.
        dests = [*reals, *links, *(d for _, d in self.data_files), *(d for _, d, _ in self.binds)]
        for parent in sorted({os.path.dirname(d) for d in dests} - {"/"}):
            argv += ["--perms", "0755", "--dir", parent]
        for real in dict.fromkeys(reals):
            argv += ["--ro-bind", real, real]
        for link, target in links.items():
            argv += ["--symlink", target, link]
        argv += ["--dev", "/dev"]
        for host_path, dest in self.data_files:
            argv += ["--ro-bind", host_path, dest]
        for fd, dest, read_only in self.binds:
            argv += ["--ro-bind-fd" if read_only else "--bind-fd", str(fd), dest]
        argv += ["--remount-ro", "/", "--chdir", self.chdir, *self.program]
        return argv

    @property
    def pass_fds(self) -> list[int]:
        fds = [fd for fd, _, _ in self.binds]
        return fds + [self.seccomp_fd] if self.seccomp_fd >= 0 else fds


def bwrap() -> str:
    return require_program("bwrap", "bubblewrap")


def identity_files(directory: str, extra: tuple[str, str] = ("", "")) -> list[tuple[str, str]]:
    """Synthetic /etc/passwd and /etc/group (root and nobody, plus the ``extra`` passwd and
    group lines) for programs that look up users."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    out = []
    suffix = "." + hashlib.sha256("".join(extra).encode()).hexdigest()[:12] if any(extra) else ""
    for name, text in (("passwd", PASSWD + extra[0]), ("group", GROUP + extra[1])):
        path = os.path.join(directory, name + suffix)
        try:
            with open(path) as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        out.append((path, f"/etc/{name}"))
    return out
