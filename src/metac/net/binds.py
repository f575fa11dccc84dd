"""``bindTo``: join two L2 interfaces, locally with a bridge or across nodes with VXLAN.

``open_bind(net, this, other)`` asks ``other`` for its ``localToken``. If the
token names a device of this service, both devices become ports of one
bridge. Otherwise ``other`` is on another node and this side orchestrates:

1. pick a random VNI (``secrets``), reserve and protect a unique local UDP
   port, create the VXLAN device on it (it accepts nothing yet);
2. ``other.setupVxlan(our address, our port, vni)``: the peer builds its end
   and answers with its address, its own unique port and a holder;
3. point our VXLAN device at the peer's port, accept only the peer's packets,
   and bridge the VXLAN device with ``this``.

A remote ``Bind`` then watches the peer's holder (``WaitableHolder.wait``):
if the peer releases it, the bind ends here too; if the peer's service goes
away (restart, crash, node reboot), the local half is torn down and the bind
is re-established with backoff, restoring ``other`` from a sturdy ref made at
bind time (a persistent one once the bind is persistent), for as long as the
bind's holder lives.

A persistent bind keeps the persistent ref of its peer in the keep-list, not
in its persistence description (a secret there would be stored in clear), so
a restored bind reconnects with the same ref: it neither asks the peer for a
new one at every start nor needs the peer to answer while it is restored.
Undoing a bind (``unbind``, the peer releasing it, the peer gone for good)
revokes the bind's own refs (``ServiceContext.forget``), so it does not come
back at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import TYPE_CHECKING, Any

from metac import errors
from metac.codec.refs import SturdyRef
from metac.core.client import ref_from_struct
from metac.core.holder import Revert
from metac.core.untrusted import (
    OwnNode,
    bounded,
    call_timeout,
    check_ref_node,
    is_special,
    parse_ip,
)
from metac.net.devices import Device, new_id
from metac.net.ports import check_peer_ip, random_vni
from metac.net.tunnels import (
    check_bindable,
    connect_vxlan_end,
    join_bridge,
    open_vxlan_end,
    plan_mtu,
    show_endpoint,
)
from metac.schema.load import core, network

if TYPE_CHECKING:
    from metac.net.state import Net

log = logging.getLogger(__name__)

CALL_TIMEOUT = 30.0  # calls into our own persistence; calls into peers use call_timeout()
RELEASE_TIMEOUT = 5.0
TOKEN_TIMEOUT = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


async def release_remote(holder: Any) -> None:
    """Ask the peer to drop its end now; it also does when our reference goes away."""
    try:
        await asyncio.wait_for(holder.release(), RELEASE_TIMEOUT)
    except Exception as exc:
        log.debug("releasing the remote end failed: %s", errors.from_kj(exc))


async def local_device_of(net: Net, other: Any) -> Device | None:
    """The device ``other`` stands for if it is served by this service, else None."""
    try:
        res = await asyncio.wait_for(other.localToken(), TOKEN_TIMEOUT)
    except TimeoutError:
        raise errors.Unavailable("the other interface did not answer") from None
    except Exception as exc:
        err = errors.from_kj(exc)
        if isinstance(err, errors.Unsupported):
            return None  # an implementation without localToken: treat as remote
        raise err from None
    return net.devices.by_token(bytes(res.token))


async def adopt(net: Net, cap: Any, *, persistent: bool) -> tuple[SturdyRef | None, Any]:
    """``cap`` reached over the service's own connection, and the ref used for that.

    A capability a client passes in is proxied through the client's connection
    and breaks when the client exits; restoring a ref of it does not. If the
    object cannot make refs, the capability is kept as it is.
    """
    try:
        res = await asyncio.wait_for(
            cap.cast_as(core.Persistable).createSturdyRef(persistent=persistent,
                                                          alias=not persistent),
            call_timeout())
    except Exception as exc:
        log.info("cannot make a ref of the other interface (%s); keeping the capability",
                 errors.from_kj(exc))
        return None, cap
    try:
        ref = ref_from_struct(res.id)
    except ValueError as exc:
        raise errors.PermissionDenied(f"the other interface answered a malformed ref: {exc}") \
            from None
    # A ref naming a private address (not this node's) would make us connect there.
    check_ref_node(ref, OwnNode(net.ctx.env.node_address, net.ctx.env.node_port))
    return ref, await bounded(net.ctx.pool.restore(ref, network.L2Interface),
                              f"node {ref.node}")


class Bind:
    """A bind made by bindTo on this node (listed as kind "bind")."""

    kind = "bind"

    def __init__(self, net: Net, *, bind_id: str, this: Device, other_dev: Device | None = None,
                 other: Any = None, other_ref: SturdyRef | None = None,
                 persistent: bool = False) -> None:
        self.id = bind_id
        self._net = net
        self.this = this
        self.other_dev = other_dev
        self.other = other
        self.other_ref = other_ref
        #: The alias ref adopt() made on the peer's node (a non-persistent bind's way back).
        self.alias: SturdyRef | None = None
        self.persistent = persistent
        self.state = "connecting"
        self.peer = other_dev.name if other_dev else ""
        self.ifname = f"mcb{bind_id}"
        self.holder: weakref.ref[Any] | None = None
        #: The holder's sturdy refs are stored under this runtime id (stable: the
        #: bind id is in the description, so a restored bind finds its refs again).
        self.runtime_id = f"bind-{bind_id}"
        self.has_refs = persistent  # a restored bind has; ending it revokes them
        self._plane: Revert | None = None
        self._remote_holder: Any = None
        self._task: asyncio.Task[Any] | None = None
        self._closed = False

    @property
    def remote(self) -> bool:
        return self.other_dev is None

    # --- listing and persistence ---

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "ifname": self.ifname, "peer": self.peer or "?",
                "device": self.this.name, "state": self.state, "persistent": self.persistent}

    def holder_cap(self) -> Any | None:
        holder = self.holder() if self.holder else None
        return holder.as_cap() if holder is not None and holder.active else None

    def describe(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "this": self.this.describe()}
        if self.other_dev is not None:
            data["other"] = self.other_dev.describe()
        return data

    async def make_persistent(self) -> None:
        """Before a persistent ref is made: keep our devices and a persistent ref of the peer
        (without one the bind could not be re-established after a restart: fail)."""
        keep = self._net.keep
        if self.remote and self.id not in keep.peers:
            try:
                res = await asyncio.wait_for(
                    self.other.cast_as(core.Persistable).createSturdyRef(persistent=True),
                    call_timeout())
            except TimeoutError:
                raise errors.Unavailable("the other interface did not answer") from None
            except Exception as exc:
                err = errors.from_kj(exc)
                log.warning("bind %s cannot be made persistent: no persistent ref of its "
                            "peer (%s)", self.id, err)
                raise err from None
            self.other_ref = ref_from_struct(res.id)
            keep.set_peer(self.id, self.other_ref.format())
        self.persistent = True
        for dev in (self.this, self.other_dev):
            if dev is not None and dev.owned:
                keep.add_device(dev.id)

    # --- establishing ---

    async def establish(self) -> None:
        if self.remote:
            await self._establish_remote()
        else:
            await self._establish_local()
        self.state = "up"

    async def _establish_local(self) -> None:
        assert self.other_dev is not None
        if self.this.index == self.other_dev.index:
            raise errors.InvalidArgument("cannot bind an interface to itself")
        await check_bindable(self._net, self.this)
        await check_bindable(self._net, self.other_dev)
        async with Revert() as rv:
            self.ifname = await join_bridge(
                self._net, rv, owner=self.id,
                ports=[self.this.port_index, self.other_dev.port_index])
            self._plane = rv.pop_all()
        log.info("bound %s <-> %s with bridge %s", self.this.name, self.other_dev.name,
                 self.ifname)

    async def _establish_remote(self) -> None:
        net = self._net
        await check_bindable(net, self.this)
        vni = random_vni()
        async with Revert() as rv:
            mtu = await plan_mtu(net, self.this, rv)
            end = await open_vxlan_end(net, rv, owner=self.id, vni=vni, mtu=mtu)
            try:
                res = await asyncio.wait_for(
                    self.other.setupVxlan(remote=net.node_address(), dstPort=end.port,
                                          vniNum=vni), call_timeout())
            except TimeoutError:
                raise errors.Unavailable("the other node did not set up its tunnel end") from None
            remote_holder = res.holder
            rv.add(lambda: release_remote(remote_holder), "release the remote end")
            expected = self.other_ref.node if self.other_ref is not None else None
            peer_ip = check_peer_ip(res.local.ip, family=net.family, expected=expected)
            if expected is None and is_special(parse_ip(peer_ip)) and peer_ip != net.node_ip:
                # Where an interface without a ref is served is unknown: at least never
                # aim the tunnel at this host's loopback or a link-local address.
                raise errors.PermissionDenied(
                    f"the peer answered {peer_ip}, a loopback or link-local address")
            peer_port = int(res.srcPort)
            if not 1 <= peer_port <= 65535:
                raise errors.InvalidArgument("the peer answered with a bad port")
            await connect_vxlan_end(net, end, ip=peer_ip, port=peer_port)
            self.ifname = await join_bridge(net, rv, owner=self.id,
                                            ports=[end.index, self.this.port_index])
            self._plane = rv.pop_all()
        self._remote_holder = remote_holder
        self.peer = show_endpoint(peer_ip, peer_port)
        log.info("bound %s <-> %s over VXLAN (local port %d)", self.this.name, self.peer,
                 end.port)

    async def _teardown_plane(self) -> None:
        plane, self._plane = self._plane, None
        self._remote_holder = None
        if plane is not None:
            await plane.aclose()

    # --- watching the peer ---

    def activate(self) -> None:
        """List the bind (``listBinds``) and, between nodes, watch and re-establish it."""
        self._net.actions[self.id] = self
        if self.remote and self._task is None:
            self._task = self._net.spawn(self._supervise(), f"bind {self.id}")

    async def _supervise(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._closed:
            if self._plane is None:
                failure = await self._try_establish()
                if failure is not None and failure[1]:
                    log.warning("bind %s (%s): %s; giving up", self.id, self.this.name,
                                failure[0])
                    self.state = f"ended: {failure[0]}"
                    self._end_from_inside()
                    return
                if failure is not None:
                    failure = failure[0]
                    self.state = f"broken: {failure}"
                    log.warning("bind %s (%s): %s; retrying in %.1f s", self.id, self.this.name,
                                failure, backoff)
                    await self._teardown_plane()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                backoff = BACKOFF_FIRST
            try:
                await self._remote_holder.cast_as(network.WaitableHolder).wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(errors.from_kj(exc), errors.Unsupported):
                    unwatchable = True
                else:
                    unwatchable = False
                    reason = str(errors.from_kj(exc))
            else:
                log.info("bind %s (%s): the peer released its end; unbinding", self.id,
                         self.this.name)
                self.state = "released by peer"
                self._end_from_inside()
                return
            if unwatchable:
                await asyncio.Event().wait()  # the peer cannot be watched
            log.warning("bind %s (%s): lost the peer's end (%s); re-establishing",
                        self.id, self.this.name, reason)
            self.state = "connecting"
            await self._teardown_plane()

    def _end_from_inside(self) -> None:
        """Release the bind's holder (from the supervising task, so in another task)."""
        holder = self.holder() if self.holder else None
        if holder is not None:
            self._net.spawn(holder.close(), f"release bind {self.id}")

    async def _try_establish(self) -> tuple[str, bool] | None:
        """(Re-)establish; on failure (text, fatal). NotFound is fatal: the peer's
        ref or our device is gone for good. Only text leaves: a kept exception
        would tie this frame, and so the bind and its devices, into a cycle."""
        try:
            await self._reconnect_other()
            await self.establish()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return _failure(exc)
        return None

    async def _reconnect_other(self) -> None:
        if self.other_ref is None:
            return
        self.other = await bounded(self._net.ctx.pool.restore(self.other_ref, network.L2Interface),
                                   f"node {self.other_ref.node}")

    # --- ending ---

    async def aclose(self, *, shutdown: bool = False) -> None:
        """Undo the bind; unless ``shutdown`` (the service stops: a persistent bind comes
        back at the next start), for good: its refs are revoked."""
        if self._closed:
            return
        self._closed = True
        self._net.actions.pop(self.id, None)
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not shutdown:
            await self._forget()
        await self._teardown_plane()  # also releases the peer's end
        if not shutdown:
            await self.drop_alias()
        self.state = "released"
        log.info("unbound %s (bind %s)", self.this.name, self.id)
        if not shutdown:
            self._net.collect_soon()  # owned devices go now, not at the next periodic collection

    async def drop_alias(self) -> None:
        """Drop the alias ref made on the peer's node to reach it (see adopt)."""
        alias, self.alias = self.alias, None
        if alias is None:
            return
        try:
            await asyncio.wait_for(self._net.ctx.pool.drop_alias(alias), CALL_TIMEOUT)
        except Exception as exc:  # gone already (revoked, node restarted) or unreachable
            log.info("bind %s: the alias ref on its peer was not dropped (%s)", self.id,
                     errors.from_kj(exc) if not isinstance(exc, TimeoutError) else "timeout")

    async def _forget(self) -> None:
        """Revoke the bind's sturdy refs (it must not come back) and drop its peer's ref."""
        self._net.keep.discard_peer(self.id)
        if not self.has_refs:
            return
        try:
            revoked = await asyncio.wait_for(self._net.ctx.forget(self.runtime_id), CALL_TIMEOUT)
        except Exception as exc:
            log.error("cannot revoke the refs of bind %s (%s); it may come back at the next "
                      "start (remove it with metac ref rm)", self.id, errors.from_kj(exc))
            return
        if revoked:
            log.info("revoked %d ref(s) of bind %s", revoked, self.id)


