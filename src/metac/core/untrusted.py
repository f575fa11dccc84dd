"""Capabilities a client handed us: bounded calls, and which node serves them.

A capability that arrives as a call parameter is whatever the caller made it:
it may never answer, and it may answer anything. Two rules follow.

* **Every call into it is bounded in time** (``bounded``): after
  ``call_timeout()`` seconds (``METAC_CALL_TIMEOUT``, default 30) the call is
  cancelled and fails with ``Unavailable``; whatever the caller opened for it is
  closed by the caller's own cleanup.
* **What it says about the network is checked against where it is served**
  (``locate`` then ``check_served_address``). A service never learns the
  network peer of a capability passed in by a client: every call reaches it
  through the node's relay. So it asks the capability for a sturdy ref
  (``createSturdyRef``), and restores that ref from the node the ref names,
  over its own connection: the capability it then uses *is* served by that
  node, whatever the original said. An address the capability later gives
  (a ``tcpListen`` answer, say) must be that node's address. A ref naming a
  loopback, link-local, unspecified or multicast address is refused unless it
  names this very node, so a client cannot make a service talk to its own
  host's private services (SSRF). A capability that cannot make a ref is
  refused: where it is served cannot be told.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from metac import errors
from metac.codec.refs import DEFAULT_PORT, RefError, SturdyRef
from metac.core.client import NodePool, ref_from_struct
from metac.core.rpc import rpc_errors
from metac.schema.load import core

log = logging.getLogger(__name__)

CALL_TIMEOUT = 30.0
CALL_TIMEOUT_ENV = "METAC_CALL_TIMEOUT"

T = TypeVar("T")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def call_timeout() -> float:
    """Seconds a call into a client-handed capability may take (``METAC_CALL_TIMEOUT``)."""
    text = os.environ.get(CALL_TIMEOUT_ENV, "")
    try:
        value = float(text) if text else CALL_TIMEOUT
    except ValueError:
        return CALL_TIMEOUT
    return value if value > 0 else CALL_TIMEOUT


async def bounded(call: Awaitable[T], what: str, timeout: float | None = None) -> T:
    """Await an RPC into a capability we do not trust, for at most ``timeout`` seconds.

    RPC failures become MetacErrors; the timeout becomes ``Unavailable`` naming ``what``.
    """
    limit = call_timeout() if timeout is None else timeout
    try:
        async with asyncio.timeout(limit), rpc_errors():
            return await call
    except TimeoutError:
        raise errors.Unavailable(f"{what} did not answer within {limit:g} s") from None


def parse_ip(text: str) -> IPAddress:
    """An IP address from a peer's text; an IPv4-mapped IPv6 address as IPv4."""
    try:
        addr = ipaddress.ip_address(str(text).partition("%")[0])
    except ValueError:
        raise errors.PermissionDenied("the peer answered with something that is not an IP "
                                      "address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_special(addr: IPAddress) -> bool:
    """Loopback, link-local, unspecified or multicast: never another node's address."""
    return addr.is_loopback or addr.is_link_local or addr.is_unspecified or addr.is_multicast


@dataclass(frozen=True)
class Located:
    """A capability restored from the node that serves it."""

    cap: Any
    node: str  # that node's address (normalised text)
    local: bool  # that node is this one


@dataclass(frozen=True)
class OwnNode:
    """This node's address and RPC port (what its own refs name)."""

    ip: str
    port: int = DEFAULT_PORT

    def names(self, ref: SturdyRef) -> bool:
        return (parse_ip(ref.node) == parse_ip(self.ip)
                and (ref.port or DEFAULT_PORT) == (self.port or DEFAULT_PORT))


def check_ref_node(ref: SturdyRef, own: OwnNode) -> bool:
    """True if ``ref`` names this node; PermissionDenied if it names a private address."""
    if own.names(ref):
        return True
    if is_special(parse_ip(ref.node)):
        raise errors.PermissionDenied(
            f"the capability claims to be served at {ref.node}, a loopback, link-local, "
            "unspecified or multicast address that is not this node's")
    return False


async def locate(pool: NodePool, own: OwnNode, cap: Any, interface: Any, *,
                 what: str, timeout: float | None = None) -> Located:
    """``cap`` restored from the node that serves it (see the module docstring)."""
    try:
        res = await bounded(cap.cast_as(core.Persistable).createSturdyRef(persistent=False),
                            what, timeout)
    except errors.Unavailable:
        raise
    except errors.MetacError as exc:
        raise errors.PermissionDenied(
            f"{what} cannot be located: it cannot make a sturdy ref ({exc.category}), so "
            "which node serves it is unknown") from None
    try:
        ref = ref_from_struct(res.id)
    except (RefError, ValueError) as exc:
        raise errors.PermissionDenied(f"{what} answered a malformed ref: {exc}") from None
    local = check_ref_node(ref, own)
    try:
        restored = await bounded(pool.restore(ref, interface), f"the node serving {what}",
                                 timeout)
    except errors.Unavailable:
        # Not why (refused, reset, timed out): the ref's address and port are the
        # caller's choice, and the reason would tell it about ports of our network.
        raise errors.Unavailable(f"the node serving {what} cannot be reached") from None
    return Located(restored, str(parse_ip(ref.node)), local)


async def adopt(pool: NodePool, own: OwnNode, cap: Any, interface: Any, *,
                persistent: bool = False, what: str = "the capability",
                keep_unpersistable: bool = False) -> tuple[SturdyRef | None, Any]:
    """(its ref, ``cap`` reached over our own connection): a client-handed capability to keep.

    A capability passed in by a client is proxied through that client's
    connection and breaks when the client goes away (pycapnp has no three-party
    handoff). Restoring a sturdy ref of it from the node the ref names gives a
    direct reference that outlives the client. A non-persistent ref is an alias
    of the grant ``cap`` came through (revoking that grant cuts it too). Every
    call is bounded, and a ref naming a private address other than this node's
    is refused. With ``keep_unpersistable``, a capability that cannot make a ref is
    kept as it is: ``(None, cap)``.
    """
    try:
        res = await bounded(cap.cast_as(core.Persistable).createSturdyRef(
            persistent=persistent, alias=not persistent), what)
    except errors.MetacError as exc:
        if not keep_unpersistable:
            raise
        log.info("cannot make a ref of %s (%s); keeping the capability", what, exc)
        return None, cap
    try:
        ref = ref_from_struct(res.id)
    except (RefError, ValueError) as exc:
        raise errors.PermissionDenied(f"{what} answered a malformed ref: {exc}") from None
    check_ref_node(ref, own)
    return ref, await bounded(pool.restore(ref, interface), f"node {ref.node}")


def check_served_address(answer: str, port: int, *, node: str | None,
                         local_address: str) -> tuple[str, int]:
    """The (ip, port) a capability answered, if it is where the capability is served.

    ``node`` is the address of the node that serves it (``Located.node``) or None
    when unknown (a client of a ref it restored itself); then only private
    addresses other than ``local_address`` are refused.
    """
    addr = parse_ip(answer)
    if not 1 <= int(port) <= 65535:
        raise errors.PermissionDenied(f"the peer answered a bad port {port}")
    if node is not None and addr != parse_ip(node):
        raise errors.PermissionDenied(
            f"the stream answered {addr}, but it is served by the node at {node}")
    if is_special(addr) and addr != parse_ip(local_address):
        raise errors.PermissionDenied(
            f"the stream answered {addr}, a loopback, link-local, unspecified or multicast "
            "address that is not this node's")
    return str(addr), int(port)


class PendingLimit:
    """Bounds on calls waiting for a peer: in total and per peer key.

    Over a bound, a new call fails at once with ``Unavailable`` instead of
    waiting, so what waiting calls hold (sockets, memory) stays bounded.
    """

    def __init__(self, total: int, per_peer: int, what: str) -> None:
        self.total = total
        self.per_peer = per_peer
        self.what = what
        self.count = 0
        self.by_peer: dict[str, int] = {}

    def claim(self, peer: str | None = None) -> PendingSlot:
        """A place among the pending calls (for ``peer``, if known yet)."""
        if self.count >= self.total:
            raise errors.Unavailable(f"too many {self.what} pending ({self.total}); "
                                     "try again later")
        self.count += 1
        slot = PendingSlot(self)
        if peer is not None:
            try:
                slot.assign(peer)
            except BaseException:
                slot.release()
                raise
        return slot

    @contextlib.contextmanager
    def held(self, peer: str | None = None) -> Iterator[PendingSlot]:
        slot = self.claim(peer)
        try:
            yield slot
        finally:
            slot.release()


class PendingSlot:
    """One claimed place in a ``PendingLimit``; ``release`` is idempotent."""

    def __init__(self, limit: PendingLimit) -> None:
        self._limit: PendingLimit | None = limit
        self._peer: str | None = None

    def assign(self, peer: str) -> None:
        """Count this call against ``peer`` too (once it is known)."""
        limit = self._limit
        if limit is None or self._peer is not None:
            return
        if limit.by_peer.get(peer, 0) >= limit.per_peer:
            raise errors.Unavailable(f"too many {limit.what} pending for {peer} "
                                     f"({limit.per_peer}); try again later")
        limit.by_peer[peer] = limit.by_peer.get(peer, 0) + 1
        self._peer = peer

    def release(self) -> None:
        limit, self._limit = self._limit, None
        if limit is None:
            return
        limit.count -= 1
        if self._peer is not None:
            left = limit.by_peer.get(self._peer, 1) - 1
            if left > 0:
                limit.by_peer[self._peer] = left
            else:
                limit.by_peer.pop(self._peer, None)


def env_int(name: str, default: int) -> int:
    """A positive integer from the environment, else ``default``."""
    try:
        value = int(os.environ.get(name, "") or default)
    except ValueError:
        return default
    return value if value > 0 else default
