"""The Python API (the CLI is built on it).

Example::

    import asyncio, capnp
    from metac import api

    async def main():
        async with api.connect_admin() as admin:          # local node, as root
            status = await admin.listServices()
        async with api.NodePool() as pool:                # any node, as anybody
            counter = await pool.restore(api.SturdyRef.parse("ref://[fd00::1]/demo/..."),
                                         api.schema.demo.Counter)
            print((await counter.increment(1)).value)

    asyncio.run(capnp.run(main()))
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from metac.codec.refs import RefError, SturdyRef
from metac.core import paths
from metac.core.client import NodePool, ref_from_struct, ref_to_struct, telling_if_slow
from metac.core.rpc import connect_tcp, connect_unix, rpc_errors
from metac.schema import load as schema

__all__ = [
    "NodePool",
    "RefError",
    "SturdyRef",
    "connect_admin",
    "connect_node",
    "ref_from_struct",
    "ref_to_struct",
    "rpc_errors",
    "schema",
    "service_admin",
]


@contextlib.asynccontextmanager
async def connect_admin(runtime_dir: str | None = None) -> AsyncIterator[Any]:
    """NodeAdmin of the local node (root only), selected by runtime dir."""
    path = paths.admin_socket(paths.runtime_dir(runtime_dir))
    async with connect_unix(path) as conn:
        yield conn.bootstrap(schema.core.NodeAdmin)


@contextlib.asynccontextmanager
async def connect_node(address: str, port: int = 901) -> AsyncIterator[Any]:
    """The unprivileged Node of any node, over TCP."""
    async with connect_tcp(address, port) as conn:
        yield conn.bootstrap(schema.core.Node)


async def service_admin(admin: Any, name: str, interface: Any) -> Any:
    """A service's admin interface, from NodeAdmin (which waits for a restarting one)."""
    with telling_if_slow(f"waiting for the {name} service of this node …"):
        async with rpc_errors():
            res = await admin.getServiceAdmin(name)
    return res.service.cast_as(interface)
