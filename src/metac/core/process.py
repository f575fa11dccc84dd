"""main() shared by every metac daemon: logging, signals, the kj event loop, exit codes."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import warnings
from collections.abc import Awaitable, Callable

import capnp

from metac import errors
from metac.codec.refs import redact_secrets
from metac.core.holder import drain_background

log = logging.getLogger(__name__)

#: Exit code of a daemon that cannot run as things are (a damaged database, ...):
#: restarting it would fail the same way. A service exiting with it stops the
#: node, which exits with it too (the systemd unit does not restart on it).
EXIT_FATAL = 78  # EX_CONFIG

#: Where a service writes the one-line reason of a fatal exit, for the node to report.
FATAL_FILE_ENV = "METAC_FATAL_FILE"


class FatalError(Exception):
    """Raised out of a daemon's body: log ``error`` as one line and exit EXIT_FATAL."""

    def __init__(self, error: errors.MetacError) -> None:
        super().__init__(error.wire())
        self.error = error


def _report_fatal(error: errors.MetacError) -> None:
    path = os.environ.get(FATAL_FILE_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        with os.fdopen(fd, "w") as f:
            f.write(error.wire() + "\n")
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc.strerror)


def read_fatal(path: str) -> errors.MetacError | None:
    """The error a service reported in its fatal file (and remove the file)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip().splitlines()
        os.unlink(path)
    except OSError:
        return None
    if not text:
        return None
    category, _, message = text[0].partition(": ")
    return errors.CATEGORIES.get(category, errors.FailedPrecondition)(message or text[0])


class RedactingFormatter(logging.Formatter):
    """Log lines (tracebacks included) with the secret of every ref-shaped text cut."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_secrets(super().format(record))


def setup_logging(name: str, level: str | None = None) -> None:
    level = level or os.environ.get("METAC_LOG_LEVEL", "INFO")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(
        f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


GC_INTERVAL = 5.0


async def _collect_garbage_on_loop() -> None:
    # pycapnp objects must be destroyed on the thread that runs the kj loop.
    # The cyclic collector can fire in any thread (executor workers, netlink
    # threads) and would destroy them there, aborting the process; so
    # automatic collection is off and it runs here instead.
    while True:
        await asyncio.sleep(GC_INTERVAL)
        gc.collect()


def _use_pidfd_child_watcher() -> None:
    # Python 3.11's default child watcher starts a thread per child process;
    # a pidfd watcher waits on the event loop instead.
    watcher_cls = getattr(asyncio, "PidfdChildWatcher", None)
    if watcher_cls is None or sys.version_info >= (3, 12):
        return  # 3.12+ waits with pidfds by default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            watcher = watcher_cls()
            watcher.attach_loop(asyncio.get_running_loop())
            asyncio.set_child_watcher(watcher)
        except (OSError, RuntimeError, NotImplementedError) as exc:
            log.debug("pidfd child watcher unavailable: %s", exc)


def run_daemon(name: str, body: Callable[[], Awaitable[int | None]]) -> int:
    """Run ``body`` inside the kj loop until it returns or SIGTERM/SIGINT cancels it."""
    setup_logging(name)
    gc.disable()

    async def main() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        _use_pidfd_child_watcher()
        collector = loop.create_task(_collect_garbage_on_loop(), name="gc")
        stopping = False

        def on_signal(signum: int) -> None:
            nonlocal stopping
            if not stopping:
                stopping = True
                log.info("got %s, stopping", signal.Signals(signum).name)
                task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            code = await body()
        except asyncio.CancelledError:
            if not stopping:
                raise
            code = 0
        except FatalError as exc:
            log.error("%s", exc.error.wire())
            _report_fatal(exc.error)
            code = EXIT_FATAL
        except errors.MetacError as exc:
            log.error("%s", exc.wire())
            code = exc.exit_code
        finally:
            collector.cancel()
            await drain_background()
        return int(code or 0)

    try:
        return asyncio.run(capnp.run(main()))
    except KeyboardInterrupt:
        return 0
