"""Paper section 4's protection of a tunnel, tested with crafted packets.

* No local process may send from a VXLAN port (nft owner match on output).
* Frames with the wrong VNI, or from a host other than the peer, do not reach
  the bridge. Whether a frame reached B's bridge is read from B's bridge FDB:
  a frame with a fresh source MAC that gets through is learned there.

Every packet goes to an address of the test's own namespaces.
"""

from __future__ import annotations

import sys
import time

import pytest
from test_net_bind import bind_new, container, export, ip_json, ping_ok, stop, vxlans

from metac.testing.netns import Host
from metac.testing.nodes import NodeHost

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

# Crafts one VXLAN packet (inner frame: broadcast, fresh source MAC, a local
# ethertype) and sends it. argv: mode src_ip sport dst_ip dport vni mac
# mode "udp": a raw UDP socket (kernel picks the source address: the host's own);
# mode "spoof": IP_HDRINCL, so the IPv4 source address is src_ip.
CRAFT = r"""
import errno, socket, struct, sys
mode, src, sport, dst, dport, vni, mac = sys.argv[1:8]
sport, dport, vni = int(sport), int(dport), int(vni)
frame = b"\xff" * 6 + bytes.fromhex(mac.replace(":", "")) + b"\x88\xb5" + b"metac-test" * 5
payload = struct.pack("!II", 0x08000000, vni << 8) + frame
udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
try:
    if mode == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        s.sendto(udp, (dst, 0))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                          socket.inet_aton(src), socket.inet_aton(dst))
        csum = sum(struct.unpack("!10H", hdr))
        csum = (csum & 0xFFFF) + (csum >> 16)
        csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
        s.sendto(hdr[:10] + struct.pack("!H", csum) + hdr[12:] + udp, (dst, 0))
    print("sent")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc.errno))
"""

# Tries to send ordinary UDP from the tunnel's port, as an unprivileged user.
# argv: port dst4 dst6 dport. Prints one word per attempt.
LOCAL_UDP = r"""
import errno, socket, sys
port, dst4, dst6, dport = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
def attempt(family, bind, dst, v6only=False):
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if v6only:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((bind, port))
    except OSError as exc:
        return "bind:" + errno.errorcode.get(exc.errno, str(exc.errno))
    try:
        s.sendto(b"x" * 32, (dst, dport))
        return "sent"
    except OSError as exc:
        return "send:" + errno.errorcode.get(exc.errno, str(exc.errno))
print(attempt(socket.AF_INET, "0.0.0.0", dst4), attempt(socket.AF_INET6, "::", dst6, True))
"""

SEND_FRAME = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
mac = bytes.fromhex(sys.argv[1].replace(":", ""))
s.send(b"\xff" * 6 + mac + b"\x88\xb5" + b"metac-test" * 5)
print("sent")
"""


# The same VXLAN packet as CRAFT, written whole (Ethernet header and all) on an AF_PACKET
# socket, which passes no IP hook. argv: ifname src_mac dst_mac src_ip sport dst_ip dport
# vni mac [bypass]. Prints "sent" or the errno name.
CRAFT_PACKET = r"""
import errno, socket, struct, sys
ifname, smac, dmac, src, sport, dst, dport, vni, mac = sys.argv[1:10]
sport, dport, vni = int(sport), int(dport), int(vni)
frame = b"\xff" * 6 + bytes.fromhex(mac.replace(":", "")) + b"\x88\xb5" + b"metac-test" * 5
payload = struct.pack("!II", 0x08000000, vni << 8) + frame
udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                  socket.inet_aton(src), socket.inet_aton(dst))
csum = sum(struct.unpack("!10H", hdr))
csum = (csum & 0xFFFF) + (csum >> 16)
csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
ip = hdr[:10] + struct.pack("!H", csum) + hdr[12:] + udp
eth = bytes.fromhex(dmac.replace(":", "")) + bytes.fromhex(smac.replace(":", "")) + b"\x08\x00"
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
if len(sys.argv) > 10:
    s.setsockopt(263, 20, 1)  # PACKET_QDISC_BYPASS
s.bind((ifname, 0))
try:
    s.send(eth + ip)
    print("sent")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc.errno))
"""


def mac_of(host: Host) -> str:
    return str(ip_json(host, "link", "show", host.ifname)[0]["address"])


def craft(host: Host, *args: object) -> str:
    return host.run([sys.executable, "-c", CRAFT, *map(str, args)]).stdout.strip()


def learned(node: NodeHost, mac: str) -> bool:
    """Did a frame with source ``mac`` reach one of ``node``'s metac bridges?"""
    fdb = node.host.run(["bridge", "fdb", "show"]).stdout.lower()
    return any(line.startswith(mac.lower()) and " master mcb" in line
               for line in fdb.splitlines())


def settle() -> None:
    time.sleep(0.5)


@pytest.fixture
def tunnel(nodes_factory):
    """Nodes A and B (and C), with A's port0 bound to B's remote0; the ports and VNI."""
    a, b, c = nodes_factory(3)
    ca = container(a, "ca", dev="port0", addr="192.168.79.1")
    bind = bind_new(b, export(a, "port0"), "remote0", "192.168.79.2")
    ping_ok(ca, "192.168.79.2")
    (vx_a,), (vx_b,) = vxlans(a), vxlans(b)
    assert vx_a["id"] == vx_b["id"]
    yield a, b, c, ca, vx_a["port"], vx_b["port"], vx_a["id"]
    assert stop(bind)[0] == 0


