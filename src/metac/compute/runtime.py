"""The OCI runtime (runc or crun) as a few async calls, and the host's cgroup layout.

Every call runs the runtime binary through the service's supervisor with an
explicit argv, its own ``--root`` state directory (one per node) and a JSON log
file; a failure becomes one ``MetacError`` line built from the runtime's last
error message (``classify_error``).

Cgroup layouts: ``v2`` (only ``cgroup2`` at /sys/fs/cgroup), ``v1`` (a tmpfs of
v1 hierarchies) and ``hybrid`` (v1 hierarchies plus ``cgroup2`` at
/sys/fs/cgroup/unified). runc handles all three. crun (1.8) refuses a hybrid
host whose unified hierarchy has any controller enabled; there, each crun
call runs in a private mount namespace in which a small tmpfs hides
/sys/fs/cgroup/unified, so crun sees a pure v1 host (``HIDE_UNIFIED``). The
mount exists only in that throwaway namespace; nothing on the host changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from metac import errors
from metac.codec.mountinfo import PATH as MOUNTINFO
from metac.codec.mountinfo import parse_mountinfo
from metac.core.supervisor import Supervisor, require_program

log = logging.getLogger(__name__)

RUNTIMES = ("runc", "crun")
CALL_TIMEOUT = 60.0
CGROUP_ROOT = "/sys/fs/cgroup"

HIDE_UNIFIED_SCRIPT = (
    "mount -t tmpfs -o size=4k,mode=0 metac-hide-unified /sys/fs/cgroup/unified"
    ' && exec "$0" "$@"'
)


# --- the host's cgroup layout (pure) --------------------------------------------


def cgroup_layout(mountinfo: str, root: str = CGROUP_ROOT) -> str:
    """``"v2"``, ``"hybrid"`` or ``"v1"`` from the text of /proc/self/mountinfo.

    The last mount at a path is the visible one. No cgroup mount at all counts
    as ``"v1"`` (the runtimes then fail with their own message).
    """
    fstypes = {e.mountpoint: e.fstype for e in parse_mountinfo(mountinfo)}
    top = fstypes.get(root)
    if top == "cgroup2":
        return "v2"
    if fstypes.get(root + "/unified") == "cgroup2":
        return "hybrid"
    return "v1"


def host_cgroup_layout() -> tuple[str, str]:
    """(layout, controllers enabled in the unified hierarchy) of this host."""
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        layout = cgroup_layout(f.read())
    controllers = ""
    if layout == "hybrid":
        with contextlib.suppress(OSError):
            with open(CGROUP_ROOT + "/unified/cgroup.controllers") as f:
                controllers = f.read().strip()
    return layout, controllers


def needs_hidden_unified(runtime: str, layout: str, unified_controllers: str) -> bool:
    """Must this runtime run with the unified hierarchy hidden (see module docstring)?"""
    return runtime == "crun" and layout == "hybrid" and bool(unified_controllers.strip())


def choose_runtime(preference: str, installed: Sequence[str]) -> str:
    """The runtime to use: ``preference`` (``auto``, ``runc``, ``crun``) among ``installed``.

    ``auto`` prefers crun (it starts processes faster), then runc.
    """
    if preference not in ("auto", *RUNTIMES):
        raise errors.InvalidArgument(
            f"unknown OCI runtime {preference!r}; expected auto, runc or crun")
    order = ("crun", "runc") if preference == "auto" else (preference,)
    for name in order:
        if name in installed:
            return name
    raise errors.MissingDependency(order[0] if preference != "auto" else "runc",
                                   order[0] if preference != "auto" else "runc")


# --- errors (pure) ----------------------------------------------------------------

_NOT_FOUND = (
    re.compile(r'exec: "([^"]+)": executable file not found'),
    re.compile(r"executable file `([^`]+)` not found"),
    re.compile(r'exec: "([^"]+)": stat \S+: no such file or directory'),
    re.compile(r"open executable: ([^:]+): No such file or directory", re.I),
    re.compile(r'exec: "([^"]+)": .*no such file or directory'),
)
_CWD = re.compile(r"chdir to cwd \(\"?([^\")]+)\"?\)|chdir `([^`]+)`", re.I)


def last_error(log_text: str) -> str:
    """The runtime's last error message in its JSON log (or the last non-empty line)."""
    message = ""
    for line in log_text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            message = line
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal", "panic"):
            message = str(entry.get("msg", ""))
    return message


def classify_error(runtime: str, message: str, what: str) -> errors.MetacError:
    """One clear error for a failed runtime call (``what``: "start the environment")."""
    for pattern in _NOT_FOUND:
        m = pattern.search(message)
        if m:
            return errors.NotFound(f"{m.group(1)}: command not found in the environment")
    m = _CWD.search(message)
    if m:
        return errors.NotFound(
            f"working directory {m.group(1) or m.group(2)} does not exist in the environment")
    if "permission denied" in message.lower():
        return errors.PermissionDenied(f"cannot {what}: {_short(message)}")
    if "cannot allocate memory" in message.lower():
        return errors.FailedPrecondition(f"cannot {what}: out of memory")
    return errors.FailedPrecondition(
        f"cannot {what}: {runtime}: {_short(message) or 'failed without a message'}")


