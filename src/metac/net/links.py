"""Kernel links through pyroute2 (netlink): veth pairs, bridges, VXLAN devices, markers.

Every link the network service creates carries a marker in its ``ifalias``,
``managed by metac net/<owner>/<role>``, so that ``sweep`` can find and remove
what an earlier run left behind. Roles: ``dev`` (a device made by
createInterface, the name the user sees), ``peer`` (its hidden veth peer, the
end that is bridged), ``bridge`` and ``vxlan`` (infrastructure of one bind or
tunnel end).

All netlink calls run in one worker thread (``Netlink.run``) holding one
``IPRoute`` socket, opened in the service's own network namespace; nothing here
calls setns. (``Netlink(netns=NAME)`` opens the socket in another namespace
through pyroute2's helper child, which does the setns and passes the socket
back; tests use it.) The ``*_sync`` helpers are plain functions of that
socket, so they can be read (and tested) without the thread.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from metac import errors

log = logging.getLogger(__name__)

MARKER_PREFIX = "managed by metac net/"
ROLES = frozenset({"dev", "peer", "bridge", "vxlan"})
#: Roles of links that only exist as part of a bind or tunnel (never kept across restarts).
INFRASTRUCTURE = frozenset({"peer", "bridge", "vxlan"})
IFF_UP = 0x1

T = TypeVar("T")


@dataclass(frozen=True)
class Marker:
    """What a link's ifalias says about who made it."""

    owner: str
    role: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown marker role {self.role!r}")
        if not self.owner or not self.owner.isalnum():
            raise ValueError("marker owner must be a non-empty alphanumeric id")

    def format(self) -> str:
        return f"{MARKER_PREFIX}{self.owner}/{self.role}"

    @classmethod
    def parse(cls, alias: str | None) -> Marker | None:
        """The marker in ``alias``, or None if the link is not ours."""
        if not alias or not alias.startswith(MARKER_PREFIX):
            return None
        owner, sep, role = alias[len(MARKER_PREFIX):].partition("/")
        try:
            return cls(owner, role) if sep else None
        except ValueError:
            return None


@dataclass(frozen=True)
class Link:
    """A snapshot of one kernel link."""

    index: int
    name: str
    kind: str = ""
    alias: str = ""
    master: int = 0
    mtu: int = 1500
    up: bool = False
    peer_index: int = 0  # veth: the other end (IFLA_LINK)
    vxlan_port: int = 0  # vxlan: the local UDP port

    @property
    def marker(self) -> Marker | None:
        return Marker.parse(self.alias)


def _nested(msg: Any, *names: str) -> Any:
    node = msg
    for name in names:
        if node is None:
            return None
        node = node.get_attr(name)
    return node


def link_from_msg(msg: Any) -> Link:
    kind = _nested(msg, "IFLA_LINKINFO", "IFLA_INFO_KIND") or ""
    port = 0
    if kind == "vxlan":
        port = _nested(msg, "IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_VXLAN_PORT") or 0
    return Link(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME") or "",
        kind=kind,
        alias=msg.get_attr("IFLA_IFALIAS") or "",
        master=msg.get_attr("IFLA_MASTER") or 0,
        mtu=msg.get_attr("IFLA_MTU") or 0,
        up=bool(msg["flags"] & IFF_UP),
        peer_index=(msg.get_attr("IFLA_LINK") or 0) if kind == "veth" else 0,
        vxlan_port=port,
    )


# --------------------------------------------------------------------------- sync helpers


def dump_links_sync(ipr: Any) -> list[Link]:
    return [link_from_msg(m) for m in ipr.link("dump")]


def get_link_sync(ipr: Any, *, index: int | None = None, name: str | None = None) -> Link | None:
    try:
        if index is not None:
            msgs = ipr.link("get", index=index)
        else:
            msgs = ipr.link("get", ifname=name)
    except _netlink_error() as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise
    return link_from_msg(msgs[0]) if msgs else None


def _no_ipv6(ipr: Any, index: int) -> None:
    # Infrastructure links carry frames only; no link-local address, no RS/MLD noise.
    ipr.link("set", index=index, IFLA_AF_SPEC={
        "attrs": [("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", 1)]})]})


