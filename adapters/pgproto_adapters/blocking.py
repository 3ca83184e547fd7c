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
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from pgproto import (
    CancelStateMachine,
    ConnectionClosed,
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
    NoticeResponse,
    NotificationResponse,
    OpenConnection,
    ResolveHost,
    StartTimer,
)
from pgproto._machine import ConnectionStateMachine

from ._common import (
    IN_PROGRESS,
    RECV_SIZE,
    ConnectionBase,
    Deadlines,
    NoticeHandler,
    QueryResult,
    Tracer,
    closed_while_waiting,
    farewell,
    made,
    make_machine,
    open_socket,
    overall_timeout,
    resolve,
    sockaddr,
)

__all__ = ["CancelRequest", "Connection", "connect", "connect_start", "ping"]

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
        self.sock: socket.socket | None = None
        #: The command whose non-blocking connect() has not completed yet.
        self.connecting: OpenConnection | None = None
        #: What the socket did not take yet; it goes out before anything new.
        self.pending = b""
        # poll(2) where there is one: no kernel object per connection, unlike
        # epoll, and no selector bookkeeping in Python.
        self._poller = select.poll() if hasattr(select, "poll") else None
        self._registered: tuple[int, int] | None = None
        #: Notices and notifications seen while nobody collected the events.
        self.asynchronous: list[Event] = []
        # Another thread's close() (see Connection.close): ``lock`` guards
        # ``waiting`` (the events a wait is polling for, 0 when none) and
        # ``interrupted`` (close() asked this thread to stop).
        self.lock = threading.Lock()
        self.waiting = 0
        self.interrupted = False

    def wait(self, events: int, deadline: float | None = None, *, own: bool = False) -> bool:
        """Wait until the socket is ready for *events* (``WAIT_READ`` or
        ``WAIT_WRITE``); False when the deadline passed (``self.deadline``,
        or *deadline* with *own*).  Raises ConnectionClosed when another
        thread closed the connection."""
        when = deadline if own else self.deadline
        timeout = None if when is None else max(0.0, when - time.monotonic())
        with self.lock:
            if self.interrupted:
                raise _closed_while_waiting()
            self.waiting = events
        try:
            ready = self._poll(events, timeout)
        finally:
            with self.lock:
                self.waiting = 0
        if self.interrupted:
            raise _closed_while_waiting()
        return ready

    def interrupt(self) -> None:
        """(With ``lock`` held, from another thread.)  Make the thread using
        the connection stop at its next wait, waking it if it waits now: a
        reader keeps the write side, to send Terminate as it closes."""
        self.interrupted = True
        if self.waiting and self.sock is not None:
            how = socket.SHUT_RD if self.waiting == WAIT_READ else socket.SHUT_RDWR
            with contextlib.suppress(OSError):
                self.sock.shutdown(how)

    def receive_idle(self, deadline: float | None) -> bytes | None:
        """What the server sent on an idle connection, waiting for it until
        *deadline*: None if nothing came."""
        sock = self.sock
        if sock is None:
            raise _closed_while_waiting()
        for attempt in range(2):
            try:
                return sock.recv(RECV_SIZE)
            except BlockingIOError:
                pass
            except OSError:
                return b""
            if attempt or not self.wait(WAIT_READ, deadline, own=True):
                return None
        return None  # pragma: no cover - the loop returns

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
                try:  # noqa: SIM105 (not contextlib.suppress: every connection's path)
                    self._poller.unregister(self._registered[0])
                except (KeyError, ValueError):
                    pass
                self._registered = None
            self.sock.close()
            self.sock = None

    def finish(self, data: bytes) -> None:
        """Send *data* (after what is pending) if the socket takes it at once,
        then close the socket.  Without *data* the pending bytes are dropped:
        they may hold a password for a connection being abandoned."""
        if data and self.sock is not None and self.connecting is None:
            try:  # noqa: SIM105 (not contextlib.suppress: every connection's path)
                self.sock.send(self.pending + data)
            except OSError:
                pass  # the connection is being closed: nothing to report
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
                kind = type(event)
                if kind not in _COMMANDS:
                    if events is not None:
                        events.append(event)
                    elif kind in _ASYNCHRONOUS:
                        io.asynchronous.append(event)
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
    if error in IN_PROGRESS:
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
_ASYNCHRONOUS: Final = frozenset((NoticeResponse, NotificationResponse))
_closed_while_waiting = closed_while_waiting


