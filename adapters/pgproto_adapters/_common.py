"""What the adapters share: socket setup, query results, the Connection surface.

Everything here is IO-model neutral: it builds and configures sockets but
never waits on them.  Each adapter module is the pump loop for one IO model.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Final, Generic, Protocol, Self, TypeVar

from pgproto import (
    CancelStateMachine,
    ConnectionClosed,
    ConnParams,
    Environment,
    Error,
    Ping,
    PollingStatus,
    ServerError,
    ping_outcome,
    resolve_params,
)
from pgproto._events import (
    NEED_DATA,
    Address,
    CloseConnection,
    CommandComplete,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    Event,
    NoticeResponse,
    NotificationResponse,
    OpenConnection,
    ReadyForQuery,
    ResolveHost,
    RowDescription,
    StartTimer,
)
from pgproto._machine import ConnectionStateMachine

__all__ = [
    "IN_PROGRESS",
    "AsyncConnectionBase",
    "AsyncEntryPoints",
    "ConnectionBase",
    "QueryCollector",
    "QueryResult",
    "ScopeFramework",
    "ScopedSocketTransport",
    "SocketTransport",
    "Tracer",
    "establish",
    "made",
    "make_machine",
    "open_socket",
    "peer_uid",
]

#: A callable that sees every event the machine produces (``--trace`` uses it).
Tracer = Callable[[Event], None]

RECV_SIZE: Final = 65536
#: What a non-blocking connect() says while the kernel connects the socket.
IN_PROGRESS: Final = frozenset((errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR))


def make_machine(
    conninfo: str,
    kwargs: dict[str, Any],
    *,
    env: Environment | None = None,
    random_bytes: Callable[[int], bytes] | None = None,
    key_passphrase_hook: Callable[[str], str] | None = None,
    trace: Tracer | None = None,
) -> ConnectionStateMachine:
    """Resolve the parameters and build the machine for one connection.
    Without a *trace* the machine makes no reports (``reports=False``):
    nothing but the trace would read them."""
    params: ConnParams = resolve_params(conninfo, env=env, **kwargs)
    return ConnectionStateMachine(
        params,
        random_bytes=random_bytes or os.urandom,
        key_passphrase_hook=key_passphrase_hook,
        reports=trace is not None,
    )


def _family(address: Address) -> socket.AddressFamily:
    if address.kind == "unix":
        return socket.AF_UNIX
    return socket.AF_INET6 if ipaddress.ip_address(address.address).version == 6 else socket.AF_INET


def sockaddr(address: Address) -> str | bytes | tuple[str, int]:
    """The address in the form ``socket.connect`` takes."""
    if address.kind == "unix":
        if address.address.startswith("@"):
            return b"\x00" + address.address[1:].encode("utf-8", "surrogateescape")
        return address.address
    return (address.address, address.port)


_SOCK_NONBLOCK: Final = getattr(socket, "SOCK_NONBLOCK", 0)
_NONBLOCKING_STREAM: Final = socket.SOCK_STREAM | _SOCK_NONBLOCK


def open_socket(command: OpenConnection) -> socket.socket:
    """A non-blocking, close-on-exec socket for *command*, with libpq's TCP options."""
    # Non-blocking from the start where the platform can say so in socket()
    # (one system call less than setblocking() after it).
    sock = socket.socket(_family(command.address), _NONBLOCKING_STREAM)
    try:
        if not _SOCK_NONBLOCK:  # pragma: no cover - not Linux
            sock.setblocking(False)
        if command.address.kind == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if command.keepalives:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                _set_tcp(sock, "TCP_KEEPIDLE", command.keepalives_idle)
                _set_tcp(sock, "TCP_KEEPINTVL", command.keepalives_interval)
                _set_tcp(sock, "TCP_KEEPCNT", command.keepalives_count)
                _set_tcp(sock, "TCP_USER_TIMEOUT", command.tcp_user_timeout)
    except BaseException:
        sock.close()
        raise
    return sock


