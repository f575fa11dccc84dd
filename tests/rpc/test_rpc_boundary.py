"""Tests for the error boundary and plumbing of metac.core.rpc (in-process, loopback only)."""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
from typing import Any

import capnp
import pytest

from metac import errors
from metac.core.holder import HolderServer
from metac.core.rpc import (
    Peer,
    Servant,
    connect_tcp,
    connect_unix,
    rpc_errors,
    serve_tcp,
    serve_unix,
)
from metac.schema.load import core, demo
from metac.testing.inproc import Pair, eventually, run

SECRET_DETAIL = "db password hunter2 at /etc/metac/private.conf"


class FailingCounter(Servant, demo.Counter.Server):
    """value: NotFound; increment: a bug (plain exception); name: fine."""

    def __init__(self) -> None:
        self.calls = 0

    async def value(self, **kwargs: Any) -> int:
        raise errors.NotFound("no such counter 'c1'")

    async def increment(self, by: int, **kwargs: Any) -> int:
        self.calls += 1
        if by < 0:
            raise errors.InvalidArgument("by must not be negative")
        raise KeyError(SECRET_DETAIL)

    async def name(self, **kwargs: Any) -> str:
        return "c1"

    def _helper(self) -> str:
        return "not wrapped"


class Relay(Servant, demo.Box.Server):
    """A server that calls another capability: its errors are passed on, not made Internal."""

    def __init__(self, counter: Any) -> None:
        self._counter = counter

    async def label(self, **kwargs: Any) -> str:
        return str((await self._counter.value()).value)

    async def get(self, _context: Any, **kwargs: Any) -> None:
        await self._counter.increment(1)


async def call_error(call: Any) -> capnp.KjException:
    try:
        await call
    except capnp.KjException as exc:
        return exc
    raise AssertionError("call succeeded")


def assert_no_internals(text: str) -> None:
    assert "Traceback" not in text
    assert "File \"" not in text
    assert ".py" not in text
    assert "hunter2" not in text and "/etc/metac" not in text
    assert "KeyError" not in text


# --- the Servant boundary --------------------------------------------------------------


def test_metac_error_round_trips_over_a_connection() -> None:
    async def main() -> capnp.KjException:
        pair = await Pair().open(FailingCounter())
        try:
            return await call_error(pair.bootstrap(demo.Counter).value())
        finally:
            await pair.close()

    exc = run(main())
    assert isinstance(exc, capnp.KjException)
    err = errors.from_kj(exc)
    assert type(err) is errors.NotFound
    assert str(err) == "no such counter 'c1'"
    assert_no_internals(exc.description)


def test_metac_error_round_trips_in_process() -> None:
    async def main() -> capnp.KjException:
        return await call_error(demo.Counter._new_client(FailingCounter()).increment(-1))

    err = errors.from_kj(run(main()))
    assert type(err) is errors.InvalidArgument
    assert str(err) == "by must not be negative"


