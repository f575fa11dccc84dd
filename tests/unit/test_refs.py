"""Tests for metac.codec.refs: accept/reject tables, round trips, redaction, fuzzing."""

from __future__ import annotations

import base64
import ipaddress
import traceback

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from metac.codec.refs import (
    DEFAULT_PORT,
    MAX_REF_LENGTH,
    RefError,
    SturdyRef,
    redact_secrets,
    secrets_in,
)

# 32 bytes; chosen so that no 5-character piece of it appears in any error message.
SECRET = "yMnKy8zNzs_Q0dLT1NXW19jZ2tvc3d7f4OHi4-Tl5uc"
SECRET16 = "AAECAwQFBgcICQoLDA0ODw"  # 16 bytes, the shortest secret
SECRET96 = base64.urlsafe_b64encode(bytes(range(96))).rstrip(b"=").decode()  # 128 chars


def assert_no_leak(text: str, secret: str = SECRET, window: int = 5) -> None:
    """No ``window``-character piece of the secret appears in text."""
    for start in range(len(secret) - window + 1):
        assert secret[start : start + window] not in text, (start, text)


def assert_error_hides(exc: BaseException, secret: str = SECRET, window: int = 5) -> None:
    """One-line message; neither it nor the printed traceback (chained exceptions
    included) shows any ``window``-character piece of the secret."""
    assert "\n" not in str(exc)
    assert_no_leak(str(exc), secret, window)
    assert_no_leak("".join(traceback.format_exception(exc)), secret, window)


# --- accepted forms --------------------------------------------------------------------

ACCEPT = [
    # text, (node, port, service), canonical text
    (f"ref://[::1]/fs/{SECRET}", ("::1", None, "fs"), f"ref://[::1]/fs/{SECRET}"),
    (f"ref://[::1]:902/fs/{SECRET}", ("::1", 902, "fs"), f"ref://[::1]:902/fs/{SECRET}"),
    (f"ref://[::1]:901/fs/{SECRET}", ("::1", None, "fs"), f"ref://[::1]/fs/{SECRET}"),
    (f"ref://10.0.0.1/fs/{SECRET}", ("10.0.0.1", None, "fs"), f"ref://10.0.0.1/fs/{SECRET}"),
    (
        f"ref://10.0.0.1:65535/net/{SECRET}",
        ("10.0.0.1", 65535, "net"),
        f"ref://10.0.0.1:65535/net/{SECRET}",
    ),
    (f"ref://10.0.0.1:1/fs/{SECRET}", ("10.0.0.1", 1, "fs"), f"ref://10.0.0.1:1/fs/{SECRET}"),
    (f"ref://[10.0.0.1]/fs/{SECRET}", ("10.0.0.1", None, "fs"), f"ref://10.0.0.1/fs/{SECRET}"),
    (
        f"ref://[10.0.0.1]:7/fs/{SECRET}",
        ("10.0.0.1", 7, "fs"),
        f"ref://10.0.0.1:7/fs/{SECRET}",
    ),
    (
        f"ref:[fdca:ddf9:5703::1]/persistence/{SECRET}",
        ("fdca:ddf9:5703::1", None, "persistence"),
        f"ref://[fdca:ddf9:5703::1]/persistence/{SECRET}",
    ),
    (f"ref:10.0.0.1:902/fs/{SECRET}", ("10.0.0.1", 902, "fs"), f"ref://10.0.0.1:902/fs/{SECRET}"),
    (f"REF://[::1]/fs/{SECRET}", ("::1", None, "fs"), f"ref://[::1]/fs/{SECRET}"),
    (f"Ref:[::1]/fs/{SECRET}", ("::1", None, "fs"), f"ref://[::1]/fs/{SECRET}"),
    (
        f"ref://[FDCA:DDF9:5703:0:0:0:0:1]/fs/{SECRET}",
        ("fdca:ddf9:5703::1", None, "fs"),
        f"ref://[fdca:ddf9:5703::1]/fs/{SECRET}",
    ),
    (
        f"ref://[::ffff:1.2.3.4]/fs/{SECRET}",
        (str(ipaddress.IPv6Address("::ffff:1.2.3.4")), None, "fs"),
        f"ref://[{ipaddress.IPv6Address('::ffff:1.2.3.4')}]/fs/{SECRET}",
    ),
    (f"ref://[::1]/a/{SECRET}", ("::1", None, "a"), f"ref://[::1]/a/{SECRET}"),
    (f"ref://[::1]/a-b_c9/{SECRET}", ("::1", None, "a-b_c9"), f"ref://[::1]/a-b_c9/{SECRET}"),
    (
        f"ref://[::1]/{'s' * 32}/{SECRET}",
        ("::1", None, "s" * 32),
        f"ref://[::1]/{'s' * 32}/{SECRET}",
    ),
]


