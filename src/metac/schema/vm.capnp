@0xab3adc6523aee772;
# Virtual machines (paper section 7.1).

using Core = import "core.capnp";
using Stream = import "stream.capnp";
using Fs = import "fs.capnp";
using Net = import "network.capnp";

struct KernelBoot {
  kernel @0 :Fs.File;
  # Kernel binary.
  initrd @1 :Fs.File;
  # initrd containing the initial filesystem (may be null).
  cmdline @2 :Text;
  # Kernel parameters.
}

struct Boot {
  union {
    disk @0 :UInt32;
    # Boot from drive number disk (index into LaunchConfiguration.drives).
    kernel @1 :KernelBoot;
    # Boot a Linux kernel directly.
  }
}

struct Network {
  # Attaches a network card.
  enum Driver {
    virtio @0;
    e1000 @1;
  }
  driver @0 :Driver;
  network @1 :Net.L2Interface;
  # If null, a new network is created, later available through VM.network.
}

struct Drive {
  enum Driver {
    virtio @0;
    ide @1;
  }
  driver @0 :Driver;
  device @1 :Fs.BlockDevice;
}

struct SerialPort {
  enum Driver {
    default @0;
    virtio @1;
  }
  driver @0 :Driver;
  name @1 :Text;
  # Name of the port (only used by the virtio driver).
  nowait @2 :Bool;
  # Do not wait for a connection to this port; may discard initial output.
  stream @3 :Stream.Stream;
  # If null, a new stream is created, later available through VM.serialPort.
}

struct LaunchConfiguration {
  boot @0 :Boot;
  memory @1 :Int32;
  # In MiB.
  vcpu @2 :Int32;
  # Number of CPU cores.
  networks @3 :List(Network);
  drives @4 :List(Drive);
  serialPorts @5 :List(SerialPort);
}

interface VM extends(Core.Persistable, Core.Destroyable, Core.Waitable) {
  # A running virtual machine. destroy() (paper) comes from Core.Destroyable.
  # Added Core.Waitable: wait() returns when the VM has stopped (guest power
  # off or destroy), for `metac vm run` and tests.
  serialPort @0 (index :Int32) -> (stream :Stream.Stream);
  network @1 (index :Int32) -> (l2interface :Net.L2Interface);
  # These duplicate SerialPort.stream and Network.network on purpose (paper):
  # serialPort(0) of one VM can be passed as a SerialPort.stream of another.
}

interface VMLauncher extends(Core.Persistable) {
  launch @0 (config :LaunchConfiguration) -> (vm :VM);
}

struct VMInfo {
  # Added: one VM of this service, for `metac vm ls`.
  pid @0 :Int32;
  # Host PID of the hypervisor.
  memory @1 :Int32;
  vcpu @2 :Int32;
  running @3 :Bool;
  vm @4 :VM;
  id @5 :Text;
  # Added: the VM's id (stable across a restart of a persistent VM).
  accel @6 :Text;
  # Added: the accelerator the VM runs with ("kvm" or "tcg").
  started @7 :Float64;
  # Added: when the hypervisor started (seconds since the epoch), for the uptime.
  state @8 :Text;
  # Added: "running", "stopped" (guest powered off or destroyed) or "failed".
}

interface VMServiceAdmin extends(Core.ServiceAdmin) {
  getLauncher @0 () -> (launcher :VMLauncher);
  # The paper names no method; this mirrors ComputeServiceAdmin.getLauncher.
  listVMs @1 () -> (vms :List(VMInfo));
  # Added: VMs launched through this service, for `metac vm ls`.
  accelerator @2 () -> (name :Text, detail :Text);
  # Added: the accelerator new VMs get ("kvm" or "tcg") and why (the probe's
  # result, or METAC_VM_ACCEL), for `metac vm ls`.
}
