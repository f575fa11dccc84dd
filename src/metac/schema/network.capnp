@0x8e4a54fccbe6e5a4;
# Layer 2 networks (paper sections 4 and 8.2).

using Core = import "core.capnp";

interface L2Interface extends(Core.Persistable) {
  # A layer 2 (Ethernet) port.
  setupVxlan @0 (remote :Core.NodeAddress, dstPort :UInt16, vniNum :UInt32)
      -> (local :Core.NodeAddress, srcPort :UInt16, holder :Core.Holder);
  # Sets up a unicast VXLAN tunnel between remote and the node owning this
  # interface. The caller reserves dstPort (UDP, on remote) before the call;
  # the owner picks and reserves srcPort. vniNum (24 bits) is an extra shared
  # secret. The tunnel lives as long as the holder.
  bindTo @1 (other :L2Interface) -> (holder :Core.Holder);
  # Pipes all traffic between this and other (bridging, or VXLAN when other
  # is on another node) as long as the holder lives.
  localToken @2 () -> (token :Data);
  # Added (issue 5): an unguessable value naming this interface inside the
  # service that serves it. bindTo asks `other` for it to recognise an
  # interface of its own node and bridge locally instead of tunnelling. An
  # implementation without it is simply treated as remote.
}

interface WaitableHolder extends(Core.Holder, Core.Waitable) {
  # Added (issue 5): the holder returned by setupVxlan and bindTo. wait()
  # returns when the action ends (released by anyone) and fails when the
  # service keeping it goes away, so the other end of a tunnel can tear its
  # half down or re-establish it.
}

interface KernelInterface extends(L2Interface, Core.Destroyable) {
  # An existing kernel network interface. destroy() (paper: "Destroys
  # interface") is inherited from Core.Destroyable, so generic tools can tear
  # down anything destroyable with one call.
  getName @0 () -> (name :Text);
  rename @1 (newname :Text);
  l2Interface @2 () -> (iface :L2Interface);
  # The L2Interface associated with this kernel interface.
}

interface KernelNetworkNamespace extends(Core.Persistable) {
  listInterfaces @0 () -> (interfaces :List(KernelInterface));
  createInterface @1 (name :Text) -> (iface :KernelInterface);
  # pycapnp clients pass `name` positionally (here and below): name= clashes with
  # the first parameter of the client's _send(name, ...).
  # Creates a new interface; no interface named name may exist yet.
  getInterface @2 (name :Text) -> (iface :KernelInterface);
  # Added: an existing interface by name (the CLI's local:devname), without
  # listing every interface and asking each for its name.
}

struct BindInfo {
  # Added: one action of the network service (a bind or a tunnel end), for
  # `metac net ls`.
  kind @0 :Text;
  # "bind" (two interfaces joined on this node) or "vxlan" (a tunnel end).
  ifname @1 :Text;
  # Local kernel interface carrying it (the bridge or the vxlan device).
  peer @2 :Text;
  # For display: the other interface's name, or "[ip]:port" of the remote
  # tunnel end. Never the VNI, which is a secret.
  holder @3 :Core.Holder;
  # So `metac net unbind` can release an action made by another client.
  device @4 :Text;
  # Added (issue 5): the local interface that is bound (the user's device).
  state @5 :Text;
  # Added (issue 5): "up", "connecting" or "broken: <reason>".
  persistent @6 :Bool;
  # Added (issue 5): re-established when the service starts again.
}

interface NetworkServiceAdmin extends(Core.ServiceAdmin) {
  rootNamespace @0 () -> (ns :KernelNetworkNamespace);
  # The node's initial network namespace.
  listBinds @1 () -> (binds :List(BindInfo));
  # Added: the live binds and tunnels, for `metac net ls`.
}