class _Socket(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


def peer_uid(sock: _Socket) -> int | None:
    """The user id of the process at the other end of a connected Unix
    socket (libpq's getpeereid), or None where the platform cannot tell."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:  # pragma: no cover - not Linux
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def made(machine: ConnectionStateMachine, command: OpenConnection, sock: _Socket) -> None:
    """Tell *machine* the connection for *command* is open (with the peer's
    credentials when the command asks for them)."""
    if command.peer_credentials:
        machine.connection_made(peer_uid=peer_uid(sock))
    else:
        machine.connection_made()


def _set_tcp(sock: socket.socket, name: str, value: int | None) -> None:
    option = getattr(socket, name, None)
    if value is not None and value > 0 and option is not None:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)


def stream_addresses(infos: Iterable[tuple[Any, ...]]) -> list[str]:
    """The IPv4/IPv6 addresses of a ``getaddrinfo`` answer, in resolver order
    (libpq keeps them all and in that order)."""
    return [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


def resolve(host: str, port: int) -> list[str]:
    """Blocking getaddrinfo for a stream connection, in libpq's way."""
    return stream_addresses(socket.getaddrinfo(resolver_host(host), port, type=socket.SOCK_STREAM))


def farewell(machine: ConnectionStateMachine) -> bytes:
    """Close *machine*; the bytes to send before closing the socket (Terminate
    on a healthy connection, else nothing)."""
    machine.close()
    data = b""
    try:
        while (event := machine.next_event()) is not NEED_DATA:
            if isinstance(event, CloseConnection):
                data += event.data
    except Error:
        pass  # the connection was already broken; that error has been reported
    return data


# --------------------------------------------------------------------------
# query results


@dataclass(slots=True)
class QueryResult:
    """One statement's result: column names, rows of text (None for NULL), tag."""

    columns: tuple[str, ...] = ()
    rows: list[tuple[str | None, ...]] = field(default_factory=list)
    tag: str | None = None


class QueryCollector:
    """Gathers the events of one simple query into results."""

    __slots__ = ("error", "results")

    def __init__(self) -> None:
        self.results: list[QueryResult] = []
        self.error: ServerError | None = None

    def feed(self, event: Event) -> bool:
        """Take one event; True once the query is over (ReadyForQuery)."""
        if isinstance(event, DataRow):
            if not self.results or self.results[-1].tag is not None:
                self.results.append(QueryResult())
            self.results[-1].rows.append(event.values)
        elif isinstance(event, RowDescription):
            self.results.append(QueryResult(columns=event.columns))
        elif isinstance(event, CommandComplete):
            if not self.results or self.results[-1].tag is not None:
                self.results.append(QueryResult())
            self.results[-1].tag = event.tag
        elif isinstance(event, EmptyQueryResponse):
            self.results.append(QueryResult(tag=""))
        elif isinstance(event, ErrorResponse):
            if self.error is None:
                self.error = event.error
        elif isinstance(event, ReadyForQuery):
            return True
        return False

    def outcome(self) -> list[QueryResult]:
        if self.error is not None:
            raise self.error
        return self.results


# --------------------------------------------------------------------------
# the Connection surface

#: Where the default notice handler sends server notices.
NOTICE_LOGGER: Final = logging.getLogger("pgproto.notice")
_NOTICE_LEVELS: Final = {
    "WARNING": logging.WARNING,
    "NOTICE": logging.INFO,
    "INFO": logging.INFO,
    "LOG": logging.DEBUG,
}
#: Notifications kept for :meth:`notifies` at most; the oldest are dropped
#: (with a warning in the log) when a connection receives more than this
#: while nobody reads them.
MAX_PENDING_NOTIFIES: Final = 65536
#: How long a cancelled query may take to be cancelled and drained when the
#: connection has no ``connect_timeout`` (seconds).
DEFAULT_CANCEL_GRACE: Final = 10.0

NoticeHandler = Callable[[NoticeResponse], None]
_ASYNCHRONOUS: Final = frozenset((NoticeResponse, NotificationResponse))
_log = logging.getLogger("pgproto")
# A library's loggers say nothing unless the application configures logging
# (without this, logging's last-resort handler prints warnings on stderr).
_log.addHandler(logging.NullHandler())


def log_notice(notice: NoticeResponse) -> None:
    """The default notice handler: log *notice* on the ``pgproto.notice``
    logger (WARNING as a warning, NOTICE and INFO as info, LOG and DEBUG as
    debug) -- never on stderr by itself."""
    severity = notice.severity
    level = _NOTICE_LEVELS.get(severity, logging.DEBUG)
    if NOTICE_LOGGER.isEnabledFor(level):
        NOTICE_LOGGER.log(level, "%s:  %s", severity or "NOTICE", notice.message)


def cancel_grace(machine: ConnectionStateMachine) -> float:
    """The bound on cancelling and draining an interrupted query:
    ``connect_timeout``, else :data:`DEFAULT_CANCEL_GRACE`."""
    seconds = machine.params.connect_timeout
    return float(seconds) if seconds is not None else DEFAULT_CANCEL_GRACE


class _HasAsynchronous(Protocol):
    asynchronous: list[Event]


class ConnectionBase:
    """The surface every adapter's Connection shares."""

    _machine: ConnectionStateMachine
    _io: Any  # the adapter's transport (each adapter's Connection says which)
    _closed = False

    def __init__(
        self,
        machine: ConnectionStateMachine,
        io: Any,
        trace: Tracer | None,
        notice_handler: NoticeHandler | None = None,
    ) -> None:
        self._machine = machine
        self._io = io
        self._trace = trace
        #: Called with every NoticeResponse, in order (default: :func:`log_notice`).
        self.notice_handler: NoticeHandler = notice_handler or log_notice
        self._pending_notifies: collections.deque[NotificationResponse] = collections.deque()

    @property
    def machine(self) -> ConnectionStateMachine:
        return self._machine

    @property
    def host(self) -> str | None:
        """The host name this connection went to (None if only hostaddr was given)."""
        host = self._machine.host
        return host.host if host is not None else None

    @property
    def hostaddr(self) -> str | None:
        """The address dialled: numeric IP, or the socket path."""
        address = self._machine.address
        return address.address if address is not None else None

    @property
    def port(self) -> int | None:
        address = self._machine.address
        return address.port if address is not None else None

    @property
    def ssl_in_use(self) -> bool:
        return self._machine.ssl_in_use

    @property
    def protocol_version(self) -> tuple[int, int]:
        return self._machine.protocol_version

    @property
    def backend_pid(self) -> int | None:
        return self._machine.backend_pid

    @property
    def server_parameters(self) -> dict[str, str]:
        """The server's parameters as last reported (ParameterStatus), also
        after startup: ``SET application_name`` shows here."""
        return self._machine.server_parameters

    @property
    def transaction_status(self) -> str | None:
        """``"I"`` idle, ``"T"`` in a transaction, ``"E"`` in a failed one."""
        return self._machine.transaction_status

    @property
    def auth_method(self) -> str | None:
        return self._machine.auth_method

    @property
    def channel_binding_used(self) -> bool:
        return self._machine.channel_binding_used

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosed("the connection is closed")

    def _begin_query(self, sql: str) -> QueryCollector:
        self._check_open()
        self._machine.send_query(sql)
        return QueryCollector()

    def _cancel_machine(self) -> CancelStateMachine:
        """The cancel request for the running query (``PQcancelCreate``)."""
        self._check_open()
        return CancelStateMachine(self._machine)

    def _dispatch(self, events: Iterable[Event]) -> None:
        """Deliver the asynchronous messages among *events*: notices to the
        handler, notifications to the queue :meth:`notifies` reads."""
        for event in events:
            if isinstance(event, NoticeResponse):
                try:
                    self.notice_handler(event)
                except Exception:
                    _log.exception("the notice handler raised")
            elif isinstance(event, NotificationResponse):
                pending = self._pending_notifies
                if len(pending) >= MAX_PENDING_NOTIFIES:
                    pending.popleft()
                    _log.warning(
                        "more than %d notifications not read: the oldest was dropped",
                        MAX_PENDING_NOTIFIES,
                    )
                pending.append(event)

    def _take_asynchronous(self, io: _HasAsynchronous) -> None:
        """Deliver the notices and notifications *io* saw while connecting."""
        if io.asynchronous:
            events, io.asynchronous = io.asynchronous, []
            self._dispatch(events)

    def _take_idle(self, data: bytes) -> tuple[bytes | None, Error | None]:
        """Bytes that arrived on an idle connection: deliver what they carry.
        Returns what to send before closing the transport if the machine
        closed it (else None), and the error to raise if the connection
        broke (else None); either way the connection is then closed."""
        machine = self._machine
        machine.receive_data(data)
        events, close, error = collect_idle(machine)
        self._dispatch(events)
        self._note_idle_errors(events)
        if close is not None or error is not None:
            self._closed = True
        if error is not None:
            cause = self._broken(events, error)
            if cause is not error:
                cause.__cause__ = error
            error = cause
        return close, error

    def _broken(self, events: list[Event], error: Error) -> Error:
        """What to raise when the connection broke, given the *events*
        received last: the server's own ErrorResponse if it sent one before
        hanging up (a FATAL such as "terminating connection due to
        administrator command", 57P01, as libpq reports it) -- in *events*,
        or earlier on the idle connection -- else *error*."""
        for event in events:
            if isinstance(event, ErrorResponse):
                return event.error
        return self._idle_error or error

    def _note_idle_errors(self, events: list[Event]) -> None:
        """An ErrorResponse on an idle connection comes before the server
        hangs up (often in a read of its own): keep it for :meth:`_broken`."""
        for event in events:
            if isinstance(event, ErrorResponse):
                self._idle_error = event.error

    _idle_error: ServerError | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._machine.status.name
        where = self.hostaddr or "?"
        return f"<{type(self).__module__}.{type(self).__name__} {state} {where}:{self.port}>"


def collect_idle(
    machine: ConnectionStateMachine,
) -> tuple[list[Event], bytes | None, Error | None]:
    """After bytes arrived on an idle connection: the events *machine* has,
    the bytes to send before closing the transport if it asks for that
    (else None), and the error that broke the connection (else None)."""
    events: list[Event] = []
    close: bytes | None = None
    try:
        while (event := machine.next_event()) is not NEED_DATA:
            if isinstance(event, CloseConnection):
                close = event.data
            else:
                events.append(event)
    except Error as exc:
        return events, close, exc
    return events, close, None


class AsyncConnectionBase(ConnectionBase):
    """simple_query, notifies, cancel, reset and close for the async
    adapters, over the adapter's :class:`SocketTransport`.

    One task uses the socket at a time (``_lock``).  :meth:`notifies` holds
    it only while it waits for the server, and gives it up as soon as a
    query wants it (``preempt``), so that queries and a notification
    listener can share a connection.  :meth:`close` takes no lock: it wakes
    every task waiting on the connection with :class:`pgproto.ConnectionClosed`.
    """

    #: The adapter's transport (each adapter's Connection sets it).
    transport: ClassVar[type[SocketTransport]]

    _io: SocketTransport
    _lock: Any = None  # made at first use (most connections never need it)
    _wanted = 0  # queries waiting for the socket

    def _socket_lock(self) -> Any:
        """The lock that gives one task at a time the socket."""
        if self._lock is None:
            self._lock = self._io.lock()
        return self._lock

    # -- connecting ---------------------------------------------------------------

    async def reset(self) -> None:
        """libpq's ``PQreset``: close the connection (Terminate if it is
        healthy) and connect again with the same parameters, from the first
        host, within ``connect_timeout`` per address; raises
        :class:`pgproto.ConnectError`, after which the connection is closed.

        Works on a broken or closed connection too: that is what it is for.
        """
        machine, io = self._machine, self._io
        was_closed, self._closed = self._closed, True
        await io.finish(b"" if was_closed else farewell(machine))
        machine.reset()
        try:
            await establish(machine, io, self._trace)
        except BaseException:
            farewell(machine)
            await io.drop()
            raise
        self._closed = False
        self._take_asynchronous(self._io)

    # -- queries --------------------------------------------------------------

    async def simple_query(self, sql: str) -> list[QueryResult]:
        """Run *sql* with the simple query protocol; raises ServerError on error.

        Cancelled (a cancel scope, a timeout, ``Task.cancel()``) while the
        server runs it, the query is cancelled on the server (a
        CancelRequest, as :meth:`cancel` sends it) and its results drained,
        shielded from the cancellation and within ``connect_timeout`` (10 s
        without one); the connection is then idle and usable -- or, if that
        did not work out in time, closed.  Then the cancellation goes on.
        """
        self._check_open()
        io = self._io
        self._wanted += 1
        io.preempt()
        lock = self._socket_lock()
        try:
            await lock.acquire()
        finally:
            self._wanted -= 1
        events: list[Event] = []
        try:
            collector = self._begin_query(sql)
            try:
                await async_pump(self._machine, io, self._trace, events)
            except ConnectionClosed:
                raise
            except io.cancellation:
                await self._recover()
                raise
            except Error as exc:
                await self._abandon()
                self._dispatch(events)
                error = self._broken(events, exc)
                if error is exc:
                    raise
                raise error from exc
            except BaseException:
                await self._abandon()
                raise
        finally:
            lock.release()
        self._dispatch(events)
        for event in events:
            collector.feed(event)
        return collector.outcome()

    async def _recover(self) -> None:
        """After a cancelled :meth:`simple_query`: cancel it on the server and
        drain it, shielded and bounded; close the connection if that fails."""
        machine, io = self._machine, self._io
        if self._closed or not machine.query_in_progress:
            return
        if io.sending:
            await self._abandon()
            return
        grace = cancel_grace(machine)
        done = False
        try:
            async with io.shielded(grace):
                with contextlib.suppress(Error):
                    # Not delivered: the query may still end within the grace.
                    await self._send_cancel(CancelStateMachine(machine), io.now() + grace)
                events: list[Event] = []
                try:
                    await async_pump(machine, io, self._trace, events)
                finally:
                    self._dispatch(events)
                done = True
        except BaseException:
            await self._abandon()
            raise
        if not done:
            _log.warning(
                "the interrupted query on %r did not end within %.1f s: closing the connection",
                self,
                grace,
            )
            await self._abandon()

    async def _abandon(self) -> None:
        """Close at once, sending nothing (the stream may be mid-message)."""
        if self._closed:
            return
        self._closed = True
        farewell(self._machine)
        await self._io.drop()

    # -- cancel -----------------------------------------------------------------

    async def cancel(self, *, timeout: float | None = None) -> None:
        """Ask the server to cancel the query running on this connection
        (libpq 17's ``PQcancelBlocking``): a CancelRequest over a new
        connection to the same address, encrypted as this connection's
        settings say, within ``connect_timeout`` and *timeout* (seconds).

        Returns once the server has taken the request -- which says nothing
        of whether a query was running, or was cancelled.  Raises
        :class:`pgproto.ConnectError` if it could not be delivered, and
        :class:`pgproto.LocalProtocolError` if there is nothing to cancel
        on (closed, or no cancellation key received).
        """
        cancel = self._cancel_machine()
        seconds = overall_timeout(timeout)
        await self._send_cancel(cancel, None if seconds is None else self._io.now() + seconds)

    async def _send_cancel(self, cancel: CancelStateMachine, deadline: float | None) -> None:
        io = self.transport()
        if deadline is not None:
            io.set_overall(deadline)
        try:
            await establish(cancel, io, self._trace)
        finally:
            await io.drop()

    # -- notifications --------------------------------------------------------

    async def notifies(
        self, *, timeout: float | None = None, stop_after: int | None = None
    ) -> AsyncIterator[NotificationResponse]:
        """LISTEN/NOTIFY notifications, in the order the server sent them
        (``pid``, ``channel``, ``payload``), as an async iterator.

        It waits for the server while the connection is idle, and gives the
        connection up to any query another task runs meanwhile (whose
        notifications are kept for it).  Ends after *timeout* seconds, or
        *stop_after* notifications; else runs until cancelled, or until the
        connection is closed (:class:`pgproto.ConnectionClosed`).
        """
        seconds = None if timeout is None else overall_timeout(timeout)
        io = self._io
        deadline = None if seconds is None else io.now() + seconds
        count = 0
        pending = self._pending_notifies
        while True:
            while pending:
                yield pending.popleft()
                count += 1
                if stop_after is not None and count >= stop_after:
                    return
            self._check_open()
            if deadline is not None and io.now() >= deadline:
                return
            async with self._socket_lock():
                if self._closed or pending or self._wanted:
                    continue
                data = await io.receive_idle(deadline)
                if data is not None:
                    await self._absorb(data)

    async def _absorb(self, data: bytes) -> None:
        """Bytes that arrived on an idle connection (see ``_take_idle``)."""
        close, error = self._take_idle(data)
        if close is not None:
            await self._io.finish(close)
        if error is not None:
            await self._io.drop()
            raise error

    # -- closing ----------------------------------------------------------------

    async def close(self) -> None:
        """Send Terminate (if healthy; inside TLS, followed by close_notify)
        and close the socket.  Idempotent.  Any task waiting on the
        connection (a query, :meth:`notifies`) is woken with
        :class:`pgproto.ConnectionClosed`."""
        if self._closed:
            return
        self._closed = True
        await self._io.finish(farewell(self._machine))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


# --------------------------------------------------------------------------
# deadlines and name resolution for the async adapters


def overall_timeout(timeout: object) -> float | None:
    """Check the *timeout* argument of ``connect``/``ping`` (seconds): None,
    or a positive finite number; anything else raises ValueError."""
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < float("inf")
    ):
        raise ValueError(f"timeout must be a positive finite number of seconds, not {timeout!r}")
    return float(timeout)


