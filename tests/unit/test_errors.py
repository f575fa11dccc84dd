"""Tests for metac.errors: the vocabulary and ``from_kj`` (client side of the error boundary)."""

from __future__ import annotations

import capnp
import pytest

from metac import errors

KjType = capnp.KjException.Type


def kj(text: str, kind: object = KjType.FAILED) -> capnp.KjException:
    return capnp.KjException(message=text, type=kind)


class FakeKj(Exception):
    """Something shaped like a KjException (type + description), as other callers may pass."""

    def __init__(self, description: str, type: str = "FAILED") -> None:  # noqa: A002
        super().__init__(description)
        self.description = description
        self.type = type


# --- the vocabulary --------------------------------------------------------------------


def test_wire_form_is_category_colon_message() -> None:
    assert errors.NotFound("no such service 'x'").wire() == "NotFound: no such service 'x'"
    assert errors.Internal("incident 1").wire() == "Internal: incident 1"


def test_empty_message_falls_back_to_category() -> None:
    assert str(errors.Unavailable()) == "Unavailable"
    assert errors.Unavailable().wire() == "Unavailable: Unavailable"


def test_categories_have_distinct_exit_codes() -> None:
    classes = list(errors.CATEGORIES.values())
    assert errors.MissingDependency in classes
    codes = [cls.exit_code for cls in classes]
    assert len(set(codes)) == len(codes)
    assert all(code not in (0, 1) for code in codes)
    for name, cls in errors.CATEGORIES.items():
        assert cls.category == name
        assert issubclass(cls, errors.MetacError)


def test_missing_dependency_names_program_and_package() -> None:
    err = errors.MissingDependency("diod", "diod")
    assert err.program == "diod" and err.package == "diod"
    assert str(err) == "diod not found; install the Debian package 'diod'"
    assert err.wire().startswith("MissingDependency: diod not found")


# --- from_kj: category prefixes, with and without pycapnp's wrapping --------------------

WRAPPED = [
    # what arrives (description), expected class, expected message
    ("NotFound: no such service 'x'", errors.NotFound, "no such service 'x'"),
    ("message = NotFound: no such service 'x'\n", errors.NotFound, "no such service 'x'"),
    ("remote exception: message = NotFound: gone\n", errors.NotFound, "gone"),
    # one more "remote exception: " for every proxying hop
    (
        "remote exception: remote exception: message = PermissionDenied: admin only\n",
        errors.PermissionDenied,
        "admin only",
    ),
    (
        "remote exception: message = remote exception: message = Unavailable: try later",
        errors.Unavailable,
        "try later",
    ),
    ("remote exception: message = AlreadyExists: child 'x'", errors.AlreadyExists, "child 'x'"),
    ("remote exception: message = InvalidArgument: bad name", errors.InvalidArgument, "bad name"),
    ("remote exception: FailedPrecondition: not mounted", errors.FailedPrecondition, "not mounted"),
    ("remote exception: message = Unsupported: no 9p", errors.Unsupported, "no 9p"),
    ("remote exception: message = Internal: incident 0a1b2c3d\n", errors.Internal,
     "incident 0a1b2c3d"),
    # the message itself may contain ": " and the category names
    ("remote exception: message = NotFound: a: b: NotFound: c", errors.NotFound,
     "a: b: NotFound: c"),
]


@pytest.mark.parametrize(("text", "cls", "message"), WRAPPED)
def test_from_kj_parses_category(text: str, cls: type[errors.MetacError], message: str) -> None:
    err = errors.from_kj(kj(text))
    assert type(err) is cls
    assert str(err) == message


@pytest.mark.parametrize(("text", "cls", "message"), WRAPPED)
def test_from_kj_accepts_kj_shaped_objects(text: str, cls: type[errors.MetacError],
                                           message: str) -> None:
    err = errors.from_kj(FakeKj(text))
    assert type(err) is cls
    assert str(err) == message


def test_from_kj_category_beats_kj_type() -> None:
    # A server's own category wins over the transport's classification.
    err = errors.from_kj(kj("remote exception: message = NotFound: x", KjType.DISCONNECTED))
    assert type(err) is errors.NotFound


def test_from_kj_passes_metac_errors_through() -> None:
    original = errors.FailedPrecondition("busy")
    assert errors.from_kj(original) is original


def test_from_kj_unknown_category_is_internal_with_text() -> None:
    err = errors.from_kj(kj("remote exception: message = Bogus: whatever"))
    assert type(err) is errors.Internal
    assert "Bogus: whatever" in str(err)


# --- from_kj: transport errors -----------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        kj("Peer disconnected.", KjType.DISCONNECTED),
        kj("capnp/rpc.c++:3561: disconnected: RpcSystem was destroyed.", KjType.DISCONNECTED),
        FakeKj("Peer disconnected.", "DISCONNECTED"),
        # no type, but the text says so
        FakeKj("remote exception: connection disconnected", ""),
    ],
)
def test_from_kj_disconnected_is_unavailable(exc: BaseException) -> None:
    err = errors.from_kj(exc)
    assert type(err) is errors.Unavailable
    assert str(err).startswith("connection lost: ")
    assert "\n" not in str(err)


def test_from_kj_overloaded_is_unavailable() -> None:
    err = errors.from_kj(kj("too many calls in flight", KjType.OVERLOADED))
    assert type(err) is errors.Unavailable
    assert str(err) == "too many calls in flight"


def test_from_kj_unimplemented_is_unsupported() -> None:
    assert type(errors.from_kj(kj("method not implemented", KjType.UNIMPLEMENTED))) is \
        errors.Unsupported
    assert type(errors.from_kj(FakeKj("remote exception: Method not implemented"))) is \
        errors.Unsupported


def test_from_kj_other_is_internal_first_line_only() -> None:
    err = errors.from_kj(kj("something broke\nstack: 7f00 7f01\nmore"))
    assert type(err) is errors.Internal
    assert str(err) == "something broke"


def test_from_kj_long_and_empty_texts() -> None:
    assert len(str(errors.from_kj(kj("x" * 5000)))) <= 300
    assert str(errors.from_kj(FakeKj(""))) == "unknown error"
    assert str(errors.from_kj(FakeKj("   \n  "))) == "unknown error"


def test_from_kj_plain_exception() -> None:
    err = errors.from_kj(RuntimeError("boom"))
    assert type(err) is errors.Internal
    assert str(err) == "boom"


def test_from_kj_missing_dependency_round_trip() -> None:
    sent = errors.MissingDependency("qemu-system-x86_64", "qemu-system-x86")
    err = errors.from_kj(kj(f"remote exception: message = {sent.wire()}\n"))
    assert type(err) is errors.MissingDependency
    assert err.exit_code == sent.exit_code
    assert str(err) == str(sent)
