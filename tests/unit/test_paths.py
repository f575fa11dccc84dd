"""Tests for metac.codec.paths: relative-name splitting and component validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metac.codec.paths import (
    MAX_COMPONENT_BYTES,
    MAX_PATH_BYTES,
    PathError,
    split_relative,
    validate_component,
)

SPLIT_ACCEPT = [
    ("", ()),
    (".", ()),
    ("./", ()),
    ("./.", ()),
    ("a", ("a",)),
    ("a/b", ("a", "b")),
    ("a//b", ("a", "b")),
    ("a/./b/", ("a", "b")),
    ("./a", ("a",)),
    ("a/b/c/.", ("a", "b", "c")),
    ("...", ("...",)),
    ("..a/b..", ("..a", "b..")),
    (".hidden", (".hidden",)),
    ("with space/tab\there", ("with space", "tab\there")),
    ("ünï/çødé", ("ünï", "çødé")),
    ("x" * MAX_COMPONENT_BYTES, ("x" * MAX_COMPONENT_BYTES,)),
    ("é" * (MAX_COMPONENT_BYTES // 2), ("é" * (MAX_COMPONENT_BYTES // 2),)),
    ("bad\udcffbyte", ("bad\udcffbyte",)),  # an undecodable byte held by surrogateescape
    ("/".join(["a" * 200] * 20), ("a" * 200,) * 20),  # 4019 bytes
]


@pytest.mark.parametrize(("name", "parts"), SPLIT_ACCEPT)
def test_split_accept(name: str, parts: tuple[str, ...]) -> None:
    assert split_relative(name) == parts
    assert split_relative("/".join(parts)) == parts


SPLIT_REJECT = [
    ("/", "must be relative"),
    ("/a", "must be relative"),
    ("//a", "must be relative"),
    ("..", "'..'"),
    ("../a", "'..'"),
    ("a/..", "'..'"),
    ("a/../b", "'..'"),
    ("a/\0", "NUL"),
    ("a\0b", "NUL"),
    ("x" * (MAX_COMPONENT_BYTES + 1), "longer than 255 bytes"),
    ("a/" + "é" * 128, "longer than 255 bytes"),  # 128 characters, 256 bytes
    ("a/" * (MAX_PATH_BYTES // 2) + "a", "longer than 4096 bytes"),
    ("lone\ud800surrogate", "lone surrogate"),
]


@pytest.mark.parametrize(("name", "fragment"), SPLIT_REJECT)
def test_split_reject(name: str, fragment: str) -> None:
    with pytest.raises(PathError) as info:
        split_relative(name)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [None, b"a/b", 3, ["a"]])
def test_split_rejects_non_str(value: object) -> None:
    with pytest.raises(PathError, match="must be a str"):
        split_relative(value)  # type: ignore[arg-type]


def test_path_limit_is_inclusive() -> None:
    name = "/".join(["a" * 255] * 16)  # 4095 bytes
    name += "/b"  # 4097 bytes
    with pytest.raises(PathError, match="4096"):
        split_relative(name)
    assert len(split_relative(name[:-1])) == 16  # "…/" is 4096 bytes: accepted


@pytest.mark.parametrize("component", ["a", "...", ".a", "a.", "x" * 255, "sp ace", "é", "\udc80"])
def test_component_accept(component: str) -> None:
    assert validate_component(component) is component


@pytest.mark.parametrize(
    ("component", "fragment"),
    [
        ("", "must not be ''"),
        (".", "must not be '.'"),
        ("..", "must not be '..'"),
        ("a/b", "'/'"),
        ("/", "'/'"),
        ("a\0", "NUL"),
        ("x" * 256, "longer than 255 bytes"),
        ("€" * 86, "longer than 255 bytes"),  # 258 bytes
        ("\ud800", "lone surrogate"),
        (None, "must be a str"),
        (b"a", "must be a str"),
    ],
)
def test_component_reject(component: object, fragment: str) -> None:
    with pytest.raises(PathError) as info:
        validate_component(component)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_path_error_is_value_error() -> None:
    assert issubclass(PathError, ValueError)


# --- property tests --------------------------------------------------------------------

PATHY = st.text(alphabet=st.sampled_from(list("ab./\0é")) | st.characters(), max_size=40)


@given(st.text() | PATHY)
def test_fuzz_split(name: str) -> None:
    """split_relative returns valid components or raises PathError, nothing else."""
    try:
        parts = split_relative(name)
    except PathError:
        return
    for part in parts:
        assert validate_component(part) == part
    assert split_relative("/".join(parts)) == parts
    assert "/".join(parts) == "/".join(p for p in name.split("/") if p not in ("", "."))


@given(st.text() | PATHY)
def test_fuzz_component(component: str) -> None:
    try:
        assert validate_component(component) == component
    except PathError:
        return
    assert split_relative(component) == (component,)


COMPONENTS = st.text(
    alphabet=st.characters(exclude_characters="/\0", exclude_categories=("Cs",)),
    min_size=1,
    max_size=30,
).filter(lambda c: c not in (".", ".."))


@given(st.lists(COMPONENTS, max_size=10), st.lists(st.sampled_from(["/", "//", "/./"])))
def test_join_split_round_trip(parts: list[str], seps: list[str]) -> None:
    glue = iter(seps)
    name = "".join(part + next(glue, "/") for part in parts)
    assert split_relative(name) == tuple(parts)