class Deadlines:
    """The deadlines a connection attempt runs under, on the adapter's clock.

    ``timer`` is the per-address deadline of the last :class:`StartTimer`
    (libpq's ``connect_timeout``), ``overall`` the caller's ``timeout=``;
    ``deadline`` is the earlier of the two, None when neither is set (wait
    without limit).  An async adapter waits under one cancel scope per
    connection attempt and follows ``deadline`` with it (:meth:`moved`).
    """

    # Class-level defaults: a transport is made per connection, and most
    # never set a deadline.
    overall: float | None = None
    timer: float | None = None
    deadline: float | None = None

    def set_overall(self, when: float | None) -> None:
        self.overall = when
        self._update()

    def start_timer(self, when: float) -> None:
        self.timer = when
        self._update()

    def _update(self) -> None:
        timer, overall = self.timer, self.overall
        if timer is None or (overall is not None and overall <= timer):
            self.deadline = overall
        else:
            self.deadline = timer
        self.moved()

    def moved(self) -> None:
        """``deadline`` changed (an adapter moves its cancel scope here)."""

    def expired(self, machine: ConnectionStateMachine) -> None:
        """``deadline`` passed: tell *machine* which deadline it was (the
        overall one wins a tie).  A per-address timer is spent: the machine
        starts a new one for whatever it tries next."""
        overall = self.overall
        if overall is not None and overall == self.deadline:
            machine.deadline_expired()
            return
        self.timer = None
        self._update()
        machine.timer_expired()

    def clear(self) -> None:
        """No deadline applies (connected: queries wait without limit)."""
        self.overall = self.timer = self.deadline = None
        self.moved()


