"""Import rules of docs/design.md: services never import each other; codec is pure; core knows no service."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "metac"
SERVICES = {"persistence", "stream", "fs", "net", "compute", "vm"}
PURE_CODEC_BANNED = {"asyncio", "socket", "capnp", "subprocess", "os", "metac.core", "metac.schema"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
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
