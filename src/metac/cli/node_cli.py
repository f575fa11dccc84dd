"""`metac node run|status`."""

from __future__ import annotations

import argparse
from typing import Any

from metac.api import connect_admin
from metac.cli.output import as_json, local_path, table


def register(sub: Any) -> None:
    p = sub.add_parser("node", help="run this machine's node or show its state")
    nsub = p.add_subparsers(dest="cmd", metavar="SUBCOMMAND", required=True)

    r = nsub.add_parser(
        "run", help="run the node in the foreground (NodeAdmin + Node + services)",
        description="Run the node in the foreground: NodeAdmin on the admin socket, Node on "
                    "--address:--port, and every service as a supervised process. The ready "
                    "line on stderr names the address and why it was picked.")
    r.add_argument("--address", default=None,
                   help="IP address to serve Node on and to put in refs (default: the address "
                        "of the interface the default route leaves through, IPv4 when there is "
                        "an IPv4 default route; without a default route the first "
                        "non-loopback address; else ::1 with a warning, as no other machine "
                        "could reach the node)")
    r.add_argument("--port", type=int, default=901, help="TCP port for Node (default 901)")
    r.add_argument("--state-dir", default=None, type=local_path, help="database and logs (default /var/lib/metac)")
    r.add_argument("--runtime-dir", dest="node_runtime_dir", default=None, type=local_path,
                   help="admin socket and mounts (default /run/metac)")
    r.add_argument("--extra-service", action="append", default=[], metavar="NAME=MODULE",
                   help="also run python module MODULE as service NAME (repeatable)")
    r.set_defaults(func=run_node)

    s = nsub.add_parser("status", help="address and services of the local node")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=status)


def run_node(args: argparse.Namespace) -> int:
    from metac import errors
    from metac.core import paths
    from metac.core.process import run_daemon
    from metac.node.address import default_address
    from metac.node.daemon import BUILTIN_SERVICES, NodeConfig, run_node

    services = dict(BUILTIN_SERVICES)
    for spec in args.extra_service:
        name, eq, module = spec.partition("=")
        if not eq or not name or not module:
            raise errors.InvalidArgument(f"--extra-service wants NAME=MODULE, not {spec!r}")
        services[name] = module
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
        state_dir=paths.state_dir(args.state_dir),
        runtime_dir=args.node_runtime_dir or paths.runtime_dir(args.runtime_dir),
        services=services,
    )
    return run_daemon("metac-node", lambda: run_node(config))


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
