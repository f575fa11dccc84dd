"""Import rules of docs/design.md: services never import each other; codec is pure; core knows no service."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "metac"
SERVICES = {"persistence", "stream", "fs", "net", "compute", "vm"}
PURE_CODEC_BANNED = {"asyncio", "socket", "capnp", "subprocess", "os", "metac.core", "metac.schema"}


def _imports(path: Path, *, module_level: bool = False) -> set[str]:
    """What ``path`` imports; with ``module_level``, only the imports made when it loads
    (``if TYPE_CHECKING:`` blocks included; imports inside functions, made when called,
    are not)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    if module_level:
        nodes: list[ast.AST] = []
        todo = list(tree.body)
        while todo:
            node = todo.pop()
            nodes.append(node)
            if isinstance(node, (ast.If, ast.Try)):
                todo.extend(ast.iter_child_nodes(node))
    else:
        nodes = list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_services_do_not_import_other_services(service: str) -> None:
    others = SERVICES - {service}
    for path in _modules(service):
        bad = {name for name in _imports(path)
               if any(name == f"metac.{o}" or name.startswith(f"metac.{o}.") for o in others)}
        assert not bad, f"{path.relative_to(SRC)} imports another service: {sorted(bad)}"


def test_core_knows_no_service() -> None:
    for path in _modules("core"):
        bad = {name for name in _imports(path)
               if any(name == f"metac.{s}" or name.startswith(f"metac.{s}.") for s in SERVICES)}
        assert not bad, f"{path.relative_to(SRC)} imports a service: {sorted(bad)}"


def test_codec_is_pure() -> None:
    for path in _modules("codec"):
        for name in _imports(path):
            top = name.split(".")[0]
            assert name not in PURE_CODEC_BANNED and top not in PURE_CODEC_BANNED - {"metac"}, \
                f"{path.relative_to(SRC)} imports {name}"
            if top != "metac":
                assert top in sys.stdlib_module_names or top == "__future__", \
                    f"{path.relative_to(SRC)} imports non-stdlib {name}"


def test_every_service_package_has_the_uniform_shape() -> None:
    for service in SERVICES:
        pkg = SRC / service
        init = (pkg / "__init__.py").read_text()
        assert ast.get_docstring(ast.parse(init)), f"{service}/__init__.py needs a docstring"
        assert (pkg / "__main__.py").exists(), f"{service} has no __main__.py"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_no_import_cycles() -> None:
    """No module imports itself through others (type-checking imports included)."""
    paths = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {name: {i for i in _imports(path, module_level=True) if i in paths and i != name}
             for name, path in paths.items()}
    # A package's __init__ importing its own modules is how packages work, not a cycle.
    for name in graph:
        graph[name] = {i for i in graph[name] if not name.startswith(i + ".")}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


#: Pure parsers live in codec: the protocol and file formats services speak or read.
CODEC_PARSERS = {"nbdproto": "ClientHandshake", "mountinfo": "parse_mountinfo"}


def test_codec_holds_the_pure_parsers() -> None:
    for module, name in CODEC_PARSERS.items():
        assert name in (SRC / "codec" / f"{module}.py").read_text()
    for path in SRC.rglob("*.py"):
        if path.parent.name == "codec":
            continue
        tree = ast.parse(path.read_text(), str(path))
        defined = {n.name for n in ast.walk(tree)
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        copies = defined & set(CODEC_PARSERS.values())
        assert not copies, f"{path.relative_to(SRC)} defines {sorted(copies)}: use metac.codec"
        text = path.read_text()
        assert '"/proc/self/mountinfo"' not in text, \
            f"{path.relative_to(SRC)} reads mountinfo itself: use metac.codec.mountinfo"


def test_cli_opens_streams_through_the_api() -> None:
    """CLI modules reach streams and pumps through metac.api (cli/connect.py holds the
    connections), never core.pump/core.streams directly."""
    for path in _modules("cli"):
        bad = {name for name in _imports(path)
               if name.startswith(("metac.core.pump", "metac.core.streams"))}
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}: use metac.api"
