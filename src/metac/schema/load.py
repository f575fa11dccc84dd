"""The only place that calls capnp.load: every schema module of the protocol.

Import the loaded modules from here (``from metac.schema.load import core``) so
each schema is parsed once per process and every module sees the same types.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import capnp

capnp.remove_import_hook()

SCHEMA_DIR = os.path.dirname(os.path.abspath(__file__))


def _load(name: str):
    return capnp.load(os.path.join(SCHEMA_DIR, name), imports=[SCHEMA_DIR])


core = _load("core.capnp")
persistence = _load("persistence.capnp")
stream = _load("stream.capnp")
fs = _load("fs.capnp")
network = _load("network.capnp")
compute = _load("compute.capnp")
vm = _load("vm.capnp")
usb = _load("usb.capnp")
sound = _load("sound.capnp")
desktop = _load("desktop.capnp")
demo = _load("demo.capnp")


@functools.cache
def capnp_rpc() -> Any:
    """Cap'n Proto's own ``rpc.capnp``, loaded on first use: only tools that write
    RPC messages by hand need it (the test harness's hostile peer)."""
    capnp_dir = os.path.dirname(os.path.abspath(capnp.__file__))
    return capnp.load(os.path.join(capnp_dir, "rpc.capnp"), imports=[os.path.dirname(capnp_dir)])