@pytest.mark.parametrize(("text", "fields", "canonical"), ACCEPT)
def test_accept(text: str, fields: tuple[str, int | None, str], canonical: str) -> None:
    ref = SturdyRef.parse(text)
    assert (ref.node, ref.port, ref.service, ref.secret) == (*fields, SECRET)
    assert ref.format() == canonical
    assert SturdyRef.parse(ref.format()) == ref
    assert SturdyRef.parse(canonical.replace("ref://", "ref:", 1)) == ref


@pytest.mark.parametrize(("secret", "size"), [(SECRET16, 16), (SECRET, 32), (SECRET96, 96)])
def test_secret_lengths(secret: str, size: int) -> None:
    ref = SturdyRef.parse(f"ref://[::1]/fs/{secret}")
    assert ref.secret_bytes == base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    assert len(ref.secret_bytes) == size
    assert SturdyRef.from_parts("::1", None, "fs", ref.secret_bytes) == ref


def test_longest_input_accepted() -> None:
    text = f"ref://[::1]/fs/{SECRET96}"
    assert len(text) <= MAX_REF_LENGTH
    assert SturdyRef.parse(text).secret == SECRET96


# --- rejected forms --------------------------------------------------------------------

REJECT = [
    # text, fragment of the message
    ("", "not a sturdy ref"),
    ("ref", "not a sturdy ref"),
    (SECRET, "not a sturdy ref"),
    (f"http://[::1]/fs/{SECRET}", "not a sturdy ref"),
    (f"ref//[::1]/fs/{SECRET}", "not a sturdy ref"),
    (f" ref://[::1]/fs/{SECRET}", "not a sturdy ref"),
    (f"réf://[::1]/fs/{SECRET}", "not a sturdy ref"),
    (f"ref://[::1]/fs/{SECRET} ", "whitespace"),
    (f"ref://[::1]/fs/{SECRET}\n", "whitespace"),
    (f"ref://[::1]/fs/\t{SECRET}", "whitespace"),
    (f"ref://[::1]/fs/{SECRET}?x=1", "query or fragment"),
    (f"ref://[::1]/fs/{SECRET}#top", "query or fragment"),
    (f"ref://[fe80::1%25eth0]/fs/{SECRET}", "'%'"),
    (f"ref://[::1]/fs/{SECRET}=", "invalid character '='"),
    (f"ref://[::1]/fs/{SECRET[:20]}+{SECRET[21:]}", "invalid character '+'"),
    (f"ref://[::1]/fs/{SECRET[:20]}\u0661{SECRET[21:]}", "invalid character"),
    ("ref://", "no node address"),
    (f"ref:///fs/{SECRET}", "no node address"),
    (f"ref:/[::1]/fs/{SECRET}", "no node address"),
    ("ref://[::1]", "no /service/secret"),
    (f"ref://[::1]/fs/{SECRET}/", "missing or extra '/'"),
    (f"ref://[::1]/fs/x/{SECRET}", "missing or extra '/'"),
    (f"ref://[::1]//fs/{SECRET}", "missing or extra '/'"),
    (f"ref://[::1]/{SECRET}", "missing or extra '/'"),
    ("ref://[::1]/fs/", "empty secret"),
    (f"ref://[::1]//{SECRET}", "empty service"),
    (f"ref://[::1/fs/{SECRET}", "'[' without ']'"),
    (f"ref://[]/fs/{SECRET}", "empty node address"),
    (f"ref://[]:902/fs/{SECRET}", "empty node address"),
    (f"ref://[::1]x/fs/{SECRET}", "after ']'"),
    (f"ref://[::1]]/fs/{SECRET}", "after ']'"),
    (f"ref://::1/fs/{SECRET}", "must be in brackets"),
    (f"ref://fdca:ddf9::1:902/fs/{SECRET}", "must be in brackets"),
    (f"ref://:902/fs/{SECRET}", "empty node address"),
    (f"ref://example.com/fs/{SECRET}", "not a hostname"),
    (f"ref://localhost/fs/{SECRET}", "not a hostname"),
    (f"ref://[localhost]/fs/{SECRET}", "not a hostname"),
    (f"ref://01.2.3.4/fs/{SECRET}", "not a hostname"),
    (f"ref://1.2.3/fs/{SECRET}", "not a hostname"),
    (f"ref://[[::1]]/fs/{SECRET}", "after ']'"),
    (f"ref://[[::1]/fs/{SECRET}", "not a hostname"),
    (f"ref://1.2.3.4]/fs/{SECRET}", "not a hostname"),
    (f"ref://1.2.3.4:0/fs/{SECRET}", "port"),
    (f"ref://1.2.3.4:0901/fs/{SECRET}", "leading zeros"),
    (f"ref://1.2.3.4:65536/fs/{SECRET}", "1..65535"),
    (f"ref://1.2.3.4:99999/fs/{SECRET}", "1..65535"),
    (f"ref://1.2.3.4:123456/fs/{SECRET}", "port"),
    (f"ref://1.2.3.4:/fs/{SECRET}", "port"),
    (f"ref://1.2.3.4:abc/fs/{SECRET}", "port"),
    (f"ref://[::1]:/fs/{SECRET}", "port"),
    (f"ref://[::1]:-1/fs/{SECRET}", "port"),
    (f"ref://[::1]/FS/{SECRET}", "service name"),
    (f"ref://[::1]/1fs/{SECRET}", "service name"),
    (f"ref://[::1]/-fs/{SECRET}", "service name"),
    (f"ref://[::1]/{'s' * 33}/{SECRET}", "service name"),
    (f"ref://[::1]/f.s/{SECRET}", "service name"),
    (f"ref://[::1]/fs/{SECRET16[:-1]}", "22..128"),
    (f"ref://[::1]/fs/{SECRET96}A", "22..128"),
    (f"ref://[::1]/fs/{SECRET}.", "22..128"),
    (f"ref://[::1]/fs/{SECRET16}AAA", "impossible base64 length"),
    (f"ref://[::1]/fs/{SECRET16[:-1]}B", "not canonical"),
    (f"ref://[::1]/fs/{SECRET[:-1]}d", "not canonical"),
    ("ref://[::1]/fs/" + "A" * MAX_REF_LENGTH, "longer than 1024"),
]


