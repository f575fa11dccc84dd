@0x9e3c28170ce3edce;
# Byte streams (paper section 3.1).

using Core = import "core.capnp";

interface Stream extends(Core.Persistable) {
  # Resource interfaces extend Persistable so that one server object answers
  # both (a pycapnp server implements exactly one interface tree).
  tcpListen @0 (remote :Core.NodeAddress, remotePort :Int32)
      -> (local :Core.NodeAddress, port :Int32, holder :Core.Holder);
  bindTo @1 (other :Stream) -> (holder :Core.Holder);
}