def resolver_host(host: str) -> bytes:
    """*host* as ``getaddrinfo`` should get it: the bytes libpq passes (UTF-8),
    so that a name Python's IDNA codec refuses (a label over 63 characters,
    a lone surrogate) fails in the resolver with libpq's message instead of
    raising UnicodeError.  Bytes that came in undecodable (surrogate
    escapes) go back as they were; any other lone surrogate is passed
    through encoded, for the resolver to reject."""
    try:
        return host.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return host.encode("utf-8", "surrogatepass")


def connect_failure(exc: OSError) -> OSError:
    """A failed ``connect()`` in libpq's words: asyncio says "Connect call
    failed (address)", trio "Error connecting to address: ..."; libpq gives
    the system's message alone ("Connection refused")."""
    if exc.errno:
        return OSError(exc.errno, os.strerror(exc.errno))
    return exc


# --------------------------------------------------------------------------
# the async adapters: one pump over each framework's IO primitives

_CLOSED_WHILE_WAITING: Final = "the connection was closed while waiting for the server"


def closed_while_waiting() -> ConnectionClosed:
    return ConnectionClosed(_CLOSED_WHILE_WAITING)


class SocketTransport(Deadlines):
    """The IO of one connection for the async adapters: one non-blocking
    socket at a time, read and written directly; the framework is asked to
    wait only when the kernel says EAGAIN (a framework's socket wrapper
    would pass through its scheduler on every call, even one that completes
    at once).  Each adapter's subclass supplies its framework's waits,
    clock, locks, deadlines and close.

    Every wait is a plain await, interrupted by the framework's cancellation;
    :meth:`drop` (or :meth:`finish`) wakes a task waiting on the socket with
    :class:`pgproto.ConnectionClosed`.  ``sending`` is True while a message
    is being written (cancelled then, the server may hold part of it).
    ``asynchronous`` collects notices and notifications the pump saw while
    nobody collected its events (during connect).
    """

    sock: socket.socket | None = None
    streaming = False  # the last read filled the buffer
    sent = False  # the last operation was a send
    sending = False

    def __init__(self) -> None:
        self.asynchronous: list[Event] = []

    def now(self) -> float:
        raise NotImplementedError

    @staticmethod
    def lock() -> Any:
        """A new lock of the framework's."""
        raise NotImplementedError

    #: Does ``connect`` begin with :meth:`enter`?
    enters: ClassVar[bool] = False

    async def enter(self) -> None:
        """What ``connect`` does first when ``enters`` says so (trio and
        anyio: a cancellation check, their rule for a function that may not
        suspend at once)."""

    async def pump_before_deadline(
        self, machine: ConnectionStateMachine, trace: Tracer | None
    ) -> bool:
        """:func:`async_pump` under one cancel scope (timeout) that follows
        ``deadline`` (see :meth:`Deadlines.moved`): True when the machine is
        connected, False when the deadline passed first."""
        raise NotImplementedError

    def preempt(self) -> None:
        """Cut a :meth:`receive_idle` in progress short."""
        raise NotImplementedError

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of *host* (raises socket.gaierror)."""
        raise NotImplementedError

    def shielded(self, seconds: float) -> contextlib.AbstractAsyncContextManager[None]:
        """A block that the caller's cancellation does not interrupt, ended
        (normally) after *seconds*."""
        raise NotImplementedError

    @property
    def cancellation(self) -> type[BaseException]:
        """The exception the framework cancels a task with."""
        raise NotImplementedError

    async def _wait(self, sock: socket.socket, writable: bool) -> None:
        """Until *sock* is readable (writable); ConnectionClosed if it is
        closed meanwhile."""
        raise NotImplementedError

    async def _wait_idle(self, sock: socket.socket, deadline: float | None) -> bool:
        """Until *sock* is readable (True), or *deadline* passed or
        :meth:`preempt` was called (False)."""
        raise NotImplementedError

    async def _checkpoint(self) -> None:
        """Let the framework schedule other tasks (and deliver a cancellation)."""
        raise NotImplementedError

    def _close(self) -> None:
        """Close the socket now, waking a task waiting on it."""
        raise NotImplementedError

    def _socket(self) -> socket.socket:
        if self.sock is None:
            raise closed_while_waiting()
        return self.sock

    async def open(self, command: OpenConnection) -> socket.socket:
        """Connect for *command*; return the socket (for :func:`made`).
        Raises OSError in libpq's words, with no socket left open."""
        sock = self.sock = open_socket(command)
        try:
            error = sock.connect_ex(sockaddr(command.address))
            if error in IN_PROGRESS:
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
        self.sent = True

    async def receive(self) -> bytes:
        """What has arrived (waiting for it); ``b""`` at the end of the stream."""
        sock = self._socket()
        if self.sent:
            # The answer to what was just sent cannot be here yet: wait
            # first rather than try a recv() that fails with EAGAIN (as the
            # blocking adapter does).  Were it here, the wait ends at once.
            self.sent = False
            await self._wait(sock, False)
        elif self.streaming:
            # The last read filled the buffer: more is waiting, and reading
            # on would never suspend.  Let the framework schedule (and
            # deliver a cancellation) first -- before a read, so that
            # nothing read is lost.
            await self._checkpoint()
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                await self._wait(sock, False)
                continue
            self.streaming = len(data) == RECV_SIZE
            return data

    async def receive_idle(self, deadline: float | None) -> bytes | None:
        """As :meth:`receive`, but None once *deadline* passed or
        :meth:`preempt` was called."""
        sock = self._socket()
        for attempt in range(2):
            try:
                return sock.recv(RECV_SIZE)
            except BlockingIOError:  # nothing yet; after the wait: preempted
                pass
            except OSError:
                return b""  # ECONNRESET and the like: end of file
            if attempt or not await self._wait_idle(sock, deadline):
                return None
        return None  # pragma: no cover - the loop returns

    async def finish(self, data: bytes) -> None:
        """Best-effort send of a final message without waiting (the socket is
        about to close; Terminate is a courtesy), then close."""
        if data and self.sock is not None:
            try:  # noqa: SIM105 (not contextlib.suppress: every connection's path)
                self.sock.send(data)
            except OSError:
                pass  # the connection is being closed: nothing to report
        self._close()

    async def drop(self) -> None:
        """Close the socket now, sending nothing."""
        self._close()


