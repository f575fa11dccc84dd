"""core.untrusted: the checks on what a client-handed capability answers, and the bounds."""

from __future__ import annotations

import asyncio

import pytest

from metac import errors
from metac.codec.refs import SturdyRef
from metac.core.untrusted import (
    OwnNode,
    PendingLimit,
    bounded,
    call_timeout,
    check_ref_node,
    check_served_address,
)

SECRET = b"s" * 24


def ref(node: str, port: int | None = None) -> SturdyRef:
    return SturdyRef.from_parts(node, port, "stream", SECRET)


@pytest.mark.parametrize("answer", ["127.0.0.1", "127.1.2.3", "::1", "169.254.1.1", "fe80::1",
                                    "0.0.0.0", "::", "224.0.0.1", "ff02::1",
                                    "::ffff:127.0.0.1"])
def test_private_answers_are_refused_unless_they_are_ours(answer: str) -> None:
    with pytest.raises(errors.PermissionDenied):
        check_served_address(answer, 5000, node=None, local_address="10.0.0.2")
    with pytest.raises(errors.PermissionDenied):
        check_served_address(answer, 5000, node="10.0.0.1", local_address="10.0.0.2")


def test_the_answer_must_be_the_serving_node() -> None:
    assert check_served_address("10.0.0.1", 5000, node="10.0.0.1",
                                local_address="10.0.0.2") == ("10.0.0.1", 5000)
    assert check_served_address("::ffff:10.0.0.1", 5000, node="10.0.0.1",
                                local_address="10.0.0.2") == ("10.0.0.1", 5000)
    with pytest.raises(errors.PermissionDenied, match="served by the node at 10.0.0.1"):
        check_served_address("10.0.0.7", 5000, node="10.0.0.1", local_address="10.0.0.2")
    # A node whose own address is loopback serves its own streams there.
    assert check_served_address("127.0.0.1", 5000, node="127.0.0.1",
                                local_address="127.0.0.1") == ("127.0.0.1", 5000)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_bad_ports_and_non_addresses_are_refused(port: int) -> None:
    with pytest.raises(errors.PermissionDenied):
        check_served_address("10.0.0.1", port, node="10.0.0.1", local_address="10.0.0.2")
    with pytest.raises(errors.PermissionDenied):
        check_served_address("example.org", 5000, node=None, local_address="10.0.0.2")


def test_ref_nodes() -> None:
    own = OwnNode("10.0.0.2", 901)
    assert check_ref_node(ref("10.0.0.2"), own) is True
    assert check_ref_node(ref("10.0.0.1"), own) is False
    for node, port in (("127.0.0.1", None), ("127.0.0.1", 6379), ("169.254.169.254", 80),
                       ("::1", None), ("10.0.0.2", 902)):
        if node == "10.0.0.2":
            assert check_ref_node(ref(node, port), own) is False  # not us: another port
            continue
        with pytest.raises(errors.PermissionDenied):
            check_ref_node(ref(node, port), own)
    # A node on loopback (one-machine setups) may name itself.
    assert check_ref_node(ref("127.0.0.1"), OwnNode("127.0.0.1", 901)) is True


def test_pending_limit_per_peer_and_total() -> None:
    limit = PendingLimit(total=3, per_peer=2, what="opens")
    a1, a2 = limit.claim("a"), limit.claim("a")
    with pytest.raises(errors.Unavailable, match="pending for a"):
        limit.claim("a")
    b1 = limit.claim()
    with pytest.raises(errors.Unavailable, match=r"too many opens pending \(3\)"):
        limit.claim("c")
    assert limit.count == 3
    a1.release()
    a1.release()  # idempotent
    b1.assign("b")
    assert limit.by_peer == {"a": 1, "b": 1}
    with limit.held("a"):
        assert limit.count == 3
    for slot in (a2, b1):
        slot.release()
    assert limit.count == 0 and limit.by_peer == {}


def test_bounded_times_out_as_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never() -> None:
        await asyncio.Event().wait()

    with pytest.raises(errors.Unavailable, match="the peer did not answer within 0.05 s"):
        asyncio.run(bounded(never(), "the peer", 0.05))
    monkeypatch.setenv("METAC_CALL_TIMEOUT", "0.05")
    assert call_timeout() == 0.05
    with pytest.raises(errors.Unavailable, match="within 0.05 s"):
        asyncio.run(bounded(never(), "the peer"))
    monkeypatch.setenv("METAC_CALL_TIMEOUT", "nonsense")
    assert call_timeout() == 30.0
