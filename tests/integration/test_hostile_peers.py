"""Issue 10, items 1 and 2: hostile peers without a ref can neither stop a node nor
make it hold unbounded memory. Real nodes in namespaces; the attacker is
``metac.testing.rawpeer`` (raw sockets, hand-made Cap'n Proto messages) on
another host, the checks go through the CLI."""

from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
import time
from typing import Any

import pytest

from metac.testing.nodes import NodeHost

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

DEMO = {"demo": "metac.testing.demo"}
MIB = 1 << 20


def demo(node: NodeHost, *args: str) -> str:
    proc = node.host.run([sys.executable, "-m", "metac.testing.democli", *args],
                         env=node.cli_env(), check=False, timeout=120)
    assert proc.returncode == 0, f"democli {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout.strip()


def node_pid(node: NodeHost) -> int:
    assert node.proc is not None
    with open(f"/proc/{node.proc.pid}/cmdline", "rb") as f:
        assert b"node\0run" in f.read()  # nsenter execs the node: same pid
    return node.proc.pid


def service_pid(node: NodeHost, name: str) -> int:
    services = json.loads(node.metac("node", "status", "--json").stdout)["services"]
    (svc,) = [s for s in services if s["name"] == name]
    return svc["pid"]


def memory_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def socket_fds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass
    return count