_OK: Final = PollingStatus.OK
_WRITING: Final = PollingStatus.WRITING
_PUMP_COMMANDS: Final = frozenset((OpenConnection, CloseConnection, ResolveHost, StartTimer))


async def async_pump(
    machine: ConnectionStateMachine,
    io: SocketTransport,
    trace: Tracer | None,
    events: list[Event] | None = None,
) -> None:
    """Drive *machine* over *io* until it is OK (connected, or idle again
    after a query); the reports it produces go to *events* (when not None:
    a query's), else notices and notifications to ``io.asynchronous``."""
    while True:
        event = machine.next_event()
        if event is NEED_DATA:
            status = machine.poll()
            if status is _OK:
                return
            if status is _WRITING:
                io.sending = True
                try:  # noqa: SIM105 (not contextlib.suppress: every connection's path)
                    await io.send(machine.data_to_send())
                except OSError:
                    # As libpq does: drop the output and read on, so that an
                    # error the server sent before closing is reported.
                    pass
                io.sending = False
                continue
            try:
                data = await io.receive()
            except OSError:
                data = b""  # ECONNRESET and the like: end of file
            machine.receive_data(data)
            continue
        if trace is not None:
            trace(event)
        kind = type(event)
        if kind not in _PUMP_COMMANDS:
            if events is not None:
                events.append(event)
            elif kind in _ASYNCHRONOUS:
                io.asynchronous.append(event)
        elif isinstance(event, OpenConnection):
            try:
                sock = await io.open(event)
            except OSError as exc:
                machine.connection_failed(exc)
                continue
            made(machine, event, sock)
        elif isinstance(event, CloseConnection):
            await io.finish(event.data)
        elif isinstance(event, ResolveHost):
            try:
                addresses = await io.resolve(event.host, event.port)
            except socket.gaierror as exc:
                machine.resolve_failed(exc.strerror or str(exc))
            else:
                machine.addresses_resolved(addresses)
        elif isinstance(event, StartTimer):
            io.start_timer(io.now() + event.seconds)


