@0x96dffd7c62b86bbc;
# USB devices over USB/IP (paper section 8.3).

using Core = import "core.capnp";
using Stream = import "stream.capnp";

struct Info {
  productId @0 :Text;
  # "vvvv:pppp" in lowercase hex, as lsusb prints it.
  busId @1 :Text;
  # USB/IP bus ID (e.g. "1-1.2"); empty if no such device is connected now.
  connected @2 :Bool;
  # Added: false for a device from getDeviceByProductId that is not plugged in.
  manufacturer @3 :Text;
  product @4 :Text;
  # Added: human-readable strings from the device descriptor, for listings.
}

interface UsbDevice extends(Core.Persistable) {
  info @0 () -> (info :Info);
  usbIpStream @1 () -> (stream :Stream.Stream);
  # The USB/IP protocol (import of this device) over the returned stream.
}

interface UsbDevices extends(Core.Persistable) {
  # The USB devices of a host.
  listDevices @0 () -> (devices :List(UsbDevice));
  getDeviceByProductId @1 (productId :Text) -> (device :UsbDevice);
  # Returned even if no or several such devices are connected, so the
  # capability survives re-enumeration (which changes bus IDs).
  getDeviceByBusId @2 (busId :Text) -> (device :UsbDevice);
  # Added for the CLI's local-busid: URIs: the device plugged at busId now;
  # fails if there is none.
}

interface UsbServiceAdmin extends(Core.ServiceAdmin) {
  attach @0 (device :UsbDevice) -> (holder :Core.Holder);
  # Attaches a (remote) device to this host; detached when the holder goes.
  usbDevices @1 () -> (devices :UsbDevices);
  # The devices connected to this host.
}
