"""The CLI's parser: help for every argument, --version, `metac`, `metac help`, completion,
redacted argument errors, empty tables (issue 18 items 1 and 12, issue 10 item 14)."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys

import pytest

from metac import __version__
from metac.cli import main as cli_main
from metac.cli.main import build_parser
from metac.cli.output import table

SECRET = "Qk1sZWNyZXRTZWNyZXRTZWNyZXQ"
REF = f"ref://192.0.2.1/fs/{SECRET}"


def walk(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*words, name))
        else:
            yield words, action


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_every_argument_has_help_text() -> None:
    missing = [f"metac {' '.join(words)} {action.option_strings or action.dest}"
               for words, action in walk(build_parser())
               if not action.help and not isinstance(action, argparse._HelpAction)]
    assert not missing, "arguments without help text:\n" + "\n".join(missing)


def test_version(capsys) -> None:
    assert run_main(["--version"], capsys) == (0, f"metac {__version__}\n", "")


def test_no_arguments_print_the_command_list(capsys) -> None:
    code, out, err = run_main([], capsys)
    assert code == 0 and err == ""
    for command in ("node", "ref", "stream", "fs", "file", "block", "net", "run", "ps", "help"):
        assert f"\n    {command} " in out, command


def test_help_command(capsys) -> None:
    code, out, _ = run_main(["help", "fs", "mount"], capsys)
    assert code == 0 and out.startswith("usage: metac fs mount") and "--read-only" in out
    code, out, _ = run_main(["help"], capsys)
    assert code == 0 and out.startswith("usage: metac ")
    code, _, err = run_main(["help", "fs", "nope"], capsys)
    assert code == 3
    assert err == "metac: NotFound: `metac fs` has no command 'nope' " \
                  "(commands: export, mount, umount, ls, stream)\n"


@pytest.mark.parametrize("argv", [
    ["fs", "mount", "--method", REF, "x", "y"],           # invalid choice quotes the value
    ["node", "run", "--port", REF],                       # invalid int value quotes it too
    ["fs", "mount", "local:/tmp", REF, "extra"],           # unrecognized arguments: the ref
    ["fs", "mount", REF, REF],                            # a ref as the mount point
    ["fs", "umount", REF],
    ["block", "detach", REF],
    ["compute", "rootfs", REF],
    ["compute", "rootfs", "--debootstrap", REF, "/tmp/x"],
    ["--runtime-dir", REF, "node", "status"],
])
def test_argument_errors_never_print_the_secret(argv, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["metac", *argv])
    code, out, err = run_main(argv, capsys)
    assert code == 2
    assert SECRET[4:] not in out + err and "Traceback" not in err
    assert err.splitlines()[-1].startswith("metac: InvalidArgument: ")


def test_empty_listing_prints_its_header(capsys) -> None:
    table([], ["device", "mount", "state"])
    assert capsys.readouterr().out == "DEVICE  MOUNT  STATE\n"


def test_shtab_is_installed() -> None:
    # A dependency in pyproject.toml: `metac completion` and the tests below need it.
    assert importlib.util.find_spec("shtab") is not None, \
        "the Python package shtab is missing: run scripts/install-deps.sh"


@pytest.mark.parametrize("line, expected", [
    ("metac fs mo", ["mount"]),
    ("metac fs mount --re", ["--read-only"]),
    ("metac blo", ["block"]),
    ("metac ref group ", ["create", "ls", "rm"]),
])
def test_bash_completion_completes_a_partial_command_line(line, expected, capsys) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    code, script, _ = run_main(["completion", "bash"], capsys)
    assert code == 0 and "complete " in script
    words = line.split(" ")  # a trailing space: completing an empty word
    driver = (
        f"{script}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        f"COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}\n"
        "_shtab_metac; printf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    proc = subprocess.run([bash, "--norc", "-c", driver], capture_output=True, text=True,
                          timeout=30, check=True)
    assert proc.stdout.split() == expected, proc.stderr


def test_completion_completes_paths_for_path_arguments(tmp_path, capsys) -> None:
    (tmp_path / "mnt-here").mkdir()
    code, script, _ = run_main(["completion", "bash"], capsys)
    driver = (f"{script}\ncd {str(tmp_path)!r}\n"
              "COMP_WORDS=(metac fs umount mnt); COMP_CWORD=3\n"
              "_shtab_metac; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    proc = subprocess.run(["bash", "--norc", "-c", driver], capture_output=True, text=True,
                          timeout=30, check=True)
    assert proc.stdout.split() == ["mnt-here"], proc.stderr