@pytest.mark.parametrize(("text", "fragment"), REJECT)
def test_reject(text: str, fragment: str) -> None:
    with pytest.raises(RefError) as info:
        SturdyRef.parse(text)
    assert fragment in str(info.value)
    assert_error_hides(info.value)


@pytest.mark.parametrize("value", [None, 42, b"ref://[::1]/fs/x", ["ref://"]])
def test_parse_rejects_non_str(value: object) -> None:
    with pytest.raises(RefError, match="must be a str"):
        SturdyRef.parse(value)  # type: ignore[arg-type]


def test_ref_error_is_value_error() -> None:
    assert issubclass(RefError, ValueError)


# --- construction ----------------------------------------------------------------------


def test_constructor_normalises() -> None:
    ref = SturdyRef(node="0:0::1", port=DEFAULT_PORT, service="fs", secret=SECRET)
    assert ref.node == "::1"
    assert ref.port is None
    assert ref == SturdyRef(node="::1", port=None, service="fs", secret=SECRET)
    assert hash(ref) == hash(SturdyRef("::1", None, "fs", SECRET))


def test_frozen() -> None:
    ref = SturdyRef("::1", None, "fs", SECRET)
    with pytest.raises(AttributeError):
        ref.secret = SECRET16  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"node": ipaddress.IPv6Address("::1")}, "node must be IP address text"),
        ({"node": "[::1]"}, "not a hostname"),
        ({"node": "fe80::1%eth0"}, "zone ids"),
        ({"node": "host.example"}, "not a hostname"),
        ({"port": True}, "port must be an int or None"),
        ({"port": "902"}, "port must be an int or None"),
        ({"port": 902.0}, "port must be an int or None"),
        ({"port": 0}, "1..65535"),
        ({"port": 65536}, "1..65535"),
        ({"port": -1}, "1..65535"),
        ({"service": 5}, "service must be a str"),
        ({"service": ""}, "service name"),
        ({"secret": SECRET.encode()}, "secret must be a str"),
        ({"secret": SECRET + "\n"}, "22..128"),
    ],
)
def test_constructor_rejects(kwargs: dict[str, object], fragment: str) -> None:
    fields: dict[str, object] = {"node": "::1", "port": None, "service": "fs", "secret": SECRET}
    fields.update(kwargs)
    with pytest.raises(RefError) as info:
        SturdyRef(**fields)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    assert_error_hides(info.value)


