"""Hostile streams (issue 10, items 3 and 4): a ref holder hands a node fake Stream
capabilities. Real nodes in network namespaces; the attacker is a raw pycapnp client (and,
for some cases, a fake node of its own) on B. Traffic goes only to loopback and to
addresses inside the namespaces made here.

* SSRF: a fake Stream whose ``tcpListen`` answers A's loopback (directly, through a ref
  naming a loopback address, or through a fake node of the attacker's) must not make A
  copy its loopback-only service into a file the attacker can read back.
* Pending binds: many ``bindTo`` calls whose other stream never answers keep the stream
  service's fds bounded, time out and release everything, and ``metac stream cat`` keeps
  working meanwhile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from metac.testing.nodes import NodeHost

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

# A loopback-only service on A: every connection gets the secret, and is reported.
SECRET_SERVER = textwrap.dedent("""
    import socket, sys
    srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        print("connection", flush=True)
        conn.sendall(b"TOPSECRET\\n")
        conn.close()
""")

# The attacker: fake Streams, and a fake node serving them (mode in argv).
ATTACKER = textwrap.dedent("""
    import asyncio, json, os, socket, sys
    import capnp
    from metac import api, errors
    from metac.core.rpc import serve_tcp
    from metac.schema.load import core, fs, stream

    ME = sys.argv[2]          # this host's address (B)
    FAKE_PORT = 9901          # where the fake node listens on B

    class FakeStream(stream.Stream.Server):
        def __init__(self, answer, ref_node=None, ref_port=0, hang=False):
            self.answer, self.ref_node, self.ref_port, self.hang = answer, ref_node, ref_port, hang

        async def createSturdyRef(self, _context, **kw):
            if self.ref_node is None:
                raise Exception("not persistable")
            ref = _context.results.init("id")
            ref.node.ip = self.ref_node
            ref.node.port = self.ref_port
            ref.service = "stream"
            ref.objectInfo = b"x" * 24

        async def tcpListen(self, remote, remotePort, _context, **kw):
            if self.hang:
                await asyncio.Event().wait()
            local = _context.results.init("local")
            local.ip, _context.results.port = self.answer

    class FakeService(core.Service.Server):
        def __init__(self, make):
            self.make = make

        async def restore(self, objectInfo, _context, **kw):
            _context.results.obj = stream.Stream._new_client(self.make())

    class FakeNode(core.Node.Server):
        def __init__(self, make):
            self.make = make

        async def address(self, _context, **kw):
            _context.results.init("address").ip = ME

        async def getService(self, name, _context, **kw):
            _context.results.service = FakeService(self.make)

    def category(exc):
        return errors.from_kj(exc).category

    async def bind(target, fake, timeout=60):
        try:
            holder = (await asyncio.wait_for(target.bindTo(fake), timeout)).holder
        except Exception as exc:
            return {"result": category(exc), "message": str(errors.from_kj(exc))}
        return {"result": "bound", "holder": holder}

    async def ssrf(pool, file_ref, secret_port, own_port, stream_ref):
        secret_port, own_port = int(secret_port), int(own_port)
        file = await pool.restore(api.SturdyRef.parse(file_ref), fs.File)
        a_ip = api.SturdyRef.parse(file_ref).node
        behind = {"make": lambda: FakeStream(("127.0.0.1", secret_port))}
        server = await serve_tcp(ME, FAKE_PORT, lambda peer: FakeNode(lambda: behind["make"]()))
        cases = {
            "unlocatable": FakeStream(("127.0.0.1", secret_port)),
            "ref_names_loopback": FakeStream(("127.0.0.1", secret_port), "127.0.0.1", secret_port),
            "ref_names_link_local": FakeStream(("127.0.0.1", secret_port), "169.254.1.1", 901),
            "fake_node_answers_loopback": FakeStream(("127.0.0.1", 1), ME, FAKE_PORT),
            "fake_node_answers_node_a": FakeStream(("127.0.0.1", 1), ME, FAKE_PORT),
            "fake_node_answers_itself": FakeStream(("127.0.0.1", 1), ME, FAKE_PORT),
        }
        makers = {
            "fake_node_answers_loopback": lambda: FakeStream(("127.0.0.1", secret_port)),
            "fake_node_answers_node_a": lambda: FakeStream((a_ip, secret_port)),
            "fake_node_answers_itself": lambda: FakeStream((ME, own_port)),
        }
        out = {}
        for name, fake in cases.items():
            behind["make"] = makers.get(name, behind["make"])
            writer = (await file.openForWrite(False)).stream
            res = await bind(writer, fake)
            holder = res.pop("holder", None)
            if holder is not None:
                await asyncio.sleep(2)  # let the bytes land, then let go
                await holder.release()
            out[name] = res
        # The stream service's own bindTo, the same way.
        exported = await pool.restore(api.SturdyRef.parse(stream_ref), stream.Stream)
        behind["make"] = lambda: FakeStream(("127.0.0.1", secret_port))
        for name, fake in (("stream_unlocatable", FakeStream(("127.0.0.1", secret_port))),
                           ("stream_fake_node_answers_loopback",
                            FakeStream(("127.0.0.1", 1), ME, FAKE_PORT))):
            res = await bind(exported, fake)
            res.pop("holder", None)
            out[name] = res
        await server.aclose()
        return out

    async def pending(pool, stream_ref, count, made_up):
        target = await pool.restore(api.SturdyRef.parse(stream_ref), stream.Stream)
        server = await serve_tcp(ME, FAKE_PORT, lambda peer: FakeNode(
            lambda: FakeStream(None, hang=True)))
        fakes = [FakeStream(None, ME, FAKE_PORT) for _ in range(int(count))]
        tasks = [asyncio.ensure_future(bind(target, f, 120)) for f in fakes]
        print(json.dumps({"event": "started"}), flush=True)
        # Also flood tcpListen for one made-up peer: its listeners are capped too.
        listens, held = [], []
        for _ in range(int(count)):
            try:
                held.append(await target.tcpListen(remote={"ip": made_up}, remotePort=40000))
                listens.append("listening")
            except Exception as exc:
                listens.append(category(exc))
        print(json.dumps({"event": "listens", "results": listens}), flush=True)
        results = [r["result"] for r in await asyncio.gather(*tasks)]
        messages = sorted({r["message"] for r in await asyncio.gather(*tasks)
                           if "message" in r})
        await server.aclose()
        return {"event": "done", "results": results, "messages": messages}

    async def main(cmd, me, *rest):
        async with api.NodePool() as pool:
            result = await globals()[cmd](pool, *rest)
            print(json.dumps(result), flush=True)

    asyncio.run(capnp.run(main(*sys.argv[1:])))
