@0x8d3e9bd5d6edf6f1;
# Filesystems, files and block devices (paper sections 3.2, 3.3 and 8.1).

using Core = import "core.capnp";
using Stream = import "stream.capnp";

interface BlockDevice extends(Core.Persistable) {
  # A fixed-size byte array supporting random access.
  nbdSetup @0 () -> (stream :Stream.Stream);
  # Opens a Network Block Device connection to this device; the NBD protocol
  # (newstyle handshake) runs over the returned stream.
  readOnly @1 () -> (device :BlockDevice);
  # Added: a read-only view of this device, so a disk can be shared without
  # giving write access (the NBD server of the view refuses writes).
  info @2 () -> (info :BlockDeviceInfo);
  # Added: size for `metac` listings and for the VM service (drive sizes).
}

struct BlockDeviceInfo {
  # Added (see BlockDevice.info).
  size @0 :UInt64;
  # In bytes.
  readOnly @1 :Bool;
}

interface File extends(Core.Persistable) {
  # A path of a regular file in a filesystem. The file does not need to exist.
  openAsStream @0 () -> (stream :Stream.Stream);
  # Opens the file for reading; the stream carries its contents, then EOF.
  openAsBlock @1 () -> (device :BlockDevice);
  # Opens the file as a block device (its size is the file's size).
  readOnly @2 () -> (file :File);
  # Added: a read-only view (openForWrite fails, openAsBlock gives a read-only
  # device).
  openForWrite @3 (append :Bool) -> (stream :Stream.Stream);
  # Added for `metac file put`: creates the file if missing (mode 0644),
  # truncates it unless `append`, then writes everything received on the
  # stream until EOF. The service closes its side only after the data is
  # written and flushed, so a writer that half-closes and waits for EOF knows
  # the write is complete.
  info @4 () -> (info :FileInfo);
  # Added: stat-like information for the CLI (named `info` like the paper's
  # UsbDevice.info and SoundDevice.info).
}

struct FileInfo {
  # Added (see File.info).
  exists @0 :Bool;
  # False if nothing exists at this path; the other fields are then zero.
  size @1 :UInt64;
  # In bytes.
  mode @2 :UInt32;
  # Permission bits (st_mode & 0o7777).
  mtime @3 :Float64;
  # Unix time of the last modification.
  readOnly @4 :Bool;
  # Is this capability a read-only view?
}

interface Filesystem extends(Core.Persistable) {
  # A directory (and everything below it).
  getSubtree @0 (name :Text) -> (fs :Filesystem);
  # pycapnp clients pass `name` positionally (here and below): name= clashes with
  # the first parameter of the client's _send(name, ...).
  # name may contain slashes but no symlinks and no "", "." or ".." components;
  # resolved with openat(O_NOFOLLOW) one component at a time (no TOCTOU).
  getFile @1 (name :Text) -> (file :File);
  # Same rules for name; the file does not need to exist.
  v9fsStream @2 () -> (stream :Stream.Stream);
  # Opens this filesystem with 9P2000.L over the returned stream.
  readOnly @3 () -> (fs :Filesystem);
  # Added: a read-only view; everything obtained through it is read-only too.
  sftpStream @4 () -> (stream :Stream.Stream);
  # Added: the SFTP protocol over the returned stream (no SSH layer), so a
  # node without kernel 9p support can mount with sshfs (FUSE) instead.
  info @5 () -> (info :FilesystemInfo);
  # Added: for `metac fs` listings.
}

struct FilesystemInfo {
  # Added (see Filesystem.info).
  name @0 :Text;
  # Last component of the exported path, for display ("" for the root). Never
  # the full local path, which is the owner's business.
  readOnly @1 :Bool;
}

struct MountInfo {
  # Added: one mount made through FilesystemNamespace.mount, for `metac fs ls`.
  path @0 :Text;
  # Mount point, relative to the namespace's root.
  method @1 :Text;
  # How it is mounted: "9p", "sftp" (FUSE fallback) or "bind" (a local fs).
  source @2 :Text;
  # For display: "[ip]:port" of the node serving it, or "local".
  holder @3 :Core.Holder;
  # The mount's holder, so `metac fs umount` can release a mount made by
  # another client.
  state @4 :Text;
  # Added: "mounted", "connecting" or "disconnected" (the server is unreachable:
  # an empty read-only placeholder covers the mount point until it is back).
  persistent @5 :Bool;
  # Added: re-established when the node restarts (`metac fs mount --persistent`).
  readOnly @6 :Bool;
  # Added: mounted read-only.
}

