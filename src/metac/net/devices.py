"""Kernel interfaces handed out by the service, who owns them, and what survives a restart.

A ``Device`` is one kernel interface as the service's server objects see it:
its index, the index of the link that gets bridged (``port_index``) and a
random ``token`` (``L2Interface.localToken``) by which a bind recognises an
interface of its own service.

* An existing interface (``local:eth1``) is bridged itself and never deleted
  by the service unless someone calls ``destroy``.
* An interface made by ``createInterface`` (``newlocal:NAME``) is a veth pair:
  ``NAME`` is what the user configures (addresses, routes), its hidden peer
  ``mcp<id>`` is what gets bridged. Such a device is *owned*: it lives as long
  as some capability (or bind) refers to it, and is deleted when the last
  ``Device`` object goes away or on ``destroy``.

``KeepList`` (``<state>/net/keep.json``, root-only) records what persistent
refs need after a restart and must not go into a persistence description:
the owned devices they use (the startup sweep leaves those in place, so their
addresses survive, for the restorers to adopt) and, for each persistent bind
between nodes, the persistent ref of the peer's interface (a secret: the bind
reconnects with it after a restart of either node instead of asking the peer
for a new ref each time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import weakref
from collections.abc import Coroutine
from typing import Any, Protocol

from metac import errors
from metac.codec.locators import LocatorError, check_ifname
from metac.net import links
from metac.net.links import Link, Marker

log = logging.getLogger(__name__)


class DeviceOwner(Protocol):
    """What a DeviceTable needs of the service state that owns it (``net.state.Net``)."""

    netlink: links.Netlink
    keep: KeepList
    closing: bool

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]: ...


def new_id() -> str:
    """Owner id of a created device, bind or tunnel end (12 hex digits; fits in link names)."""
    return secrets.token_hex(6)


def valid_ifname(name: str) -> str:
    try:
        return check_ifname(name)
    except LocatorError as exc:
        raise errors.InvalidArgument(str(exc)) from None


class KeepList:
    """Owned devices and peers of persistent binds that persistent refs need after a restart."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.devices: set[str] = set()
        self.peers: dict[str, str] = {}  # bind id -> persistent ref of its peer
        try:
            with open(path) as f:
                data = json.load(f)
            self.devices = {str(x) for x in data.get("devices", [])}
            self.peers = {str(k): str(v) for k, v in data.get("peers", {}).items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)

    def _write(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"devices": sorted(self.devices), "peers": self.peers}, f, sort_keys=True)
        os.replace(tmp, self.path)

    def _save(self) -> None:
        try:
            self._write()
        except OSError as exc:
            log.error("cannot save %s: %s", self.path, exc)

    def add_device(self, dev_id: str) -> None:
        if dev_id not in self.devices:
            self.devices.add(dev_id)
            self._save()

    def discard_device(self, dev_id: str) -> None:
        if dev_id in self.devices:
            self.devices.discard(dev_id)
            self._save()

    def set_peer(self, bind_id: str, ref: str) -> None:
        if self.peers.get(bind_id) != ref:
            self.peers[bind_id] = ref
            self._save()

    def discard_peer(self, bind_id: str) -> None:
        if self.peers.pop(bind_id, None) is not None:
            self._save()


class Device:
    """One kernel interface in the service's namespace (see the module docstring)."""

    def __init__(self, *, dev_id: str, index: int, port_index: int, name: str,
                 owned: bool) -> None:
        self.id = dev_id
        self.index = index
        self.port_index = port_index
        self.name = name
        self.owned = owned
        self.token = secrets.token_bytes(16)
        self.destroyed = False

    def __repr__(self) -> str:
        return f"<Device {self.name} #{self.index}{' owned' if self.owned else ''}>"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "created": self.owned}


