"""Tests for metac.core.supervisor: spawn, TERM then KILL, state files, orphan reaping.

Every process started here is a ``sleep`` or a tiny Python child; each test
kills what it started (by PID) even when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import capnp
import pytest

from metac import errors
from metac.core.supervisor import Supervisor, process_start_time, require_program

IGNORE_TERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(capnp.run(coro))


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    return process_start_time(pid) is not None


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """PIDs a test started; whatever is still alive at the end gets SIGKILL (with its group)."""
    started: list[int] = []
    yield started
    for pid in started:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:  # a group leader: its whole group
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def state_dir(tmp_path) -> str:
    return str(tmp_path / "state")


def test_process_start_time() -> None:
    assert isinstance(process_start_time(os.getpid()), int)
    assert process_start_time(2**22 + 12345) is None  # above pid_max: never a process


def test_spawn_records_and_stop_terms(state_dir: str, pids: list[int]) -> None:
    async def main() -> None:
        sup = Supervisor(state_dir, "tests")
        child = await sup.spawn(["sleep", "60"], name="sleeper")
        pids.append(child.pid)
        assert sup.children == {"sleeper": child}
        assert child.returncode is None and alive(child.pid)
        with open(child.state_file) as f:
            record = json.load(f)
        assert record["pid"] == child.pid
        assert record["argv"] == ["sleep", "60"]
        assert record["name"] == "sleeper"
        assert record["start_time"] == process_start_time(child.pid)
        assert os.path.dirname(child.state_file) == os.path.join(state_dir, "procs", "tests")
        assert os.path.exists(child.log_path)
        # a session (and group) of its own
        assert os.getpgid(child.pid) == child.pid
        assert os.getsid(child.pid) == child.pid

        code = await sup.stop(child, grace=5)
        assert code == -signal.SIGTERM
        assert not os.path.exists(child.state_file)
        assert sup.children == {}
        assert not alive(child.pid)

    run(main())


def test_child_ignoring_term_is_killed_after_grace(state_dir: str, pids: list[int]) -> None:
    async def main() -> float:
        sup = Supervisor(state_dir, "tests")
        child = await sup.spawn([sys.executable, "-c", IGNORE_TERM], name="stubborn",
                                stdout=asyncio.subprocess.PIPE)
        pids.append(child.pid)
        assert child.process.stdout is not None
        line = await asyncio.wait_for(child.process.stdout.readline(), 10)
        assert line.strip() == b"ready"
        t0 = time.monotonic()
        code = await sup.stop(child, grace=0.5)
        elapsed = time.monotonic() - t0
        assert code == -signal.SIGKILL
        assert not alive(child.pid)
        return elapsed

    elapsed = run(main())
    assert 0.4 <= elapsed < 5


def test_stop_kills_the_whole_group(state_dir: str, pids: list[int]) -> None:
    # The leader exits on TERM, a grandchild in its group ignores TERM: KILL gets it.
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {IGNORE_TERM!r}], stdout=subprocess.PIPE)\n"
        "p.stdout.readline()\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )

    async def main() -> None:
        sup = Supervisor(state_dir, "tests")
        child = await sup.spawn([sys.executable, "-c", script], name="tree",
                                stdout=asyncio.subprocess.PIPE)
        pids.append(child.pid)
        assert child.process.stdout is not None
        grandchild = int(await asyncio.wait_for(child.process.stdout.readline(), 10))
        pids.append(grandchild)
        assert alive(grandchild)
        await sup.stop(child, grace=2)
        await asyncio.sleep(0.1)
        assert not alive(grandchild)

    run(main())


def test_aclose_stops_every_child(state_dir: str, pids: list[int]) -> None:
    async def main() -> None:
        sup = Supervisor(state_dir, "tests")
        children = [await sup.spawn(["sleep", "60"], name=f"s{i}") for i in range(3)]
        pids.extend(c.pid for c in children)
        await sup.aclose(grace=2)
        assert sup.children == {}
        assert not any(alive(c.pid) for c in children)
        assert os.listdir(sup.proc_dir) == []

    run(main())


def test_duplicate_name_is_rejected(state_dir: str, pids: list[int]) -> None:
    async def main() -> None:
        sup = Supervisor(state_dir, "tests")
        child = await sup.spawn(["sleep", "60"], name="one")
        pids.append(child.pid)
        try:
            with pytest.raises(errors.AlreadyExists):
                await sup.spawn(["sleep", "60"], name="one")
        finally:
            await sup.aclose(grace=2)

    run(main())


def test_forget_after_exit(state_dir: str) -> None:
    async def main() -> None:
        sup = Supervisor(state_dir, "tests")
        child = await sup.spawn(["true"], name="quick")
        assert await child.wait() == 0
        sup.forget(child)
        assert sup.children == {}
        assert not os.path.exists(child.state_file)

    run(main())


# --- reaping survivors of an earlier run -----------------------------------------------


def test_reap_orphans_kills_survivors_of_a_previous_run(state_dir: str, pids: list[int]) -> None:
    async def main() -> None:
        previous = Supervisor(state_dir, "svc")
        child = await previous.spawn(["sleep", "60"], name="left-over")
        pids.append(child.pid)
        # "crash": the previous run never stops its child; a new run starts
        current = Supervisor(state_dir, "svc")
        reaped = await current.reap_orphans()
        assert reaped == [f"left-over (pid {child.pid})"]
        assert await asyncio.wait_for(child.wait(), 5) == -signal.SIGKILL
        assert os.listdir(current.proc_dir) == []
        assert await current.reap_orphans() == []

    run(main())


def write_record(sup: Supervisor, name: str, pid: int, start_time: int | None) -> str:
    path = os.path.join(sup.proc_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"argv": ["sleep", "60"], "pid": pid, "start_time": start_time,
                   "name": name}, f)
    return path


def test_reap_orphans_kills_a_process_that_is_not_its_child(state_dir: str,
                                                            pids: list[int]) -> None:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    pids.append(proc.pid)
    try:
        async def main() -> list[str]:
            sup = Supervisor(state_dir, "svc")
            write_record(sup, "outsider", proc.pid, process_start_time(proc.pid))
            return await sup.reap_orphans()

        assert run(main()) == [f"outsider (pid {proc.pid})"]
        assert proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_reap_orphans_skips_a_reused_pid(state_dir: str, pids: list[int]) -> None:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    pids.append(proc.pid)
    try:
        start = process_start_time(proc.pid)
        assert start is not None

        async def main() -> tuple[list[str], str]:
            sup = Supervisor(state_dir, "svc")
            # same pid, different start time: another process got the pid since
            path = write_record(sup, "recycled", proc.pid, start + 1)
            return await sup.reap_orphans(), path

        reaped, path = run(main())
        assert reaped == []
        assert not os.path.exists(path)  # the stale record is dropped
        time.sleep(0.1)
        assert proc.poll() is None  # and the innocent process lives
    finally:
        proc.kill()
        proc.wait()


def test_reap_orphans_drops_records_of_gone_and_corrupt_entries(state_dir: str) -> None:
    async def main() -> list[str]:
        sup = Supervisor(state_dir, "svc")
        write_record(sup, "gone", 2**22 + 12345, 42)
        with open(os.path.join(sup.proc_dir, "corrupt.json"), "w") as f:
            f.write("{not json")
        with open(os.path.join(sup.proc_dir, "nopid.json"), "w") as f:
            json.dump({"name": "x"}, f)
        with open(os.path.join(sup.proc_dir, "README"), "w") as f:
            f.write("not a record")
        reaped = await sup.reap_orphans()
        assert sorted(os.listdir(sup.proc_dir)) == ["README"]
        return reaped

    assert run(main()) == []


def test_reap_orphans_is_per_owner(state_dir: str, pids: list[int]) -> None:
    async def main() -> None:
        other = Supervisor(state_dir, "other-service")
        child = await other.spawn(["sleep", "60"], name="theirs")
        pids.append(child.pid)
        try:
            assert await Supervisor(state_dir, "svc").reap_orphans() == []
            assert alive(child.pid)
        finally:
            await other.aclose(grace=2)

    run(main())


# --- missing programs ------------------------------------------------------------------


@pytest.mark.parametrize("program", ["/nonexistent/metac-test-prog", "metac-no-such-program-x"])
def test_spawn_missing_program_is_missing_dependency(state_dir: str, program: str) -> None:
    async def main() -> errors.MissingDependency:
        sup = Supervisor(state_dir, "tests")
        with pytest.raises(errors.MissingDependency) as info:
            await sup.spawn([program, "--version"], name="missing")
        assert sup.children == {}
        assert os.listdir(sup.proc_dir) == []
        return info.value

    err = run(main())
    assert err.program == program
    assert "install the Debian package" in str(err)
    assert "\n" not in str(err)


def test_require_program() -> None:
    assert os.path.isabs(require_program("sh", "dash"))
    with pytest.raises(errors.MissingDependency) as info:
        require_program("metac-no-such-program-x", "metac-pkg")
    assert info.value.package == "metac-pkg"
    assert str(info.value) == (
        "metac-no-such-program-x not found; install the Debian package 'metac-pkg'")
