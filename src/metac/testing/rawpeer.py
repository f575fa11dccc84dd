"""A hostile peer for tests: raw sockets and hand-made Cap'n Proto RPC messages.

Run as ``python -m metac.testing.rawpeer COMMAND HOST PORT [options]`` inside a
test host. Every command sets its connections up, prints one JSON line
``{"ready": ...}``, holds them until a line arrives on stdin (or ``--hold``
seconds pass), then prints one JSON line with what it observed and exits
(closing every connection). Commands:

``flood``     open ``--count`` TCP connections that never send anything.
``partial``   ``--count`` connections, each sending the segment table of a
              ``--declared``-byte message and ``--send`` bytes of it, then stalling.
``amplify``   ``bootstrap -> getService(SERVICE) -> restore`` ``--calls`` times
              over one connection, with a parameter struct holding a list
              of ``--copies`` pointers that all alias one ``--blob``-byte
              blob (small on the wire, huge when deep-copied).
``idle``      connect; with ``--get-service NAME`` also obtain that service's
              capability (pipelined, never used).

The result tells, per connection, whether and when the other end closed it
(``closed_after``: seconds since ready, ``null`` while open); ``amplify`` and
``idle`` also list the answers received (question 0 is the bootstrap, 1
getService, 2 and on the restore calls).
"""

from __future__ import annotations

import argparse
import json
import resource
import select
import socket
import struct
import sys
import time
from typing import Any

import capnp

from metac.codec.capnp_frames import frame, split
from metac.schema.load import capnp_rpc, compute, core

rpc = capnp_rpc()

NODE_ID = core.Node.schema.node.id
SERVICE_ID = core.Service.schema.node.id
GET_SERVICE = 1  # Node.getService @1
RESTORE = 0  # Service.restore @0


def _message(first_words: int = 1024) -> tuple[Any, Any]:
    builder = capnp._MallocMessageBuilder(first_words)
    return builder, builder.init_root(rpc.Message)


def _framed(builder: Any) -> bytes:
    return frame([bytes(seg) for seg in builder.get_segments_for_output()])


def bootstrap_message(question: int) -> bytes:
    builder, msg = _message()
    msg.init("bootstrap").questionId = question
    return _framed(builder)


def _call(msg: Any, question: int, target_question: int, field: int | None,
          interface_id: int, method_id: int) -> Any:
    call = msg.init("call")
    call.questionId = question
    promised = call.target.init("promisedAnswer")
    promised.questionId = target_question
    if field is not None:
        promised.init("transform", 1)[0].getPointerField = field
    call.interfaceId = interface_id
    call.methodId = method_id
    return call


def get_service_message(question: int, bootstrap_question: int, name: str) -> bytes:
    builder, msg = _message()
    call = _call(msg, question, bootstrap_question, None, NODE_ID, GET_SERVICE)
    params_schema = core.Node.schema.methods["getService"].param_type
    call.params.content.as_struct(params_schema).name = name
    return _framed(builder)


