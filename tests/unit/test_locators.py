"""Tests for metac.codec.locators: kind dispatch, each kind's accept/reject table, fuzzing."""

from __future__ import annotations

import traceback

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metac.codec.locators import (
    LOCATOR_KINDS,
    LocalPath,
    Locator,
    LocatorError,
    NewLocal,
    RefLocator,
    TcpEndpoint,
    UnixEndpoint,
)
from metac.codec.refs import SturdyRef

SECRET = "yMnKy8zNzs_Q0dLT1NXW19jZ2tvc3d7f4OHi4-Tl5uc"
REF = SturdyRef("::1", None, "fs", SECRET)


def assert_no_leak(text: str, secret: str = SECRET, window: int = 5) -> None:
    for start in range(len(secret) - window + 1):
        assert secret[start : start + window] not in text, (start, text)


ACCEPT = [
    # text, value, canonical text
    ("local:/srv/data", LocalPath("/srv/data"), "local:/srv/data"),
    ("local:/", LocalPath("/"), "local:/"),
    ("local://srv//data/", LocalPath("/srv/data"), "local:/srv/data"),
    ("local:///srv", LocalPath("/srv"), "local:/srv"),
    ("local:/a/./b/../c", LocalPath("/a/c"), "local:/a/c"),
    ("local:/..", LocalPath("/"), "local:/"),
    ("LOCAL:/x", LocalPath("/x"), "local:/x"),
    (
        "local:/with space/ünï:colon",
        LocalPath("/with space/ünï:colon"),
        "local:/with space/ünï:colon",
    ),
    ("newlocal:eth0", NewLocal("eth0"), "newlocal:eth0"),
    ("newlocal:remote0", NewLocal("remote0"), "newlocal:remote0"),
    ("NewLocal:br0", NewLocal("br0"), "newlocal:br0"),
    ("newlocal:a", NewLocal("a"), "newlocal:a"),
    ("newlocal:" + "x" * 15, NewLocal("x" * 15), "newlocal:" + "x" * 15),
    ("newlocal:veth-1.2_x@~", NewLocal("veth-1.2_x@~"), "newlocal:veth-1.2_x@~"),
    ("newlocal:...", NewLocal("..."), "newlocal:..."),
    (f"ref://[::1]/fs/{SECRET}", RefLocator(REF), f"ref://[::1]/fs/{SECRET}"),
    (f"ref:[::1]/fs/{SECRET}", RefLocator(REF), f"ref://[::1]/fs/{SECRET}"),
    (f"REF://[::1]:901/fs/{SECRET}", RefLocator(REF), f"ref://[::1]/fs/{SECRET}"),
    (
        f"ref:10.0.0.1:902/net/{SECRET}",
        RefLocator(SturdyRef("10.0.0.1", 902, "net", SECRET)),
        f"ref://10.0.0.1:902/net/{SECRET}",
    ),
    ("tcp:[::1]:901", TcpEndpoint("::1", 901), "tcp:[::1]:901"),
    ("tcp:[FDCA:0::0001]:80", TcpEndpoint("fdca::1", 80), "tcp:[fdca::1]:80"),
    ("tcp:127.0.0.1:80", TcpEndpoint("127.0.0.1", 80), "tcp:127.0.0.1:80"),
    ("tcp:localhost:901", TcpEndpoint("localhost", 901), "tcp:localhost:901"),
    (
        "TCP:Node-1.Example.COM:65535",
        TcpEndpoint("node-1.example.com", 65535),
        "tcp:node-1.example.com:65535",
    ),
    ("tcp:a:1", TcpEndpoint("a", 1), "tcp:a:1"),
    ("tcp:1.2.3.example:5", TcpEndpoint("1.2.3.example", 5), "tcp:1.2.3.example:5"),
    ("tcp:" + "a" * 63 + ".b:5", TcpEndpoint("a" * 63 + ".b", 5), "tcp:" + "a" * 63 + ".b:5"),
    ("unix:/run/metac/socket", UnixEndpoint("/run/metac/socket"), "unix:/run/metac/socket"),
    ("unix://run//x/", UnixEndpoint("/run/x"), "unix:/run/x"),
    ("unix:/" + "x" * 106, UnixEndpoint("/" + "x" * 106), "unix:/" + "x" * 106),
]


@pytest.mark.parametrize(("text", "value", "canonical"), ACCEPT)
def test_accept(text: str, value: Locator, canonical: str) -> None:
    parsed = Locator.parse(text)
    assert parsed == value
    assert type(parsed) is type(value)
    assert parsed.format() == canonical
    assert Locator.parse(canonical) == parsed
    assert type(parsed).parse(text) == parsed
    assert Locator.parse(text, allowed=(value.KIND,)) == parsed