def test_from_parts() -> None:
    raw = bytes(range(200, 232))
    ref = SturdyRef.from_parts(ipaddress.IPv4Address("10.1.2.3"), 902, "fs", raw)
    assert ref == SturdyRef("10.1.2.3", 902, "fs", SECRET)
    assert ref.secret_bytes == raw
    assert SturdyRef.from_parts("10.1.2.3", 902, "fs", bytearray(raw)) == ref
    assert SturdyRef.from_parts("10.1.2.3", 902, "fs", memoryview(raw)) == ref
    assert SturdyRef.from_parts(ipaddress.IPv6Address("::1"), None, "fs", raw).node == "::1"


@pytest.mark.parametrize(
    ("secret_bytes", "fragment"),
    [
        (b"\x00" * 15, "16..96 bytes, not 15"),
        (b"\x00" * 97, "16..96 bytes, not 97"),
        (b"", "not 0"),
        (SECRET, "secret must be bytes, not str"),
        (None, "secret must be bytes, not NoneType"),
    ],
)
def test_from_parts_rejects(secret_bytes: object, fragment: str) -> None:
    with pytest.raises(RefError, match=fragment):
        SturdyRef.from_parts("::1", None, "fs", secret_bytes)  # type: ignore[arg-type]


# --- redaction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "shown"),
    [
        (SturdyRef("::1", None, "fs", SECRET), f"ref://[::1]/fs/{SECRET[:4]}…"),
        (SturdyRef("10.0.0.1", 902, "net", SECRET), f"ref://10.0.0.1:902/net/{SECRET[:4]}…"),
        (SturdyRef("fdca::1", 7, "fs", SECRET), f"ref://[fdca::1]:7/fs/{SECRET[:4]}…"),
    ],
)
def test_redaction(ref: SturdyRef, shown: str) -> None:
    assert ref.redacted() == shown
    assert str(ref) == shown
    assert f"{ref}" == shown
    assert repr(ref) == f"<SturdyRef {shown}>"
    for text in (repr(ref), str(ref), f"{ref!r}", repr([ref]), repr({"r": ref})):
        assert SECRET not in text
        assert_no_leak(text.replace(SECRET[:4], ""))
    assert SECRET in ref.format()


# --- property tests --------------------------------------------------------------------

SERVICES = st.from_regex(r"[a-z][a-z0-9_-]{0,31}", fullmatch=True)
PORTS = st.none() | st.integers(min_value=1, max_value=65535)


@st.composite
def valid_refs(draw: st.DrawFn) -> SturdyRef:
    return SturdyRef.from_parts(
        draw(st.ip_addresses()),
        draw(PORTS),
        draw(SERVICES),
        draw(st.binary(min_size=16, max_size=64)),
    )


NOISE = st.sampled_from(list("[]:/.%?#= \n\t0123456789aAzZ_-\x00é")) | st.characters()


