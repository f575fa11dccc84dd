"""`metac`: argparse root. Command groups are listed in one explicit table."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from metac import __version__, errors
from metac.cli import (
    compute_cli,
    fs_cli,
    help_cli,
    net_cli,
    node_cli,
    ref_cli,
    stream_cli,
    vm_cli,
)
from metac.cli.output import error, local_path, slow_notice
from metac.codec.locators import LocatorError
from metac.codec.refs import RefError

#: Every command group: module with register(subparsers).
COMMAND_GROUPS = [node_cli, ref_cli, stream_cli, net_cli, compute_cli, fs_cli, vm_cli, help_cli]


#: Signals that end a running command: the main task is cancelled (so holders and
#: connections are released) and the command exits 128+N with one line.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class ArgumentParser(argparse.ArgumentParser):
    """argparse quotes bad values in its errors ("invalid choice: 'ref://…'"): redact them."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.print_usage(sys.stderr)
        error("InvalidArgument", f"{self.prog}: {message}")
        sys.exit(errors.InvalidArgument.exit_code)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="metac",
        description="MetaContainer: share resources between Linux machines as capabilities.",
        epilog="`metac help COMMAND` (or `metac COMMAND --help`) describes a command.",
    )
    parser.add_argument("--version", action="version", version=f"metac {__version__}",
                        help="print the version and exit")
    parser.add_argument(
        "--runtime-dir", default=None, type=local_path,
        help="runtime dir of the local node to talk to (default: $METAC_RUNTIME_DIR or /run/metac)")
    sub = parser.add_subparsers(dest="group", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def run(func: Callable[..., Any], args: argparse.Namespace) -> int:
    """Run a command function (sync or async, inside the kj loop); map errors to exit codes."""
    import asyncio
    import inspect

    import capnp

    from metac.core import client
    from metac.core.rpc import rpc_errors

    client.on_slow = slow_notice

    stopped_by: list[int] = []

    def stop(task: asyncio.Task[Any], sig: int) -> None:
        if stopped_by:  # a second signal: do not wait for the clean-up any longer
            _stopped_line(sig)
            os._exit(128 + sig)
        stopped_by.append(sig)
        task.cancel()

    async def body() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        # Commands that treat a signal as their normal end install their own handlers.
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop, task, sig)
        try:
            async with rpc_errors():
                return int(await func(args) or 0)
        except asyncio.CancelledError:
            if not stopped_by:
                raise
            _stopped_line(stopped_by[0])
            return 128 + stopped_by[0]

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
    except (KeyboardInterrupt, asyncio.CancelledError):
        _stopped_line(signal.SIGINT)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        with contextlib.suppress(OSError):  # no "Exception ignored" when stdout closes
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # our bug; still one line, and never a secret
        if os.environ.get("METAC_DEBUG"):
            raise
        detail = f"{type(exc).__name__}: {exc}"
        error("Internal", f"{detail} (METAC_DEBUG=1 shows the traceback)")
        return errors.Internal.exit_code


def _stopped_line(sig: int) -> None:
    error("Interrupted", f"stopped by {signal.Signals(sig).name}")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.group is None:  # `metac` alone: the command list
        parser.print_help()
        sys.exit(0)
    if args.runtime_dir:
        os.environ["METAC_RUNTIME_DIR"] = args.runtime_dir
    sys.exit(run(args.func, args))
