@0xa5e75a4096a42d21;
# Process launcher: containers (paper section 7.2).

using Core = import "core.capnp";
using Stream = import "stream.capnp";
using Fs = import "fs.capnp";
using Net = import "network.capnp";

struct Mount {
  path @0 :Text;
  # Where to mount this filesystem? Use "/" for the root filesystem.
  fs @1 :Fs.Filesystem;
}

struct NetworkInterface {
  name @0 :Text;
  # Name of the network interface inside the environment.
  l2interface @1 :Net.L2Interface;
  # If null, a new network is created, later available through
  # ProcessEnvironment.network.
  addresses @2 :List(Text);
  # IP addresses with prefix length (e.g. "10.0.0.2/24").
  routes @3 :List(Route);
  # Routes exiting through this interface.

  struct Route {
    network @0 :Text;
    # Address of the network (e.g. "192.168.0.0/24", "0.0.0.0/0").
    via @1 :Text;
    # Gateway. If null or empty, a direct route is created.
  }
}

struct ProcessEnvironmentDescription {
  # An environment (namespaces) for possibly many processes.
  filesystems @0 :List(Mount);
  networks @1 :List(NetworkInterface);
  memory @2 :UInt32;
  # Memory limit for the whole environment, in MiB; 0 means the launcher's
  # default.
  autoDestroy @3 :Bool;
  # Added: destroy the environment as soon as no process runs in it any more,
  # for launches nobody waits on (`metac run --background`). By default an
  # environment lives while its capabilities are held (or until destroy()).
}

struct FD {
  isPty @0 :Bool;
  # Should the file descriptor be opened as a virtual terminal?
  stream @1 :Stream.Stream;
  # If null, a new stream is created, later available through Process.file.
  rows @2 :UInt16;
  cols @3 :UInt16;
  # Added: initial size of the terminal when isPty (0: 24 rows, 80 columns).
  # A stream carries bytes only, so later size changes are not forwarded.
}

struct ProcessDescription {
  args @0 :List(Text);
  # Command with arguments, including the executable (["cat", "/etc/passwd"]).
  files @1 :List(FD);
  # The process's file descriptors 0, 1, 2, ... in order.
  uid @2 :UInt32;
  gid @3 :UInt32;
  # User and group of the process, inside the environment.
  env @4 :List(Text);
  # Added: environment variables as "KEY=VALUE"; the paper leaves the
  # environment unspecified, and an empty list means a minimal default
  # (PATH, HOME, TERM).
  cwd @5 :Text;
  # Added: working directory inside the environment; empty means "/".
}

interface Process extends(Core.Persistable, Core.Waitable) {
  # A running (or finished) process. wait() is inherited from Core.Waitable
  # (paper: "Waits for the process to finish").
  file @0 (index :UInt32) -> (stream :Stream.Stream);
  # Stream of the index-th entry of ProcessDescription.files.
  kill @1 (signal :UInt32);
  returnCode @2 () -> (code :Int32);
  # Exit code once the process has finished; minus the signal number if a
  # signal ended it (like Python's subprocess). Fails while it still runs.
}

interface ProcessEnvironment extends(Core.Persistable, Core.Destroyable) {
  # An existing environment. Added Core.Destroyable: destroy() kills every
  # process in it and tears it down (otherwise it lives while referenced).
  launchProcess @0 (processDescription :ProcessDescription) -> (process :Process);
  # Launches another process in this environment. Deviation: the paper gives
  # no result, but without the Process the caller could neither reach its
  # streams nor wait for it or kill it.
  network @1 (index :UInt32) -> (l2interface :Net.L2Interface);
  # The index-th network of ProcessEnvironmentDescription.networks.
}

interface ComputeLauncher extends(Core.Persistable) {
  launch @0 (processDescription :ProcessDescription,
             envDescription :ProcessEnvironmentDescription)
      -> (env :ProcessEnvironment, process :Process);
  # Launches a process in a new environment.
}

struct ProcessInfo {
  # Added: one process started by this service, for `metac ps`.
  pid @0 :Int32;
  # Host PID (the admin interface is for root on this node anyway).
  args @1 :List(Text);
  running @2 :Bool;
  returnCode @3 :Int32;
  # Valid when not running (see Process.returnCode).
  started @4 :Float64;
  # Unix time.
  process @5 :Process;
  env @6 :ProcessEnvironment;
  # The environment it runs in, e.g. for `metac exec` into it.
  id @7 :Text;
  # Added: "<environment id>.<n>", the name `metac ps` shows and `metac kill`
  # takes (the n-th process launched in that environment).
  ended @8 :Float64;
  # Added: Unix time it was found ended, for an ended background process whose
  # environment is gone (then process and env are null); 0 otherwise.
}

interface ComputeServiceAdmin extends(Core.ServiceAdmin) {
  getLauncher @0 () -> (launcher :ComputeLauncher);
  listProcesses @1 () -> (processes :List(ProcessInfo));
  # Added: processes launched through this service, for `metac ps`.
  removeProcesses @2 (target :Text) -> (removed :List(Text));
  # Added: forget ended background processes (`metac rm`): one ("ENV.N") or all
  # of an environment ("ENV"). NotFound if none matches, FailedPrecondition if
  # the target still runs.
}
