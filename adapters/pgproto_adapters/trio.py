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

import socket
from typing import Final

import trio

from ._common import (
    AsyncConnectionBase,
    AsyncEntryPoints,
    ScopedSocketTransport,
    ScopeFramework,
    resolver_host,
    stream_addresses,
)

__all__ = ["Connection", "connect", "ping"]


class _Transport(ScopedSocketTransport):
    """The socket, the deadlines (trio's clock), and the cancel scopes that
    enforce them while connecting and that cut an idle read short."""

    lock = staticmethod(trio.Lock)
    framework = ScopeFramework(
        cancel_scope=trio.CancelScope,
        current_time=trio.current_time,
        checkpoint=trio.lowlevel.checkpoint,
        checkpoint_if_cancelled=trio.lowlevel.checkpoint_if_cancelled,
        wait_readable=trio.lowlevel.wait_readable,
        wait_writable=trio.lowlevel.wait_writable,
        notify_closing=trio.lowlevel.notify_closing,
        closed_resource_error=trio.ClosedResourceError,
    )

    async def resolve(self, host: str, port: int) -> list[str]:
        # A deadline abandons the resolver thread (its answer is ignored).
        infos = await trio.socket.getaddrinfo(resolver_host(host), port, type=socket.SOCK_STREAM)
        return stream_addresses(infos)

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
