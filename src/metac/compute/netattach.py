"""Networks of an environment: a veth pair per entry, bound by the net service.

For each entry of envDescription.networks:

1. ``ip link add mcc<id> type veth peer name NAME netns <init pid>``: the
   environment's side is NAME inside the container's network namespace, the
   node's side ``mcc<id>`` (alias ``metac compute <env id>``) stays in the
   node's namespace. The kernel deletes both when the namespace goes, and
   ``destroy`` deletes them explicitly first.
2. The net service (``rootNamespace().getInterface("mcc<id>")``) gives the
   node's side as an L2Interface: that is ``ProcessEnvironment.network(i)``;
   when the entry names an L2Interface, ``bindTo`` joins the two (a bridge, or
   VXLAN to another node) for as long as the environment lives. Before the
   bind both ends get the tunnel MTU (underlay MTU minus VXLAN overhead), so
   frames from the container fit into the tunnel.
3. Inside the namespace (``nsenter --net``, never setns in this process):
   ``lo`` and NAME up, the addresses, the routes (``ip -batch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
from typing import Any

from metac import errors
from metac.compute.environment import NetAttacher, NetworkSpec
from metac.core.holder import Revert
from metac.core.rpc import rpc_errors
from metac.core.service import ServiceContext
from metac.core.supervisor import Supervisor, require_program
from metac.core.underlay import tunnel_mtu, underlay_mtu
from metac.schema.load import network as net_schema

log = logging.getLogger(__name__)

HOST_IFNAME_PREFIX = "mcc"


def host_ifname() -> str:
    return HOST_IFNAME_PREFIX + secrets.token_hex(5)



def host_side_batch(host: str, name: str, pid: int, env_id: str, mtu: int | None) -> str:
    mtu_opt = f" mtu {mtu}" if mtu else ""
    return (f"link add {host}{mtu_opt} type veth peer name {name}{mtu_opt} netns {pid}\n"
            f'link set dev {host} alias "metac compute {env_id}"\n'
            f"link set dev {host} up\n")


def env_side_batch(spec: NetworkSpec) -> str:
    lines = ["link set dev lo up", f"link set dev {spec.name} up"]
    for address in spec.addresses:
        nodad = " nodad" if ipaddress.ip_interface(address).version == 6 else ""
        lines.append(f"address add {address} dev {spec.name}{nodad}")
    for network, via in spec.routes:
        family = "-6 " if ipaddress.ip_network(network).version == 6 else ""
        gateway = f" via {via}" if via else ""
        lines.append(f"{family}route add {network}{gateway} dev {spec.name}")
    return "\n".join(lines) + "\n"


async def run_ip_batch(supervisor: Supervisor, batch: str, *, netns: str | None,
                       what: str, name: str) -> None:
    """Run ``ip -batch -`` (inside ``netns`` if given); InvalidArgument with ip's message."""
    ip = require_program("ip", "iproute2")
    argv = [ip, "-batch", "-"]
    if netns is not None:
        argv = [require_program("nsenter", "util-linux"), f"--net={netns}", "--", *argv]
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(w, batch.encode())
    finally:
        os.close(w)
    try:
        child = await supervisor.spawn(argv, name=name, stdin=r)
    finally:
        os.close(r)
    try:
        code = await child.wait()
    finally:
        supervisor.forget(child)
    message = ""
    with contextlib.suppress(OSError):
        with open(child.log_path, encoding="utf-8", errors="replace") as f:
            message = " ".join(line.strip() for line in f.read().splitlines()
                               if line.strip() and not line.startswith("Command failed"))
        os.unlink(child.log_path)
    if code != 0:
        raise errors.InvalidArgument(f"cannot {what}: {message[:300] or f'ip exited {code}'}")



class CapabilityNet(NetAttacher):
    """Attaches networks with ``ip`` and this node's net service."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._count = 0
        self._mtu: int | None = None

    async def _namespace(self) -> Any:
        async with rpc_errors():
            admin = (await self._ctx.node_admin.getServiceAdmin("net")).service
            return admin.cast_as(net_schema.NetworkServiceAdmin).rootNamespace().ns

    async def _tunnel_mtu(self) -> int:
        if self._mtu is None:
            address = self._ctx.env.node_address
            # pyroute2 runs its own event loop: keep it off ours.
            underlay = await asyncio.get_running_loop().run_in_executor(
                None, underlay_mtu, address)
            self._mtu = tunnel_mtu(underlay, address)
        return self._mtu

    async def attach(self, netns: str, spec: NetworkSpec, revert: Revert,
                     env: Any = None) -> Any:
        env_id = env.id if env is not None else ""
        pid = int(netns.split("/")[2])
        self._count += 1
        host = host_ifname()
        if env is not None:
            env.host_ifnames.add(host)
        mtu = await self._tunnel_mtu() if spec.l2interface is not None else None
        sup = self._ctx.supervisor
        await run_ip_batch(sup, host_side_batch(host, spec.name, pid, env_id, mtu), netns=None,
                           what=f"create network {spec.name}", name=f"ip-{host}")

        async def delete() -> None:
            with contextlib.suppress(errors.MetacError):
                await run_ip_batch(sup, f"link delete dev {host}\n", netns=None,
                                   what=f"delete {host}", name=f"ip-del-{host}")

        revert.add(delete, f"delete {host}")
        await run_ip_batch(sup, env_side_batch(spec), netns=netns,
                           what=f"configure network {spec.name}", name=f"ip-env-{host}")
        ns = await self._namespace()
        async with rpc_errors():
            iface = ns.getInterface(host).iface
            l2 = (await iface.l2Interface()).iface
            if spec.l2interface is not None:
                holder = (await l2.bindTo(spec.l2interface)).holder
                revert.add(holder.release, f"unbind {spec.name}")
        return l2

