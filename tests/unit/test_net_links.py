"""Link markers (the ifalias every link of the network service carries) and link snapshots."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metac.net.links import MARKER_PREFIX, Link, Marker, link_from_msg


def test_marker_round_trip() -> None:
    m = Marker("0123456789ab", "vxlan")
    assert m.format() == "managed by metac net/0123456789ab/vxlan"
    assert Marker.parse(m.format()) == m
    assert Link(1, "x", alias=m.format()).marker == m


@pytest.mark.parametrize(
    "alias",
    [None, "", "my uplink", MARKER_PREFIX, MARKER_PREFIX + "abc", MARKER_PREFIX + "abc/nope",
     MARKER_PREFIX + "/dev", MARKER_PREFIX + "a b/dev", "managed by metac fs/abc/dev"],
)
def test_foreign_aliases_are_not_markers(alias: str | None) -> None:
    assert Marker.parse(alias) is None


def test_bad_markers_cannot_be_built() -> None:
    with pytest.raises(ValueError):
        Marker("abc", "other")
    with pytest.raises(ValueError):
        Marker("", "dev")


@given(st.text())
def test_parse_never_fails(text: str) -> None:
    marker = Marker.parse(text)
    assert marker is None or Marker.parse(marker.format()) == marker


class _Attrs(dict):
    def get_attr(self, name: str):
        return self.get(name)


def _msg(index: int, flags: int, **attrs) -> _Attrs:
    msg = _Attrs(attrs)
    msg["index"], msg["flags"] = index, flags
    return msg


def test_link_from_msg() -> None:
    info = _Attrs(IFLA_INFO_KIND="vxlan", IFLA_INFO_DATA=_Attrs(IFLA_VXLAN_PORT=20001))
    msg = _msg(7, 1, IFLA_IFNAME="mcvx", IFLA_IFALIAS=Marker("ab12", "vxlan").format(),
               IFLA_MASTER=9, IFLA_MTU=1450, IFLA_LINKINFO=info, IFLA_LINK=3)
    link = link_from_msg(msg)
    assert link == Link(7, "mcvx", "vxlan", Marker("ab12", "vxlan").format(), 9, 1450, True, 0,
                        20001)
    veth = link_from_msg(_msg(4, 0, IFLA_IFNAME="v", IFLA_LINK=5,
                              IFLA_LINKINFO=_Attrs(IFLA_INFO_KIND="veth")))
    assert (veth.kind, veth.peer_index, veth.up, veth.marker) == ("veth", 5, False, None)
    plain = link_from_msg(_msg(1, 1, IFLA_IFNAME="lo", IFLA_MTU=65536))
    assert (plain.kind, plain.vxlan_port, plain.master) == ("", 0, 0)
