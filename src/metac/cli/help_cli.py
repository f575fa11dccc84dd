"""`metac help [COMMAND...]` and `metac completion bash|zsh`: both generated from the parser."""

from __future__ import annotations

import argparse
from typing import Any

from metac import errors
from metac.cli.output import local_path

SHELLS = ("bash", "zsh")


def register(sub: Any) -> None:
    h = sub.add_parser("help", help="show the help of a command, e.g. `metac help fs mount`")
    h.add_argument("words", nargs="*", metavar="COMMAND", help="a command and its subcommands")
    h.set_defaults(func=show_help)

    c = sub.add_parser(
        "completion", help="print a shell completion script (the set-up installs the bash one)",
        description="Print the completion script for SHELL. The set-up installs the bash one as "
                    "/usr/share/bash-completion/completions/metac; for zsh, put the output in a "
                    "file named _metac in a directory of $fpath.")
    c.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    c.set_defaults(func=print_completion)


def _root_parser() -> argparse.ArgumentParser:
    from metac.cli.main import build_parser  # main imports this module

    return build_parser()


def subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The parser of the command ``words`` (``[]``: the root); NotFound names the bad word."""
    for depth, word in enumerate(words):
        choices: dict[str, argparse.ArgumentParser] = {}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                choices = dict(action.choices)
        if word not in choices:
            where = " ".join(["metac", *words[:depth]])
            known = ", ".join(choices) or "none"
            raise errors.NotFound(f"`{where}` has no command {word!r} (commands: {known})")
        parser = choices[word]
    return parser


def show_help(args: argparse.Namespace) -> int:
    subparser(_root_parser(), args.words).print_help()
    return 0


def print_completion(args: argparse.Namespace) -> int:
    try:
        import shtab
    except ImportError:
        raise errors.FailedPrecondition(
            "the Python package shtab is missing; run scripts/install-deps.sh (or pip install "
            "shtab)") from None
    parser = _root_parser()
    _mark_paths(parser, shtab.FILE)
    print(shtab.complete(parser, shell=args.shell), end="")
    return 0


def _mark_paths(parser: argparse.ArgumentParser, complete: Any) -> None:
    """Arguments that name a local path complete file names."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _mark_paths(sub, complete)
        elif action.type is local_path:
            action.complete = complete  # type: ignore[attr-defined]
