"""`metac node run|status|logs` on real nodes (issue 18 items 3, 9, 10)."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable

import pytest

from metac.testing.netns import Topology, ip
from metac.testing.nodes import NodeHost

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]


class DefaultAddressNode(NodeHost):
    """A node started without --address: it picks its own."""

    def node_argv(self, extra_services: object = None) -> list[str]:
        argv = super().node_argv()
        i = argv.index("--address")
        return argv[:i] + argv[i + 2:]


def ready_line(node: NodeHost) -> str:
    return next(line for line in node.log_text().splitlines() if "metac node ready" in line)


def test_default_address_is_the_default_route_interface_and_loopback_is_loud(
        topology_factory: Callable[[int], Topology]) -> None:
    host = topology_factory(1).hosts[0]
    subnet = ipaddress.ip_network(f"{host.ipv4}/{host.prefixlen4}", strict=False)
    gateway = str(subnet[200])
    ip("route", "add", "default", "via", gateway, "dev", host.ifname, netns=host.netns)
    with DefaultAddressNode(host) as node:
        node.start()
        line = ready_line(node)
        assert f"on {host.ipv4}:901" in line, line
        assert (f"chosen because the address of {host.ifname}, the interface of the IPv4 "
                f"default route via {gateway}") in line, line
        assert "WARNING" not in node.log_text()
        status = json.loads(node.metac("node", "status", "--json").stdout)
        assert status["address"] == host.ipv4
        node.stop()

        # No default route and no address but loopback: ::1, with a warning.
        ip("addr", "flush", "dev", host.ifname, netns=host.netns)
        node.start()
        line = ready_line(node)
        assert "on [::1]:901" in line, line
        log = node.log_text()
        assert "WARNING: serving on ::1 (no default route and no address but loopback): no " \
               "other machine can reach this node or use its refs; give --address" in log, log
