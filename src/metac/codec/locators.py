"""CLI resource specifiers ("locators"), parsed once at the edge into frozen values.

A locator is ``KIND:VALUE``. ``Locator.parse`` looks the kind up in ``LOCATOR_KINDS``
(one literal table, case-insensitive kind) and lets that class parse the value; each
class validates and normalises its fields in ``__post_init__`` and gives back canonical
text with ``format()``. Code past the CLI takes these values, never raw strings.

==========  ====================  ============================================================
kind        class                 value
==========  ====================  ============================================================
local       ``LocalPath``         absolute path; ``posixpath.normpath``-ed (so ``..`` is
                                  resolved lexically), no NUL, components <= 255 bytes
newlocal    ``NewLocal``          new network device name: 1..15 printable ASCII characters,
                                  no whitespace, ``/`` or ``:``, not ``.`` or ``..``
ref         ``RefLocator``        a sturdy ref, ``ref://…`` or ``ref:…`` (see ``refs``)
tcp         ``TcpEndpoint``       ``HOST:PORT``; HOST is ``[IPv6]``, IPv4 or a DNS hostname
unix        ``UnixEndpoint``      absolute socket path, normalised, at most 107 bytes
==========  ====================  ============================================================

Some kinds have another reading of a prefix that a caller opts into by naming it in
``allowed`` (``ALTERNATIVE_KINDS``). They are not in ``LOCATOR_KINDS``, so by default
``local:`` stays a path:

==========  ====================  ============================================================
kind        class                 value
==========  ====================  ============================================================
localdev    ``LocalDevice``       ``local:NAME``, an existing network device (paper 8.2's
                                  ``local:devname``); same name rules as ``newlocal``
==========  ====================  ============================================================

``LocatorError`` is the only error for bad text; its messages name the problem and the
accepted syntax but never quote the value (it may be a secret pasted in the wrong place).
A ``RefLocator``'s ``repr`` redacts the secret, like ``SturdyRef``'s.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Self, cast

from metac.codec.paths import PathError, split_relative
from metac.codec.refs import RefError, SturdyRef, show_endpoint

MAX_IFNAME_CHARS = 15
MAX_UNIX_PATH_BYTES = 107
MAX_HOSTNAME_CHARS = 253

_KIND_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,11}")
_IFNAME_RE = re.compile(r"[!-.0-9;-~]+")  # printable ASCII minus space, '/' and ':'
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}")


class LocatorError(ValueError):
    """Text that is not an acceptable locator. The message never quotes the value."""


@dataclass(frozen=True, slots=True)
class Locator:
    """Base of all locator kinds. Subclasses set ``KIND`` and ``SYNTAX``."""

    KIND: ClassVar[str] = ""
    SYNTAX: ClassVar[str] = ""
    #: The text before ``:``; differs from KIND only for ALTERNATIVE_KINDS.
    PREFIX: ClassVar[str] = ""

    @classmethod
    def parse(cls, text: str, *, allowed: Iterable[str] | None = None) -> Self:
        """Parse ``KIND:VALUE``; raise ``LocatorError`` naming the accepted kinds.

        On ``Locator``, ``allowed`` limits the kinds accepted (default: all). On a
        subclass, only that subclass's kind is accepted: ``LocalPath.parse(text)``.
        """
        kinds = _accepted_kinds(cls, allowed)
        if not isinstance(text, str):
            raise LocatorError(f"resource must be a str, not {type(text).__name__}")
        kind, colon, body = text.partition(":")
        if not colon:
            raise LocatorError(f"resource has no KIND: prefix; expected {_expected(kinds)}")
        key = kind.lower() if kind.isascii() else kind
        locator_cls = LOCATOR_KINDS.get(key)
        if locator_cls is None:
            shown = f" {kind!r}" if _KIND_RE.fullmatch(kind) else ""
            raise LocatorError(f"unknown resource kind{shown}; expected {_expected(kinds)}")
        for alt in ALTERNATIVE_KINDS.values():
            if alt.PREFIX == key and alt.KIND in kinds:
                locator_cls = alt
                break
        else:
            if key not in kinds:
                raise LocatorError(
                    f"a {key}: resource is not allowed here; expected {_expected(kinds)}"
                )
        return cast(Self, locator_cls._from_value(body))

    @classmethod
    def _from_value(cls, value: str) -> Locator:
        """Build an instance from the text after ``KIND:``."""
        raise NotImplementedError

    def format(self) -> str:
        """Canonical text; ``parse(x.format()) == x``."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class LocalPath(Locator):
    """``local:/PATH``: a file or directory on this machine."""

    KIND: ClassVar[str] = "local"
    SYNTAX: ClassVar[str] = "local:/PATH"

    path: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _normalise_absolute(self.path, "local path"))

    @classmethod
    def _from_value(cls, value: str) -> Locator:
        return cls(value)

    @property
    def parts(self) -> tuple[str, ...]:
        """The path's components below ``/`` (``()`` for ``/`` itself)."""
        return split_relative(self.path[1:])

    def format(self) -> str:
        return f"local:{self.path}"


