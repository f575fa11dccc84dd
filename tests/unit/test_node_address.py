"""The default address of `metac node run` (metac.node.address.choose_address)."""

from __future__ import annotations

from metac.node.address import AddressChoice, DefaultRoute, InterfaceAddress, choose_address

LO = [InterfaceAddress(1, "lo", "127.0.0.1", 8), InterfaceAddress(1, "lo", "::1", 128)]
ETH0 = [InterfaceAddress(2, "eth0", "192.0.2.10", 24),
        InterfaceAddress(2, "eth0", "2001:db8::10", 64),
        InterfaceAddress(2, "eth0", "fe80::1", 64)]
WG0 = [InterfaceAddress(3, "wg0", "10.8.0.2", 24), InterfaceAddress(3, "wg0", "fd00:8::2", 64)]


def test_the_address_of_the_ipv4_default_route_interface() -> None:
    routes = [DefaultRoute(4, 2, "192.0.2.1")]
    choice = choose_address(routes, LO + WG0 + ETH0)
    assert choice == AddressChoice(
        "192.0.2.10", "the address of eth0, the interface of the IPv4 default route via "
                      "192.0.2.1")


def test_ipv4_default_route_wins_over_ipv6_and_metric_orders_routes() -> None:
    routes = [DefaultRoute(6, 2, "2001:db8::1", metric=1024),
              DefaultRoute(4, 3, None, metric=50), DefaultRoute(4, 2, "192.0.2.1", metric=100)]
    choice = choose_address(routes, LO + ETH0 + WG0)
    assert choice.address == "10.8.0.2"
    assert "wg0" in choice.reason and "IPv4 default route" in choice.reason
    assert not choice.loopback


def test_ipv6_only_default_route_gives_its_global_address_not_link_local() -> None:
    routes = [DefaultRoute(6, 2, "fe80::ff", metric=1024)]
    assert choose_address(routes, LO + WG0 + ETH0).address == "2001:db8::10"


def test_the_route_source_address_then_the_gateway_subnet() -> None:
    two = [InterfaceAddress(2, "eth0", "198.51.100.7", 24),
           InterfaceAddress(2, "eth0", "192.0.2.10", 24)]
    assert choose_address([DefaultRoute(4, 2, "192.0.2.1")], two).address == "192.0.2.10"
    assert choose_address([DefaultRoute(4, 2, "192.0.2.1", prefsrc="198.51.100.7")],
                          two).address == "198.51.100.7"


def test_a_route_whose_interface_has_no_address_is_skipped() -> None:
    routes = [DefaultRoute(4, 9, "203.0.113.1"), DefaultRoute(4, 2, "192.0.2.1", metric=10)]
    assert choose_address(routes, LO + ETH0).address == "192.0.2.10"


def test_no_default_route_first_non_loopback_address_ipv4_first() -> None:
    choice = choose_address([], LO + ETH0)
    assert choice.address == "192.0.2.10"
    assert choice.reason == "no default route: the first address of eth0"
    assert not choice.loopback


def test_only_loopback_falls_back_to_ipv6_loopback_and_says_so() -> None:
    choice = choose_address([], LO + [InterfaceAddress(2, "eth0", "fe80::1", 64)])
    assert choice.address == "::1" and choice.loopback
    assert choose_address([], LO[:1]).address == "127.0.0.1"
    assert choose_address([], []).address == "::1"
