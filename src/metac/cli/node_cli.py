"""`metac node run|status`."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import time
from typing import Any

from metac import api, errors
from metac.cli.output import as_json, local_path, table
from metac.codec.refs import DEFAULT_PORT, node_port, show_endpoint


def register(sub: Any) -> None:
    p = sub.add_parser("node", help="run this machine's node or show its state")
    nsub = p.add_subparsers(dest="cmd", metavar="SUBCOMMAND", required=True)

    r = nsub.add_parser(
        "run", help="run the node in the foreground (NodeAdmin + Node + services)",
        description="Run the node in the foreground: NodeAdmin on the admin socket, Node on "
                    "--address:--port, and every service as a supervised process. The ready "
                    "line on stderr names the address and why it was picked. It runs as "
                    "root; not as root it needs --port 1024 or above and a --state-dir and "
                    "--runtime-dir it can write, and runs only the persistence and stream "
                    "services (`metac node status` says why the others do not run).")
    r.add_argument("--address", default=None,
                   help="IP address to serve Node on and to put in refs (default: the address "
                        "of the interface the default route leaves through, IPv4 when there is "
                        "an IPv4 default route; without a default route the first "
                        "non-loopback address; else ::1 with a warning, as no other machine "
                        "could reach the node)")
    r.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"TCP port for Node (default {DEFAULT_PORT})")
    r.add_argument("--state-dir", default=None, type=local_path, help="database and logs (default /var/lib/metac)")
    r.add_argument("--runtime-dir", dest="node_runtime_dir", default=None, type=local_path,
                   help="admin socket and mounts (default /run/metac)")
    r.add_argument("--extra-service", action="append", default=[], metavar="NAME=MODULE",
                   help="also run python module MODULE as service NAME (repeatable)")
    r.add_argument("--log-size", default=None, metavar="SIZE",
                   help="cap of each service log file, e.g. 8M (default $METAC_LOG_SIZE or 8M)")
    r.add_argument("--log-files", type=int, default=None, metavar="N",
                   help="files kept per service log, the current one included "
                        "(default $METAC_LOG_FILES or 4)")
    r.set_defaults(func=run_node)

    rs = nsub.add_parser("restore-store",
                         help="replace a damaged refs database by the backup taken at the "
                              "node's last start (the node must be stopped)")
    rs.add_argument("--state-dir", default=None, help="the node's state dir (default /var/lib/metac)")
    rs.set_defaults(func=restore_store)

    s = nsub.add_parser("status", help="address and services of the local node")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=status)

    lg = nsub.add_parser(
        "logs", help="show the services' logs (<state-dir>/logs)",
        description="Show the logs the node's services (and the programs they run, such as "
                    "diod or nbdkit) write to <state-dir>/logs, oldest first: a rotated log "
                    "(service.log.2, service.log.1) before the current one. The node's own "
                    "log is its standard error (the journal under systemd).")
    lg.add_argument("service", nargs="?", default=None,
                    help="only this service's log and the logs of the programs it runs "
                         "(default: every log)")
    lg.add_argument("-f", "--follow", action="store_true",
                    help="keep printing what is appended, across rotations, until Ctrl-C")
    lg.add_argument("-n", "--lines", type=int, default=None, metavar="N",
                    help="only the last N lines of each log (default: all of it)")
    lg.add_argument("--state-dir", default=None, type=local_path,
                    help="the node's state dir (default: the one of the node of --runtime-dir, "
                         "else $METAC_STATE_DIR or /var/lib/metac)")
    lg.set_defaults(func=logs)


def run_node(args: argparse.Namespace) -> int:
    from metac.core import paths
    from metac.core.logfiles import log_limits
    from metac.core.process import run_daemon
    from metac.node.address import default_address
    from metac.node.daemon import BUILTIN_SERVICES, NEEDS_ROOT, NodeConfig, lock_dirs, run_node

    services = dict(BUILTIN_SERVICES)
    for spec in args.extra_service:
        name, eq, module = spec.partition("=")
        if not eq or not name or not module:
            raise errors.InvalidArgument(f"--extra-service wants NAME=MODULE, not {spec!r}")
        services[name] = module
    state_dir = paths.state_dir(args.state_dir)
    runtime_dir = args.node_runtime_dir or paths.runtime_dir(args.runtime_dir)
    unavailable: dict[str, str] = {}
    if os.geteuid() != 0:
        check_without_root(args.port, {"state dir": state_dir, "runtime dir": runtime_dir})
        for name, what in NEEDS_ROOT.items():
            if services.get(name) == BUILTIN_SERVICES[name]:
                del services[name]
                unavailable[name] = f"needs root for {what}"
    reason, warning = "given with --address", None
    if args.address:
        address = args.address
    else:
        choice = default_address()
        address, reason = choice.address, f"chosen because {choice.reason}"
        if choice.loopback:
            warning = (f"serving on {address} ({choice.reason}): no other machine can reach "
                       "this node or use its refs; give --address")
    config = NodeConfig(
        address=address,
        address_reason=reason,
        address_warning=warning,
        port=args.port,
        state_dir=state_dir,
        runtime_dir=runtime_dir,
        services=services,
        unavailable=unavailable,
    )
    # Services inherit the environment: one setting for every supervisor's logs.
    if args.log_size is not None:
        os.environ["METAC_LOG_SIZE"] = args.log_size
    if args.log_files is not None:
        os.environ["METAC_LOG_FILES"] = str(args.log_files)
    log_limits()  # a bad value is an error now, not in every service
    # Before anything else: a second node here would break the running one.
    locks = lock_dirs(config)
    try:
        return run_daemon("metac-node", lambda: run_node(config))
    finally:
        for fd in locks:
            os.close(fd)


def restore_store(args: argparse.Namespace) -> int:
    from metac import errors
    from metac.core import paths
    from metac.persistence.store import restore_backup

    state_dir = paths.state_dir(args.state_dir)
    if not os.path.isdir(state_dir):
        raise errors.NotFound(f"no state dir {state_dir}")
    try:
        locks = paths.lock_node_dirs(state_dir)
    except errors.FailedPrecondition as exc:
        raise errors.FailedPrecondition(f"{exc}; stop it first") from None
    try:
        print(restore_backup(state_dir))
    finally:
        for fd in locks:
            os.close(fd)
    return 0


#: CAP_NET_BIND_SERVICE: binding ports below 1024.
_CAP_NET_BIND_SERVICE = 10


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_without_root(port: int, dirs: dict[str, str]) -> None:
    """What a node not running as root cannot do, in one PermissionDenied line: a port
    below 1024, a state or runtime dir it cannot create or write."""
    problems: list[str] = []
    if port < 1024 and not _effective_caps() >> _CAP_NET_BIND_SERVICE & 1:
        problems.append(f"port {port} needs root (ports below 1024; give --port 1024 or above)")
    for what, path in dirs.items():
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            writable = os.access(path, os.W_OK | os.X_OK)
        except PermissionError:
            writable = False
        if not writable:
            flag = what.split()[0]
            problems.append(f"the {what} {path} is not writable (give --{flag}-dir DIR)")
    if problems:
        raise errors.PermissionDenied(
            f"metac node run as uid {os.geteuid()}, not root: " + "; ".join(problems)
            + "; or run it as root")


async def status(args: argparse.Namespace) -> int:
    async with api.connect_admin() as admin:
        node = admin.getUnprivilegedNode().node
        addr = (await node.address()).address
        services = (await admin.listServices()).services
        rows = [{"name": s.name, "state": s.state, "pid": s.pid, "restarts": s.restarts}
                for s in services]
        accel = await _vm_accelerator(admin, rows)
    port = node_port(addr.port)
    if args.json:
        as_json({"address": addr.ip, "port": port, "services": rows, "vmAccelerator": accel})
        return 0
    print(f"node {show_endpoint(addr.ip, port)}")
    table(rows, ["name", "state", "pid", "restarts"])
    if accel:
        print(f"VMs run with {accel}")
    return 0


async def _vm_accelerator(admin: Any, rows: list[dict[str, Any]]) -> str:
    """``kvm``/``tcg`` and why, from the vm service if it runs ("" otherwise)."""
    import asyncio
    if not any(r["name"] == "vm" and r["state"] == "registered" for r in rows):
        return ""
    from metac.api import schema, service_admin

    try:
        vm = await service_admin(admin, "vm", schema.vm.VMServiceAdmin)
        res = await asyncio.wait_for(vm.accelerator(), 20)
    except Exception:  # status shows what it can; the vm service's own errors are its log's
        return ""
    return f"{res.name} ({res.detail})"


# --------------------------------------------------------------------------- node logs

#: ``node.service-fs.log``, ``fs.diod-3.log.1``: the log a name belongs to, and its rotation.
_LOG_RE = re.compile(r"(?P<base>.+\.log)(?:\.(?P<rotation>\d+))?")
FOLLOW_INTERVAL = 0.5


def log_dir(state_dir: str | None) -> str:
    from metac.core import paths

    if state_dir:
        return os.path.join(state_dir, "logs")
    link = os.path.join(paths.runtime_dir(), "logs")  # the running node's (node/daemon.py)
    if os.path.isdir(link):
        return os.path.realpath(link)
    return os.path.join(paths.state_dir(), "logs")


def log_groups(names: list[str], service: str | None) -> dict[str, list[str]]:
    """Log base name -> its files, oldest first (``x.log.2``, ``x.log.1``, ``x.log``); the
    services' own logs first. ``service`` keeps its log and its programs' logs."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        m = _LOG_RE.fullmatch(name)
        if m is None:
            continue
        base = m["base"]
        if service is not None and base != f"node.service-{service}.log" \
                and not base.startswith(f"{service}."):
            continue
        groups.setdefault(base, []).append((int(m["rotation"] or 0), name))
    order = sorted(groups, key=lambda b: (not b.startswith("node.service-"), b))
    return {b: [n for _, n in sorted(groups[b], reverse=True)] for b in order}


