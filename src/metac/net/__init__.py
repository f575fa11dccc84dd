"""The network service (``net``): Ethernet ports as capabilities, joined over in-kernel VXLAN.

Serves (schema ``network.capnp``): ``NetworkServiceAdmin`` (root; the node's
``KernelNetworkNamespace`` and the list of live binds), ``KernelNetworkNamespace``,
``KernelInterface``, ``L2Interface`` and ``WaitableHolder`` (the holders of
binds and tunnel ends).

Runs no long-lived programs; ``nft -f -`` (Debian package nftables) is run
briefly to replace the service's packet filter table.

Kernel objects, all in the service's own network namespace (the node's):

* veth pairs for ``createInterface`` (``NAME`` <-> hidden ``mcp<id>``);
* per bind or tunnel end: a bridge ``mcb<id>`` and, between nodes, a unicast
  VXLAN device ``mcv<id>`` on a unique UDP port with a random VNI;
* the nftables table ``inet metac_net``: no local process may send from a
  VXLAN port, and a VXLAN port takes packets from its peer only.

Every link carries the marker ``managed by metac net/<id>/<role>`` in its
ifalias; a start removes marked links an earlier run left (except interfaces
that persistent refs still need) and the whole nft table. Netlink is used
through pyroute2 from one worker thread; nothing calls setns.

Modules: ``service`` (server classes), ``binds`` (bindTo), ``tunnels``
(VXLAN ends and bridges), ``devices`` (interfaces and ownership), ``links``
(pyroute2), ``firewall`` (nft), ``ports`` (ports, VNIs, MTUs), ``state``
(the shared context).
"""
