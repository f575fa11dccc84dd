"""OCI runtime bundles: the container's config.json and each process's process.json.

Pure: frozen values in, JSON-ready dicts out; no I/O. An environment is one OCI
container whose init is a pause process (``catatonit -P``, bind-mounted from
the host at ``INIT_PATH`` inside the container's private ``/dev``); every
process the user launches, the first one included, is started with the
runtime's ``exec``. So an environment outlives its processes, a second process
joins the same namespaces, and the user's process is never PID 1 (signals with
default handlers work on it, orphans are reaped by the init).

Isolation (see docs/compute.md): new mount, PID, UTS, IPC and network
namespaces; the root user of the container is root on the host but holds only
Docker's default capability set, with ``noNewPrivileges``; ``/proc`` and
``/sys`` paths that leak host information or allow host changes are masked or
read-only; the device cgroup allows only the runtime's default devices; memory
is limited by the memory cgroup when asked.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

OCI_VERSION = "1.0.2"
INIT_PATH = "/dev/.metac-init"
INIT_ARGS = (INIT_PATH, "-P")  # catatonit's pause mode: reap orphans, wait for a signal
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MIB = 1024 * 1024
MAX_ARG_BYTES = 128 * 1024
MAX_UID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel

# Docker's default capability set: enough for package managers, chown, ping.
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
    "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)  # fmt: skip

MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)  # fmt: skip
READONLY_PATHS = (
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
)  # fmt: skip


class SpecError(ValueError):
    """A process or container description that cannot be turned into a bundle."""


def container_path(path: str, what: str = "path") -> str:
    """An absolute, normalised path inside the container (``..`` is refused, not resolved)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise SpecError(f"{what} must be an absolute path inside the environment")
    if "\0" in path:
        raise SpecError(f"{what} must not contain NUL")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SpecError(f"{what} must not contain '..'")
    return posixpath.join("/", *parts)


def env_entry(entry: str) -> tuple[str, str]:
    """Split ``KEY=VALUE``; KEY is non-empty and has no ``=`` or NUL."""
    key, eq, value = entry.partition("=")
    if not eq or not key or "\0" in entry:
        raise SpecError("environment variables must be KEY=VALUE with a non-empty KEY")
    return key, value


def process_env(env: Iterable[str], *, uid: int, terminal: bool) -> list[str]:
    """The process's environment: ``env`` (later entries win) over PATH, HOME and TERM defaults."""
    merged: dict[str, str] = {"PATH": DEFAULT_PATH, "HOME": "/root" if uid == 0 else "/"}
    if terminal:
        merged["TERM"] = "xterm"
    for entry in env:
        key, value = env_entry(entry)
        merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


@dataclass(frozen=True)
class ProcessSpec:
    """One process: what ProcessDescription says, validated."""

    args: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    terminal: bool = False
    console_size: tuple[int, int] | None = None  # (rows, columns) of the terminal

    def __post_init__(self) -> None:
        if not self.args:
            raise SpecError("a process needs a command (args must not be empty)")
        if not self.args[0]:
            raise SpecError("the command (args[0]) must not be empty")
        if any("\0" in a for a in self.args):
            raise SpecError("arguments must not contain NUL")
        if sum(len(a.encode()) + 1 for a in self.args) > MAX_ARG_BYTES:
            raise SpecError(f"arguments are longer than {MAX_ARG_BYTES} bytes")
        for entry in self.env:
            env_entry(entry)
        object.__setattr__(self, "cwd", container_path(self.cwd or "/", "working directory"))
        for what, value in (("uid", self.uid), ("gid", self.gid)):
            if not 0 <= value <= MAX_UID:
                raise SpecError(f"{what} must be in 0..{MAX_UID}")


def process_config(spec: ProcessSpec) -> dict[str, Any]:
    """The OCI ``process`` object (also a runtime's ``exec --process`` file)."""
    caps = list(DEFAULT_CAPABILITIES)
    proc: dict[str, Any] = {
        "terminal": spec.terminal,
        "user": {"uid": spec.uid, "gid": spec.gid},
        "args": list(spec.args),
        "env": process_env(spec.env, uid=spec.uid, terminal=spec.terminal),
        "cwd": spec.cwd,
        # Root keeps these; any other uid loses them at execve (no ambient set).
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps,
                         "inheritable": [], "ambient": []},
        "noNewPrivileges": True,
    }
    if spec.terminal and spec.console_size is not None:
        rows, cols = spec.console_size
        proc["consoleSize"] = {"height": rows, "width": cols}
    return proc


@dataclass(frozen=True)
class BindMount:
    """A host directory (already mounted there, e.g. by the fs service) shown in the container."""

    source: str
    destination: str
    read_only: bool = False

    def __post_init__(self) -> None:
        if not self.source.startswith("/"):
            raise SpecError("bind mount source must be an absolute host path")
        dest = container_path(self.destination, "mount path")
        if dest == "/":
            raise SpecError("the root filesystem is not a bind mount")
        object.__setattr__(self, "destination", dest)


@dataclass(frozen=True)
class ContainerSpec:
    """One environment's container."""

    rootfs: str
    init_binary: str  # host path of the pause init (catatonit, statically linked)
    hostname: str = "metac"
    memory_mib: int = 0  # 0: no limit
    mounts: tuple[BindMount, ...] = ()
    netns: str | None = None  # path of an existing netns; None: a new one
    read_only_rootfs: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # merged into "linux" (tests)

    def __post_init__(self) -> None:
        if not self.rootfs.startswith("/"):
            raise SpecError("rootfs must be an absolute host path")
        if not 0 <= self.memory_mib <= 2**32 - 1:
            raise SpecError("memory must be in 0..4294967295 MiB")
        seen: set[str] = set()
        for m in self.mounts:
            if m.destination in seen:
                raise SpecError(f"two filesystems are mounted at {m.destination}")
            seen.add(m.destination)


def _system_mounts() -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]  # fmt: skip


def _depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")


def container_config(spec: ContainerSpec, init: ProcessSpec | None = None) -> dict[str, Any]:
    """The bundle's config.json; its process is the pause init unless ``init`` is given."""
    init = init or ProcessSpec(INIT_ARGS)
    mounts = _system_mounts()
    mounts.append({"destination": INIT_PATH, "type": "bind", "source": spec.init_binary,
                   "options": ["bind", "ro", "nosuid", "nodev"]})
    # Parents before children, so /data/sub lands inside /data.
    for m in sorted(spec.mounts, key=lambda m: (_depth(m.destination), m.destination)):
        options = ["rbind", "rprivate", "nosuid", "nodev"]
        if m.read_only:
            options.append("ro")
        mounts.append({"destination": m.destination, "type": "bind", "source": m.source,
                       "options": options})
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    net: dict[str, str] = {"type": "network"}
    if spec.netns is not None:
        net["path"] = spec.netns
    namespaces.append(net)
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if spec.memory_mib:
        resources["memory"] = {"limit": spec.memory_mib * MIB}
    linux: dict[str, Any] = {
        "resources": resources,
        "namespaces": namespaces,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    linux.update(spec.extra)
    return {
        "ociVersion": OCI_VERSION,
        "process": process_config(init),
        "root": {"path": spec.rootfs, "readonly": spec.read_only_rootfs},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": linux,
    }
