"""The compute capabilities through the Python API, on real nodes (issue 6).

Each scenario runs as a small client program in a node's network namespace (it
opens the process's streams from there) and prints JSON; the test checks it,
and that nothing is left afterwards.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from test_compute_cli import service_log, snapshot, wait_clean

from metac.compute import rootfs
from metac.testing.nodes import NodeHost

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

PRELUDE = textwrap.dedent('''
    import asyncio, json, os, sys
    import capnp
    from metac import api
    from metac.core.streams import open_stream
    from metac.schema.load import compute

    ROOT = sys.argv[1]

    async def launcher_and_admin(stack):
        admin = await stack.enter_async_context(api.connect_admin())
        cadmin = await api.service_admin(admin, "compute", compute.ComputeServiceAdmin)
        fs_admin = await api.service_admin(admin, "fs", api.schema.fs.FilesystemServiceAdmin)
        root = (await fs_admin.rootNamespace().ns.filesystemPreservingOwners().fs
                .getSubtree(ROOT[1:])).fs  # the admin's own root: bind-mounted
        address = (await admin.getUnprivilegedNode().node.address()).address.ip
        return (await cadmin.getLauncher()).launcher, cadmin, root, address

    def describe(args, files=3, pty=False):
        pd = compute.ProcessDescription.new_message()
        pd.args = args
        fds = pd.init("files", files)
        for fd in fds:
            fd.isPty = pty
        return pd

    def environment(root, networks=()):
        ed = compute.ProcessEnvironmentDescription.new_message()
        fss = ed.init("filesystems", 1)
        fss[0].path = "/"
        fss[0].fs = root
        nets = ed.init("networks", len(networks))
        for item, (name, address) in zip(nets, networks):
            item.name = name
            item.addresses = [address]
        return ed

    async def read_all(process, index, address):
        stream = (await process.file(index)).stream
        opened = await open_stream(stream, local_address=address)
        loop = asyncio.get_running_loop()
        data = b""
        while chunk := await loop.sock_recv(opened.sock, 65536):
            data += chunk
        await opened.aclose()
        return data.decode()

    def main(body):
        async def run():
            import contextlib
            async with contextlib.AsyncExitStack() as stack:
                out = await body(*await launcher_and_admin(stack))
            print(json.dumps(out))
        asyncio.run(capnp.run(run()))
''')


def client(node: NodeHost, root: Path, body: str) -> dict:
    source = PRELUDE + textwrap.dedent(body) + "\nmain(body)\n"
    proc = node.host.run([sys.executable, "-c", source, str(root)], env=node.cli_env(),
                         check=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr + service_log(node)
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture
def busybox_root(tmp_path: Path) -> Path:
    path = tmp_path / "rootfs"
    rootfs.build_busybox(str(path))
    return path


def test_kill_wait_return_code(nodes_factory, busybox_root) -> None:
    (a,) = nodes_factory(1)
    before = snapshot(a)
    out = client(a, busybox_root, '''
        async def body(launcher, cadmin, root, address):
            res = await launcher.launch(processDescription=describe(["sleep", "100"], files=0),
                                        envDescription=environment(root))
            env, process = res.env, res.process
            out = {}
            try:
                await process.returnCode()
            except Exception as exc:
                out["early"] = str(exc)
            listed = (await cadmin.listProcesses()).processes
            out["listed"] = [(p.id, p.running, list(p.args)) for p in listed]
            await process.kill(15)
            await process.wait()
            out["code"] = (await process.returnCode()).code
            await process.kill(9)  # harmless once it ended
            second = (await env.launchProcess(describe(["sh", "-c", "exit 4"], files=0))).process
            await second.wait()
            out["second"] = (await second.returnCode()).code
            await env.destroy()
            try:
                await env.launchProcess(describe(["true"], files=0))
            except Exception as exc:
                out["after_destroy"] = str(exc)
            return out
    ''')
    assert "FailedPrecondition: the process is still running" in out["early"]
    assert [row[1:] for row in out["listed"]] == [[True, ["sleep", "100"]]]
    assert out["code"] == -15
    assert out["second"] == 4
    assert "FailedPrecondition: the environment is destroyed" in out["after_destroy"]
    wait_clean([a], before)


def test_second_process_sees_files_and_network(nodes_factory, busybox_root) -> None:
    (a,) = nodes_factory(1)
    before = snapshot(a)
    out = client(a, busybox_root, '''
        async def body(launcher, cadmin, root, address):
            script = "echo one > /tmp/mark; nc -l -p 7000 -e echo served & sleep 100"
            res = await launcher.launch(
                processDescription=describe(["sh", "-c", script], files=0),
                envDescription=environment(root, [("net0", "10.55.0.7/24")]))
            env, first = res.env, res.process
            await asyncio.sleep(0.5)
            probe = "cat /tmp/mark; ip -o -4 addr show dev net0 | grep -o '10.55.0.7/24'; " \\
                    "nc 127.0.0.1 7000 </dev/null; ps -o comm | grep -cx sleep"
            second = (await env.launchProcess(describe(["sh", "-c", probe]))).process
            text = await read_all(second, 1, address)
            await second.wait()
            net = (await env.network(0)).l2interface
            token = (await net.localToken()).token
            try:
                await env.network(1)
            except Exception as exc:
                missing = str(exc)
            await first.kill(9)
            await env.destroy()
            return {"out": text, "token": len(token), "missing": missing}
    ''')
    assert out["out"].split() == ["one", "10.55.0.7/24", "served", "1"]
    assert out["token"] > 0
    assert "NotFound: the environment has no network 1" in out["missing"]
    wait_clean([a], before)


def test_dropping_capabilities_tears_down(nodes_factory, busybox_root) -> None:
    """The client goes away without destroy(): its capabilities are dropped, all goes."""
    (a,) = nodes_factory(1)
    before = snapshot(a)
    out = client(a, busybox_root, '''
        async def body(launcher, cadmin, root, address):
            res = await launcher.launch(processDescription=describe(["sleep", "100"]),
                                        envDescription=environment(root, [("n0", "10.9.9.9/24")]))
            listed = (await cadmin.listProcesses()).processes
            return {"running": [p.running for p in listed]}
    ''')
    assert out["running"] == [True]
    wait_clean([a], before)
    assert json.loads(a.metac("ps", "--json", "-a").stdout) == []
