"""`metac net ls|export|bind|unbind`: network devices as capabilities (paper 8.2).

NET-URI is ``local:DEV`` (an existing device of this node), ``newlocal:DEV``
(a device to create here, a veth whose other end is hidden and bridged) or a
sturdy ref (``ref://…``).

``bind`` without ``--persistent`` stays in the foreground holding the bind and
undoes it on Ctrl-C/SIGTERM (or when ``metac net unbind`` releases it). With
``--persistent`` it prints the bind's sturdy ref and exits; the node keeps the
bind, re-establishes it after restarts, and ``metac net unbind`` ends it.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from typing import Any

from metac import api, errors
from metac.api import SturdyRef
from metac.cli.connect import Connection, add_group_flag, connection
from metac.cli.output import as_json, table
from metac.codec.locators import LocalDevice, Locator, NewLocal, RefLocator

NET_URI = ("localdev", "newlocal", "ref")
NET_URI_HELP = "local:DEV, newlocal:DEV or ref://[NODE]/SERVICE/SECRET"


def register(sub: Any) -> None:
    p = sub.add_parser("net", help="share Ethernet ports: export, bind, list, unbind")
    nsub = p.add_subparsers(dest="cmd", metavar="SUBCOMMAND", required=True)

    ls = nsub.add_parser("ls", help="interfaces of this node and its live binds")
    ls.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    ls.set_defaults(func=list_net)

    ex = nsub.add_parser("export", help="print a sturdy ref to a network device")
    ex.add_argument("uri", metavar="NET-URI", help=NET_URI_HELP)
    ex.add_argument("--persistent", action="store_true", help="the ref survives restarts")
    add_group_flag(ex)
    ex.set_defaults(func=export)

    b = nsub.add_parser("bind", help="join two network devices (VXLAN between nodes)")
    b.add_argument("first", metavar="NET-URI", help=NET_URI_HELP)
    b.add_argument("second", metavar="NET-URI", help=NET_URI_HELP)
    b.add_argument("--persistent", action="store_true",
                   help="keep the bind after this command exits and across restarts; "
                        "print its ref")
    b.set_defaults(func=bind)

    ub = nsub.add_parser("unbind", help="release a bind listed by `metac net ls`")
    ub.add_argument("target", help="its number in `metac net ls`, its device or bridge name, "
                                   "or the ref `bind --persistent` printed")
    ub.set_defaults(func=unbind)


async def _net_admin(conn: Connection) -> Any:
    return await conn.service_admin("net", api.schema.network.NetworkServiceAdmin)


def _parse(text: str) -> Locator:
    return Locator.parse(text, allowed=NET_URI)


def _shown(loc: Locator) -> str:
    return loc.ref.redacted() if isinstance(loc, RefLocator) else loc.format()


async def _open(conn: Connection, loc: Locator) -> tuple[Any, Any]:
    """(L2Interface capability, KernelInterface if we created it here)."""
    if isinstance(loc, RefLocator):
        return await conn.restore(loc.ref, api.schema.network.L2Interface), None
    net_admin = await _net_admin(conn)
    if isinstance(loc, LocalDevice):
        iface = net_admin.rootNamespace().ns.getInterface(loc.name).iface
        await iface.getName()  # fail now (NotFound) rather than inside bindTo
        return iface.cast_as(api.schema.network.L2Interface), None
    assert isinstance(loc, NewLocal)
    iface = (await net_admin.rootNamespace().ns.createInterface(loc.name)).iface
    return iface.cast_as(api.schema.network.L2Interface), iface


async def list_net(args: argparse.Namespace) -> int:
    import asyncio
    async with connection() as conn:
        net = await _net_admin(conn)
        ifaces = (await net.rootNamespace().ns.listInterfaces()).interfaces
        names = [r.name for r in await asyncio.gather(*(i.getName() for i in ifaces))]
        binds = (await net.listBinds()).binds
        rows = [{"#": i + 1, "kind": b.kind, "device": b.device, "ifname": b.ifname,
                 "peer": b.peer, "state": b.state, "persistent": bool(b.persistent)}
                for i, b in enumerate(binds)]
    if args.json:
        as_json({"interfaces": names, "binds": rows})
        return 0
    print("interfaces: " + " ".join(names))
    if rows:
        print()
        table(rows, ["#", "kind", "device", "ifname", "peer", "state", "persistent"])
    else:
        print("no binds")
    return 0


async def export(args: argparse.Namespace) -> int:
    loc = _parse(args.uri)
    async with connection() as conn:
        if isinstance(loc, RefLocator):
            obj = await conn.restore(loc.ref, None)
        else:
            ns = (await _net_admin(conn)).rootNamespace().ns
            if isinstance(loc, NewLocal):
                kiface = (await ns.createInterface(loc.name)).iface
            else:
                assert isinstance(loc, LocalDevice)
                kiface = ns.getInterface(loc.name).iface
            obj = (await kiface.l2Interface()).iface
        await conn.export(obj, args)
    return 0


def _format_ref(msg: Any) -> str:
    return api.ref_from_struct(msg).format()


async def bind(args: argparse.Namespace) -> int:
    first, second = _parse(args.first), _parse(args.second)
    if first == second:
        raise errors.InvalidArgument("cannot bind a device to itself")
    # The local device (if any) is `this`: its node orchestrates and keeps the bind.
    if isinstance(first, RefLocator) and not isinstance(second, RefLocator):
        first, second = second, first
    async with connection() as conn:
        this, created_this = await _open(conn, first)
        other, created_other = await _open(conn, second)
        created = [c for c in (created_this, created_other) if c is not None]
        try:
            holder = (await this.bindTo(other)).holder
        except BaseException:
            for iface in created:
                with contextlib.suppress(Exception):
                    await iface.destroy()
            raise
        what = f"{_shown(first)} <-> {_shown(second)}"
        if args.persistent:
            ref = (await holder.createSturdyRef(persistent=True)).id
            print(_format_ref(ref))
            print(f"bound {what} (persistent; `metac net unbind` ends it)", file=sys.stderr)
            return 0
        print(f"bound {what}; holding it until Ctrl-C or `metac net unbind`", flush=True)
        code = await _hold(holder)
        for iface in created:
            with contextlib.suppress(Exception):
                await iface.destroy()
        return code


async def _hold(holder: Any) -> int:
    """Wait for a signal (then release) or for the bind to end elsewhere."""
    import asyncio
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in sigs:
        loop.add_signal_handler(sig, stop.set)
    waiter = loop.create_task(_wait_holder(holder), name="wait for the bind")
    stopper = loop.create_task(stop.wait(), name="wait for a signal")
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)
        stopper.cancel()
    if stop.is_set():
        waiter.cancel()
        with contextlib.suppress(BaseException):
            await waiter
        await holder.release()
        print("unbound", flush=True)
        return 0
    await waiter  # raises if the bind's service went away
    print("the bind was released (by `metac net unbind`, or its peer is gone for good)",
          flush=True)
    return 0


async def _wait_holder(holder: Any) -> None:
    import asyncio
    try:
        async with api.rpc_errors():  # Unsupported is caught here
            await holder.cast_as(api.schema.network.WaitableHolder).wait()
    except errors.Unsupported:
        await asyncio.Event().wait()  # cannot watch it: only a signal ends the command


async def unbind(args: argparse.Namespace) -> int:
    target = args.target
    if target.startswith("ref:"):
        return await _unbind_ref(SturdyRef.parse(target))
    async with connection() as conn:
        binds = (await (await _net_admin(conn)).listBinds()).binds
        chosen = [b for i, b in enumerate(binds)
                  if target in (str(i + 1), b.device, b.ifname)]
        if not chosen:
            raise errors.NotFound(f"no bind {target!r} (see `metac net ls`)")
        for b in chosen:
            await b.holder.release()
            revoked = " and revoked its refs" if b.persistent else ""
            print(f"released {b.kind} {b.device} <-> {b.peer}{revoked}")
    return 0


async def _unbind_ref(ref: SturdyRef) -> int:
    async with connection() as conn:
        holder = await conn.restore(ref, api.schema.core.Holder)
        await holder.release()  # the bind's service also revokes its refs
    print("released the bind and revoked its refs")
    return 0
