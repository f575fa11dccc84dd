"""The docs' examples, run as written on two namespaced nodes (issue 18, "done when").

A shell block in README.md or docs/*.md that follows ``<!-- example: NAME -->`` is run
here, line by line, with bash, in the network namespace of node A or B, with `metac`
on PATH. So a documented command that stops working fails the suite. The rules the
blocks follow (say them in plain words, for readers):

* a comment line that names ``A`` or ``B`` ("# machine A", "# on node B", "# back on
  A", "# Anywhere, for example on node B") says where the next lines run; "Anywhere"
  alone means B;
* ``10.0.0.1`` is node A's address, ``10.0.0.2`` node B's;
* ``ref://10.0.0.1/SERVICE/…`` is the ref of SERVICE the block printed last;
  ``ref://…first…`` and ``ref://…second…`` the first and second refs it printed;
  ``ref://…WORD…`` the ref printed last by a command with WORD in it; ``<id>`` the
  short id of the ref printed last;
* ``metac node run`` is not run: the harness runs both nodes, with ``--address``;
* ``stream forward`` and a ``net bind`` without ``--persistent`` run in the foreground
  until stopped: each keeps running (as if in another terminal) from the line that
  says it is ready until the end of its paragraph (the next blank line), then stops
  with SIGTERM, its normal end (exit 0). Every other line must exit 0.

Covered: the README quick start (``quickstart``), docs/streams.md (``streams``),
docs/filesystems.md (``filesystems``), docs/network.md (``network``) and
docs/compute.md (``compute``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from metac.persistence.store import SHORT_ID_LEN
from metac.testing.netns import ip
from metac.testing.nodes import NodeHost

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXAMPLE_RE = re.compile(r"<!-- example: (?P<name>[\w-]+) -->\s*\n```sh\n(?P<body>.*?)\n```",
                        re.S)
REF_RE = re.compile(r"ref://[^\s'\"()]+")
PLACEHOLDER_RE = re.compile(r"ref://[^\s'\",]*(?:…|\.\.\.)[^\s'\",/]*")
DOC_A, DOC_B = "10.0.0.1", "10.0.0.2"
#: Commands that run until stopped (their first words, and a word that makes them return
#: at once instead), and the start of the line that says they are ready.
LONG_RUNNING = {("stream", "forward"): (None, "forwarding "),
                ("net", "bind"): ("--persistent", "bound ")}


def examples() -> dict[str, tuple[Path, str]]:
    found: dict[str, tuple[Path, str]] = {}
    for path in DOCS:
        for m in EXAMPLE_RE.finditer(path.read_text()):
            assert m["name"] not in found, f"example {m['name']} twice"
            found[m["name"]] = (path, m["body"])
    return found


def test_the_examples_are_marked() -> None:
    assert set(examples()) == {"quickstart", "streams", "filesystems", "network", "compute"}


def short_id(ref: str) -> str:
    secret = ref.rsplit("/", 1)[1]
    raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    return hashlib.sha256(b"metac-ref\0" + raw).hexdigest()[:SHORT_ID_LEN]


class ExampleRunner:
    """Runs one example block on nodes A and B (see the module docstring)."""

    def __init__(self, nodes: dict[str, NodeHost], tmp: Path,
                 substitutions: dict[str, str] | None = None) -> None:
        self.cwd = tmp / "cwd"  # where a command's relative paths (> copy.txt) go
        self.cwd.mkdir()
        self.nodes = nodes
        self.subs = {DOC_A: nodes["A"].address, DOC_B: nodes["B"].address,
                     **(substitutions or {})}
        self.printed: list[tuple[str, str]] = []  # (command line, ref)
        self.bin = tmp / "bin"
        self.bin.mkdir()
        wrapper = self.bin / "metac"
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m metac "$@"\n')
        wrapper.chmod(0o755)
        self.ran: list[str] = []
        self.holding: list[tuple[str, subprocess.Popen[str]]] = []
        self.where = "A"
        self.outputs: list[tuple[str, str]] = []  # (command line, stdout)

    def resolve(self, token: str) -> str:
        inner = re.sub(r"^ref://", "", token)
        words = [w for w in re.split(r"…|\.\.\.|/", inner) if w]
        if "first" in words or "second" in words:
            refs = [ref for _, ref in self.printed]
            return refs[0 if "first" in words else 1]
        if len(words) == 1 and not re.fullmatch(r"[\d.:\[\]]+", words[0]):
            word = words[0]
            return next(ref for line, ref in reversed(self.printed) if word in line)
        service = words[1] if len(words) > 1 else None
        return next(ref for _, ref in reversed(self.printed)
                    if service is None or f"/{service}/" in ref)

    def expand(self, line: str) -> str:
        for doc, real in self.subs.items():
            line = line.replace(doc, real)
        line = PLACEHOLDER_RE.sub(lambda m: self.resolve(m.group(0)), line)
        if "<id>" in line:
            line = line.replace("<id>", short_id(self.printed[-1][1]))
        return line

    def run(self, body: str) -> None:
        self.where = "A"
        pending = ""  # a command continued with a backslash at the end of its line
        try:
            for raw in body.splitlines():
                text = raw.strip()
                if text.endswith("\\"):
                    pending += text[:-1].strip() + " "
                    continue
                self.run_raw(pending + text)
                pending = ""
        finally:
            self.stop_holding()

    def run_raw(self, text: str) -> None:
        if not text:  # the end of a paragraph: foreground commands are stopped
            self.stop_holding()
        elif text.startswith("#"):
            named = re.search(r"\b(?i:machine|node|on)\s+([AB])\b", text)
            if named:
                self.where = named.group(1)
            elif re.search(r"\banywhere\b", text, re.I):
                self.where = "B"
        else:
            self.run_line(self.where, re.split(r"\s{2,}#", text)[0].strip())

    def env(self, node: NodeHost) -> dict[str, str]:
        return node.cli_env({"PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"})

    def run_line(self, where: str, command: str) -> None:
        node = self.nodes[where]
        if command.rstrip("& ").startswith("metac node run"):
            assert node.running
            return
        line = self.expand(command)
        self.ran.append(f"{where}$ {line}")
        words = line.split()
        argv = node.host.argv(["bash", "-c", line])
        for first, (returns_if, ready) in LONG_RUNNING.items():
            if tuple(words[1:3]) == first and returns_if not in words:
                self.start_holding(argv, node, line, ready)
                return
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env(node),
                              stdin=subprocess.DEVNULL, timeout=120, check=False, cwd=self.cwd)
        assert proc.returncode == 0, (where, line, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, (line, proc.stderr)
        self.outputs.append((line, proc.stdout))
        for ref in REF_RE.findall(proc.stdout):
            self.printed.append((line, ref))

    def start_holding(self, argv: list[str], node: NodeHost, line: str, ready: str) -> None:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env(node), stdin=subprocess.DEVNULL, cwd=self.cwd)
        self.holding.append((line, proc))
        first = proc.stdout.readline() if proc.stdout else ""
        assert first.startswith(ready), (line, first, proc.poll())

    def stop_holding(self) -> None:
        holding, self.holding = self.holding, []
        try:
            for line, proc in holding:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=60)
                assert code == 0, (line, code, proc.stderr and proc.stderr.read())
        finally:
            for _, proc in holding:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


@contextmanager
def echo_servers(node: NodeHost, port: int, unix_path: Path) -> Iterator[None]:
    """A TCP and a unix echo server in ``node``'s namespace (the endpoints the docs share)."""
    script = f"""
import os, socket, threading
def serve(listener):
    while True:
        conn, _ = listener.accept()
        def echo(c=conn):
            with c:
                while data := c.recv(65536):
                    c.sendall(data)
        threading.Thread(target=echo, daemon=True).start()
tcp = socket.create_server(("127.0.0.1", {port}))
unix = socket.socket(socket.AF_UNIX)
unix.bind({str(unix_path)!r})
unix.listen()
threading.Thread(target=serve, args=(unix,), daemon=True).start()
print("ready", flush=True)
serve(tcp)
"""
    proc = node.host.popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def two_nodes(nodes_factory: Callable[..., list[NodeHost]]) -> dict[str, NodeHost]:
    a, b = nodes_factory(2)
    return {"A": a, "B": b}


