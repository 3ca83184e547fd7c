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

import socket
from typing import Final

import anyio
import anyio.to_thread

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
    """The socket, the deadlines (anyio's clock), and the cancel scopes that
    enforce them while connecting and that cut an idle read short."""

    lock = staticmethod(anyio.Lock)
    framework = ScopeFramework(
        cancel_scope=anyio.CancelScope,
        current_time=anyio.current_time,
        checkpoint=anyio.lowlevel.checkpoint,
        checkpoint_if_cancelled=anyio.lowlevel.checkpoint_if_cancelled,
        wait_readable=anyio.wait_readable,
        wait_writable=anyio.wait_writable,
        notify_closing=anyio.notify_closing,
        closed_resource_error=anyio.ClosedResourceError,
    )

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
