"""`metac node run|status`."""

from __future__ import annotations

import argparse
import os
from typing import Any

from metac.api import connect_admin
from metac.cli.output import as_json, table


def register(sub: Any) -> None:
    p = sub.add_parser("node", help="run this machine's node or show its state")
    nsub = p.add_subparsers(dest="cmd", metavar="SUBCOMMAND", required=True)

    r = nsub.add_parser("run", help="run the node in the foreground (NodeAdmin + Node + services)")
    r.add_argument("--address", default=None,
                   help="IP address to serve Node on and to put in refs (default: first global address)")
    r.add_argument("--port", type=int, default=901, help="TCP port for Node (default 901)")
    r.add_argument("--state-dir", default=None, help="database and logs (default /var/lib/metac)")
    r.add_argument("--runtime-dir", dest="node_runtime_dir", default=None,
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


def run_node(args: argparse.Namespace) -> int:
    from metac import errors
    from metac.core import paths
    from metac.core.logfiles import log_limits
    from metac.core.process import run_daemon
    from metac.node.daemon import BUILTIN_SERVICES, NodeConfig, default_address, lock_dirs, run_node

    services = dict(BUILTIN_SERVICES)
    for spec in args.extra_service:
        name, eq, module = spec.partition("=")
        if not eq or not name or not module:
            raise errors.InvalidArgument(f"--extra-service wants NAME=MODULE, not {spec!r}")
        services[name] = module
    config = NodeConfig(
        address=args.address or default_address(),
        port=args.port,
        state_dir=paths.state_dir(args.state_dir),
        runtime_dir=args.node_runtime_dir or paths.runtime_dir(args.runtime_dir),
        services=services,
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


async def status(args: argparse.Namespace) -> int:
    async with connect_admin() as admin:
        node = admin.getUnprivilegedNode().node
        addr = (await node.address()).address
        services = (await admin.listServices()).services
        rows = [{"name": s.name, "state": s.state, "pid": s.pid, "restarts": s.restarts}
                for s in services]
    port = addr.port or 901
    if args.json:
        as_json({"address": addr.ip, "port": port, "services": rows})
        return 0
    shown = f"[{addr.ip}]:{port}" if ":" in addr.ip else f"{addr.ip}:{port}"
    print(f"node {shown}")
    table(rows, ["name", "state", "pid", "restarts"])
    return 0
