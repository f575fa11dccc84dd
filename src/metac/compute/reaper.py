"""Exit statuses of container processes: the service is their child subreaper.

The runtime is called with ``--detach``: it starts a container's init or a
process and exits. The kernel then re-parents that process to the nearest
ancestor marked ``PR_SET_CHILD_SUBREAPER``, which is this service, so the
service can open a pidfd for it (a PID of our own child is never reused before
we reap it), wait for it with the event loop, and collect the exact status with
``waitid(P_PIDFD)``: its exit code, or the signal that ended it.

Any other orphan that ends up with us (none is expected) is reaped by
``reap_strays`` so no zombie is left; children of the supervisor are left to
asyncio, which waits for them by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def become_subreaper() -> None:
    if _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"PR_SET_CHILD_SUBREAPER: {os.strerror(err)}")


def status_code(result: os.waitid_result) -> int:
    """Exit code, or minus the signal number if a signal ended the process."""
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return -result.si_status


class Watched:
    """One process we will reap: a pidfd, its exit future and status."""

    def __init__(self, pid: int, on_exit: Callable[[Watched], None] | None = None) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.code: int | None = None
        self.exited = asyncio.get_running_loop().create_future()
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.pidfd, self._readable)

    def _readable(self) -> None:
        try:
            result = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            # Not our child (the runtime did not leave it to us): no status.
            result = None
            if _alive(self.pidfd):
                return
        else:
            if result is None:
                return  # spurious wake-up
        self._loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        self.code = status_code(result) if result is not None else -1
        if not self.exited.done():
            self.exited.set_result(self.code)
        if self._on_exit is not None:
            self._on_exit(self)

    @property
    def running(self) -> bool:
        return self.code is None

    def signal(self, sig: int) -> bool:
        """Send ``sig``; False if the process already ended."""
        if self.pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)

    def close(self) -> None:
        """Stop watching (the process is left alone; used at service exit)."""
        if self.pidfd >= 0:
            self._loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1


def _alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    return True


def reap_strays(known: set[int]) -> list[int]:
    """Reap exited children that nobody waits for; ``known`` PIDs are left alone."""
    reaped = []
    while True:
        try:
            res = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            break
        if res is None or res.si_pid in known:
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(res.si_pid, os.WNOHANG)
        reaped.append(res.si_pid)
    if reaped:
        log.info("reaped stray children %s", reaped)
    return reaped
