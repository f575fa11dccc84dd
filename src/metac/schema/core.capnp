@0x88bec3c9c60767aa;
# Core of the MetaContainer protocol (paper sections 2 and 5).

struct NodeAddress {
  ip @0 :Text;
  # Textual IPv4 or IPv6 address of the node.
  port @1 :UInt16;
  # Added to the paper's struct: the node's RPC port, so several nodes can
  # share one machine. 0 means the well-known port 901.
}

interface Holder extends(Persistable) {
  # Keeps an action (a mount, a bind, a tunnel) alive; dropping every
  # reference undoes it. Extends Persistable (added) so that an action made
  # with --persistent can be kept as a sturdy ref and re-established after a
  # restart.
  release @0 ();
  # Added: undo the action now instead of waiting for the last reference to
  # go away, so a client can release explicitly and know it happened.
}

interface ResourceGroup {
  # Accounting group. Refs created in a group are revoked when the group is
  # dropped (see persistence.capnp, PersistenceAdmin.dropGroup).
  name @0 () -> (name :Text);
  # Added (the paper's group has no methods): lets the persistence service
  # file a ref under the group it was given.
  token @1 () -> (token :Data);
  # Added: the group's secret. Persistence files a ref under a group only if
  # the token is one it issued: a client-made object's name() proves nothing.
}

struct MetacSturdyRef {
  node @0 :NodeAddress;
  service @1 :Text;
  # The service the object lives in; restored through Node.getService(service).
  objectInfo @2 :Data;
  # Deviation: Data instead of AnyPointer. Our refs are always printable, and
  # the payload is an unguessable secret (>= 128 random bits).
}

interface Persistable {
  createSturdyRef @0 (rgroup :ResourceGroup, persistent :Bool, alias :Bool)
      -> (id :MetacSturdyRef);
  # alias (added): for a service that reaches a capability handed to it over
  # its own connection (it restores the new ref at once). On a capability
  # restored from a ref R, the new ref is then R under a temporary name: never
  # persistent, revoked with R, and refs made through it are R's children.
  # Without alias such a ref is a child of R (see persistence.adoptChild).
}

interface Waitable {
  # Added: something that ends (a process, a VM). wait() returns when it does.
  wait @0 ();
}

interface Destroyable {
  # Added: something that can be torn down explicitly.
  destroy @0 ();
}

interface Service {
  # Unprivileged bootstrap interface of a service.
  restore @0 (objectInfo :Data) -> (obj :AnyPointer, interfaceId :UInt64);
  # Added: interfaceId is the type id of the object's interface (0: not said), so a
  # client can tell "this ref is a Filesystem" instead of failing its first call.
  # objectInfo is Data for the same reason as in MetacSturdyRef.
  dropAlias @1 (objectInfo :Data);
  # Added: revoke an alias (Persistable.createSturdyRef with alias) that its
  # holder no longer needs, e.g. when the mount that made it is released.
  # Any other ref: NotFound.
}

interface ServiceAdmin {
  # Privileged bootstrap interface of a service; each service extends it.
}

interface Node {
  # Bootstrap interface for everybody (TCP port 901).
  address @0 () -> (address :NodeAddress);
  getService @1 (name :Text) -> (service :Service);
}

struct ServiceStatus {
  # Added for `metac node status`.
  name @0 :Text;
  state @1 :Text;       # "starting", "registered", "restarting", "stopped"
  pid @2 :Int32;
  restarts @3 :UInt32;
}

interface NodeAdmin {
  # Bootstrap interface for root (unix socket in the runtime dir, mode 0600).
  getServiceAdmin @0 (name :Text) -> (service :ServiceAdmin);
  registerNamedService @1 (name :Text, service :Service, adminBootstrap :ServiceAdmin)
      -> (holder :Holder);
  getUnprivilegedNode @2 () -> (node :Node);
  listServices @3 () -> (services :List(ServiceStatus));
  # Added: service states for `metac node status`.
}
