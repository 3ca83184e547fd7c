"""Connections for :mod:`trio`, over plain non-blocking sockets.

The pump reads and writes the socket directly and awaits trio's
``wait_readable``/``wait_writable`` only when the kernel says EAGAIN (trio's
socket wrapper would pass through the scheduler on every call, even one
that completes at once); a connect always waits for the server at least
once, so it is a checkpoint, and it checks for cancellation on entry.  Deadlines (the per-address
``connect_timeout`` and the caller's overall ``timeout=``) are one cancel
scope around the whole connection attempt, whose deadline moves when the
machine starts a timer; when it fires, the machine is told which deadline
passed and pumping resumes.  Without either deadline there is no scope at
all.  A cancelled connect leaves no socket open.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable
from typing import Any, Final

import trio

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
_FOREVER: Final = float("inf")
_IN_PROGRESS: Final = frozenset((errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR))

wait_readable = trio.lowlevel.wait_readable
wait_writable = trio.lowlevel.wait_writable


class _Transport(Deadlines):
    """The current socket, the deadlines (trio's clock), and the cancel
    scope that enforces them while connecting."""

    __slots__ = ("scope", "sock")

    def __init__(self) -> None:
        # A plain non-blocking socket: it is read and written directly, and
        # trio is asked to wait only when the kernel says EAGAIN (trio's
        # socket wrapper would yield to the scheduler on every call).
        self.sock: socket.socket | None = None
        self.scope: trio.CancelScope | None = None
        super().__init__()

    def moved(self) -> None:
        if self.scope is not None:
            self.scope.deadline = _FOREVER if self.deadline is None else self.deadline

    def drop(self) -> None:
        if self.sock is not None:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
            self.sock = None

    def finish(self, data: bytes) -> None:
        """Best-effort send of a final message without waiting (the socket is
        about to close; Terminate is a courtesy), then close."""
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
        deadline = _FOREVER if io.deadline is None else io.deadline
        with trio.CancelScope(deadline=deadline) as scope:
            io.scope = scope
            try:
                await _pump(machine, io, trace, until_idle=False)
            finally:
                io.scope = None
            return
        io.drop()  # a connect() cut short: the machine has no transport to close
        io.expired(machine)


async def _pump(
    machine: ConnectionStateMachine, io: _Transport, trace: Tracer | None, until_idle: bool
) -> list[Event]:
    """Drive *machine* until it is OK (or idle again after a query); the
    reports it produced when *until_idle*."""
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
                data = memoryview(machine.data_to_send())
                try:
                    while data:
                        try:
                            data = data[sock.send(data) :]
                        except BlockingIOError:
                            await wait_writable(sock)
                except OSError:
                    # As libpq does: drop the output and read on, so that an
                    # error the server sent before closing is what gets reported.
                    pass
                continue
            while True:
                try:
                    received = sock.recv(RECV_SIZE)
                except BlockingIOError:
                    await wait_readable(sock)
                    continue
                except OSError:
                    received = b""  # ECONNRESET and the like: end of file
                break
            machine.receive_data(received)
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
                error = sock.connect_ex(sockaddr(event.address))
                if error in _IN_PROGRESS:
                    await wait_writable(sock)
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError as exc:
                error = exc.errno or errno.EIO
            if error:
                io.drop()
                machine.connection_failed(OSError(error, os.strerror(error)))
                continue
            made(machine, event, sock)
        elif isinstance(event, CloseConnection):
            io.finish(event.data)
        elif isinstance(event, ResolveHost):
            # A deadline abandons the resolver thread (its answer is ignored).
            try:
                infos = await trio.socket.getaddrinfo(
                    resolver_host(event.host), event.port, type=socket.SOCK_STREAM
                )
            except socket.gaierror as exc:
                machine.resolve_failed(exc.strerror or str(exc))
            else:
                machine.addresses_resolved(stream_addresses(infos))
        elif isinstance(event, StartTimer):
            io.start_timer(trio.current_time() + event.seconds)


class Connection(AsyncConnectionBase):
    """An established connection (trio)."""

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
    await trio.lowlevel.checkpoint_if_cancelled()
    start = trio.current_time()
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
