"""pytest plugin: multi-host fixtures. Enable with ``pytest_plugins = ["metac.testing.fixtures"]``.

* ``require_root``: skips the test unless it runs as root with ``ip`` and
  ``nsenter`` and can actually create a network namespace.
* ``topology_factory``: ``make(n) -> Topology``; every topology is torn down
  at the end of the test, also when it fails.
* ``nodes_factory``: ``make(n, extra_services=None, *, timeout=30, ipv6=False, env=None) ->
  list[NodeHost]``, each node started and ready; nodes, then topologies, are
  torn down at the end of the test. When the test fails, the tail of every
  node log is added to the failure report.

:func:`assert_no_leaks` and :func:`snapshot` (from :mod:`metac.testing.nodes`)
are re-exported for leak checks: ``before = snapshot(*nodes)`` ... ``after =
snapshot(*nodes)``; ``assert_no_leaks(before, after)``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Generator, Iterator, Mapping

import pytest

from metac.testing import netns as _netns
from metac.testing.netns import Topology
from metac.testing.nodes import NodeHost, Snapshot, assert_no_leaks, snapshot

__all__ = [
    "NodeHost",
    "Snapshot",
    "Topology",
    "assert_no_leaks",
    "netns_skip_reason",
    "nodes_factory",
    "require_root",
    "snapshot",
    "topology_factory",
]

ROOT_REASON = "needs root: creates network namespaces"

_nodes_key = pytest.StashKey[list[NodeHost]]()


def netns_skip_reason() -> str | None:
    """Why multi-host tests cannot run here (None if they can)."""
    if os.geteuid() != 0:
        return ROOT_REASON
    missing = [tool for tool in (_netns.IP, _netns.NSENTER) if shutil.which(tool) is None]
    if missing:
        return (
            f"needs {' and '.join(missing)} (Debian packages iproute2, util-linux) "
            "to create network namespaces"
        )
    probe = f"mc{secrets.token_hex(3)}-probe"
    proc = _netns.ip("netns", "add", probe, check=False)
    _netns.ip("netns", "del", probe, check=False)
    if proc.returncode != 0:
        return f"cannot create network namespaces here: {proc.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def _metac_netns_skip_reason() -> str | None:
    return netns_skip_reason()


@pytest.fixture
def require_root(_metac_netns_skip_reason: str | None) -> None:
    """Skip unless root with ``ip``/``nsenter`` and working network namespaces."""
    if _metac_netns_skip_reason is not None:
        pytest.skip(_metac_netns_skip_reason)


@pytest.fixture
def topology_factory(require_root: None) -> Iterator[Callable[[int], Topology]]:
    """``make(n)`` builds a :class:`Topology` of ``n`` hosts, torn down after the test."""
    with contextlib.ExitStack() as stack:

        def make(n: int) -> Topology:
            return stack.enter_context(Topology.create(n))

        yield make


@pytest.fixture
def nodes_factory(
    request: pytest.FixtureRequest,
    topology_factory: Callable[[int], Topology],
) -> Iterator[Callable[..., list[NodeHost]]]:
    """``make(n, extra_services=None, *, timeout=30, ipv6=False, env=None)``: ``n`` started,
    ready nodes on one bridge (serving on their IPv6 ULA instead of IPv4 if ``ipv6``; ``env``
    added to the environment of the nodes and their CLI calls)."""
    all_nodes: list[NodeHost] = []
    request.node.stash[_nodes_key] = all_nodes
    with contextlib.ExitStack() as stack:

        def make(
            n: int,
            extra_services: Mapping[str, str] | None = None,
            *,
            timeout: float | None = None,
            ipv6: bool = False,
            env: Mapping[str, str] | None = None,
        ) -> list[NodeHost]:
            topo = topology_factory(n)
            nodes = []
            for host in topo.hosts:
                node = stack.enter_context(NodeHost(host, ipv6=ipv6, env=env))
                all_nodes.append(node)
                nodes.append(node)
            for node in nodes:  # start all, then wait: nodes boot in parallel
                node.start(extra_services, wait=False)
            for node in nodes:
                node.wait_ready(ready_timeout() if timeout is None else timeout)
            return nodes

        yield make


def ready_timeout() -> float:
    """Seconds a test node may take to report ready: 30, or ``METAC_TEST_READY_TIMEOUT``
    (the QEMU guest's tests, where everything runs emulated, set more)."""
    return float(os.environ.get("METAC_TEST_READY_TIMEOUT") or 30.0)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, append the tail of every node log of the test to the report."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for node in item.stash.get(_nodes_key, []):
            try:
                tail = node.log_tail(60)
            except OSError as exc:
                tail = f"(log unreadable: {exc})"
            report.sections.append((f"metac node {node.name} log {node.log_path}", tail))
    return report