class _Poller:
    """``PQconnectPoll`` over one machine and its transport: what a
    Connection and a CancelRequest share."""

    _machine: ConnectionStateMachine
    _io: _Transport
    _trace: Tracer | None
    _error: Error | None
    _polled: PollingStatus | None  # what the last poll returned (None: not yet)
    _closed: bool

    @property
    def status(self) -> ConnStatus:
        """libpq's ``PQstatus``: the ``CONNECTION_*`` step."""
        return self._machine.status

    @property
    def error(self) -> Error | None:
        """Why polling said FAILED (a :class:`pgproto.ConnectError` listing
        the attempts), else None."""
        return self._error

    def fileno(self) -> int:
        """The socket's descriptor (-1 without one).  While connecting it
        changes when another address or host is tried, and a new socket may
        reuse the number of the one just closed."""
        return self._io.sock.fileno() if self._io.sock is not None else -1

    def timeout(self) -> float | None:
        """Seconds left before the current attempt's ``connect_timeout``
        deadline or the overall ``timeout=`` (whichever comes first; 0.0 once
        it passed), None without one.  The next poll after it moves on to
        the next address or host (or, for the overall deadline, fails)."""
        deadline = self._io.deadline
        if deadline is None or self._closed or self._machine.status in _SETTLED:
            return None
        return max(0.0, deadline - time.monotonic())

    def _drive(self, block: bool) -> PollingStatus:
        """One poll, or with *block* the poll(2) loop around it until OK or
        FAILED."""
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
            self._abandon()
            raise
        assert status is not None
        if status is _OK:
            io.clear()
        elif status is _FAILED:
            io.drop()
        self._polled = status
        return status

    def _establish(self) -> None:
        """Wait (blocking) until polling says OK; raise the error if it says
        FAILED."""
        if self._drive(True) is _FAILED:
            if self._error is not None:
                raise self._error
            raise ConnectionClosed("the connection is closed")

    def _abandon(self) -> None:
        raise NotImplementedError