def test_local_process_cannot_send_from_the_vxlan_port(tunnel) -> None:
    a, b, _c, ca, port_a, port_b, vni = tunnel
    # An unprivileged process: the IPv4 port is the kernel's (bind fails); an
    # IPv6 socket on the same number binds but cannot send.
    out = a.host.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                      sys.executable, "-c", LOCAL_UDP, str(port_a), b.host.ipv4, b.host.ipv6,
                      str(port_b)]).stdout.split()
    assert out == ["bind:EADDRINUSE", "send:EPERM"], out

    # Root with a raw socket: a well-formed VXLAN packet from A's tunnel port,
    # with the right VNI, is dropped on the way out.
    assert craft(a.host, "udp", a.host.ipv4, port_a, b.host.ipv4, port_b, vni,
                 "02:00:5e:00:00:01") == "EPERM"
    # The same from any other source port leaves A but is refused by B.
    assert craft(a.host, "udp", a.host.ipv4, port_a + 1, b.host.ipv4, port_b, vni,
                 "02:00:5e:00:00:02") == "sent"
    settle()
    assert not learned(b, "02:00:5e:00:00:01")
    assert not learned(b, "02:00:5e:00:00:02")

    # Control: a frame entering A's bound device does reach B's bridge.
    assert ca.run([sys.executable, "-c", SEND_FRAME, "02:00:5e:00:00:03"]).stdout.strip() == "sent"
    settle()
    assert learned(b, "02:00:5e:00:00:03")

    # The kernel's own tunnel packets are not caught by the owner match.
    rules = a.host.run(["nft", "list", "table", "inet", "metac_net"]).stdout
    assert f"udp sport {port_a} meta skuid >= 0 drop" in rules


def test_packet_socket_cannot_send_from_the_vxlan_port(tunnel) -> None:
    a, b, _c, _ca, port_a, port_b, vni = tunnel
    # The egress hook of A's node interface holds the owner match too.
    rules = a.host.run(["nft", "list", "table", "netdev", "metac_net"]).stdout
    assert f'hook egress device "{a.host.ifname}"' in rules
    assert f"udp sport {port_a} meta skuid >= 0 drop" in rules
    head = [a.host.ifname, mac_of(a.host), mac_of(b.host), a.host.ipv4]
    # Root writes a whole frame on a packet socket: dropped on A's egress, with or
    # without the qdisc bypass, and B's bridge never sees it.
    for mac, extra in (("02:00:5e:00:02:01", []), ("02:00:5e:00:02:02", ["bypass"])):
        out = a.host.run([sys.executable, "-c", CRAFT_PACKET, *head, str(port_a),
                          b.host.ipv4, str(port_b), str(vni), mac, *extra]).stdout.strip()
        assert out == "ENOBUFS", (extra, out)
    settle()
    assert not learned(b, "02:00:5e:00:02:01")
    assert not learned(b, "02:00:5e:00:02:02")
    # Control: without the egress table the very same packet gets through (so the
    # packet is well-formed and the hook is what stops it). The next change of the
    # service's rules puts the table back.
    a.host.run(["nft", "delete", "table", "netdev", "metac_net"])
    out = a.host.run([sys.executable, "-c", CRAFT_PACKET, *head, str(port_a), b.host.ipv4,
                      str(port_b), str(vni), "02:00:5e:00:02:03"]).stdout.strip()
    assert out == "sent"
    settle()
    assert learned(b, "02:00:5e:00:02:03")


def test_wrong_vni_or_other_host_does_not_reach_the_bridge(tunnel) -> None:
    a, b, c, _ca, port_a, port_b, vni = tunnel
    wrong = vni ^ 0x5A5A5
    # From C, claiming to be A (address and port): the wrong VNI is dropped by the kernel.
    assert craft(c.host, "spoof", a.host.ipv4, port_a, b.host.ipv4, port_b, wrong,
                 "02:00:5e:00:01:01") == "sent"
    # From C as itself, right VNI, A's port number: dropped by B's packet filter.
    assert craft(c.host, "spoof", c.host.ipv4, port_a, b.host.ipv4, port_b, vni,
                 "02:00:5e:00:01:02") == "sent"
    assert craft(c.host, "udp", c.host.ipv4, port_a, b.host.ipv4, port_b, vni,
                 "02:00:5e:00:01:03") == "sent"
    # And towards A's end, from C: dropped too.
    assert craft(c.host, "udp", c.host.ipv4, port_b, a.host.ipv4, port_a, vni,
                 "02:00:5e:00:01:04") == "sent"
    settle()
    for mac in ("02:00:5e:00:01:01", "02:00:5e:00:01:02", "02:00:5e:00:01:03"):
        assert not learned(b, mac), mac
    assert not learned(a, "02:00:5e:00:01:04")

    # Control, and the limit of what a node can check: a packet with A's address,
    # A's port and the right VNI is accepted. Preventing address spoofing is the
    # backplane's job (paper 2.2); the VNI is the remaining secret.
    assert craft(c.host, "spoof", a.host.ipv4, port_a, b.host.ipv4, port_b, vni,
                 "02:00:5e:00:01:05") == "sent"
    settle()
    assert learned(b, "02:00:5e:00:01:05")
    assert ip_json(b.host, "link", "show", "remote0")
