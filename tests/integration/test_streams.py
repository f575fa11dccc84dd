"""Streams end to end (issue 3): real nodes in network namespaces, the `metac stream` CLI and
the API. Traffic goes only to loopback and to addresses inside the namespaces made here.

Helper programs run inside the nodes' hosts: ``SERVERS`` (stdlib only: echo, hash and
peer TCP servers that report JSON lines) and ``CLIENT`` (metac API: tcpListen probes,
open/close cycles, binds through a third node).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from metac.testing.nodes import NodeHost, python_env

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

DEMO = {"demo": "metac.testing.demo"}
MiB = 1 << 20

GEN = textwrap.dedent("""
    import asyncio, hashlib, random

    def gen(seed, size):
        # Deterministic bytes: a random 1 MiB block, rotated differently for every chunk.
        block = random.Random(seed).randbytes(1 << 20)
        i = 0
        while size > 0:
            k = (i * 7919 * 61) % len(block)
            chunk = block[k:] + block[:k]
            yield chunk[:size]
            size -= len(chunk)
            i += 1

    async def exchange(reader, writer, seed, size):
        async def send():
            h = hashlib.sha256()
            for chunk in gen(seed, size):
                h.update(chunk)
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
            return h.hexdigest()

        async def recv():
            h, n = hashlib.sha256(), 0
            while data := await reader.read(1 << 18):
                h.update(data)
                n += len(data)
            return h.hexdigest(), n

        sent, (got, n) = await asyncio.gather(send(), recv())
        return {"sent": sent, "received": got, "received_bytes": n}
""")

SERVERS = GEN + textwrap.dedent("""
    import asyncio, hashlib, json, sys

    def emit(**event):
        print(json.dumps(event), flush=True)


    async def main(mode, where, *rest):
        count = 0

        async def handle(reader, writer):
            nonlocal count
            count += 1
            conn = count
            emit(event="open", conn=conn)
            result = {}
            try:
                if mode == "echo":  # upper-case echo, half-close aware
                    while data := await reader.read(1 << 16):
                        writer.write(data.upper())
                        await writer.drain()
                    writer.write_eof()
                elif mode == "hash":  # header (seed, size); answer gen(seed + 1000, size)
                    head = await reader.readexactly(16)
                    seed, size = int.from_bytes(head[:8], "big"), int.from_bytes(head[8:], "big")
                    result = await exchange(reader, writer, seed + 1000, size)
                    result["seed"] = seed
                elif mode == "peer":  # send gen(seed, size), hash what arrives
                    result = await exchange(reader, writer, int(rest[0]), int(rest[1]))
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                result = {"error": repr(exc)}
            finally:
                writer.close()
            emit(event="closed", conn=conn, **result)

        if where.startswith("/"):
            await asyncio.start_unix_server(handle, where)
        else:
            await asyncio.start_server(handle, "127.0.0.1", int(where), backlog=64)
        emit(event="ready")
        await asyncio.Event().wait()

    asyncio.run(main(*sys.argv[1:]))
""")

HASH_CLIENT = GEN + textwrap.dedent("""
    import asyncio, hashlib, json, sys

    async def one(port, seed, size):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(seed.to_bytes(8, "big") + size.to_bytes(8, "big"))
        result = await exchange(reader, writer, seed, size)
        writer.close()
        return {"seed": seed, **result}

    async def main(port, sizes):
        sizes = [int(s) for s in sizes.split(",")]
        results = await asyncio.gather(*(one(port, i + 1, s) for i, s in enumerate(sizes)))
        print(json.dumps(results))

    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
