"""`metac run` option parsing (metac.codec.runspecs): table-driven and fuzzed."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metac.codec.locators import LocalPath, NewLocal, RefLocator
from metac.codec.runspecs import (
    MountOption,
    NetworkOption,
    Route,
    RunSpecError,
    env_option,
    signal_number,
)

REF = "ref://10.0.0.1/fs/" + "A" * 32


def test_mount_option() -> None:
    m = MountOption.parse("/=local:/srv/root/")
    assert m.path == "/" and m.source == LocalPath("/srv/root")
    m = MountOption.parse("/data//x/=" + REF)
    assert m.path == "/data/x" and isinstance(m.source, RefLocator)


@pytest.mark.parametrize("text", [
    "/data", "=local:/x", "/data=", "data=local:/x", "/a/../b=local:/x",
    "/x=tcp:1.2.3.4:5", "/x=local:relative", "/x=ref:short",
])
def test_mount_option_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        MountOption.parse(text)


def test_network_option_full() -> None:
    n = NetworkOption.parse(f"name=eth0,uri={REF.replace('/fs/', '/net/')},"
                            "address=10.0.0.2/24,address=fd00::2/64,"
                            "route=10.1.0.0/16,via=10.0.0.1,route=default")
    assert n.name == "eth0" and isinstance(n.uri, RefLocator)
    assert n.addresses == ("10.0.0.2/24", "fd00::2/64")
    assert n.routes == (Route("10.1.0.0/16", "10.0.0.1"), Route("0.0.0.0/0", ""))


def test_network_option_minimal_and_local_kinds() -> None:
    assert NetworkOption.parse("name=n0") == NetworkOption("n0")
    assert NetworkOption.parse("name=n0,uri=newlocal:ct0").uri == NewLocal("ct0")
    assert NetworkOption.parse("name=n0,uri=local:eth1").uri.format() == "local:eth1"
    assert NetworkOption.parse("name=n0,route=10.1.2.3/8").routes == (Route("10.0.0.0/8"),)


@pytest.mark.parametrize("text, message", [
    ("address=10.0.0.2/24", "needs name="),
    ("name=eth0,name=eth1", "twice"),
    ("name=eth0,uri=newlocal:a,uri=newlocal:b", "twice"),
    ("name=this-name-is-too-long", "name"),
    ("name=eth0,address=10.0.0.2", "prefix length"),
    ("name=eth0,address=banana/24", "ADDRESS/PREFIX"),
    ("name=eth0,via=10.0.0.1", "must follow"),
    ("name=eth0,route=10.0.0.0/8,via=x", "IP address"),
    ("name=eth0,route=10.0.0.0/8,via=1.1.1.1,via=1.1.1.2", "must follow"),
    ("name=eth0,route=nowhere", "NETWORK/PREFIX"),
    ("name=eth0,colour=blue", "unknown key"),
    ("name=eth0,", "key=value"),
    ("name=eth0,uri=tcp:1.2.3.4:5", "not allowed"),
])
def test_network_option_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NetworkOption.parse(text)


def test_env_and_signals() -> None:
    assert env_option("A=b=c") == "A=b=c"
    assert env_option("EMPTY=") == "EMPTY="
    for bad in ("NOEQ", "=x", "A=\0"):
        with pytest.raises(RunSpecError):
            env_option(bad)
    assert signal_number("TERM") == signal.SIGTERM
    assert signal_number("sigkill") == signal.SIGKILL
    assert signal_number("0") == 0 and signal_number("64") == 64
    for bad in ("65", "SIGNOPE", "-1", ""):
        with pytest.raises(RunSpecError):
            signal_number(bad)


def test_secrets_are_not_quoted() -> None:
    secret = "S" * 40
    with pytest.raises(ValueError) as info:
        NetworkOption.parse(f"name=eth0,uri=ref://10.0.0.1/net/{secret}x!,address=1")
    assert secret not in str(info.value)


@given(st.text(max_size=200))
def test_fuzz_network_option(text: str) -> None:
    try:
        NetworkOption.parse(text)
    except ValueError:
        pass


@given(st.text(max_size=200))
def test_fuzz_mount_option(text: str) -> None:
    try:
        MountOption.parse(text)
    except ValueError:
        pass