REJECT = [
    # text, fragment of the message
    ("", "no KIND: prefix"),
    ("/srv/data", "no KIND: prefix"),
    ("foo:bar", "unknown resource kind 'foo'"),
    ("x" * 30 + ":bar", "unknown resource kind;"),
    ("ümlaut:x", "unknown resource kind;"),
    (":x", "unknown resource kind;"),
    ("netns:foo", "unknown resource kind 'netns'"),
    ("local:", "must be absolute"),
    ("local:rel/path", "must be absolute"),
    ("local: /x", "must be absolute"),
    ("local:/a\0b", "NUL"),
    ("local:/" + "x" * 256, "local path: path component is longer than 255 bytes"),
    ("local:/" + "a/" * 2100, "longer than 4096 bytes"),
    ("local:/\ud800", "lone surrogate"),
    ("newlocal:", "1..15 characters"),
    ("newlocal:" + "x" * 16, "1..15 characters"),
    ("newlocal:a/b", "without whitespace, '/' or ':'"),
    ("newlocal:a:b", "without whitespace, '/' or ':'"),
    ("newlocal:a b", "without whitespace"),
    ("newlocal:a\tb", "without whitespace"),
    ("newlocal:é", "printable ASCII"),
    ("newlocal:a\0", "printable ASCII"),
    ("newlocal:.", "'.' or '..'"),
    ("newlocal:..", "'.' or '..'"),
    ("ref:x", "no /service/secret"),
    (f"ref://example.com/fs/{SECRET}", "not a hostname"),
    (f"ref://[::1]/fs/{SECRET}/", "missing or extra '/'"),
    ("tcp:", "no port"),
    ("tcp:localhost", "no port"),
    ("tcp:localhost:", "port must be a number"),
    ("tcp:localhost:x", "port must be a number"),
    ("tcp:localhost:080", "without leading zeros"),
    ("tcp:localhost:0", "port must be a number"),
    ("tcp:localhost:65536", "1..65535"),
    ("tcp:localhost:123456", "port must be a number"),
    ("tcp::80", "IP address or a DNS hostname"),
    ("tcp:::1:80", "must be in brackets"),
    ("tcp:[::1]", "expected tcp:[IPV6]:PORT"),
    ("tcp:[::1", "expected tcp:[IPV6]:PORT"),
    ("tcp:[::1]80", "expected tcp:[IPV6]:PORT"),
    ("tcp:[1.2.3.4]:80", "brackets must hold an IPv6 address"),
    ("tcp:[localhost]:80", "brackets must hold an IPv6 address"),
    ("tcp:[]:80", "brackets must hold an IPv6 address"),
    ("tcp:[fe80::1%eth0]:80", "zone ids"),
    ("tcp:[::g]:80", "not a valid IPv6 address"),
    ("tcp:[::1]:0", "port must be a number"),
    ("tcp:-bad:80", "DNS hostname"),
    ("tcp:bad-:80", "DNS hostname"),
    ("tcp:a..b:80", "DNS hostname"),
    ("tcp:a.:80", "DNS hostname"),
    ("tcp:.a:80", "DNS hostname"),
    ("tcp:1.2.3:80", "DNS hostname"),
    ("tcp:256.1.1.1:80", "DNS hostname"),
    ("tcp:01.2.3.4:80", "DNS hostname"),
    ("tcp:under_score:80", "DNS hostname"),
    ("tcp:ünï:80", "DNS hostname"),
    ("tcp:" + "a" * 64 + ":80", "DNS hostname"),
    ("tcp:" + ".".join(["a" * 63] * 4) + ":80", "DNS hostname"),  # 255 characters
    ("unix:", "must be absolute"),
    ("unix:run/x", "must be absolute"),
    ("unix:/x\0", "NUL"),
    ("unix:/" + "x" * 107, "longer than 107 bytes"),
    ("unix:/" + "é" * 54, "longer than 107 bytes"),
]