def create_veth_sync(ipr: Any, name: str, *, peer_name: str, dev_marker: Marker,
                     peer_marker: Marker) -> tuple[int, int]:
    """A veth pair ``name`` <-> ``peer_name``, both up; returns their indexes."""
    ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer_name})
    try:
        dev = get_link_sync(ipr, name=name)
        peer = get_link_sync(ipr, name=peer_name)
        assert dev is not None and peer is not None
        ipr.link("set", index=dev.index, ifalias=dev_marker.format())
        ipr.link("set", index=peer.index, ifalias=peer_marker.format())
        _no_ipv6(ipr, peer.index)
        ipr.link("set", index=peer.index, state="up")
        ipr.link("set", index=dev.index, state="up")
    except BaseException:
        delete_sync(ipr, name=name)
        raise
    return dev.index, peer.index


def create_bridge_sync(ipr: Any, name: str, *, marker: Marker) -> int:
    """A bridge without STP or multicast snooping (a plain L2 pipe); created down."""
    ipr.link("add", ifname=name, kind="bridge", br_stp_state=0, br_mcast_snooping=0,
             br_forward_delay=0)
    link = get_link_sync(ipr, name=name)
    assert link is not None
    try:
        ipr.link("set", index=link.index, ifalias=marker.format())
        _no_ipv6(ipr, link.index)
    except BaseException:
        delete_sync(ipr, index=link.index)
        raise
    return link.index


def create_vxlan_sync(ipr: Any, name: str, *, vni: int, local: str, port: int, mtu: int,
                      marker: Marker) -> int:
    """A unicast VXLAN device listening on, and sending from, UDP ``port``; up.

    No remote yet (see ``set_vxlan_peer_sync``) and no learning: frames are
    flooded to the one FDB entry and nothing learns remote addresses from
    received packets. Bringing it up binds the UDP port; a port taken by any
    other socket fails with EADDRINUSE.
    """
    ip = ipaddress.ip_address(local)
    addr = {"vxlan_local6": local} if ip.version == 6 else {"vxlan_local": local}
    # The source port range is [low, high); low == high would mean "the default range".
    ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_port=port,
             vxlan_port_range={"low": port, "high": port + 1}, vxlan_learning=0, **addr)
    link = get_link_sync(ipr, name=name)
    assert link is not None
    try:
        ipr.link("set", index=link.index, ifalias=marker.format(), mtu=mtu)
        _no_ipv6(ipr, link.index)
        ipr.link("set", index=link.index, state="up")
    except BaseException:
        delete_sync(ipr, index=link.index)
        raise
    return link.index


def set_vxlan_peer_sync(ipr: Any, index: int, *, ip: str, port: int) -> None:
    """Send everything from VXLAN device ``index`` to ``ip``:``port`` (the all-zeros FDB entry)."""
    ipr.fdb("append", ifindex=index, lladdr="00:00:00:00:00:00", dst=ip, port=port)


def set_master_sync(ipr: Any, index: int, master: int) -> None:
    ipr.link("set", index=index, master=master)


def set_up_sync(ipr: Any, index: int, up: bool = True) -> None:
    ipr.link("set", index=index, state="up" if up else "down")


def set_mtu_sync(ipr: Any, index: int, mtu: int) -> None:
    ipr.link("set", index=index, mtu=mtu)


def rename_sync(ipr: Any, index: int, name: str) -> None:
    """Rename a link (the kernel wants it down for that; it is brought back up)."""
    link = get_link_sync(ipr, index=index)
    if link is None:
        raise errors.NotFound("the interface no longer exists")
    if link.up:
        ipr.link("set", index=index, state="down")
    try:
        ipr.link("set", index=index, ifname=name)
    finally:
        if link.up:
            ipr.link("set", index=index, state="up")


def delete_sync(ipr: Any, *, index: int | None = None, name: str | None = None) -> bool:
    """Delete a link; False if it was already gone."""
    try:
        if index is not None:
            ipr.link("del", index=index)
        else:
            ipr.link("del", ifname=name)
    except _netlink_error() as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return False
        raise
    return True


