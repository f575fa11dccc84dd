"""A tiny client of the demo service for tests: ``python -m metac.testing.democli CMD ...``.

Commands (refs printed in full on stdout, one per line):
  make-counter NAME [--persistent] [--group G]   create a counter on the local node
  make-box LABEL REF [--persistent]              box (on the local node) holding REF's object
  increment REF N                                increment a counter by N, print its value
  box-get REF N                                  increment the counter inside a box
  lease LABEL [--release-after S]               hold a lease (a Holder) until killed
  leases                                         labels of the live leases
  try-secrets NODE PORT SERVICE FILE             try every line of FILE as a secret; print hits
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import capnp

from metac import api, errors
from metac.codec.refs import RefError
from metac.schema.load import core, demo


async def _demo_admin(admin):
    return await api.service_admin(admin, "demo", demo.DemoAdmin)


async def make_counter(args) -> None:
    async with api.connect_admin() as admin:
        d = await _demo_admin(admin)
        counter = (await d.makeCounter(args.name)).counter
        if args.group:
            padmin = await api.service_admin(admin, "persistence",
                                             api.schema.persistence.PersistenceAdmin)
            group = (await padmin.getGroup(args.group)).group
            ref = (await counter.createSturdyRef(rgroup=group, persistent=args.persistent)).id
        else:
            ref = (await counter.createSturdyRef(persistent=args.persistent)).id
        print(api.ref_from_struct(ref).format())


async def make_box(args) -> None:
    async with api.NodePool() as pool, api.connect_admin() as admin:
        cap = await pool.restore(api.SturdyRef.parse(args.ref))
        d = await _demo_admin(admin)
        box = (await d.makeBox(args.label, cap)).box
        ref = (await box.createSturdyRef(persistent=args.persistent)).id
        print(api.ref_from_struct(ref).format())


async def increment(args) -> None:
    async with api.NodePool() as pool:
        counter = await pool.restore(api.SturdyRef.parse(args.ref), demo.Counter)
        print((await counter.increment(args.n)).value)


async def box_get(args) -> None:
    async with api.NodePool() as pool:
        box = await pool.restore(api.SturdyRef.parse(args.ref), demo.Box)
        counter = (await box.get()).cap.cast_as(demo.Counter)
        print((await counter.increment(args.n)).value)


async def lease(args) -> None:
    async with api.connect_admin() as admin:
        d = await _demo_admin(admin)
        holder = (await d.lease(args.label)).holder
        print("holding", flush=True)
        if args.release_after >= 0:
            await asyncio.sleep(args.release_after)
            await holder.release()
            print("released", flush=True)
        await asyncio.sleep(3600)


async def leases(args) -> None:
    async with api.connect_admin() as admin:
        d = await _demo_admin(admin)
        print(" ".join(sorted((await d.leases()).labels)))


async def try_secrets(args) -> None:
    hits = 0
    async with api.NodePool() as pool:
        with open(args.file) as f:
            candidates = [line.strip() for line in f if line.strip()]
        for cand in candidates:
            try:
                ref = api.SturdyRef.parse(f"ref://[{args.node}]:{args.port}/{args.service}/{cand}")
            except RefError:
                continue
            try:
                await pool.restore(ref, core.Persistable)
                hits += 1
                print("HIT", cand[:4])
            except errors.NotFound:
                pass
    print(f"tried {len(candidates)} hits {hits}")


def main() -> None:
    p = argparse.ArgumentParser(prog="democli")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("make-counter")
    s.add_argument("name")
    s.add_argument("--persistent", action="store_true")
    s.add_argument("--group", default="")
    s.set_defaults(func=make_counter)
    s = sub.add_parser("make-box")
    s.add_argument("label")
    s.add_argument("ref")
    s.add_argument("--persistent", action="store_true")
    s.set_defaults(func=make_box)
    s = sub.add_parser("increment")
    s.add_argument("ref")
    s.add_argument("n", type=int)
    s.set_defaults(func=increment)
    s = sub.add_parser("box-get")
    s.add_argument("ref")
    s.add_argument("n", type=int)
    s.set_defaults(func=box_get)
    s = sub.add_parser("lease")
    s.add_argument("label")
    s.add_argument("--release-after", type=float, default=-1)
    s.set_defaults(func=lease)
    s = sub.add_parser("leases")
    s.set_defaults(func=leases)
    s = sub.add_parser("try-secrets")
    s.add_argument("node")
    s.add_argument("port", type=int)
    s.add_argument("service")
    s.add_argument("file")
    s.set_defaults(func=try_secrets)
    args = p.parse_args()

    async def run() -> None:
        async with api.rpc_errors():
            await args.func(args)

    try:
        asyncio.run(capnp.run(run()))
    except errors.MetacError as exc:
        print(f"democli: {exc.wire()}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
