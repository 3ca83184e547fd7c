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
import errno
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import trio

from pgproto import Environment, Ping
from pgproto._machine import ConnectionStateMachine

from ._common import (
    RECV_SIZE,
    AsyncConnectionBase,
    AsyncTransport,
    Deadlines,
    NoticeHandler,
    Tracer,
    async_pump,
    closed_while_waiting,
    make_machine,
    open_socket,
    overall_timeout,
    ping_via,
    resolver_host,
    sockaddr,
    stream_addresses,
)

__all__ = ["Connection", "connect", "ping"]

_FOREVER: Final = float("inf")
_IN_PROGRESS: Final = frozenset((errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR))

wait_readable = trio.lowlevel.wait_readable
wait_writable = trio.lowlevel.wait_writable


class _Transport(AsyncTransport):
    """The current socket, the deadlines (trio's clock), and the cancel
    scopes that enforce them while connecting and that cut an idle read short."""

    __slots__ = ("idle", "scope", "sock", "streaming")

    def __init__(self) -> None:
        self.streaming = False
        # A plain non-blocking socket: it is read and written directly, and
        # trio is asked to wait only when the kernel says EAGAIN.
        self.sock: socket.socket | None = None
        self.scope: trio.CancelScope | None = None
        self.idle: trio.CancelScope | None = None
        super().__init__()

    def moved(self) -> None:
        if self.scope is not None:
            self.scope.deadline = _FOREVER if self.deadline is None else self.deadline

    def now(self) -> float:
        return trio.current_time()

    async def open(self, command: Any) -> socket.socket:
        sock = self.sock = open_socket(command)
        try:
            error = sock.connect_ex(sockaddr(command.address))
            if error in _IN_PROGRESS:
                await _wait(wait_writable, sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            error = exc.errno or errno.EIO
        if error:
            self._close()
            raise OSError(error, os.strerror(error))
        return sock

    async def send(self, data: bytes) -> None:
        sock = self._socket()
        view = memoryview(data)
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                await _wait(wait_writable, sock)

    async def receive(self) -> bytes:
        sock = self._socket()
        if self.streaming:
            # The last read filled the buffer: more is waiting, and reading
            # on would never suspend.  Let trio schedule (and deliver a
            # cancellation) first -- before a read, so that nothing read is lost.
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                await _wait(wait_readable, sock)
                continue
            self.streaming = len(data) == RECV_SIZE
            return data

    async def receive_idle(self, deadline: float | None) -> bytes | None:
        sock = self._socket()
        try:
            return sock.recv(RECV_SIZE)
        except BlockingIOError:
            pass
        except OSError:
            return b""
        with trio.CancelScope(deadline=_FOREVER if deadline is None else deadline) as scope:
            self.idle = scope
            try:
                await _wait(wait_readable, sock)
            finally:
                self.idle = None
        if scope.cancelled_caught:
            return None
        try:
            return sock.recv(RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def preempt(self) -> None:
        if self.idle is not None:
            self.idle.cancel()

    async def resolve(self, host: str, port: int) -> list[str]:
        # A deadline abandons the resolver thread (its answer is ignored).
        infos = await trio.socket.getaddrinfo(resolver_host(host), port, type=socket.SOCK_STREAM)
        return stream_addresses(infos)

    async def finish(self, data: bytes) -> None:
        """Best-effort send of a final message without waiting (the socket is
        about to close; Terminate is a courtesy), then close."""
        if data and self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.send(data)
        self._close()

    async def drop(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.sock is not None:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
            self.sock = None

    def _socket(self) -> socket.socket:
        if self.sock is None:
            raise closed_while_waiting()
        return self.sock

    @contextlib.asynccontextmanager
    async def shielded(self, seconds: float) -> AsyncIterator[None]:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + seconds):
            yield

    @property
    def cancellation(self) -> type[BaseException]:
        return trio.Cancelled


async def _wait(wait: Callable[[socket.socket], Any], sock: socket.socket) -> None:
    try:
        await wait(sock)
    except trio.ClosedResourceError:
        raise closed_while_waiting() from None


async def _establish(machine: ConnectionStateMachine, io: _Transport, trace: Tracer | None) -> None:
    """Pump *machine* until it is connected (or raises), under the deadlines;
    then clear them."""
    if not Deadlines.needed(machine, io.overall):
        await async_pump(machine, io, trace)
        return
    while True:
        deadline = _FOREVER if io.deadline is None else io.deadline
        with trio.CancelScope(deadline=deadline) as scope:
            io.scope = scope
            try:
                await async_pump(machine, io, trace)
            finally:
                io.scope = None
            io.clear()
            return
        io._close()  # a connect() cut short: the machine has no transport to close
        io.expired(machine)


class Connection(AsyncConnectionBase):
    """An established connection (trio)."""

    _io: _Transport

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = trio.Lock()

    def _new_transport(self) -> _Transport:
        return _Transport()

    async def _establish_on(self, machine: ConnectionStateMachine, io: AsyncTransport) -> None:
        assert isinstance(io, _Transport)
        await _establish(machine, io, self._trace)


async def connect(
    conninfo: str = "",
    /,
    *,
    env: Environment | None = None,
    trace: Tracer | None = None,
    random_bytes: Callable[[int], bytes] | None = None,
    key_passphrase_hook: Callable[[str], str] | None = None,
    notice_handler: NoticeHandler | None = None,
    timeout: float | None = None,
    **kwargs: Any,
) -> Connection:
    """Connect as libpq's PQconnectdbParams does; raises :class:`pgproto.ConnectError`.

    *timeout* (seconds) bounds the whole attempt, name resolution included,
    on top of the per-address ``connect_timeout``: when it passes, the
    current attempt fails with "timeout expired (overall deadline)" and no
    other host is tried.  *notice_handler* gets every NoticeResponse
    (default: the ``pgproto.notice`` logger).
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
    conn = Connection(machine, io, trace, notice_handler)
    await conn._connect()
    return conn


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
