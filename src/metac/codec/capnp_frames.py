"""Follow the framing of a Cap'n Proto message stream without parsing messages.

A Cap'n Proto message on a stream starts with its segment table: a
little-endian ``uint32`` holding the segment count minus one, one ``uint32``
word count per segment, and four bytes of padding when that makes the table
end on an 8-byte boundary. The segments (``8 * sum(sizes)`` bytes) follow.
The table alone tells how long the whole message is, so a reader in front of
the RPC system can refuse an oversized message before anything allocates room
for it, and can tell whether a connection is in the middle of a message.

``FrameScanner.feed`` takes the stream's bytes in whatever pieces they come
and counts the messages that end; it keeps at most one partial segment table
(at most ``4 * (max_segments + 1)`` bytes) and never copies message bodies.
"""

from __future__ import annotations

import struct

WORD = 8
#: Cap'n Proto itself refuses a message of 512 segments or more.
MAX_SEGMENTS = 511

_U32 = struct.Struct("<I")
_U32x2 = struct.Struct("<II")


class FrameError(ValueError):
    """The stream cannot be a sequence of acceptable Cap'n Proto messages."""


def table_bytes(segments: int) -> int:
    """Length of the segment table of a message of ``segments`` segments (padding included)."""
    return (4 + 4 * segments + 7) & ~7


