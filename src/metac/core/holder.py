"""Holders and revert stacks: how an action stays alive and how it is undone.

A ``Revert`` collects undo steps while a multi-step action is set up; if setup
fails, the steps already done are undone in reverse order. A ``HolderServer``
owns a ``Revert`` (or a callback) and runs it exactly once: on ``release()``,
or when the last capability reference to it is dropped. pycapnp drops its
reference when the client releases it or when the client's connection ends;
the server object is then freed by reference counting (holders keep no
reference cycles), and ``__del__`` schedules the undo on the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from metac import errors
from metac.core.rpc import Servant
from metac.core.tasks import TaskSet
from metac.schema.load import core

log = logging.getLogger(__name__)

Undo = Callable[[], Awaitable[Any] | Any]


class Revert:
    """Undo steps, run in reverse order by ``aclose``; each step runs once."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Undo]] = []
        self._closed = False

    def add(self, undo: Undo, what: str = "") -> None:
        if self._closed:
            raise RuntimeError("revert stack already closed")
        self._steps.append((what or getattr(undo, "__name__", "step"), undo))

    def pop_all(self) -> Revert:
        """Move every step to a new Revert (setup succeeded; a holder takes them)."""
        other = Revert()
        other._steps, self._steps = self._steps, []
        return other

    async def aclose(self) -> None:
        self._closed = True
        while self._steps:
            what, undo = self._steps.pop()
            try:
                res = undo()
                if inspect.isawaitable(res):
                    await res
            except Exception:
                log.exception("undo step %s failed", what)

    async def __aenter__(self) -> Revert:
        return self

    async def __aexit__(self, *exc: object) -> None:
        # On success the caller has moved the steps out with pop_all().
        await self.aclose()


class Lease:
    """Keeps ``target`` alive while the server object holding this lease exists.

    ``target`` counts its leases in an int attribute ``leases``; when the last lease is
    collected, ``end(reason)`` is called (it schedules the teardown: ``__del__`` cannot
    await). Once the event loop is closed the service's exit tears everything down, so
    a late collection does nothing."""

    def __init__(self, target: Any, end: Callable[[str], None]) -> None:
        self._target = target
        self._end = end
        target.leases += 1

    def __del__(self) -> None:
        target = self._target
        target.leases -= 1
        if target.leases <= 0:
            try:
                self._end("its last capability was dropped")
            except RuntimeError:
                pass  # event loop already closed


class HolderServer(Servant, core.Holder.Server):
    """A Holder capability: runs its revert stack once, on release or when dropped."""

    def __init__(self, revert: Revert | Undo, what: str = "holder") -> None:
        if not isinstance(revert, Revert):
            stack = Revert()
            stack.add(revert, what)
            revert = stack
        self._revert: Revert | None = revert
        self._what = what
        self._loop = asyncio.get_running_loop()
        self.released = asyncio.Event()

    @property
    def active(self) -> bool:
        return self._revert is not None

    async def release(self, **kwargs: Any) -> None:
        await self.close()

    async def createSturdyRef(self, **kwargs: Any) -> None:
        # Persistent actions use a subclass with core.service.PersistableMixin.
        raise errors.Unsupported(f"{self._what} cannot be made persistent")

    async def close(self) -> None:
        revert, self._revert = self._revert, None
        if revert is not None:
            log.debug("releasing %s", self._what)
            try:
                await asyncio.shield(revert.aclose())
            finally:
                self.released.set()

    def __del__(self) -> None:
        revert, self._revert = self._revert, None
        if revert is None or self._loop.is_closed():
            return
        log.debug("last reference to %s dropped; releasing", self._what)
        try:
            _background(revert.aclose(), f"release {self._what}")
        except RuntimeError:
            pass


# Undo work started from __del__ has no awaiting caller: the event loop it runs on
# owns it (one TaskSet per loop, gone with the loop), and core.process waits for it
# at exit.
_UNDO_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TaskSet] = \
    weakref.WeakKeyDictionary()


def _background(coro: Any, name: str) -> None:
    loop = asyncio.get_running_loop()  # RuntimeError outside a loop
    tasks = _UNDO_BY_LOOP.get(loop)
    if tasks is None:
        tasks = _UNDO_BY_LOOP[loop] = TaskSet()
    tasks.spawn(coro, name, log_errors=True)


async def drain_background(timeout: float = 10.0) -> None:
    """Wait for undo work started by dropped holders on this loop (used at process exit)."""
    tasks = _UNDO_BY_LOOP.get(asyncio.get_running_loop())
    if tasks is not None:
        await tasks.wait(timeout)
