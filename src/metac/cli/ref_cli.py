"""`metac ref ls|show|rm|group`: sturdy refs kept by the local node."""

from __future__ import annotations

import argparse
import datetime
import re
from typing import Any

from metac import api, errors
from metac.api import SturdyRef
from metac.cli.output import as_json, table
from metac.codec.refs import node_port

SHORT_ID = re.compile(r"^[0-9a-fA-F]{6,64}$")


def register(sub: Any) -> None:
    p = sub.add_parser("ref", help="list, inspect and revoke sturdy refs")
    rsub = p.add_subparsers(dest="cmd", metavar="SUBCOMMAND", required=True)

    ls = rsub.add_parser("ls", help="refs kept by the local node (never their secrets)")
    ls.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    ls.set_defaults(func=list_refs)

    show = rsub.add_parser("show", help="check a ref: restore it and show what it is")
    show.add_argument("ref", help="ref://[node]/service/secret (or ref:...)")
    show.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    show.set_defaults(func=show_ref)

    rm = rsub.add_parser("rm", help="revoke a ref of the local node for good")
    rm.add_argument("ref", help="the ref, or the short id `metac ref ls` shows")
    rm.set_defaults(func=remove_ref)

    g = rsub.add_parser("group", help="resource groups: dropping a group revokes its refs")
    gsub = g.add_subparsers(dest="gcmd", metavar="SUBCOMMAND", required=True)
    gc = gsub.add_parser("create", help="create a resource group")
    gc.add_argument("name", help="the new group's name")
    gc.set_defaults(func=create_group)
    gl = gsub.add_parser("ls", help="the resource groups and how many refs each holds")
    gl.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    gl.set_defaults(func=list_groups)
    gr = gsub.add_parser("rm", help="drop a group, revoking every ref in it")
    gr.add_argument("name", help="the group to drop")
    gr.set_defaults(func=drop_group)


def _info_dict(info: Any) -> dict[str, Any]:
    return {
        "id": info.shortId,
        "service": info.service,
        "category": info.category,
        "persistent": bool(info.persistent),
        "created": datetime.datetime.fromtimestamp(info.created).isoformat(timespec="seconds"),
        "group": info.group,
        "live": bool(info.live),
        "parent": info.parent,
        "description": info.description,
    }


def _tree_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with each ref's children (refs made through it) right under it, indented."""
    children: dict[str, list[dict[str, Any]]] = {}
    ids = {r["id"] for r in rows}
    roots = []
    for row in rows:
        if row["parent"] and row["parent"] in ids:
            children.setdefault(row["parent"], []).append(row)
        else:
            roots.append(row)
    out: list[dict[str, Any]] = []

    def walk(row: dict[str, Any], depth: int) -> None:
        out.append({**row, "id": "  " * depth + row["id"]})
        for child in children.get(row["id"], []):
            walk(child, depth + 1)

    for row in roots:
        walk(row, 0)
    return out


async def _persistence(admin: Any) -> Any:
    return await api.service_admin(admin, "persistence", api.schema.persistence.PersistenceAdmin)


async def list_refs(args: argparse.Namespace) -> int:
    async with api.connect_admin() as admin:
        padmin = await _persistence(admin)
        refs = (await padmin.listRefs()).refs
        rows = [_info_dict(r) for r in refs]
    if args.json:
        as_json(rows)
    else:
        table(_tree_order(rows),
              ["id", "service", "category", "persistent", "created", "group", "live", "parent",
               "description"])
    return 0


async def _local_address() -> tuple[str, int | None] | None:
    try:
        async with api.connect_admin() as admin:
            addr = (await admin.getUnprivilegedNode().node.address()).address
            return SturdyRef.from_parts(addr.ip, addr.port or None, "x", b"\0" * 16).node, \
                addr.port or None
    except errors.MetacError:
        return None


async def show_ref(args: argparse.Namespace) -> int:
    ref = SturdyRef.parse(args.ref)
    out: dict[str, Any] = {"ref": ref.redacted(), "node": ref.node, "port": node_port(ref.port),
                           "service": ref.service}
    async with api.NodePool() as pool:
        _, kind = await pool.restore_with_kind(ref)
        out["valid"] = True
        out["kind"] = kind or "unknown (the node did not say)"
    if await _local_address() == (ref.node, ref.port):
        async with api.connect_admin() as admin:
            padmin = await _persistence(admin)
            out.update(_info_dict((await padmin.getRefInfo(ref.secret_bytes)).info))
    if args.json:
        as_json(out)
    else:
        for key, value in out.items():
            print(f"{key}: {value}")
    return 0


async def remove_ref(args: argparse.Namespace) -> int:
    text = args.ref
    if SHORT_ID.match(text):
        secret, short = b"", text
    else:
        ref = SturdyRef.parse(text)
        local = await _local_address()
        if local is not None and local != (ref.node, ref.port):
            raise errors.PermissionDenied(
                "this ref lives on another node; revoke it there (metac ref rm runs as root on "
                "the ref's node)")
        secret, short = ref.secret_bytes, ""
    async with api.connect_admin() as admin:
        padmin = await _persistence(admin)
        info = (await padmin.deleteRef(secret, short)).info
    print(f"revoked {info.shortId} ({info.service}/{info.category})")
    return 0


async def create_group(args: argparse.Namespace) -> int:
    async with api.connect_admin() as admin:
        padmin = await _persistence(admin)
        await padmin.createGroup(args.name)
    print(args.name)
    return 0


async def list_groups(args: argparse.Namespace) -> int:
    async with api.connect_admin() as admin:
        padmin = await _persistence(admin)
        rows = [{"name": g.name, "refs": g.refs,
                 "created": datetime.datetime.fromtimestamp(g.created).isoformat(
                     timespec="seconds")}
                for g in (await padmin.listGroups()).groups]
    if args.json:
        as_json(rows)
    else:
        table(rows, ["name", "refs", "created"])
    return 0


async def drop_group(args: argparse.Namespace) -> int:
    async with api.connect_admin() as admin:
        padmin = await _persistence(admin)
        n = (await padmin.dropGroup(args.name)).revoked
    print(f"dropped group {args.name}, revoked {n} ref(s)")
    return 0
