"""Real metac nodes inside :mod:`metac.testing.netns` hosts, a CLI runner, leak checks.

A :class:`NodeHost` owns one temporary directory (``state/``, ``run/``,
``node.log``) and runs, in its host's network namespace only::

    nsenter --net=/run/netns/NS -- python -m metac node run --address IP --port 901 \\
        --state-dir DIR --runtime-dir DIR [--extra-service NAME=module]...

with stdout and stderr appended to ``node.log``. ``start()`` waits for a log
line containing ``metac node ready``. A node expected to stop by itself (a
damaged store) is ``start(wait=False)`` then ``wait_exit()``; one more node
next to the running one (a refused second start) is ``run_node_expecting_exit()``. The CLI runs the same way with
``METAC_RUNTIME_DIR`` set (``NodeHost.metac(...)``).

``close()`` never relies on the node behaving: SIGTERM then SIGKILL for the
node and every tracked CLI process, SIGKILL (by PID, through a pidfd) for every
process recorded in the node's tree and every process left in the host's
network namespace, ``umount -l`` for every mount under the node's directories
or a registered mount root, then removal of the directory (never across a
mount point).
"""

from __future__ import annotations

import os
import signal
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import metac
from metac.testing import netns as _netns
from metac.testing.netns import Host

READY_LINE = "metac node ready"
DEFAULT_PORT = 901
NODE_STOP_GRACE = 10.0
CLI_STOP_GRACE = 5.0


class NodeStartError(RuntimeError):
    """The node exited or did not log the ready line in time (message ends with the log tail)."""


