"""Tests for metac.core.holder: Revert stacks and HolderServer release (in-process RPC)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from typing import Any

import capnp
import pytest

from metac import errors
from metac.core import holder as holder_mod
from metac.core.holder import HolderServer, Revert
from metac.core.rpc import Servant
from metac.schema.load import core, demo
from metac.testing.inproc import Pair, eventually, run


@pytest.fixture
def no_gc() -> Any:
    """Run with the cyclic garbage collector off: release must come from refcounts."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class HolderFactory(Servant, demo.Box.Server):
    """Box.get hands out a fresh holder each time (Holder extends Persistable)."""

    def __init__(self, undo: Callable[[], Any]) -> None:
        self._undo = undo

    async def get(self, _context: Any, **kwargs: Any) -> None:
        _context.results.cap = HolderServer(self._undo, "test action")

    async def label(self, **kwargs: Any) -> str:
        return "factory"


# --- Revert ----------------------------------------------------------------------------


def test_revert_runs_steps_in_reverse_order() -> None:
    done: list[str] = []

    async def async_step() -> None:
        await asyncio.sleep(0)
        done.append("b")

    async def main() -> None:
        r = Revert()
        r.add(lambda: done.append("a"), "a")
        r.add(async_step)
        r.add(lambda: done.append("c"), "c")
        await r.aclose()

    run(main())
    assert done == ["c", "b", "a"]


def test_revert_continues_after_a_failing_step(caplog: pytest.LogCaptureFixture) -> None:
    done: list[str] = []

    def broken() -> None:
        raise RuntimeError("undo failed")

    async def broken_async() -> None:
        raise OSError("async undo failed")

    async def main() -> None:
        r = Revert()
        r.add(lambda: done.append("first"), "first")
        r.add(broken, "broken step")
        r.add(broken_async, "broken async step")
        r.add(lambda: done.append("last"), "last")
        await r.aclose()

    with caplog.at_level(logging.ERROR, logger="metac.core.holder"):
        run(main())
    assert done == ["last", "first"]
    messages = [rec.getMessage() for rec in caplog.records]
    assert "undo step broken step failed" in messages
    assert "undo step broken async step failed" in messages


def test_revert_runs_each_step_once_and_refuses_new_steps() -> None:
    done: list[str] = []

    async def main() -> None:
        r = Revert()
        r.add(lambda: done.append("x"))
        await r.aclose()
        await r.aclose()
        with pytest.raises(RuntimeError):
            r.add(lambda: done.append("late"))

    run(main())
    assert done == ["x"]


def test_revert_context_manager_undoes_on_failure() -> None:
    done: list[str] = []

    async def main() -> None:
        with pytest.raises(ValueError):
            async with Revert() as r:
                r.add(lambda: done.append("step 1"))
                r.add(lambda: done.append("step 2"))
                raise ValueError("step 3 failed")

    run(main())
    assert done == ["step 2", "step 1"]


def test_revert_pop_all_hands_steps_over() -> None:
    done: list[str] = []

    async def main() -> None:
        async with Revert() as r:
            r.add(lambda: done.append("a"))
            r.add(lambda: done.append("b"))
            kept = r.pop_all()  # setup succeeded
        assert done == []
        await kept.aclose()

    run(main())
    assert done == ["b", "a"]


# --- HolderServer: explicit release -----------------------------------------------------


def test_release_runs_undo_once() -> None:
    calls: list[str] = []

    async def main() -> None:
        server = HolderServer(lambda: calls.append("undo"), "action")
        client = core.Holder._new_client(server)
        assert server.active
        await client.release()
        assert calls == ["undo"]
        assert server.released.is_set() and not server.active
        await client.release()
        await server.close()
        del client, server
        gc.collect()
        await asyncio.sleep(0.05)

    run(main())
    assert calls == ["undo"]


