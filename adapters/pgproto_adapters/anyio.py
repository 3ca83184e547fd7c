"""Connections for :mod:`anyio`, on either of its backends (asyncio, trio),
over anyio's byte streams.

The socket is made and connected as in the other adapters (the same
options, the same errors), awaiting ``anyio.wait_writable`` while the
kernel connects it; then anyio wraps it in its byte stream
(``SocketStream.from_socket``), and everything after -- the handshake,
queries, notifications -- is ``send``/``receive`` on that stream.  TLS stays
in the core: the stream carries what the machine encrypted.

Deadlines (the per-address ``connect_timeout`` and the caller's overall
``timeout=``) are one cancel scope around the whole connection attempt,
whose deadline moves when the machine starts a timer.  A cancelled connect
leaves no socket open: the stream is closed forcefully and the socket with
it, before the cancellation goes on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator
from typing import Any, Final

import anyio
import anyio.abc
import anyio.to_thread

from pgproto._machine import ConnectionStateMachine

from ._common import (
    IN_PROGRESS,
    RECV_SIZE,
    AsyncConnectionBase,
    AsyncEntryPoints,
    AsyncTransport,
    Tracer,
    async_pump,
    closed_while_waiting,
    open_socket,
    resolver_host,
    sockaddr,
    stream_addresses,
)

__all__ = ["Connection", "connect", "ping"]

_FOREVER: Final = float("inf")
#: How long a closing connection may wait to hand Terminate to the stream.
_FAREWELL_SECONDS: Final = 1.0


class _Transport(AsyncTransport):
    """The current socket and its byte stream, the deadlines (anyio's clock),
    and the cancel scopes that enforce them and cut an idle read short."""

    __slots__ = ("idle", "raw", "scope", "stream")

    def __init__(self) -> None:
        self.raw: socket.socket | None = None
        self.stream: anyio.abc.SocketStream | anyio.abc.UNIXSocketStream | None = None
        self.scope: anyio.CancelScope | None = None
        self.idle: anyio.CancelScope | None = None
        super().__init__()

    lock = staticmethod(anyio.Lock)

    def moved(self) -> None:
        if self.scope is not None:
            self.scope.deadline = _FOREVER if self.deadline is None else self.deadline

    def now(self) -> float:
        return anyio.current_time()

    async def enter(self) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()

    async def pump_before_deadline(
        self, machine: ConnectionStateMachine, trace: Tracer | None
    ) -> bool:
        deadline = _FOREVER if self.deadline is None else self.deadline
        with anyio.CancelScope(deadline=deadline) as scope:
            self.scope = scope
            try:
                await async_pump(machine, self, trace)
            finally:
                self.scope = None
            return True
        return False

    async def open(self, command: Any) -> socket.socket:
        sock = self.raw = open_socket(command)
        try:
            error = sock.connect_ex(sockaddr(command.address))
            if error in IN_PROGRESS:
                try:
                    await anyio.wait_writable(sock)
                except anyio.ClosedResourceError:
                    raise closed_while_waiting() from None
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            error = exc.errno or errno.EIO
        if error:
            await self.drop()
            raise OSError(error, os.strerror(error))
        try:
            if command.address.kind == "unix":
                self.stream = await anyio.abc.UNIXSocketStream.from_socket(sock)
            else:
                self.stream = await anyio.abc.SocketStream.from_socket(sock)
        except BaseException:
            await self.drop()
            raise
        return sock

    def _stream(self) -> anyio.abc.SocketStream | anyio.abc.UNIXSocketStream:
        if self.stream is None:
            raise closed_while_waiting()
        return self.stream

    async def send(self, data: bytes) -> None:
        try:
            await self._stream().send(data)
        except anyio.ClosedResourceError:
            raise closed_while_waiting() from None
        except anyio.BrokenResourceError as exc:
            raise OSError(errno.EPIPE, "the stream is broken") from exc

    async def receive(self) -> bytes:
        try:
            return await self._stream().receive(RECV_SIZE)
        except anyio.EndOfStream:
            return b""
        except anyio.BrokenResourceError:
            return b""  # ECONNRESET and the like: end of file
        except anyio.ClosedResourceError:
            raise closed_while_waiting() from None

    async def receive_idle(self, deadline: float | None) -> bytes | None:
        data = None
        with anyio.CancelScope(deadline=_FOREVER if deadline is None else deadline) as scope:
            self.idle = scope
            try:
                data = await self.receive()
            finally:
                self.idle = None
        return data

    def preempt(self) -> None:
        if self.idle is not None:
            self.idle.cancel()

    async def resolve(self, host: str, port: int) -> list[str]:
        name = resolver_host(host)
        try:
            infos = socket.getaddrinfo(
                name, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        except socket.gaierror:
            # A deadline abandons the resolver thread (its answer is ignored).
            infos = await anyio.to_thread.run_sync(
                lambda: socket.getaddrinfo(name, port, type=socket.SOCK_STREAM),
                abandon_on_cancel=True,
            )
        return stream_addresses(infos)

    async def finish(self, data: bytes) -> None:
        stream = self.stream
        if data and stream is not None:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(_FAREWELL_SECONDS),
                contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError),
            ):
                await stream.send(data)
        await self.drop()

    async def drop(self) -> None:
        stream, raw = self.stream, self.raw
        self.stream = self.raw = None
        if stream is not None:
            await anyio.aclose_forcefully(stream)
        if raw is not None:
            # Without a stream yet (connecting): wake a wait_writable.  With
            # one, the stream closed it already, or will at the loop's next
            # turn (asyncio's transport): closing it here makes it at once.
            if stream is None:
                anyio.notify_closing(raw)
            raw.close()

    @contextlib.asynccontextmanager
    async def shielded(self, seconds: float) -> AsyncIterator[None]:
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + seconds):
            yield

    @property
    def cancellation(self) -> type[BaseException]:
        return anyio.get_cancelled_exc_class()


class Connection(AsyncConnectionBase):
    """An established connection (anyio)."""

    transport = _Transport
    _io: _Transport


_entry_points: Final = AsyncEntryPoints(Connection)
connect = _entry_points.connect
ping = _entry_points.ping
