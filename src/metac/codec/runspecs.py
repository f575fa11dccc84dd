"""`metac run` option values, parsed once at the edge into frozen values (pure).

==============================  =========================================================
option                          value
==============================  =========================================================
``--mount PATH=FS-URI``         ``MountOption``: an absolute path inside the environment
                                (``/`` for the root filesystem) and ``local:/DIR`` or a
                                ``ref:`` of a Filesystem
``--network SPEC``              ``NetworkOption``: comma-separated ``key=value`` items:
                                ``name=IFNAME`` (required, once), ``uri=NET-URI`` (at most
                                once; ``ref:``, ``local:DEV``, ``newlocal:DEV``; none
                                means a new network), ``address=ADDR/PREFIX`` (repeatable),
                                ``route=NET/PREFIX`` (repeatable) optionally followed by
                                ``via=GATEWAY`` for that route
``-e KEY=VALUE``                ``env_option``: KEY non-empty, no ``=`` or NUL in it
``-s SIGNAL``                   ``signal_number``: ``TERM``, ``SIGTERM`` or ``15``
==============================  =========================================================

Errors are ``ValueError`` subclasses (``LocatorError`` for the URIs) whose messages
never quote a URI (it may hold a secret).
"""

from __future__ import annotations

import ipaddress
import posixpath
import signal
from dataclasses import dataclass

from metac.codec.locators import Locator, LocatorError, NewLocal

FS_KINDS = ("local", "ref")
NET_KINDS = ("ref", "localdev", "newlocal")


class RunSpecError(ValueError):
    """A `metac run` option that cannot be used."""


def environment_path(path: str) -> str:
    """An absolute path inside the environment, normalised; ``..`` is refused."""
    if not path.startswith("/"):
        raise RunSpecError("a mount path must be absolute (start with '/')")
    if "\0" in path:
        raise RunSpecError("a mount path must not contain NUL")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise RunSpecError("a mount path must not contain '..'")
    return posixpath.join("/", *parts)


@dataclass(frozen=True)
class MountOption:
    path: str
    source: Locator

    @classmethod
    def parse(cls, text: str) -> MountOption:
        path, eq, uri = text.partition("=")
        if not eq or not path or not uri:
            raise RunSpecError("--mount wants PATH=FS-URI, e.g. /=ref://... or /data=local:/srv")
        return cls(environment_path(path), Locator.parse(uri, allowed=FS_KINDS))


@dataclass(frozen=True)
class Route:
    network: str
    via: str = ""


@dataclass(frozen=True)
class NetworkOption:
    name: str
    uri: Locator | None = None
    addresses: tuple[str, ...] = ()
    routes: tuple[Route, ...] = ()

    @classmethod
    def parse(cls, text: str) -> NetworkOption:
        name = None
        uri: Locator | None = None
        addresses: list[str] = []
        routes: list[Route] = []
        for item in text.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not value:
                raise RunSpecError(
                    "--network wants comma-separated key=value items: name=IFNAME[,uri=NET-URI]"
                    "[,address=ADDR/PREFIX]...[,route=NET/PREFIX[,via=GATEWAY]]...")
            if key == "name":
                if name is not None:
                    raise RunSpecError("--network: name= given twice")
                try:
                    name = NewLocal(value).name
                except LocatorError as exc:
                    raise RunSpecError(f"--network name: {exc}") from None
            elif key == "uri":
                if uri is not None:
                    raise RunSpecError("--network: uri= given twice")
                uri = Locator.parse(value, allowed=NET_KINDS)
            elif key == "address":
                addresses.append(_address(value))
            elif key == "route":
                routes.append(Route(_network(value)))
            elif key == "via":
                if not routes or routes[-1].via:
                    raise RunSpecError("--network: via= must follow its route=")
                routes[-1] = Route(routes[-1].network, _gateway(value))
            else:
                raise RunSpecError(f"--network: unknown key {key[:20]!r}; "
                                   "expected name, uri, address, route or via")
        if name is None:
            raise RunSpecError("--network needs name=IFNAME (the interface in the environment)")
        return cls(name, uri, tuple(addresses), tuple(routes))


def _address(text: str) -> str:
    if "/" not in text:
        raise RunSpecError("--network address needs a prefix length, e.g. 10.0.0.2/24")
    try:
        return str(ipaddress.ip_interface(text))
    except ValueError:
        raise RunSpecError("--network address must be ADDRESS/PREFIX") from None


def _network(text: str) -> str:
    if text == "default":
        return "0.0.0.0/0"
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise RunSpecError("--network route must be NETWORK/PREFIX (or 'default')") from None


def _gateway(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise RunSpecError("--network via must be an IP address") from None


def env_option(text: str) -> str:
    key, eq, _ = text.partition("=")
    if not eq or not key or "\0" in text:
        raise RunSpecError("-e wants KEY=VALUE with a non-empty KEY")
    return text


def signal_number(text: str) -> int:
    """A signal by name (``TERM``, ``SIGTERM``, any case) or number (0..64)."""
    if text.isdigit():
        number = int(text)
        if 0 <= number <= 64:
            return number
        raise RunSpecError("signal numbers are 0..64")
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise RunSpecError(f"unknown signal {text[:16]!r}") from None