def mtu_of_address_sync(ipr: Any, ip: str) -> int | None:
    """MTU of the link holding address ``ip`` (the tunnel's underlay), if any."""
    index = index_of_address_sync(ipr, ip)
    link = get_link_sync(ipr, index=index) if index is not None else None
    return link.mtu if link else None


def index_of_address_sync(ipr: Any, ip: str) -> int | None:
    """Index of the link holding address ``ip``."""
    want = ipaddress.ip_address(ip)
    for msg in ipr.addr("dump"):
        addr = msg.get_attr("IFA_ADDRESS")
        if addr and ipaddress.ip_address(addr) == want:
            return int(msg["index"])
    return None


def sweep_sync(ipr: Any, keep: Collection[str] = ()) -> list[str]:
    """Delete every marked link, except ``dev``/``peer`` links of owners in ``keep``.

    Returns the names removed. A veth's peer goes with it, so "already gone"
    is fine.
    """
    removed = []
    for link in dump_links_sync(ipr):
        marker = link.marker
        if marker is None:
            continue
        if marker.owner in keep and marker.role in ("dev", "peer"):
            continue
        if delete_sync(ipr, index=link.index):
            removed.append(link.name)
    return removed


# --------------------------------------------------------------------------- the thread


def _netlink_error() -> type[Exception]:
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError


_ERRNO_CLASSES: dict[int, type[errors.MetacError]] = {
    errno.EEXIST: errors.AlreadyExists,
    errno.ENODEV: errors.NotFound,
    errno.ENOENT: errors.NotFound,
    errno.EPERM: errors.PermissionDenied,
    errno.EACCES: errors.PermissionDenied,
    errno.EINVAL: errors.InvalidArgument,
    errno.ERANGE: errors.InvalidArgument,
    errno.EBUSY: errors.FailedPrecondition,
    errno.EADDRINUSE: errors.AlreadyExists,
    errno.EOPNOTSUPP: errors.Unsupported,
}


class PortInUse(errors.AlreadyExists):
    """Bringing a VXLAN device up failed: its UDP port is taken."""


def translate(exc: Exception, what: str) -> errors.MetacError:
    """A netlink failure as a MetacError whose message names the operation."""
    code = getattr(exc, "code", None)
    if not isinstance(code, int):
        return errors.Internal(f"{what}: {exc}")
    if code == errno.EADDRINUSE:
        return PortInUse(f"{what}: UDP port in use")
    cls = _ERRNO_CLASSES.get(code, errors.Internal)
    return cls(f"{what}: {os.strerror(code)}")


class Netlink:
    """One IPRoute socket, used from one worker thread; ``run`` calls a helper there."""

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._local = threading.local()
        self._closed = False

    def _ipr(self) -> Any:
        ipr = getattr(self._local, "ipr", None)
        if ipr is None:
            from pyroute2 import IPRoute

            ipr = self._local.ipr = IPRoute(netns=self._netns) if self._netns else IPRoute()
        return ipr

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        return fn(self._ipr(), *args, **kwargs)

    async def run(self, fn: Callable[..., T], /, *args: Any, what: str = "", **kwargs: Any) -> T:
        """``fn(ipr, *args, **kwargs)`` in the netlink thread; netlink errors become MetacErrors."""
        if self._closed:
            raise errors.Unavailable("the network service is stopping")
        loop = asyncio.get_running_loop()
        call = functools.partial(self._call, fn, args, kwargs)
        try:
            return await loop.run_in_executor(self._executor, call)
        except errors.MetacError:
            raise
        except _netlink_error() as exc:
            raise translate(exc, what or fn.__name__.removesuffix("_sync")) from None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True

        def close() -> None:
            ipr = getattr(self._local, "ipr", None)
            if ipr is not None:
                ipr.close()

        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, close)
        finally:
            self._executor.shutdown(wait=False)

    # Thin async wrappers for the common calls.

    async def links(self) -> list[Link]:
        return await self.run(dump_links_sync, what="list links")

    async def get(self, *, index: int | None = None, name: str | None = None) -> Link | None:
        return await self.run(get_link_sync, index=index, name=name, what="get link")

    async def delete(self, index: int) -> bool:
        return await self.run(delete_sync, index=index, what="delete link")
