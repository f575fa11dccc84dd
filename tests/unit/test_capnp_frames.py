"""Tests for metac.codec.capnp_frames: message boundaries in any chunking, limits, fuzzing."""

from __future__ import annotations

import capnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metac.codec.capnp_frames import (
    MAX_SEGMENTS,
    FrameError,
    FrameScanner,
    frame,
    table_bytes,
    traversal_words,
)
from metac.codec.capnp_frames import (
    split as split_messages,
)
from metac.schema.load import core


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


def feed_all(scanner: FrameScanner, pieces: list[bytes]) -> int:
    return sum(scanner.feed(p) for p in pieces)


segment_sizes = st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=6)
messages = st.lists(segment_sizes, min_size=1, max_size=8)


def build(sizes: list[int]) -> bytes:
    return frame([bytes([i % 251]) * (8 * n) for i, n in enumerate(sizes)])


def test_table_bytes_pads_to_words() -> None:
    assert [table_bytes(n) for n in (1, 2, 3, 4, 5)] == [8, 16, 16, 24, 24]


def test_real_pycapnp_messages_are_counted() -> None:
    blobs = []
    for i in range(5):
        msg = core.ServiceStatus.new_message(name="x" * (i * 3000), state="ok", pid=i)
        blobs.append(msg.to_bytes())
    stream = b"".join(blobs)
    for step in (1, 3, 8, 13, 4096, len(stream)):
        scanner = FrameScanner(1 << 20)
        pieces = [stream[i:i + step] for i in range(0, len(stream), step)]
        assert feed_all(scanner, pieces) == 5
        assert not scanner.in_message and scanner.pending_bytes == 0
    # and pycapnp reads back what we framed ourselves
    segments = capnp._MallocMessageBuilder(64)
    segments.init_root(core.ServiceStatus).name = "y" * 2000  # more than one segment
    framed = frame([bytes(s) for s in segments.get_segments_for_output()])
    assert len(segments.get_segments_for_output()) > 1
    with core.ServiceStatus.from_bytes(framed) as back:
        assert back.name == "y" * 2000


@settings(max_examples=300, deadline=None)
@given(messages, st.lists(st.integers(min_value=0), max_size=30))
def test_any_chunking_finds_every_message(msgs: list[list[int]], cuts: list[int]) -> None:
    stream = b"".join(build(m) for m in msgs)
    scanner = FrameScanner(1 << 20)
    assert feed_all(scanner, split(stream, cuts)) == len(msgs)
    assert not scanner.in_message and scanner.pending_bytes == 0


@settings(max_examples=200, deadline=None)
@given(segment_sizes.filter(lambda s: sum(s) > 0), st.data())
def test_partial_message_is_pending_with_its_declared_size(sizes: list[int], data) -> None:
    whole = build(sizes)
    head = table_bytes(len(sizes))
    cut = data.draw(st.integers(min_value=1, max_value=len(whole) - 1))
    scanner = FrameScanner(1 << 20)
    assert scanner.feed(whole[:cut]) == 0
    assert scanner.in_message
    assert scanner.pending_bytes == (len(whole) if cut >= head else cut)
    assert scanner.feed(whole[cut:]) == 1
    assert not scanner.in_message


@settings(max_examples=200, deadline=None)
@given(messages, st.integers(min_value=16, max_value=400), st.lists(st.integers(min_value=0)))
def test_limit_refuses_exactly_the_oversized_message(msgs, limit, cuts) -> None:
    built = [build(m) for m in msgs]
    first_bad = next((i for i, b in enumerate(built) if len(b) > limit), None)
    stream = b"".join(built)
    scanner = FrameScanner(limit)
    seen = 0
    if first_bad is None:
        assert feed_all(scanner, split(stream, cuts)) == len(msgs)
        return
    with pytest.raises(FrameError, match="bytes"):
        for piece in split(stream, cuts):
            seen += scanner.feed(piece)
    assert seen <= first_bad  # refused before the oversized body was taken
    with pytest.raises(FrameError):
        scanner.feed(b"\0" * 8)  # and stays failed