class CancelRequest(_Poller):
    """A cancel request for the query running on a connection (libpq 17's
    ``PGcancelConn``, from :meth:`Connection.cancel_request`): sent over a
    new connection to the same address, encrypted as the connection's
    settings say, within ``connect_timeout``.

    :meth:`blocking` sends it and waits (``PQcancelBlocking``);
    :meth:`start` and :meth:`poll` do it without blocking
    (``PQcancelStart``/``PQcancelPoll``), waiting on :meth:`fileno` as
    :meth:`Connection.connect_poll` does.  OK means the server took the
    request -- not that a query was running, or was cancelled.
    """

    def __init__(self, machine: CancelStateMachine, trace: Tracer | None) -> None:
        self._machine = machine
        self._io = _Transport()
        self._trace = trace
        self._error = None
        self._polled = None
        self._closed = False
        self._started = False

    def start(self, *, timeout: float | None = None) -> bool:
        """``PQcancelStart``: begin sending without waiting; False if that
        failed at once (see :attr:`error`).  *timeout*: an overall deadline
        in seconds, on top of ``connect_timeout``."""
        if self._started:
            raise LocalProtocolError("cancel request is already being sent on this connection")
        self._started = True
        seconds = overall_timeout(timeout)
        if seconds is not None:
            self._io.set_overall(time.monotonic() + seconds)
        return self._drive(False) is not _FAILED

    def poll(self) -> PollingStatus:
        """``PQcancelPoll``: READING / WRITING (wait on :meth:`fileno`, at
        most :meth:`timeout` seconds, then call again), OK, or FAILED."""
        return self._drive(False)

    def blocking(self, *, timeout: float | None = None) -> None:
        """``PQcancelBlocking``: send the request and wait until the server
        took it; raises :class:`pgproto.ConnectError` if it could not."""
        if not self._started:
            self.start(timeout=timeout)
        self._establish()

    def reset(self) -> None:
        """``PQcancelReset``: forget this try, to :meth:`start` again."""
        self._abandon()
        self._machine.reset()
        self._io = _Transport()
        self._error = None
        self._polled = None
        self._closed = False
        self._started = False

    def close(self) -> None:
        """``PQcancelFinish``: abandon the request, close its socket."""
        self._abandon()

    def _abandon(self) -> None:
        if not self._closed:
            self._closed = True
            self._machine.close()
            self._io.drop()

    def __enter__(self) -> CancelRequest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Connection(_Poller, ConnectionBase):
    """A connection (blocking), established or -- from :func:`connect_start`
    -- being established with :meth:`connect_poll`.

    One thread uses a connection at a time; :meth:`close` and
    :meth:`cancel` may be called from any thread (close() wakes a thread
    waiting on the connection, which raises :class:`pgproto.ConnectionClosed`).
    """

    def __init__(
        self,
        machine: ConnectionStateMachine,
        io: _Transport,
        trace: Tracer | None,
        notice_handler: NoticeHandler | None = None,
    ) -> None:
        super().__init__(machine, io, trace, notice_handler)
        self._error = None
        self._polled = None
        self._busy = False  # a thread is using the connection (see close())

    # -- PQconnectPoll ------------------------------------------------------

    def connect_poll(self) -> PollingStatus:
        """libpq's ``PQconnectPoll``; never blocks.

        Does everything that can be done now and says what to wait for:
        READING -- until :meth:`fileno` is readable, WRITING -- until it is
        writable (or, either way, until :meth:`timeout` runs out), then call
        again; OK -- connected; FAILED -- see :attr:`error`.  The descriptor
        may be a new one after any call.  Spurious calls are harmless.
        """
        status = self._drive(False)
        self._take_asynchronous(self._io)
        return status

    def reset_poll(self) -> PollingStatus:
        """libpq's ``PQresetPoll``: :meth:`connect_poll` after :meth:`reset_start`."""
        return self.connect_poll()

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
        return self.connect_poll() is not _FAILED

    def reset(self) -> None:
        """libpq's ``PQreset``: close the connection and connect again with the
        same parameters; raises :class:`pgproto.ConnectError`."""
        self.reset_start()
        self._establish()
        self._take_asynchronous(self._io)

    # -- an established connection ------------------------------------------

    def _enter(self) -> None:
        """A thread starts using the connection."""
        with self._io.lock:
            self._check_open()
            self._busy = True

    def _leave(self) -> None:
        """The thread is done with it; a close() that came meanwhile is
        finished here."""
        io = self._io
        with io.lock:
            self._busy = False
            deferred = io.interrupted
        if deferred:
            io.close(farewell(self._machine))

    def simple_query(self, sql: str) -> list[QueryResult]:
        """Run *sql* with the simple query protocol; raises ServerError on error."""
        machine = self._machine
        if not self._closed and machine.status is not ConnStatus.OK:
            raise LocalProtocolError(
                f"the connection is not established (status {machine.status.name})"
            )
        self._enter()
        try:
            collector = self._begin_query(sql)
            io, trace = self._io, self._trace
            events: list[Event] = []
            try:
                status = _advance(machine, io, trace, events, None, False, True)
                while status is _READING or status is _WRITING:
                    status = _advance(machine, io, trace, events, status, False, True)
            except ConnectionClosed:
                raise
            except Error as exc:
                self._abandon()
                self._dispatch(events)
                error = self._broken(events, exc)
                if error is exc:
                    raise
                raise error from exc
            except BaseException:
                self._abandon()
                raise
        finally:
            self._leave()
        self._dispatch(events)
        for event in events:
            collector.feed(event)
        return collector.outcome()

    def notifies(
        self, *, timeout: float | None = None, stop_after: int | None = None
    ) -> Iterator[NotificationResponse]:
        """LISTEN/NOTIFY notifications, in the order the server sent them
        (``pid``, ``channel``, ``payload``): a generator that waits for them
        on the idle connection.  Ends after *timeout* seconds or *stop_after*
        notifications; else runs until the connection is closed
        (:class:`pgproto.ConnectionClosed`).  Notifications that arrived
        during queries come first."""
        seconds = None if timeout is None else overall_timeout(timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        count = 0
        pending = self._pending_notifies
        while True:
            while pending:
                yield pending.popleft()
                count += 1
                if stop_after is not None and count >= stop_after:
                    return
            if deadline is not None and time.monotonic() >= deadline:
                self._check_open()
                return
            self._enter()
            try:
                data = self._io.receive_idle(deadline)
                if data is not None:
                    self._absorb(data)
            finally:
                self._leave()

    def _absorb(self, data: bytes) -> None:
        """Bytes that arrived on an idle connection (see ``_take_idle``)."""
        close, error = self._take_idle(data)
        if close is not None:
            self._io.finish(close)
        if error is not None:
            self._io.drop()
            raise error

    def cancel_request(self) -> CancelRequest:
        """libpq 17's ``PQcancelCreate``: a :class:`CancelRequest` for the
        query running on this connection (raises
        :class:`pgproto.LocalProtocolError` when there is nothing to cancel
        on: closed, or no cancellation key received)."""
        return CancelRequest(self._cancel_machine(), self._trace)

    def cancel(self, *, timeout: float | None = None) -> None:
        """Ask the server to cancel the query running on this connection --
        from another thread, typically (``PQcancelBlocking``).  A
        CancelRequest over a new connection to the same address, encrypted
        as this connection's settings say, within ``connect_timeout`` and
        *timeout* (seconds).  Raises :class:`pgproto.ConnectError` if it
        could not be delivered."""
        with self.cancel_request() as request:
            request.blocking(timeout=timeout)

    def close(self) -> None:
        """Send Terminate (if healthy; inside TLS, followed by close_notify)
        and close the socket, also in the middle of connecting.  Idempotent.
        From another thread while the connection is in use, the thread
        using it is woken and finishes the close, raising
        :class:`pgproto.ConnectionClosed`."""
        io = self._io
        with io.lock:
            if self._closed:
                return
            self._closed = True
            if self._busy:
                io.interrupt()
                return
        io.close(farewell(self._machine))

    def _abandon(self) -> None:
        """Close at once, sending nothing (the stream may be mid-message)."""
        with self._io.lock:
            self._closed = True
        farewell(self._machine)
        self._io.drop()

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
    notice_handler: NoticeHandler | None = None,
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
    conn = _new(
        conninfo, kwargs, env, trace, random_bytes, key_passphrase_hook, timeout, notice_handler
    )
    conn.connect_poll()
    return conn


def connect(
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

    *timeout* (seconds) is an optional overall deadline on top of the
    per-address ``connect_timeout``.  *notice_handler* gets every
    NoticeResponse (default: the ``pgproto.notice`` logger).
    """
    # connect_start() and the wait loop, in one go.
    conn = _new(
        conninfo, kwargs, env, trace, random_bytes, key_passphrase_hook, timeout, notice_handler
    )
    conn._establish()
    conn._take_asynchronous(conn._io)
    return conn


def _new(
    conninfo: str,
    kwargs: dict[str, Any],
    env: Environment | None,
    trace: Tracer | None,
    random_bytes: Callable[[int], bytes] | None,
    key_passphrase_hook: Callable[[str], str] | None,
    timeout: float | None,
    notice_handler: NoticeHandler | None = None,
) -> Connection:
    """A Connection that has not started: parameters resolved, deadline set."""
    overall = overall_timeout(timeout)
    machine = make_machine(
        conninfo,
        kwargs,
        env=env,
        random_bytes=random_bytes,
        key_passphrase_hook=key_passphrase_hook,
        trace=trace,
    )
    io = _Transport()
    if overall is not None:
        io.set_overall(time.monotonic() + overall)
    return Connection(machine, io, trace, notice_handler)


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
