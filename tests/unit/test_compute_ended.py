"""Ended background processes kept for `metac ps -a` (metac.compute.ended)."""

from __future__ import annotations

from metac.compute.ended import EndedProcess, EndedProcesses


def record(pid: int, env: str = "e1", ended: float = 100.0, code: int = 0) -> EndedProcess:
    return EndedProcess(f"{env}.{pid}", pid, ("sleep", "1"), code, 50.0, ended)


def test_kept_until_removed_by_id_or_environment() -> None:
    now = [100.0]
    ended = EndedProcesses(clock=lambda: now[0])
    ended.add([record(1), record(2), record(1, env="e2", code=3)])
    assert [r.id for r in ended.list()] == ["e1.1", "e1.2", "e2.1"]
    assert [r.id for r in ended.remove("e1.2")] == ["e1.2"]
    assert ended.remove("e1.2") == []
    assert [r.id for r in ended.remove("e2")] == ["e2.1"]
    assert [r.returncode for r in ended.list()] == [0]


def test_dropped_after_the_keep_time_and_beyond_the_limit() -> None:
    now = [1000.0]
    ended = EndedProcesses(keep=60.0, limit=2, clock=lambda: now[0])
    ended.add([record(1, ended=990.0)])
    now[0] = 1049.0
    assert len(ended.list()) == 1
    now[0] = 1051.0
    assert ended.list() == []
    ended.add([record(i, ended=1050.0) for i in range(1, 4)])
    assert [r.id for r in ended.list()] == ["e1.2", "e1.3"]