@pytest.mark.parametrize(("text", "fragment"), REJECT)
def test_reject(text: str, fragment: str) -> None:
    with pytest.raises(LocatorError) as info:
        Locator.parse(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "allowed", "fragment"),
    [
        (
            f"ref://[::1]/fs/{SECRET}",
            ("local",),
            "a ref: resource is not allowed here; expected local:/PATH",
        ),
        ("tcp:a:1", ("local", "ref"), "expected local:/PATH or ref://[NODE]/SERVICE/SECRET"),
        ("tcp:a:1", ["ref", "local"], "expected local:/PATH or ref://[NODE]/SERVICE/SECRET"),
        ("local:/x", "newlocal", "a local: resource is not allowed here; expected newlocal:NAME"),
        (
            "foo:bar",
            ("unix", "tcp"),
            "unknown resource kind 'foo'; expected tcp:HOST:PORT or unix:/PATH",
        ),
        ("/x", ("local",), "no KIND: prefix; expected local:/PATH"),
    ],
)
def test_allowed(text: str, allowed: tuple[str, ...] | str, fragment: str) -> None:
    with pytest.raises(LocatorError) as info:
        Locator.parse(text, allowed=allowed)
    assert fragment in str(info.value)
    assert_no_leak(str(info.value))


def test_allowed_single_string() -> None:
    assert Locator.parse("local:/x", allowed="local") == LocalPath("/x")


def test_default_allows_every_kind() -> None:
    for key, cls in LOCATOR_KINDS.items():
        assert cls.KIND == key
        assert cls.SYNTAX.startswith(key + ":")
    with pytest.raises(LocatorError) as info:
        Locator.parse("nope:x")
    assert all(cls.SYNTAX in str(info.value) for cls in LOCATOR_KINDS.values())


@pytest.mark.parametrize("allowed", [(), ["bogus"], ("local", "Local")])
def test_allowed_must_name_known_kinds(allowed: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="allowed must name known locator kinds") as info:
        Locator.parse("local:/x", allowed=allowed)
    assert type(info.value) is ValueError


def test_subclass_parse_accepts_only_its_kind() -> None:
    assert LocalPath.parse("local:/x") == LocalPath("/x")
    assert RefLocator.parse(f"ref:[::1]/fs/{SECRET}").ref == REF
    with pytest.raises(
        LocatorError, match="a tcp: resource is not allowed here; expected local:/PATH"
    ):
        LocalPath.parse("tcp:a:1")
    with pytest.raises(TypeError, match="only accepted by Locator.parse"):
        LocalPath.parse("local:/x", allowed=("local",))


def test_kinds_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        LOCATOR_KINDS["evil"] = LocalPath  # type: ignore[index]


@pytest.mark.parametrize("value", [None, 7, b"local:/x", ["local:/x"]])
def test_parse_rejects_non_str(value: object) -> None:
    with pytest.raises(LocatorError, match="resource must be a str"):
        Locator.parse(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: LocalPath(3), "local path must be a str"),
        (lambda: LocalPath("rel"), "must be absolute"),
        (lambda: NewLocal(None), "device name must be a str"),
        (lambda: RefLocator(f"ref://[::1]/fs/{SECRET}"), "ref must be a SturdyRef, not str"),
        (lambda: TcpEndpoint(None, 80), "tcp host must be a str"),
        (lambda: TcpEndpoint("::1", True), "tcp port must be an int"),
        (lambda: TcpEndpoint("::1", "80"), "tcp port must be an int"),
        (lambda: TcpEndpoint("::1", 0), "1..65535"),
        (lambda: TcpEndpoint("[::1]", 80), "not a valid IPv6 address"),
        (lambda: UnixEndpoint(b"/x"), "unix socket path must be a str"),
    ],
)
def test_constructor_rejects(build: object, fragment: str) -> None:
    with pytest.raises(LocatorError) as info:
        build()  # type: ignore[operator]
    assert fragment in str(info.value)
    assert SECRET not in str(info.value)


def test_constructors_normalise() -> None:
    assert LocalPath("//a/b/../c/").path == "/a/c"
    assert TcpEndpoint("0:0::1", 80).host == "::1"
    assert TcpEndpoint("LOCALHOST", 80) == TcpEndpoint("localhost", 80)
    assert UnixEndpoint("/run//x/.").path == "/run/x"


def test_local_path_parts() -> None:
    assert LocalPath("/srv/data").parts == ("srv", "data")
    assert LocalPath("/").parts == ()


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        LocalPath("/x").path = "/y"  # type: ignore[misc]


def test_base_class_is_abstract() -> None:
    with pytest.raises(NotImplementedError):
        Locator().format()
    with pytest.raises(NotImplementedError):
        Locator._from_value("x")


