"""What the fs integration tests share: two nodes around one export, waiting, loop cleanup."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from metac.fs.kernel import loop_devices
from metac.testing.nodes import NodeHost


def eventually(cond: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


def our_loops(*nodes: NodeHost) -> set[str]:
    """Loop devices whose backing file lies under one of the nodes' directories."""
    return {dev for dev, backing in loop_devices().items()
            if any(backing.startswith(str(node.root)) for node in nodes)}


@contextlib.contextmanager
def node_pair(nodes_factory: Any, tmp_path: Path) -> Iterator[tuple[NodeHost, NodeHost, Path]]:
    """Nodes A and B with tmp/export (for A to share), mounts below tmp tracked.

    Afterwards, detach the loop devices a failed test may leave: they would outlive
    the nodes."""
    a, b = nodes_factory(2)
    export = tmp_path / "export"
    export.mkdir()
    for node in (a, b):
        node.track_mount_root(tmp_path)
    try:
        yield a, b, export
    finally:
        for dev in our_loops(a, b):
            subprocess.run(["losetup", "-d", dev], check=False)
