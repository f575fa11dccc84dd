"""Sturdy references: parse ``ref://[node]/service/secret`` into a ``SturdyRef`` and back.

A sturdy ref is the printable form of a ``MetacSturdyRef`` (paper section 5.2, section 6):
the node's IP address and RPC port, the service that restores it, and the unguessable
secret (the ``objectInfo`` bytes, at least 128 random bits, as unpadded urlsafe base64).

Grammar accepted by ``SturdyRef.parse`` (``format()`` writes the first two forms only)::

    ref://[IPV6]/SERVICE/SECRET        ref://[IPV6]:PORT/SERVICE/SECRET
    ref://IPV4/SERVICE/SECRET          ref://IPV4:PORT/SERVICE/SECRET
    ref://[IPV4]/SERVICE/SECRET        (brackets around IPv4 are tolerated)
    ref:[IPV6]/SERVICE/SECRET          (short form used by the paper: no "//")

Decisions:

* The scheme is case-insensitive (RFC 3986, section 3.1): ``REF://…`` is accepted and
  ``format()`` writes ``ref://``. Everything else is case-sensitive: service names are
  lower case and secrets are base64.
* The node is an IP address; hostnames are rejected, and so are IPv6 zone ids (``%``).
  Addresses are normalised with ``ipaddress`` (``[0:0::1]`` becomes ``[::1]``).
* The port is optional; 901 (``DEFAULT_PORT``) is normalised to ``None`` and never
  written. Port text is 1..65535 without leading zeros.
* The secret must be the canonical unpadded urlsafe base64 of 16..96 bytes (22..128
  characters), so text and bytes correspond one to one.
* Anything else is rejected: whitespace, query or fragment, percent-encoding, empty
  parts, extra or trailing slashes, more than ``MAX_REF_LENGTH`` characters.

``RefError`` is the only error raised. Its messages never contain the secret nor any
part of the input (which may be a secret pasted in the wrong place), and ``repr``/``str``
of a ``SturdyRef`` show at most the first four characters of the secret: ``format()`` is
the only way to get the full text.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Self

DEFAULT_PORT = 901


def show_endpoint(host: str, port: int | None = None) -> str:
    """``host:port`` as people and URLs write it: an IPv6 address in brackets; without a
    port, the host alone (bracketed too)."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def node_port(port: int | None) -> int:
    """A node's RPC port: 0 and None (how refs and NodeAddress say "default") are 901."""
    return port or DEFAULT_PORT


def wire_port(port: int | None) -> int:
    """A node's port as NodeAddress carries it: 0 for the default port."""
    return 0 if node_port(port) == DEFAULT_PORT else int(port or 0)


def ref_port(port: int | None) -> int | None:
    """A node's port as a sturdy ref carries it: None for the default port."""
    return None if node_port(port) == DEFAULT_PORT else port
MAX_REF_LENGTH = 1024
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 96
REDACTED_PREFIX_CHARS = 4

_SERVICE_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{22,128}")
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}")
_REF_CHARS = frozenset(string.ascii_letters + string.digits + "._-:[]/")
_SYNTAX = "expected ref://[node]/service/secret"


# Anything ref-shaped inside free text: the scheme (any case), up to two slashes (a path
# normaliser may have eaten one), an authority, a service and what follows it. Looser than
# the grammar above on purpose: a mangled or invalid ref may still hold a real secret.
_REF_IN_TEXT_RE = re.compile(
    r"(?i:ref):/{0,2}[^\s/'\"]{1,80}/[a-z][a-z0-9_-]{0,31}/([A-Za-z0-9_-]+)")


def redact_secrets(text: str, known: tuple[str, ...] = ()) -> str:
    """``text`` with the secret of every ref-shaped substring cut to four characters.

    The one redaction used wherever text leaves a program (CLI errors, service errors and
    logs). ``known`` are secrets to redact also where they appear without a ref around
    them (e.g. the secrets the user typed on a command line).
    """

    def cut(match: re.Match[str]) -> str:
        start, end = match.span(1)
        secret = match.group(1)
        if len(secret) <= REDACTED_PREFIX_CHARS:
            return match.group(0)
        base = match.start(0)
        whole = match.group(0)
        shown = secret[:REDACTED_PREFIX_CHARS]
        return f"{whole[:start - base]}{shown}…{whole[end - base:]}"

    text = _REF_IN_TEXT_RE.sub(cut, text)
    for secret in known:
        if len(secret) > REDACTED_PREFIX_CHARS:
            text = text.replace(secret, secret[:REDACTED_PREFIX_CHARS] + "…")
    return text