def aliased_restore_message(question: int, service_question: int, *, copies: int,
                            blob_bytes: int) -> bytes:
    """A ``restore`` call whose parameters alias one blob ``copies`` times.

    The parameter struct is written as a ``compute.ProcessDescription``: its
    first pointer is a ``List(Text)``, on the wire a list of byte lists like
    ``List(Data)``. Built in one segment with pycapnp (the first element holds
    the blob, the others are empty), then every other element's pointer is
    rewritten to point at the blob.
    """
    words = blob_bytes // 8 + 2 * copies + 4096
    builder, msg = _message(words)
    call = _call(msg, question, service_question, 0, SERVICE_ID, RESTORE)
    params = call.params.content.as_struct(compute.ProcessDescription)
    junk = params.init("args", copies)
    marker = ("AMPLIFY!" * (blob_bytes // 8 + 1))[:blob_bytes - 1]  # + NUL: blob_bytes
    junk[0] = marker
    for i in range(1, copies):
        junk[i] = ""
    (segment,) = [bytearray(s) for s in builder.get_segments_for_output()]
    target = segment.find(marker.encode())
    assert target >= 0 and target % 8 == 0
    target //= 8
    shape = blob_bytes << 3 | 2  # upper half of a list pointer: count, byte elements
    first = None
    for pos in range(len(segment) // 8):
        word = struct.unpack_from("<Q", segment, pos * 8)[0]
        if word & 3 != 1 or (word >> 32) != shape:
            continue
        offset = (word & 0xFFFFFFFF) >> 2
        if offset >= 1 << 29:
            offset -= 1 << 30
        if pos + 1 + offset == target:
            first = pos
            break
    assert first is not None, "blob pointer not found"
    for i in range(1, copies):
        pos = first + i
        offset = (target - (pos + 1)) & ((1 << 30) - 1)
        struct.pack_into("<Q", segment, pos * 8, shape << 32 | offset << 2 | 1)
    return frame([bytes(segment)])


# --------------------------------------------------------------------------- connections


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, 65536)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _connect_many(host: str, port: int, count: int, timeout: float) -> list[socket.socket]:
    """Open ``count`` connections in parallel; those not up within ``timeout`` are dropped."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    pending: dict[int, socket.socket] = {}
    done: list[socket.socket] = []
    poller = select.poll()
    for _ in range(count):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((host, port))
        pending[s.fileno()] = s
        poller.register(s, select.POLLOUT)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for fd, _ev in poller.poll(100):
            s = pending.pop(fd, None)
            if s is None:
                continue
            poller.unregister(fd)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                done.append(s)
            else:
                s.close()
    for s in pending.values():
        s.close()
    return done


def _send_some(s: socket.socket, data: bytes, timeout: float) -> int:
    """Send what the peer takes within ``timeout``; returns the bytes sent."""
    sent = 0
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += s.send(view[sent:sent + 65536])
        except BlockingIOError:
            select.select([], [s], [], 0.05)
        except OSError:
            break
    return sent


class Watch:
    """Notes when the other end closes each connection; drains what it sends."""

    def __init__(self, socks: list[socket.socket], scanners: bool = False) -> None:
        self.socks = socks
        self.start = time.monotonic()
        self.closed_after: list[float | None] = [None] * len(socks)
        self.received = [bytearray() for _ in socks] if scanners else None

    def poll(self) -> None:
        now = time.monotonic() - self.start
        for i, s in enumerate(self.socks):
            if self.closed_after[i] is not None:
                continue
            try:
                while True:
                    data = s.recv(65536, socket.MSG_DONTWAIT)
                    if not data:
                        self.closed_after[i] = round(now, 2)
                        break
                    if self.received is not None:
                        self.received[i] += data
            except BlockingIOError:
                pass
            except OSError:
                self.closed_after[i] = round(now, 2)

    def hold(self, seconds: float, until: Any = None) -> None:
        """Poll until a line (or EOF) on stdin, ``until()`` is true, or ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll()
            if until is not None and until():
                break
            ready, _, _ = select.select([sys.stdin], [], [], 0.2)
            if ready:
                sys.stdin.readline()
                break
        self.poll()

    def all_closed(self) -> bool:
        return all(c is not None for c in self.closed_after)

    def returns(self) -> list[list[str]]:
        return [_returns(bytes(r)) for r in self.received or ()]

    def result(self) -> dict[str, Any]:
        closed = [c for c in self.closed_after if c is not None]
        return {"connections": len(self.socks), "closed": len(closed),
                "open": len(self.socks) - len(closed), "closed_after": self.closed_after}

    def close(self) -> None:
        for s in self.socks:
            s.close()


def _returns(data: bytes) -> list[str]:
    """What each Return message in ``data`` says, after its question id (``1 results``,
    ``2 exception: REASON``, ``3 canceled``...), and ``abort: REASON`` for an Abort."""
    out: list[str] = []
    for raw in split(data)[0]:
        with rpc.Message.from_bytes(raw, traversal_limit_in_words=1 << 26) as m:
            if m.which() == "return":
                ret = getattr(m, "return")
                which = ret.which()
                said = f"exception: {ret.exception.reason}" if which == "exception" else which
                out.append(f"{ret.answerId} {said}")
            elif m.which() == "abort":
                out.append(f"abort: {m.abort.reason}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rawpeer", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["flood", "partial", "amplify", "idle"])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--declared", type=int, default=63 << 20, help="partial: message size")
    p.add_argument("--send", type=int, default=62 << 20, help="partial: bytes of it to send")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--copies", type=int, default=900)
    p.add_argument("--blob", type=int, default=32 << 10)
    p.add_argument("--service", default="stream")
    p.add_argument("--get-service", default="")
    p.add_argument("--hold", type=float, default=120.0)
    p.add_argument("--until-closed", action="store_true",
                   help="stop holding once the other end closed every connection")
    p.add_argument("--until-returns", type=int, default=0,
                   help="stop holding once this many Return messages arrived (or all closed)")
    p.add_argument("--connect-timeout", type=float, default=20.0)
    args = p.parse_args(argv)
    _raise_fd_limit()

    count = 1 if args.command in ("amplify", "idle") else args.count
    socks = _connect_many(args.host, args.port, count, args.connect_timeout)
    ready: dict[str, Any] = {"connected": len(socks)}
    if args.command == "partial":
        body = args.declared - 8
        table = struct.pack("<II", 0, body // 8)
        payload = table + b"\0" * min(args.send, body)
        ready["sent"] = [_send_some(s, payload, 2.0) for s in socks]
    elif args.command == "amplify":
        msgs = [bootstrap_message(0), get_service_message(1, 0, args.service)]
        call = aliased_restore_message(2, 1, copies=args.copies, blob_bytes=args.blob)
        ready["call_bytes"] = len(call)
        for sock in socks:
            sent = sum(_send_some(sock, m, 10.0) for m in msgs)
            for i in range(args.calls):
                # the question id sits in the call struct's first data word; rebuild per call
                m = call if i == 0 else aliased_restore_message(
                    2 + i, 1, copies=args.copies, blob_bytes=args.blob)
                sent += _send_some(sock, m, 10.0)
            ready["sent"] = sent
    elif args.command == "idle":
        for sock in socks:
            _send_some(sock, bootstrap_message(0), 5.0)
            if args.get_service:
                _send_some(sock, get_service_message(1, 0, args.get_service), 5.0)
    watch = Watch(socks, scanners=args.command in ("amplify", "idle"))
    print(json.dumps({"ready": ready}), flush=True)
    try:
        until = None
        if args.until_returns:
            def until() -> bool:
                return watch.all_closed() or sum(map(len, watch.returns())) >= args.until_returns
        elif args.until_closed:
            until = watch.all_closed
        watch.hold(args.hold, until)
        result = watch.result()
        if watch.received is not None:
            result["returns"] = watch.returns()
        print(json.dumps(result), flush=True)
    finally:
        watch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
