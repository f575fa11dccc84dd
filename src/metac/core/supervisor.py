"""The single owner of the external processes a metac process starts.

Rules: explicit argv, no shell; each child gets its own process group and
``PR_SET_PDEATHSIG(SIGKILL)``, so it dies with its parent even after a
``kill -9``; stdout/stderr go to a size-capped, rotated log file
(:mod:`metac.core.logfiles`); a state file records pid and
start time so the next start can find survivors (``reap_orphans``); stopping
is SIGTERM to the group, a grace period, then SIGKILL, and always awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from metac import errors
from metac.core.logfiles import LogFiles, LogPump, open_private

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """For ``preexec_fn``: runs in the child between fork and exec; it dies with us."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def process_start_time(pid: int) -> int | None:
    """Start time of pid in clock ticks since boot (field 22 of /proc/pid/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    if fields[0] == "Z":
        return None  # exited, waiting to be reaped by its parent: nothing to kill
    return int(fields[19])


def require_program(program: str, package: str) -> str:
    """Path of program, or MissingDependency naming the Debian package."""
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise errors.MissingDependency(program, package)
    return path


@dataclass
class Child:
    name: str
    argv: list[str]
    process: asyncio.subprocess.Process
    state_file: str
    log_path: str
    started: float = field(default_factory=time.monotonic)
    log_pump: LogPump | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self) -> int:
        code = await self.process.wait()
        self.drain_log()
        return code

    def drain_log(self) -> None:
        """Copy what the exited child left in its log pipe (so its log file is complete)."""
        if self.log_pump is not None:
            self.log_pump.drain()


class Supervisor:
    """Starts, stops and reaps external programs; ``aclose`` stops all of them."""

    def __init__(self, state_dir: str, owner: str) -> None:
        self.owner = owner
        self.proc_dir = os.path.join(state_dir, "procs", owner)
        self.log_dir = os.path.join(state_dir, "logs")
        os.makedirs(self.proc_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        self.children: dict[str, Child] = {}
        self.logs = LogFiles()

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        name: str,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        cwd: str | None = None,
        stdin: int | None = asyncio.subprocess.DEVNULL,
        stdout: int | None = None,
        stderr: int | None = None,
        log_to_file: bool = True,
    ) -> Child:
        if name in self.children:
            raise errors.AlreadyExists(f"child {name!r} already running")
        log_path = os.path.join(self.log_dir, f"{self.owner}.{name}.log")
        # Output goes through a pipe we read, so its log file can be size-capped.
        log_r, log_w = os.pipe() if log_to_file and (stdout is None or stderr is None) \
            else (-1, -1)
        logw = log_w if log_w >= 0 else None
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=stdin,
                stdout=stdout if stdout is not None else logw,
                stderr=stderr if stderr is not None else logw,
                env=dict(env) if env is not None else None,
                pass_fds=tuple(pass_fds),
                cwd=cwd,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        except BaseException as exc:
            if log_r >= 0:
                os.close(log_r)
            if isinstance(exc, FileNotFoundError):
                raise errors.MissingDependency(argv[0], os.path.basename(argv[0])) from None
            raise
        finally:
            if log_w >= 0:
                os.close(log_w)
        pump = self.logs.pump(log_path, log_r) if log_r >= 0 else None
        state_file = os.path.join(self.proc_dir, f"{name}.json")
        record = {
            "argv": list(argv),
            "pid": process.pid,
            "start_time": process_start_time(process.pid),
            "name": name,
        }
        tmp = state_file + ".tmp"
        with open(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "w") as f:
            json.dump(record, f)  # argv may name secrets' files: not for other users
        os.replace(tmp, state_file)
        child = Child(name, list(argv), process, state_file, log_path, log_pump=pump)
        self.children[name] = child
        log.debug("started %s (pid %d)", name, process.pid)
        return child

    def forget(self, child: Child) -> None:
        """The child has exited and was awaited: drop its record."""
        if self.children.get(child.name) is child:
            del self.children[child.name]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(child.state_file)

    async def stop(self, child: Child, *, grace: float = 5.0) -> int:
        """SIGTERM the child's group, wait ``grace``, SIGKILL; always awaited."""
        try:
            return await asyncio.shield(self._stop(child, grace))
        finally:
            self.forget(child)

    async def _stop(self, child: Child, grace: float) -> int:
        if child.returncode is None:
            _signal_group(child.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(child.process.wait(), grace)
            except TimeoutError:
                _signal_group(child.pid, signal.SIGKILL)
                await child.process.wait()
        # The leader may be gone while group members linger.
        _signal_group(child.pid, signal.SIGKILL)
        child.drain_log()
        return child.process.returncode  # type: ignore[return-value]

    async def aclose(self, grace: float = 5.0) -> None:
        children = list(self.children.values())
        await asyncio.gather(*(self.stop(c, grace=grace) for c in children), return_exceptions=True)
        self.logs.close()

    async def reap_orphans(self) -> list[str]:
        """Kill survivors of an earlier run of this owner (after a crash or kill -9)."""
        reaped: list[str] = []
        for entry in sorted(os.listdir(self.proc_dir)):
            path = os.path.join(self.proc_dir, entry)
            if not entry.endswith(".json"):
                continue
            try:
                with open(path) as f:
                    record = json.load(f)
                pid = int(record["pid"])
                start = record.get("start_time")
            except (OSError, ValueError, KeyError):
                os.unlink(path)
                continue
            if start is not None and process_start_time(pid) == start:
                await _kill_and_wait(pid)
                reaped.append(f"{record.get('name', entry)} (pid {pid})")
            os.unlink(path)
        if reaped:
            log.warning("reaped leftover processes: %s", ", ".join(reaped))
        return reaped


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _kill_and_wait(pid: int, timeout: float = 5.0) -> None:
    """Kill a process that is not (necessarily) our child, and wait for it by pidfd."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        _signal_group(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.add_reader(pidfd, lambda: done.done() or done.set_result(None))
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            log.error("pid %d did not exit after SIGKILL", pid)
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
