"""Fixtures of the tests that run inside the QEMU guest (kernel 9p and NBD clients).

They reuse the host's fs integration helpers (tests/integration/fs_support.py and
the helpers of test_fs_mount.py), which pytest's rootdir-relative imports do not
reach from here, so that directory is put on sys.path."""

from __future__ import annotations

import os
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

INTEGRATION = Path(__file__).resolve().parents[2] / "integration"
if str(INTEGRATION) not in sys.path:
    sys.path.insert(0, str(INTEGRATION))

from fs_support import node_pair  # noqa: E402

from metac.testing.nodes import NodeHost  # noqa: E402

_nodes_key = pytest.StashKey[list[NodeHost]]()

# Everything in the guest runs emulated (TCG): a node takes several times as long to
# come up as on the host, more so while the host is busy.
os.environ.setdefault("METAC_TEST_READY_TIMEOUT", "180")


@pytest.fixture
def pair(nodes_factory: Any, tmp_path: Path, request: pytest.FixtureRequest
         ) -> Iterator[tuple[NodeHost, NodeHost, Path, Path]]:
    """Nodes A and B, A's tmp/export and B's empty mount point tmp/b/mnt.

    The mount point sits one level deeper than the export, so a relative symlink
    in the export that leads out of it names a path that does not exist on B."""
    with node_pair(nodes_factory, tmp_path) as (a, b, export):
        request.node.stash[_nodes_key] = [a, b]
        mnt = tmp_path / "b" / "mnt"
        mnt.mkdir(parents=True)
        yield a, b, export, mnt


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, add the tails of the nodes' service logs (the fs service's
    tracebacks, e.g. of an 'incident', are there, not in node.log)."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for node in item.stash.get(_nodes_key, []):
            for log in sorted(node.state_dir.rglob("*.log")):
                try:
                    lines = log.read_text(errors="replace").splitlines()[-40:]
                except OSError:
                    continue
                if lines:
                    report.sections.append((f"{node.name}: {log.name}", "\n".join(lines)))
    return report
