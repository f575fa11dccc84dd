"""A VM's NICs: a tap device per entry, bound by the net service.

For each LaunchConfiguration.networks entry:

1. ``ip tuntap add mcq<hex> mode tap`` in the node's namespace (alias ``metac vm
   <id>``), up; QEMU attaches to it by name (``script=no``: no helper scripts).
2. The net service (``rootNamespace().getInterface("mcq<hex>")``) gives it as an
   L2Interface: that is ``VM.network(i)``. When the entry names an L2Interface,
   ``bindTo`` joins the two (a bridge, or VXLAN to another node) while the VM
   lives; the tap (and the guest, through virtio-net's ``host_mtu``) then gets
   the tunnel MTU so the guest's frames fit into the tunnel.
3. Undo: release the bind, delete the tap. ``sweep`` deletes taps and releases
   binds an earlier run left (after a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from typing import Any

from metac import errors
from metac.core.holder import Revert
from metac.core.rpc import rpc_errors
from metac.core.service import ServiceContext
from metac.core.supervisor import Supervisor, require_program
from metac.core.underlay import tunnel_mtu, underlay_mtu
from metac.core.untrusted import bounded
from metac.schema.load import network as net_schema

log = logging.getLogger(__name__)

TAP_PREFIX = "mcq"  # (mcv, mcb, mcp: the net service; mcc: compute)


def tap_name() -> str:
    return TAP_PREFIX + secrets.token_hex(5)


def random_mac() -> str:
    """A locally administered unicast MAC in QEMU's 52:54:00 range."""
    tail = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)




async def run_ip(supervisor: Supervisor, args: list[str], what: str, name: str) -> None:
    ip = require_program("ip", "iproute2")
    child = await supervisor.spawn([ip, *args], name=name)
    try:
        code = await child.wait()
    finally:
        supervisor.forget(child)
    message = ""
    with contextlib.suppress(OSError):
        with open(child.log_path, encoding="utf-8", errors="replace") as f:
            message = " ".join(line.strip() for line in f if line.strip())
        os.unlink(child.log_path)
    if code != 0:
        raise errors.FailedPrecondition(f"cannot {what}: {message[:300] or f'ip exited {code}'}")


class TapNetworks:
    """Creates, binds and deletes the taps of this service's VMs."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._mtu: int | None = None

    async def _namespace(self) -> Any:
        async with rpc_errors():
            admin = (await self._ctx.node_admin.getServiceAdmin("net")).service
            return admin.cast_as(net_schema.NetworkServiceAdmin).rootNamespace().ns

    async def _tunnel_mtu(self) -> int:
        if self._mtu is None:
            address = self._ctx.env.node_address
            underlay = await asyncio.get_running_loop().run_in_executor(
                None, underlay_mtu, address)
            self._mtu = tunnel_mtu(underlay, address)
        return self._mtu

    async def attach(self, vm_id: str, index: int, given: Any, revert: Revert
                     ) -> tuple[str, Any, int | None]:
        """A new tap for NIC ``index``: (its name, its L2Interface, the MTU to use)."""
        sup = self._ctx.supervisor
        name = tap_name()
        await run_ip(sup, ["tuntap", "add", "dev", name, "mode", "tap"],
                     f"create tap device {name}", f"ip-{name}")

        async def delete() -> None:
            with contextlib.suppress(errors.MetacError):
                await run_ip(sup, ["link", "delete", "dev", name], f"delete {name}",
                             f"ip-del-{name}")

        revert.add(delete, f"delete {name}")
        mtu = await self._tunnel_mtu() if given is not None else None
        args = ["link", "set", "dev", name, "alias", f"metac vm {vm_id} nic {index}"]
        if mtu:
            args += ["mtu", str(mtu)]
        await run_ip(sup, [*args, "up"], f"set up {name}", f"ip-up-{name}")
        ns = await self._namespace()
        async with rpc_errors():
            l2 = (await ns.getInterface(name).iface.l2Interface()).iface
        if given is not None:
            holder = (await bounded(l2.bindTo(given), f"binding NIC {index}")).holder
            revert.add(holder.release, f"unbind NIC {index}")
        return name, l2, mtu

    async def sweep(self, live: set[str]) -> None:
        """Delete taps and release binds an earlier run of this service left."""
        with contextlib.suppress(errors.MetacError, OSError):
            # if_nameindex asks this network namespace (/sys/class/net may show another).
            for _, name in socket.if_nameindex():
                if name.startswith(TAP_PREFIX) and name not in live:
                    log.info("deleting leftover tap %s", name)
                    await run_ip(self._ctx.supervisor, ["link", "delete", "dev", name],
                                 f"delete {name}", f"ip-sweep-{name}")
        with contextlib.suppress(Exception):
            async with rpc_errors():
                admin = (await self._ctx.node_admin.getServiceAdmin("net")).service
                admin = admin.cast_as(net_schema.NetworkServiceAdmin)
                binds = (await admin.listBinds()).binds
            for b in binds:
                if b.device.startswith(TAP_PREFIX) and b.device not in live:
                    log.info("releasing leftover bind of %s", b.device)
                    await b.holder.release()
