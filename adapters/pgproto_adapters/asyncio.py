"""Connections for :mod:`asyncio`, over the loop's socket methods.

The pump awaits the loop's socket methods plainly.  Deadlines (the
per-address ``connect_timeout`` and the caller's overall ``timeout=``) are
one :func:`asyncio.timeout_at` around the whole connection attempt, moved
when the machine starts a timer; when it fires, the machine is told which
deadline passed and pumping resumes.  Without either deadline there is no
timeout at all.  A cancelled task leaves no socket open.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any, Final

from pgproto import Environment, Ping, PollingStatus
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
    Deadlines,
    Tracer,
    connect_failure,
    made,
    make_machine,
    open_socket,
    overall_timeout,
    ping_via,
    resolver_host,
    sockaddr,
    stream_addresses,
)

__all__ = ["Connection", "connect", "ping"]

_OK: Final = PollingStatus.OK
_WRITING: Final = PollingStatus.WRITING
_COMMANDS: Final = frozenset((OpenConnection, CloseConnection, ResolveHost, StartTimer))


class _Transport(Deadlines):
    """The current socket, the deadlines (loop time), and the timeout that
    enforces them while connecting."""

    __slots__ = ("scope", "sock")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.scope: asyncio.Timeout | None = None
        super().__init__()

    def moved(self) -> None:
        if self.scope is not None:
            self.scope.reschedule(self.deadline)

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def finish(self, data: bytes) -> None:
        if data and self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.send(data)
        self.drop()


async def _establish(machine: ConnectionStateMachine, io: _Transport, trace: Tracer | None) -> None:
    """Pump *machine* until it is connected (or raises), under the deadlines."""
    if not Deadlines.needed(machine, io.overall):
        await _pump(machine, io, trace, until_idle=False)
        return
    while True:
        scope = io.scope = asyncio.timeout_at(io.deadline)
        try:
            async with scope:
                await _pump(machine, io, trace, until_idle=False)
            return
        except TimeoutError:
            if not scope.expired():
                raise
        finally:
            io.scope = None
        io.drop()  # a connect() cut short: the machine has no transport to close
        io.expired(machine)


async def _pump(
    machine: ConnectionStateMachine, io: _Transport, trace: Tracer | None, until_idle: bool
) -> list[Event]:
    """Drive *machine* until it is OK (or idle again after a query); the
    reports it produced when *until_idle*."""
    loop = asyncio.get_running_loop()
    events: list[Event] = []
    while True:
        event = machine.next_event()
        if event is NEED_DATA:
            status = machine.poll()
            if status is _OK:
                return events
            sock = io.sock
            assert sock is not None
            if status is _WRITING:
                # On failure, as libpq does: drop the output and read on, so
                # that an error the server sent before closing is what is reported.
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(sock, machine.data_to_send())
                continue
            try:
                data = await loop.sock_recv(sock, RECV_SIZE)
            except OSError:
                data = b""  # ECONNRESET and the like: end of file
            machine.receive_data(data)
            continue
        if trace is not None:
            trace(event)
        if type(event) not in _COMMANDS:
            if until_idle:
                events.append(event)
        elif isinstance(event, OpenConnection):
            try:
                sock = open_socket(event)
            except OSError as exc:
                machine.connection_failed(exc)
                continue
            io.sock = sock
            try:
                await loop.sock_connect(sock, sockaddr(event.address))
            except OSError as exc:
                io.drop()
                machine.connection_failed(connect_failure(exc))
                continue
            made(machine, event, sock)
        elif isinstance(event, CloseConnection):
            io.finish(event.data)
        elif isinstance(event, ResolveHost):
            try:
                infos = await _getaddrinfo(loop, resolver_host(event.host), event.port)
            except socket.gaierror as exc:
                machine.resolve_failed(exc.strerror or str(exc))
            else:
                machine.addresses_resolved(stream_addresses(infos))
        elif isinstance(event, StartTimer):
            io.start_timer(loop.time() + event.seconds)


async def _getaddrinfo(
    loop: asyncio.AbstractEventLoop, host: bytes, port: int
) -> list[tuple[Any, ...]]:
    """``getaddrinfo`` for a stream connection.  A numeric address is
    answered at once, in this thread (as trio does); a name goes to the
    loop's executor -- a deadline cuts that wait short, and the lookup goes
    on in the executor's thread, its answer ignored."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass
    return await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)


class Connection(AsyncConnectionBase):
    """An established connection (asyncio)."""

    _io: _Transport

    async def _run_query(self) -> list[Event]:
        return await _pump(self._machine, self._io, self._trace, until_idle=True)

    async def _establish(self) -> None:
        await _establish(self._machine, self._io, self._trace)


async def connect(
    conninfo: str = "",
    /,
    *,
    env: Environment | None = None,
    trace: Tracer | None = None,
    random_bytes: Callable[[int], bytes] | None = None,
    key_passphrase_hook: Callable[[str], str] | None = None,
    timeout: float | None = None,
    **kwargs: Any,
) -> Connection:
    """Connect as libpq's PQconnectdbParams does; raises :class:`pgproto.ConnectError`.

    *timeout* (seconds) bounds the whole attempt, name resolution included,
    on top of the per-address ``connect_timeout``: when it passes, the
    current attempt fails with "timeout expired (overall deadline)" and no
    other host is tried.
    """
    seconds = overall_timeout(timeout)
    loop = asyncio.get_running_loop()
    start = loop.time()
    machine = make_machine(
        conninfo,
        kwargs,
        env=env,
        random_bytes=random_bytes,
        key_passphrase_hook=key_passphrase_hook,
    )
    io = _Transport()
    if seconds is not None:
        io.set_overall(start + seconds)
    try:
        await _establish(machine, io, trace)
    except BaseException:
        io.drop()
        raise
    io.clear()
    return Connection(machine, io, trace)


async def ping(
    conninfo: str = "",
    /,
    *,
    env: Environment | None = None,
    timeout: float | None = None,
    **kwargs: Any,
) -> Ping:
    """libpq's ``PQpingParams``: is the server up and accepting connections?

    Connects exactly as :func:`connect` does and closes the connection if it
    was made.  Never raises for a connection failure: invalid options are
    NO_ATTEMPT (without any network activity); otherwise the last attempt
    that reached an address decides (:func:`pgproto.ping_outcome`) -- a
    server that asks for a password it does not get is up (OK).
    """
    return await ping_via(connect, conninfo, {"env": env, "timeout": timeout, **kwargs})
