"""Test helpers shipped with metac (like ``trio.testing`` or ``pyroute2.fixtures``).

* :mod:`metac.testing.netns`: several "hosts" as network namespaces joined by a
  bridge that lives in its own "switch" namespace; guaranteed teardown.
* :mod:`metac.testing.nodes`: a real ``metac node`` inside each host, a CLI
  runner, process/mount tracking, leak snapshots and teardown.
* :mod:`metac.testing.fixtures`: pytest fixtures (``require_root``,
  ``topology_factory``, ``nodes_factory``); enable them with
  ``pytest_plugins = ["metac.testing.fixtures"]``.

Everything here needs root and ``ip`` (iproute2) plus ``nsenter`` (util-linux).
Commands run in a host with ``nsenter --net=/run/netns/NAME --``: only the
network namespace changes, so mounts made there are visible to the test
(``ip netns exec`` would give each command a private mount namespace).
"""