class DeviceTable:
    """Devices by token and owned devices by id; deletes an owned device nobody refers to."""

    def __init__(self, net: DeviceOwner) -> None:
        self._net = net
        self._owned: weakref.WeakValueDictionary[str, Device] = weakref.WeakValueDictionary()
        self._tokens: weakref.WeakValueDictionary[bytes, Device] = weakref.WeakValueDictionary()

    def by_token(self, token: bytes) -> Device | None:
        return self._tokens.get(bytes(token))

    def owned_ids(self) -> set[str]:
        return set(self._owned.keys())

    def _register(self, dev: Device) -> Device:
        self._tokens[dev.token] = dev
        if dev.owned:
            self._owned[dev.id] = dev
            weakref.finalize(dev, _forget_owned, weakref.ref(self._net), dev.id, dev.index)
        return dev

    # --- lookups ---

    async def create(self, name: str, dev_id: str | None = None) -> Device:
        """A new owned veth device ``name`` (its peer ``mcp<id>`` is the bridged end)."""
        name = valid_ifname(name)
        dev_id = dev_id or new_id()
        if await self._net.netlink.get(name=name) is not None:
            raise errors.AlreadyExists(f"an interface named {name} already exists")
        index, peer = await self._net.netlink.run(
            links.create_veth_sync, name, peer_name=f"mcp{dev_id}",
            dev_marker=Marker(dev_id, "dev"), peer_marker=Marker(dev_id, "peer"),
            what=f"create interface {name}")
        log.info("created interface %s (id %s)", name, dev_id)
        return self._register(Device(dev_id=dev_id, index=index, port_index=peer, name=name,
                                     owned=True))

    async def from_link(self, link: Link) -> Device:
        """The Device for ``link``: the live owned one if it is ours, else an unowned view."""
        marker = link.marker
        if marker is not None and marker.role in links.INFRASTRUCTURE:
            raise errors.FailedPrecondition(
                f"{link.name} is part of a bind managed by the network service")
        if marker is not None and marker.role == "dev":
            live = self._owned.get(marker.owner)
            if live is not None and not live.destroyed:
                live.name = link.name
                return live
        return self._register(Device(dev_id=new_id(), index=link.index, port_index=link.index,
                                     name=link.name, owned=False))

    async def open(self, name: str) -> Device:
        """An existing interface by name (``local:NAME``)."""
        link = await self._net.netlink.get(name=valid_ifname(name))
        if link is None:
            raise errors.NotFound(f"no interface named {name}")
        return await self.from_link(link)

    async def resolve(self, desc: dict[str, Any]) -> Device:
        """A device from its persisted description (restorers); adopts or re-creates owned ones."""
        try:
            name = str(desc["name"])
            dev_id = str(desc["id"])
            created = bool(desc.get("created"))
        except (KeyError, TypeError):
            raise errors.InvalidArgument("corrupt interface description") from None
        if not created:
            return await self.open(name)
        live = self._owned.get(dev_id)
        if live is not None and not live.destroyed:
            return live
        mine = [lk for lk in await self._net.netlink.links()
                if lk.marker == Marker(dev_id, "dev")]
        if mine:
            dev_link = mine[0]
            if not dev_link.peer_index:
                raise errors.FailedPrecondition(f"{dev_link.name} lost its veth peer")
            log.info("adopted interface %s (id %s)", dev_link.name, dev_id)
            return self._register(Device(dev_id=dev_id, index=dev_link.index,
                                         port_index=dev_link.peer_index, name=dev_link.name,
                                         owned=True))
        return await self.create(name, dev_id)

    async def refresh(self, dev: Device) -> Link:
        """The device's current link (and name); NotFound if it is gone."""
        link = None if dev.destroyed else await self._net.netlink.get(index=dev.index)
        if link is None or (dev.owned and link.marker != Marker(dev.id, "dev")):
            raise errors.NotFound(f"interface {dev.name} no longer exists")
        dev.name = link.name
        return link

    async def destroy(self, dev: Device) -> None:
        await self.refresh(dev)
        await self._net.netlink.delete(dev.index)
        dev.destroyed = True
        if dev.owned:
            self._net.keep.discard_device(dev.id)
        log.info("destroyed interface %s", dev.name)

    async def delete_unkept(self) -> None:
        """At shutdown: delete owned devices no persistent ref needs."""
        for dev in list(self._owned.values()):
            if dev.id not in self._net.keep.devices and not dev.destroyed:
                dev.destroyed = True
                with contextlib.suppress(errors.MetacError):
                    await self._net.netlink.delete(dev.index)


def _forget_owned(net_ref: weakref.ref[DeviceOwner], dev_id: str, index: int) -> None:
    """Finalizer of an owned Device: nobody refers to it any more, so delete it."""
    net = net_ref()
    if net is None or net.closing:
        return

    async def delete() -> None:
        link = await net.netlink.get(index=index)
        if link is not None and link.marker == Marker(dev_id, "dev"):
            await net.netlink.delete(index)
            log.info("deleted interface %s (no references left)", link.name)
        net.keep.discard_device(dev_id)

    with contextlib.suppress(RuntimeError):
        net.spawn(delete(), f"delete interface {dev_id}")
