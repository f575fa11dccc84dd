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

interface StreamServiceAdmin extends(Core.ServiceAdmin) {
  # Added (not in the paper): the stream service's admin bootstrap (root only),
  # used by `metac stream export`. Each returned Stream is a persistable
  # endpoint of this node; every use of it (tcpListen, bindTo) opens a new
  # connection to the endpoint.
  tcpEndpoint @0 (host :Text, port :UInt16) -> (stream :Stream);
  # A TCP endpoint as seen from this node (host: IP address or DNS name).
  unixEndpoint @1 (path :Text) -> (stream :Stream);
  # A unix stream socket of this node (absolute path).
}
