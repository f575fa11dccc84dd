"""Where a node keeps things: the runtime dir (sockets, mounts) and the state dir (database)."""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass

from metac import errors

DEFAULT_RUNTIME_DIR = "/run/metac"
DEFAULT_STATE_DIR = "/var/lib/metac"


def runtime_dir(explicit: str | None = None) -> str:
    return explicit or os.environ.get("METAC_RUNTIME_DIR") or DEFAULT_RUNTIME_DIR


def state_dir(explicit: str | None = None) -> str:
    return explicit or os.environ.get("METAC_STATE_DIR") or DEFAULT_STATE_DIR


def admin_socket(runtime: str) -> str:
    """The root-only NodeAdmin socket (paper: /run/metac/*/socket)."""
    return os.path.join(runtime, "socket")


@dataclass(frozen=True)
class ServiceEnv:
    """What the node tells a service process it starts (through the environment)."""

    name: str
    runtime_dir: str
    state_dir: str
    node_address: str
    node_port: int
    node_instance: str

    def to_environ(self) -> dict[str, str]:
        return {
            "METAC_SERVICE_NAME": self.name,
            "METAC_RUNTIME_DIR": self.runtime_dir,
            "METAC_STATE_DIR": self.state_dir,
            "METAC_NODE_ADDRESS": self.node_address,
            "METAC_NODE_PORT": str(self.node_port),
            "METAC_NODE_INSTANCE": self.node_instance,
        }

    @classmethod
    def from_environ(cls, name: str) -> ServiceEnv:
        env = os.environ
        return cls(
            name=env.get("METAC_SERVICE_NAME", name),
            runtime_dir=runtime_dir(),
            state_dir=state_dir(),
            node_address=env.get("METAC_NODE_ADDRESS", "::1"),
            node_port=int(env.get("METAC_NODE_PORT", "901")),
            node_instance=env.get("METAC_NODE_INSTANCE", ""),
        )


LOCK_FILE = "node.lock"


def lock_node_dir(directory: str) -> int:
    """Take the lock that says "a node runs here" on ``directory``; the lock's fd.

    An exclusive ``flock`` on ``<directory>/node.lock``, held for as long as the fd
    is open (the node's whole life; the kernel drops it when the process dies,
    even after ``kill -9``). The holder's pid is written into the file so the
    refusal can name it. FailedPrecondition if another process holds it.
    """
    path = os.path.join(directory, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        pid = holder if holder.isdigit() else "unknown"
        raise errors.FailedPrecondition(
            f"{directory}: a node is already running here (pid {pid})") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_node_dirs(*directories: str) -> list[int]:
    """``lock_node_dir`` on each distinct directory (created 0700 if missing); the fds."""
    fds: list[int] = []
    seen: set[str] = set()
    try:
        for directory in directories:
            real = os.path.realpath(directory)
            if real in seen:
                continue
            seen.add(real)
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                fds.append(lock_node_dir(directory))
            except OSError as exc:
                raise errors.FailedPrecondition(
                    f"cannot use {directory}: {exc.strerror}") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def secure_private_dir(directory: str) -> str | None:
    """Make ``directory`` 0700: a looser mode is fixed (the message says what was
    changed, for a warning), a directory owned by another user is refused
    (FailedPrecondition): whoever owns it could swap the files the node trusts."""
    st = os.stat(directory)
    if st.st_uid != os.geteuid():
        raise errors.FailedPrecondition(
            f"{directory} belongs to uid {st.st_uid}, not to the node's uid {os.geteuid()}; "
            "give it to the node's user (chown) or pick another --state-dir")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        os.chmod(directory, 0o700)
        return f"{directory} had mode {mode:04o}; changed to 0700 (it holds the refs database)"
    return None