struct MountOptions {
  # Added: options of FilesystemNamespace.mountWith (`metac fs mount`).
  method @0 :Text;
  # "" picks: "bind" for a filesystem of this node, else "9p" where the kernel
  # has a 9p client, else "sftp" (sshfs over FUSE). "9p", "sftp" or "bind"
  # force one (Unsupported if this node cannot do it).
  readOnly @1 :Bool;
  keep @2 :Bool;
  # Keep the mount when every reference to the holder is dropped (the caller
  # may exit, as `metac fs mount` does): it then lasts until the holder, found
  # again through listMounts, is released, or until the service stops. Without
  # keep, dropping the holder unmounts (as for mount()).
}

struct AttachOptions {
  # Added: options of FilesystemServiceAdmin.attachBlock (`metac block attach`).
  readOnly @0 :Bool;
  # Attach read-only (also implied by a read-only device).
  mountPath @1 :Text;
  # If not "", also mount the device's filesystem there (an existing directory).
  keep @2 :Bool;
  # As MountOptions.keep: the attachment outlives the references to its holder
  # until it is released (through listBlockAttachments) or the service stops.
}

struct BlockAttachmentInfo {
  # Added: one attachment, for `metac block ls` / `metac block detach`.
  device @0 :Text;
  # The local block device, e.g. "/dev/nbd0" or "/dev/loop3" ("" while connecting).
  mountPath @1 :Text;
  method @2 :Text;
  # "nbd" (kernel NBD client) or "nbdfuse" (FUSE file + loop device).
  source @3 :Text;
  # "[ip]:port" of the node serving it.
  state @4 :Text;
  # "attached", "connecting" or "disconnected".
  readOnly @5 :Bool;
  persistent @6 :Bool;
  holder @7 :Core.Holder;
  # Releasing it detaches (and unmounts) the device.
}

interface FilesystemNamespace extends(Core.Persistable) {
  # A mount namespace of the node.
  filesystem @0 () -> (fs :Filesystem);
  # The root of this namespace.
  mount @1 (path :Text, fs :Filesystem) -> (holder :Core.Holder);
  # Mounts fs at path (an existing directory); unmounted when the holder goes.
  listMounts @2 () -> (mounts :List(MountInfo));
  # Added: the mounts currently held through `mount`.
  mountWith @3 (path :Text, fs :Filesystem, options :MountOptions) -> (holder :Core.Holder);
  # Added: mount with options (method, read-only, keep); mount(path, fs) is
  # mountWith(path, fs, default options): unmounted when the holder is released
  # or dropped, unless options.keep. A persistent ref to the holder makes the
  # mount come back when the node restarts.
  filesystemPreservingOwners @4 () -> (fs :Filesystem);
  # Added: the root like `filesystem`, but its servers keep running as root with
  # the capabilities to serve every owner (chown, setuid bits, any file): whoever
  # holds it, or anything derived from it, is root-equivalent on that tree
  # (`metac fs export --preserve-owners`, e.g. a container root filesystem).
  # `filesystem` squashes instead: each directory taken from it acts as that
  # directory's owner, with no capability and no setuid/setgid bits.
}

interface FilesystemServiceAdmin extends(Core.ServiceAdmin) {
  rootNamespace @0 () -> (ns :FilesystemNamespace);
  # The node's initial mount namespace. (Section 5.1 mentions a
  # rootFilesystem method; it is rootNamespace().filesystem(), one pipelined
  # call away, so it is not duplicated here.)
  attachBlock @1 (device :BlockDevice, options :AttachOptions)
      -> (path :Text, holder :Core.Holder);
  # Added: attach a block device (of any node) as a local block device; path is
  # the device node. Detached when the holder is released or dropped (unless
  # options.keep); a persistent ref to the holder makes it come back when the
  # node restarts.
  listBlockAttachments @2 () -> (attachments :List(BlockAttachmentInfo));
  # Added: the attachments made through attachBlock.
}
