@0xf07f83761cc7396a;
# Persistence service (paper section 5.3).

using Core = import "core.capnp";

struct CapDescription {
  runtimeId @0 :Text;
  # Unique id of the live object; a second createSturdyRef of the same object
  # reuses the stored description (a new secret is still minted).
  category @1 :Text;
  # Kind of object, passed to the restorer as is.
  description @2 :Data;
  # Deviation: opaque service-specific bytes instead of AnyPointer. The
  # capabilities a description refers to are listed in `caps` (by index), so
  # the persistence service can persist them without knowing the service's
  # schema.
  caps @3 :List(Core.Persistable);
  # Capabilities the description holds (recursive persistence): stored as
  # persistent sturdy refs, restored (possibly from other nodes) before the
  # restorer is called.
  active @4 :Bool;
  # Added: restore at service start instead of on first use. For objects that
  # are actions (mounts, binds) which must be re-established after a restart.
}

interface Restorer {
  restoreFromDescription @0 (description :CapDescription) -> (cap :AnyPointer);
  wait @1 ();
  # Added: never returns while the service runs. Persistence keeps one call
  # pending; when it fails the service is gone and its live objects are
  # dropped at once instead of being handed out broken.
  revoke @2 (refs :List(Data));
  # Added: these refs (stored hashes, as `restore` names them) were revoked;
  # the service cuts every capability it handed out through them (membrane).
}

interface ServicePersistenceHandler {
  registerRestorer @0 (restorer :Restorer) -> (holder :Core.Holder);
  # Returns a holder (added): dropping it unregisters the restorer.
  createSturdyRef @1 (group :Core.ResourceGroup, description :CapDescription,
                      persistent :Bool, cap :AnyPointer) -> (ref :Core.MetacSturdyRef);
  restore @2 (objectInfo :Data) -> (obj :AnyPointer, refKey :Data, persistent :Bool,
                                    runtimeId :Text);
  # Added: restore a ref of this handler's service (used by Service.restore).
  # refKey names the ref (its stored hash, never the secret) for `adoptChild`
  # and `Restorer.revoke`; runtimeId names the object.
  adoptChild @5 (parent :Data, child :Core.MetacSturdyRef, alias :Bool);
  # Added: `child`, just minted through a capability restored from the ref
  # `parent` (a refKey), becomes its child: revoked with it, never more
  # persistent, counted against its quota (PermissionDenied past it; the
  # child is then revoked). A child of another node or service is left alone.
  dropAlias @6 (objectInfo :Data);
  # Added: Service.dropAlias of this handler's service.
  forget @4 (runtimeId :Text) -> (revoked :UInt32);
  # Added: revoke every ref of this service's object with that runtime id
  # (an action undone by its owner, e.g. `metac fs umount` of a persistent
  # mount, must not come back at the next start).
  watch @3 ();
  # Added: never returns while persistence runs; lets a service notice at once
  # that persistence restarted and its restorer must be registered again.
}

struct RefInfo {
  shortId @0 :Text;
  # First hex digits of the stored hash; never the secret.
  service @1 :Text;
  category @2 :Text;
  persistent @3 :Bool;
  created @4 :Float64;
  # Unix time.
  group @5 :Text;
  live @6 :Bool;
  # Is the object currently restored in memory?
  parent @7 :Text;
  # Added: short id of the ref this one was minted through ("" for the admin's).
  description @8 :Text;
  # Added: what the ref is (a path, an endpoint, an interface...); never a secret.
}

struct GroupInfo {
  # Added: one resource group, for `metac ref group ls`.
  name @0 :Text;
  created @1 :Float64;
  refs @2 :UInt32;
}

interface PersistenceAdmin extends(Core.ServiceAdmin) {
  getHandlerFor @0 (serviceName :Text) -> (handler :ServicePersistenceHandler);
  listRefs @1 () -> (refs :List(RefInfo));
  getRefInfo @2 (objectInfo :Data) -> (info :RefInfo);
  deleteRef @3 (objectInfo :Data, shortId :Text) -> (info :RefInfo);
  # Revoke one ref for good, by secret or by the short id `listRefs` shows.
  createGroup @4 (name :Text) -> (group :Core.ResourceGroup);
  getGroup @5 (name :Text) -> (group :Core.ResourceGroup);
  dropGroup @6 (name :Text) -> (revoked :UInt32);
  # Revokes every ref created in the group.
  listGroups @7 () -> (groups :List(GroupInfo));
  # Added: the groups, with how many refs each holds.
}
