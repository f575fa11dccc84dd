"""`metac node run|status|logs` on real nodes (issue 18 items 3, 9, 10)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from metac.testing.netns import Topology, ip
from metac.testing.nodes import NodeHost, metac_argv

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]


class DefaultAddressNode(NodeHost):
    """A node started without --address: it picks its own."""

    def node_argv(self, extra_services: object = None) -> list[str]:
        argv = super().node_argv()
        i = argv.index("--address")
        return argv[:i] + argv[i + 2:]


def ready_line(node: NodeHost) -> str:
    return next(line for line in node.log_text().splitlines() if "metac node ready" in line)


def test_default_address_is_the_default_route_interface_and_loopback_is_loud(
        topology_factory: Callable[[int], Topology]) -> None:
    host = topology_factory(1).hosts[0]
    subnet = ipaddress.ip_network(f"{host.ipv4}/{host.prefixlen4}", strict=False)
    gateway = str(subnet[200])
    ip("route", "add", "default", "via", gateway, "dev", host.ifname, netns=host.netns)
    with DefaultAddressNode(host) as node:
        node.start()
        line = ready_line(node)
        assert f"on {host.ipv4}:901" in line, line
        assert (f"chosen because the address of {host.ifname}, the interface of the IPv4 "
                f"default route via {gateway}") in line, line
        assert "WARNING" not in node.log_text()
        status = json.loads(node.metac("node", "status", "--json").stdout)
        assert status["address"] == host.ipv4
        node.stop()

        # No default route and no address but loopback: ::1, with a warning.
        ip("addr", "flush", "dev", host.ifname, netns=host.netns)
        node.start()
        line = ready_line(node)
        assert "on [::1]:901" in line, line
        log = node.log_text()
        assert "WARNING: serving on ::1 (no default route and no address but loopback): no " \
               "other machine can reach this node or use its refs; give --address" in log, log


def assert_one_line_error(proc: subprocess.CompletedProcess[str], category: str,
                          code: int) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"metac: {category}: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_node_logs_shows_and_follows_the_service_logs(
        nodes_factory: Callable[..., list[NodeHost]]) -> None:
    (node,) = nodes_factory(1)
    logs = node.state_dir / "logs"
    assert (node.runtime_dir / "logs").resolve() == logs.resolve()
    everything = node.metac("node", "logs").stdout
    for service in ("persistence", "stream", "fs", "net", "compute"):
        assert f"==> {logs / f'node.service-{service}.log'} <==" in everything

    own = logs / "node.service-stream.log"
    with open(logs / "node.service-stream.log.1", "w") as f:
        f.write("an older line\n")
    with open(own, "a") as f:
        f.write("the newest line\n")
    out = node.metac("node", "logs", "stream", "-n", "1").stdout
    assert out.endswith("the newest line\n"), out
    out = node.metac("node", "logs", "stream").stdout
    assert out.index("an older line") < out.index("the newest line")

    follower = node.popen("node", "logs", "stream", "-f")
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(follower.stdout), daemon=True)
    reader.start()

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 60
        while text not in "".join(seen):
            assert time.monotonic() < deadline and follower.poll() is None, (text, seen)
            time.sleep(0.2)

    wait_for("the newest line\n")
    with open(own, "a") as f:
        f.write("appended while following\n")
    wait_for("appended while following\n")
    os.replace(own, logs / "node.service-stream.log.1")
    with open(own, "a") as f:
        f.write("after the rotation\n")
    wait_for("after the rotation\n")
    follower.send_signal(signal.SIGTERM)
    assert follower.wait(timeout=30) == 0, follower.stderr.read()
    reader.join(timeout=10)

    err = assert_one_line_error(node.metac("node", "logs", "nosuch", check=False), "NotFound", 3)
    assert "nosuch" in err and "persistence" in err
    assert_one_line_error(node.metac("node", "logs", "--state-dir", str(node.root / "none"),
                                     check=False), "NotFound", 3)


NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


class NonRootNode(NodeHost):
    """A node run as user nobody (on a port above 1024, in directories nobody owns)."""

    def node_argv(self, extra_services: object = None) -> list[str]:
        argv = super().node_argv()
        i = argv.index("--") + 1
        return argv[:i] + SETPRIV + argv[i:]


def test_node_run_without_root(topology_factory: Callable[[int], Topology]) -> None:
    host = topology_factory(1).hosts[0]
    with NonRootNode(host, port=19001) as node:
        # The defaults need root: one line that names each thing, exit 5.
        proc = host.run([*SETPRIV, *metac_argv(), "node", "run"], check=False, env=node.cli_env({"METAC_RUNTIME_DIR": "/run/metac",
                                                       "METAC_STATE_DIR": "/var/lib/metac"}))
        err = assert_one_line_error(proc, "PermissionDenied", 5)
        assert "port 901 needs root" in err and "/var/lib/metac is not writable" in err, err
        assert "/run/metac is not writable" in err, err

        for d in (node.root, node.state_dir, node.runtime_dir):
            os.chown(d, NOBODY, NOBODY)
        node.start()
        assert "WARNING: not running as root: services net, fs, compute do not run" \
            in node.log_text()
        status = json.loads(node.metac("node", "status", "--json").stdout)
        states = {s["name"]: s["state"] for s in status["services"]}
        assert states["persistence"] == states["stream"] == "registered", states
        for service in ("net", "fs", "compute"):
            assert states[service].startswith("unavailable: needs root for "), states
        table = node.metac("node", "status").stdout
        assert "unavailable: needs root for containers" in table

        err = assert_one_line_error(node.metac("fs", "ls", check=False), "Unavailable", 7)
        assert "service 'fs' does not run on this node: needs root for mounts" in err
        ref = node.metac("stream", "export", "tcp:127.0.0.1:22").stdout.strip()
        assert ref.startswith(f"ref://{host.ipv4}:19001/stream/"), ref
