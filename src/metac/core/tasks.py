"""Owned background tasks: every task has an owner that cancels and awaits it.

``TaskSet`` is what an object that starts background work holds: ``spawn`` runs a
named task, ``aclose`` cancels the ones still running and waits for all of them.
A task nobody awaits should be spawned with ``log_errors=True`` so its failure is
logged when it happens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, *,
              log_errors: bool = False) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, owned by this set."""
        if log_errors:
            coro = _logged(coro, name)
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def aclose(self) -> None:
        """Cancel what still runs and wait for every task."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self, timeout: float | None = None) -> None:
        """Wait (up to ``timeout``) for the tasks running now to finish by themselves."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


async def _logged(coro: Coroutine[Any, Any, Any], name: str) -> Any:
    try:
        return await coro
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("background task %s failed", name)
        return None
