"""`metac`: argparse root. Command groups are listed in one explicit table."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from metac import errors
from metac.cli import compute_cli, fs_cli, net_cli, node_cli, ref_cli, stream_cli
from metac.cli.output import error
from metac.codec.locators import LocatorError
from metac.codec.refs import RefError

#: Every command group: module with register(subparsers).
COMMAND_GROUPS = [node_cli, ref_cli, stream_cli, net_cli, compute_cli, fs_cli]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metac",
        description="MetaContainer: share resources between Linux machines as capabilities.",
    )
    parser.add_argument(
        "--runtime-dir", default=None,
        help="runtime dir of the local node to talk to (default: $METAC_RUNTIME_DIR or /run/metac)")
    sub = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def run(func: Callable[..., Any], args: argparse.Namespace) -> int:
    """Run a command function (sync or async, inside the kj loop); map errors to exit codes."""
    import capnp

    from metac.core.rpc import rpc_errors

    async def body() -> int:
        async with rpc_errors():
            return int(await func(args) or 0)

    try:
        if inspect.iscoroutinefunction(func):
            return asyncio.run(capnp.run(body()))
        return int(func(args) or 0)
    except errors.MetacError as exc:
        error(exc.category, str(exc))
        return exc.exit_code
    except (RefError, LocatorError) as exc:
        error("InvalidArgument", str(exc))
        return errors.InvalidArgument.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.runtime_dir:
        os.environ["METAC_RUNTIME_DIR"] = args.runtime_dir
    sys.exit(run(args.func, args))
