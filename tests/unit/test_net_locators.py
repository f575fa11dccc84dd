"""NET-URIs: ``local:DEV`` read as a device name when the caller allows ``localdev``."""

from __future__ import annotations

import pytest

from metac.codec.locators import (
    LocalDevice,
    LocalPath,
    Locator,
    LocatorError,
    NewLocal,
    RefLocator,
    check_ifname,
)

NET = ("localdev", "newlocal", "ref")
SECRET = "A" * 32


def test_local_is_a_device_only_when_asked() -> None:
    assert Locator.parse("local:eth0", allowed=NET) == LocalDevice("eth0")
    assert Locator.parse("LOCAL:eth0", allowed=NET).format() == "local:eth0"
    assert LocalDevice.parse("local:br-x.1") == LocalDevice("br-x.1")
    assert Locator.parse("local:/srv") == LocalPath("/srv")  # default reading unchanged
    with pytest.raises(LocatorError, match="absolute"):
        Locator.parse("local:eth0")


def test_net_uri_kinds() -> None:
    assert Locator.parse("newlocal:remote0", allowed=NET) == NewLocal("remote0")
    ref = Locator.parse(f"ref://[fd00::1]/net/{SECRET}", allowed=NET)
    assert isinstance(ref, RefLocator) and ref.ref.service == "net"
    with pytest.raises(LocatorError) as info:
        Locator.parse("tcp:a:1", allowed=NET)
    assert "local:DEVICE" in str(info.value) and "newlocal:NAME" in str(info.value)


@pytest.mark.parametrize("name", ["", "a" * 16, "a b", "a/b", "a:b", ".", "..", "é"])
def test_bad_device_names(name: str) -> None:
    with pytest.raises(LocatorError, match="device name"):
        Locator.parse(f"local:{name}", allowed=NET)
    with pytest.raises(LocatorError, match="device name"):
        check_ifname(name)


def test_both_readings_cannot_be_allowed() -> None:
    with pytest.raises(ValueError, match="both readings"):
        Locator.parse("local:x", allowed=("local", "localdev"))


def test_localdev_is_not_a_default_kind() -> None:
    with pytest.raises(TypeError):
        LocalDevice.parse("local:x", allowed=NET)
    with pytest.raises(LocatorError, match="not allowed here"):
        NewLocal.parse("local:x")
