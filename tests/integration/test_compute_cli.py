"""Compute through the CLI on real nodes in network namespaces (issue 6).

Every test checks that what it ran is gone afterwards: no process in the
nodes' trees, no link in their namespaces, no mount below their directories,
no container in the runtime's state, no environment directory and no cgroup
named after a container.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from metac.compute import rootfs
from metac.testing.nodes import NodeHost, assert_no_leaks
from metac.testing.nodes import snapshot as _snapshot

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def service_log(node: NodeHost, name: str = "compute") -> str:
    path = node.state_dir / "logs" / f"node.service-{name}.log"
    return path.read_text(errors="replace")[-6000:] if path.exists() else ""


def env_ids(*nodes: NodeHost) -> set[str]:
    """Ids of every environment the nodes' compute services started (from their logs)."""
    ids: set[str] = set()
    for node in nodes:
        path = node.state_dir / "logs" / "node.service-compute.log"
        if path.exists():
            ids |= set(re.findall(r"environment ([0-9a-f]{12}) started", path.read_text()))
    return ids


def node_cgroups(*nodes: NodeHost) -> set[str]:
    """Cgroups of the nodes' containers (cgroups are machine-wide; other runs have theirs)."""
    ids = env_ids(*nodes)
    return {c for c in container_cgroups() if c.rsplit("/metac-", 1)[-1] in ids}


def container_cgroups() -> set[str]:
    """Cgroup directories of metac containers, anywhere in the (v1 or v2) hierarchies."""
    found = set()
    for top in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else ():
        for dirpath, dirnames, _ in os.walk(top):
            if dirpath.count("/") - str(CGROUP_ROOT).count("/") > 6:
                dirnames[:] = []
                continue
            found |= {os.path.join(dirpath, d) for d in dirnames if d.startswith("metac-")}
    return found


def snapshot(*nodes: NodeHost):
    """The harness snapshot of the nodes (links, mounts, processes)."""
    return _snapshot(*nodes)


def compute_leftovers(node: NodeHost) -> list[str]:
    left = []
    for sub in ("compute", "oci/runc", "oci/crun"):
        d = node.runtime_dir / sub
        if d.is_dir():
            left += [f"{sub}/{e}" for e in os.listdir(d) if not e.endswith(".log")]
    return left


def wait_clean(nodes: list[NodeHost], before, timeout: float = 15.0) -> None:
    """Wait until nothing the test made is left (teardown may finish just after the CLI)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert_no_leaks(before, snapshot(*nodes))
            for node in nodes:
                assert compute_leftovers(node) == [], compute_leftovers(node)
            assert node_cgroups(*nodes) == set(), node_cgroups(*nodes)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def busybox_root(tmp_path: Path) -> Path:
    path = tmp_path / "rootfs"
    rootfs.build_busybox(str(path))
    return path


@pytest.fixture(params=["runc", "crun"])
def runtime(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the nodes' compute service with this OCI runtime (nodes inherit os.environ)."""
    monkeypatch.setenv("METAC_COMPUTE_RUNTIME", request.param)
    return str(request.param)


def test_run_local_stdio_exit_code_isolation(nodes_factory, busybox_root, runtime) -> None:
    (a,) = nodes_factory(1)
    before = snapshot(a)
    script = ("read line; echo got $line; echo oops >&2; hostname; ls /sys/class/net; "
              "cat /proc/1/cmdline | tr '\\0' ' '; echo; exit 3")
    proc = a.metac("run", "--mount", f"/=local:{busybox_root}", "--", "sh", "-c", script,
                   input="hello\n", check=False)
    assert proc.returncode == 3, proc.stderr + service_log(a)
    lines = proc.stdout.splitlines()
    assert lines[0] == "got hello"
    assert len(lines[1]) == 12  # the environment id is the hostname (uts namespace)
    assert lines[2] == "lo"  # a network namespace of its own
    assert lines[3].strip() == "/dev/.metac-init -P"  # pid namespace: the pause init is 1
    assert proc.stderr == "oops\n"
    assert f"containers run with {runtime}" in service_log(a)
    wait_clean([a], before)


