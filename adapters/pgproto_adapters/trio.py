"""Connections for :mod:`trio`, over trio sockets."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

import trio

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


_NO_DEADLINE = float("inf")


class _Transport:
    def __init__(self) -> None:
        self.sock: trio.socket.SocketType | None = None
        self.deadline = _NO_DEADLINE

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def finish(self, data: bytes) -> None:
        if data and self.sock is not None:
            _send_nowait(self.sock, data)
        self.drop()


async def _pump(
    machine: ConnectionStateMachine, io: _Transport, trace: Tracer | None, until_idle: bool
) -> list[Any]:
    events: list[Any] = []
    while True:
        event = machine.next_event()
        if event is NEED_DATA:
            status = machine.poll()
            if status is PollingStatus.OK:
                return events
            assert io.sock is not None
            if io.deadline == _NO_DEADLINE:
                await _exchange(machine, io.sock, status)
                continue
            with trio.move_on_at(io.deadline) as scope:
                await _exchange(machine, io.sock, status)
            if scope.cancelled_caught:
                machine.timer_expired()
            continue
        if trace is not None:
            trace(event)
        if isinstance(event, OpenConnection):
            try:
                io.sock = trio.socket.from_stdlib_socket(open_socket(event))
            except OSError as exc:
                machine.connection_failed(exc)
                continue
            try:
                with trio.move_on_at(io.deadline) as scope:
                    await io.sock.connect(sockaddr(event.address))
            except OSError as exc:
                io.drop()
                machine.connection_failed(exc)
                continue
            if scope.cancelled_caught:
                io.drop()
                machine.timer_expired()
            else:
                machine.connection_made()
        elif isinstance(event, CloseConnection):
            io.finish(event.data)
        elif isinstance(event, ResolveHost):
            try:
                infos = await trio.socket.getaddrinfo(
                    event.host, event.port, type=socket.SOCK_STREAM
                )
            except socket.gaierror as exc:
                machine.resolve_failed(exc.strerror or str(exc))
            else:
                machine.addresses_resolved(stream_addresses(infos))
        elif isinstance(event, StartTimer):
            io.deadline = trio.current_time() + event.seconds
        elif until_idle:
            events.append(event)


async def _exchange(
    machine: ConnectionStateMachine, sock: trio.socket.SocketType, status: PollingStatus
) -> None:
    if status is PollingStatus.WRITING:
        data = memoryview(machine.data_to_send())
        while data:
            data = data[await sock.send(data) :]
        return
    try:
        received = await sock.recv(RECV_SIZE)
    except OSError:
        received = b""
    machine.receive_data(received)


class Connection(AsyncConnectionBase):
    """An established connection (trio)."""

    _io: _Transport

    async def _run_query(self) -> list[Event]:
        return await _pump(self._machine, self._io, self._trace, until_idle=True)


def _send_nowait(sock: trio.socket.SocketType, data: bytes) -> None:
    """Best-effort send of a final message without waiting (the socket is
    about to close; Terminate is a courtesy)."""
    raw = socket.socket(fileno=sock.fileno())
    try:
        with contextlib.suppress(OSError):
            raw.send(data)
    finally:
        raw.detach()


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
    io.deadline = _NO_DEADLINE
    return Connection(machine, io, trace)
