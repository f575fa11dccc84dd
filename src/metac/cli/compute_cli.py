"""`metac run`, `metac ps`, `metac kill`, `metac compute export|rootfs`: containers.

``metac run`` launches CMD in a new environment on this node or on the node of
``--on LAUNCHER-URI``, with filesystems (``--mount PATH=FS-URI``; ``/`` is the
root filesystem) and networks (``--network name=...``) that may live on any
node. stdin, stdout and stderr are connected to this terminal (one terminal
with ``--pty``), the exit code comes back (128+N when signal N ended the
process), and the environment is destroyed at the end. With ``--background``
it prints a ref to the process and returns at once; the environment then goes
away when its last process exits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import stat
import sys
import time
from typing import Any

from metac import api, errors
from metac.cli.connect import Connection, add_group_flag, connection
from metac.cli.output import as_json, local_path, mirror_url, suite_name, table
from metac.codec.locators import LocalPath, Locator, NewLocal, RefLocator
from metac.codec.runspecs import (
    MountOption,
    NetworkOption,
    RunSpecError,
    env_option,
    signal_number,
)

OUTPUT_GRACE = 5.0  # after the process ended, how long its output may take to arrive


def register(sub: Any) -> None:
    r = sub.add_parser(
        "run", help="run a command in a new container (on any node, with remote filesystems "
                    "and networks)",
        description="Run CMD in a new environment. Example: metac run --mount /=ref://... "
                    "-- sh -c 'echo hi'")
    r.add_argument("--on", metavar="LAUNCHER-URI",
                   help="ref of a ComputeLauncher (`metac compute export` on its node); "
                        "default: this node")
    r.add_argument("--mount", action="append", default=[], metavar="PATH=FS-URI",
                   help="mount a filesystem (local:/DIR or ref:...) at PATH; / is the root "
                        "filesystem (required)")
    r.add_argument("--network", action="append", default=[], metavar="SPEC",
                   help="name=IFNAME[,uri=NET-URI][,address=ADDR/PREFIX]..."
                        "[,route=NET/PREFIX[,via=GW]]...; no uri: a new network")
    r.add_argument("--pty", action="store_true", help="give the process a terminal")
    r.add_argument("-m", "--memory", type=int, default=0, metavar="MiB",
                   help="memory limit of the environment")
    r.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable (repeatable)")
    r.add_argument("-w", "--cwd", default="", help="working directory (default /)")
    r.add_argument("--uid", type=int, default=0, help="user id in the environment (default 0)")
    r.add_argument("--gid", type=int, default=None, help="group id (default: the uid)")
    r.add_argument("--background", "-d", action="store_true",
                   help="print a ref to the process and return (stdio is /dev/null)")
    r.add_argument("--persistent", action="store_true",
                   help="with --background: the ref survives node restarts")
    r.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                   help="the command and its arguments")
    r.set_defaults(func=run)

    ps = sub.add_parser(
        "ps", help="processes launched on this node",
        description="Processes launched on this node. With -a also those that ended: an "
                    "ended background process (metac run --background) stays listed with its "
                    "exit code until `metac rm ID`, for 24 hours, or until the compute "
                    "service restarts.")
    ps.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    ps.add_argument("-a", "--all", action="store_true",
                    help="also processes that ended, with their exit codes")
    ps.set_defaults(func=list_processes)

    rm = sub.add_parser("rm", help="forget ended background processes (listed by `ps -a`)")
    rm.add_argument("targets", nargs="+", metavar="ID",
                    help="ENV.N (one process) or ENV (every process of that environment)")
    rm.set_defaults(func=remove_processes)

    k = sub.add_parser("kill", help="send a signal to processes (by id, env id or ref)")
    k.add_argument("-s", "--signal", default="TERM", help="signal name or number (default TERM)")
    k.add_argument("targets", nargs="+", metavar="ID|REF",
                   help="ENV.N (one process), ENV (all its processes) or a process ref")
    k.set_defaults(func=kill)

    c = sub.add_parser("compute", help="this node's compute service")
    csub = c.add_subparsers(dest="cmd", metavar="SUBCOMMAND", required=True)
    ex = csub.add_parser("export", help="print a ref to this node's ComputeLauncher")
    ex.add_argument("--persistent", action="store_true", help="the ref survives node restarts")
    add_group_flag(ex)
    ex.set_defaults(func=export)
    rf = csub.add_parser("rootfs", help="build a root filesystem in a directory")
    rf.add_argument("directory", type=local_path, help="where to build it (created if missing)")
    rf.add_argument("--debootstrap", metavar="SUITE", type=suite_name,
                    help="a minimal Debian (needs network access) instead of busybox")
    rf.add_argument("--mirror", default=None, type=mirror_url,
                    help="Debian mirror for --debootstrap")
    rf.set_defaults(func=build_rootfs)


# ---------------------------------------------------------------- resolving URIs


async def compute_admin(conn: Connection) -> Any:
    return await conn.service_admin("compute", api.schema.compute.ComputeServiceAdmin)


async def resolve_launcher(conn: Connection, text: str | None) -> tuple[Any, str]:
    """The launcher (``--on`` ref, else this node's) and the address to open its streams
    from."""
    if text:
        loc = Locator.parse(text, allowed=("ref",))
        assert isinstance(loc, RefLocator)
        cap = await conn.restore(loc.ref, api.schema.compute.ComputeLauncher)
        return cap, conn.address_toward(loc.ref)
    launcher = (await (await compute_admin(conn)).getLauncher()).launcher
    return launcher, await conn.node_address()


async def resolve_filesystem(conn: Connection, loc: Locator) -> Any:
    if isinstance(loc, RefLocator):
        return await conn.restore(loc.ref, api.schema.fs.Filesystem)
    assert isinstance(loc, LocalPath)
    fs_admin = await conn.service_admin("fs", api.schema.fs.FilesystemServiceAdmin)
    # The admin's own directory: bind-mounted as it is (root in the container is
    # root on it anyway), not squashed like an exported one.
    root = fs_admin.rootNamespace().ns.filesystemPreservingOwners()
    if not loc.parts:
        return (await root).fs
    return (await root.fs.getSubtree("/".join(loc.parts))).fs


async def resolve_network(conn: Connection, loc: Locator) -> Any:
    if isinstance(loc, RefLocator):
        return await conn.restore(loc.ref, api.schema.network.L2Interface)
    net_admin = await conn.service_admin("net", api.schema.network.NetworkServiceAdmin)
    ns = net_admin.rootNamespace().ns
    if isinstance(loc, NewLocal):
        iface = (await ns.createInterface(loc.name)).iface
    else:
        iface = (await ns.getInterface(loc.name)).iface  # type: ignore[attr-defined]
    return (await iface.l2Interface()).iface


# ---------------------------------------------------------------- metac run


def _parse_run(args: argparse.Namespace) -> tuple[list[str], list[MountOption],
                                                  list[NetworkOption], list[str]]:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise errors.InvalidArgument("no command given: metac run [OPTIONS] -- CMD [ARGS...]")
    if args.persistent and not args.background:
        raise errors.InvalidArgument("--persistent needs --background")
    try:
        mounts = [MountOption.parse(m) for m in args.mount]
        networks = [NetworkOption.parse(n) for n in args.network]
        env = [env_option(e) for e in args.env]
    except RunSpecError as exc:
        raise errors.InvalidArgument(str(exc)) from None
    if not any(m.path == "/" for m in mounts):
        raise errors.InvalidArgument("a root filesystem is needed: --mount /=FS-URI "
                                     "(see `metac compute rootfs`)")
    if args.memory < 0 or args.uid < 0 or (args.gid or 0) < 0:
        raise errors.InvalidArgument("memory, uid and gid must not be negative")
    return command, mounts, networks, env


def _terminal_size() -> tuple[int, int]:
    for fd in (1, 0, 2):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
    return 0, 0


async def _build_request(args: argparse.Namespace, conn: Connection, command: list[str],
                         mounts: list[MountOption], networks: list[NetworkOption],
                         env: list[str]) -> tuple[Any, Any]:
    pd = api.schema.compute.ProcessDescription.new_message()
    pd.args = command
    pd.env = env
    pd.cwd = args.cwd
    pd.uid = args.uid
    pd.gid = args.uid if args.gid is None else args.gid
    if args.background:
        pd.init("files", 0)
    elif args.pty:
        files = pd.init("files", 1)
        files[0].isPty = True
        files[0].rows, files[0].cols = _terminal_size()
    else:
        pd.init("files", 3)
    ed = api.schema.compute.ProcessEnvironmentDescription.new_message()
    fs_caps = [await resolve_filesystem(conn, m.source) for m in mounts]
    fss = ed.init("filesystems", len(mounts))
    for item, m, cap in zip(fss, mounts, fs_caps, strict=True):
        item.path = m.path
        item.fs = cap
    net_caps = [await resolve_network(conn, n.uri) if n.uri is not None else None
                for n in networks]
    nets = ed.init("networks", len(networks))
    for item, n, cap in zip(nets, networks, net_caps, strict=True):
        item.name = n.name
        if cap is not None:
            item.l2interface = cap
        item.addresses = list(n.addresses)
        routes = item.init("routes", len(n.routes))
        for r_msg, r in zip(routes, n.routes, strict=True):
            r_msg.network = r.network
            r_msg.via = r.via
    ed.memory = args.memory
    ed.autoDestroy = bool(args.background)
    return pd, ed


async def run(args: argparse.Namespace) -> int:
    import asyncio
    command, mounts, networks, env = _parse_run(args)
    async with connection() as conn:
        launcher, address = await resolve_launcher(conn, args.on)
        pd, ed = await _build_request(args, conn, command, mounts, networks, env)
        res = await launcher.launch(processDescription=pd, envDescription=ed)
        environment, process = res.env, res.process
        if args.background:
            ref = (await process.createSturdyRef(persistent=args.persistent)).id
            print(api.ref_from_struct(ref).format())
            return 0
        try:
            code = await _attach(process, address, pty=args.pty)
        except asyncio.CancelledError:
            code = -signal.SIGINT  # interrupted twice: give up waiting
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(environment.destroy(), 30)
    return code if code >= 0 else 128 - code


class _Terminal:
    """This process's stdio for pumps, without changing fds other processes share."""

    def __init__(self) -> None:
        self._restore: list[Any] = []

    def own(self, fd: int, *, write: bool) -> int:
        """A non-blocking fd for ``fd``: a new open of a terminal or pipe (so the shared
        one keeps its mode), else a duplicate whose blocking mode is restored later.
        Closed by ``restore``."""
        mode = os.fstat(fd).st_mode
        new = -1
        if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
            with contextlib.suppress(OSError):
                new = os.open(f"/proc/self/fd/{fd}",
                              (os.O_WRONLY if write else os.O_RDONLY) | os.O_CLOEXEC)
        if new < 0:
            new = os.dup(fd)
            blocking = os.get_blocking(fd)
            self._restore.append(lambda: os.set_blocking(fd, blocking))
        self._restore.append(lambda: os.close(new))
        os.set_blocking(new, False)
        return new

    def raw(self) -> None:
        if os.isatty(0):
            import termios  # here: only a terminal session needs them
            import tty

            saved = termios.tcgetattr(0)
            tty.setraw(0)
            self._restore.append(lambda: termios.tcsetattr(0, termios.TCSADRAIN, saved))

    def restore(self) -> None:
        for undo in reversed(self._restore):
            with contextlib.suppress(OSError):
                undo()
        self._restore = []


def _one_way(src: int, dst: int, name: str, on_eof: Any = None) -> api.Pump:
    """A pump copying ``src`` to ``dst`` until EOF, then ``on_eof()``; closes neither."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(w)  # r reads EOF at once: the other direction ends immediately
    sink = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    reader = api.Endpoint(src, sink, shutdown_write=lambda: None, close=lambda: os.close(sink),
                      name=f"{name} source")
    writer = api.Endpoint(r, dst, shutdown_write=on_eof or (lambda: None),
                      close=lambda: os.close(r), name=f"{name} sink")
    return api.Pump(reader, writer, name)


def _half_close(opened: api.OpenedStream) -> Any:
    return lambda: opened.sock.shutdown(socket.SHUT_WR)


async def _attach(process: Any, address: str, *, pty: bool) -> int:
    """Connect the terminal to the process, wait for it; its return code."""
    import asyncio
    term = _Terminal()
    opened: list[api.OpenedStream] = []
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    main = asyncio.current_task()
    interrupted = 0
    forwarding: set[asyncio.Task[None]] = set()

    def on_signal(sig: int) -> None:
        nonlocal interrupted
        interrupted += 1
        if interrupted > 1 and main is not None:
            main.cancel()
            return
        again = "Ctrl-C again" if sig == signal.SIGINT else "a second signal"
        print(f"metac: sent {signal.Signals(sig).name} to the process; {again} destroys "
              "the environment", file=sys.stderr, flush=True)
        task = loop.create_task(_forward_signal(process, sig), name=f"forward signal {sig}")
        forwarding.add(task)
        task.add_done_callback(forwarding.discard)

    def start(pump: api.Pump) -> asyncio.Task[None]:
        task = loop.create_task(pump.run(), name=pump.name)
        tasks.append(task)
        return task

    try:
        # All at once, each on the pipelined answer of process.file(i): no round trip
        # waits for another.
        results = await asyncio.gather(
            *(api.open_stream(process.file(i).stream, local_address=address)
              for i in range(1 if pty else 3)), return_exceptions=True)
        opened.extend(r for r in results if not isinstance(r, BaseException))
        for result in results:
            if isinstance(result, BaseException):
                raise result
        socks = [o.sock.fileno() for o in opened]
        if pty:
            term.raw()
            start(_one_way(term.own(0, write=False), socks[0], "keyboard", _half_close(opened[0])))
            outputs = [start(_one_way(socks[0], term.own(1, write=True), "screen"))]
        else:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, on_signal, sig)
            start(_one_way(term.own(0, write=False), socks[0], "stdin", _half_close(opened[0])))
            outputs = [start(_one_way(socks[i], term.own(i, write=True), f"fd {i}"))
                       for i in (1, 2)]
        await process.wait()
        await asyncio.wait(outputs, timeout=OUTPUT_GRACE)
        return int((await process.returnCode()).code)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        term.restore()
        for o in opened:
            await o.aclose(timeout=1.0)


async def _forward_signal(process: Any, sig: int) -> None:
    with contextlib.suppress(Exception):
        await process.kill(int(sig))


# ---------------------------------------------------------------- ps, kill, export


def _ended_status(code: int) -> str:
    """``exited N``, or ``killed by SIGNAME`` for a process a signal ended (code -N)."""
    if code >= 0:
        return f"exited {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _row(p: Any) -> dict[str, Any]:
    return {
        "id": p.id,
        "pid": p.pid,
        "status": "running" if p.running else _ended_status(p.returnCode),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.started)),
        "command": " ".join(p.args),
    }


async def list_processes(args: argparse.Namespace) -> int:
    async with connection() as conn:
        procs = (await (await compute_admin(conn)).listProcesses()).processes
        rows = [_row(p) for p in procs if p.running or args.all]
    if args.json:
        as_json(rows)
    else:
        table(rows, ["id", "pid", "status", "started", "command"])
    return 0


async def remove_processes(args: argparse.Namespace) -> int:
    async with connection() as conn:
        compute = await compute_admin(conn)
        for target in args.targets:
            removed = (await compute.removeProcesses(target)).removed
            for process_id in removed:
                print(process_id)
    return 0


def _ended_error(target: str, ended: list[Any]) -> errors.MetacError:
    how = ", ".join(_ended_status(p.returnCode) for p in ended)
    what = f"process {target} has" if len(ended) == 1 else f"the processes of {target} have"
    return errors.FailedPrecondition(
        f"{what} already ended ({how}); `metac rm {target}` forgets it")


async def kill(args: argparse.Namespace) -> int:
    try:
        sig = signal_number(args.signal)
    except RunSpecError as exc:
        raise errors.InvalidArgument(str(exc)) from None
    async with connection() as conn:
        listed: list[Any] | None = None
        for target in args.targets:
            if target.startswith("ref:"):
                loc = Locator.parse(target, allowed=("ref",))
                assert isinstance(loc, RefLocator)
                process = await conn.restore(loc.ref, api.schema.compute.Process)
                ended_code: int | None = None
                try:
                    async with api.rpc_errors():  # caught here
                        ended_code = int((await process.returnCode()).code)
                except errors.FailedPrecondition:
                    pass  # it still runs
                if ended_code is not None:
                    raise errors.FailedPrecondition(
                        f"the process has already ended ({_ended_status(ended_code)})")
                await process.kill(int(sig))
                continue
            if listed is None:
                listed = list((await (await compute_admin(conn)).listProcesses()).processes)
            named = [p for p in listed if p.id == target or p.id.split(".")[0] == target]
            matches = [p for p in named if p.running]
            if not matches and named:
                raise _ended_error(target, named)
            if not matches:
                raise errors.NotFound(f"no process {target} on this node (`metac ps -a` "
                                      "lists them)")
            for p in matches:
                await p.process.kill(int(sig))
    return 0


async def export(args: argparse.Namespace) -> int:
    async with connection() as conn:
        launcher = (await (await compute_admin(conn)).getLauncher()).launcher
        await conn.export(launcher, args)
    return 0


def build_rootfs(args: argparse.Namespace) -> int:
    from metac.compute import rootfs

    target = os.path.abspath(args.directory)
    if args.debootstrap:
        rootfs.build_debootstrap(target, args.debootstrap, args.mirror)
    else:
        links = rootfs.build_busybox(target)
        print(f"busybox root filesystem in {target} ({len(links)} commands)", file=sys.stderr)
    print(target)
    print(f"next: metac fs export local:{target}  # then --mount /=<that ref>",
          file=sys.stderr)
    return 0
