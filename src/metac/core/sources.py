"""Stream sources: what a ``StreamServer`` serves, as endpoints for the pump.

A **source** makes endpoints (``metac.core.pump``). ``open()`` gives a fresh one
each time (a TCP or unix endpoint: every use is a new connection) or the only
one it has (a file, a process's stdio, one end of a memory pair: "one-shot").
"""

from __future__ import annotations

import asyncio
import os
import socket

from metac import errors
from metac.codec.refs import show_endpoint
from metac.core.pump import Endpoint

CONNECT_TIMEOUT = 10.0


def connect_problem(exc: BaseException) -> str:
    """Why a connect failed, for an error message (an OSError's strerror or a timeout)."""
    errno_ = getattr(exc, "errno", None)
    return os.strerror(errno_) if errno_ else "timed out"


class Source:
    """Makes endpoints for a StreamServer."""

    async def open(self) -> Endpoint:
        raise NotImplementedError

    def close(self) -> None:
        """The server is gone: release what was never opened."""


class TcpSource(Source):
    """A TCP endpoint; every ``open`` is a new connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    async def open(self) -> Endpoint:
        loop = asyncio.get_running_loop()
        shown = show_endpoint(self.host, self.port)
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise errors.Unavailable(f"cannot resolve {self.host}: {exc}") from None
        problem = "no address"
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, addr), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                sock.close()
                problem = connect_problem(exc)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return Endpoint.of_socket(sock, name=f"tcp:{shown}")
        raise errors.Unavailable(f"cannot connect to tcp:{shown}: {problem}")


class UnixSource(Source):
    """A unix stream socket; every ``open`` is a new connection."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def open(self) -> Endpoint:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, self.path),
                                   CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise errors.Unavailable(
                f"cannot connect to unix:{self.path}: {connect_problem(exc)}") from None
        return Endpoint.of_socket(sock, name=f"unix:{self.path}")


class OneShotSource(Source):
    """An endpoint that exists once (a file, a process's stdio, a memory pair)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint: Endpoint | None = endpoint

    async def open(self) -> Endpoint:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is None:
            raise errors.FailedPrecondition("this stream can be opened only once and was")
        return endpoint

    def close(self) -> None:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            endpoint.close()


def file_source(fd: int) -> OneShotSource:
    """A file read as a stream (takes ``fd``); what the peer sends is discarded."""
    return OneShotSource(Endpoint.of_fds(fd, os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC),
                                         name="file"))


def stdio_source(stdout_fd: int, stdin_fd: int) -> OneShotSource:
    """A process's stdio, from our ends of its pipes (takes both fds)."""
    return OneShotSource(Endpoint.of_fds(stdout_fd, stdin_fd, name="stdio"))
