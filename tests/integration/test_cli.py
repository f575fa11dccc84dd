"""The CLI's boundary on real nodes: no secret in any output (issue 10 item 14), signals end
a command with one line, empty listings print their header (issue 18 item 12).

The parser is walked, so a new command or argument is covered without touching this test:
every argument that takes a value gets a real ref of node A, typed on node B (a user with
the arguments in the wrong order, or a ref pasted into the wrong field), and nothing the
command prints, nor the nodes' logs, may hold its secret.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from metac.cli.main import build_parser
from metac.testing.nodes import NodeHost, metac_argv

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

#: How long one command may run before it is stopped (the long-running ones: forward,
#: foreground binds, run) with SIGTERM; what it printed until then is checked all the same.
RUN_FOR = 12.0
#: Commands that revoke or drop: run last, so the refs stay valid for every other command.
LAST = (("ref", "rm"), ("ref", "group", "rm"))


def leaf_commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable command of the parser: (words, its parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from leaf_commands(sub, (*prefix, name))
    if parser.get_default("func") is not None:
        yield prefix, parser


def value_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Positionals and the options that take a value (flags and --help take none)."""
    return [a for a in parser._actions
            if not isinstance(a, argparse._SubParsersAction) and a.nargs != 0]


class Filler:
    """Harmless values for the arguments not under test (each call gets fresh paths)."""

    def __init__(self, tmp: Path, other_ref: str) -> None:
        self.tmp = tmp
        self.other_ref = other_ref
        self.count = 0

    def value(self, action: argparse.Action) -> list[str]:
        self.count += 1
        dest = action.dest
        if dest in ("path", "directory"):
            d = self.tmp / f"dir{self.count}"
            d.mkdir()
            return [str(d)]
        if dest == "device":
            return [str(self.tmp / "no-such-device")]
        if dest == "listen":
            return ["127.0.0.1:0"]
        if dest == "name":
            return ["no-such-group"]
        if dest == "targets":
            return ["no-such-process"]
        if dest == "command":
            return ["--", "true"]
        return [self.other_ref]


def invocations(ref: str, filler: Filler) -> Iterator[list[str]]:
    """argv lists putting ``ref`` into every value argument of every command, and into all
    of a command's positionals at once."""
    commands = sorted(leaf_commands(build_parser()), key=lambda c: c[0] in LAST)
    yield ["--runtime-dir", ref, "node", "status"]
    for words, parser in commands:
        arguments = value_arguments(parser)
        positionals = [a for a in arguments if not a.option_strings]
        for target in arguments:
            argv = [*words]
            if target.option_strings:
                argv += [target.option_strings[-1], ref]
            for pos in positionals:
                if pos is target:
                    argv += (["--", ref] if pos.dest == "command" else [ref])
                else:
                    argv += filler.value(pos)
            yield argv
        if len(positionals) > 1:
            yield [*words, *(x for p in positionals
                             for x in (["--", ref] if p.dest == "command" else [ref]))]