@dataclass(frozen=True, slots=True)
class _DeviceName(Locator):
    """A network device name after a prefix (shared by ``newlocal:`` and ``local:``)."""

    name: str

    def __post_init__(self) -> None:
        check_ifname(self.name)

    @classmethod
    def _from_value(cls, value: str) -> Locator:
        return cls(value)

    def format(self) -> str:
        return f"{self.PREFIX or self.KIND}:{self.name}"


@dataclass(frozen=True, slots=True)
class NewLocal(_DeviceName):
    """``newlocal:NAME``: a local network device that is to be created."""

    KIND: ClassVar[str] = "newlocal"
    SYNTAX: ClassVar[str] = "newlocal:NAME"


@dataclass(frozen=True, slots=True)
class LocalDevice(_DeviceName):
    """``local:NAME`` read as an existing network device (only when ``localdev`` is allowed)."""

    KIND: ClassVar[str] = "localdev"
    SYNTAX: ClassVar[str] = "local:DEVICE"
    PREFIX: ClassVar[str] = "local"


@dataclass(frozen=True, slots=True)
class RefLocator(Locator):
    """``ref://[NODE]/SERVICE/SECRET`` (or ``ref:[NODE]/…``): a sturdy ref."""

    KIND: ClassVar[str] = "ref"
    SYNTAX: ClassVar[str] = "ref://[NODE]/SERVICE/SECRET"

    ref: SturdyRef

    def __post_init__(self) -> None:
        if not isinstance(self.ref, SturdyRef):
            raise LocatorError(f"ref must be a SturdyRef, not {type(self.ref).__name__}")

    @classmethod
    def _from_value(cls, value: str) -> Locator:
        try:
            return cls(SturdyRef.parse("ref:" + value))
        except RefError as exc:
            raise LocatorError(str(exc)) from exc

    def format(self) -> str:
        return self.ref.format()


@dataclass(frozen=True, slots=True)
class TcpEndpoint(Locator):
    """``tcp:HOST:PORT``. ``host`` is normalised IP text (no brackets) or a lower-case name."""

    KIND: ClassVar[str] = "tcp"
    SYNTAX: ClassVar[str] = "tcp:HOST:PORT"

    host: str
    port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", _normalise_host(self.host))
        port = self.port
        if isinstance(port, bool) or not isinstance(port, int):
            raise LocatorError(f"tcp port must be an int, not {type(port).__name__}")
        if not 1 <= port <= 65535:
            raise LocatorError("tcp port must be in 1..65535")

    @classmethod
    def _from_value(cls, value: str) -> Locator:
        if value.startswith("["):
            host, bracket, after = value[1:].partition("]")
            if not bracket or not after.startswith(":"):
                raise LocatorError("tcp endpoint: expected tcp:[IPV6]:PORT")
            if ":" not in host:
                raise LocatorError("tcp endpoint: brackets must hold an IPv6 address")
            port_text = after[1:]
        else:
            host, colon, port_text = value.rpartition(":")
            if not colon:
                raise LocatorError(f"tcp endpoint has no port; expected {cls.SYNTAX}")
            if ":" in host:
                raise LocatorError(
                    "tcp endpoint: an IPv6 host must be in brackets: tcp:[ADDR]:PORT"
                )
        if not _PORT_RE.fullmatch(port_text):
            raise LocatorError("tcp port must be a number 1..65535 without leading zeros")
        return cls(host, int(port_text))

    def format(self) -> str:
        return f"tcp:{show_endpoint(self.host, self.port)}"


