"""core.membrane in-process: proxies per interface, revocation, children, wrapped results."""

from __future__ import annotations

from typing import Any

import capnp
import pytest

from metac import errors
from metac.core.holder import HolderServer
from metac.core.membrane import Membranes, _protocol_interfaces, proxy_class, widest
from metac.core.rpc import Servant
from metac.schema.load import core, demo, network, stream
from metac.testing.inproc import Pair, eventually, run


def test_every_protocol_interface_has_a_proxy_class() -> None:
    interfaces = _protocol_interfaces()
    assert len(interfaces) > 30
    for schema in interfaces:
        assert proxy_class(schema).schema.node.id == schema.node.id


def test_a_result_is_served_as_the_most_derived_interface_of_one_chain() -> None:
    assert widest(core.Holder.schema).node.id == network.WaitableHolder.schema.node.id
    assert widest(stream.Stream.schema).node.id == stream.Stream.schema.node.id
    assert widest(core.Waitable.schema).node.id == core.Waitable.schema.node.id  # no chain


class Counter(Servant, demo.Counter.Server):
    def __init__(self) -> None:
        self.n = 0
        self.minted: list[bool] = []

    async def increment(self, by: int, **kwargs: Any) -> int:
        self.n += by
        return self.n

    async def value(self, **kwargs: Any) -> int:
        return self.n

    async def createSturdyRef(self, persistent: bool, _context: Any, **kwargs: Any) -> None:
        self.minted.append(bool(persistent))
        _context.results.id.service = "demo"
        _context.results.id.objectInfo = b"s" * 16


class Listener(Servant, stream.Stream.Server):
    """tcpListen hands out a holder; released ones are counted."""

    def __init__(self) -> None:
        self.released = 0

    async def tcpListen(self, remote: Any, remotePort: int, _context: Any, **kwargs: Any) -> None:
        def undo() -> None:
            self.released += 1

        _context.results.port = remotePort + 1
        _context.results.holder = HolderServer(undo, "listen")


def _category(exc: pytest.ExceptionInfo[Any]) -> str:
    return errors.from_kj(exc.value).category


def test_proxy_forwards_until_revoked_then_answers_not_found() -> None:
    adopted: list[tuple[bytes, bool]] = []

    async def adopt(parent: bytes, ref: Any, alias: bool) -> None:
        adopted.append((parent, alias))

    async def main() -> None:
        membranes = Membranes(adopt)
        counter = Counter()
        target = demo.Counter._new_client(counter)
        proxy = membranes.wrap(b"k" * 32, False, target, demo.Counter.schema)
        pair = await Pair().open(proxy)
        try:
            client = pair.bootstrap(demo.Counter)
            assert (await client.increment(2)).value == 2
            assert (await client.value()).value == 2
            # A holder of a non-persistent ref: its child is not persistent either.
            await client.createSturdyRef(persistent=True)
            await client.createSturdyRef(persistent=False, alias=True)
            assert counter.minted == [False, False]
            assert adopted == [(b"k" * 32, False), (b"k" * 32, True)]

            assert membranes.revoke([b"k" * 32]) == 1
            with pytest.raises(capnp.KjException) as exc:
                await client.value()
            assert _category(exc) == "NotFound"
            with pytest.raises(errors.NotFound):  # a restore racing the revocation
                membranes.wrap(b"k" * 32, False, target, demo.Counter.schema)
            assert counter.n == 2
        finally:
            await pair.close()
        await membranes.aclose()

    run(main())


def test_holders_obtained_through_a_ref_are_released_with_it() -> None:
    async def adopt(parent: bytes, ref: Any, alias: bool) -> None:
        pass

    async def main() -> None:
        membranes = Membranes(adopt)
        listener = Listener()
        proxy = membranes.wrap(b"r" * 32, True, stream.Stream._new_client(listener),
                               stream.Stream.schema)
        pair = await Pair().open(proxy)
        try:
            client = pair.bootstrap(stream.Stream)
            res = await client.tcpListen(remote={"ip": "192.0.2.1"}, remotePort=7)
            assert res.port == 8
            holder = res.holder  # the caller keeps it: only revocation releases it
            assert listener.released == 0
            assert membranes.revoke([b"r" * 32]) == 2  # the stream and the holder
            await eventually(lambda: listener.released == 1)
            with pytest.raises(capnp.KjException) as exc:
                await holder.release()
            assert _category(exc) == "NotFound"
        finally:
            await pair.close()
        await membranes.aclose()

    run(main())
