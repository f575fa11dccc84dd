"""Issue 10, items 8, 9 and 13: the node's files at rest, a damaged refs store, one node per dir.

Real nodes in network namespaces, driven through the `metac` CLI:

* every file in the state dir that holds secrets is 0600, the dir 0700 (a looser
  dir is fixed at start), service logs are size-capped and rotated;
* a damaged database (empty, missing, truncated, bad header, failing the
  integrity check) stops the node with one line naming the file and the
  restore command, without a restart loop; the restore brings the refs back;
* a second node on the same state or runtime dir is refused with one line, and
  the first node is untouched.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import time

import pytest

from metac.testing.nodes import NodeHost

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

DEMO = {"demo": "metac.testing.demo"}
EXIT_FATAL = 78


def demo(node: NodeHost, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = node.host.run([sys.executable, "-m", "metac.testing.democli", *args],
                         env=node.cli_env(), check=False, timeout=60)
    if check:
        assert proc.returncode == 0, f"democli {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def status(node: NodeHost) -> dict:
    return json.loads(node.metac("node", "status", "--json").stdout)


def mode(path: os.PathLike[str] | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- item 8: state at rest ---------------------------------------------------------------


def test_state_dir_and_files_are_private(topology_factory) -> None:
    (host,) = topology_factory(1).hosts
    with NodeHost(host) as a:
        os.chmod(a.state_dir, 0o755)  # as systemd's StateDirectory= makes it by default
        a.start(DEMO)
        assert mode(a.state_dir) == 0o700
        assert "had mode 0755; changed to 0700" in a.log_text()
        ref = demo(a, "make-counter", "secret-env", "--persistent").stdout.strip()
        db = a.state_dir / "refs.sqlite3"
        # While the node runs, the database is in WAL mode: -wal and -shm exist too.
        private = [db, a.state_dir / "refs.sqlite3-wal", a.state_dir / "refs.sqlite3-shm",
                   a.state_dir / "refs.sqlite3.bak", a.state_dir / "refs.sqlite3.id",
                   a.state_dir / "node.key"]
        logs = sorted((a.state_dir / "logs").iterdir())
        procs = [p for d in (a.state_dir / "procs").iterdir() for p in d.iterdir()]
        assert logs and procs
        for path in private + logs + procs:
            assert mode(path) == 0o600, f"{path} is {mode(path):04o}"

        # Files left with loose modes (by an older metac, a careless cp) are tightened.
        assert a.stop() == 0
        for path in (db, a.state_dir / "node.key", logs[0]):
            os.chmod(path, 0o644)
        a.start(DEMO)
        for path in (db, a.state_dir / "node.key", logs[0]):
            assert mode(path) == 0o600, f"{path} is {mode(path):04o}"
        assert demo(a, "increment", ref, "1").stdout.strip() == "1"


def test_state_dir_of_another_user_is_refused(topology_factory) -> None:
    (host,) = topology_factory(1).hosts
    with NodeHost(host) as a:
        os.chown(a.state_dir, 65534, 65534)
        a.start(DEMO, wait=False)
        assert a.wait_exit() == 6
        lines = [line for line in a.log_text().splitlines() if "belongs to uid 65534" in line]
        assert len(lines) == 1, a.log_text()
        os.chown(a.state_dir, 0, 0)


def test_service_logs_are_size_capped_and_rotated(topology_factory) -> None:
    (host,) = topology_factory(1).hosts
    cap, files = 64 << 10, 3
    env = {"METAC_LOG_SIZE": "64K", "METAC_LOG_FILES": str(files),
           "METAC_TEST_CHATTY_BYTES": str(4 << 20)}  # 4 MiB of noise: 21 times the cap
    with NodeHost(host, env=env) as a:
        a.start({"demo": "metac.testing.chatty"})  # the demo service, after its noise
        log_dir = a.state_dir / "logs"
        current = log_dir / "node.service-demo.log"
        deadline = time.monotonic() + 30
        while b"chatty: done" not in current.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.2)
        written = sorted(p.name for p in log_dir.iterdir() if p.name.startswith(current.name))
        assert written == [current.name, f"{current.name}.1", f"{current.name}.2"]
        sizes = {name: os.path.getsize(log_dir / name) for name in written}
        assert all(size <= cap for size in sizes.values()), sizes
        assert sizes[f"{current.name}.1"] == cap  # rotated when full, not earlier
        assert b"chatty: done" in current.read_bytes()
        for name in written:
            assert mode(log_dir / name) == 0o600
        # The service is fine and its later log lines still arrive.
        ref = demo(a, "make-counter", "after-noise").stdout.strip()
        assert demo(a, "increment", ref, "2").stdout.strip() == "2"
        svc = [s for s in status(a)["services"] if s["name"] == "demo"]
        assert svc[0]["state"] == "registered" and svc[0]["restarts"] == 0
    # The option of `node run` sets the same limits.
    assert "--log-size" in subprocess.run(
        [sys.executable, "-m", "metac", "node", "run", "--help"], capture_output=True,
        text=True, check=True, env=a.cli_env()).stdout


# --- item 9: damaged store ---------------------------------------------------------------


def _truncate_half(db: str) -> None:
    os.truncate(db, os.path.getsize(db) // 2)


def _bad_header(db: str) -> None:
    with open(db, "r+b") as f:
        f.write(b"this is not SQLite")


def _corrupt_page(db: str) -> None:
    # Overwrite the b-tree pages of the tables (not the header page): only SQLite's
    # integrity check sees it.
    page = 4096
    size = os.path.getsize(db)
    assert size >= 3 * page
    with open(db, "r+b") as f:
        for offset in range(page, size, page):
            f.seek(offset + 8)
            f.write(b"\xff" * 200)


DAMAGE = {
    "empty": lambda db: os.truncate(db, 0),
    "missing": os.unlink,
    "truncated": _truncate_half,
    "bad-header": _bad_header,
    "integrity": _corrupt_page,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_store_stops_the_node_and_the_backup_restores(nodes_factory, damage) -> None:
    (a,) = nodes_factory(1, DEMO)
    ref = demo(a, "make-counter", "kept", "--persistent").stdout.strip()
    assert demo(a, "increment", ref, "5").stdout.strip() == "5"
    # The backup is taken at start: restart once so it holds the ref.
    assert a.stop() == 0
    a.start(DEMO)
    db = a.state_dir / "refs.sqlite3"
    assert (a.state_dir / "refs.sqlite3.bak").exists()
    assert a.stop() == 0
    assert not (a.state_dir / "refs.sqlite3-wal").exists()  # checkpointed at stop
    DAMAGE[damage](str(db))

    a.start(DEMO, wait=False)
    assert a.wait_exit(timeout=60) == EXIT_FATAL
    out = a.log_text()
    command = f"metac node restore-store --state-dir {a.state_dir}"
    lines = [line for line in out.splitlines() if "is damaged" in line]
    assert len(lines) == 1, out
    assert f"the refs store {db} is damaged" in lines[0] and command in lines[0]
    assert out.strip().splitlines()[-1] == lines[0]  # the node's last word
    assert "restarting" not in out and "Traceback" not in out
    assert not (a.runtime_dir / "socket").exists()
    deadline = time.monotonic() + 10  # its services die with it (PDEATHSIG)
    while a.netns_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not a.netns_pids()

    restored = a.metac("node", "restore-store", "--state-dir", str(a.state_dir))
    assert restored.stdout.startswith(f"restored {db} from the backup taken at")
    assert mode(db) == 0o600
    a.start(DEMO)
    assert demo(a, "increment", ref, "1").stdout.strip() == "1"  # the ref is back (restored afresh)


def test_fresh_state_dir_and_restore_store_refusals(nodes_factory) -> None:
    (a,) = nodes_factory(1, DEMO)
    # restore-store while the node runs: refused, nothing touched.
    db = a.state_dir / "refs.sqlite3"
    before = db.stat().st_ino
    proc = a.metac("node", "restore-store", "--state-dir", str(a.state_dir), check=False)
    assert proc.returncode == 6
    assert proc.stderr.strip() == (
        f"metac: FailedPrecondition: {a.state_dir}: a node is already running here "
        f"(pid {a.proc.pid}); stop it first")
    assert db.stat().st_ino == before
    # A damaged backup is not put in place.
    assert a.stop() == 0
    os.truncate(a.state_dir / "refs.sqlite3.bak", 0)
    proc = a.metac("node", "restore-store", "--state-dir", str(a.state_dir), check=False)
    assert proc.returncode == 6 and "is damaged too" in proc.stderr
    assert db.stat().st_ino == before
    # A node that never had a store starts with an empty one (the usual first start).
    for name in ("refs.sqlite3", "refs.sqlite3.bak", "refs.sqlite3.id"):
        os.unlink(a.state_dir / name)
    a.start(DEMO)
    assert json.loads(a.metac("ref", "ls", "--json").stdout) == []
    store_id = (a.state_dir / "refs.sqlite3.id").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32}", store_id)


def test_store_replaced_by_another_is_refused(nodes_factory, tmp_path) -> None:
    (a,) = nodes_factory(1, DEMO)
    demo(a, "make-counter", "x", "--persistent")
    assert a.stop() == 0
    db = a.state_dir / "refs.sqlite3"
    os.unlink(db)
    other = sqlite3.connect(db)  # a valid database without our refs: a silent empty store
    other.execute("CREATE TABLE t (x)")
    other.close()
    a.start(DEMO, wait=False)
    assert a.wait_exit() == EXIT_FATAL
    assert "it is not the store this node had" in a.log_text()


# --- item 13: one node per state and runtime dir -----------------------------------------


@pytest.mark.parametrize("shared", ["state", "runtime", "both"])
def test_second_node_on_the_same_dirs_is_refused(nodes_factory, tmp_path, shared) -> None:
    a, b = nodes_factory(2, DEMO)
    ref = demo(a, "make-counter", "first", "--persistent").stdout.strip()
    assert demo(b, "increment", ref, "1").stdout.strip() == "1"
    before = {s["name"]: s["pid"] for s in status(a)["services"]}
    other_state, other_run = a.root / "state2", a.root / "run2"
    second = a.run_node_expecting_exit(
        DEMO,
        state_dir=a.state_dir if shared in ("state", "both") else other_state,
        runtime_dir=a.runtime_dir if shared in ("runtime", "both") else other_run,
        port=902, timeout=60)
    locked = a.state_dir if shared in ("state", "both") else a.runtime_dir
    assert second.returncode == 6, second
    assert second.stderr.strip() == \
        f"metac: FailedPrecondition: {locked}: a node is already running here (pid {a.proc.pid})"
    assert second.stdout == ""

    # The first node is untouched: same service processes, socket, refs.
    assert (a.runtime_dir / "socket").exists()
    assert {s["name"]: s["pid"] for s in status(a)["services"]} == before
    assert demo(b, "increment", ref, "2").stdout.strip() == "3"
    assert "reaped leftover" not in a.log_text()
    # ... and its state is intact across its own restart (which the lock does not block).
    assert a.stop() == 0
    assert (a.state_dir / "node.lock").read_text().strip() == str(a.proc.pid)
    a.start(DEMO)
    assert demo(b, "increment", ref, "1").stdout.strip() == "1"