def _failure(exc: BaseException) -> tuple[str, bool]:
    err = errors.from_kj(exc)
    return str(err), isinstance(err, errors.NotFound)


async def open_bind(net: Net, this: Device, other: Any) -> Bind:
    """bindTo: join ``this`` (a device of this service) with ``other`` (any L2Interface)."""
    other_dev = await local_device_of(net, other)
    bind_id = new_id()
    if other_dev is not None:
        bind = Bind(net, bind_id=bind_id, this=this, other_dev=other_dev)
    else:
        await check_bindable(net, this)
        ref, cap = await adopt(net, other, persistent=False)
        bind = Bind(net, bind_id=bind_id, this=this, other=cap, other_ref=ref)
        bind.alias = ref
    try:
        await bind.establish()
    except BaseException:
        await bind.drop_alias()
        raise
    bind.activate()
    return bind


async def restore_bind(net: Net, data: dict[str, Any]) -> Bind:
    """A persistent bind from its description; one between nodes is (re-)established in
    the background, with the peer's ref from the keep-list."""
    try:
        bind_id = str(data["id"])
        this_desc = data["this"]
        other_desc = data.get("other")
    except (KeyError, TypeError):
        raise errors.InvalidArgument("corrupt bind description") from None
    if other_desc is not None:
        this = await net.devices.resolve(this_desc)
        other_dev = await net.devices.resolve(other_desc)
        bind = Bind(net, bind_id=bind_id, this=this, other_dev=other_dev, persistent=True)
        await bind.establish()
    else:
        peer = net.keep.peers.get(bind_id)
        if peer is None:
            raise errors.NotFound(f"bind {bind_id} lost the ref of its peer")
        this = await net.devices.resolve(this_desc)
        bind = Bind(net, bind_id=bind_id, this=this, other_ref=SturdyRef.parse(peer),
                    persistent=True)
    bind.activate()
    return bind
