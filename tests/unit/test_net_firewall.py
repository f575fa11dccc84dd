"""The network service's nft table, rendered as text (pure)."""

from __future__ import annotations

import pytest

from metac.net.firewall import TABLE, PortRule, render

HEAD = (f"table inet {TABLE}\ndelete table inet {TABLE}\n"
        f"table netdev {TABLE}\ndelete table netdev {TABLE}\n")


def test_empty_ruleset_removes_the_tables() -> None:
    assert render([]) == HEAD
    assert render([], "eth0") == HEAD


def test_egress_hook_repeats_the_owner_match_for_packet_sockets() -> None:
    text = render([PortRule(20001), PortRule(20002, "10.1.2.3", 24000)], "eth0")
    assert text.startswith(HEAD)
    lines = [line.strip() for line in text.splitlines()]
    start = lines.index(f"table netdev {TABLE} {{")
    assert lines[start + 2] == ('type filter hook egress device "eth0" priority filter; '
                                "policy accept;")
    assert lines[start + 3:start + 5] == ["udp sport 20001 meta skuid >= 0 drop",
                                          "udp sport 20002 meta skuid >= 0 drop"]
    assert "egress" not in render([PortRule(20001)])  # no device: no egress chain


@pytest.mark.parametrize("name", ["", "a" * 16, 'eth"0', "eth0; drop", "a}b", "a b"])
def test_egress_device_names_are_checked(name: str) -> None:
    with pytest.raises(ValueError):
        render([PortRule(20001)], name)


def test_port_without_peer_accepts_nothing_and_blocks_local_senders() -> None:
    text = render([PortRule(20001)])
    assert text.startswith(HEAD)
    assert "udp sport 20001 meta skuid >= 0 drop" in text
    assert "udp dport 20001 drop" in text
    assert "accept\n" not in text


def test_peer_is_accepted_before_the_drop() -> None:
    text = render([PortRule(20001, "10.1.2.3", 24000), PortRule(20002, "fd00::2", 25000)])
    lines = [line.strip() for line in text.splitlines()]
    accept4 = lines.index("udp dport 20001 ip saddr 10.1.2.3 udp sport 24000 accept")
    assert lines.index("udp dport 20001 drop") == accept4 + 1
    accept6 = lines.index("udp dport 20002 ip6 saddr fd00::2 udp sport 25000 accept")
    assert lines.index("udp dport 20002 drop") == accept6 + 1
    assert "udp sport 20002 meta skuid >= 0 drop" in lines
    # Chains hook output and input of both families.
    assert "type filter hook output priority filter; policy accept;" in lines
    assert "type filter hook input priority filter; policy accept;" in lines


def test_render_is_deterministic_and_normalises_addresses() -> None:
    a = [PortRule(20002, "FD00:0::2", 1), PortRule(20001)]
    b = [PortRule(20001), PortRule(20002, "fd00::2", 1)]
    assert render(a) == render(b)
    assert "fd00::2" in render(a)


@pytest.mark.parametrize(
    "args",
    [(0,), (65536,), (1, "10.0.0.1", None), (1, None, 5), (1, "not-an-ip", 5), (1, "10.0.0.1", 0)],
)
def test_bad_rules_are_rejected(args: tuple) -> None:
    with pytest.raises(ValueError):
        PortRule(*args)
