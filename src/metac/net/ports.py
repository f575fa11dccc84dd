"""Tunnel parameters: unique UDP ports, random VNIs, MTUs, peer address checks (pure)."""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Collection

from metac import errors

VNI_MAX = (1 << 24) - 1
DEFAULT_PORT_RANGE = (20000, 29999)
#: VXLAN encapsulation: outer IP + UDP (8) + VXLAN (8) + inner Ethernet (14).
OVERHEAD = {4: 20 + 8 + 8 + 14, 6: 40 + 8 + 8 + 14}
MIN_MTU = 576


def random_vni() -> int:
    """A VXLAN network identifier, 1..2**24-1, from ``secrets`` (an extra 24-bit secret)."""
    return 1 + secrets.randbelow(VNI_MAX)


def check_vni(vni: int) -> int:
    if not 1 <= vni <= VNI_MAX:
        raise errors.InvalidArgument(f"vniNum must be in 1..{VNI_MAX}")
    return vni


def check_port(port: int, what: str = "port") -> int:
    if not 1 <= port <= 65535:
        raise errors.InvalidArgument(f"{what} must be in 1..65535")
    return port


def port_range_from_env(value: str | None = None) -> tuple[int, int]:
    """``METAC_NET_PORTS=LOW-HIGH`` or the default range."""
    text = value if value is not None else os.environ.get("METAC_NET_PORTS", "")
    if not text:
        return DEFAULT_PORT_RANGE
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        raise errors.InvalidArgument("METAC_NET_PORTS must be LOW-HIGH") from None
    if not sep or not 1024 <= lo <= hi <= 65534:
        raise errors.InvalidArgument("METAC_NET_PORTS must be LOW-HIGH within 1024..65534")
    return lo, hi


class PortPool:
    """UDP ports for VXLAN ends: each taken by at most one tunnel of this service."""

    def __init__(self, low: int, high: int) -> None:
        if not 1 <= low <= high <= 65534:  # a VXLAN source range is [port, port + 1)
            raise ValueError(f"bad port range {low}-{high}")
        self.low, self.high = low, high
        self._taken: set[int] = set()

    def reserve(self, busy: Collection[int] = ()) -> int:
        """A random free port (not taken here, not in ``busy``), now taken."""
        size = self.high - self.low + 1
        for _ in range(64):
            port = self.low + secrets.randbelow(size)
            if port not in self._taken and port not in busy:
                self._taken.add(port)
                return port
        free = [p for p in range(self.low, self.high + 1) if p not in self._taken and p not in busy]
        if not free:
            raise errors.Unavailable(f"no free VXLAN port in {self.low}-{self.high}")
        port = secrets.choice(free)
        self._taken.add(port)
        return port

    def release(self, port: int) -> None:
        self._taken.discard(port)

    @property
    def taken(self) -> frozenset[int]:
        return frozenset(self._taken)


def tunnel_mtu(underlay_mtu: int, family: int) -> int:
    """Largest inner MTU that needs no fragmentation of the outer packets."""
    return max(MIN_MTU, underlay_mtu - OVERHEAD[family])


def check_peer_ip(text: str, *, family: int, expected: str | None = None) -> str:
    """The peer's tunnel address, normalised; it must be a unicast address of our family.

    ``expected`` (the node we reached the peer's interface through) must match
    when given, so a peer cannot point our tunnel at a third host.
    """
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise errors.InvalidArgument("remote address is not an IP address") from None
    if ip.is_multicast or ip.is_unspecified or (ip.version == 4 and ip == ipaddress.IPv4Address(
            "255.255.255.255")):
        raise errors.InvalidArgument("remote address must be a unicast address")
    if ip.version != family:
        raise errors.Unsupported("cannot tunnel between an IPv4 node and an IPv6 node")
    if expected is not None:
        try:
            want = ipaddress.ip_address(expected)
        except ValueError:
            want = None
        if want is not None and want != ip:
            raise errors.FailedPrecondition(
                "the peer answered with a tunnel address other than its node address")
    return str(ip)