def test_squashed_root_export_runs_but_its_root_is_not_root_on_the_export(
        nodes_factory, busybox_root) -> None:
    """A root filesystem exported without --preserve-owners runs a busybox container,
    even on the node that holds it (served, not bind-mounted), but the container's root
    plants no setuid file and chowns nothing there (the setuid bit is stripped on the
    way: chmod 4755 gives 0755); --preserve-owners gives root back."""
    (a,) = nodes_factory(1)
    a.track_mount_root(busybox_root.parent)
    ref = a.metac("fs", "export", f"local:{busybox_root}").stdout.strip()
    script = ("echo made > /made; chmod 4755 /made && echo chmod-done; "
              "chown 1234 /made || echo chown-refused; ls -l /made >/dev/null && echo ran")
    proc = a.metac("run", "--mount", f"/={ref}", "--", "sh", "-c", script, check=False,
                   timeout=120)
    assert proc.returncode == 0, proc.stderr + service_log(a)
    assert proc.stdout.split() == ["chmod-done", "chown-refused", "ran"], proc.stdout
    st = os.stat(busybox_root / "made")
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o755)
    kept = a.metac("fs", "export", "--preserve-owners", f"local:{busybox_root}").stdout.strip()
    proc = a.metac("run", "--mount", f"/={kept}", "--", "sh", "-c",
                   "chown 1234 /made && chmod 4755 /made", check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr + service_log(a)
    st = os.stat(busybox_root / "made")
    assert (st.st_uid, st.st_mode & 0o7777) == (1234, 0o4755)


def test_memory_limit_user_env_cwd(nodes_factory, busybox_root) -> None:
    (a,) = nodes_factory(1)
    before = snapshot(a)
    script = ("cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null "
              "|| cat /sys/fs/cgroup/memory.max; id -u; id -g; echo $GREETING; pwd")
    proc = a.metac("run", "-m", "48", "--uid", "1000", "--gid", "1001", "-e", "GREETING=hi",
                   "-w", "/tmp", "--mount", f"/=local:{busybox_root}", "--", "sh", "-c", script)
    assert proc.stdout.split() == [str(48 * 1024 * 1024), "1000", "1001", "hi", "/tmp"]
    wait_clean([a], before)


def test_signal_ends_process_and_code_comes_back(nodes_factory, busybox_root) -> None:
    (a,) = nodes_factory(1)
    proc = a.metac("run", "--mount", f"/=local:{busybox_root}", "--", "sh", "-c",
                   "kill -TERM $$", check=False)
    assert proc.returncode == 128 + 15


def test_errors_are_one_line(nodes_factory, busybox_root) -> None:
    (a,) = nodes_factory(1)
    before = snapshot(a)
    root = f"/=local:{busybox_root}"
    cases = [
        (["--mount", root, "--", "no-such-command"], 3,
         "metac: NotFound: no-such-command: command not found in the environment"),
        (["--mount", root, "-w", "/nonexistent", "--", "true"], 3, "metac: NotFound: "),
        (["--mount", "/=ref:garbage", "--", "true"], 2, "metac: InvalidArgument: "),
        (["--", "true"], 2, "metac: InvalidArgument: a root filesystem is needed"),
        (["--mount", root, "--network", "name=eth0,address=10.1.2.3", "--", "true"], 2,
         "metac: InvalidArgument: --network address needs a prefix length"),
        (["--on", f"ref://{a.address}:1/compute/" + "A" * 32, "--mount", root, "--", "true"],
         7, "metac: Unavailable: "),
        (["--on", f"ref://{a.address}/compute/" + "A" * 32, "--mount", root, "--", "true"],
         3, "metac: NotFound: no such sturdy ref"),
        (["--mount", f"/=local:{busybox_root}/missing", "--", "true"], 3, "metac: NotFound: "),
    ]
    for argv, code, start in cases:
        proc = a.metac("run", *argv, check=False)
        assert proc.returncode == code, (argv, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and "A" * 20 not in proc.stderr
    wait_clean([a], before)


def test_background_ps_kill(nodes_factory, busybox_root) -> None:
    (a,) = nodes_factory(1)
    before = snapshot(a)
    ref = a.metac("run", "--background", "--mount", f"/=local:{busybox_root}", "--",
                  "sleep", "300").stdout.strip()
    assert ref.startswith(f"ref://{a.address}/compute/")
    rows = [line.split() for line in a.metac("ps").stdout.splitlines()[1:]]
    assert len(rows) == 1 and rows[0][2] == "running" and rows[0][-2:] == ["sleep", "300"]
    process_id = rows[0][0]
    running = a.metac("rm", process_id, check=False)
    assert running.returncode == 6 and running.stderr.strip().splitlines() == [
        f"metac: FailedPrecondition: process {process_id} is still running; stop it first "
        f"with `metac kill {process_id}`"], running.stderr
    a.metac("kill", process_id)
    deadline = time.monotonic() + 10
    while a.metac("ps").stdout.splitlines()[1:] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert a.metac("ps").stdout.split() == ["ID", "PID", "STATUS", "STARTED", "COMMAND"]
    assert json.loads(a.metac("ps", "--json").stdout) == []
    # `ps -a` keeps it, with its exit status, until `metac rm`.
    ended = json.loads(a.metac("ps", "-a", "--json").stdout)
    assert [(p["id"], p["status"], p["command"]) for p in ended] == [
        (process_id, "killed by SIGTERM", "sleep 300")], ended
    rows = [line.split() for line in a.metac("ps", "-a").stdout.splitlines()[1:]]
    assert rows[0][0] == process_id and rows[0][2:5] == ["killed", "by", "SIGTERM"], rows
    # kill on an ended process, by id or by ref, says so in one line (exit 6).
    for target in (process_id, ref):
        gone = a.metac("kill", "-s", "KILL", target, check=False)
        lines = gone.stderr.strip().splitlines()
        assert gone.returncode == 6 and len(lines) == 1, gone.stderr
        assert lines[0].startswith("metac: FailedPrecondition: ") and \
            "already ended (killed by SIGTERM)" in lines[0], gone.stderr
        assert ref.rsplit("/", 1)[1] not in gone.stderr
    unknown = a.metac("kill", "no-such-process", check=False)
    assert unknown.returncode == 3 and "no process no-such-process" in unknown.stderr
    assert a.metac("rm", process_id).stdout.split() == [process_id]
    assert json.loads(a.metac("ps", "-a", "--json").stdout) == []
    again = a.metac("rm", process_id, check=False)
    assert again.returncode == 3 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert "no ended background process" in again.stderr
    # One that exits by itself: its exit code, and `rm ENV` forgets all of the environment.
    a.metac("run", "--background", "--mount", f"/=local:{busybox_root}", "--",
            "sh", "-c", "exit 3")
    deadline = time.monotonic() + 30
    while not (rows := json.loads(a.metac("ps", "-a", "--json").stdout)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert [r["status"] for r in rows] == ["exited 3"], rows
    assert a.metac("rm", rows[0]["id"].split(".")[0]).stdout.split() == [rows[0]["id"]]
    a.metac("ref", "rm", ref)
    wait_clean([a], before)


def _read_until(fd: int, needle: bytes, timeout: float = 20.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {needle!r} in {out!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"EOF before {needle!r} in {out!r}")
            out += chunk
    return out


def test_pty_interactive_shell(nodes_factory, busybox_root) -> None:
    (a,) = nodes_factory(1)
    before = snapshot(a)
    master, slave = os.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    try:
        proc = a.popen("run", "--pty", "--mount", f"/=local:{busybox_root}", "--", "sh",
                       stdin=slave, stdout=slave, stderr=slave, text=False)
        os.close(slave)
        _read_until(master, b"# ")
        os.write(master, b"echo $((6*7)); tty; stty size\n")
        out = _read_until(master, b"33 101")
        assert b"42\r\n" in out and b"/dev/pts/" in out
        os.write(master, b"cat\n")  # a program reading the terminal
        _read_until(master, b"cat\r\n")
        time.sleep(0.5)
        os.write(master, b"typed line\n")  # echoed by the terminal, then printed by cat
        _read_until(master, b"typed line\r\ntyped line\r\n")
        os.write(master, b"\x03")  # Ctrl-C: the terminal sends SIGINT to cat
        _read_until(master, b"# ")
        os.write(master, b"exit 5\n")
        assert proc.wait(timeout=30) == 5
    finally:
        os.close(master)
    wait_clean([a], before)


def test_headline_three_nodes(nodes_factory, tmp_path: Path) -> None:
    a, b, c = nodes_factory(3)
    root = tmp_path / "a-rootfs"
    rootfs.build_busybox(str(root))
    data = tmp_path / "b-data"
    data.mkdir()
    (data / "in.txt").write_text("from B\n")
    for node in (a, b, c):
        node.track_mount_root(tmp_path)

    root_ref = a.metac("fs", "export", f"local:{root}").stdout.strip()
    net_ref = a.metac("net", "export", "newlocal:ctnet0").stdout.strip()
    a.host.run(["ip", "address", "add", "10.77.0.1/24", "dev", "ctnet0"])
    data_ref = b.metac("fs", "export", f"local:{data}").stdout.strip()
    launcher = c.metac("compute", "export").stdout.strip()
    before = snapshot(a, b, c)

    script = ("cat /data/in.txt; echo written-in-C > /data/out.txt; "
              "ping -c 1 -W 5 10.77.0.1 >/dev/null && echo ping-ok; "
              "ip -o -4 addr show dev eth0 | grep -o '10.77.0.2/24'; exit 7")
    proc = b.metac("run", "--on", launcher, "--mount", f"/={root_ref}",
                   "--mount", f"/data={data_ref}",
                   "--network", f"name=eth0,uri={net_ref},address=10.77.0.2/24",
                   "--", "sh", "-c", script, check=False, timeout=120)
    assert proc.returncode == 7, proc.stderr + service_log(c) + service_log(c, "net")
    assert proc.stdout.splitlines() == ["from B", "ping-ok", "10.77.0.2/24"], proc.stdout
    assert (data / "out.txt").read_text() == "written-in-C\n"
    wait_clean([a, b, c], before)


def _ps(node: NodeHost) -> list[dict]:
    import json

    return json.loads(node.metac("ps", "--json").stdout)


def _wait_for(cond, timeout: float = 30.0, what: Any = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what() if callable(what) else what} not met in {timeout}s")
        time.sleep(0.2)


def test_persistent_background_process_comes_back_after_restart(nodes_factory, tmp_path) -> None:
    (a,) = nodes_factory(1)
    root = tmp_path / "rootfs"
    rootfs.build_busybox(str(root))
    data = tmp_path / "data"
    data.mkdir()
    a.track_mount_root(tmp_path)
    script = "echo start >> /data/log; exec sleep 300"
    ref = a.metac("run", "--background", "--persistent", "--mount", f"/=local:{root}",
                  "--mount", f"/data=local:{data}", "--network", "name=n0,address=10.3.3.3/24",
                  "--", "sh", "-c", script).stdout.strip()
    _wait_for(lambda: (data / "log").exists(), what="first start")
    (first,) = _ps(a)
    assert a.stop() == 0
    # The containers are gone with the service (mounts the fs service still held when
    # it stopped are released by the next start).
    assert [e for e in compute_leftovers(a) if e.startswith("oci/")] == [], service_log(a)
    assert node_cgroups(a) == set(), service_log(a)
    a.start()
    _wait_for(lambda: len(_ps(a)) == 1, what=lambda: "re-created process\n"
              + service_log(a) + service_log(a, "persistence"))
    (again,) = _ps(a)
    assert again["id"] == first["id"] and again["pid"] != first["pid"]
    _wait_for(lambda: (data / "log").read_text() == "start\nstart\n", what="second start")
    # It ends for good: killed, its environment goes and a restart does not bring it back.
    a.metac("kill", ref)
    _wait_for(lambda: _ps(a) == [] and compute_leftovers(a) == [], what="teardown")
    a.stop()
    a.start()
    time.sleep(2)
    assert _ps(a) == []
    a.metac("ref", "rm", ref)
    _wait_for(lambda: compute_leftovers(a) == [], what=lambda: str(compute_leftovers(a)))
    assert node_cgroups(a) == set()


def test_interrupt_is_forwarded_once_then_detaches(nodes_factory, busybox_root) -> None:
    import signal

    (a,) = nodes_factory(1)
    before = snapshot(a)
    script = 'trap "echo got-int; exit 9" INT; echo ready; while :; do sleep 0.1; done'
    proc = a.popen("run", "--mount", f"/=local:{busybox_root}", "--", "sh", "-c", script)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 9
    assert proc.stdout.read() == "got-int\n"
    assert proc.stderr.read() == ("metac: sent SIGINT to the process; Ctrl-C again destroys "
                                  "the environment\n")
    # A process that ignores SIGINT: the second Ctrl-C gives up and tears down.
    script = 'trap "" INT; echo ready; exec sleep 300'
    proc = a.popen("run", "--mount", f"/=local:{busybox_root}", "--", "sh", "-c", script)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    wait_clean([a], before)


def test_environment_directory_removal_never_enters_a_mount(tmp_path: Path) -> None:
    import subprocess

    from metac.compute.environment import remove_env_dir

    user = tmp_path / "user"
    user.mkdir()
    (user / "precious").write_text("keep me")
    env = tmp_path / "env"
    for sub in ("root", "fs0", "bundle"):
        (env / sub).mkdir(parents=True)
    (env / "bundle" / "config.json").write_text("{}")
    (env / "init.pid").write_text("1")
    subprocess.run(["mount", "--bind", str(user), str(env / "root")], check=True)
    try:
        assert remove_env_dir(str(env)) is False
        assert os.listdir(env) == ["root"]
    finally:
        subprocess.run(["umount", str(env / "root")], check=True)
    assert (user / "precious").read_text() == "keep me"
    assert remove_env_dir(str(env)) is True and not env.exists()


def test_run_on_ipv6_nodes(nodes_factory, tmp_path: Path) -> None:
    a, b = nodes_factory(2, ipv6=True)
    root = tmp_path / "rootfs"
    rootfs.build_busybox(str(root))
    launcher = b.metac("compute", "export").stdout.strip()
    assert launcher.startswith(f"ref://[{b.address}]")
    before = snapshot(a, b)
    proc = a.metac("run", "--on", launcher, "--mount", f"/=local:{root}", "--",
                   "sh", "-c", "cat; echo done", input="over ipv6\n", check=False)
    assert proc.returncode == 0, proc.stderr + service_log(b)
    assert proc.stdout == "over ipv6\ndone\n"
    wait_clean([a, b], before)
