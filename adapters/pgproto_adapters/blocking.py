"""Blocking connections over non-blocking sockets and poll(2), and libpq's
``PQconnectStart``/``PQconnectPoll`` for callers that run their own event loop.

One function, :func:`_advance`, does the work: it runs the machine as far as it
goes without waiting -- answering its commands, sending what the socket takes,
receiving what has arrived -- and returns what it waits for (READING or
WRITING) or how it ended (OK or FAILED).  :meth:`Connection.connect_poll` is
that function; :func:`connect`, :meth:`Connection.reset` and
:meth:`Connection.simple_query` run it with ``block=True``, which waits in
poll(2) where it would return READING or WRITING.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pgproto import (
    ConnStatus,
    Environment,
    Error,
    LocalProtocolError,
    Ping,
    PollingStatus,
    ping_outcome,
)
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
    ConnectionBase,
    Deadlines,
    QueryResult,
    Tracer,
    farewell,
    made,
    make_machine,
    open_socket,
    overall_timeout,
    resolve,
    sockaddr,
)

__all__ = ["Connection", "connect", "connect_start", "ping"]

WAIT_READ = getattr(select, "POLLIN", 1)
WAIT_WRITE = getattr(select, "POLLOUT", 4)

_READING = PollingStatus.READING
_WRITING = PollingStatus.WRITING
_OK = PollingStatus.OK
_FAILED = PollingStatus.FAILED


class _Transport(Deadlines):
    """The current socket, its unsent bytes, a connect() in progress, and the
    deadlines (``time.monotonic()``; ``deadline`` is the earlier of the
    per-address one and the caller's overall one)."""

    def __init__(self) -> None:
        super().__init__()
        self.sock: socket.socket | None = None
        #: The command whose non-blocking connect() has not completed yet.
        self.connecting: OpenConnection | None = None
        #: What the socket did not take yet; it goes out before anything new.
        self.pending = b""
        # poll(2) where there is one: no kernel object per connection, unlike
        # epoll, and no selector bookkeeping in Python.
        self._poller = select.poll() if hasattr(select, "poll") else None
        self._registered: tuple[int, int] | None = None

    def wait(self, events: int) -> bool:
        """Wait until the socket is ready for *events* (``WAIT_READ`` or
        ``WAIT_WRITE``); False when the deadline passed."""
        when = self.deadline
        timeout = None if when is None else max(0.0, when - time.monotonic())
        return self._poll(events, timeout)

    def ready(self, events: int) -> bool:
        """Is the socket ready for *events* now?  Never waits."""
        return self._poll(events, 0.0)

    def _poll(self, events: int, timeout: float | None) -> bool:
        assert self.sock is not None
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
        """Close the socket (unsent bytes and a connect() in progress are abandoned)."""
        self.pending = b""
        self.connecting = None
        if self.sock is not None:
            if self._registered is not None and self._poller is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._poller.unregister(self._registered[0])
                self._registered = None
            self.sock.close()
            self.sock = None

    def finish(self, data: bytes) -> None:
        """Send *data* (after what is pending) if the socket takes it at once,
        then close the socket.  Without *data* the pending bytes are dropped:
        they may hold a password for a connection being abandoned."""
        if data and self.sock is not None and self.connecting is None:
            with contextlib.suppress(OSError):
                self.sock.send(self.pending + data)
        self.drop()

    def close(self, data: bytes = b"") -> None:
        self.finish(data)


def _advance(
    machine: ConnectionStateMachine,
    io: _Transport,
    trace: Tracer | None,
    events: list[Event] | None,
    resume: PollingStatus | None = None,
    ready: bool = False,
    block: bool = False,
) -> PollingStatus:
    """Run *machine* as far as it goes without waiting.

    Answers every command, sends what the socket takes, receives what has
    arrived, and fires the per-address timer once its deadline has passed
    and nothing else can happen.  Returns OK or FAILED, or READING / WRITING:
    wait until the socket is readable / writable (or the deadline,
    ``io.deadline``, passes), then call again.  *events* collects the
    reports (None drops them).  *resume*: what the last call returned, when
    that was READING or WRITING and the machine has not been touched since
    (it would only say NEED_DATA and the same again): go straight to the
    socket.  *ready*: the caller has just seen the socket writable after a
    WRITING that was waiting for connect() (this saves a poll(2)).  A
    connect() started during the call returns WRITING at once, as libpq's
    does.  *block*: wait in poll(2) instead of returning READING or WRITING.

    Raises what ``next_event()`` raises (``ConnectError`` when no connection
    can be made, or the error that broke an established one).
    """
    # Nothing sent or received yet in this call, so a recv() may find data.
    # After a send the answer cannot be there yet, and after a short read
    # the socket is drained: return READING at once instead of a recv()
    # that would fail with EAGAIN (the caller's wait tells).
    fresh = True
    earlier = io.connecting  # a connect() started by an earlier call
    status = resume
    while True:
        if status is None:
            while (event := machine.next_event()) is not NEED_DATA:
                if trace is not None:
                    trace(event)
                if type(event) not in _COMMANDS:
                    if events is not None:
                        events.append(event)
                elif isinstance(event, OpenConnection):
                    _open(machine, io, event)
                elif isinstance(event, CloseConnection):
                    io.finish(event.data)
                elif isinstance(event, ResolveHost):
                    _resolve(machine, io, event)
                elif isinstance(event, StartTimer):
                    io.start_timer(time.monotonic() + event.seconds)
            status = machine.poll()
            if status is _OK:
                return status
        if status is _READING and not io.pending:
            if fresh:
                sock = io.sock
                assert sock is not None
                try:
                    data = sock.recv(RECV_SIZE)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""  # ECONNRESET and the like: end of file
                if data is not None:
                    machine.receive_data(data)
                    fresh = len(data) == RECV_SIZE
                    status = None
                    continue
        elif status is _FAILED:
            return status
        elif io.connecting is not None:  # the machine says WRITING until connect() is done
            if io.connecting is earlier and (ready or io.ready(WAIT_WRITE)):
                earlier = None
                _connected(machine, io)
                status = None
                continue
        else:  # WRITING, or READING with bytes still to send: they go first
            sock = io.sock
            assert sock is not None
            data = machine.data_to_send()
            if io.pending:
                data = io.pending + data
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                # As libpq does: drop the output and read on, so that an
                # error the server sent before closing is what gets reported.
                sent = len(data)
            fresh = False
            io.pending = data[sent:]
            status = None
            if not io.pending:
                continue
            status = _WRITING
        # Nothing more can happen before the socket is ready.
        if block and io.wait(WAIT_READ if status is _READING else WAIT_WRITE):
            fresh, earlier, ready = True, io.connecting, True
            continue
        if _expired(machine, io):
            status = None
            continue
        return status


def _expired(machine: ConnectionStateMachine, io: _Transport) -> bool:
    """Tell *machine* if a deadline has passed (which one: ``io.expired``)."""
    deadline = io.deadline
    if deadline is None or time.monotonic() < deadline:
        return False
    if io.connecting is not None:
        io.drop()  # the machine has no transport to close yet
    io.expired(machine)
    return True


def _resolve(machine: ConnectionStateMachine, io: _Transport, event: ResolveHost) -> None:
    """Answer a ResolveHost command.  Without a deadline getaddrinfo runs here;
    with one it runs in a helper thread, so that a stalled resolver costs at
    most the deadline (the thread is left to finish on its own)."""
    when = io.deadline
    if when is None:
        try:
            machine.addresses_resolved(resolve(event.host, event.port))
        except socket.gaierror as exc:
            machine.resolve_failed(exc.strerror or str(exc))
        return
    outcome: list[list[str] | BaseException] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            outcome.append(resolve(event.host, event.port))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)
        done.set()

    threading.Thread(target=lookup, name="pgproto getaddrinfo", daemon=True).start()
    if not done.wait(max(0.0, when - time.monotonic())):
        io.expired(machine)
        return
    result = outcome[0]
    if isinstance(result, list):
        machine.addresses_resolved(result)
    elif isinstance(result, socket.gaierror):
        machine.resolve_failed(result.strerror or str(result))
    else:
        raise result


