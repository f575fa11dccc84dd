"""Packet filter rules protecting the VXLAN ports (one nftables table owned by this service).

Paper section 4: a tunnel's UDP ports must not be used for any other UDP
traffic. For every local VXLAN port P the service keeps, in table
``inet metac_net`` of its own network namespace:

* output: ``udp sport P meta skuid >= 0 drop`` -- a packet from P that belongs
  to a userspace socket (the kernel's VXLAN socket has no owner, so ``skuid``
  does not match its packets) is dropped: local processes, root's raw sockets
  included, cannot send from the tunnel's port (the owner match the paper
  names, in its nftables form);
* egress of the interface carrying the node address (table ``netdev metac_net``,
  Linux 5.16+ and nftables 1.0.1+): the same owner match again. Packets a
  process writes on an ``AF_PACKET`` socket (a whole Ethernet frame, qdisc
  bypass or not) never pass the IP output hook, but they do pass this one, so
  root's packet sockets cannot send from the tunnel's port through that
  interface either. Where the kernel or nft lacks egress hooks the service logs
  a warning once and keeps only the output rule (AF_PACKET senders are then not
  filtered);
* input: ``udp dport P ip saddr PEER udp sport Q accept`` then
  ``udp dport P drop`` -- the tunnel only takes packets from the expected peer
  address and port (the kernel's VXLAN device itself accepts any source).

The table is re-rendered as a whole and replaced in one ``nft -f`` transaction
on every change (``render`` is pure), so there are no rule handles to track,
and deleting the table at start is the sweep of an earlier run's rules.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from metac import errors

log = logging.getLogger(__name__)

TABLE = "metac_net"
NFT_TIMEOUT = 10.0


@dataclass(frozen=True)
class PortRule:
    """Protection of one local VXLAN port; no peer yet means nothing is accepted."""

    port: int
    peer_ip: str | None = None
    peer_port: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"bad port {self.port}")
        if (self.peer_ip is None) != (self.peer_port is None):
            raise ValueError("peer_ip and peer_port go together")
        if self.peer_ip is not None:
            object.__setattr__(self, "peer_ip", str(ipaddress.ip_address(self.peer_ip)))
            if not 1 <= int(self.peer_port or 0) <= 65535:
                raise ValueError(f"bad peer port {self.peer_port}")


def check_device_name(name: str) -> str:
    """An interface name that can be quoted in an nft script."""
    if not name or len(name) > 15 or any(c in name for c in "\"\\/ \t\n;{}#"):
        raise ValueError(f"bad interface name {name!r}")
    return name


def render(rules: Iterable[PortRule], egress_device: str | None = None) -> str:
    """The nft script that makes the tables hold exactly ``rules`` (atomically).

    With ``egress_device``, the owner match is also on that interface's egress hook
    (table ``netdev``); the netdev table is removed in any case.
    """
    rules = sorted(set(rules), key=lambda r: (r.port, r.peer_ip or "", r.peer_port or 0))
    head = (f"table inet {TABLE}\ndelete table inet {TABLE}\n"
            f"table netdev {TABLE}\ndelete table netdev {TABLE}\n")
    if not rules:
        return head
    out = [head]
    if egress_device is not None:
        device = check_device_name(egress_device)
        out.append(f"table netdev {TABLE} {{\n\tchain egress {{\n\t\ttype filter hook egress "
                   f"device \"{device}\" priority filter; policy accept;\n")
        for r in rules:
            out.append(f"\t\tudp sport {r.port} meta skuid >= 0 drop\n")
        out.append("\t}\n}\n")
    out.append(f"table inet {TABLE} {{\n")
    out.append("\tchain output {\n\t\ttype filter hook output priority filter; policy accept;\n")
    for r in rules:
        out.append(f"\t\tudp sport {r.port} meta skuid >= 0 drop\n")
    out.append("\t}\n")
    out.append("\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n")
    for r in rules:
        if r.peer_ip is not None:
            family = "ip6" if ipaddress.ip_address(r.peer_ip).version == 6 else "ip"
            out.append(f"\t\tudp dport {r.port} {family} saddr {r.peer_ip} "
                       f"udp sport {r.peer_port} accept\n")
        out.append(f"\t\tudp dport {r.port} drop\n")
    out.append("\t}\n}\n")
    return "".join(out)


def find_nft() -> str | None:
    return shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")


class Firewall:
    """The service's nft table: ``put``/``drop`` a port's rule; every change is applied at once."""

    def __init__(self, nft: str | None, *, prefix: Sequence[str] = ()) -> None:
        self._nft = nft
        self._prefix = list(prefix)  # e.g. nsenter --net=... -- (tests)
        self._rules: dict[str, PortRule] = {}
        self._lock = asyncio.Lock()
        # The interface whose egress hook also gets the owner match (None: none known,
        # or this kernel/nft cannot; see the module docstring).
        self.egress_device: str | None = None
        self._egress_said = False

    def rules(self) -> list[PortRule]:
        return list(self._rules.values())

    async def reset(self) -> None:
        """Forget every rule and remove the table (the startup sweep)."""
        self._rules.clear()
        if self._nft is None:
            log.warning("nft not found (Debian package nftables): VXLAN ports cannot be "
                        "protected, so binds between nodes are refused")
            return
        async with self._lock:
            await self._apply()

    async def put(self, key: str, rule: PortRule) -> None:
        if self._nft is None:
            raise errors.MissingDependency("nft", "nftables")
        async with self._lock:
            old = self._rules.get(key)
            self._rules[key] = rule
            try:
                await self._apply()
            except BaseException:
                if old is None:
                    self._rules.pop(key, None)
                else:
                    self._rules[key] = old
                raise

    async def drop(self, key: str) -> None:
        if self._nft is None:
            return
        async with self._lock:
            if self._rules.pop(key, None) is not None:
                await self._apply()

    async def _apply(self) -> None:
        device = self.egress_device
        if device is not None and self._rules:
            try:
                await self._run(render(self._rules.values(), device), quiet=True)
            except errors.FailedPrecondition as exc:
                self.egress_device = None
                log.warning("no netdev egress hook here (needs Linux 5.16+ and nftables "
                            "1.0.1+: %s): packets from AF_PACKET sockets with a tunnel's "
                            "source port are not filtered", exc)
            else:
                if not self._egress_said:
                    self._egress_said = True
                    log.info("VXLAN ports are also filtered on the egress of %s "
                             "(AF_PACKET senders included)", device)
                return
        await self._run(render(self._rules.values()))

    async def _run(self, script: str, *, quiet: bool = False) -> None:
        assert self._nft is not None
        proc = await asyncio.create_subprocess_exec(
            *self._prefix, self._nft, "-f", "-", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(script.encode()), NFT_TIMEOUT)
        except BaseException as exc:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if isinstance(exc, TimeoutError):
                raise errors.Unavailable(f"nft did not finish within {NFT_TIMEOUT:g} s") from None
            raise
        if proc.returncode != 0:
            first = (err.decode(errors="replace").strip().splitlines() or ["?"])[0]
            if not quiet:
                log.error("nft failed (%s) on:\n%s", first, script)
            raise errors.FailedPrecondition(f"cannot install the tunnel's packet filter: {first}")
