"""Core of issue 2 end to end: real nodes in network namespaces, driven by the CLI and the API."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from metac.testing.nodes import NodeHost

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

DEMO = {"demo": "metac.testing.demo"}


def demo(node: NodeHost, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = node.host.run([sys.executable, "-m", "metac.testing.democli", *args],
                         env=node.cli_env(), check=False, timeout=60)
    if check:
        assert proc.returncode == 0, f"democli {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def status(node: NodeHost) -> dict:
    return json.loads(node.metac("node", "status", "--json").stdout)


def service_pid(node: NodeHost, name: str) -> int:
    (svc,) = [s for s in status(node)["services"] if s["name"] == name]
    return svc["pid"]


def wait_registered(node: NodeHost, name: str, restarts: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (svc,) = [s for s in status(node)["services"] if s["name"] == name]
        if svc["state"] == "registered" and svc["restarts"] >= restarts:
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} not registered again: {status(node)}")


def test_ref_restored_from_other_node_then_revoked(nodes_factory) -> None:
    a, b = nodes_factory(2, DEMO)
    ref = demo(a, "make-counter", "c1").stdout.strip()
    assert ref.startswith(f"ref://{a.address}/demo/")
    assert demo(b, "increment", ref, "2").stdout.strip() == "2"
    assert demo(b, "increment", ref, "3").stdout.strip() == "5"

    listed = json.loads(a.metac("ref", "ls", "--json").stdout)
    assert [(r["service"], r["category"], r["persistent"]) for r in listed] == \
        [("demo", "counter", False)]
    secret = ref.rsplit("/", 1)[1]
    assert secret not in a.metac("ref", "ls").stdout
    shown = b.metac("ref", "show", ref).stdout
    assert "valid: True" in shown and secret not in shown

    # Only the ref's own node can revoke it.
    refused = b.metac("ref", "rm", ref, check=False)
    assert refused.returncode != 0 and "another node" in refused.stderr

    out = a.metac("ref", "rm", ref).stdout
    assert out.startswith(f"revoked {listed[0]['id']}")
    assert json.loads(a.metac("ref", "ls", "--json").stdout) == []

    again = demo(b, "increment", ref, "1", check=False)
    assert again.returncode != 0
    assert "NotFound: no such sturdy ref" in again.stderr
    shown = b.metac("ref", "show", ref, check=False)
    assert shown.returncode == 3
    assert shown.stderr.strip() == "metac: NotFound: no such sturdy ref (unknown or revoked)"
    assert "Traceback" not in shown.stderr and secret not in shown.stderr


def test_cli_errors_are_one_line(nodes_factory) -> None:
    (a,) = nodes_factory(1, DEMO)
    cases = {
        "ref:nonsense": 2,
        "ref://10.255.255.1/demo/" + "A" * 10: 2,  # secret too short: rejected before any I/O
        f"ref://{a.address}:1/demo/" + "A" * 32: 7,  # nothing listens on port 1
        f"ref://{a.address}/nosuchservice/" + "A" * 32: 3,
        f"ref://{a.address}/demo/" + "A" * 32: 3,
    }
    for text, code in cases.items():
        proc = a.metac("ref", "show", text, check=False)
        assert proc.returncode == code, (text, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("metac: "), proc.stderr
        assert "A" * 20 not in proc.stderr
    # A node that is not running: a clear error, not a traceback.
    proc = a.metac("node", "status", env={"METAC_RUNTIME_DIR": "/nonexistent"}, check=False)
    assert proc.returncode == 7 and proc.stderr.startswith("metac: Unavailable: no node is running")


def test_persistent_ref_survives_kill9_nonpersistent_does_not(nodes_factory) -> None:
    a, b = nodes_factory(2, DEMO)
    persistent = demo(a, "make-counter", "p", "--persistent").stdout.strip()
    transient = demo(a, "make-counter", "t").stdout.strip()
    assert demo(b, "increment", persistent, "1").stdout.strip() == "1"
    assert demo(b, "increment", transient, "1").stdout.strip() == "1"
    tree = a.pids()
    assert len(tree) >= 3  # node + persistence + demo

    a.kill9()
    deadline = time.monotonic() + 5
    while a.orphans() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not a.orphans(), "service processes outlived kill -9 of the node"

    a.start(DEMO)
    assert demo(b, "increment", persistent, "1").stdout.strip() == "1"  # restored afresh
    gone = demo(b, "increment", transient, "1", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_killed_service_is_restarted_and_refs_restore_again(nodes_factory) -> None:
    a, b = nodes_factory(2, DEMO)
    ref = demo(a, "make-counter", "k", "--persistent").stdout.strip()
    assert demo(b, "increment", ref, "4").stdout.strip() == "4"
    pid = service_pid(a, "demo")
    os.kill(pid, 9)
    wait_registered(a, "demo", restarts=1)
    assert service_pid(a, "demo") != pid
    assert demo(b, "increment", ref, "1").stdout.strip() == "1"

    # Persistence itself: the other services re-register their restorers.
    os.kill(service_pid(a, "persistence"), 9)
    wait_registered(a, "persistence", restarts=1)
    wait_registered(a, "demo", restarts=2)
    assert demo(b, "increment", ref, "2").stdout.strip() == "2"


def test_recursive_persistence_across_restart_of_both_nodes(nodes_factory) -> None:
    a, b = nodes_factory(2, DEMO)
    counter = demo(a, "make-counter", "inner", "--persistent").stdout.strip()
    box = demo(b, "make-box", "outer", counter, "--persistent").stdout.strip()
    assert box.startswith(f"ref://{b.address}/demo/")
    assert demo(a, "box-get", box, "7").stdout.strip() == "7"

    assert b.stop() == 0
    assert a.stop() == 0
    # B first: restoring the box waits (with backoff) until A is back.
    b.start(DEMO)
    a.start(DEMO, wait=False)
    a.wait_ready()
    assert demo(b, "box-get", box, "3").stdout.strip() == "3"
    assert demo(a, "increment", counter, "1").stdout.strip() == "4"  # the same object


def _stored_values(db_path: str) -> list[str]:
    """Every value in the database, as text candidates for a secret."""
    out: set[str] = set()
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in db.execute(f"SELECT * FROM {table}"):  # noqa: S608
                for value in row:
                    if isinstance(value, bytes):
                        out.add(base64.urlsafe_b64encode(value).rstrip(b"=").decode())
                        out.add(value.hex())
                        for n in (16, 24, 32):
                            out.add(base64.urlsafe_b64encode(value[:n]).rstrip(b"=").decode())
                    elif value is not None:
                        out.add(str(value))
    finally:
        db.close()
    return sorted(out)


def test_database_grants_nothing(nodes_factory, tmp_path) -> None:
    a, b = nodes_factory(2, DEMO)
    refs = [demo(a, "make-counter", f"c{i}", *(["--persistent"] if i % 2 else [])).stdout.strip()
            for i in range(4)]
    remote = demo(b, "make-counter", "remote", "--persistent").stdout.strip()
    refs.append(demo(a, "make-box", "nested", remote, "--persistent").stdout.strip())
    for ref in refs[:1]:
        assert demo(b, "increment", ref, "1").stdout.strip() == "1"

    db = str(a.state_dir / "refs.sqlite3")
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        dump = "\n".join(conn.iterdump())  # what `sqlite3 DB .dump` prints, without the tool
    values = _stored_values(db)
    assert len(values) > 20
    for ref in refs + [remote]:
        secret = ref.rsplit("/", 1)[1]
        assert secret not in values
        assert secret not in dump
        with open(db, "rb") as f:
            assert secret.encode() not in f.read()
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("\n".join(values) + "\n")
    os.chmod(tmp_path, 0o755)
    for node, service in ((a, "demo"), (b, "demo"), (a, "persistence")):
        out = demo(b, "try-secrets", node.address, "901", service, str(candidates)).stdout
        assert out.strip().endswith("hits 0"), out


PROBE = textwrap.dedent("""
    import asyncio, sys, capnp
    from metac import api, errors
    from metac.schema.load import core, persistence
    async def main(addr):
        async with api.connect_node(addr) as node:
            results = []
            admin = node.cast_as(core.NodeAdmin)
            for name, call in [
                ("getServiceAdmin", lambda: admin.getServiceAdmin("persistence")),
                ("registerNamedService", lambda: admin.registerNamedService("x")),
                ("listServices", lambda: admin.listServices()),
            ]:
                try:
                    await call()
                    results.append(name + " REACHED")
                except capnp.KjException as exc:
                    results.append(name + " refused " + type(errors.from_kj(exc)).__name__)
            service = (await node.getService("persistence")).service
            padmin = service.cast_as(persistence.PersistenceAdmin)
            for name, call in [("listRefs", lambda: padmin.listRefs()),
                               ("getHandlerFor", lambda: padmin.getHandlerFor("demo"))]:
                try:
                    await call()
                    results.append(name + " REACHED")
                except capnp.KjException as exc:
                    results.append(name + " refused " + type(errors.from_kj(exc)).__name__)
            try:
                await node.getService("nosuch")
            except capnp.KjException as exc:
                results.append("nosuch " + type(errors.from_kj(exc)).__name__)
            addr = (await node.address()).address
            results.append("address " + addr.ip)
            print("\\n".join(results))
    asyncio.run(capnp.run(main(sys.argv[1])))