def _open(machine: ConnectionStateMachine, io: _Transport, event: OpenConnection) -> None:
    """Start a non-blocking connect() for *event*; answer the machine if it
    completed or failed at once, else leave it in ``io.connecting``."""
    try:
        sock = open_socket(event)
    except OSError as exc:
        machine.connection_failed(exc)
        return
    io.sock = sock
    try:
        error = sock.connect_ex(sockaddr(event.address))
    except OSError as exc:
        io.drop()
        machine.connection_failed(exc)
        return
    if error in _IN_PROGRESS:
        io.connecting = event
        return
    if error:
        io.drop()
        machine.connection_failed(OSError(error, os.strerror(error)))
        return
    made(machine, event, sock)


def _connected(machine: ConnectionStateMachine, io: _Transport) -> None:
    """The socket of the connect() in progress is writable: answer the machine."""
    event, sock = io.connecting, io.sock
    assert event is not None
    assert sock is not None
    io.connecting = None
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        io.drop()
        machine.connection_failed(OSError(error, os.strerror(error)))
        return
    made(machine, event, sock)


_COMMANDS = frozenset((OpenConnection, CloseConnection, ResolveHost, StartTimer))
_IN_PROGRESS = frozenset((errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR))


class Connection(ConnectionBase):
    """A connection (blocking), established or -- from :func:`connect_start`
    -- being established with :meth:`connect_poll`."""

    def __init__(
        self,
        machine: ConnectionStateMachine,
        io: _Transport,
        trace: Tracer | None,
    ) -> None:
        super().__init__(machine)
        self._io = io
        self._trace = trace
        self._error: Error | None = None
        # What the last connect_poll() returned (None: not called yet).
        self._polled: PollingStatus | None = None

    # -- PQconnectPoll ------------------------------------------------------

    @property
    def status(self) -> ConnStatus:
        """libpq's ``PQstatus``: the ``CONNECTION_*`` step."""
        return self._machine.status

    @property
    def error(self) -> Error | None:
        """Why :meth:`connect_poll` said FAILED (a :class:`pgproto.ConnectError`
        listing the attempts), else None."""
        return self._error

    def connect_poll(self) -> PollingStatus:
        """libpq's ``PQconnectPoll``; never blocks.

        Does everything that can be done now and says what to wait for:
        READING -- until :meth:`fileno` is readable, WRITING -- until it is
        writable (or, either way, until :meth:`timeout` runs out), then call
        again; OK -- connected; FAILED -- see :attr:`error`.  The descriptor
        may be a new one after any call.  Spurious calls are harmless.
        """
        return self._drive(False)

    def reset_poll(self) -> PollingStatus:
        """libpq's ``PQresetPoll``: :meth:`connect_poll` after :meth:`reset_start`."""
        return self._drive(False)

    def timeout(self) -> float | None:
        """Seconds left before the current attempt's ``connect_timeout``
        deadline or the overall ``timeout=`` (whichever comes first; 0.0 once
        it passed), None without one.  The next :meth:`connect_poll` after it
        moves on to the next address or host (or, for the overall deadline,
        fails)."""
        deadline = self._io.deadline
        if deadline is None or self._closed or self._machine.status in _SETTLED:
            return None
        return max(0.0, deadline - time.monotonic())

    def _drive(self, block: bool) -> PollingStatus:
        """One :meth:`connect_poll`, or with *block* the poll(2) loop around
        it until OK or FAILED."""
        if self._closed:
            return _FAILED
        machine, io, trace = self._machine, self._io, self._trace
        status = self._polled
        waiting = status is _READING or status is _WRITING
        if not waiting and machine.status is ConnStatus.OK:
            return _OK
        try:
            if waiting and block:
                ready = io.wait(WAIT_READ if status is _READING else WAIT_WRITE)
                status = _advance(machine, io, trace, None, status, ready, True)
            else:
                status = _advance(
                    machine, io, trace, None, status if waiting else None, False, block
                )
            while block and (status is _READING or status is _WRITING):
                status = _advance(machine, io, trace, None, status, False, True)
        except Error as exc:
            io.drop()
            self._error = exc
            status = _FAILED
        except BaseException:
            self.close()
            raise
        assert status is not None
        if status is _OK:
            io.clear()
        elif status is _FAILED:
            io.drop()
        self._polled = status
        return status

    def _establish(self) -> None:
        """Wait (blocking) until :meth:`connect_poll` says OK; raise the error
        if it says FAILED."""
        if self._drive(True) is _FAILED:
            if self._error is not None:
                raise self._error
            raise LocalProtocolError("the connection is closed")

    # -- PQreset ------------------------------------------------------------

    def reset_start(self) -> bool:
        """libpq's ``PQresetStart``: close the connection and start a new one
        with the same parameters, without waiting (name resolution aside);
        False if that failed at once.  Then call :meth:`reset_poll`."""
        self.close()
        # The same machine starts again: same parameters, same host order
        # (load_balance_hosts=random is not reshuffled), as PQreset keeps them.
        self._machine.reset()
        self._io = _Transport()
        self._closed = False
        self._error = None
        self._polled = None
        return self._drive(False) is not _FAILED

    def reset(self) -> None:
        """libpq's ``PQreset``: close the connection and connect again with the
        same parameters; raises :class:`pgproto.ConnectError`."""
        self.reset_start()
        self._establish()

    # -- an established connection ------------------------------------------

    def simple_query(self, sql: str) -> list[QueryResult]:
        """Run *sql* with the simple query protocol; raises ServerError on error."""
        machine = self._machine
        if not self._closed and machine.status is not ConnStatus.OK:
            raise LocalProtocolError(
                f"the connection is not established (status {machine.status.name})"
            )
        collector = self._begin_query(sql)
        io, trace = self._io, self._trace
        events: list[Event] = []
        try:
            status = _advance(machine, io, trace, events, None, False, True)
            while status is _READING or status is _WRITING:
                status = _advance(machine, io, trace, events, status, False, True)
        except BaseException:
            self.close()
            raise
        for event in events:
            self._note(event)
            collector.feed(event)
        return collector.outcome()

    def fileno(self) -> int:
        """The socket's descriptor (-1 without one).  While connecting it
        changes when another address or host is tried, and a new socket may
        reuse the number of the one just closed."""
        return self._io.sock.fileno() if self._io.sock is not None else -1

    def close(self) -> None:
        """Send Terminate (if healthy) and close the socket, also in the middle
        of connecting.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._io.close(farewell(self._machine))

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_SETTLED = frozenset((ConnStatus.OK, ConnStatus.BAD))


def connect_start(
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
    """libpq's ``PQconnectStartParams``: resolve the parameters (an invalid one
    raises :class:`pgproto.ConninfoError` at once) and start connecting
    without waiting on the network; drive it with :meth:`Connection.connect_poll`.

    A host name is resolved with a blocking ``getaddrinfo``, as in libpq
    (``hostaddr`` avoids it); with a ``connect_timeout`` or *timeout* it runs
    in a helper thread and the call waits at most until the deadline.
    *timeout*: an overall deadline in seconds on top of ``connect_timeout``.
    """
    conn = _new(conninfo, kwargs, env, trace, random_bytes, key_passphrase_hook, timeout)
    conn._drive(False)
    return conn


def connect(
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

    *timeout* (seconds) is an optional overall deadline on top of the
    per-address ``connect_timeout``.
    """
    # connect_start() and the wait loop, in one go.
    conn = _new(conninfo, kwargs, env, trace, random_bytes, key_passphrase_hook, timeout)
    conn._establish()
    return conn


