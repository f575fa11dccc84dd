@0x9b50875d1649d9ee;
# Sound devices (paper section 8.4).

using Core = import "core.capnp";
using Stream = import "stream.capnp";

struct SoundDeviceInfo {
  name @0 :Text;
  # Name of this device.
  isHardware @1 :Bool;
  # Is this a real device?
  isSink @2 :Bool;
  # Is this a sink (speaker) as opposed to a source (microphone)?
}

interface SoundDevice extends(Core.Persistable) {
  info @0 () -> (info :SoundDeviceInfo);
  opusStream @1 () -> (stream :Stream.Stream);
  # Audio in Opus format: emitted by a source, accepted by a sink.
  bindTo @2 (other :SoundDevice) -> (holder :Core.Holder);
  # Pipes sound between this and other (one sink, one source) while the
  # holder lives.
}

interface Mixer extends(Core.Persistable) {
  # A software mixer (a PulseAudio instance).
  createSink @0 (name :Text) -> (source :SoundDevice);
  # pycapnp clients pass `name` positionally (here and below): name= clashes with
  # the first parameter of the client's _send(name, ...).
  # Creates a sink; returns the source emitting what is played on it. The sink
  # exists while the returned device is referenced.
  createSource @1 (name :Text) -> (sink :SoundDevice);
  # Creates a source; audio played on the returned sink comes out of it.
  getDevices @2 () -> (devices :List(SoundDevice));
  # Currently present devices. (The paper's heading says getDevice, its text
  # a list of devices; the plural name matches what it returns.)
}

interface SoundServiceAdmin extends(Core.ServiceAdmin) {
  getSystemMixer @0 () -> (mixer :Mixer);
}