def reset_peak(pid: int) -> None:
    """Make VmHWM (peak RSS) start again from the current RSS."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def wait_for(what: str, check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class Attacker:
    """``python -m metac.testing.rawpeer COMMAND TARGET 901 ARGS`` on ``source``'s host."""

    def __init__(self, source: NodeHost, target: NodeHost, command: str, *args: str) -> None:
        argv = [sys.executable, "-m", "metac.testing.rawpeer", command, target.address,
                str(target.port), *args]
        self.proc = source.host.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=source.cli_env(),
                                      start_new_session=True)

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"rawpeer gave no answer: {err}")
        return json.loads(line)

    def ready(self, timeout: float = 120.0) -> dict[str, Any]:
        return self._line(timeout)["ready"]

    def result(self, timeout: float = 180.0) -> dict[str, Any]:
        """Its observations once it stops holding by itself (``--hold``/``--until-*``)."""
        result = self._line(timeout)
        self.proc.wait(30)
        return result

    def finish(self, timeout: float = 180.0) -> dict[str, Any]:
        """Tell it to stop holding (if it still does); its observations."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        result = self._line(timeout)
        self.proc.wait(30)
        return result

    def __enter__(self) -> Attacker:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def test_accept_loops_survive_running_out_of_fds(nodes_factory) -> None:
    a, b = nodes_factory(2, DEMO)
    ref = demo(a, "make-counter", "fds")
    pid = node_pid(a)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 16, 20000))
    with Attacker(b, a, "flood", "--count", "1100", "--connect-timeout", "5") as flood:
        flood.ready()
        wait_for("the node to log that it ran out of fds",
                 lambda: "Too many open files" in a.log_text())
        # The admin socket cannot accept either; this call waits for the flood to go.
        status = a.popen("node", "status")
        time.sleep(1)
        held = flood.finish()
    assert held["connections"] > 16
    out, err = status.communicate(timeout=60)
    assert status.returncode == 0, err
    assert "stream" in out
    # After the flood: TCP 901 serves again, to another node, on the same low limit.
    assert demo(b, "increment", ref, "2") == "2"
    a.metac("node", "status")
    log = a.log_text()
    assert "cannot accept connections on" in log and "Too many open files" in log
    assert "Traceback" not in log
    assert resource.prlimit(pid, resource.RLIMIT_NOFILE)[0] == in_use + 16


def test_connection_flood_and_stalled_messages_leave_memory_bounded(nodes_factory) -> None:
    # Issue 10's figures: 1,000 connections from one peer and 50 stalled partial
    # messages; node RSS grows < 64 MiB and `metac node status` still answers.
    # Long timeouts: what is held must stay held while it is measured, however slow the machine.
    a, b, c = nodes_factory(3, DEMO, env={"METAC_RPC_MESSAGE_TIMEOUT": "600",
                                          "METAC_RPC_IDLE_TIMEOUT": "600"})
    ref = demo(a, "make-counter", "memory")
    pid = node_pid(a)
    sockets = socket_fds(pid)
    before = memory_kib(pid, "VmRSS")
    reset_peak(pid)
    with Attacker(c, a, "partial", "--count", "50", "--declared", str(MIB),
                  "--send", str(MIB - 64)) as partial, \
            Attacker(b, a, "flood", "--count", "1000") as flood:
        sent = partial.ready()["sent"]
        assert flood.ready()["connected"] > 256
        started = time.monotonic()
        a.metac("node", "status", timeout=60)
        status_seconds = time.monotonic() - started
        # A peer that is not the attacker is served meanwhile.
        assert demo(a, "increment", ref, "1") == "1"
        kept = max(socket_fds(pid) - sockets for _ in range(10) if time.sleep(0.3) is None)
        peak = memory_kib(pid, "VmHWM")
        held = flood.finish()
        stalled = partial.finish()
    growth_mib = (peak - before) / 1024
    print(f"node RSS {before / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB (+{growth_mib:.1f} MiB); "
          f"`metac node status` took {status_seconds:.2f} s during the attack; "
          f"flood: {held['connections']} connected, {held['open']} not closed by the node, "
          f"node holds {kept} more sockets; "
          f"partial: {stalled['open']} of {stalled['connections']} kept, "
          f"{sum(sent) / MIB:.1f} MiB sent")
    assert growth_mib < 64
    # (Connections the attacker sees as open may never have reached the node:
    # with SYN cookies, a full accept queue leaves them in limbo on the attacker's side.)
    assert held["closed"] > 0
    assert kept <= 256 + 16 + 8  # METAC_RPC_MAX_CONNECTIONS_PER_PEER, plus the stalled ones
    assert 0 < stalled["open"] <= 16  # METAC_RPC_PENDING_BYTES: 16 MiB of unfinished messages
    assert status_seconds < 20  # the goal is < 1 s (bench territory); here: it answers
    log = a.log_text()
    assert "METAC_RPC_MAX_CONNECTIONS_PER_PEER" in log and "METAC_RPC_PENDING_BYTES" in log
    assert demo(b, "increment", ref, "1") == "2"  # the flooding host is served again after


def test_oversized_stalled_and_idle_connections_are_closed(nodes_factory) -> None:
    env = {"METAC_RPC_MESSAGE_TIMEOUT": "3", "METAC_RPC_IDLE_TIMEOUT": "3"}
    a, b = nodes_factory(2, env=env)
    pid = node_pid(a)
    before = memory_kib(pid, "VmRSS")
    reset_peak(pid)
    with Attacker(b, a, "partial", "--count", "8", "--until-closed") as oversized, \
            Attacker(b, a, "partial", "--count", "3", "--declared", "65536", "--send", "32768",
                     "--until-closed") as stalled, \
            Attacker(b, a, "idle", "--until-closed") as idle, \
            Attacker(b, a, "idle", "--get-service", "stream", "--hold", "15") as holder:
        big = oversized.ready()
        stalled.ready()
        idle.ready()
        holder.ready()
        big_result = oversized.result()
        stalled_result = stalled.result()
        idle_result = idle.result()
        holder_result = holder.result()
    # 8 connections announcing 63 MiB each and sending what they could: refused at
    # the segment table, so they never held a 63 MiB buffer.
    assert big_result["closed"] == 8
    assert max(big["sent"]) < 32 * MIB
    assert (memory_kib(pid, "VmHWM") - before) / 1024 < 64
    # Part of a message, then nothing: closed after METAC_RPC_MESSAGE_TIMEOUT.
    assert stalled_result["closed"] == 3
    # Connected, nothing held: closed after METAC_RPC_IDLE_TIMEOUT.
    assert idle_result["closed"] == 1
    # Holding a capability (getService): never closed for being idle.
    assert holder_result["open"] == 1
    assert holder_result["returns"][0] == ["0 results", "1 results"]
    log = a.log_text()
    assert "bytes (at most 1048576)" in log
    assert "a message still unfinished after 3 s" in log
    assert "idle for 3 s holding no capability" in log
    a.metac("node", "status")


def test_connections_are_capped_per_peer_and_in_total(nodes_factory) -> None:
    env = {"METAC_RPC_MAX_CONNECTIONS_PER_PEER": "20", "METAC_RPC_MAX_CONNECTIONS": "30"}
    a, b = nodes_factory(2, DEMO, env=env)
    ref = demo(a, "make-counter", "caps")
    with Attacker(b, a, "flood", "--count", "40", "--hold", "600") as from_b:
        from_b.ready()
        time.sleep(3)
        with Attacker(a, a, "flood", "--count", "40", "--hold", "5") as from_a:
            from_a.ready()
            a_result = from_a.result()
        b_result = from_b.finish()
    assert b_result["open"] == 20  # per peer
    assert a_result["open"] == 10  # 20 from b + 10 = the total
    log = a.log_text()
    assert "(METAC_RPC_MAX_CONNECTIONS_PER_PEER)" in log and "(METAC_RPC_MAX_CONNECTIONS)" in log
    assert demo(b, "increment", ref, "3") == "3"


@pytest.mark.parametrize("copies, calls", [(900, 30), (60, 200)])
def test_aliased_parameters_are_not_amplified_when_forwarded(nodes_factory, copies, calls) -> None:
    # bootstrap -> getService("stream") -> restore, with a parameter struct holding
    # a List(Data) of `copies` pointers to one 32 KiB blob: ~40 KB on the wire,
    # `copies` x 32 KiB once deep-copied for the stream service. Issue 10's
    # figures are 900 x 30; 60 x 200 stays under any traversal limit a
    # legitimate call needs, yet took node and service +350 MiB each.
    a, b = nodes_factory(2, DEMO)
    ref = demo(a, "make-counter", "amplify")
    pids = {"node": node_pid(a), "stream": service_pid(a, "stream")}
    before = {name: memory_kib(pid, "VmRSS") for name, pid in pids.items()}
    for pid in pids.values():
        reset_peak(pid)
    with Attacker(b, a, "amplify", "--calls", str(calls), "--copies", str(copies),
                  "--until-returns", str(calls + 2), "--hold", "120") as attack:
        ready = attack.ready()
        result = attack.result()
    growth = {name: (memory_kib(pid, "VmHWM") - before[name]) / 1024 for name, pid in pids.items()}
    shown = [a[:60] for a in result["returns"][0][:4]]
    print(f"one call {ready['call_bytes']} bytes; RSS growth MiB {growth}; "
          f"{len(result['returns'][0])} answers, first ones {shown}")
    assert ready["call_bytes"] < 64 * 1024
    assert growth["node"] < 64 and growth["stream"] < 64
    answers = result["returns"][0]
    restored = [a for a in answers if a.endswith(" results") and int(a.split()[0]) >= 2]
    assert not restored and result["closed"] == 1  # no restore got through
    assert "pointers share data" in a.log_text()
    assert service_pid(a, "stream") == pids["stream"]
    assert demo(b, "increment", ref, "1") == "1"


def test_parameters_that_do_not_match_the_schema_get_one_line(nodes_factory) -> None:
    # restore's objectInfo is Data; here it is a list of texts. pycapnp reads the
    # parameters before any handler of ours runs, and used to answer with its whole
    # traceback (file paths, native addresses) to anybody on the network.
    a, b = nodes_factory(2, DEMO)
    with Attacker(b, a, "amplify", "--calls", "1", "--copies", "2", "--blob", "64",
                  "--until-returns", "3", "--hold", "60") as attack:
        attack.ready()
        result = attack.result()
    answers = result["returns"][0]
    restore = [answer for answer in answers if answer.startswith("2 ")]
    assert restore, answers
    assert "InvalidArgument: the parameters of restore do not match its schema" in restore[0]
    assert "Traceback" not in restore[0] and "File \"" not in restore[0]
    assert service_pid(a, "stream")  # the service is still there