async def establish(
    machine: ConnectionStateMachine, io: SocketTransport, trace: Tracer | None
) -> None:
    """Pump *machine* until it is connected (or raises), under *io*'s
    deadlines (none at all when neither ``connect_timeout`` nor an overall
    deadline is set); then clear them.  When a deadline passes, the machine
    is told which one (and moves on, or gives up) and pumping resumes."""
    if io.overall is None and machine.params.connect_timeout is None:
        # No deadline can apply (the machine starts timers only with a connect_timeout).
        await async_pump(machine, io, trace)
        return
    while not await io.pump_before_deadline(machine, trace):
        await io.drop()  # a connect() cut short: the machine has no transport to close
        io.expired(machine)
    io.clear()


AsyncConnectionT = TypeVar("AsyncConnectionT", bound=AsyncConnectionBase)


class AsyncEntryPoints(Generic[AsyncConnectionT]):
    """An async adapter's public ``connect`` and ``ping`` for its Connection
    class: the module binds them (``connect = AsyncEntryPoints(Connection).connect``),
    so the three async adapters share one signature and one body."""

    __slots__ = ("_connection",)

    def __init__(self, connection: type[AsyncConnectionT]) -> None:
        self._connection = connection

    async def connect(
        self,
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
    ) -> AsyncConnectionT:
        """Connect as libpq's PQconnectdbParams does; raises :class:`pgproto.ConnectError`.

        *timeout* (seconds) bounds the whole attempt, name resolution included,
        on top of the per-address ``connect_timeout``: when it passes, the
        current attempt fails with "timeout expired (overall deadline)" and no
        other host is tried.  *notice_handler* gets every NoticeResponse
        (default: the ``pgproto.notice`` logger).
        """
        seconds = None if timeout is None else overall_timeout(timeout)
        io = self._connection.transport()
        if io.enters:
            await io.enter()
        start = io.now() if seconds is not None else 0.0  # (resolution counts too)
        machine = make_machine(
            conninfo,
            kwargs,
            env=env,
            random_bytes=random_bytes,
            key_passphrase_hook=key_passphrase_hook,
            trace=trace,
        )
        if seconds is not None:
            io.set_overall(start + seconds)
        conn = self._connection(machine, io, trace, notice_handler)
        try:
            await establish(machine, io, trace)
        except BaseException:
            await io.drop()  # failed or cancelled: no socket stays open
            raise
        conn._take_asynchronous(io)
        return conn

    async def ping(
        self,
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
        try:
            conn = await self.connect(conninfo, env=env, timeout=timeout, **kwargs)
        except Error as exc:
            return ping_outcome(exc)
        await conn.close()
        return Ping.OK


_FOREVER: Final = float("inf")


class CancelScope(Protocol):
    """What ScopedSocketTransport uses of trio's and anyio's CancelScope."""

    @property
    def deadline(self) -> float: ...
    @deadline.setter
    def deadline(self, value: float) -> None: ...
    @property
    def cancelled_caught(self) -> bool: ...
    def cancel(self) -> None: ...
    def __enter__(self) -> CancelScope: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> bool: ...


@dataclass(frozen=True, slots=True)
class ScopeFramework:
    """The primitives of a framework with cancel scopes (trio, anyio: theirs
    have the same shape), for :class:`ScopedSocketTransport`."""

    cancel_scope: Callable[..., CancelScope]
    current_time: Callable[[], float]
    checkpoint: Callable[[], Awaitable[None]]
    checkpoint_if_cancelled: Callable[[], Awaitable[None]]
    wait_readable: Callable[[socket.socket], Awaitable[None]]
    wait_writable: Callable[[socket.socket], Awaitable[None]]
    notify_closing: Callable[[socket.socket], None]
    closed_resource_error: type[Exception]


class ScopedSocketTransport(SocketTransport):
    """A :class:`SocketTransport` for the frameworks with cancel scopes (trio,
    anyio): each adapter's subclass names its framework's primitives
    (``framework``), and says how it resolves a name and cancels a task.

    Deadlines are one cancel scope around the connection attempt, whose
    deadline follows ``deadline``; an idle read waits in a scope of its own
    that :meth:`preempt` cancels; closing the socket first wakes whoever
    waits on it (``notify_closing``: they raise the framework's
    ``ClosedResourceError``, turned into ConnectionClosed).
    """

    framework: ClassVar[ScopeFramework]
    scope: CancelScope | None = None  # while connecting
    idle: CancelScope | None = None  # while waiting on an idle connection
    waiting = 0  # tasks waiting on the socket

    def moved(self) -> None:
        if self.scope is not None:
            self.scope.deadline = _FOREVER if self.deadline is None else self.deadline

    def now(self) -> float:
        return self.framework.current_time()

    enters = True

    async def enter(self) -> None:
        await self.framework.checkpoint_if_cancelled()

    async def pump_before_deadline(
        self, machine: ConnectionStateMachine, trace: Tracer | None
    ) -> bool:
        deadline = _FOREVER if self.deadline is None else self.deadline
        with self.framework.cancel_scope(deadline=deadline) as scope:
            self.scope = scope
            try:
                await async_pump(machine, self, trace)
            finally:
                self.scope = None
            return True
        return False

    async def _wait(self, sock: socket.socket, writable: bool) -> None:
        framework = self.framework
        self.waiting += 1
        try:
            await (framework.wait_writable if writable else framework.wait_readable)(sock)
        except framework.closed_resource_error:
            raise closed_while_waiting() from None
        finally:
            self.waiting -= 1

    async def _wait_idle(self, sock: socket.socket, deadline: float | None) -> bool:
        scope = self.framework.cancel_scope(deadline=_FOREVER if deadline is None else deadline)
        with scope:
            self.idle = scope
            try:
                await self._wait(sock, False)
            finally:
                self.idle = None
        return not scope.cancelled_caught

    async def _checkpoint(self) -> None:
        await self.framework.checkpoint()

    def preempt(self) -> None:
        if self.idle is not None:
            self.idle.cancel()

    def _close(self) -> None:
        if self.sock is not None:
            if self.waiting:
                # Wake the tasks waiting on it.  With none there is nothing
                # to tell: a descriptor no task waits on is in no wait set of
                # the framework's (the kernel drops a closed one from epoll).
                self.framework.notify_closing(self.sock)
            self.sock.close()
            self.sock = None

    @contextlib.asynccontextmanager
    async def shielded(self, seconds: float) -> AsyncIterator[None]:
        framework = self.framework
        with framework.cancel_scope(shield=True, deadline=framework.current_time() + seconds):
            yield
