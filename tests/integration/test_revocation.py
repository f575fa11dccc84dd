"""Revocation cuts live users; re-exports are children of their grant; groups are capabilities
(issue 10, items 12, 6 and 7). Real nodes in network namespaces, the CLI as a user types it,
and a raw pycapnp holder where the CLI has no command (minting refs through a held one,
handing in a made-up resource group)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fs_support import eventually, node_pair, settle_without_leaks

from metac.testing.nodes import NodeHost, snapshot

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

DEMO = {"demo": "metac.testing.demo"}
CUT_WITHIN = 5.0  # seconds from `ref rm` to every live user cut (issue 10, item 12)

HOLDER = textwrap.dedent("""
    import asyncio, json, os, sys, time
    import capnp
    from metac import api, errors
    from metac.core.rpc import Servant
    from metac.schema.load import core, demo

    def out(value):
        print(json.dumps(value), flush=True)

    class MadeUpGroup(Servant, core.ResourceGroup.Server):
        # A client-made group: any name it likes, a token it cannot know, or no answer.
        def __init__(self, name, hang):
            self._name, self._hang = name, hang

        async def name(self, **kwargs):
            return self._name

        async def token(self, **kwargs):
            if self._hang:
                await asyncio.Event().wait()
            return os.urandom(32)

    async def mint(pool, ref, persistent, group=None):
        cap = await pool.restore(api.SturdyRef.parse(ref), core.Persistable)
        kwargs = {"rgroup": group} if group is not None else {}
        res = await cap.createSturdyRef(persistent=persistent == "persistent", **kwargs)
        return api.ref_from_struct(res.id).format()

    async def main(cmd, *args):
        async with api.NodePool() as pool:
            if cmd == "mint":
                out(await mint(pool, *args))
            elif cmd == "mint-many":
                ref, n = args
                made, error = 0, None
                for _ in range(int(n)):
                    try:
                        await mint(pool, ref, "persistent")
                        made += 1
                    except capnp.KjException as exc:
                        error = str(errors.from_kj(exc).category)
                        break
                out({"made": made, "error": error})
            elif cmd == "group":
                ref, name, how = args
                t0 = time.monotonic()
                try:
                    await mint(pool, ref, "persistent", MadeUpGroup(name, how == "hang"))
                    out({"error": None})
                except capnp.KjException as exc:
                    err = errors.from_kj(exc)
                    out({"error": err.category, "message": str(err),
                         "seconds": time.monotonic() - t0})
            elif cmd == "hold":
                # A live user: a counter restored once, then used until it is cut.
                counter = await pool.restore(api.SturdyRef.parse(args[0]), demo.Counter)
                out((await counter.increment(1)).value)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 30:
                    try:
                        await counter.increment(1)
                    except capnp.KjException as exc:
                        out({"error": errors.from_kj(exc).category,
                             "seconds": time.monotonic() - t0})
                        return
                    await asyncio.sleep(0.1)
                out({"error": None})

    asyncio.run(capnp.run(main(*sys.argv[1:])))
""")

ECHO_SERVER = textwrap.dedent("""
    import asyncio, json, sys

    async def handle(reader, writer):
        print(json.dumps("open"), flush=True)
        try:
            while data := await reader.read(1 << 16):
                writer.write(data.upper())
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()
        print(json.dumps("closed"), flush=True)

    async def main(port):
        await asyncio.start_server(handle, "127.0.0.1", port)
        print(json.dumps("ready"), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main(int(sys.argv[1])))
""")

FORWARD_USER = textwrap.dedent("""
    import json, socket, sys, time

    def out(value):
        print(json.dumps(value), flush=True)

    def carries(sock):
        # One round trip: True if the bytes came back, False if the connection is cut.
        try:
            sock.sendall(b"ping")
            sock.settimeout(0.5)
            data = sock.recv(100)
        except socket.timeout:
            return None
        except OSError:
            return False
        return data == b"PING" if data else False

    port = int(sys.argv[1])
    old = socket.create_connection(("127.0.0.1", port))
    out({"old": carries(old)})
    sys.stdin.readline()
    t0 = time.monotonic()
    while carries(old) is not False and time.monotonic() - t0 < 30:
        time.sleep(0.1)
    cut = time.monotonic() - t0
    try:
        new = socket.create_connection(("127.0.0.1", port), timeout=5)
        new_carries = carries(new)
    except OSError:
        new_carries = False
    out({"old_cut_after": cut, "new": new_carries})
