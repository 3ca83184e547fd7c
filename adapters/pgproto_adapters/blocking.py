"""Blocking connections over non-blocking sockets and poll(2)."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from pgproto import Environment, PollingStatus
from pgproto._events import (
    NEED_DATA,
    CloseConnection,
    OpenConnection,
    ResolveHost,
    StartTimer,
)
from pgproto._machine import ConnectionStateMachine

from ._common import (
    RECV_SIZE,
    ConnectionBase,
    QueryResult,
    Tracer,
    farewell,
    make_machine,
    open_socket,
    resolve,
    sockaddr,
)

__all__ = ["Connection", "connect"]

WAIT_READ = getattr(select, "POLLIN", 1)
WAIT_WRITE = getattr(select, "POLLOUT", 4)


class _Transport:
    """The current socket and the per-address deadline."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.deadline: float | None = None
        # poll(2) where there is one: no kernel object per connection, unlike
        # epoll, and no selector bookkeeping in Python.
        self._poller = select.poll() if hasattr(select, "poll") else None
        self._registered: tuple[int, int] | None = None

    def wait(self, events: int) -> bool:
        """Wait until the socket is ready for *events* (``WAIT_READ`` or
        ``WAIT_WRITE``); False when the deadline passed."""
        assert self.sock is not None
        timeout = None
        if self.deadline is not None:
            timeout = max(0.0, self.deadline - time.monotonic())
        poller = self._poller
        if poller is None:  # pragma: no cover - platforms without poll(2)
            want = [self.sock]
            ready = select.select(
                want if events == WAIT_READ else [],
                want if events == WAIT_WRITE else [],
                want,
                timeout,
            )
            return any(ready)
        fd = self.sock.fileno()
        if self._registered != (fd, events):
            poller.register(fd, events)
            self._registered = (fd, events)
        return bool(poller.poll(None if timeout is None else math.ceil(timeout * 1000)))

    def drop(self) -> None:
        if self.sock is not None:
            if self._registered is not None and self._poller is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._poller.unregister(self._registered[0])
                self._registered = None
            self.sock.close()
            self.sock = None

    def finish(self, data: bytes) -> None:
        """Send *data* if the socket takes it at once, then close the socket."""
        if data and self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.send(data)
        self.drop()

    def close(self, data: bytes = b"") -> None:
        self.finish(data)


def _pump(
    machine: ConnectionStateMachine, io: _Transport, trace: Tracer | None, until_idle: bool
) -> list[Any]:
    """Drive *machine* until it is OK (or idle again after a query)."""
    events: list[Any] = []
    while True:
        event = machine.next_event()
        if event is NEED_DATA:
            status = machine.poll()
            if status is PollingStatus.OK:
                return events
            if status is PollingStatus.WRITING:
                data = machine.data_to_send()
                assert io.sock is not None
                while data:
                    try:
                        sent = io.sock.send(data)
                    except BlockingIOError:
                        sent = 0
                    data = data[sent:]
                    if data and not io.wait(WAIT_WRITE):
                        machine.timer_expired()
                        break
                continue
            if not io.wait(WAIT_READ):
                machine.timer_expired()
                continue
            assert io.sock is not None
            try:
                data = io.sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            machine.receive_data(data)
            continue
        if trace is not None:
            trace(event)
        kind = type(event)
        if kind not in _COMMANDS:
            if until_idle:
                events.append(event)
        elif isinstance(event, OpenConnection):
            _open(machine, io, event)
        elif isinstance(event, CloseConnection):
            io.finish(event.data)
        elif isinstance(event, ResolveHost):
            try:
                machine.addresses_resolved(resolve(event.host, event.port))
            except socket.gaierror as exc:
                machine.resolve_failed(exc.strerror or str(exc))
        elif isinstance(event, StartTimer):
            io.deadline = time.monotonic() + event.seconds


def _open(machine: ConnectionStateMachine, io: _Transport, event: OpenConnection) -> None:
    try:
        sock = open_socket(event)
    except OSError as exc:
        machine.connection_failed(exc)
        return
    io.sock = sock
    error = sock.connect_ex(sockaddr(event.address))
    if error in _IN_PROGRESS:
        if not io.wait(WAIT_WRITE):
            io.drop()
            machine.timer_expired()
            return
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        io.drop()
        machine.connection_failed(OSError(error, os.strerror(error)))
        return
    machine.connection_made()


_COMMANDS = frozenset((OpenConnection, CloseConnection, ResolveHost, StartTimer))
_IN_PROGRESS = frozenset((errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR))


class Connection(ConnectionBase):
    """An established connection (blocking)."""

    def __init__(
        self, machine: ConnectionStateMachine, io: _Transport, trace: Tracer | None
    ) -> None:
        super().__init__(machine)
        self._io = io
        self._trace = trace

    def simple_query(self, sql: str) -> list[QueryResult]:
        """Run *sql* with the simple query protocol; raises ServerError on error."""
        collector = self._begin_query(sql)
        try:
            for event in _pump(self._machine, self._io, self._trace, until_idle=True):
                self._note(event)
                collector.feed(event)
        except BaseException:
            self.close()
            raise
        return collector.outcome()

    def fileno(self) -> int:
        return self._io.sock.fileno() if self._io.sock is not None else -1

    def close(self) -> None:
        """Send Terminate (if healthy) and close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._io.close(farewell(self._machine))

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(
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
        _pump(machine, io, trace, until_idle=False)
    except BaseException:
        io.close()
        raise
    io.deadline = None
    return Connection(machine, io, trace)