@dataclass(frozen=True, slots=True)
class UnixEndpoint(Locator):
    """``unix:/PATH``: a unix stream socket."""

    KIND: ClassVar[str] = "unix"
    SYNTAX: ClassVar[str] = "unix:/PATH"

    path: str

    def __post_init__(self) -> None:
        path = _normalise_absolute(self.path, "unix socket path")
        if len(path.encode("utf-8", "surrogateescape")) > MAX_UNIX_PATH_BYTES:
            raise LocatorError(f"unix socket path is longer than {MAX_UNIX_PATH_BYTES} bytes")
        object.__setattr__(self, "path", path)

    @classmethod
    def _from_value(cls, value: str) -> Locator:
        return cls(value)

    def format(self) -> str:
        return f"unix:{self.path}"


LOCATOR_KINDS: Mapping[str, type[Locator]] = MappingProxyType(
    {
        "local": LocalPath,
        "newlocal": NewLocal,
        "ref": RefLocator,
        "tcp": TcpEndpoint,
        "unix": UnixEndpoint,
    }
)

#: Other readings of a prefix in LOCATOR_KINDS, chosen by naming the kind in ``allowed``.
ALTERNATIVE_KINDS: Mapping[str, type[Locator]] = MappingProxyType(
    {
        "localdev": LocalDevice,
    }
)


def check_ifname(name: object) -> str:
    """A valid network device name (1..15 printable ASCII, no space, '/' or ':'), or LocatorError."""
    if not isinstance(name, str):
        raise LocatorError(f"device name must be a str, not {type(name).__name__}")
    if not 1 <= len(name) <= MAX_IFNAME_CHARS:
        raise LocatorError(f"device name must be 1..{MAX_IFNAME_CHARS} characters")
    if name in (".", ".."):
        raise LocatorError("device name must not be '.' or '..'")
    if not _IFNAME_RE.fullmatch(name):
        raise LocatorError("device name must be printable ASCII without whitespace, '/' or ':'")
    return name


def _accepted_kinds(cls: type[Locator], allowed: Iterable[str] | None) -> frozenset[str]:
    """Validate ``allowed`` (a programming error raises ``ValueError``/``TypeError``)."""
    if cls is not Locator:
        if allowed is not None:
            raise TypeError("allowed= is only accepted by Locator.parse")
        return frozenset((cls.KIND,))
    if allowed is None:
        return frozenset(LOCATOR_KINDS)
    kinds = frozenset((allowed,) if isinstance(allowed, str) else allowed)
    unknown = sorted(kinds - LOCATOR_KINDS.keys() - ALTERNATIVE_KINDS.keys())
    if unknown or not kinds:
        raise ValueError(f"allowed must name known locator kinds, got {sorted(kinds)!r}")
    for alt in ALTERNATIVE_KINDS.values():
        if alt.KIND in kinds and alt.PREFIX in kinds:
            raise ValueError(f"allowed names both readings of {alt.PREFIX}: ({alt.KIND!r})")
    return kinds


def _expected(kinds: frozenset[str]) -> str:
    every = {**LOCATOR_KINDS, **ALTERNATIVE_KINDS}
    return " or ".join(cls.SYNTAX for key, cls in every.items() if key in kinds)


def _normalise_absolute(path: object, what: str) -> str:
    if not isinstance(path, str):
        raise LocatorError(f"{what} must be a str, not {type(path).__name__}")
    if "\0" in path:
        raise LocatorError(f"{what} must not contain NUL")
    if not path.startswith("/"):
        raise LocatorError(f"{what} must be absolute (start with '/')")
    normal = posixpath.normpath(path)
    if normal.startswith("//"):  # POSIX lets normpath keep exactly two leading slashes
        normal = "/" + normal.lstrip("/")
    try:
        split_relative(normal[1:])
    except PathError as exc:
        raise LocatorError(f"{what}: {exc}") from exc
    return normal


def _normalise_host(host: object) -> str:
    if not isinstance(host, str):
        raise LocatorError(f"tcp host must be a str, not {type(host).__name__}")
    if ":" in host:
        if "%" in host:
            raise LocatorError("tcp host: IPv6 zone ids are not supported")
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise LocatorError("tcp host is not a valid IPv6 address") from None
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if (
        len(host) > MAX_HOSTNAME_CHARS
        or not all(_LABEL_RE.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise LocatorError("tcp host must be an IP address or a DNS hostname")
    return host.lower()
