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
import errno
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

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
    connect_failure,
    make_machine,
    open_socket,
    overall_timeout,
    ping_via,
    resolver_host,
    sockaddr,
    stream_addresses,
)

__all__ = ["Connection", "connect", "ping"]

_IN_PROGRESS: Final = frozenset((errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR))


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Transport(AsyncTransport):
    """The current socket, the deadlines (loop time), the timeout that
    enforces them while connecting, and the future a task waits on."""

    __slots__ = ("idle", "loop", "scope", "sock", "streaming", "waiter")

    def __init__(self) -> None:
        self.streaming = False
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self.scope: asyncio.Timeout | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.idle = False  # the waiter is an idle read (preempt() may end it)
        super().__init__()

    def moved(self) -> None:
        if self.scope is not None:
            self.scope.reschedule(self.deadline)

    def now(self) -> float:
        return self.loop.time()

    async def _wait(self, sock: socket.socket, writable: bool) -> None:
        """Until *sock* is readable (writable); ConnectionClosed if it is
        closed meanwhile."""
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

    async def open(self, command: Any) -> socket.socket:
        sock = self.sock = open_socket(command)
        try:
            error = sock.connect_ex(sockaddr(command.address))
            if error in _IN_PROGRESS:
                await self._wait(sock, True)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            self._close()
            raise connect_failure(exc) from None
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
                await self._wait(sock, True)

    async def receive(self) -> bytes:
        sock = self._socket()
        if self.streaming:
            # The last read filled the buffer: more is waiting, and reading
            # on would never suspend.  Let the loop run (and deliver a
            # cancellation) first -- before a read, so that nothing read is lost.
            await asyncio.sleep(0)
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                await self._wait(sock, False)
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
        self.idle = True
        try:
            async with asyncio.timeout_at(deadline):
                await self._wait(sock, False)
        except TimeoutError:
            return None
        finally:
            self.idle = False
        try:
            return sock.recv(RECV_SIZE)
        except BlockingIOError:  # preempted (or a spurious wake-up)
            return None
        except OSError:
            return b""

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

    async def finish(self, data: bytes) -> None:
        if data and self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.send(data)
        self._close()

    async def drop(self) -> None:
        self._close()

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

    def _socket(self) -> socket.socket:
        if self.sock is None:
            raise closed_while_waiting()
        return self.sock

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


async def _establish(machine: ConnectionStateMachine, io: _Transport, trace: Tracer | None) -> None:
    """Pump *machine* until it is connected (or raises), under the deadlines;
    then clear them."""
    if not Deadlines.needed(machine, io.overall):
        await async_pump(machine, io, trace)
        return
    while True:
        scope = io.scope = asyncio.timeout_at(io.deadline)
        try:
            async with scope:
                await async_pump(machine, io, trace)
            io.scope = None
            io.clear()
            return
        except TimeoutError:
            if not scope.expired():
                raise
        finally:
            io.scope = None
        io._close()  # a connect() cut short: the machine has no transport to close
        io.expired(machine)


class Connection(AsyncConnectionBase):
    """An established connection (asyncio)."""

    _io: _Transport

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = asyncio.Lock()

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
    io = _Transport()
    start = io.loop.time()
    machine = make_machine(
        conninfo,
        kwargs,
        env=env,
        random_bytes=random_bytes,
        key_passphrase_hook=key_passphrase_hook,
    )
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