def test_plain_exception_becomes_internal_incident(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> capnp.KjException:
        pair = await Pair().open(FailingCounter())
        try:
            return await call_error(pair.bootstrap(demo.Counter).increment(1))
        finally:
            await pair.close()

    with caplog.at_level(logging.ERROR, logger="metac.core.rpc"):
        exc = run(main())
    text = exc.description
    assert_no_internals(text)
    err = errors.from_kj(exc)
    assert type(err) is errors.Internal
    m = re.fullmatch(r"incident ([0-9a-f]{8})", str(err))
    assert m, str(err)
    # the server log has the same incident id and the real traceback
    records = [r for r in caplog.records if m.group(1) in r.getMessage()]
    assert len(records) == 1
    assert "FailingCounter.increment" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert records[0].exc_info[0] is KeyError


def test_incident_ids_differ() -> None:
    async def main() -> list[str]:
        client = demo.Counter._new_client(FailingCounter())
        return [str(errors.from_kj(await call_error(client.increment(1)))) for _ in range(3)]

    ids = run(main())
    assert len(set(ids)) == 3


def test_errors_of_calls_made_by_a_server_are_passed_on() -> None:
    async def main() -> tuple[errors.MetacError, errors.MetacError]:
        inner = await Pair().open(FailingCounter())
        outer = await Pair().open(Relay(inner.bootstrap(demo.Counter)))
        try:
            box = outer.bootstrap(demo.Box)
            not_found = errors.from_kj(await call_error(box.label()))
            internal = errors.from_kj(await call_error(box.get()))
            return not_found, internal
        finally:
            await outer.close()
            await inner.close()

    not_found, internal = run(main())
    assert type(not_found) is errors.NotFound
    assert str(not_found) == "no such counter 'c1'"
    assert type(internal) is errors.Internal
    assert re.fullmatch(r"incident [0-9a-f]{8}", str(internal))


def test_server_keeps_serving_after_errors() -> None:
    async def main() -> str:
        server = FailingCounter()
        pair = await Pair().open(server)
        try:
            client = pair.bootstrap(demo.Counter)
            for _ in range(3):
                await call_error(client.increment(1))
                await call_error(client.value())
            assert server.calls == 3
            return (await client.name()).name
        finally:
            await pair.close()

    assert run(main()) == "c1"


def test_rpc_errors_context_manager() -> None:
    async def main() -> None:
        client = demo.Counter._new_client(FailingCounter())
        with pytest.raises(errors.NotFound, match="no such counter"):
            async with rpc_errors():
                await client.value()

    run(main())


def test_only_public_coroutines_are_wrapped() -> None:
    assert getattr(FailingCounter.value, "__wrapped__", None) is not None
    assert getattr(FailingCounter._helper, "__wrapped__", None) is None

    class Sub(FailingCounter):
        pass

    # inherited methods are not wrapped a second time
    assert Sub.value is FailingCounter.value


# --- serve_* / connect_* ---------------------------------------------------------------


class Tracker(Servant, demo.Box.Server):
    """Bootstrap per connection: hands out holders, records its disconnect."""

    def __init__(self, peer: Peer, log: list[Any]) -> None:
        self.peer = peer
        self._log = log

    async def label(self, **kwargs: Any) -> str:
        return f"{self.peer.kind} {self.peer.address}"

    async def get(self, _context: Any, **kwargs: Any) -> None:
        _context.results.cap = HolderServer(lambda: self._log.append("undo"), "held")

    def _disconnected(self) -> None:
        self._log.append(("disconnected", self.peer.kind))


def test_tcp_serve_connect_and_disconnect_hook() -> None:
    events: list[Any] = []

    async def main() -> str:
        server = await serve_tcp("127.0.0.1", 0, lambda peer: Tracker(peer, events))
        try:
            port = server.sock.getsockname()[1]
            async with connect_tcp("127.0.0.1", port) as conn:
                box = conn.bootstrap(demo.Box)
                label = (await box.label()).label
                held = (await box.get()).cap
            # leaving the block ends the connection although `held` is still referenced
            await eventually(lambda: ("disconnected", "tcp") in events and "undo" in events)
            del held
            return label
        finally:
            await server.aclose()

    assert run(main()) == "tcp 127.0.0.1"


def test_connect_tcp_refused_is_unavailable() -> None:
    # A port that was just free: nothing listens there.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> None:
        with pytest.raises(errors.Unavailable, match=f"cannot reach node 127.0.0.1:{port}"):
            async with connect_tcp("127.0.0.1", port):
                pass

    run(main())


def test_serve_unix_is_root_only_and_calls_work(tmp_path) -> None:
    path = str(tmp_path / "socket")
    events: list[Any] = []

    async def main() -> str:
        server = await serve_unix(path, lambda peer: Tracker(peer, events))
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            async with connect_unix(path) as conn:
                return (await conn.bootstrap(demo.Box).label()).label
        finally:
            server.close()
            await server.wait_closed()

    assert run(main()) == "unix "


def test_connect_unix_without_node_is_unavailable(tmp_path) -> None:
    async def main() -> None:
        with pytest.raises(errors.Unavailable, match="no node is running here"):
            async with connect_unix(str(tmp_path / "missing")):
                pass

    run(main())


def test_connect_unix_exit_ends_the_connection(tmp_path) -> None:
    path = str(tmp_path / "socket")
    events: list[Any] = []

    async def main() -> None:
        server = await serve_unix(path, lambda peer: Tracker(peer, events))
        held = None
        try:
            async with connect_unix(path) as conn:
                held = (await conn.bootstrap(demo.Box).get()).cap
            await eventually(lambda: ("disconnected", "unix") in events, timeout=1.0)
            assert "undo" in events
        finally:
            del held
            server.close()
            await server.wait_closed()

    run(main())


def test_sequential_tcp_connections_in_one_loop() -> None:
    events: list[Any] = []

    async def main() -> list[str]:
        server = await serve_tcp("127.0.0.1", 0, lambda peer: Tracker(peer, events))
        labels = []
        try:
            port = server.sock.getsockname()[1]
            for _ in range(3):
                async with connect_tcp("127.0.0.1", port) as conn:
                    labels.append((await conn.bootstrap(demo.Box).label()).label)
        finally:
            await server.aclose()
        return labels

    assert run(main()) == ["tcp 127.0.0.1"] * 3


def test_unimplemented_method_is_unsupported_without_traceback() -> None:
    class Partial(Servant, demo.Counter.Server):
        async def name(self, **kwargs: Any) -> str:
            return "partial"

    async def main() -> capnp.KjException:
        pair = await Pair().open(Partial())
        try:
            return await call_error(pair.bootstrap(demo.Counter).value())
        finally:
            await pair.close()

    exc = run(main())
    assert "Traceback" not in exc.description
    assert type(errors.from_kj(exc)) is errors.Unsupported


def test_core_schema_is_loaded() -> None:
    # Holder extends Persistable: the boundary tests above rely on it.
    assert "release" in core.Holder.schema.method_names