def test_readme_quick_start(two_nodes: dict[str, NodeHost], tmp_path: Path) -> None:
    runner = ExampleRunner(two_nodes, tmp_path)
    runner.run(examples()["quickstart"][1])
    assert any("ref rm" in line for line in runner.ran), runner.ran
    # The ref the quick start revoked is gone for good.
    ref = runner.printed[0][1]
    gone = two_nodes["B"].metac("stream", "cat", ref, check=False)
    assert gone.returncode == 3, gone.stderr


def test_streams_doc(two_nodes: dict[str, NodeHost], tmp_path: Path) -> None:
    sock = tmp_path / "app.sock"
    runner = ExampleRunner(two_nodes, tmp_path, {"/run/app.sock": str(sock)})
    with echo_servers(two_nodes["A"], 5432, sock):
        runner.run(examples()["streams"][1])
    assert len(runner.ran) == 8, runner.ran
    assert [line.split()[0] for line in runner.ran] == ["A$"] * 2 + ["B$"] * 4 + ["A$"] * 2
    # `stream cat` reached the echo server through node A.
    assert [out for line, out in runner.outputs if "stream cat" in line] == ["hello\n"]


def test_filesystems_doc(two_nodes: dict[str, NodeHost], tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "on-a", tmp_path / "on-b"
    (a_dir / "data").mkdir(parents=True)
    (a_dir / "data" / "inside").write_text("shared\n")
    image = a_dir / "vm1.img"
    image.write_bytes(b"")
    os.truncate(image, 16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    for d in ("mnt-data", "mnt-vm1"):
        (b_dir / d).mkdir(parents=True)
    two_nodes["B"].track_mount_root(b_dir)
    runner = ExampleRunner(two_nodes, tmp_path, {
        "/srv/data": str(a_dir / "data"), "/srv/report.txt": str(a_dir / "report.txt"),
        "/var/lib/disks/vm1.img": str(image), "/mnt/data": str(b_dir / "mnt-data"),
        "/mnt/vm1": str(b_dir / "mnt-vm1")})
    runner.run(examples()["filesystems"][1])
    assert len(runner.ran) == 12, runner.ran
    assert (a_dir / "report.txt").read_text() == "hello\n"
    assert (runner.cwd / "copy.txt").read_text() == "hello\n"
    listed = [out for line, out in runner.outputs if line.endswith("fs ls")]
    assert str(b_dir / "mnt-data") in listed[0], listed
    # The revoked ref mounts nothing any more.
    data_ref = runner.printed[0][1]
    again = two_nodes["B"].metac("fs", "mount", data_ref, str(b_dir / "mnt-data"), check=False)
    assert again.returncode == 3, again.stderr


def test_network_doc(two_nodes: dict[str, NodeHost], tmp_path: Path) -> None:
    a = two_nodes["A"].host
    ip("link", "add", "eth1", "type", "veth", "peer", "name", "eth1-peer", netns=a.netns)
    for dev in ("eth1", "eth1-peer"):
        ip("link", "set", dev, "up", netns=a.netns)
    runner = ExampleRunner(two_nodes, tmp_path)
    runner.run(examples()["network"][1])
    assert [line.split()[0] for line in runner.ran] == ["A$"] * 2 + ["B$"] * 5, runner.ran
    listed = [out for line, out in runner.outputs if line.endswith("net ls")]
    assert "remote0" in listed[0], listed
    assert "remote0" not in ip("-o", "link", netns=two_nodes["B"].host.netns).stdout


def test_compute_doc(two_nodes: dict[str, NodeHost], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "from-a.txt").write_text("A\n")
    for node in two_nodes.values():
        node.track_mount_root(tmp_path)
    runner = ExampleRunner(two_nodes, tmp_path, {"/srv/rootfs": str(tmp_path / "rootfs"),
                                                 "/home/me/data": str(data)})
    runner.run(examples()["compute"][1])
    assert [line.split()[0] for line in runner.ran] == ["A$"] * 4 + ["B$", "A$"], runner.ran
    out = runner.outputs[-1][1]
    assert out.startswith("from-a.txt\n") and "1 packets received" in out, out


def test_the_runner_follows_the_rules() -> None:
    """The conventions above, without nodes (so a rule that breaks says which)."""
    runner = ExampleRunner.__new__(ExampleRunner)
    runner.subs = {DOC_A: "192.0.2.1", DOC_B: "192.0.2.2"}
    s1, s2, b1 = ("ref://192.0.2.1/stream/" + c * 32 for c in "xyz")
    runner.printed = [("metac stream export tcp:x", s1), ("metac stream export unix:y", s2),
                      ("metac stream bind a b", b1)]
    assert runner.expand("metac stream cat ref://10.0.0.1/stream/…") == f"metac stream cat {b1}"
    assert runner.expand("x ref://…first… ref://…second…") == f"x {s1} {s2}"
    assert runner.expand("metac ref rm ref://…bind…") == f"metac ref rm {b1}"
    assert runner.expand("metac ref rm <id>") == f"metac ref rm {short_id(b1)}"
    runner.printed.append(("metac net export newlocal:ct0", "ref://192.0.2.1/net/" + "n" * 32))
    assert runner.expand("--network name=eth0,uri=ref://[A]/net/...,address=x") == \
        f"--network name=eth0,uri={runner.printed[-1][1]},address=x"