""")


class Program:
    """A helper program in a host; JSON lines read in the background, stdin for "go"."""

    def __init__(self, node: NodeHost, script: str, *args: str) -> None:
        self.proc = node.host.popen(
            [sys.executable, "-c", script, *args], env=node.cli_env(), text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def next(self, timeout: float = 60.0) -> Any:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            stderr = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise AssertionError(f"no output from the helper: {stderr}") from None

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def programs():
    started: list[Program] = []
    yield started
    for program in started:
        program.close()


def start(programs: list[Program], node: NodeHost, script: str, *args: str) -> Program:
    program = Program(node, script, *args)
    programs.append(program)
    return program


def holder(node: NodeHost, *args: str) -> Any:
    proc = node.host.run([sys.executable, "-c", HOLDER, *args], env=node.cli_env(),
                         check=False, timeout=120)
    assert proc.returncode == 0, f"holder {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def demo(node: NodeHost, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = node.host.run([sys.executable, "-m", "metac.testing.democli", *args],
                         env=node.cli_env(), check=False, timeout=60)
    if check:
        assert proc.returncode == 0, f"democli {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def refs(node: NodeHost) -> list[dict]:
    return json.loads(node.metac("ref", "ls", "--json").stdout)


def short_id(node: NodeHost, ref: str) -> str:
    return json.loads(node.metac("ref", "show", ref, "--json").stdout)["id"]


# --------------------------------------------------------------------------- item 12


def test_forward_stops_carrying_old_and_new_connections_after_ref_rm(
        nodes_factory, programs) -> None:
    a, b = nodes_factory(2)
    backend = start(programs, a, ECHO_SERVER, "7000")
    assert backend.next() == "ready"
    ref = a.metac("stream", "export", "tcp:127.0.0.1:7000").stdout.strip()
    forward = b.popen("stream", "forward", ref, "127.0.0.1:7001")
    assert forward.stdout is not None
    assert forward.stdout.readline().startswith("forwarding 127.0.0.1:7001")
    user = start(programs, b, FORWARD_USER, "7001")
    assert user.next() == {"old": True}  # carried before the revocation
    assert backend.next() == "open"

    a.metac("ref", "rm", ref)
    user.go()
    result = user.next()
    assert result["old_cut_after"] < CUT_WITHIN, result
    assert result["new"] is False, result
    assert backend.next(CUT_WITHIN) == "closed"  # A's side of the connection is gone too
    # The forward notices at that next connection and stops: one line, NotFound's exit code.
    assert forward.wait(30) == 3
    assert forward.stderr is not None
    assert forward.stderr.read().strip() == \
        "metac: NotFound: the stream's ref was revoked; stopped forwarding"


def test_live_capability_and_its_children_are_cut_with_the_parent(nodes_factory,
                                                                  programs) -> None:
    a, b = nodes_factory(2, DEMO)
    root = demo(a, "make-counter", "c", "--persistent").stdout.strip()
    child = holder(b, "mint", root, "persistent")
    grandchild = holder(b, "mint", child, "persistent")
    assert demo(b, "increment", grandchild, "2").stdout.strip() == "2"

    listed = {r["id"]: r for r in refs(a)}
    root_id, child_id, grandchild_id = (short_id(a, r) for r in (root, child, grandchild))
    assert listed[child_id]["parent"] == root_id and listed[child_id]["persistent"]
    assert listed[grandchild_id]["parent"] == child_id and listed[grandchild_id]["persistent"]
    # `ref ls` shows the tree: each child right under its parent, indented.
    lines = a.metac("ref", "ls").stdout.splitlines()
    rows = [line for line in lines if line.strip().split()[0] in listed]
    ids = [row.split()[0] for row in rows]
    assert ids.index(child_id) == ids.index(root_id) + 1
    assert rows[ids.index(child_id)].startswith("  " + child_id)
    assert rows[ids.index(grandchild_id)].startswith("    " + grandchild_id)

    live = start(programs, b, HOLDER, "hold", grandchild)
    assert live.next() == 3
    assert a.metac("ref", "rm", root).stdout.startswith(f"revoked {root_id}")
    live.go()
    cut = live.next()
    assert cut["error"] == "NotFound" and cut["seconds"] < CUT_WITHIN, cut
    for ref in (root, child, grandchild):
        gone = demo(b, "increment", ref, "1", check=False)
        assert gone.returncode == 3 and "NotFound" in gone.stderr
    assert refs(a) == []


def test_mount_of_a_revoked_ref_stops_and_leaves_nothing(nodes_factory, tmp_path: Path) -> None:
    with node_pair(nodes_factory, tmp_path) as (a, b, export):
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        (export / "f").write_text("shared")
        ref = a.metac("fs", "export", f"local:{export}").stdout.strip()
        before = snapshot(a, b)
        export_id = short_id(a, ref)
        # The ref a mount makes on A to reach the export (an alias of the export's ref) is
        # a child of the export's ref, and an unmount drops it.
        b.metac("fs", "mount", ref, str(mnt))
        assert [r["parent"] for r in refs(a) if r["id"] != export_id] == [export_id]
        b.metac("fs", "umount", str(mnt))
        assert [r["id"] for r in refs(a)] == [export_id]

        b.metac("fs", "mount", ref, str(mnt))
        assert (mnt / "f").read_text() == "shared"

        a.metac("ref", "rm", ref)
        t0 = time.monotonic()
        eventually(lambda: not (mnt / "f").exists(), 30, "the mount to stop serving")
        assert time.monotonic() - t0 < CUT_WITHIN
        # B released the mount by itself (not a placeholder waiting for a dead ref), A
        # stopped its file server, and every ref went.
        eventually(lambda: json.loads(b.metac("fs", "ls", "--json").stdout) == [], 30,
                   "B to release the mount")
        assert str(mnt) not in b.mounts()
        (mnt / "written-after-revocation").write_text("a plain directory again")
        assert not (export / "written-after-revocation").exists()
        assert refs(a) == []
        settle_without_leaks(before, a, b)
        assert "revocation cut" in (a.state_dir / "logs" / "node.service-fs.log").read_text()
        assert "its ref was revoked; releasing it" in \
            (b.state_dir / "logs" / "node.service-fs.log").read_text()


TALKER_SERVER = textwrap.dedent("""
    import asyncio, json, sys

    async def handle(reader, writer):
        print(json.dumps("open"), flush=True)
        try:
            while True:
                writer.write(b"tick")
                await writer.drain()
                if not await reader.read(1 << 16):
                    break
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass
        writer.close()
        print(json.dumps("closed"), flush=True)

    async def main(port):
        await asyncio.start_server(handle, "127.0.0.1", port)
        print(json.dumps("ready"), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main(int(sys.argv[1])))