def test_release_runs_a_revert_stack_in_reverse() -> None:
    calls: list[str] = []

    async def main() -> None:
        stack = Revert()
        stack.add(lambda: calls.append("made link"))
        stack.add(lambda: calls.append("mounted"))
        client = core.Holder._new_client(HolderServer(stack, "mount"))
        await client.release()

    run(main())
    assert calls == ["mounted", "made link"]


def test_release_over_a_connection_then_drop_runs_undo_once() -> None:
    calls: list[str] = []

    async def main() -> None:
        pair = await Pair().open(HolderFactory(lambda: calls.append("undo")))
        try:
            factory = pair.bootstrap(demo.Box)
            h = (await factory.get()).cap.cast_as(core.Holder)
            await h.release()
            assert calls == ["undo"]
            await h.release()
            del h
            await asyncio.sleep(0.1)
            gc.collect()
            await asyncio.sleep(0.1)
        finally:
            await pair.close()

    run(main())
    assert calls == ["undo"]


def test_holder_is_not_persistable() -> None:
    async def main() -> errors.MetacError:
        client = core.Holder._new_client(HolderServer(lambda: None, "a tunnel"))
        try:
            await client.createSturdyRef(persistent=True)
        except capnp.KjException as exc:
            return errors.from_kj(exc)
        raise AssertionError("createSturdyRef succeeded")

    err = run(main())
    assert type(err) is errors.Unsupported
    assert str(err) == "a tunnel cannot be made persistent"


# --- HolderServer: dropped references ---------------------------------------------------


@pytest.mark.usefixtures("no_gc")
def test_dropping_the_last_local_reference_runs_undo() -> None:
    calls: list[str] = []

    async def main() -> None:
        client = core.Holder._new_client(HolderServer(lambda: calls.append("undo"), "a"))
        other = client  # a second Python reference to the same capability
        del client
        await asyncio.sleep(0.05)
        assert calls == []
        del other
        await eventually(lambda: calls == ["undo"])
        await holder_mod.drain_background()

    run(main())
    assert calls == ["undo"]


@pytest.mark.usefixtures("no_gc")
def test_dropping_the_last_remote_reference_runs_undo() -> None:
    calls: list[str] = []

    async def main() -> None:
        pair = await Pair().open(HolderFactory(lambda: calls.append("undo")))
        try:
            factory = pair.bootstrap(demo.Box)
            h1 = (await factory.get()).cap.cast_as(core.Holder)
            h2 = (await factory.get()).cap.cast_as(core.Holder)
            del h1
            await eventually(lambda: calls == ["undo"])
            await asyncio.sleep(0.1)
            assert calls == ["undo"]  # h2 is still held
            del h2
            await eventually(lambda: calls == ["undo", "undo"])
        finally:
            await pair.close()

    run(main())


@pytest.mark.usefixtures("no_gc")
def test_connection_end_runs_undo_of_every_holder() -> None:
    calls: list[str] = []

    async def main() -> None:
        pair = await Pair().open(HolderFactory(lambda: calls.append("undo")))
        try:
            factory = pair.bootstrap(demo.Box)
            held = [(await factory.get()).cap.cast_as(core.Holder) for _ in range(3)]
            await asyncio.sleep(0.05)
            assert calls == []
            pair.close_client()  # the client goes away; it still "holds" the caps
            await asyncio.wait_for(pair.server.on_disconnect(), 3)
            await eventually(lambda: len(calls) == 3)
            del held
        finally:
            await pair.close()

    run(main())
    assert calls == ["undo"] * 3


@pytest.mark.usefixtures("no_gc")
def test_async_undo_from_a_dropped_holder_is_drained() -> None:
    calls: list[str] = []

    async def slow_undo() -> None:
        await asyncio.sleep(0.2)
        calls.append("undone")

    async def main() -> None:
        client = core.Holder._new_client(HolderServer(slow_undo, "slow"))
        del client
        await asyncio.sleep(0)
        await holder_mod.drain_background(timeout=5)
        assert calls == ["undone"]

    run(main())