def secrets_in(texts: Iterable[str]) -> tuple[str, ...]:
    """The secrets of the ref-shaped substrings of ``texts`` (for ``redact_secrets(known=)``)."""
    found: list[str] = []
    for text in texts:
        found.extend(m.group(1) for m in _REF_IN_TEXT_RE.finditer(text)
                     if len(m.group(1)) > REDACTED_PREFIX_CHARS)
    return tuple(found)


class RefError(ValueError):
    """A malformed sturdy ref or ref part. The message never contains a secret."""


@dataclass(frozen=True, slots=True, repr=False)
class SturdyRef:
    """A parsed, validated sturdy reference.

    ``node`` is normalised IP address text (no brackets), ``port`` is ``None`` for the
    default port 901, ``service`` matches ``[a-z][a-z0-9_-]{0,31}`` and ``secret`` is
    canonical unpadded urlsafe base64 of 16..96 bytes.
    """

    node: str
    port: int | None
    service: str
    secret: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "node", _normalise_node(self.node))
        object.__setattr__(self, "port", _normalise_port(self.port))
        _check_service(self.service)
        _check_secret(self.secret)

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse any accepted form (see the module docstring); raise ``RefError``."""
        if not isinstance(text, str):
            raise RefError(f"sturdy ref must be a str, not {type(text).__name__}")
        if len(text) > MAX_REF_LENGTH:
            raise RefError(f"sturdy ref is longer than {MAX_REF_LENGTH} characters")
        scheme, colon, rest = text.partition(":")
        if not colon or not scheme.isascii() or scheme.lower() != "ref":
            raise RefError(f"not a sturdy ref: {_SYNTAX}")
        for offset, char in enumerate(rest, start=len(scheme) + 1):
            if char not in _REF_CHARS:
                raise RefError(_bad_char_message(char, offset))
        if rest.startswith("//"):
            rest = rest[2:]
        authority, slash, path = rest.partition("/")
        if not authority:
            raise RefError(f"sturdy ref has no node address: {_SYNTAX}")
        if not slash:
            raise RefError(f"sturdy ref has no /service/secret: {_SYNTAX}")
        node, port = _split_authority(authority)
        parts = path.split("/")
        if len(parts) != 2:
            raise RefError(f"sturdy ref has a missing or extra '/': {_SYNTAX}")
        service, secret = parts
        if not service:
            raise RefError("sturdy ref has an empty service name")
        if not secret:
            raise RefError("sturdy ref has an empty secret")
        return cls(node=node, port=port, service=service, secret=secret)

    @classmethod
    def from_parts(
        cls,
        node: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
        port: int | None,
        service: str,
        secret_bytes: bytes,
    ) -> Self:
        """Build a ref from the raw secret bytes (e.g. a ``MetacSturdyRef``'s objectInfo)."""
        if not isinstance(secret_bytes, bytes | bytearray | memoryview):
            raise RefError(f"secret must be bytes, not {type(secret_bytes).__name__}")
        raw = bytes(secret_bytes)
        if not MIN_SECRET_BYTES <= len(raw) <= MAX_SECRET_BYTES:
            raise RefError(
                f"secret must be {MIN_SECRET_BYTES}..{MAX_SECRET_BYTES} bytes, not {len(raw)}"
            )
        if isinstance(node, ipaddress.IPv4Address | ipaddress.IPv6Address):
            node = str(node)
        secret = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
        return cls(node=node, port=port, service=service, secret=secret)

    @property
    def secret_bytes(self) -> bytes:
        """The decoded secret (the ``objectInfo`` of the ``MetacSturdyRef``)."""
        return _decode_secret(self.secret)

    def format(self) -> str:
        """The full canonical text, secret included (str() and repr() redact it)."""
        return f"ref://{self._authority()}/{self.service}/{self.secret}"

    def redacted(self) -> str:
        """The canonical text with the secret cut to its first four characters."""
        shown = self.secret[:REDACTED_PREFIX_CHARS]
        return f"ref://{self._authority()}/{self.service}/{shown}…"

    def __str__(self) -> str:
        return self.redacted()

    def __repr__(self) -> str:
        return f"<SturdyRef {self.redacted()}>"

    def _authority(self) -> str:
        return show_endpoint(self.node, self.port)


def _bad_char_message(char: str, offset: int) -> str:
    if char.isspace():
        return f"sturdy ref must not contain whitespace (offset {offset})"
    if char in "?#":
        return "sturdy ref must not have a query or fragment"
    if char == "%":
        return "sturdy ref must not contain '%' (no percent-encoding or IPv6 zone ids)"
    return f"sturdy ref contains an invalid character {char!r} at offset {offset}"


def _split_authority(authority: str) -> tuple[str, int | None]:
    """Split ``[v6]:port``, ``v4:port`` (port optional) into host text and port."""
    if authority.startswith("["):
        host, bracket, after = authority[1:].partition("]")
        if not bracket:
            raise RefError("sturdy ref node address has '[' without ']'")
        if not host:
            raise RefError("sturdy ref has an empty node address")
        if after and not after.startswith(":"):
            raise RefError("sturdy ref has unexpected text after ']'")
    else:
        if authority.count(":") > 1:
            raise RefError("an IPv6 node address must be in brackets: ref://[addr]/…")
        host, colon, port_text = authority.partition(":")
        if not host:
            raise RefError("sturdy ref has an empty node address")
        after = colon + port_text
    if not after:
        return host, None
    port_text = after[1:]
    if not _PORT_RE.fullmatch(port_text):
        raise RefError("sturdy ref port must be a number 1..65535 without leading zeros")
    return host, int(port_text)


def _normalise_node(node: object) -> str:
    if not isinstance(node, str):
        raise RefError(f"node must be IP address text, not {type(node).__name__}")
    if "%" in node:
        raise RefError("node: IPv6 zone ids are not supported")
    try:
        address = ipaddress.ip_address(node)
    except ValueError:
        # "from None": ipaddress's message quotes the input, which may be a secret.
        raise RefError("node must be an IPv4 or IPv6 address (not a hostname)") from None
    return str(address)


def _normalise_port(port: object) -> int | None:
    if port is None:
        return None
    if isinstance(port, bool) or not isinstance(port, int):
        raise RefError(f"port must be an int or None, not {type(port).__name__}")
    if not 1 <= port <= 65535:
        raise RefError("port must be in 1..65535")
    return None if port == DEFAULT_PORT else port


def _check_service(service: object) -> None:
    if not isinstance(service, str):
        raise RefError(f"service must be a str, not {type(service).__name__}")
    if not _SERVICE_RE.fullmatch(service):
        raise RefError("service name must match [a-z][a-z0-9_-]{0,31}")


def _check_secret(secret: object) -> None:
    if not isinstance(secret, str):
        raise RefError(f"secret must be a str, not {type(secret).__name__}")
    if not _SECRET_RE.fullmatch(secret):
        raise RefError("secret must be 22..128 characters of [A-Za-z0-9_-] (urlsafe base64)")
    if len(secret) % 4 == 1:
        raise RefError("secret has an impossible base64 length")
    canonical = base64.urlsafe_b64encode(_decode_secret(secret)).rstrip(b"=")
    if canonical.decode("ascii") != secret:
        raise RefError("secret is not canonical base64 (unused low bits are set)")


def _decode_secret(secret: str) -> bytes:
    """Decode a secret whose alphabet and length were already checked (cannot fail)."""
    return base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))


SHORT_ID_LEN = 12


def secret_hash(secret: bytes) -> bytes:
    """What the refs database stores of a ref's secret.

    Secrets carry >= 128 random bits, so a plain hash is enough to make the stored value
    useless as a secret."""
    return hashlib.sha256(b"metac-ref\0" + secret).digest()


def short_id_of(digest: bytes) -> str:
    """The short id `metac ref ls` shows (and `metac ref rm` takes) of a stored hash."""
    return digest.hex()[:SHORT_ID_LEN]