""")


def test_stream_bind_through_a_revoked_ref_stops(nodes_factory, programs) -> None:
    a, b = nodes_factory(2)
    echo = start(programs, a, ECHO_SERVER, "7000")
    talker = start(programs, b, TALKER_SERVER, "7000")
    assert echo.next() == talker.next() == "ready"
    ref_a = a.metac("stream", "export", "tcp:127.0.0.1:7000").stdout.strip()
    ref_b = b.metac("stream", "export", "tcp:127.0.0.1:7000").stdout.strip()
    bind_ref = b.metac("stream", "bind", ref_a, ref_b).stdout.strip()
    assert echo.next() == talker.next() == "open"  # ticks go round
    # The bind's ref was made through ref_a: a child of it, on A.
    ref_a_id = short_id(a, ref_a)
    bind_row = {r["id"]: r for r in refs(a)}[short_id(a, bind_ref)]
    assert bind_row["parent"] == ref_a_id

    a.metac("ref", "rm", ref_a)
    assert echo.next(CUT_WITHIN) == "closed"
    assert talker.next(CUT_WITHIN) == "closed"
    assert ref_a_id not in {r["id"] for r in refs(a)}
    gone = a.metac("ref", "rm", bind_ref, check=False)
    assert gone.returncode == 3 and "NotFound" in gone.stderr  # went with ref_a


# --------------------------------------------------------------------------- item 6


def test_holder_of_a_non_persistent_ref_cannot_mint_persistent_ones(nodes_factory) -> None:
    a, b = nodes_factory(2, DEMO)
    ref = demo(a, "make-counter", "t").stdout.strip()
    minted = holder(b, "mint", ref, "persistent")
    row = {r["id"]: r for r in refs(a)}[short_id(a, minted)]
    assert row["persistent"] is False and row["parent"] == short_id(a, ref)
    assert demo(b, "increment", minted, "1").stdout.strip() == "1"
    a.stop()
    a.start(DEMO)
    gone = demo(b, "increment", minted, "1", check=False)
    assert gone.returncode == 3 and "NotFound" in gone.stderr
    assert refs(a) == []


def test_children_per_grant_are_bounded(nodes_factory) -> None:
    a, b = nodes_factory(2, DEMO)
    a.stop()
    a.env["METAC_REF_CHILD_QUOTA"] = "3"
    a.start(DEMO)
    ref = demo(a, "make-counter", "q", "--persistent").stdout.strip()
    assert holder(b, "mint-many", ref, "10") == {"made": 3, "error": "PermissionDenied"}
    assert len(refs(a)) == 4  # the refused one was not kept
    # The bound is per grant: another ref has its own.
    another = demo(a, "make-counter", "r", "--persistent").stdout.strip()
    assert holder(b, "mint-many", another, "2") == {"made": 2, "error": None}


# --------------------------------------------------------------------------- item 7


def test_made_up_groups_are_refused(nodes_factory, programs) -> None:
    a, b = nodes_factory(2, DEMO)
    a.metac("ref", "group", "create", "prod")
    ref = demo(a, "make-counter", "g", "--persistent", "--group", "prod").stdout.strip()
    before = refs(a)
    assert [r["group"] for r in before] == ["prod"]

    named = holder(b, "group", ref, "prod", "answer")
    assert named["error"] == "PermissionDenied", named
    unknown = holder(b, "group", ref, "no-such-group", "answer")
    assert unknown == {**unknown, "error": "PermissionDenied"}
    assert unknown["message"] == named["message"]  # no hint which groups exist
    assert "prod" not in named["message"]

    hung = holder(b, "group", ref, "prod", "hang")
    assert hung["error"] == "PermissionDenied" and "did not answer" in hung["message"], hung
    assert refs(a) == before

    # Dropping the admin's group cuts a live user of a ref filed in it.
    live = start(programs, b, HOLDER, "hold", ref)
    assert live.next() == 1
    assert a.metac("ref", "group", "rm", "prod").stdout.strip() == \
        "dropped group prod, revoked 1 ref(s)"
    live.go()
    cut = live.next()
    assert cut["error"] == "NotFound" and cut["seconds"] < CUT_WITHIN, cut


def test_net_bind_of_a_revoked_ref_ends(nodes_factory) -> None:
    from test_net_bind import bind_new, container, links_of, net_ls, ping_ok, pings

    a, b = nodes_factory(2)
    ca = container(a, "ca", dev="port0", addr="192.168.77.1")
    before = links_of(a, b)
    ref = a.metac("net", "export", "local:port0").stdout.strip()
    bind = bind_new(b, ref, "remote0", "192.168.77.2")
    try:
        ping_ok(ca, "192.168.77.2")
        a.metac("ref", "rm", ref)
        t0 = time.monotonic()
        eventually(lambda: net_ls(a)["binds"] == [], 30, "A to drop its end of the bind")
        assert time.monotonic() - t0 < CUT_WITHIN
        assert not pings(ca, "192.168.77.2", 2)
        # B learns the ref is gone for good: its bind ends and what it made goes.
        eventually(lambda: net_ls(b)["binds"] == [], 30, "B to end its bind")
        eventually(lambda: links_of(a, b) == before, 30, "links back to what they were")
    finally:
        if bind.poll() is None:
            bind.terminate()
        bind.communicate(timeout=30)
