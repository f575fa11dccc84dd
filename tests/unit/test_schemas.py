"""The protocol schemas: all load together, have distinct ids, and match the paper.

Also checks the pycapnp conventions the services rely on: a resource server
answers the Persistable methods it inherits, interfaces with several bases
dispatch every inherited method, and capabilities cross a real two-party
connection.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket

import capnp
import pytest

from metac.schema import load

SCHEMA_FILES = sorted(f for f in os.listdir(load.SCHEMA_DIR) if f.endswith(".capnp"))
LOADED = {
    os.path.basename(mod.__file__): mod
    for mod in vars(load).values()
    if isinstance(mod, type(os)) and getattr(mod, "__file__", "").endswith(".capnp")
}
FILE_ID = re.compile(r"^\s*@(0x[0-9a-fA-F]{16})\s*;", re.MULTILINE)

# (module, interface) -> methods the interface must have, inherited ones included.
# Paper names first; "# added" marks our additions.
INTERFACES = {
    ("core", "Node"): {"address", "getService"},
    ("core", "NodeAdmin"): {"getServiceAdmin", "registerNamedService", "getUnprivilegedNode"},
    ("core", "Service"): {"restore"},
    ("stream", "Stream"): {"tcpListen", "bindTo"},
    ("persistence", "PersistenceAdmin"): {"getHandlerFor"},
    ("persistence", "ServicePersistenceHandler"): {"registerRestorer", "createSturdyRef"},
    ("persistence", "Restorer"): {"restoreFromDescription"},
    ("fs", "BlockDevice"): {"nbdSetup"} | {"readOnly", "info"},
    ("fs", "File"): {"openAsStream", "openAsBlock"} | {"readOnly", "openForWrite", "info"},
    ("fs", "Filesystem"): {"getSubtree", "getFile", "v9fsStream"}
    | {"readOnly", "sftpStream", "info"},
    ("fs", "FilesystemNamespace"): {"filesystem", "mount"} | {"listMounts"},
    ("fs", "FilesystemServiceAdmin"): {"rootNamespace"},
    ("network", "L2Interface"): {"setupVxlan", "bindTo"},
    ("network", "KernelInterface"): {"getName", "rename", "destroy", "l2Interface"}
    | {"setupVxlan", "bindTo"},
    ("network", "KernelNetworkNamespace"): {"listInterfaces", "createInterface"} | {"getInterface"},
    ("network", "NetworkServiceAdmin"): {"rootNamespace"} | {"listBinds"},
    ("compute", "Process"): {"file", "kill", "returnCode", "wait"},
    ("compute", "ProcessEnvironment"): {"launchProcess", "network"} | {"destroy"},
    ("compute", "ComputeLauncher"): {"launch"},
    ("compute", "ComputeServiceAdmin"): {"getLauncher"} | {"listProcesses"},
    ("vm", "VMLauncher"): {"launch"},
    ("vm", "VM"): {"destroy", "serialPort", "network"} | {"wait"},
    ("vm", "VMServiceAdmin"): {"getLauncher", "listVMs"},
    ("usb", "UsbDevice"): {"info", "usbIpStream"},
    ("usb", "UsbDevices"): {"listDevices", "getDeviceByProductId"} | {"getDeviceByBusId"},
    ("usb", "UsbServiceAdmin"): {"attach", "usbDevices"},
    ("sound", "SoundDevice"): {"info", "opusStream", "bindTo"},
    ("sound", "Mixer"): {"createSink", "createSource", "getDevices"},
    ("sound", "SoundServiceAdmin"): {"getSystemMixer"},
    ("desktop", "Desktop"): {"vncStream"},
    ("desktop", "DesktopAdmin"): {"getDesktopForXSession"},
    ("demo", "Counter"): {"increment", "value", "name"},
    ("demo", "Box"): {"get", "label"},
    ("demo", "DemoAdmin"): {"makeCounter", "makeBox"},
}

# (module, struct) -> fields it must have.
STRUCTS = {
    ("compute", "Mount"): {"path", "fs"},
    ("compute", "NetworkInterface"): {"name", "l2interface", "addresses", "routes"},
    ("compute", "ProcessEnvironmentDescription"): {"filesystems", "networks", "memory"},
    ("compute", "FD"): {"isPty", "stream"},
    ("compute", "ProcessDescription"): {"args", "files", "uid", "gid", "env", "cwd"},
    ("vm", "LaunchConfiguration"): {
        "boot",
        "memory",
        "vcpu",
        "networks",
        "drives",
        "serialPorts",
    },
    ("vm", "Boot"): {"disk", "kernel"},
    ("vm", "KernelBoot"): {"kernel", "initrd", "cmdline"},
    ("vm", "Network"): {"driver", "network"},
    ("vm", "Drive"): {"driver", "device"},
    ("vm", "SerialPort"): {"driver", "name", "nowait", "stream"},
    ("usb", "Info"): {"productId", "busId"},
    ("sound", "SoundDeviceInfo"): {"name", "isHardware", "isSink"},
}

# Interfaces that are services' admin bootstraps, not resources.
ADMINS = {name for (_, name) in INTERFACES if name.endswith("Admin")} - {"NodeAdmin"}
NOT_PERSISTABLE = {"Node", "NodeAdmin", "Service", "ServicePersistenceHandler", "Restorer"}
NOT_PERSISTABLE |= ADMINS


def ancestor_ids(schema) -> set[int]:
    ids = set()
    for sup in schema.superclasses:
        ids.add(sup.node.id)
        ids |= ancestor_ids(sup)
    return ids


def run(coro):
    return asyncio.run(capnp.run(coro))


def test_every_schema_file_is_loaded_by_load_py():
    assert SCHEMA_FILES, load.SCHEMA_DIR
    assert sorted(LOADED) == SCHEMA_FILES
    for name, mod in LOADED.items():
        assert getattr(load, name.removesuffix(".capnp")) is mod


def test_file_ids_are_distinct_and_match_the_files():
    ids = {}
    for name in SCHEMA_FILES:
        with open(os.path.join(load.SCHEMA_DIR, name)) as f:
            match = FILE_ID.search(f.read())
        assert match, f"{name} has no file id"
        file_id = int(match.group(1), 16)
        assert file_id >> 63 == 1, name
        assert LOADED[name].schema.node.id == file_id, name
        ids[name] = file_id
    assert len(set(ids.values())) == len(ids), ids


@pytest.mark.parametrize(("module", "name"), sorted(INTERFACES))
def test_interface_has_paper_methods(module, name):
    schema = getattr(getattr(load, module), name).schema
    missing = INTERFACES[module, name] - set(schema.method_names_inherited)
    assert not missing, f"{module}.{name} lacks {sorted(missing)}"
    ancestors = ancestor_ids(schema)
    if name in ADMINS:
        assert load.core.ServiceAdmin.schema.node.id in ancestors
    if name not in NOT_PERSISTABLE:
        assert load.core.Persistable.schema.node.id in ancestors, f"{name} is not Persistable"


@pytest.mark.parametrize(("module", "name"), sorted(STRUCTS))
def test_struct_has_paper_fields(module, name):
    fields = set(getattr(getattr(load, module), name).schema.fields)
    missing = STRUCTS[module, name] - fields
    assert not missing, f"{module}.{name} lacks {sorted(missing)}"


def test_vm_boot_is_a_union_and_enums_match_the_paper():
    boot = load.vm.Boot.new_message()
    boot.disk = 1
    assert boot.which() == "disk"
    boot.init("kernel").cmdline = "console=ttyS0"
    assert boot.which() == "kernel"
    assert set(load.vm.Network.Driver.schema.enumerants) == {"virtio", "e1000"}
    assert set(load.vm.Drive.Driver.schema.enumerants) == {"virtio", "ide"}
    assert set(load.vm.SerialPort.Driver.schema.enumerants) == {"default", "virtio"}


class _Stream(load.stream.Stream.Server):
    async def createSturdyRef(self, rgroup, persistent, _context, **kwargs):
        ref = _context.results.id
        ref.node.ip = "::1"
        ref.node.port = 901
        ref.service = "test"
        ref.objectInfo = b"persistent" if persistent else b"transient"


class _Process(load.compute.Process.Server):
    def __init__(self):
        self.waited = 0

    async def wait(self, **kwargs):
        self.waited += 1

    async def returnCode(self, **kwargs):
        return 3


def test_resource_server_answers_persistable_in_process():
    async def main():
        client = load.stream.Stream._new_client(_Stream())
        ref = (await client.createSturdyRef(persistent=True)).id
        assert (ref.node.ip, ref.node.port, ref.service) == ("::1", 901, "test")
        assert ref.objectInfo == b"persistent"
        as_persistable = client.cast_as(load.core.Persistable)
        ref = (await as_persistable.createSturdyRef(persistent=False)).id
        assert ref.objectInfo == b"transient"

    run(main())


def test_server_with_several_bases_dispatches_all_of_them():
    async def main():
        server = _Process()
        client = load.compute.Process._new_client(server)
        await client.wait()
        await client.cast_as(load.core.Waitable).wait()
        assert (await client.returnCode()).code == 3
        assert server.waited == 2

    run(main())


class _Counter(load.demo.Counter.Server):
    def __init__(self, name):
        self._name = name
        self._value = 0

    async def increment(self, by, **kwargs):
        self._value += by
        return self._value

    async def name(self, **kwargs):
        return self._name


class _Box(load.demo.Box.Server):
    def __init__(self, label, cap):
        self._label = label
        self._cap = cap

    async def get(self, **kwargs):
        return self._cap

    async def label(self, **kwargs):
        return self._label


class _DemoAdmin(load.demo.DemoAdmin.Server):
    async def makeCounter(self, name, **kwargs):
        return _Counter(name)

    async def makeBox(self, label, cap, **kwargs):
        return _Box(label, cap)


def test_capabilities_cross_a_two_party_connection():
    async def main():
        left, right = socket.socketpair()
        with left, right:
            server_stream = await capnp.AsyncIoStream.create_connection(sock=left)
            client_stream = await capnp.AsyncIoStream.create_connection(sock=right)
            server = capnp.TwoPartyServer(server_stream, bootstrap=_DemoAdmin())
            client = capnp.TwoPartyClient(client_stream)
            admin = client.bootstrap().cast_as(load.demo.DemoAdmin)
            # `name` must be positional (see demo.capnp); pipelined, no await.
            counter = admin.makeCounter("c1").counter
            assert (await counter.increment(by=2)).value == 2
            box = (await admin.makeBox(label="b", cap=counter)).box
            assert (await box.label()).label == "b"
            inner = (await box.get()).cap.cast_as(load.demo.Counter)
            assert (await inner.increment(by=3)).value == 5
            assert (await inner.name()).name == "c1"
            del admin, counter, box, inner, client, server

    run(main())
