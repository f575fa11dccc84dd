"""Helpers shared by the bench scripts (processes, nodes, ports, statistics, JSON).

Not a benchmark. The scripts run as ``python bench/X.py``, so this directory is
``sys.path[0]`` and they import it as ``_support`` (after making ``metac``
importable).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

READY_LINE = "metac node ready"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for children: SIGTERM them when the bench dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def child_env(extra: dict[str, str] | None = None, *,
              drop_notify_socket: bool = True) -> dict[str, str]:
    """The environment for child processes: importing the same ``metac``, unbuffered."""
    import metac

    env = dict(os.environ)
    pkg_parent = str(Path(metac.__file__).resolve().parent.parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if pkg_parent not in parts:
        parts.insert(0, pkg_parent)
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    if drop_notify_socket:
        env.pop("NOTIFY_SOCKET", None)
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def loopback_b() -> str:
    """127.0.0.2 if this host can bind it (Linux: all of 127/8 is loopback), else 127.0.0.1."""
    try:
        free_port("127.0.0.2")
        return "127.0.0.2"
    except OSError:
        return "127.0.0.1"


def stop_pid(proc: subprocess.Popen[Any], grace: float = 15.0, *, warn: bool = False) -> int:
    """SIGTERM, wait ``grace``, SIGKILL; by PID only. Returns the exit status.

    With ``warn``, a process that needed SIGKILL is reported on stderr.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            if warn:
                print(f"warning: pid {proc.pid} ignored SIGTERM for {grace:g} s; SIGKILL",
                      file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return int(proc.returncode)


def wait_ready_line(log: Path, proc: subprocess.Popen[Any], what: str = "node",
                    timeout: float = 60.0) -> None:
    """Wait for ``READY_LINE`` in the log file ``log`` of ``proc``.

    Raises RuntimeError with the log's tail if ``proc`` exits or ``timeout`` passes first.
    """
    deadline = time.monotonic() + timeout
    while READY_LINE not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``values`` need not be sorted; nan when empty)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, round(q / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` as indented JSON (making its directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
