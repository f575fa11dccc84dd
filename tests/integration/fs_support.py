"""What the fs integration tests share: two nodes around one export, waiting, loop cleanup."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from metac.fs.kernel import loop_devices
from metac.testing.nodes import NodeHost, assert_no_leaks, snapshot


def eventually(cond: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


def settle_without_leaks(before: dict[str, Any], *nodes: NodeHost, timeout: float = 15) -> None:
    """Wait until the nodes are back to ``before`` (helpers exit a little after an
    unmount or detach), then assert it, so a failure names what is left."""
    def clean() -> bool:
        try:
            assert_no_leaks(before, snapshot(*nodes))
        except AssertionError:
            return False
        return True

    with contextlib.suppress(AssertionError):
        eventually(clean, timeout, "helpers to go away")
    assert_no_leaks(before, snapshot(*nodes))


def create_write_read(mnt: Path, export: Path) -> None:
    """Files and directories made on either side show on the other, partial writes too."""
    (mnt / "dir" / "sub").mkdir(parents=True)
    (mnt / "dir" / "sub" / "f.txt").write_text("written on B")
    assert (export / "dir" / "sub" / "f.txt").read_text() == "written on B"
    (export / "from-a.txt").write_text("written on A")
    assert (mnt / "from-a.txt").read_text() == "written on A"
    with open(mnt / "dir" / "sub" / "f.txt", "r+b") as f:
        f.seek(8)
        f.write(b"ON")
    assert (export / "dir" / "sub" / "f.txt").read_text() == "written ON B"


def attachments(node: NodeHost) -> list[dict]:
    """``metac block ls --json`` on ``node``."""
    return json.loads(node.metac("block", "ls", "--json").stdout)


def read_only_ext4_export(a: NodeHost, export: Path, size: int) -> tuple[Path, str, str]:
    """An ext4 image of ``size`` bytes exported read-only by A: (image, its sha256, ref)."""
    image = export / "disk.img"
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=120)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    ref = a.metac("block", "export", "--read-only", f"local:{image}").stdout.strip()
    return image, digest, ref


def assert_direct_write_fails(device: str) -> None:
    proc = subprocess.run(["dd", "if=/dev/zero", f"of={device}", "bs=4096", "count=1",
                           "oflag=direct"], capture_output=True, timeout=60, check=False)
    assert proc.returncode != 0, proc.stderr


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


def forward(node: NodeHost, ref: str) -> tuple[subprocess.Popen, int]:
    proc = node.popen("stream", "forward", ref, "127.0.0.1:0")
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r":(\d+)", line)
    assert match, f"no port in {line!r}; stderr: {proc.stderr.read() if proc.poll() else ''}"
    return proc, int(match.group(1))


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