""")


def test_tcp_clients_cannot_reach_admin(nodes_factory) -> None:
    a, b = nodes_factory(2, DEMO)
    mode = os.stat(a.runtime_dir / "socket").st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    proc = b.host.run([sys.executable, "-c", PROBE, a.address], env=b.cli_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert not [line for line in lines if "REACHED" in line], lines
    assert "getServiceAdmin refused Unsupported" in lines
    assert "listRefs refused Unsupported" in lines
    assert "nosuch NotFound" in lines
    assert f"address {a.address}" in lines


GARBAGE = textwrap.dedent("""
    import socket, sys, os
    for payload in [b"", b"\\x00" * 64, os.urandom(4096), b"GET / HTTP/1.0\\r\\n\\r\\n",
                    b"\\xff\\xff\\xff\\x7f" + b"\\x00" * 100]:
        s = socket.create_connection((sys.argv[1], 901), timeout=5)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        try:
            s.recv(100)
        except OSError:
            pass
        s.close()
    print("done")
""")


def test_garbage_on_tcp_port_does_not_hurt_the_node(nodes_factory) -> None:
    a, b = nodes_factory(2, DEMO)
    pids = a.pids()
    out = b.host.run([sys.executable, "-c", GARBAGE, a.address], timeout=60).stdout
    assert out.strip() == "done"
    ref = demo(a, "make-counter", "after-garbage").stdout.strip()
    assert demo(b, "increment", ref, "1").stdout.strip() == "1"
    assert pids <= a.pids() | pids and a.running


def test_sigterm_stops_every_process(nodes_factory) -> None:
    (a,) = nodes_factory(1, DEMO)
    tree = a.pids()
    assert len(tree) >= 3
    assert a.stop() == 0
    assert not a.orphans()
    assert not (a.runtime_dir / "socket").exists()


def test_resource_group_drop_revokes_its_refs(nodes_factory) -> None:
    a, b = nodes_factory(2, DEMO)
    assert a.metac("ref", "group", "create", "team").stdout.strip() == "team"
    in_group = [demo(a, "make-counter", f"g{i}", "--persistent", "--group", "team").stdout.strip()
                for i in range(3)]
    outside = demo(a, "make-counter", "free", "--persistent").stdout.strip()
    listed = json.loads(a.metac("ref", "ls", "--json").stdout)
    assert sorted(r["group"] for r in listed) == ["", "team", "team", "team"]
    out = a.metac("ref", "group", "rm", "team").stdout
    assert "revoked 3 ref(s)" in out
    for ref in in_group:
        assert demo(b, "increment", ref, "1", check=False).returncode != 0
    assert demo(b, "increment", outside, "1").stdout.strip() == "1"


def test_node_address_and_ipv6_refs(nodes_factory) -> None:
    a, b = nodes_factory(2, DEMO)
    st = status(a)
    assert st["address"] == a.address and st["port"] == 901
    assert {s["name"] for s in st["services"]} >= {"persistence", "demo"}
    assert all(s["state"] == "registered" for s in st["services"])
    # The same object through an IPv6 address of the node (refs accept both families).
    ref = demo(a, "make-counter", "v6").stdout.strip()
    secret = ref.rsplit("/", 1)[1]
    assert socket.inet_pton(socket.AF_INET6, a.host.ipv6)
    v6 = f"ref://[{a.host.ipv6}]/demo/{secret}"
    # The node listens on its IPv4 address only; an IPv6 ref fails cleanly.
    proc = demo(b, "increment", v6, "1", check=False)
    assert proc.returncode != 0 and "Unavailable" in proc.stderr


def _wait_leases(node: NodeHost, expected: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = demo(node, "leases").stdout.strip()
        if got == expected or time.monotonic() > deadline:
            assert got == expected
            return
        time.sleep(0.1)


def test_holders_released_when_client_connection_ends(nodes_factory) -> None:
    (a,) = nodes_factory(1, DEMO)
    procs = {}
    for label in ("killed", "exited", "released"):
        extra = ["--release-after", "0.5"] if label == "released" else []
        procs[label] = a.host.popen(
            [sys.executable, "-m", "metac.testing.democli", "lease", label, *extra],
            env=a.cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for proc in procs.values():
            assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        assert procs["released"].stdout.readline().strip() == "released"  # type: ignore[union-attr]
        _wait_leases(a, "exited killed")
        procs["killed"].kill()  # SIGKILL: the connection just ends
        procs["killed"].wait()
        _wait_leases(a, "exited")
        procs["exited"].terminate()
        procs["exited"].wait()
        _wait_leases(a, "")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_two_refs_to_one_object_share_it(nodes_factory) -> None:
    a, b = nodes_factory(2, DEMO)
    box_a = demo(a, "make-counter", "shared", "--persistent").stdout.strip()
    # A second ref to the same live object (runtime id dedup): a box restored from the first
    # ref, persisted again, stores the counter once and mints a second secret for it.
    box = demo(a, "make-box", "b", box_a, "--persistent").stdout.strip()
    listed = json.loads(a.metac("ref", "ls", "--json").stdout)
    counters = [r for r in listed if r["category"] == "counter"]
    # The exported ref, the transient one the demo service made to adopt the capability
    # (ServiceContext.adopt: an alias of the grant), and the nested persistent one the
    # box's description holds. Both were made through the exported ref: its children.
    assert sorted(r["persistent"] for r in counters) == [False, True, True]
    (exported,) = [r for r in counters if not r["parent"]]
    assert sorted(r["parent"] for r in counters) == ["", exported["id"], exported["id"]]
    assert demo(b, "increment", box_a, "2").stdout.strip() == "2"
    assert demo(b, "box-get", box, "3").stdout.strip() == "5"  # the same object
    a.metac("ref", "rm", box_a)
    # The box holds a capability obtained through box_a: revoking box_a cut it (and its
    # children went with it); the box's own ref stays.
    gone = demo(b, "box-get", box, "1", check=False)
    assert gone.returncode == 3 and "NotFound" in gone.stderr
    listed = json.loads(a.metac("ref", "ls", "--json").stdout)
    assert [r["category"] for r in listed] == ["box"]


FORGET = textwrap.dedent("""
    import asyncio, sys, capnp
    from metac import api
    from metac.schema.load import persistence
    async def main(runtime_id):
        async with api.connect_admin() as admin:
            padmin = await api.service_admin(admin, "persistence", persistence.PersistenceAdmin)
            handler = (await padmin.getHandlerFor("demo")).handler
            print((await handler.forget(runtime_id)).revoked)
    asyncio.run(capnp.run(main(sys.argv[1])))
""")


def test_service_forgets_its_objects_refs(nodes_factory) -> None:
    a, b = nodes_factory(2, DEMO)
    ref = demo(a, "make-counter", "f", "--persistent").stdout.strip()
    demo(a, "make-box", "keep", ref, "--persistent")
    db = sqlite3.connect(f"file:{a.state_dir / 'refs.sqlite3'}?mode=ro", uri=True)
    try:
        (runtime_id,) = db.execute(
            "SELECT runtime_id FROM objects WHERE category = 'counter'").fetchone()
    finally:
        db.close()
    out = a.host.run([sys.executable, "-c", FORGET, runtime_id], env=a.cli_env()).stdout
    assert out.strip() == "3"  # the exported, the adopted and the nested ref
    gone = demo(b, "increment", ref, "1", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    listed = json.loads(a.metac("ref", "ls", "--json").stdout)
    assert [r["category"] for r in listed] == ["box"]
