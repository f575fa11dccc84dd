"""Which address `metac node run` serves on when not given ``--address``.

The node names itself in every ref it hands out, so the address must be one that
other machines reach: the address of the interface the default route leaves through
(the one this host uses to talk to the rest of the network). :func:`choose_address`
is the pure rule, over route and address data; :func:`default_address` reads that
data from the kernel (rtnetlink).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class DefaultRoute:
    """One default route (0.0.0.0/0 or ::/0) of the main table."""

    version: int  # 4 or 6
    oif: int  # the interface index it leaves through
    gateway: str | None = None
    metric: int = 0
    prefsrc: str | None = None  # the source address the route names, if any


@dataclass(frozen=True)
class InterfaceAddress:
    index: int
    ifname: str
    address: str
    prefixlen: int


@dataclass(frozen=True)
class AddressChoice:
    address: str
    #: Why this one, for the ready line ("the address of eth0, the interface of the
    #: default route via 192.0.2.1").
    reason: str
    #: Loopback: no other machine can reach the node (the caller warns loudly).
    loopback: bool = False


def _usable(ip: IPAddress) -> bool:
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified)


def _rank(addr: InterfaceAddress, route: DefaultRoute) -> tuple[int, int]:
    """Lower is better: the route's own source address, then one on the gateway's subnet."""
    if route.prefsrc and addr.address == route.prefsrc:
        return (0, 0)
    if route.gateway:
        net = ipaddress.ip_network(f"{addr.address}/{addr.prefixlen}", strict=False)
        if ipaddress.ip_address(route.gateway) in net:
            return (1, 0)
    return (2, 0)


def choose_address(routes: Sequence[DefaultRoute],
                   addresses: Sequence[InterfaceAddress]) -> AddressChoice:
    """The address to serve on, and why.

    1. The default route with the lowest metric, IPv4 routes before IPv6 ones: the
       address it names as source, else the address of its interface on the
       gateway's subnet, else that interface's first address (same IP version).
    2. No default route (or none with a usable address): the first address of any
       interface, IPv4 first, not loopback or link-local.
    3. Nothing at all: ``::1`` (``127.0.0.1`` where IPv6 is off; ``loopback=True``:
       other machines cannot reach it).
    """
    parsed = [(a, ipaddress.ip_address(a.address)) for a in addresses]
    usable = [(a, ip) for a, ip in parsed if _usable(ip)]
    for route in sorted(routes, key=lambda r: (r.version != 4, r.metric)):
        on_oif = [a for a, ip in usable if a.index == route.oif and ip.version == route.version]
        if not on_oif:
            continue
        best = min(on_oif, key=lambda a: _rank(a, route))
        via = f" via {route.gateway}" if route.gateway else ""
        return AddressChoice(best.address, f"the address of {best.ifname}, the interface of "
                                           f"the IPv{route.version} default route{via}")
    if usable:
        best, _ = min(usable, key=lambda pair: (pair[1].version != 4, not pair[1].is_global))
        return AddressChoice(best.address, f"no default route: the first address of {best.ifname}")
    loopback = "::1" if any(ip == ipaddress.ip_address("::1") for _, ip in parsed) or not any(
        ip == ipaddress.ip_address("127.0.0.1") for _, ip in parsed) else "127.0.0.1"
    return AddressChoice(loopback, "no default route and no address but loopback", loopback=True)


def read_routes_and_addresses() -> tuple[list[DefaultRoute], list[InterfaceAddress]]:
    """This network namespace's default routes and interface addresses (rtnetlink)."""
    from pyroute2 import IPRoute

    routes: list[DefaultRoute] = []
    addresses: list[InterfaceAddress] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
            for msg in ipr.get_routes(family=family, table=254):
                if msg["dst_len"] != 0 or msg["type"] != 1:  # 1: RTN_UNICAST
                    continue
                oif = msg.get_attr("RTA_OIF")
                gateway = msg.get_attr("RTA_GATEWAY")
                multipath = msg.get_attr("RTA_MULTIPATH")
                if oif is None and multipath:
                    oif = multipath[0]["oif"]
                    gateway = gateway or multipath[0].get_attr("RTA_GATEWAY")
                if oif is None:
                    continue
                routes.append(DefaultRoute(version, oif, gateway,
                                           msg.get_attr("RTA_PRIORITY") or 0,
                                           msg.get_attr("RTA_PREFSRC")))
        for msg in ipr.get_addr():
            addr = msg.get_attr("IFA_ADDRESS")
            if addr is None:
                continue
            addresses.append(InterfaceAddress(msg["index"], names.get(msg["index"], "?"), addr,
                                              msg["prefixlen"]))
    return routes, addresses


def default_address() -> AddressChoice:
    """The address :func:`choose_address` picks on this host."""
    try:
        routes, addresses = read_routes_and_addresses()
    except ImportError:
        return AddressChoice("::1", "pyroute2 is not installed", loopback=True)
    return choose_address(routes, addresses)
