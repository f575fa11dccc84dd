"""Client side of the protocol: connect to nodes, restore sturdy refs.

``NodePool`` keeps one TCP connection per remote node for as long as the
capabilities restored through it are in use, and closes them all in ``aclose``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from metac import errors
from metac.codec.refs import DEFAULT_PORT, SturdyRef, node_port, show_endpoint
from metac.core.rpc import Connection, connect_tcp, rpc_errors
from metac.schema import kinds
from metac.schema.load import core


def ref_from_struct(msg: Any) -> SturdyRef:
    """A MetacSturdyRef message as a SturdyRef value."""
    port = msg.node.port or None
    return SturdyRef.from_parts(msg.node.ip, port, msg.service, bytes(msg.objectInfo))


def ref_to_struct(ref: SturdyRef) -> Any:
    msg = core.MetacSturdyRef.new_message()
    msg.node.ip = ref.node
    msg.node.port = ref.port or 0
    msg.service = ref.service
    msg.objectInfo = ref.secret_bytes
    return msg


#: Told once about a wait still going after SLOW_AFTER seconds ("connecting to node
#: 192.0.2.1:901"); the CLI prints it (cli/output.slow_notice). None: nobody is told.
on_slow: Callable[[str], None] | None = None
SLOW_AFTER = 1.0


@contextlib.contextmanager
def telling_if_slow(what: str) -> Iterator[None]:
    """Call :data:`on_slow` with ``what`` if the block is still running after SLOW_AFTER s."""
    hook = on_slow
    if hook is None:
        yield
        return
    handle = asyncio.get_running_loop().call_later(SLOW_AFTER, hook, what)
    try:
        yield
    finally:
        handle.cancel()


class NodePool:
    """Open connections to nodes (by address), reused and closed together."""

    def __init__(self, connect_timeout: float = 10.0) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._nodes: dict[tuple[str, int], tuple[Connection, Any]] = {}
        self._connecting: dict[tuple[str, int], asyncio.Lock] = {}
        self._timeout = connect_timeout

    async def node(self, ip: str, port: int | None = None) -> Any:
        key = (ip, port or DEFAULT_PORT)
        entry = self._nodes.get(key)
        if entry is None:
            # One connect per node even when many calls want it at once.
            lock = self._connecting.setdefault(key, asyncio.Lock())
            async with lock:
                entry = self._nodes.get(key)
                if entry is None:
                    conn = await self._stack.enter_async_context(
                        connect_tcp(key[0], key[1], timeout=self._timeout))
                    entry = self._nodes[key] = (conn, conn.bootstrap(core.Node))
            if self._connecting.get(key) is lock and not lock.locked():
                del self._connecting[key]
        return entry[1]

    def forget(self, ip: str, port: int | None = None) -> None:
        """Drop a broken connection so the next call reconnects."""
        entry = self._nodes.pop((ip, port or DEFAULT_PORT), None)
        if entry is not None:
            entry[0].close()

    async def restore(self, ref: SturdyRef, interface: Any = None) -> Any:
        """Restore ``ref`` from its node; the capability, cast to ``interface``
        (InvalidArgument naming the kind it is if it is not one)."""
        return (await self.restore_with_kind(ref, interface))[0]

    async def restore_with_kind(self, ref: SturdyRef, interface: Any = None
                                ) -> tuple[Any, str | None]:
        """``restore``, and the name of the object's interface (None if the node did not
        say)."""
        port = node_port(ref.port)
        shown = show_endpoint(ref.node, port)
        try:
            with telling_if_slow(f"connecting to node {shown} …"):
                node = await self.node(ref.node, ref.port)
                async with rpc_errors():
                    service = node.getService(ref.service).service
                    res = await service.restore(ref.secret_bytes)
        except errors.Unavailable:
            self.forget(ref.node, ref.port)
            raise
        if interface is not None:
            kinds.check_kind(res.interfaceId, interface)
        obj = res.obj.as_interface(interface or core.Persistable)
        return obj, kinds.name_of(res.interfaceId)

    async def drop_alias(self, ref: SturdyRef) -> None:
        """Revoke an alias ``ref`` (see Persistable.createSturdyRef) on its node."""
        node = await self.node(ref.node, ref.port)
        async with rpc_errors():
            service = node.getService(ref.service).service
            await service.dropAlias(ref.secret_bytes)

    async def aclose(self) -> None:
        self._nodes.clear()
        await self._stack.aclose()

    async def __aenter__(self) -> NodePool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