def run_for_a_while(node: NodeHost, argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run ``metac ARGV`` in ``cwd`` on ``node``; stop it with SIGTERM after RUN_FOR seconds.

    A `node run` gets directories of its own, never those of the node under test."""
    env = None
    if argv[:2] == ["node", "run"]:
        env = {"METAC_RUNTIME_DIR": str(cwd / "node-run"), "METAC_STATE_DIR": str(cwd / "node-state")}
    proc = node.popen(*argv, cwd=str(cwd), env=env)
    try:
        out, err = proc.communicate(timeout=RUN_FOR)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err += "\n(killed: SIGTERM did not end it)"
    return proc.returncode, out, err


def cleanup(node: NodeHost) -> None:
    """Undo what a command that succeeded left behind (mounts, attachments)."""
    for m in json.loads(node.metac("fs", "ls", "--json").stdout or "[]"):
        node.metac("fs", "umount", m["path"], check=False)
    for a in json.loads(node.metac("block", "ls", "--json").stdout or "[]"):
        node.metac("block", "detach", a["device"] or a["mount"], check=False)


def test_no_secret_in_any_cli_output(nodes_factory, tmp_path: Path) -> None:
    a, b = nodes_factory(2)
    export = tmp_path / "export"
    export.mkdir()
    fs_ref = a.metac("fs", "export", f"local:{export}").stdout.strip()
    stream_ref = a.metac("stream", "export", "tcp:127.0.0.1:9").stdout.strip()
    secrets = [r.rsplit("/", 1)[1] for r in (fs_ref, stream_ref)]
    work = tmp_path / "work"
    work.mkdir()
    filler = Filler(tmp_path / "fill", stream_ref)
    filler.tmp.mkdir()
    leaks, tracebacks, seen = [], [], 0
    try:
        for argv in invocations(fs_ref, filler):
            seen += 1
            code, out, err = run_for_a_while(b, argv, work)
            shown = f"metac {' '.join(argv)} -> {code}\n{out}{err}"
            # The first four characters are the redacted form; anything more is a leak.
            if any(s[4:] in out + err or s[4:16] in out + err for s in secrets):
                leaks.append(shown)
            if "Traceback" in err:
                tracebacks.append(shown)
    finally:
        cleanup(b)
    assert seen > 40, f"the parser walk found only {seen} argument positions"
    assert not leaks, "secret printed:\n" + "\n".join(leaks)
    assert not tracebacks, "traceback printed:\n" + "\n".join(tracebacks)
    for node in (a, b):
        log = node.log_text(since_start=False)
        for path in (node.state_dir / "logs").glob("*"):
            log += path.read_text(errors="replace")
        assert not [s for s in secrets if s[4:16] in log], f"secret in the logs of {node.name}"


# ----------------------------------------------------------------------------- signals

#: A TCP server that accepts connections and never answers nor closes them.
SILENT_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print(s.getsockname()[1], flush=True)
held = []
while True:
    held.append(s.accept())
"""
STOPPED = "metac: Interrupted: stopped by SIGTERM"


@contextlib.contextmanager
def silent_server(node: NodeHost, address: str, port: int = 0) -> Iterator[int]:
    """A port in ``node``'s namespace that accepts and then says nothing, ever."""
    proc = node.host.popen([sys.executable, "-c", SILENT_SERVER, address, str(port)],
                           stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def still_running_after(proc: subprocess.Popen[str], seconds: float = 3.0) -> None:
    time.sleep(seconds)
    assert proc.poll() is None, proc.communicate()


def test_sigterm_and_timeout_end_commands_with_one_line(nodes_factory, tmp_path: Path) -> None:
    a, b = nodes_factory(2)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with silent_server(a, "127.0.0.1", 7010), silent_server(a, a.address) as port:
        held = a.metac("stream", "export", "tcp:127.0.0.1:7010").stdout.strip()
        secret = held.rsplit("/", 1)[1]
        # A "node" that accepts the connection and never answers: the mount waits.
        unreachable = f"ref://{a.address}:{port}/fs/{secret}"
        for argv in (["stream", "cat", held], ["fs", "mount", unreachable, str(mnt)]):
            proc = b.popen(*argv, stdin=subprocess.PIPE)
            still_running_after(proc)
            code, err = stop(proc)
            assert (code, err.strip().splitlines()) == (128 + signal.SIGTERM, [STOPPED]), \
                (argv, code, err)

            # The same under timeout(1), as a script would run it.
            done = subprocess.run(b.host.argv(["timeout", "3", *metac_argv(), *argv]),
                                  env=b.cli_env(), stdin=subprocess.PIPE,
                                  capture_output=True, text=True, timeout=60)
            assert (done.returncode, done.stderr.strip().splitlines()) == (124, [STOPPED]), \
                (argv, done.returncode, done.stderr)

        # Ctrl-C (SIGINT) likewise: one line, 130. (A shell starts background jobs with
        # SIGINT ignored, and so would this command be if the test runs in one.)
        cat = b.popen("stream", "cat", held, stdin=subprocess.PIPE,
                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        still_running_after(cat)
        code, err = stop(cat, signal.SIGINT)
        assert (code, err.strip().splitlines()) == (
            128 + signal.SIGINT, ["metac: Interrupted: stopped by SIGINT"]), (code, err)

        # `stream forward` and a foreground `metac run` treat SIGTERM as theirs: forward
        # stops listening and exits 0; run hands it to the process, which dies of it.
        fwd = b.popen("stream", "forward", held, "127.0.0.1:0")
        assert fwd.stdout is not None and fwd.stdout.readline().startswith("forwarding")
        assert stop(fwd) == (0, "")
        run = b.popen("run", "--mount", "/=local:/", "--", "sleep", "600", stdin=subprocess.PIPE)
        still_running_after(run, 5.0)
        code, err = stop(run)
        assert code == 128 + signal.SIGTERM and "Traceback" not in err, (code, err)
    assert not os.path.ismount(mnt)


# ----------------------------------------------------------------------------- listings


def test_empty_listings_print_their_header(nodes_factory) -> None:
    (a,) = nodes_factory(1)
    headers = {
        ("fs", "ls"): ["PATH", "METHOD", "SOURCE", "STATE", "PERSISTENT", "READ_ONLY"],
        ("block", "ls"): ["DEVICE", "MOUNT", "METHOD", "SOURCE", "STATE", "PERSISTENT",
                          "READ_ONLY"],
        ("ps",): ["ID", "PID", "STATUS", "STARTED", "COMMAND"],
        ("ps", "-a"): ["ID", "PID", "STATUS", "STARTED", "COMMAND"],
        ("ref", "ls"): ["ID", "SERVICE", "CATEGORY", "PERSISTENT", "CREATED", "GROUP", "LIVE", "PARENT",
                       "DESCRIPTION"],
        ("ref", "group", "ls"): ["NAME", "REFS", "CREATED"],
    }
    for words, header in headers.items():
        out = a.metac(*words).stdout
        assert out.splitlines() == ["  ".join(header)] or out.split() == header, (words, out)
        assert json.loads(a.metac(*words, "--json").stdout) == [], words
