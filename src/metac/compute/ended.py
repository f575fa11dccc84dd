"""Background processes that ended, kept for `metac ps -a` until removed or too old.

An environment launched with ``autoDestroy`` (``metac run --background``) goes away
with its last process; its processes' ids, commands and exit codes stay here until
`metac rm ID`, for :data:`KEEP_ENDED` seconds, or until the compute service
restarts (they are not written to disk). At most :data:`MAX_ENDED` are kept, the
oldest going first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

KEEP_ENDED = 24 * 3600.0
MAX_ENDED = 1000


@dataclass(frozen=True)
class EndedProcess:
    id: str  # "<environment id>.<n>"
    pid: int
    args: tuple[str, ...]
    returncode: int
    started: float  # Unix time
    ended: float

    @property
    def env_id(self) -> str:
        return self.id.split(".", 1)[0]


class EndedProcesses:
    def __init__(self, keep: float = KEEP_ENDED, limit: int = MAX_ENDED,
                 clock: Callable[[], float] = time.time) -> None:
        self._keep = keep
        self._limit = limit
        self._clock = clock
        self._records: dict[str, EndedProcess] = {}  # oldest first

    def add(self, records: Iterable[EndedProcess]) -> None:
        for record in records:
            self._records.pop(record.id, None)
            self._records[record.id] = record
        self._prune()

    def list(self) -> list[EndedProcess]:
        self._prune()
        return list(self._records.values())

    def remove(self, target: str) -> list[EndedProcess]:
        """Forget ``target``: one process id (ENV.N) or every process of environment ENV."""
        gone = [r for r in self._records.values() if target in (r.id, r.env_id)]
        for r in gone:
            del self._records[r.id]
        return gone

    def _prune(self) -> None:
        oldest = self._clock() - self._keep
        for r in [r for r in self._records.values() if r.ended < oldest]:
            del self._records[r.id]
        while len(self._records) > self._limit:
            del self._records[next(iter(self._records))]
