"""Connections for :mod:`asyncio`, over plain non-blocking sockets.

The transport reads and writes the socket directly and waits with the
loop's ``add_reader``/``add_writer`` only when the kernel says EAGAIN; every
wait is a future of its own, so that a cancelled task knows exactly what
was sent (the loop's ``sock_sendall`` does not say), and so that closing
the connection wakes the task waiting on it.  Deadlines (the per-address
``connect_timeout`` and the caller's overall ``timeout=``) are one
:func:`asyncio.timeout_at` around the whole connection attempt, moved when
the machine starts a timer; when it fires, the machine is told which
deadline passed and pumping resumes.  Without either deadline there is no
timeout at all.  A cancelled task leaves no socket open.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Final

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


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Transport(SocketTransport):
    """The socket, the deadlines (loop time), the timeout that enforces them
    while connecting, and the future a task waits on."""

    scope: asyncio.Timeout | None = None
    waiter: asyncio.Future[None] | None = None
    idle = False  # the waiter is an idle read (preempt() may end it)

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        super().__init__()

    lock = staticmethod(asyncio.Lock)

    def moved(self) -> None:
        if self.scope is not None:
            self.scope.reschedule(self.deadline)

    def now(self) -> float:
        return self.loop.time()

    async def pump_before_deadline(
        self, machine: ConnectionStateMachine, trace: Tracer | None
    ) -> bool:
        scope = self.scope = asyncio.timeout_at(self.deadline)
        try:
            async with scope:
                await async_pump(machine, self, trace)
        except TimeoutError:
            if not scope.expired():
                raise
            return False
        finally:
            self.scope = None
        return True

    async def _wait(self, sock: socket.socket, writable: bool) -> None:
        loop, fd = self.loop, sock.fileno()
        waiter = self.waiter = loop.create_future()
        if writable:
            loop.add_writer(fd, _wake, waiter)
        else:
            loop.add_reader(fd, _wake, waiter)
        try:
            await waiter
        finally:
            self.waiter = None
            if self.sock is sock:  # else _close() unregistered it
                if writable:
                    loop.remove_writer(fd)
                else:
                    loop.remove_reader(fd)

    async def _wait_idle(self, sock: socket.socket, deadline: float | None) -> bool:
        self.idle = True
        try:
            async with asyncio.timeout_at(deadline):
                await self._wait(sock, False)
        except TimeoutError:
            return False
        finally:
            self.idle = False
        return True  # readable -- or preempted: the read will tell

    async def _checkpoint(self) -> None:
        await asyncio.sleep(0)

    def preempt(self) -> None:
        if self.idle and self.waiter is not None:
            _wake(self.waiter)

    async def resolve(self, host: str, port: int) -> list[str]:
        """A numeric address is answered at once, in this thread (as trio
        does); a name goes to the loop's executor -- a deadline cuts that
        wait short, and the lookup goes on in the executor's thread, its
        answer ignored."""
        name = resolver_host(host)
        try:
            infos = socket.getaddrinfo(
                name, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        except socket.gaierror:
            infos = await self.loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        return stream_addresses(infos)

    def _close(self) -> None:
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        waiter = self.waiter
        if waiter is not None:
            fd = sock.fileno()
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
            if not waiter.done():
                waiter.set_exception(closed_while_waiting())
        sock.close()

    @contextlib.asynccontextmanager
    async def shielded(self, seconds: float) -> AsyncIterator[None]:
        # asyncio delivers a cancellation once: after the CancelledError was
        # caught, awaits work again unless the task is cancelled anew.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                yield

    @property
    def cancellation(self) -> type[BaseException]:
        return asyncio.CancelledError


class Connection(AsyncConnectionBase):
    """An established connection (asyncio)."""

    transport = _Transport
    _io: _Transport


_entry_points: Final = AsyncEntryPoints(Connection)
connect = _entry_points.connect
ping = _entry_points.ping