def metac_argv() -> list[str]:
    """argv prefix running metac with the interpreter of the current test run."""
    return [sys.executable, "-m", "metac"]


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment, made to import the same ``metac`` in a child process.

    The directory that holds the imported ``metac`` package (e.g. ``src/`` of a
    checkout) is prepended to ``PYTHONPATH`` unless it is a site-packages dir;
    output is unbuffered so log lines reach the log file at once.
    """
    env = dict(os.environ)
    pkg_parent = str(Path(metac.__file__).resolve().parent.parent)
    site_dirs = {str(Path(p).resolve()) for p in site.getsitepackages()}
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if pkg_parent not in site_dirs and pkg_parent not in parts:
        parts.insert(0, pkg_parent)
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------- /proc helpers


def _ppid_map() -> dict[int, int]:
    result: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _netns.proc_stat(int(entry))
            if stat is not None:
                result[int(entry)] = stat[0]
    return result


def process_tree(root: int) -> set[int]:
    """``root`` and all its descendants (walking the ppid field of /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    if not _netns.pid_alive(root):
        return set()
    seen = {root}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def _unescape_mountinfo(field_: str) -> str:
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and i + 3 < len(field_) and field_[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def mountpoints(under: Iterable[str | os.PathLike[str]] | None = None) -> list[str]:
    """Mount points from /proc/self/mountinfo, in mount order; only below ``under`` if given."""
    roots = None if under is None else [os.path.realpath(r) for r in under]
    result = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 5:
                continue
            mp = _unescape_mountinfo(fields[4])
            if roots is None or any(mp == r or mp.startswith(r.rstrip("/") + "/") for r in roots):
                result.append(mp)
    return result


def _safe_rmtree(path: Path) -> None:
    """Remove ``path`` without ever descending into another filesystem."""
    dev = os.lstat(path).st_dev

    def walk(directory: str) -> None:
        with os.scandir(directory) as it:
            entries = list(it)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if entry.stat(follow_symlinks=False).st_dev != dev:
                    raise RuntimeError(f"refusing to remove {entry.path}: a mount point")
                walk(entry.path)
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)

    walk(str(path))
    os.rmdir(path)


# --------------------------------------------------------------------------- leaks


@dataclass(frozen=True)
class Snapshot:
    """Kernel objects and processes at one moment, for :func:`assert_no_leaks`.

    ``links`` are ``"<host>:<ifname>"``; ``mounts`` are mount points below the
    nodes' directories and registered mount roots; ``pids`` are the nodes'
    process trees plus every live process in their network namespaces.
    """

    links: frozenset[str] = field(default_factory=frozenset)
    mounts: frozenset[str] = field(default_factory=frozenset)
    pids: frozenset[int] = field(default_factory=frozenset)

    def as_dict(self) -> dict[str, Set[Any]]:
        return {"links": self.links, "mounts": self.mounts, "pids": self.pids}


def snapshot(*nodes: NodeHost) -> Snapshot:
    """Snapshot of links, mounts and processes of ``nodes``."""
    links: set[str] = set()
    mounts: set[str] = set()
    pids: set[int] = set()
    for node in nodes:
        links |= {f"{node.host.name}:{name}" for name in _netns.links(node.host)}
        mounts |= set(node.mounts())
        pids |= node.pids() | {p for p in node.netns_pids() if _netns.pid_alive(p)}
    return Snapshot(frozenset(links), frozenset(mounts), frozenset(pids))


def assert_no_leaks(
    before: Snapshot | Mapping[str, Set[Any]], after: Snapshot | Mapping[str, Set[Any]]
) -> None:
    """Fail if ``after`` has anything ``before`` had not (per category: links, mounts, pids...).

    Accepts :class:`Snapshot` objects or plain mappings of category -> set.
    """
    b = before.as_dict() if isinstance(before, Snapshot) else before
    a = after.as_dict() if isinstance(after, Snapshot) else after
    problems = []
    for key in sorted(a):
        leaked = set(a[key]) - set(b.get(key, ()))
        if not leaked:
            continue
        if key == "pids":
            items = [f"{p} ({_netns.proc_cmdline(p)})" for p in sorted(leaked)]
        else:
            items = sorted(map(str, leaked))
        problems.append(f"{key}: {', '.join(items)}")
    if problems:
        raise AssertionError("leaked " + "; ".join(problems))


# --------------------------------------------------------------------------- NodeHost


def _output_text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class NodeHost:
    """A metac node (and CLI runner) in one :class:`~metac.testing.netns.Host`."""

    def __init__(
        self,
        host: Host,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        port: int = DEFAULT_PORT,
        env: Mapping[str, str] | None = None,
        ipv6: bool = False,
    ) -> None:
        self.host = host
        #: The node serves (and names itself in refs) on this address; ``ipv6``
        #: picks the host's ULA instead of its IPv4 address.
        self.address: str = host.ipv6 if ipv6 else host.ipv4
        self.port = port
        #: Extra environment for the node and every CLI call.
        self.env: dict[str, str] = dict(env or {})
        # Short path: unix sockets live in runtime_dir (108-byte sun_path limit).
        self.root = Path(tempfile.mkdtemp(prefix=f"metac-{host.netns}-", dir=base_dir)).resolve()
        self.state_dir = self.root / "state"
        self.runtime_dir = self.root / "run"
        self.log_path = self.root / "node.log"
        self.state_dir.mkdir(mode=0o700)
        self.runtime_dir.mkdir(mode=0o700)
        self.log_path.touch()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._tracked: list[subprocess.Popen[Any]] = []
        self._orphans: dict[int, int] = {}  # pid -> starttime, killed at close()
        self._mount_roots: list[Path] = []
        self._closed = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<NodeHost {self.host.name} {self.address} netns={self.host.netns} {state}>"

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---------------------------------------------------------------- node lifecycle

    def node_argv(
        self,
        extra_services: Mapping[str, str] | None = None,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        runtime_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
    ) -> list[str]:
        """argv of this host's node (other directories or port if given)."""
        argv = [
            *metac_argv(), "node", "run",
            "--address", self.address,
            "--port", str(port or self.port),
            "--state-dir", str(state_dir or self.state_dir),
            "--runtime-dir", str(runtime_dir or self.runtime_dir),
        ]  # fmt: skip
        for name, module in (extra_services or {}).items():
            argv += ["--extra-service", f"{name}={module}"]
        return self.host.argv(argv)

    def start(
        self,
        extra_services: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float = 30.0,
    ) -> None:
        """Spawn the node (log appended to ``log_path``); if ``wait``, wait until it is ready."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self.running:
            raise RuntimeError(f"{self!r}: node already running")
        argv = self.node_argv(extra_services)
        with open(self.log_path, "ab") as log:
            log.write(f"=== harness: starting node: {' '.join(argv)}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self._env({"METAC_RUNTIME_DIR": str(self.runtime_dir)}),
                start_new_session=True,
            )
        if wait:
            self.wait_ready(timeout)

    def log_text(self, *, since_start: bool = True) -> str:
        """The node log (only the current run's part if ``since_start``)."""
        with open(self.log_path, "rb") as f:
            if since_start:
                f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text(since_start=False).splitlines()[-lines:])

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the ready line; raise :class:`NodeStartError` on early exit or timeout."""
        if self.proc is None:
            raise RuntimeError(f"{self!r}: node not started")
        deadline = time.monotonic() + timeout
        while True:
            if READY_LINE in self.log_text():
                return
            rc = self.proc.poll()
            if rc is not None:
                if READY_LINE in self.log_text():
                    return
                raise NodeStartError(
                    f"node on host {self.name} exited with {rc} before it was ready; "
                    f"log {self.log_path} tail:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise NodeStartError(
                    f"node on host {self.name} not ready after {timeout}s "
                    f"(no {READY_LINE!r} line); log {self.log_path} tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait for a node expected to stop by itself (after ``start(wait=False)``); its exit
        code. AssertionError (after SIGKILL) if it still runs after ``timeout``."""
        if self.proc is None:
            raise RuntimeError(f"{self!r}: node not started")
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._remember_tree()
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"node on host {self.name} still ran after {timeout}s; log tail:\n"
                f"{self.log_tail()}") from None

    def run_node_expecting_exit(
        self,
        extra_services: Mapping[str, str] | None = None,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        runtime_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run one more node in this host (other dirs or port if given) that must exit by
        itself, e.g. refused; its exit code and output. Unlike :meth:`start` it leaves
        this host's running node alone. AssertionError if it still runs after ``timeout``
        (it is killed, with its process group)."""
        argv = self.node_argv(extra_services, state_dir=state_dir, runtime_dir=runtime_dir,
                              port=port)
        env = self._env({"METAC_RUNTIME_DIR": str(runtime_dir or self.runtime_dir)})
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in process_tree(proc.pid):
                pstat = _netns.proc_stat(pid)
                if pstat is not None:
                    self._orphans[pid] = pstat[1]
            _netns.signal_pid(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(
                f"`{' '.join(argv)}` still ran after {timeout}s\n--- stdout ---\n{out}"
                f"\n--- stderr ---\n{err}") from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def _remember_tree(self) -> None:
        if self.proc is None:
            return
        for pid in self.pids():
            stat = _netns.proc_stat(pid)
            if stat is not None and pid != self.proc.pid:
                self._orphans[pid] = stat[1]

    def stop(self, timeout: float = NODE_STOP_GRACE) -> int:
        """SIGTERM the node and wait; SIGKILL after ``timeout``. Returns the exit code.

        Processes of the node's tree are remembered: :meth:`orphans` tells
        which outlived the node, :meth:`close` kills them.
        """
        if self.proc is None:
            raise RuntimeError(f"{self!r}: node not started")
        if self.proc.poll() is None:
            self._remember_tree()
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def kill9(self) -> int:
        """SIGKILL the node only (its children are orphaned, as in a crash). Returns the exit code."""
        if self.proc is None:
            raise RuntimeError(f"{self!r}: node not started")
        if self.proc.poll() is None:
            self._remember_tree()
            self.proc.kill()
        return self.proc.wait()

    def orphans(self) -> set[int]:
        """Processes of an earlier node tree (before stop/kill9) that are still alive."""
        return {p for p, start in self._orphans.items() if _netns.pid_alive(p, start)}

    # ---------------------------------------------------------------- CLI

    def _env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = python_env(self.env)
        if extra:
            env.update(extra)
        return env

    def cli_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment of CLI calls: ours + PYTHONPATH + ``METAC_RUNTIME_DIR`` + ``extra``."""
        env = self._env({"METAC_RUNTIME_DIR": str(self.runtime_dir)})
        if extra:
            env.update(extra)
        return env

    def metac(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -m metac ARGS...`` in this host; raise AssertionError if ``check`` fails."""
        argv = self.host.argv([*metac_argv(), *args])
        stdin_kw: dict[str, Any] = (
            {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        )
        what = f"`metac {' '.join(args)}` on host {self.name}"
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.cli_env(env),
                check=False,
                **stdin_kw,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"{what} timed out after {timeout}s\n--- stdout ---\n{_output_text(exc.stdout)}"
                f"\n--- stderr ---\n{_output_text(exc.stderr)}"
            ) from None
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{what} exited {proc.returncode}\n--- stdout ---\n{proc.stdout}"
                f"\n--- stderr ---\n{proc.stderr}"
            )
        return proc

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start a long-running ``metac ARGS...`` in this host; ended at :meth:`close`.

        Defaults: stdin /dev/null, stdout and stderr pipes, text mode, new session.
        ``env`` (if given) is merged over :meth:`cli_env`.
        """
        kw["env"] = self.cli_env(kw.get("env"))
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.host.argv([*metac_argv(), *args]), **kw)
        self._tracked.append(proc)
        return proc

    # ---------------------------------------------------------------- inspection

    def pids(self) -> set[int]:
        """The node's process tree: its PID and all descendants (empty if not running)."""
        if not self.running or self.proc is None:
            return set()
        return process_tree(self.proc.pid)

    def netns_pids(self) -> set[int]:
        """PIDs of every process in this host's network namespace."""
        return _netns.netns_pids(self.host.netns)

    def links(self) -> set[str]:
        return _netns.links(self.host)

    def track_mount_root(self, path: str | os.PathLike[str]) -> None:
        """Unmount (``umount -l``) anything mounted below ``path`` at :meth:`close`."""
        self._mount_roots.append(Path(os.path.realpath(path)))

    def mount_roots(self) -> list[Path]:
        return [self.state_dir, self.runtime_dir, *self._mount_roots]

    def mounts(self) -> list[str]:
        """Mount points below the node's dirs and registered mount roots."""
        return mountpoints(self.mount_roots())

    def snapshot(self) -> Snapshot:
        return snapshot(self)

    # ---------------------------------------------------------------- teardown

    @staticmethod
    def _end(procs: Sequence[subprocess.Popen[Any]], grace: float) -> None:
        live = [p for p in procs if p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def close(self) -> None:
        """End every process, unmount, remove the directory. Idempotent; raises if a leak remains."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        # 1. CLI processes first (they may be holding resources of the node), then the node.
        self._end(self._tracked, CLI_STOP_GRACE)
        for p in self._tracked:
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
        if self.proc is not None:
            if self.proc.poll() is None:
                self._remember_tree()
            self._end([self.proc], NODE_STOP_GRACE)
        # 2. Everything that was in the node's tree, then everything left in the netns.
        for pid, start in self._orphans.items():
            _netns.signal_pid(pid, signal.SIGKILL, starttime=start)
        survivors = _netns.kill_netns_pids(self.host.netns)
        if survivors:
            errors.append(
                "processes survived SIGKILL: "
                + ", ".join(f"{p} ({_netns.proc_cmdline(p)})" for p in sorted(survivors))
            )
        # 3. Mounts, deepest (latest) first; lazy so busy mounts go too.
        for _ in range(5):
            remaining = mountpoints([self.root, *self._mount_roots])
            if not remaining:
                break
            for mp in reversed(remaining):
                _netns.run_cmd(["umount", "-l", mp], check=False)
        remaining = mountpoints([self.root, *self._mount_roots])
        if remaining:
            errors.append(f"could not unmount: {', '.join(remaining)}")
        # 4. Our directory, never across a mount point.
        if not mountpoints([self.root]):
            try:
                _safe_rmtree(self.root)
            except OSError as exc:
                errors.append(f"could not remove {self.root}: {exc}")
            except RuntimeError as exc:
                errors.append(str(exc))
        if errors:
            raise RuntimeError(f"teardown of {self!r} incomplete: " + "; ".join(errors))

    def __enter__(self) -> NodeHost:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