@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0), max_size=10))
def test_garbage_never_crashes(garbage: bytes, cuts: list[int]) -> None:
    scanner = FrameScanner(1 << 16, max_segments=64)
    try:
        feed_all(scanner, split(garbage, cuts))
    except FrameError:
        return
    assert scanner.pending_bytes <= 1 << 16


def test_too_many_segments_is_refused_from_the_first_word() -> None:
    scanner = FrameScanner(1 << 30)
    with pytest.raises(FrameError, match="segments"):
        scanner.feed((MAX_SEGMENTS).to_bytes(4, "little"))  # 512 segments
    huge = FrameScanner(1 << 20)
    with pytest.raises(FrameError, match="bytes"):
        huge.feed(b"\0\0\0\0" + (63 << 17).to_bytes(4, "little"))  # a 63 MiB segment 0


def test_memoryview_pieces_are_accepted() -> None:
    stream = bytearray(build([3, 0, 2]) + build([1]))
    scanner = FrameScanner(4096)
    view = memoryview(stream)
    assert scanner.feed(view[:5]) == 0
    assert scanner.feed(view[5:]) == 2


@settings(max_examples=200, deadline=None)
@given(messages, st.integers(min_value=0, max_value=64))
def test_split_returns_whole_messages_and_the_rest(msgs: list[list[int]], cut: int) -> None:
    built = [build(m) for m in msgs]
    stream = b"".join(built)
    whole, rest = split_messages(stream)
    assert whole == built and rest == b""
    truncated = stream[:max(0, len(stream) - 1 - cut)]
    whole, rest = split_messages(truncated)
    assert b"".join(whole) + rest == truncated and len(whole) < len(built)


@settings(max_examples=100, deadline=None)
@given(messages, st.integers(min_value=0, max_value=100))
def test_nbytes_limits_what_is_read_from_a_larger_buffer(msgs: list[list[int]], junk: int) -> None:
    stream = b"".join(build(m) for m in msgs)
    buffer = bytearray(stream + b"\xff" * junk)  # what follows nbytes is not looked at
    scanner = FrameScanner(1 << 20)
    assert scanner.feed(memoryview(buffer), len(stream)) == len(msgs)
    assert not scanner.in_message


@settings(max_examples=200, deadline=None)
@given(messages, st.integers(min_value=8, max_value=400), st.lists(st.integers(min_value=0)))
def test_capture_copies_exactly_the_large_messages(msgs, threshold, cuts) -> None:
    built = [build(m) for m in msgs]
    scanner = FrameScanner(1 << 20, capture_from=threshold)
    captured = []
    for piece in split(b"".join(built), cuts):
        scanner.feed(memoryview(bytearray(piece)))
        captured += scanner.take_captured()
    assert captured == [b for b in built if len(b) >= threshold]
    assert not scanner.captured


def aliased(copies: int) -> bytes:
    from metac.testing.rawpeer import aliased_restore_message

    return aliased_restore_message(2, 1, copies=copies, blob_bytes=4096)


def body_words(message: bytes) -> int:
    count = int.from_bytes(message[:4], "little") + 1
    return (len(message) - table_bytes(count)) // 8


def test_traversal_words_of_real_messages_fit_their_size() -> None:
    for i in range(1, 6):
        builder = capnp._MallocMessageBuilder(16)  # small first segment: far pointers
        root = builder.init_root(core.ServiceStatus)
        root.name = "n" * (300 * i)
        root.state = "s" * (97 * i)
        message = frame([bytes(s) for s in builder.get_segments_for_output()])
        assert traversal_words(message, 10**9) <= body_words(message)
    plain = aliased(1)
    assert body_words(plain) - 8 <= traversal_words(plain, 10**9) <= body_words(plain)


def test_traversal_words_sees_aliasing_and_stops_early() -> None:
    message = aliased(100)
    limit = body_words(message)
    assert traversal_words(message, 10**9) >= 100 * 4096 // 8
    assert limit < traversal_words(message, limit) <= limit + 4096 // 8


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=300).map(lambda b: b + b"\0" * (-len(b) % 8)),
                min_size=1, max_size=4))
def test_traversal_words_of_garbage_terminates(segments: list[bytes]) -> None:
    message = frame(segments)
    limit = body_words(message)
    assert traversal_words(message, limit) <= limit + sum(len(s) for s in segments) // 8