@st.composite
def near_valid_texts(draw: st.DrawFn) -> tuple[str, str]:
    """A valid ref's text, in any accepted form, with a few random edits; and its secret."""
    ref = draw(valid_refs())
    prefix = draw(st.sampled_from(["ref://", "ref:", "REF://", "Ref:"]))
    text = prefix + ref.format().removeprefix("ref://")
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        pos = draw(st.integers(min_value=0, max_value=len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate", "truncate"]))
        if op == "insert":
            text = text[:pos] + draw(NOISE) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + 1 :]
        elif op == "replace":
            text = text[:pos] + draw(NOISE) + text[pos + 1 :]
        elif op == "duplicate":
            end = draw(st.integers(min_value=pos, max_value=len(text)))
            text = text[:end] + text[pos:end] + text[end:]
        else:
            text = text[:pos]
    return text, ref.secret


def check_parse_total(text: object, secret: str | None = None) -> None:
    """``parse`` returns a SturdyRef or raises RefError; errors never show the secret."""
    try:
        ref = SturdyRef.parse(text)  # type: ignore[arg-type]
    except RefError as exc:
        if secret is not None:
            # A wider window than for SECRET: random secrets must not collide with source text.
            assert_error_hides(exc, secret, window=12)
        return
    assert isinstance(ref, SturdyRef)
    assert SturdyRef.parse(ref.format()) == ref
    assert ref.secret not in repr(ref)


@given(st.text())
@example("ref://[::1]/fs/" + SECRET)
def test_fuzz_any_text(text: str) -> None:
    check_parse_total(text)


@given(st.text(alphabet=st.sampled_from(list("ref:/[]0123456789abcdef.AZ_-%"))))
def test_fuzz_ref_alphabet(text: str) -> None:
    check_parse_total("ref://" + text)


@given(near_valid_texts())
def test_fuzz_near_valid(case: tuple[str, str]) -> None:
    text, secret = case
    check_parse_total(text, secret)


@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text())))
def test_fuzz_non_str(value: object) -> None:
    with pytest.raises(RefError):
        SturdyRef.parse(value)  # type: ignore[arg-type]


@given(valid_refs())
def test_round_trip(ref: SturdyRef) -> None:
    text = ref.format()
    assert SturdyRef.parse(text) == ref
    assert SturdyRef.parse(text).format() == text
    assert SturdyRef.parse("ref:" + text.removeprefix("ref://")) == ref
    assert SturdyRef.from_parts(ref.node, ref.port, ref.service, ref.secret_bytes) == ref
    assert ref.secret not in repr(ref)
    assert ref.secret not in str(ref)
    assert ref.port != DEFAULT_PORT


@given(st.ip_addresses(), PORTS, SERVICES, st.binary(min_size=16, max_size=96))
def test_from_parts_round_trip(
    node: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int | None,
    service: str,
    raw: bytes,
) -> None:
    ref = SturdyRef.from_parts(node, port, service, raw)
    assert ref.secret_bytes == raw
    assert ipaddress.ip_address(ref.node) == node
    assert ref.port == (None if port == DEFAULT_PORT else port)
    assert SturdyRef.parse(ref.format()) == ref


# --- redact_secrets: the one redaction of text that leaves a program ------------------------

_SECRETS = st.binary(min_size=16, max_size=96).map(
    lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode())
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@given(secret=_SECRETS, before=_TEXT, after=_TEXT, v6=st.booleans(), port=st.booleans(),
       mangle=st.sampled_from(["", "repr", "realpath", "upper"]))
@example(secret="A" * 22, before="", after="", v6=False, port=False, mangle="")
def test_redact_secrets_removes_every_secret_in_text(secret, before, after, v6, port,
                                                     mangle) -> None:
    ref = SturdyRef.from_parts("2001:db8::1" if v6 else "192.0.2.7", 7000 if port else None,
                               "fs", base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))
    text = ref.format()
    if mangle == "repr":
        text = repr(text)
    elif mangle == "realpath":  # what os.path.realpath makes of a ref typed as a path
        text = "/root/" + text.replace("://", ":/")
    elif mangle == "upper":
        text = "REF" + text[3:]
    out = redact_secrets(before + text + after)
    assert out.count(ref.secret[:4] + "…") >= 1
    if ref.secret[4:] not in before + after:
        assert ref.secret[4:] not in out
    assert redact_secrets(out) == out  # idempotent


def test_redact_secrets_keeps_other_text_and_short_tails() -> None:
    assert redact_secrets("no ref here: ref:// or ref:x/y") == "no ref here: ref:// or ref:x/y"
    assert redact_secrets("ref://10.0.0.1/fs/abcd") == "ref://10.0.0.1/fs/abcd"
    msg = "InvalidArgument: ref://10.0.0.1/fs/" + "B" * 30 + ": not a directory"
    assert redact_secrets(msg) == "InvalidArgument: ref://10.0.0.1/fs/BBBB…: not a directory"


def test_redact_secrets_known_secrets_anywhere() -> None:
    ref = "ref://10.0.0.1/fs/" + "C" * 30
    assert secrets_in(["x", ref]) == ("C" * 30,)
    assert redact_secrets("file " + "C" * 30 + " gone", secrets_in([ref])) == "file CCCC… gone"
