"""Tunnel parameters: ports, VNIs, MTUs and peer addresses (pure)."""

from __future__ import annotations

import pytest

from metac import errors
from metac.net.ports import (
    DEFAULT_PORT_RANGE,
    VNI_MAX,
    PortPool,
    check_peer_ip,
    check_port,
    check_vni,
    port_range_from_env,
    random_vni,
    tunnel_mtu,
)


def test_random_vni_is_in_range_and_varies() -> None:
    vnis = {random_vni() for _ in range(200)}
    assert all(1 <= v <= VNI_MAX for v in vnis)
    assert len(vnis) > 190


def test_check_vni_and_port() -> None:
    assert check_vni(1) == 1 and check_vni(VNI_MAX) == VNI_MAX
    for bad in (0, VNI_MAX + 1, -1):
        with pytest.raises(errors.InvalidArgument):
            check_vni(bad)
    assert check_port(4789) == 4789
    with pytest.raises(errors.InvalidArgument, match="dstPort"):
        check_port(0, "dstPort")


def test_pool_hands_out_unique_ports_and_skips_busy_ones() -> None:
    pool = PortPool(30000, 30009)
    busy = {30000, 30001}
    got = {pool.reserve(busy) for _ in range(8)}
    assert got == set(range(30002, 30010))
    with pytest.raises(errors.Unavailable):
        pool.reserve(busy)
    pool.release(30005)
    assert pool.reserve(busy) == 30005
    assert pool.taken == frozenset(range(30002, 30010))


def test_pool_range_leaves_room_for_the_source_range() -> None:
    with pytest.raises(ValueError):
        PortPool(1000, 65535)
    with pytest.raises(ValueError):
        PortPool(5, 4)


def test_port_range_from_env() -> None:
    assert port_range_from_env("") == DEFAULT_PORT_RANGE
    assert port_range_from_env("40000-40100") == (40000, 40100)
    for bad in ("x", "40000", "100-200", "50000-40000", "1-65535"):
        with pytest.raises(errors.InvalidArgument):
            port_range_from_env(bad)


def test_tunnel_mtu() -> None:
    assert tunnel_mtu(1500, 4) == 1450
    assert tunnel_mtu(1500, 6) == 1430
    assert tunnel_mtu(9000, 4) == 8950
    assert tunnel_mtu(600, 6) == 576


def test_check_peer_ip() -> None:
    assert check_peer_ip("10.0.0.2", family=4) == "10.0.0.2"
    assert check_peer_ip("FD00:0::2", family=6, expected="fd00::2") == "fd00::2"
    with pytest.raises(errors.Unsupported, match="IPv4 node and an IPv6 node"):
        check_peer_ip("fd00::2", family=4)
    for bad in ("224.0.0.1", "0.0.0.0", "255.255.255.255", "nonsense", "ff02::1"):
        with pytest.raises(errors.InvalidArgument):
            check_peer_ip(bad, family=6 if ":" in bad else 4)
    with pytest.raises(errors.FailedPrecondition, match="other than its node address"):
        check_peer_ip("10.0.0.3", family=4, expected="10.0.0.2")
