"""`metac stream export|cat|forward|bind`: byte streams as capabilities (like nc, ssh -L, socat).

STREAM arguments are ``ref://…`` sturdy refs, or ``tcp:HOST:PORT`` / ``unix:PATH``
endpoints of the local node (exported on the fly; needs root).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
from typing import Any

from metac import api, errors
from metac.cli.connect import Connection, add_group_flag, connection
from metac.cli.output import error
from metac.codec.locators import Locator, RefLocator, TcpEndpoint
from metac.codec.refs import show_endpoint

STREAM_KINDS = ("ref", "tcp", "unix")


def register(sub: Any) -> None:
    p = sub.add_parser("stream", help="share TCP/unix endpoints; cat, forward and bind streams")
    ssub = p.add_subparsers(dest="cmd", metavar="SUBCOMMAND", required=True)

    ex = ssub.add_parser("export", help="print a sturdy ref to a TCP or unix endpoint of this node")
    ex.add_argument("--persistent", action="store_true", help="the ref survives node restarts")
    add_group_flag(ex)
    ex.add_argument("resource", help="tcp:HOST:PORT, unix:PATH, or a ref to re-export")
    ex.set_defaults(func=export)

    cat = ssub.add_parser("cat", help="connect stdin/stdout to a stream (like nc)")
    cat.add_argument("stream", help="ref://… (or tcp:/unix: of this node)")
    cat.set_defaults(func=cat_stream)

    fw = ssub.add_parser("forward", help="listen locally; each connection opens a new stream")
    fw.add_argument("stream", help="ref://… (or tcp:/unix: of this node)")
    fw.add_argument("listen", help="[HOST:]PORT to listen on (HOST defaults to 127.0.0.1; "
                                   "PORT 0 picks one and prints it)")
    fw.set_defaults(func=forward)

    bd = ssub.add_parser("bind", help="pipe two streams into each other; prints a ref to the bind "
                                      "(revoke it with `metac ref rm` to unbind)")
    bd.add_argument("--persistent", action="store_true",
                    help="re-establish the bind when the node restarts")
    bd.add_argument("first", help="a stream: ref://… (or tcp:/unix: of this node)")
    bd.add_argument("second", help="the stream to join it with (same forms)")
    bd.set_defaults(func=bind)


async def resolve(conn: Connection, text: str) -> tuple[Any, str]:
    """STREAM text as a Stream capability, and the address to open it from."""
    loc = Locator.parse(text, allowed=STREAM_KINDS)
    if isinstance(loc, RefLocator):
        return await conn.restore(loc.ref, api.schema.stream.Stream), conn.address_toward(loc.ref)
    stream_admin = await conn.service_admin("stream", api.schema.stream.StreamServiceAdmin)
    async with api.rpc_errors():  # `forward` catches a failure of a second resolve
        if isinstance(loc, TcpEndpoint):
            cap = (await stream_admin.tcpEndpoint(loc.host, loc.port)).stream
        else:
            cap = (await stream_admin.unixEndpoint(loc.path)).stream  # type: ignore[attr-defined]
    return cap, await conn.node_address()


def forget(conn: Connection, text: str) -> None:
    """A ref's node connection broke: reconnect on the next resolve."""
    loc = Locator.parse(text, allowed=STREAM_KINDS)
    if isinstance(loc, RefLocator):
        conn.forget(loc.ref)


async def export(args: argparse.Namespace) -> int:
    async with connection() as conn:
        cap, _ = await resolve(conn, args.resource)
        await conn.export(cap, args)
    return 0


async def cat_stream(args: argparse.Namespace) -> int:
    async with connection() as conn:
        cap, address = await resolve(conn, args.stream)
        async with await api.open_stream(cap, local_address=address) as opened:
            pump = await api.pipe_endpoints(api.Endpoint.of_stdio(), opened.endpoint(), "cat")
    if pump.error is not None and not isinstance(pump.error, BrokenPipeError):
        raise errors.Unavailable(f"stream broken: {pump.error}")
    return 0


def _listen_address(text: str) -> tuple[str, int]:
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise errors.InvalidArgument("listen address must be [HOST:]PORT, PORT in 0..65535") \
            from None
    return host, port


class _Revoked(Exception):
    """The forwarded stream's ref was revoked (ends the accept loop)."""


async def forward(args: argparse.Namespace) -> int:
    import asyncio
    host, port = _listen_address(args.listen)
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        conn = Connection(stack)
        cap, address = await resolve(conn, args.stream)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            server = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise errors.FailedPrecondition(f"cannot listen on {args.listen}: {exc.strerror}") \
                from None
        stack.callback(server.close)
        server.setblocking(False)
        bound = server.getsockname()
        print(f"forwarding {show_endpoint(bound[0], bound[1])}; Ctrl-C to stop", flush=True)
        state = {"cap": cap}
        revoked = asyncio.Event()

        async def one(sock: socket.socket, peer: Any) -> None:
            client = api.Endpoint.of_socket(sock, "client")
            try:
                try:
                    opened = await api.open_stream(state["cap"], local_address=address)
                except errors.Unavailable:
                    forget(conn, args.stream)  # the node may have restarted: once more
                    state["cap"], _ = await resolve(conn, args.stream)
                    opened = await api.open_stream(state["cap"], local_address=address)
            except errors.MetacError as exc:
                client.close()
                if isinstance(exc, errors.NotFound):
                    revoked.set()  # the ref was revoked: nothing more can be forwarded
                    return
                error(exc.category, str(exc))
                return
            async with opened:
                await api.pipe_endpoints(client, opened.endpoint(),
                                     f"forward {peer[0]}:{peer[1]}")

        async def stop_when_revoked() -> None:
            await revoked.wait()
            raise _Revoked

        try:
            with contextlib.suppress(asyncio.CancelledError):
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(stop_when_revoked(), name="stop when revoked")
                    while True:
                        sock, peer = await loop.sock_accept(server)
                        tg.create_task(one(sock, peer), name=f"forward {peer[0]}:{peer[1]}")
        except BaseExceptionGroup as group:
            if group.subgroup(_Revoked) is None:
                raise
        if revoked.is_set():
            raise errors.NotFound("the stream's ref was revoked; stopped forwarding")
    return 0


async def bind(args: argparse.Namespace) -> int:
    async with connection() as conn:
        first, _ = await resolve(conn, args.first)
        second, _ = await resolve(conn, args.second)
        holder = (await first.bindTo(second)).holder
        ref = (await holder.createSturdyRef(persistent=args.persistent)).id
        print(api.ref_from_struct(ref).format())
    return 0
