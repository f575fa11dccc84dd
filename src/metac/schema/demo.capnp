@0xfe802a14c1aa7473;
# Added (not in the paper): a tiny service for the core test-suite, to test
# nodes, sturdy refs and recursive persistence without kernel resources.

using Core = import "core.capnp";

interface Counter extends(Core.Persistable) {
  increment @0 (by :Int64) -> (value :Int64);
  # Adds by and returns the new value.
  value @1 () -> (value :Int64);
  name @2 () -> (name :Text);
}

interface Box extends(Core.Persistable) {
  # Holds a capability, possibly from another node: persisting a box persists
  # what it holds (recursive persistence).
  get @0 () -> (cap :Core.Persistable);
  label @1 () -> (label :Text);
}

interface DemoAdmin extends(Core.ServiceAdmin) {
  makeCounter @0 (name :Text) -> (counter :Counter);
  # pycapnp clients pass `name` positionally (here and below): name= clashes with
  # the first parameter of the client's _send(name, ...).
  makeBox @1 (label :Text, cap :Core.Persistable) -> (box :Box);
  lease @2 (label :Text) -> (holder :Core.Holder);
  # A holder that keeps `label` in the lease list until it is released or
  # dropped (tests that a client's holders die with its connection).
  leases @3 () -> (labels :List(Text));
}
