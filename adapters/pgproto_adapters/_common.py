"""What the adapters share: socket setup, query results, the Connection surface.

Everything here is IO-model neutral: it builds and configures sockets but
never waits on them.  Each adapter module is the pump loop for one IO model.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, Self

from pgproto import (
    ConnParams,
    Environment,
    Error,
    LocalProtocolError,
    Ping,
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
    OpenConnection,
    ReadyForQuery,
    RowDescription,
)
from pgproto._machine import ConnectionStateMachine

__all__ = [
    "AsyncConnectionBase",
    "ConnectionBase",
    "QueryCollector",
    "QueryResult",
    "Tracer",
    "made",
    "make_machine",
    "open_socket",
    "peer_uid",
]

#: A callable that sees every event the machine produces (``--trace`` uses it).
Tracer = Callable[[Event], None]

RECV_SIZE: Final = 65536


def make_machine(
    conninfo: str,
    kwargs: dict[str, Any],
    *,
    env: Environment | None = None,
    random_bytes: Callable[[int], bytes] | None = None,
    key_passphrase_hook: Callable[[str], str] | None = None,
) -> ConnectionStateMachine:
    """Resolve the parameters and build the machine for one connection."""
    params: ConnParams = resolve_params(conninfo, env=env, **kwargs)
    return ConnectionStateMachine(
        params,
        random_bytes=random_bytes or os.urandom,
        key_passphrase_hook=key_passphrase_hook,
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


def open_socket(command: OpenConnection) -> socket.socket:
    """A non-blocking, close-on-exec socket for *command*, with libpq's TCP options."""
    sock = socket.socket(_family(command.address), socket.SOCK_STREAM)
    try:
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


class ConnectionBase:
    """The read-only surface every adapter's Connection shares."""

    _machine: ConnectionStateMachine

    def __init__(self, machine: ConnectionStateMachine) -> None:
        self._machine = machine
        self.notices: list[NoticeResponse] = []

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
        return self._machine.server_parameters

    @property
    def auth_method(self) -> str | None:
        return self._machine.auth_method

    @property
    def channel_binding_used(self) -> bool:
        return self._machine.channel_binding_used

    @property
    def closed(self) -> bool:
        return self._closed

    _closed: bool = False

    def _begin_query(self, sql: str) -> QueryCollector:
        if self._closed:
            raise LocalProtocolError("the connection is closed")
        self._machine.send_query(sql)
        return QueryCollector()

    def _note(self, event: Event) -> None:
        if isinstance(event, NoticeResponse):
            self.notices.append(event)

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._machine.status.name
        where = self.hostaddr or "?"
        return f"<{type(self).__module__}.{type(self).__name__} {state} {where}:{self.port}>"


class Transport(Protocol):
    """What a Connection needs of its adapter's transport."""

    def finish(self, data: bytes) -> None:
        """Send *data* if possible (never waiting), then close the socket."""

    def clear(self) -> None:
        """Forget every deadline (connected: queries wait without limit)."""


class AsyncConnectionBase(ConnectionBase):
    """simple_query / close for the async adapters; each supplies the pump."""

    def __init__(
        self, machine: ConnectionStateMachine, io: Transport, trace: Tracer | None
    ) -> None:
        super().__init__(machine)
        self._io = io
        self._trace = trace

    async def _run_query(self) -> list[Event]:
        """Pump the machine until the query is over; the events it produced."""
        raise NotImplementedError

    async def _establish(self) -> None:
        """Pump the machine until it is connected (or raises), under the deadlines."""
        raise NotImplementedError

    async def reset(self) -> None:
        """libpq's ``PQreset``: close the connection (Terminate if it is
        healthy) and connect again with the same parameters, from the first
        host, within ``connect_timeout`` per address; raises
        :class:`pgproto.ConnectError`, after which the connection is closed.

        Works on a broken or closed connection too: that is what it is for.
        """
        machine, io = self._machine, self._io
        self._closed = True
        machine.reset()
        io.clear()
        try:
            await self._establish()
        except BaseException:
            io.finish(farewell(machine))
            raise
        io.clear()
        self._closed = False

    async def simple_query(self, sql: str) -> list[QueryResult]:
        """Run *sql* with the simple query protocol; raises ServerError on error."""
        collector = self._begin_query(sql)
        try:
            for event in await self._run_query():
                self._note(event)
                collector.feed(event)
        except BaseException:
            await self.close()
            raise
        return collector.outcome()

    async def close(self) -> None:
        """Send Terminate (if healthy) and close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._io.finish(farewell(self._machine))

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

    __slots__ = ("deadline", "overall", "timer")

    def __init__(self) -> None:
        self.overall: float | None = None
        self.timer: float | None = None
        self.deadline: float | None = None

    @staticmethod
    def needed(machine: ConnectionStateMachine, overall: float | None) -> bool:
        """Can a deadline apply to *machine*'s connection attempt?  (The
        machine starts timers only with a ``connect_timeout``.)"""
        return overall is not None or machine.params.connect_timeout is not None

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


async def ping_via(
    connect: Callable[..., Awaitable[AsyncConnectionBase]], conninfo: str, kwargs: dict[str, Any]
) -> Ping:
    """An async adapter's ``ping``: connect with *connect*, close, and give
    libpq's verdict; never raises for a connection failure."""
    try:
        conn = await connect(conninfo, **kwargs)
    except Error as exc:
        return ping_outcome(exc)
    await conn.close()
    return Ping.OK