def test_ref_locator_redacts() -> None:
    locator = Locator.parse(f"ref://[::1]/fs/{SECRET}")
    assert isinstance(locator, RefLocator)
    for text in (repr(locator), str(locator), repr([locator]), f"{locator}"):
        assert SECRET not in text
        assert_no_leak(text.replace(SECRET[:4], ""))
        assert "ref://[::1]/fs/" in text
    assert locator.format() == f"ref://[::1]/fs/{SECRET}"


@pytest.mark.parametrize(
    "text",
    [
        SECRET,
        SECRET + ":x",
        "local:" + SECRET,
        "newlocal:" + SECRET,
        "tcp:" + SECRET,
        "tcp:" + SECRET + ":80",
        "tcp:[" + SECRET + "]:80",
        "unix:" + SECRET,
        "ref:" + SECRET,
        "ref://" + SECRET + "/fs/" + SECRET,
        f"ref://[::1]/fs/{SECRET}/",
        f"ref://[::1]/fs/{SECRET} ",
        f"ref://[::1]/{SECRET}/{SECRET}",
    ],
)
def test_errors_never_show_a_secret(text: str) -> None:
    with pytest.raises(LocatorError) as info:
        Locator.parse(text)
    assert_no_leak(str(info.value))
    assert_no_leak("".join(traceback.format_exception(info.value)))


# --- property tests --------------------------------------------------------------------

KINDS = sorted(LOCATOR_KINDS)
PREFIXES = st.sampled_from([*(k + ":" for k in KINDS), "ref://", "tcp:[", "LOCAL:/", ""])
NOISE = st.text(alphabet=st.sampled_from(list("/:[].0123456789abcxyzAZ_-% \0é")) | st.characters())


def check_parse_total(text: str, allowed: frozenset[str] | None = None) -> None:
    """Locator.parse returns a Locator of an allowed kind or raises LocatorError."""
    try:
        locator = Locator.parse(text, allowed=allowed)
    except LocatorError:
        return
    assert isinstance(locator, Locator)
    assert allowed is None or locator.KIND in allowed
    canonical = locator.format()
    assert Locator.parse(canonical) == locator
    assert Locator.parse(canonical).format() == canonical


@given(st.text())
def test_fuzz_any_text(text: str) -> None:
    check_parse_total(text)


@given(PREFIXES, NOISE)
def test_fuzz_prefixed(prefix: str, rest: str) -> None:
    check_parse_total(prefix + rest)


@given(PREFIXES, NOISE, st.frozensets(st.sampled_from(KINDS), min_size=1))
def test_fuzz_allowed(prefix: str, rest: str, allowed: frozenset[str]) -> None:
    check_parse_total(prefix + rest, allowed)


COMPONENTS = st.text(
    alphabet=st.characters(exclude_characters="/\0", exclude_categories=("Cs",)),
    min_size=1,
    max_size=20,
).filter(lambda c: c not in (".", ".."))
LABELS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
HOSTNAMES = st.lists(LABELS, min_size=1, max_size=4).filter(lambda ls: not ls[-1].isdigit())
SECRETS = st.binary(min_size=16, max_size=64)
UNIX_COMPONENTS = st.from_regex(r"[a-z0-9._-]{1,10}", fullmatch=True).filter(
    lambda c: c not in (".", "..")
)


@st.composite
def locators(draw: st.DrawFn) -> Locator:
    kind = draw(st.sampled_from(KINDS))
    if kind == "local":
        return LocalPath("/" + "/".join(draw(st.lists(COMPONENTS, max_size=6))))
    if kind == "newlocal":
        name = draw(st.from_regex(r"[!-.0-9;-~]{1,15}", fullmatch=True))
        return NewLocal(name if name not in (".", "..") else "x")
    if kind == "ref":
        service = draw(st.from_regex(r"[a-z][a-z0-9_-]{0,31}", fullmatch=True))
        port = draw(st.none() | st.integers(1, 65535))
        return RefLocator(
            SturdyRef.from_parts(draw(st.ip_addresses()), port, service, draw(SECRETS))
        )
    if kind == "tcp":
        host = draw(st.ip_addresses().map(str) | HOSTNAMES.map(".".join))
        return TcpEndpoint(host, draw(st.integers(1, 65535)))
    return UnixEndpoint("/" + "/".join(draw(st.lists(UNIX_COMPONENTS, max_size=5))))


@given(locators())
def test_round_trip(locator: Locator) -> None:
    text = locator.format()
    assert Locator.parse(text) == locator
    assert Locator.parse(text, allowed=(locator.KIND,)) == locator
    assert type(locator).parse(text) == locator
    if isinstance(locator, RefLocator):
        assert locator.ref.secret not in repr(locator)
