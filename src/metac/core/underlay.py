"""The MTU a VXLAN tunnel of this node leaves to what rides on it.

The net service's tunnels run over the interface that carries the node address
(the underlay). Services that attach their own devices to such a tunnel (a
container's veth, a VM's tap) give them the tunnel's MTU, so large frames are
not dropped inside it. Services cannot import the net service, hence this small
shared piece.
"""

from __future__ import annotations

import ipaddress

VXLAN_OVERHEAD = {4: 50, 6: 70}  # outer IP + UDP + VXLAN + inner Ethernet headers


def tunnel_mtu(underlay: int, node_address: str) -> int:
    """The MTU inside a tunnel whose underlay has MTU ``underlay`` (at least 1280)."""
    family = ipaddress.ip_address(node_address).version
    return max(1280, underlay - VXLAN_OVERHEAD[family])


def underlay_mtu(node_address: str) -> int:
    """MTU of the interface carrying the node address (1500 if not found). Blocking:
    pyroute2 runs its own event loop, so call it in an executor."""
    try:
        from pyroute2 import IPRoute
    except ImportError:
        return 1500
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            if msg.get_attr("IFA_ADDRESS") == node_address:
                links = ipr.get_links(msg["index"])
                if links:
                    return int(links[0].get_attr("IFLA_MTU") or 1500)
    return 1500
