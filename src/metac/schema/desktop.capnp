@0xd6e62a47329c93d1;
# Remote desktops (paper section 8.5).

using Core = import "core.capnp";
using Stream = import "stream.capnp";

interface Desktop extends(Core.Persistable) {
  # A screen with mouse and keyboard input.
  vncStream @0 () -> (stream :Stream.Stream);
  # The RFB (VNC) protocol over the returned stream.
}

interface DesktopAdmin extends(Core.ServiceAdmin) {
  getDesktopForXSession @0 (num :Int32) -> (desktop :Desktop);
  # The desktop of the local X11 display :num.
}