def frame(segments: list[bytes]) -> bytes:
    """The stream form of a message made of ``segments`` (each a multiple of 8 bytes long)."""
    if not segments:
        raise ValueError("a message has at least one segment")
    sizes = []
    for seg in segments:
        if len(seg) % WORD:
            raise ValueError("a segment is a whole number of words")
        sizes.append(len(seg) // WORD)
    head = struct.pack(f"<{len(sizes) + 1}I", len(sizes) - 1, *sizes)
    head += b"\0" * (table_bytes(len(sizes)) - len(head))
    return head + b"".join(segments)


def split(data: bytes) -> tuple[list[bytes], bytes]:
    """The whole messages at the start of ``data``, and the bytes after them."""
    messages = []
    pos = 0
    while len(data) - pos >= 4:
        count = _U32.unpack_from(data, pos)[0] + 1
        head = table_bytes(count)
        if count > MAX_SEGMENTS or len(data) - pos < head:
            break
        size = head + WORD * sum(struct.unpack_from(f"<{count}I", data, pos + 4))
        if len(data) - pos < size:
            break
        messages.append(data[pos:pos + size])
        pos += size
    return messages, data[pos:]


class FrameScanner:
    """Tracks message boundaries of one direction of a Cap'n Proto stream.

    ``max_message_bytes`` bounds a whole message, segment table included;
    ``max_segments`` bounds its segment count. ``feed`` raises ``FrameError``
    at the first table that breaks either limit (and stays failed).
    With ``capture_from``, every message of at least that many bytes is also
    copied whole, for ``take_captured`` (for checks that need the message).
    """

    __slots__ = ("max_message_bytes", "max_segments", "capture_from", "_head", "_left", "_size",
                 "_failed", "_capture", "_captured")

    def __init__(self, max_message_bytes: int, max_segments: int = MAX_SEGMENTS,
                 capture_from: int = 0) -> None:
        if max_message_bytes < WORD or max_segments < 1:
            raise ValueError("limits too small for any message")
        self.max_message_bytes = max_message_bytes
        self.max_segments = min(max_segments, MAX_SEGMENTS)
        self.capture_from = capture_from or max_message_bytes + 1
        self._head = bytearray()  # a segment table received in pieces
        self._left = 0  # body bytes still to come of the current message
        self._size = 0  # total size of the current message, once its table is known
        self._failed = False
        self._capture: bytearray | None = None  # the current message, if captured
        self._captured: list[bytes] = []

    @property
    def captured(self) -> bool:
        """Whole captured messages are waiting for ``take_captured``."""
        return bool(self._captured)

    def take_captured(self) -> list[bytes]:
        """The captured messages completed since the last call (framed)."""
        out, self._captured = self._captured, []
        return out

    @property
    def in_message(self) -> bool:
        """Part of a message has arrived and the rest has not."""
        return self._left > 0 or bool(self._head)

    @property
    def pending_bytes(self) -> int:
        """The size the current partial message will have (table included), or the
        part of its table seen so far; 0 between messages."""
        return self._size if self._left else len(self._head)

    def feed(self, data: bytes | bytearray | memoryview, nbytes: int | None = None) -> int:
        """Account for the next bytes of the stream (the first ``nbytes`` of ``data``,
        a bytes-like object of unsigned bytes); returns how many messages they end."""
        if self._failed:
            raise FrameError("the stream already broke the framing limits")
        end = len(data) if nbytes is None else nbytes
        pos = 0
        done = 0
        while pos < end:
            left = self._left
            if left:
                if self._capture is not None:
                    self._capture += data[pos:pos + min(left, end - pos)]
                if left > end - pos:
                    self._left = left - (end - pos)
                    return done
                pos += left
                self._left = 0
                self._size = 0
                done += 1
                if self._capture is not None:
                    self._captured.append(bytes(self._capture))
                    self._capture = None
                continue
            if not self._head and end - pos >= WORD:
                # Fast path (inlined: this runs for every message the node receives):
                # the table, or at least its first word, is in this piece.
                count_minus_one, body = _U32x2.unpack_from(data, pos)
                if count_minus_one == 0:
                    head_len = WORD
                else:
                    count = self._check_count(count_minus_one)
                    head_len = table_bytes(count)
                    if end - pos < head_len:
                        pos, ended = self._gather(data, pos, end)
                        done += ended
                        continue
                    for i in range(1, count):
                        body += _U32.unpack_from(data, pos + 4 + 4 * i)[0]
                size = head_len + body * WORD
                if size > self.max_message_bytes:
                    self._failed = True
                    raise FrameError(f"message of {size} bytes (at most {self.max_message_bytes})")
                if size >= self.capture_from:
                    if end - pos >= size:
                        self._captured.append(bytes(data[pos:pos + size]))
                    else:
                        self._capture = bytearray(data[pos:pos + head_len])
                pos += head_len
                if body:
                    self._left = body * WORD
                    self._size = size
                else:
                    done += 1
                continue
            pos, ended = self._gather(data, pos, end)
            done += ended
        return done

    def _gather(self, data: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int]:
        """Slow path: collect a segment table that arrives in pieces. Returns the
        new position, and 1 if that completed an empty message (else 0)."""
        if len(self._head) < 4:
            need = 4 - len(self._head)
        else:
            need = table_bytes(self._check_count(_U32.unpack_from(self._head)[0])) - len(self._head)
        take = min(need, end - pos)
        self._head += data[pos:pos + take]
        pos += take
        if len(self._head) < 4:
            return pos, 0
        count = self._check_count(_U32.unpack_from(self._head)[0])
        head_len = table_bytes(count)
        if len(self._head) == head_len:
            sizes = struct.unpack_from(f"<{count}I", self._head, 4)
            size = head_len + WORD * sum(sizes)
            if size >= self.capture_from and size <= self.max_message_bytes:
                self._capture = bytearray(self._head)
            self._head.clear()
            if not self._start(head_len, sum(sizes)):
                if self._capture is not None:
                    self._captured.append(bytes(self._capture))
                    self._capture = None
                return pos, 1
        return pos, 0

    def _check_count(self, count_minus_one: int) -> int:
        count = count_minus_one + 1
        if count > self.max_segments:
            self._failed = True
            raise FrameError(f"message of {count} segments (at most {self.max_segments})")
        return count

    def _start(self, head_len: int, body_words: int) -> bool:
        """A table is complete; False if its message is empty (and so already over)."""
        size = head_len + body_words * WORD
        if size > self.max_message_bytes:
            self._failed = True
            raise FrameError(f"message of {size} bytes (at most {self.max_message_bytes})")
        if body_words == 0:
            return False
        self._left = body_words * WORD
        self._size = size
        return True


# --- aliasing ----------------------------------------------------------------

#: Cap'n Proto's default nesting limit; deeper objects are not walked here
#: (the reader refuses them itself).
NESTING_LIMIT = 64

_ELEMENT_BITS = (0, 1, 8, 16, 32, 64, 64, 0)  # by list element size code; 6: pointers


def aliases(message: bytes) -> bool:
    """Following every pointer of ``message`` (framed) visits more words than it
    holds: some pointers share data, and a deep copy would be larger than the
    message. Cap'n Proto's own builders never produce such messages."""
    count = _U32.unpack_from(message)[0] + 1
    words = (len(message) - table_bytes(count)) // WORD
    return traversal_words(message, words) > words


def traversal_words(message: bytes, limit: int) -> int:
    """Words a reader visits following every pointer of ``message`` (a framed
    message), aliases counted each time, as a deep copy would copy them.

    Stops counting once past ``limit`` (and returns that count). A message whose
    objects are each pointed to once visits at most its own size; more means
    pointers alias the same data. Malformed parts are skipped, not reported:
    the Cap'n Proto reader refuses them on its own.
    """
    messages, rest = split(message)
    if len(messages) != 1 or rest:
        raise ValueError("not one whole framed message")
    count = _U32.unpack_from(message)[0] + 1
    sizes = struct.unpack_from(f"<{count}I", message, 4)
    segments: list[memoryview] = []
    pos = table_bytes(count)
    view = memoryview(message)
    for size in sizes:
        segments.append(view[pos:pos + size * WORD])
        pos += size * WORD
    if not sizes[0]:
        return 0
    seen = 0
    # (segment, index of the pointer word, target, depth); target is the object's
    # (segment << 32 | word) for the tag of a double-far landing pad, -2 for a
    # landing pad (no far pointer allowed there), else -1 (the pointer's own offset).
    todo: list[tuple[int, int, int, int]] = [(0, 0, -1, 0)]
    u64 = struct.Struct("<Q").unpack_from
    while todo:
        seg_id, index, target, depth = todo.pop()
        seg = segments[seg_id]
        if index < 0 or index >= len(seg) // WORD:
            continue
        word = u64(seg, index * WORD)[0]
        kind = word & 3
        if kind == 2:  # far pointer: follow the landing pad
            if target != -1:
                continue  # a far pointer where an object's pointer must be: malformed
            pad_seg = word >> 32
            pad = (word >> 3) & 0x1FFFFFFF
            if pad_seg >= len(segments):
                continue
            if not (word >> 2) & 1:
                todo.append((pad_seg, pad, -2, depth))
                continue
            pad_words = segments[pad_seg]
            if pad + 2 > len(pad_words) // WORD:
                continue
            far = u64(pad_words, pad * WORD)[0]
            content_seg = far >> 32
            if far & 3 != 2 or (far >> 2) & 1 or content_seg >= len(segments):
                continue
            # The tag after the landing pad describes an object starting at `far`'s target.
            todo.append((pad_seg, pad + 1, content_seg << 32 | (far >> 3) & 0x1FFFFFFF, depth))
            continue
        if kind == 3 or word == 0 or depth >= NESTING_LIMIT:
            continue
        if target >= 0:
            seg_id, start = target >> 32, target & 0xFFFFFFFF
            seg = segments[seg_id]
            if (word >> 2) & 0x3FFFFFFF:
                continue  # a tag's offset must be zero
        else:
            offset = (word >> 2) & 0x3FFFFFFF
            if offset >= 1 << 29:
                offset -= 1 << 30
            start = index + 1 + offset
        seg_words = len(seg) // WORD
        if kind == 0:
            data, pointers = (word >> 32) & 0xFFFF, word >> 48
            if start < 0 or start + data + pointers > seg_words:
                continue
            seen += data + pointers
            if seen > limit:
                return seen
            todo.extend((seg_id, start + data + i, -1, depth + 1) for i in range(pointers))
            continue
        code, elements = (word >> 32) & 7, word >> 35
        if code == 7:  # inline composite: a tag word, then the elements
            if start < 0 or start + 1 + elements > seg_words:
                continue
            tag = u64(seg, start * WORD)[0]
            n, data, pointers = (tag >> 2) & 0x3FFFFFFF, (tag >> 32) & 0xFFFF, tag >> 48
            if n * (data + pointers) > elements:
                continue
            seen += 1 + n * (data + pointers)
            if seen > limit:
                return seen
            for e in range(n):
                base = start + 1 + e * (data + pointers) + data
                todo.extend((seg_id, base + i, -1, depth + 1) for i in range(pointers))
            continue
        words = (elements * _ELEMENT_BITS[code] + 63) // 64
        if start < 0 or start + words > seg_words:
            continue
        seen += words
        if seen > limit:
            return seen
        if code == 6:
            todo.extend((seg_id, start + i, -1, depth + 1) for i in range(elements))
    return seen