def _new(
    conninfo: str,
    kwargs: dict[str, Any],
    env: Environment | None,
    trace: Tracer | None,
    random_bytes: Callable[[int], bytes] | None,
    key_passphrase_hook: Callable[[str], str] | None,
    timeout: float | None,
) -> Connection:
    """A Connection that has not started: parameters resolved, deadline set."""
    overall = overall_timeout(timeout)
    machine = make_machine(
        conninfo,
        kwargs,
        env=env,
        random_bytes=random_bytes,
        key_passphrase_hook=key_passphrase_hook,
    )
    io = _Transport()
    if overall is not None:
        io.set_overall(time.monotonic() + overall)
    return Connection(machine, io, trace)


def ping(
    conninfo: str = "",
    /,
    *,
    env: Environment | None = None,
    timeout: float | None = None,
    **kwargs: Any,
) -> Ping:
    """libpq's ``PQpingParams``: is the server up?  Connects as :func:`connect`
    does (no password is needed: a server that asks for one is up), closes,
    and answers OK, REJECT (57P03: starting up, shutting down, ...),
    NO_RESPONSE or NO_ATTEMPT (invalid options).  Never raises for a
    connection failure."""
    try:
        conn = connect(conninfo, env=env, timeout=timeout, **kwargs)
    except Error as exc:
        return ping_outcome(exc)
    conn.close()
    return Ping.OK