""")

CLIENT = textwrap.dedent("""
    import asyncio, json, os, socket, sys
    import capnp
    from metac import api
    from metac.core.streams import local_address_for, open_stream
    from metac.schema.load import demo, stream

    def fds():
        return len(os.listdir("/proc/self/fd"))

    async def recv_all(sock, timeout=10):
        loop, out = asyncio.get_running_loop(), b""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = await loop.sock_recv(sock, 65536)
                except ConnectionResetError:
                    return out, "reset"
                if not data:
                    return out, "eof"
                out += data

    async def rules(pool, cap, me, extra):
        loop = asyncio.get_running_loop()
        mine = socket.socket()
        mine.setblocking(False)
        mine.bind((me, 0))
        res = await cap.tcpListen(remote={"ip": me}, remotePort=mine.getsockname()[1])
        target = (res.local.ip, res.port)
        seen = {}
        for name, src in (("other_port", me), ("other_address", extra)):
            s = socket.socket()
            s.setblocking(False)
            s.bind((src, 0))
            await loop.sock_connect(s, target)
            seen[name] = await recv_all(s)
            s.close()
        await loop.sock_connect(mine, target)
        await loop.sock_sendall(mine, b"ping")
        mine.shutdown(socket.SHUT_WR)
        seen["mine"] = await recv_all(mine)
        mine.close()
        late = socket.socket()
        late.setblocking(False)
        try:
            await loop.sock_connect(late, target)
            seen["late"] = "connected"
        except ConnectionRefusedError:
            seen["late"] = "refused"
        late.close()
        return {k: [v[0].decode(), v[1]] if isinstance(v, tuple) else v for k, v in seen.items()}

    async def timeout(pool, cap, me, wait):
        loop = asyncio.get_running_loop()
        res = await cap.tcpListen(remote={"ip": me}, remotePort=40000)
        await asyncio.sleep(float(wait))
        s = socket.socket()
        s.setblocking(False)
        try:
            await loop.sock_connect(s, (res.local.ip, res.port))
            return "connected"
        except ConnectionRefusedError:
            return "refused"
        finally:
            s.close()

    async def release(pool, cap, me):
        loop = asyncio.get_running_loop()
        opened = await open_stream(cap, local_address=me)
        await loop.sock_sendall(opened.sock, b"abc")
        first = await loop.sock_recv(opened.sock, 10)
        await opened.holder.release()
        rest = await recv_all(opened.sock)
        await opened.aclose()
        return {"first": first.decode(), "after_release": [rest[0].decode(), rest[1]]}

    async def hold(pool, cap, me):
        loop = asyncio.get_running_loop()
        opened = await open_stream(cap, local_address=me)
        await loop.sock_sendall(opened.sock, b"abc")
        print(json.dumps((await loop.sock_recv(opened.sock, 10)).decode()), flush=True)
        await asyncio.sleep(3600)

    async def cycles(pool, cap, me, n):
        loop = asyncio.get_running_loop()
        before = fds()
        for i in range(int(n)):
            opened = await open_stream(cap, local_address=me)
            await loop.sock_sendall(opened.sock, b"x")
            opened.sock.shutdown(socket.SHUT_WR)
            data, how = await recv_all(opened.sock)
            assert data == b"X", (i, data, how)
            await opened.aclose()
        return {"before": before, "after": fds()}

    async def bind_via_box(pool, cap, me, other_ref):
        # The other stream reaches A only through this node's demo service (a Box).
        async with api.connect_admin() as admin:
            demo_admin = await api.service_admin(admin, "demo", demo.DemoAdmin)
            other = await pool.restore(api.SturdyRef.parse(other_ref))
            box = (await demo_admin.makeBox("relay", other)).box
            handed = (await box.get()).cap.cast_as(stream.Stream)
            holder = (await cap.bindTo(handed)).holder
            print(json.dumps("bound"), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await holder.release()
            return "released"

    async def main(cmd, ref, *rest):
        async with api.NodePool() as pool:
            parsed = api.SturdyRef.parse(ref)
            cap = await pool.restore(parsed, stream.Stream)
            me = local_address_for(parsed.node)
            result = await globals()[cmd](pool, cap, me, *rest)
            print(json.dumps(result), flush=True)

    asyncio.run(capnp.run(main(*sys.argv[1:])))
""")


# --------------------------------------------------------------------------- helpers


class Program:
    """A helper program in a host; its JSON lines are read in the background."""

    def __init__(self, node: NodeHost, script: str, *args: str, stdin: Any = None) -> None:
        self.proc = node.host.popen(
            [sys.executable, "-c", script, *args], env=node.cli_env(), text=True,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue[Any] = queue.Queue()
        self._backlog: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def next(self, timeout: float = 30.0) -> Any:
        try:
            item = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout}s; stderr: {self.stderr()}") from None
        if item is None:
            raise AssertionError(f"program exited {self.proc.wait()}: {self.stderr()}")
        return item

    def events(self, kind: str, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """The next ``count`` events of ``kind`` (other events stay for later calls)."""
        deadline = time.monotonic() + timeout
        while sum(e.get("event") == kind for e in self._backlog) < count:
            self._backlog.append(self.next(max(0.1, deadline - time.monotonic())))
        found = [e for e in self._backlog if e.get("event") == kind][:count]
        for e in found:
            self._backlog.remove(e)
        return found

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(running)"
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def programs() -> Iterator[list[Program]]:
    started: list[Program] = []
    yield started
    for program in started:
        program.close()


def server(programs: list[Program], node: NodeHost, *args: str) -> Program:
    program = Program(node, SERVERS, *args)
    programs.append(program)
    assert program.next()["event"] == "ready"
    return program


def client(node: NodeHost, *args: str, timeout: float = 120.0) -> Any:
    proc = node.host.run([sys.executable, "-c", CLIENT, *args], env=node.cli_env(),
                         check=False, timeout=timeout)
    assert proc.returncode == 0, f"client {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def service_pid(node: NodeHost, name: str) -> int:
    status = json.loads(node.metac("node", "status", "--json").stdout)
    (svc,) = [s for s in status["services"] if s["name"] == name]
    return int(svc["pid"])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_fd_count(pid: int, want: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := fd_count(pid)) > want and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def eth_bytes(node: NodeHost) -> int:
    """rx + tx bytes of the host's eth0, read inside its namespace."""
    text = node.host.run(["cat", "/proc/net/dev"]).stdout
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == node.host.ifname:
            fields = rest.split()
            return int(fields[0]) + int(fields[8])
    raise AssertionError(f"no {node.host.ifname} in /proc/net/dev of {node.name}")


def export(node: NodeHost, resource: str, *, persistent: bool = False) -> str:
    args = ["stream", "export", *(["--persistent"] if persistent else []), resource]
    ref = node.metac(*args).stdout.strip()
    assert ref.startswith(f"ref://{node.address}/stream/"), ref
    return ref


def assert_exchanges_match(mine: dict[str, Any], theirs: dict[str, Any], size: int) -> None:
    assert mine["received_bytes"] == theirs["received_bytes"] == size
    assert mine["sent"] == theirs["received"]
    assert theirs["sent"] == mine["received"]


# --------------------------------------------------------------------------- tests


def test_forward_20_parallel_connections_byte_exact(nodes_factory, programs) -> None:
    a, b = nodes_factory(2)
    backend = server(programs, a, "hash", "7000")
    ref = export(a, "tcp:127.0.0.1:7000")
    forward = b.popen("stream", "forward", ref, "127.0.0.1:7001")
    assert forward.stdout is not None
    assert forward.stdout.readline().startswith("forwarding 127.0.0.1:7001")
    sizes = [100 * MiB] * 2 + [8 * MiB] * 18
    proc = b.host.run([sys.executable, "-c", HASH_CLIENT, "7001", ",".join(map(str, sizes))],
                      env=python_env(), timeout=240)
    results = {r["seed"]: r for r in json.loads(proc.stdout)}
    served = {e["seed"]: e for e in backend.events("closed", len(sizes))}
    assert sorted(results) == sorted(served) == list(range(1, 21))
    for seed, size in enumerate(sizes, 1):
        assert_exchanges_match(results[seed], served[seed], size)
    forward.terminate()
    assert forward.wait(10) == 0


def test_cat_export_unix_and_cli_errors(nodes_factory, programs) -> None:
    a, b = nodes_factory(2)
    server(programs, a, "echo", "7000")
    sock_path = str(a.root / "echo.sock")
    server(programs, a, "echo", sock_path)
    for resource in ("tcp:127.0.0.1:7000", f"unix:{sock_path}"):
        ref = export(a, resource)
        out = b.metac("stream", "cat", ref, input="hello\nworld\n")  # EOF on stdin: half-close
        assert out.stdout == "HELLO\nWORLD\n"
    # A local endpoint directly (exported on the fly).
    assert a.metac("stream", "cat", "tcp:127.0.0.1:7000", input="x").stdout == "X"

    bogus = f"ref://{a.address}/stream/" + "A" * 32
    cases = {
        ("stream", "cat", bogus): 3,
        ("stream", "export", "tcp:127.0.0.1"): 2,
        ("stream", "export", "local:/etc"): 2,
        ("stream", "cat", "tcp:127.0.0.1:1"): 7,  # nothing listens there
    }
    for args, code in cases.items():
        proc = a.metac(*args, check=False)
        assert proc.returncode == code, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("metac: "), proc.stderr


def test_tcp_listen_accepts_only_its_peer_and_times_out(nodes_factory, programs) -> None:
    a, b = nodes_factory(2)
    # A short listen timeout for this node: restart it with the setting.
    a.stop()
    a.env["METAC_STREAM_LISTEN_TIMEOUT"] = "2"
    a.start()
    backend = server(programs, a, "echo", "7000")
    ref = export(a, "tcp:127.0.0.1:7000")
    # A second address on B, to connect from "another address".
    extra = b.address.rsplit(".", 1)[0] + ".200"
    b.host.run(["ip", "addr", "add", f"{extra}/24", "dev", b.host.ifname])
    pid = service_pid(a, "stream")

    seen = client(b, "rules", ref, extra)
    assert seen == {"other_port": ["", "reset"], "other_address": ["", "reset"],
                    "mine": ["PING", "eof"], "late": "refused"}
    # Service logs reach their file through the node (a pipe it copies): allow it a moment.
    stream_log = a.state_dir / "logs" / "node.service-stream.log"
    deadline = time.monotonic() + 10
    while "reset a connection from an unauthorized peer" not in stream_log.read_text() \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "reset a connection from an unauthorized peer" in stream_log.read_text()

    # Nobody connects: the listener and the backend connection are gone after the timeout.
    base = fd_count(pid)
    assert client(b, "timeout", ref, "3") == "refused"
    assert wait_fd_count(pid, base) <= base
    opened = backend.events("open", 2)  # rules + timeout each opened one backend connection
    closed = backend.events("closed", 2)
    assert {e["conn"] for e in opened} == {e["conn"] for e in closed}


def test_dropped_holder_closes_both_ends(nodes_factory, programs) -> None:
    a, b = nodes_factory(2)
    backend = server(programs, a, "echo", "7000")
    ref = export(a, "tcp:127.0.0.1:7000")
    pid = service_pid(a, "stream")
    base = fd_count(pid)

    # Released explicitly: our socket ends, and so does the backend's connection.
    result = client(b, "release", ref)
    assert result == {"first": "ABC", "after_release": ["", "eof"]}
    assert backend.events("closed", 1)[0]["conn"] == 1

    # Dropped because the client's connection ended (the client was killed).
    holder = Program(b, CLIENT, "hold", ref)
    programs.append(holder)
    assert holder.next() == "ABC"
    assert fd_count(pid) > base
    holder.proc.kill()
    assert backend.events("closed", 1, timeout=15)[0]["conn"] == 2
    assert wait_fd_count(pid, base) <= base


def test_1000_open_close_cycles_keep_fd_counts(nodes_factory, programs) -> None:
    a, b = nodes_factory(2)
    server(programs, a, "echo", "7000")
    ref = export(a, "tcp:127.0.0.1:7000")
    pids = {"stream": service_pid(a, "stream"), "persistence": service_pid(a, "persistence"),
            "node": a.proc.pid if a.proc else 0}
    client(b, "cycles", ref, "3")  # warm up (connections, imports)
    before = {name: fd_count(pid) for name, pid in pids.items()}
    result = client(b, "cycles", ref, "1000", timeout=300)
    assert result["after"] <= result["before"], result
    after = {name: wait_fd_count(pid, before[name]) for name, pid in pids.items()}
    assert after == before


def test_bind_through_third_node_goes_direct(nodes_factory, programs) -> None:
    a, b, c = nodes_factory(3, DEMO)
    size = 64 * MiB
    on_a = server(programs, a, "peer", "7000", "1", str(size))
    on_b = server(programs, b, "peer", "7000", "2", str(size))
    ref_a = export(a, "tcp:127.0.0.1:7000")
    ref_b = export(b, "tcp:127.0.0.1:7000")
    c_before, a_before = eth_bytes(c), eth_bytes(a)

    binder = Program(c, CLIENT, "bind_via_box", ref_a, ref_b, stdin=subprocess.PIPE)
    programs.append(binder)
    assert binder.next() == "bound"
    got_a = on_a.events("closed", 1, timeout=120)[0]
    got_b = on_b.events("closed", 1, timeout=120)[0]
    assert_exchanges_match(got_a, got_b, size)
    c_moved, a_moved = eth_bytes(c) - c_before, eth_bytes(a) - a_before
    assert a_moved > 2 * size  # both directions crossed A's wire...
    assert c_moved < 2 * MiB, f"{c_moved} bytes passed C"  # ...but not C's
    assert binder.proc.stdin is not None
    binder.proc.stdin.write("\n")
    binder.proc.stdin.flush()
    assert binder.next() == "released"

    # The same with the CLI: `metac stream bind` prints a ref to the bind; removing it unbinds.
    bind_ref = c.metac("stream", "bind", ref_a, ref_b).stdout.strip()
    assert bind_ref.startswith(f"ref://{a.address}/stream/")
    assert_exchanges_match(on_a.events("closed", 1)[0], on_b.events("closed", 1)[0], size)
    a.metac("ref", "rm", bind_ref)


def test_persistent_export_and_bind_survive_restart(nodes_factory, programs) -> None:
    a, b = nodes_factory(2)
    server(programs, a, "echo", "7000")
    size = 4 * MiB
    peer_a = server(programs, a, "peer", "7001", "1", str(size))
    peer_b = server(programs, b, "peer", "7001", "2", str(size))
    persistent = export(a, "tcp:127.0.0.1:7000", persistent=True)
    transient = export(a, "tcp:127.0.0.1:7000")
    assert b.metac("stream", "cat", persistent, input="p").stdout == "P"
    assert b.metac("stream", "cat", transient, input="t").stdout == "T"

    first = export(a, "tcp:127.0.0.1:7001", persistent=True)
    second = export(b, "tcp:127.0.0.1:7001", persistent=True)
    b.metac("stream", "bind", "--persistent", first, second)
    assert_exchanges_match(peer_a.events("closed", 1)[0], peer_b.events("closed", 1)[0], size)

    a.stop()
    a.start()
    # The persistent bind is made again when the stream service starts.
    again_a, again_b = peer_a.events("closed", 1)[0], peer_b.events("closed", 1)[0]
    assert (again_a["conn"], again_b["conn"]) == (2, 2)
    assert_exchanges_match(again_a, again_b, size)
    assert b.metac("stream", "cat", persistent, input="again").stdout == "AGAIN"
    gone = b.metac("stream", "cat", transient, input="t", check=False)
    assert gone.returncode == 3 and "NotFound" in gone.stderr