def _short(message: str) -> str:
    text = " ".join(message.split())
    for prefix in ("exec failed: ", "runc run failed: ", "runc create failed: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text[:300]


# --- calls ------------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeInfo:
    name: str
    path: str
    layout: str
    hide_unified: bool


def detect_runtime(preference: str = "auto") -> RuntimeInfo:
    """Find the runtime to use on this host (``MissingDependency`` naming the package)."""
    installed = [name for name in RUNTIMES
                 if shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")]
    name = choose_runtime(preference, installed)
    path = require_program(name, name)
    layout, controllers = host_cgroup_layout()
    hide = needs_hidden_unified(name, layout, controllers)
    if hide:
        require_program("unshare", "util-linux")
        require_program("mount", "mount")
    return RuntimeInfo(name, path, layout, hide)


class OciRuntime:
    """runc/crun calls for the containers of one node (state under ``root``)."""

    def __init__(self, info: RuntimeInfo, root: str, supervisor: Supervisor) -> None:
        self.info = info
        self.root = root
        self.supervisor = supervisor
        self._calls = 0
        os.makedirs(root, mode=0o700, exist_ok=True)

    @property
    def name(self) -> str:
        return self.info.name

    def argv(self, *args: str, log_path: str | None = None) -> list[str]:
        prefix: list[str] = []
        if self.info.hide_unified:
            prefix = ["unshare", "--mount", "--propagation", "private", "--",
                      "sh", "-c", HIDE_UNIFIED_SCRIPT]
        argv = [*prefix, self.info.path, "--root", self.root]
        if log_path is not None:
            argv += ["--log", log_path, "--log-format", "json"]
        return [*argv, *args]

    async def call(self, args: Sequence[str], *, what: str, log_path: str,
                   stdio: Sequence[int] | None = None, timeout: float = CALL_TIMEOUT) -> None:
        """Run the runtime; raise a classified MetacError if it fails."""
        self._calls += 1
        name = f"{self.name}-{args[0]}-{self._calls}"
        kwargs: dict[str, int] = {}
        if stdio is not None:
            kwargs = {"stdin": stdio[0], "stdout": stdio[1], "stderr": stdio[2]}
        child = await self.supervisor.spawn(self.argv(*args, log_path=log_path), name=name,
                                            **kwargs)
        try:
            code = await asyncio.wait_for(child.wait(), timeout)
        except TimeoutError:
            await self.supervisor.stop(child, grace=1.0)
            raise errors.Unavailable(f"cannot {what}: {self.name} did not finish in "
                                     f"{timeout:g} s") from None
        except BaseException:
            await self.supervisor.stop(child, grace=1.0)
            raise
        self.supervisor.forget(child)
        if code != 0:
            message = ""
            with contextlib.suppress(OSError):
                with open(log_path, encoding="utf-8", errors="replace") as f:
                    message = last_error(f.read())
            if not message:
                with contextlib.suppress(OSError):
                    with open(child.log_path, encoding="utf-8", errors="replace") as f:
                        message = last_error(f.read()[-4000:])
            log.info("%s %s failed (exit %s): %s", self.name, args[0], code, message)
            raise classify_error(self.name, message, what)
        with contextlib.suppress(OSError):
            os.unlink(child.log_path)

    async def run_detached(self, container_id: str, bundle: str, pid_file: str,
                           log_path: str) -> int:
        """Create and start a container whose process runs on; its host PID."""
        await self.call(["run", "--detach", "--bundle", bundle, "--pid-file", pid_file,
                         container_id], what="start the environment", log_path=log_path)
        return read_pid(pid_file)

    async def exec_detached(self, container_id: str, process_file: str, pid_file: str,
                            log_path: str, *, stdio: Sequence[int],
                            console_socket: str | None = None) -> int:
        """Start a process in a running container; its host PID."""
        args = ["exec", "--detach", "--process", process_file, "--pid-file", pid_file]
        if console_socket is not None:
            args += ["--console-socket", console_socket]
        await self.call([*args, container_id], what="start the process", log_path=log_path,
                        stdio=stdio)
        return read_pid(pid_file)

    async def kill(self, container_id: str, sig: int = signal.SIGKILL, *,
                   log_path: str) -> None:
        await self.call(["kill", container_id, str(int(sig))], what="signal the environment",
                        log_path=log_path)

    async def delete(self, container_id: str, *, log_path: str) -> None:
        """Remove a container, killing whatever still runs in it."""
        await self.call(["delete", "--force", container_id], what="remove the environment",
                        log_path=log_path)

    def container_ids(self) -> list[str]:
        """Containers in our state root (their state directories)."""
        try:
            return sorted(e for e in os.listdir(self.root)
                          if os.path.isdir(os.path.join(self.root, e)))
        except FileNotFoundError:
            return []


def read_pid(path: str) -> int:
    with open(path) as f:
        text = f.read().strip()
    try:
        pid = int(text)
    except ValueError:
        raise errors.Internal(f"bad pid file {path}") from None
    if pid <= 0:
        raise errors.Internal(f"bad pid file {path}")
    return pid
