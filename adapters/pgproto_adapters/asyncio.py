"""Connections for :mod:`asyncio`, over the loop's socket methods."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from pgproto import Environment, PollingStatus
from pgproto._events import (
    NEED_DATA,
    CloseConnection,
    Event,
    OpenConnection,
    ResolveHost,
    StartTimer,
)
from pgproto._machine import ConnectionStateMachine

from ._common import (
    RECV_SIZE,
    AsyncConnectionBase,
    Tracer,
    make_machine,
    open_socket,
    sockaddr,
    stream_addresses,
)

__all__ = ["Connection", "connect"]

T = TypeVar("T")
_TIMEOUT: Final = object()


class _Transport:
    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.deadline: float | None = None

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def finish(self, data: bytes) -> None:
        if data and self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.send(data)
        self.drop()


async def _within(io: _Transport, operation: Awaitable[T]) -> T | object:
    """Await *operation*, or return _TIMEOUT when the deadline passes first."""
    if io.deadline is None:
        return await operation
    try:
        async with asyncio.timeout_at(io.deadline):
            return await operation
    except TimeoutError:
        return _TIMEOUT


async def _pump(
    machine: ConnectionStateMachine, io: _Transport, trace: Tracer | None, until_idle: bool
) -> list[Any]:
    loop = asyncio.get_running_loop()
    events: list[Any] = []
    while True:
        event = machine.next_event()
        if event is NEED_DATA:
            status = machine.poll()
            if status is PollingStatus.OK:
                return events
            assert io.sock is not None
            if status is PollingStatus.WRITING:
                if (
                    await _within(io, loop.sock_sendall(io.sock, machine.data_to_send()))
                    is _TIMEOUT
                ):
                    machine.timer_expired()
                continue
            try:
                data = await _within(io, loop.sock_recv(io.sock, RECV_SIZE))
            except OSError:
                data = b""
            if data is _TIMEOUT:
                machine.timer_expired()
            else:
                assert isinstance(data, bytes)
                machine.receive_data(data)
            continue
        if trace is not None:
            trace(event)
        if isinstance(event, OpenConnection):
            try:
                sock = open_socket(event)
            except OSError as exc:
                machine.connection_failed(exc)
                continue
            io.sock = sock
            try:
                outcome = await _within(io, loop.sock_connect(sock, sockaddr(event.address)))
            except OSError as exc:
                io.drop()
                machine.connection_failed(exc)
                continue
            if outcome is _TIMEOUT:
                io.drop()
                machine.timer_expired()
            else:
                machine.connection_made()
        elif isinstance(event, CloseConnection):
            io.finish(event.data)
        elif isinstance(event, ResolveHost):
            try:
                infos = await loop.getaddrinfo(event.host, event.port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                machine.resolve_failed(exc.strerror or str(exc))
            else:
                machine.addresses_resolved(stream_addresses(infos))
        elif isinstance(event, StartTimer):
            io.deadline = loop.time() + event.seconds
        elif until_idle:
            events.append(event)


class Connection(AsyncConnectionBase):
    """An established connection (asyncio)."""

    _io: _Transport

    async def _run_query(self) -> list[Event]:
        return await _pump(self._machine, self._io, self._trace, until_idle=True)


async def connect(
    conninfo: str = "",
    /,
    *,
    env: Environment | None = None,
    trace: Tracer | None = None,
    random_bytes: Callable[[int], bytes] | None = None,
    key_passphrase_hook: Callable[[str], str] | None = None,
    **kwargs: Any,
) -> Connection:
    """Connect as libpq's PQconnectdbParams does; raises :class:`pgproto.ConnectError`."""
    machine = make_machine(
        conninfo,
        kwargs,
        env=env,
        random_bytes=random_bytes,
        key_passphrase_hook=key_passphrase_hook,
    )
    io = _Transport()
    try:
        await _pump(machine, io, trace, until_idle=False)
    except BaseException:
        io.drop()
        raise
    io.deadline = None
    return Connection(machine, io, trace)