def _services_with_logs(names: list[str]) -> list[str]:
    found = {m["base"][len("node.service-"):-len(".log")] for n in names
             if (m := _LOG_RE.fullmatch(n)) and m["base"].startswith("node.service-")}
    return sorted(found)


def logs(args: argparse.Namespace) -> int:
    directory = log_dir(args.state_dir)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        raise errors.NotFound(f"no log directory {directory} (give the node's --state-dir)") \
            from None
    groups = log_groups(names, args.service)
    if args.service is not None and not groups:
        known = ", ".join(_services_with_logs(names)) or "none"
        raise errors.NotFound(f"no log of service {args.service!r} in {directory} "
                              f"(services with logs: {known})")
    if args.lines is not None and args.lines < 0:
        raise errors.InvalidArgument("--lines wants a number >= 0")
    out = sys.stdout.buffer
    headers = len(groups) > 1
    for base, files in groups.items():
        data = b"".join(_read(os.path.join(directory, f)) for f in files)
        if args.lines is not None:
            data = b"".join(data.splitlines(keepends=True)[-args.lines:]) if args.lines else b""
        if headers:
            out.write(f"==> {os.path.join(directory, base)} <==\n".encode())
        out.write(data)
    out.flush()
    if args.follow:
        _follow(directory, args.service, out, last=next(reversed(groups), None))
    return 0


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:  # rotated away meanwhile
        return b""


def _follow(directory: str, service: str | None, out: Any, last: str | None) -> None:
    """Print what is appended to each current log until Ctrl-C or SIGTERM (the normal end)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    seen: dict[str, tuple[int, int]] = {}  # base -> (inode, offset)
    for base in log_groups(os.listdir(directory), service):
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(os.path.join(directory, base))
            seen[base] = (st.st_ino, st.st_size)
    try:
        while True:
            time.sleep(FOLLOW_INTERVAL)
            for base in log_groups(os.listdir(directory), service):
                path = os.path.join(directory, base)
                with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    inode, offset = seen.get(base, (st.st_ino, 0))
                    if inode != st.st_ino or st.st_size < offset:  # rotated: a new file
                        offset = 0
                    f.seek(offset)
                    data = f.read()
                    seen[base] = (st.st_ino, offset + len(data))
                    if data:
                        if last != base:
                            out.write(f"==> {path} <==\n".encode())
                            last = base
                        out.write(data)
                        out.flush()
    except KeyboardInterrupt:
        return