""")

OWN_SERVER = textwrap.dedent("""
    import socket, sys
    srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    conn, _ = srv.accept()
    conn.sendall(b"from the attacker's own host\\n")
    conn.close()
""")


def start(node: NodeHost, script: str, *args: str) -> subprocess.Popen[str]:
    proc = node.host.popen([sys.executable, "-c", script, *args], env=node.cli_env(),
                           text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    assert proc.stdout is not None
    return proc


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate(timeout=10)
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def service_pid(node: NodeHost, name: str) -> int:
    status = json.loads(node.metac("node", "status", "--json").stdout)
    (svc,) = [s for s in status["services"] if s["name"] == name]
    return int(svc["pid"])


def test_fake_stream_cannot_reach_the_nodes_loopback(nodes_factory) -> None:
    a, b = nodes_factory(2)
    secret = start(a, SECRET_SERVER, "7777")
    own = start(b, OWN_SERVER, b.address, "7010")
    try:
        assert secret.stdout is not None and secret.stdout.readline().strip() == "ready"
        assert own.stdout is not None and own.stdout.readline().strip() == "ready"
        target = Path(a.root) / "target.txt"
        target.write_text("")
        file_ref = a.metac("file", "export", f"local:{target}").stdout.strip()
        stream_ref = a.metac("stream", "export", "tcp:127.0.0.1:7001").stdout.strip()

        proc = b.host.run([sys.executable, "-c", ATTACKER, "ssrf", b.address, file_ref,
                           "7777", "7010", stream_ref], env=b.cli_env(), check=False,
                          timeout=300)
        assert proc.returncode == 0, proc.stderr
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
        for case in ("unlocatable", "ref_names_loopback", "ref_names_link_local",
                     "fake_node_answers_loopback", "fake_node_answers_node_a",
                     "stream_unlocatable", "stream_fake_node_answers_loopback"):
            assert seen[case]["result"] == "PermissionDenied", (case, seen[case])
        # The check is precise: a stream served by the attacker's own node may answer that
        # node's address, and then A connects there (to the attacker's host, not its own).
        assert seen["fake_node_answers_itself"] == {"result": "bound"}, seen
        assert "served by the node at" in seen["fake_node_answers_node_a"]["message"]

        # A never connected to its loopback service; the file holds nothing of it.
        read_back = b.metac("file", "cat", file_ref).stdout
        assert "TOPSECRET" not in read_back
        assert read_back == "from the attacker's own host\n"
    finally:
        secret_out = stop(secret)
        stop(own)
    assert "connection" not in secret_out


def test_pending_binds_are_bounded_and_time_out(nodes_factory) -> None:
    a, b = nodes_factory(2)
    a.stop()
    a.env["METAC_CALL_TIMEOUT"] = "25"
    a.env["METAC_STREAM_LISTEN_TIMEOUT"] = "25"
    a.start()
    echo = start(a, textwrap.dedent("""
        import socket, sys, threading
        srv = socket.create_server(("127.0.0.1", 7000), backlog=64)
        print("ready", flush=True)
        def serve(conn):
            while data := conn.recv(65536):
                conn.sendall(data.upper())
            conn.close()
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    """))
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        ref = a.metac("stream", "export", "tcp:127.0.0.1:7000").stdout.strip()
        assert b.metac("stream", "cat", ref, input="warm").stdout == "WARM"
        pid = service_pid(a, "stream")
        base = fd_count(pid)

        count = 300
        made_up = b.address.rsplit(".", 1)[0] + ".201"
        attacker = start(b, ATTACKER, "pending", b.address, ref, str(count), made_up)
        assert attacker.stdout is not None
        assert json.loads(attacker.stdout.readline())["event"] == "started"
        listens = json.loads(attacker.stdout.readline())
        assert listens["event"] == "listens"
        # At most 32 unanswered tcpListen calls per remote address; the rest fail at once.
        assert listens["results"].count("listening") == 32
        assert set(listens["results"]) == {"listening", "Unavailable"}

        # While everything is pending: the fds stay bounded and the stream serves others.
        peak = fd_count(pid)
        assert b.metac("stream", "cat", ref, input="still here").stdout == "STILL HERE"
        peak = max(peak, fd_count(pid))
        print(f"stream service fds: {base} before, {peak} with {count} pending binds")
        # 32 pending binds (one bound socket each) + 32 listeners with their backend
        # connections (two each) + the fake node's connection, with some slack.
        assert peak - base < 32 + 2 * 32 + 16, (base, peak)

        done = json.loads(attacker.stdout.readline())
        assert done["event"] == "done"
        results = done["results"]
        assert results.count("Unavailable") == count, done
        assert any("did not answer within 25 s" in m for m in done["messages"]), done
        assert any("too many stream opens pending" in m for m in done["messages"]), done
        stop(attacker)

        # Everything the pending calls held is released.
        deadline = time.monotonic() + 30
        while fd_count(pid) > base + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert fd_count(pid) <= base + 2, (base, fd_count(pid))
        assert b.metac("stream", "cat", ref, input="after").stdout == "AFTER"
    finally:
        stop(echo)


COMPUTE_BODY = '''
class FakeStream(api.schema.stream.Stream.Server):
    async def createSturdyRef(self, _context, **kw):
        raise Exception("not persistable")

    async def tcpListen(self, remote, remotePort, _context, **kw):
        local = _context.results.init("local")
        local.ip, _context.results.port = "127.0.0.1", int(sys.argv[2])

async def body(launcher, cadmin, root, address):
    out = {}
    async with api.NodePool() as pool:
        sink = await pool.restore(api.SturdyRef.parse(sys.argv[3]), api.schema.stream.Stream)
        for name, given in (("fake", FakeStream()), ("exported", sink)):
            pd = describe(["sh", "-c", "echo hello from the container"], files=2)
            pd.files[1].stream = given
            try:
                res = await launcher.launch(processDescription=pd,
                                            envDescription=environment(root))
                await res.process.wait()
                out[name] = "ran"
                await res.env.destroy()
            except Exception as exc:
                from metac import errors
                out[name] = errors.from_kj(exc).category
    return out
'''

SINK = textwrap.dedent("""
    import socket, sys
    srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("ready", flush=True)
    conn, _ = srv.accept()
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    print(data.decode().strip(), flush=True)
""")


def test_process_stdio_given_as_a_fake_stream_is_refused(nodes_factory, tmp_path: Path) -> None:
    from test_compute_api import PRELUDE
    from test_compute_cli import service_log

    from metac.compute import rootfs

    root = tmp_path / "rootfs"
    rootfs.build_busybox(str(root))
    (a,) = nodes_factory(1)
    secret = start(a, SECRET_SERVER, "7777")
    sink = start(a, SINK, "7100")
    try:
        assert secret.stdout is not None and secret.stdout.readline().strip() == "ready"
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        ref = a.metac("stream", "export", "tcp:127.0.0.1:7100").stdout.strip()
        source = PRELUDE + COMPUTE_BODY + "\nmain(body)\n"
        proc = a.host.run([sys.executable, "-c", source, str(root), "7777", ref],
                          env=a.cli_env(), check=False, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr + service_log(a)
        out = json.loads(proc.stdout.splitlines()[-1])
        assert out == {"fake": "PermissionDenied", "exported": "ran"}, out
        assert sink.stdout.readline().strip() == "hello from the container"
    finally:
        secret_out = stop(secret)
        stop(sink)
    assert "connection" not in secret_out
