"""Connections for :mod:`anyio`, on either of its backends (asyncio, trio),
over plain non-blocking sockets.

As in the trio adapter, the transport reads and writes the socket directly
and awaits ``anyio.wait_readable``/``wait_writable`` only when the kernel
says EAGAIN (anyio's byte streams would build a transport and pass through
the scheduler on every call: on the asyncio backend a connection cost
twice the Python).  A connect checks for cancellation on entry.

Deadlines (the per-address ``connect_timeout`` and the caller's overall
``timeout=``) are one cancel scope around the whole connection attempt,
whose deadline moves when the machine starts a timer.  A cancelled connect
leaves no socket open; closing a connection wakes every task waiting on it
(``anyio.notify_closing``).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Final

import anyio
import anyio.to_thread

from pgproto._machine import ConnectionStateMachine

from ._common import (
    AsyncConnectionBase,
    AsyncEntryPoints,
    SocketTransport,
    Tracer,
    async_pump,
    closed_while_waiting,
    resolver_host,
    stream_addresses,
)

__all__ = ["Connection", "connect", "ping"]

_FOREVER: Final = float("inf")


class _Transport(SocketTransport):
    """The socket, the deadlines (anyio's clock), and the cancel scopes that
    enforce them while connecting and that cut an idle read short."""

    __slots__ = ("idle", "scope")

    def __init__(self) -> None:
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

    async def _wait(self, sock: socket.socket, writable: bool) -> None:
        try:
            await (anyio.wait_writable if writable else anyio.wait_readable)(sock)
        except anyio.ClosedResourceError:
            raise closed_while_waiting() from None

    async def _wait_idle(self, sock: socket.socket, deadline: float | None) -> bool:
        with anyio.CancelScope(deadline=_FOREVER if deadline is None else deadline) as scope:
            self.idle = scope
            try:
                await self._wait(sock, False)
            finally:
                self.idle = None
        return not scope.cancelled_caught

    async def _checkpoint(self) -> None:
        await anyio.lowlevel.checkpoint()

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

    def _close(self) -> None:
        if self.sock is not None:
            anyio.notify_closing(self.sock)
            self.sock.close()
            self.sock = None

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
