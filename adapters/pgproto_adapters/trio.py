"""Connections for :mod:`trio`, over plain non-blocking sockets.

The transport reads and writes the socket directly and awaits trio's
``wait_readable``/``wait_writable`` only when the kernel says EAGAIN (trio's
socket wrapper would pass through the scheduler on every call, even one
that completes at once); a connect always waits for the server at least
once, so it is a checkpoint, and it checks for cancellation on entry.
Deadlines (the per-address ``connect_timeout`` and the caller's overall
``timeout=``) are one cancel scope around the whole connection attempt,
whose deadline moves when the machine starts a timer; when it fires, the
machine is told which deadline passed and pumping resumes.  Without either
deadline there is no scope at all.  A cancelled connect leaves no socket
open; closing a connection wakes every task waiting on it
(``trio.lowlevel.notify_closing``).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Final

import trio

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

wait_readable = trio.lowlevel.wait_readable
wait_writable = trio.lowlevel.wait_writable


class _Transport(SocketTransport):
    """The socket, the deadlines (trio's clock), and the cancel scopes that
    enforce them while connecting and that cut an idle read short."""

    __slots__ = ("idle", "scope")

    def __init__(self) -> None:
        self.scope: trio.CancelScope | None = None
        self.idle: trio.CancelScope | None = None
        super().__init__()

    lock = staticmethod(trio.Lock)

    def moved(self) -> None:
        if self.scope is not None:
            self.scope.deadline = _FOREVER if self.deadline is None else self.deadline

    def now(self) -> float:
        return trio.current_time()

    async def enter(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()

    async def pump_before_deadline(
        self, machine: ConnectionStateMachine, trace: Tracer | None
    ) -> bool:
        deadline = _FOREVER if self.deadline is None else self.deadline
        with trio.CancelScope(deadline=deadline) as scope:
            self.scope = scope
            try:
                await async_pump(machine, self, trace)
            finally:
                self.scope = None
            return True
        return False

    async def _wait(self, sock: socket.socket, writable: bool) -> None:
        try:
            await (wait_writable if writable else wait_readable)(sock)
        except trio.ClosedResourceError:
            raise closed_while_waiting() from None

    async def _wait_idle(self, sock: socket.socket, deadline: float | None) -> bool:
        with trio.CancelScope(deadline=_FOREVER if deadline is None else deadline) as scope:
            self.idle = scope
            try:
                await self._wait(sock, False)
            finally:
                self.idle = None
        return not scope.cancelled_caught

    async def _checkpoint(self) -> None:
        await trio.lowlevel.checkpoint()

    def preempt(self) -> None:
        if self.idle is not None:
            self.idle.cancel()

    async def resolve(self, host: str, port: int) -> list[str]:
        # A deadline abandons the resolver thread (its answer is ignored).
        infos = await trio.socket.getaddrinfo(resolver_host(host), port, type=socket.SOCK_STREAM)
        return stream_addresses(infos)

    def _close(self) -> None:
        if self.sock is not None:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
            self.sock = None

    @contextlib.asynccontextmanager
    async def shielded(self, seconds: float) -> AsyncIterator[None]:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + seconds):
            yield

    @property
    def cancellation(self) -> type[BaseException]:
        return trio.Cancelled


class Connection(AsyncConnectionBase):
    """An established connection (trio)."""

    transport = _Transport
    _io: _Transport


_entry_points: Final = AsyncEntryPoints(Connection)
connect = _entry_points.connect
ping = _entry_points.ping
