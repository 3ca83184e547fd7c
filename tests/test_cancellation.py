"""Cancellation in every adapter, against a real PostgreSQL 18: a connect
cancelled at each step of the handshake, a query cancelled while the server
runs it or mid-result, the "or closed" branches, and close() from another
task.  What the issue promises, and what is checked here:

* A connect cancelled by a trio/anyio cancel scope, an asyncio task cancel
  or an ``asyncio.timeout`` closes its socket before the cancellation goes
  on: the descriptors of this process are counted *in the ``finally`` of the
  cancelled call* (no checkpoint, no loop iteration in between) and nothing
  is left; the peer (a relay, below) sees the socket close, and the server
  keeps no backend for the attempt (pg_stat_activity, by the relay's port).
  (``fdcheck.assert_no_fd_leak`` checks nothing when its block raises, so
  the snapshots here are taken with ``fdcheck.open_fds`` where the
  exception passes.)
* A ``simple_query`` cancelled the same way sends a CancelRequest (shielded,
  bounded by ``connect_timeout``, 10 s without), drains the connection back
  to ReadyForQuery and leaves it idle and usable, then the cancellation goes
  on; or, when that cannot be done (the query was being sent, the recovery
  ran out of time, the task was cancelled again), the connection is closed.
  Never silently desynchronised: after every "usable" outcome several
  queries run and each must return its own rows, not left-overs.

The ways to cancel ("flavors"): asyncio ``Task.cancel()`` and
``asyncio.timeout`` (rescheduled to now), trio ``CancelScope.cancel()`` and
``move_on_after`` (deadline moved to now), anyio's ``CancelScope.cancel()``
on its asyncio and trio backends.  The blocking adapter is interrupted by an
exception (KeyboardInterrupt) raised from the trace callback, and once by a
real signal while it waits in poll(2).

Determinism, without sleeps
---------------------------

A connect is cancelled from the ``trace=`` callback when it reports the step
(:data:`STEPS`); the cancellation then lands at the adapter's next wait,
which is the step's.  To make sure that wait really waits, the connection
goes through :class:`Relay`, which the callback tells to hold back
everything the server sends from then on (before the client has sent the
message the server would answer).  Where the cancellation landed is read
from the trace: the trigger event must be the last event the machine
reported, and the relay's capture shows what the client had sent.

* before TCP completes: :func:`servers.syn_blackhole` (connect() never
  completes), cancelled on OpenConnection;
* during TLS: SSL_STARTUP, with ``sslnegotiation=postgres`` (waiting for the
  server's answer to SSLRequest) and ``direct`` (ClientHello sent, waiting
  for the ServerHello);
* during SCRAM: AuthenticationRequested (SASL), over TLS with channel
  binding; the client answers (SASLInitialResponse) and waits for the
  server's challenge;
* waiting for ReadyForQuery: AUTH_OK.  PostgreSQL sends AuthenticationOk in
  the same flush as ParameterStatus, BackendKeyData and ReadyForQuery, so
  the relay (plaintext TCP, the only way to see message boundaries) passes
  the server's bytes up to AuthenticationOk and holds the rest: the server
  has sent ReadyForQuery, the client never sees it.

Every adapter writes to the socket directly, so the step's message goes out
and the cancellation lands in the wait for the answer (the relay's capture
shows it); the socket is closed inside the adapter, before the cancellation
goes on, on every framework and backend.

pg_stat_activity shows a backend only once it has read the startup packet
(checked: nothing is listed while SSLRequest or the TLS handshake is under
way), so "no backend left" is checked for the SCRAM and AUTH_OK steps, where
the backend is first seen listed (from the trace callback), then gone.

A query is cancelled once pg_stat_activity shows it active (``pg_sleep``),
or from the trace at its first DataRow: ``ROWS_THEN_SLEEP`` sends two large
rows and then sleeps, so the client has a row and then waits.  A result
that keeps coming is the hard case: an adapter that suspends only when
recv() finds nothing never gives a cancellation the chance to land while
rows arrive faster than it parses them (the asyncio and trio adapters did,
before they checkpointed after each full read: a 300 000-row result ran
its whole 2 s through a 50 ms ``move_on_after`` or ``asyncio.timeout``,
which never fired); :func:`test_cancellation_lands_while_rows_keep_arriving` makes that
deterministic by stalling the event loop, from the trace, until the
backend blocks on its full socket, so that far more than two reads' worth
already waits in the client's socket when the cancellation is requested.

No fixed sleeps: waiting for the server is a poll with a deadline
(:data:`PATIENCE`); every test runs under a hang guard.  Time bounds are
generous (:data:`SLACK`) and only show that something did not wait for its
natural end (a 30 s sleep); the "recovery cannot finish" tests check the
bound of 2 s (``connect_timeout=1``, which libpq rounds up to 2) from below
(it did try for that long) and generously from above.

``client_connection_check_interval`` is set where the client goes away
while the server still runs ``pg_sleep``: PostgreSQL then notices the
closed socket within 100 ms instead of after the sleep, so "the backend is
gone" can be checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import selectors
import signal
import socket
import struct
import termios
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, TypeVar

import anyio
import pg_admin
import pytest
import trio
from capture import set_interest
from fake_server import AUTH_OK, SSL_REQUEST
from fdcheck import assert_no_fd_leak, describe_fds, open_fds
from pg_admin import SLEEP_SQL, Admin, admin_session, gone, running
from pgproto_adapters import anyio as anyio_adapter
from pgproto_adapters import asyncio as asyncio_adapter
from pgproto_adapters import blocking
from pgproto_adapters import trio as trio_adapter
from pgproto_adapters._cluster import Cluster
from servers import ROLES, SynBlackhole, TLSMaterial, connect_params

import pgproto
from pgproto import ConnectionClosed, ConnStatus, ServerError

T = TypeVar("T")

#: How long a test waits for something that should happen soon.
PATIENCE: Final = 10.0
#: Upper bound for what must end long before its natural end (30 s).
SLACK: Final = 8.0
#: The hang guard around each test's event loop.
HANG: Final = 40.0
#: How much the relay reads at once.
RELAY_CHUNK: Final = 65536

#: Two rows of 100 kB, then a 30 s sleep before the third: the first row
#: reaches the client (PostgreSQL flushes its 8 kB buffer as the second is
#: written), then nothing comes until the query ends or is cancelled.
ROWS_THEN_SLEEP: Final = (
    "select i, repeat('x', 100000), pg_sleep(case when i = 3 then 30 else 0 end)"
    " from generate_series(1, 5) as i"
)
SCRAM_PASSWORD: Final = ROLES["scram_user"].password or ""
#: PostgreSQL checks whether the client is still there every 100 ms while a
#: query runs (Linux: POLLRDHUP), so a backend whose client left ends soon.
CHECK_CLIENT: Final = "-c client_connection_check_interval=100"
QUERY_CANCELED: Final = "57014"

#: (state, query, wait_event) of a backend, None if it is gone.
activity = functools.partial(pg_admin.activity, columns=("state", "query", "wait_event"))
#: Poll every 2 ms; fail after :data:`PATIENCE`.
wait_until = functools.partial(pg_admin.wait_until, patience=PATIENCE, period=0.002)
#: :func:`wait_until` in any event loop, polling every 5 ms.
until = functools.partial(pg_admin.until, patience=PATIENCE, period=0.005)

pytestmark = pytest.mark.usefixtures("no_pg_environment")


@pytest.fixture(scope="module")
def admin(pg18: Cluster) -> Iterator[Admin]:
    """A superuser session on pg18 (psycopg, autocommit: every query sees
    fresh statistics)."""
    with admin_session(pg18) as conn:
        yield conn


# --------------------------------------------------------------------------
# a relay that can hold the server's answers back


class Link:
    """One relayed connection, as the relay thread keeps it (read its
    attributes from other threads under nothing more than the GIL)."""

    def __init__(self, index: int, client: socket.socket) -> None:
        self.index: Final = index
        self.client: Final = client
        self.server: socket.socket | None = None
        #: The local port of the relay's socket to the server: the backend's
        #: ``client_port`` in pg_stat_activity.
        self.server_port: int | None = None
        #: Set once the client's side has ended (EOF or reset).
        self.client_gone: Final = threading.Event()
        self.from_client = bytearray()
        self.from_server = bytearray()
        #: Server bytes ``hold_after_auth_ok`` has not passed on.
        self.gate: bytearray | None = None
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.client_eof = False
        self.server_eof = False
        self.server_shut = False
        self.client_shut = False


class Relay:
    """A TCP relay from 127.0.0.1:``port`` to *target*, run by one thread.

    * ``later`` -- what happens to every connection after the first (the
      cancel requests): ``"relay"``; ``"refuse"``: the listening socket is
      shut down once the first connection is accepted, so the kernel answers
      later SYNs with RST (ECONNREFUSED) while the port stays bound;
      ``"blackhole"``: accepted, never read, never answered.
    * :meth:`hold` -- from now on the server's bytes stay unread: nothing
      more reaches any client.  Called from a trace callback, it is in
      force before the client sends its next message, so the answer to that
      message is held whatever the timing: the thread looks at the flag
      after its ``select()`` reported the answer, that is after it was set.
    * ``hold_after_auth_ok`` -- the first connection gets the server's bytes
      up to and including AuthenticationOk (plaintext), then nothing.
    * :meth:`pause_client` -- stop reading the first connection's client
      once it sent *after* more bytes: its sends block.  :attr:`paused` is
      set when that happened; :meth:`resume_client` reads on.

    The end of one side is passed to the other (``shutdown(SHUT_WR)``) once
    what is pending went out; a reset counts as an end.  Descriptors: no
    socket is closed before :meth:`close`, so no number the relay used can
    be reused meanwhile by the code under test, and :meth:`owned_fds` is
    exact for ``assert_no_fd_leak``'s ``ignore``.
    """

    def __init__(
        self, target: tuple[str, int], *, later: str = "relay", hold_after_auth_ok: bool = False
    ) -> None:
        if later not in ("relay", "refuse", "blackhole"):
            raise ValueError(f"unknown policy {later!r}")
        self.target: Final = target
        self.host: Final = "127.0.0.1"
        self.later: Final = later
        self._hold_after_auth_ok = hold_after_auth_ok
        # Resolved here, not in the thread: getaddrinfo() imports
        # encodings.idna the first time, and a .pyc opened by the thread
        # while a test counts descriptors would look like a leak.
        family, _, _, _, address = socket.getaddrinfo(*target, type=socket.SOCK_STREAM)[0]
        self._family: Final = family
        self._address: Final = address
        self._cond = threading.Condition()
        self._links: list[Link] = []
        self._held = False
        self._pause_at: int | None = None
        self.paused: Final = threading.Event()
        self._error: BaseException | None = None
        self._stop = False
        self._listener = socket.create_server((self.host, 0), backlog=16)
        self._listener.setblocking(False)
        self.port: Final[int] = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sockets = [self._listener, self._wake_r, self._wake_w]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="relay", daemon=True)
        self._thread.start()

    # -- control, from any thread --------------------------------------------

    def link(self, index: int) -> Link:
        """The *index*-th connection accepted (waiting for it)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._links) > index, PATIENCE):
                raise AssertionError(f"the relay did not accept connection #{index}")
            return self._links[index]

    @property
    def accepted(self) -> int:
        with self._cond:
            return len(self._links)

    def hold(self) -> None:
        with self._cond:
            self._held = True
        self._wake()

    def pause_client(self, after: int) -> None:
        with self._cond:
            self._pause_at = len(self._links[0].from_client) + after
            self.paused.clear()
        self._wake()

    def resume_client(self) -> None:
        with self._cond:
            self._pause_at = None
        self._wake()

    def owned_fds(self) -> set[int]:
        with self._cond:
            fds = {sock.fileno() for sock in self._sockets}
            fileno = getattr(self._selector, "fileno", None)
            if callable(fileno):
                fds.add(fileno())
        fds.discard(-1)
        return fds

    def close(self) -> None:
        with self._cond:
            self._stop = True
        self._wake()
        self._thread.join(PATIENCE)
        if self._thread.is_alive():
            raise RuntimeError("the relay thread did not stop")
        for sock in self._sockets:
            sock.close()
        self._selector.close()
        if self._error is not None:
            raise RuntimeError("the relay thread failed") from self._error

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- the relay thread -----------------------------------------------------

    def _serve(self) -> None:
        try:
            while True:
                ready = self._selector.select()
                with self._cond:
                    if self._stop:
                        return
                    for key, events in ready:
                        if key.fileobj is self._wake_r:
                            with contextlib.suppress(BlockingIOError):
                                self._wake_r.recv(4096)
                        elif key.fileobj is self._listener:
                            self._accept()
                        else:
                            self._service(key.data, key.fileobj, events)
                    for link in self._links:
                        self._update(link)
                    self._cond.notify_all()
        except BaseException as exc:  # surfaced by close()
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _accept(self) -> None:
        while not (self.later == "refuse" and self._links):
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:
                return
            self._sockets.append(client)
            client.setblocking(False)
            link = Link(len(self._links), client)
            self._links.append(link)
            if link.index == 0:
                if self.later == "refuse":
                    self._selector.unregister(self._listener)
                    self._listener.shutdown(socket.SHUT_RDWR)
                if self._hold_after_auth_ok:
                    link.gate = bytearray()
            elif self.later == "blackhole":
                continue
            server = socket.socket(self._family, socket.SOCK_STREAM)
            self._sockets.append(server)
            server.settimeout(PATIENCE)
            server.connect(self._address)
            server.setblocking(False)
            link.server = server
            link.server_port = server.getsockname()[1]

    def _service(self, link: Link, sock: object, events: int) -> None:
        server = link.server
        assert server is not None
        if events & selectors.EVENT_READ:
            if sock is link.client:
                data = _recv(link.client)
                if data:
                    link.from_client += data
                    link.to_server += data
                    if self._pause_at is not None and len(link.from_client) >= self._pause_at:
                        self.paused.set()
                elif data is not None:
                    link.client_eof = True
                    link.client_gone.set()
            elif not self._held:
                data = _recv(server)
                if data:
                    link.from_server += data
                    if link.gate is not None:
                        link.gate += data
                        self._pass_until_auth_ok(link)
                    else:
                        link.to_client += data
                elif data is not None:
                    link.server_eof = True
        _send(server, link.to_server)
        _send(link.client, link.to_client)
        if link.client_eof and not link.to_server and not link.server_shut:
            link.server_shut = True
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_WR)
        if link.server_eof and not link.to_client and not self._held and not link.client_shut:
            link.client_shut = True
            with contextlib.suppress(OSError):
                link.client.shutdown(socket.SHUT_WR)

    def _pass_until_auth_ok(self, link: Link) -> None:
        """Move whole messages from the gate to the client, up to AuthenticationOk."""
        gate = link.gate
        assert gate is not None
        while not self._held and len(gate) >= 5:
            end = 1 + int.from_bytes(gate[1:5], "big")
            if len(gate) < end:
                return
            message = bytes(gate[:end])
            del gate[:end]
            link.to_client += message
            if message == AUTH_OK:
                self._held = True

    def _update(self, link: Link) -> None:
        if link.server is None:
            return
        client_mask = server_mask = 0
        paused = link.index == 0 and self._pause_at is not None
        if not link.client_eof and not (paused and len(link.from_client) >= (self._pause_at or 0)):
            client_mask |= selectors.EVENT_READ
        if link.to_client:
            client_mask |= selectors.EVENT_WRITE
        if not link.server_eof and not self._held:
            server_mask |= selectors.EVENT_READ
        if link.to_server:
            server_mask |= selectors.EVENT_WRITE
        for sock, mask in ((link.client, client_mask), (link.server, server_mask)):
            set_interest(self._selector, sock, mask, link)


def _recv(sock: socket.socket) -> bytes | None:
    """What arrived; b"" at the end (a reset counts); None if nothing yet."""
    try:
        return sock.recv(RELAY_CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _send(sock: socket.socket, pending: bytearray) -> None:
    if not pending:
        return
    try:
        sent = sock.send(pending)
    except BlockingIOError:
        return
    except OSError:  # the receiver is gone: drop what it will never get
        pending.clear()
        return
    del pending[:sent]


# --------------------------------------------------------------------------
# the ways to cancel


class Trigger:
    """What a test calls to cancel (once), and again (a second cancellation)."""

    def __init__(self) -> None:
        self._first: Callable[[], object] | None = None
        self._again: Callable[[], object] | None = None
        self.at: float | None = None  # time.monotonic() of the first
        self.again_fired = False

    def arm(self, first: Callable[[], object], again: Callable[[], object]) -> None:
        self._first, self._again = first, again

    def fire(self) -> None:
        if self.at is None:
            assert self._first is not None, "fired before the guarded block started"
            self.at = time.monotonic()
            self._first()

    def fire_again(self) -> None:
        if not self.again_fired:
            assert self._again is not None
            self.again_fired = True
            self._again()


@dataclasses.dataclass(frozen=True)
class Flavor:
    """One framework (on one event loop) and one way of cancelling in it."""

    name: str
    framework: str  # asyncio, trio, anyio
    loop: str  # the event loop: asyncio or trio
    how: str  # task, timeout, scope, deadline

    def __str__(self) -> str:
        return self.name

    @property
    def adapter(self) -> Any:
        return {"asyncio": asyncio_adapter, "trio": trio_adapter, "anyio": anyio_adapter}[
            self.framework
        ]

    @property
    def cancelled(self) -> type[BaseException]:
        """What the adapter's call raises when cancelled."""
        return asyncio.CancelledError if self.loop == "asyncio" else trio.Cancelled

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run *fn* in this flavor's event loop, under the hang guard."""

        async def guarded() -> T:
            if self.framework == "asyncio":
                async with asyncio.timeout(HANG):
                    return await fn()
            if self.framework == "trio":
                with trio.fail_after(HANG):
                    return await fn()
            with anyio.fail_after(HANG):
                return await fn()

        if self.framework == "asyncio":
            return asyncio.run(guarded())
        if self.framework == "trio":
            return trio.run(guarded)
        return anyio.run(guarded, backend=self.loop)

    async def together(self, *fns: Callable[[], Awaitable[object]]) -> None:
        """Run *fns* as concurrent tasks of this framework; wait for all."""
        if self.framework == "asyncio":
            async with asyncio.TaskGroup() as group:
                for fn in fns:
                    group.create_task(_coroutine(fn))
        elif self.framework == "trio":
            async with trio.open_nursery() as nursery:
                for fn in fns:
                    nursery.start_soon(_coroutine, fn)
        else:
            async with anyio.create_task_group() as group:
                for fn in fns:
                    group.start_soon(_coroutine, fn)

    async def guarded(self, body: Callable[[], Awaitable[object]], trigger: Trigger) -> bool:
        """Run *body* where *trigger* cancels it; True if it ended by that
        cancellation (which is then caught here)."""
        if self.how == "task":
            task = asyncio.create_task(_coroutine(body))
            trigger.arm(task.cancel, task.cancel)
            try:
                await task
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if not task.cancelled() or (me is not None and me.cancelling()):
                    raise
                return True
            return False
        if self.how == "timeout":
            loop = asyncio.get_running_loop()
            me = asyncio.current_task()
            assert me is not None
            cm = asyncio.timeout(None)
            trigger.arm(lambda: cm.reschedule(loop.time()), me.cancel)
            try:
                async with cm:
                    await body()
            except TimeoutError:
                if not cm.expired():
                    raise
                return True
            except asyncio.CancelledError:
                # The second cancellation (a plain Task.cancel()) is not the
                # timeout's: asyncio.timeout lets it through.
                if not trigger.again_fired:
                    raise
                me.uncancel()
                return True
            return False
        # trio and anyio: the same cancel scope API.
        lib: Any = trio if self.framework == "trio" else anyio
        with lib.CancelScope() as outer:
            inner = lib.CancelScope() if self.how == "scope" else lib.move_on_after(3600)
            with inner:
                first = inner.cancel if self.how == "scope" else _expire(inner, lib.current_time)
                trigger.arm(first, outer.cancel)
                await body()
        return bool(inner.cancelled_caught or outer.cancelled_caught)


async def _coroutine(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


def _expire(
    scope: trio.CancelScope | anyio.CancelScope, now: Callable[[], float]
) -> Callable[[], None]:
    """Move *scope*'s deadline to *now()* (its framework's clock)."""

    def expire() -> None:
        scope.deadline = now()

    return expire


FLAVORS: Final = (
    Flavor("asyncio-task", "asyncio", "asyncio", "task"),
    Flavor("asyncio-timeout", "asyncio", "asyncio", "timeout"),
    Flavor("trio-scope", "trio", "trio", "scope"),
    Flavor("trio-move_on", "trio", "trio", "deadline"),
    Flavor("anyio-asyncio", "anyio", "asyncio", "scope"),
    Flavor("anyio-trio", "anyio", "trio", "scope"),
)
#: One flavor per framework and event loop (where the way of cancelling
#: does not matter).
FRAMEWORKS: Final = tuple(flavor for flavor in FLAVORS if flavor.how in ("task", "scope"))


# --------------------------------------------------------------------------
# helpers


class FdWatch:
    """The descriptors open now; :meth:`stop` takes the second snapshot."""

    def __init__(self) -> None:
        self.before = open_fds()
        self.after: set[int] | None = None

    def stop(self) -> None:
        self.after = open_fds()

    def new(self, ignore: set[int] | None = None) -> set[int]:
        assert self.after is not None, "stop() was not called"
        return self.after - self.before - (ignore or set())

    def assert_no_leak(self, ignore: set[int] | None = None) -> None:
        leaked = self.new(ignore)
        assert not leaked, f"{len(leaked)} descriptor(s) left open:\n{describe_fds(leaked)}"

    def assert_closed(self, fd: int) -> None:
        assert self.after is not None
        assert fd in self.before
        assert fd not in self.after, f"the connection's socket is still open: {describe_fds([fd])}"


def watched_call(call: Callable[[], object], expected: type[BaseException]) -> FdWatch:
    """Call *call*, which must raise *expected*; the descriptors are
    counted again as the exception leaves it, before anything else runs."""
    watch = FdWatch()
    try:
        call()
    except expected:
        watch.stop()
        return watch
    raise AssertionError(f"{expected.__name__} was not raised")


def on_port(admin: Admin, port: int | None) -> list[tuple[Any, ...]]:
    """The backends whose client is 127.0.0.1:*port* (the relay's side)."""
    return admin.execute(
        "select pid, state from pg_stat_activity"
        " where client_addr = '127.0.0.1' and client_port = %s",
        (port,),
    ).fetchall()


def idle_after(admin: Admin, pid: int | None, sql: str) -> bool:
    """Backend *pid* is idle and *sql* was the last query it ran (its
    wait event is not looked at: it may not be waiting for the next command
    yet).  PostgreSQL reports the idle state before it sends ReadyForQuery."""
    found = activity(admin, pid)
    return found is not None and found[:2] == ("idle", sql)


def socket_of(watch: FdWatch, ignore: set[int] | None = None) -> int:
    """The one socket opened while *watch* ran (a connection's), less *ignore*
    (a relay's own)."""
    new = watch.new(ignore)
    assert len(new) == 1, describe_fds(new)
    [fd] = new
    return fd


def unread_bytes(fd: int) -> int:
    """How many bytes wait in socket *fd*'s receive queue (FIONREAD)."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    value: int = struct.unpack("i", buf)[0]
    return value


def params_for(server: Cluster, transport: str, tls: TLSMaterial, **extra: str) -> dict[str, Any]:
    """scram_user over *transport* (unix, tcp, tls; TLS with channel binding)."""
    if transport == "tls":
        extra.setdefault("channel_binding", "require")
    params: dict[str, Any] = connect_params(
        server, transport, tls, user="scram_user", password=SCRAM_PASSWORD, **extra
    )
    return params


def via_relay(params: dict[str, Any], relay: Relay) -> dict[str, Any]:
    """*params* (TCP or TLS) dialled through *relay*: hostaddr is the relay,
    host still names the server for verify-full."""
    return {**params, "hostaddr": relay.host, "port": str(relay.port)}


SYNC_CHECKS: Final = (
    ("select 1 as one", [[("1",)]]),
    ("select 'two', 2", [[("two", "2")]]),
    ("select 3; select 'four' union all select 'five'", [[("3",)], [("four",), ("five",)]]),
    ("select null::text, 6", [[(None, "6")]]),
)


async def assert_in_sync(conn: Any) -> None:
    """Queries return their own results, one after the other: nothing left
    over from an interrupted query is taken for theirs."""
    for sql, expected in SYNC_CHECKS:
        results = await conn.simple_query(sql)
        assert [result.rows for result in results] == expected, sql
        assert conn.transaction_status == "I"


def blocking_assert_in_sync(conn: blocking.Connection) -> None:
    for sql, expected in SYNC_CHECKS:
        results = conn.simple_query(sql)
        assert [result.rows for result in results] == expected, sql
        assert conn.transaction_status == "I"


def is_status(event: pgproto.Event, status: ConnStatus) -> bool:
    return isinstance(event, pgproto.StatusChanged) and event.status is status


# --------------------------------------------------------------------------
# 1. a connect cancelled at each step


@dataclasses.dataclass(frozen=True)
class Step:
    """Where to cancel a connect, and how to reach that step."""

    name: str
    transport: str  # "blackhole", "tcp" or "tls"
    trigger: Callable[[pgproto.Event], bool]
    extra: tuple[tuple[str, str], ...] = ()
    hold_after_auth_ok: bool = False
    #: The backend is listed in pg_stat_activity at this step.
    listed: bool = False


STEPS: Final = (
    # Async adapters: OpenConnection is traced before the socket is made, and
    # the cancellation lands in the wait for connect() to complete.  The
    # blocking adapter reports StatusChanged(STARTED) while its connect() is
    # in progress (see test_blocking_connect_interrupted_at_step).
    Step("tcp-connect", "blackhole", lambda e: isinstance(e, pgproto.OpenConnection)),
    Step(
        "ssl-request",
        "tls",
        lambda e: is_status(e, ConnStatus.SSL_STARTUP),
        (("sslnegotiation", "postgres"),),
    ),
    Step(
        "tls-handshake",
        "tls",
        lambda e: is_status(e, ConnStatus.SSL_STARTUP),
        (("sslnegotiation", "direct"),),
    ),
    Step(
        "scram",
        "tls",
        lambda e: isinstance(e, pgproto.AuthenticationRequested) and e.method == "sasl",
        listed=True,
    ),
    Step(
        "ready-for-query",
        "tcp",
        lambda e: is_status(e, ConnStatus.AUTH_OK),
        hold_after_auth_ok=True,
        listed=True,
    ),
)


@contextlib.contextmanager
def step_target(
    step: Step, server: Cluster, tls: TLSMaterial, blackhole: SynBlackhole, connect_timeout: str
) -> Iterator[tuple[dict[str, Any], Relay | None]]:
    """Connection parameters for *step* and the relay they go through (None
    for the SYN black hole)."""
    if step.transport == "blackhole":
        assert blackhole.queue_full()
        yield (
            {
                "host": blackhole.host,
                "port": str(blackhole.port),
                "user": "scram_user",
                "dbname": "postgres",
                "sslmode": "disable",
                "connect_timeout": connect_timeout,
            },
            None,
        )
        return
    params = params_for(server, step.transport, tls, connect_timeout=connect_timeout)
    params.update(step.extra)
    with Relay((server.host, server.port), hold_after_auth_ok=step.hold_after_auth_ok) as relay:
        yield via_relay(params, relay), relay


def check_step(step: Step, seen: list[pgproto.Event], at_exit: int, relay: Relay | None) -> None:
    """The cancellation landed at *step*: its trigger event is the last one
    the machine reported, and the relay saw what the client sent up to it."""
    assert at_exit == len(seen), "events were reported after the cancellation went through"
    assert seen, "nothing was traced"
    assert step.trigger(seen[-1]), f"cancelled after {seen[-1]!r}, not at the step"
    assert sum(step.trigger(event) for event in seen) == 1
    kinds = {type(event) for event in seen}
    assert pgproto.Connected not in kinds
    if relay is None:  # the SYN black hole
        return
    link = relay.link(0)
    # What the client sent before it closed its socket is all there once
    # the relay saw the end.
    assert link.client_gone.wait(PATIENCE), "the relay did not see the client's socket close"
    # The request of the step went out (every adapter writes to the socket
    # directly: the cancellation lands in the wait for the answer).
    if step.name == "ssl-request":
        assert bytes(link.from_client) == SSL_REQUEST  # and nothing more
        assert pgproto.TLSEstablished not in kinds
    elif step.name == "tls-handshake":
        assert bytes(link.from_client[:2]) == b"\x16\x03"  # a ClientHello, no SSLRequest
        assert pgproto.TLSEstablished not in kinds
    elif step.name == "scram":
        assert pgproto.TLSEstablished in kinds
        assert pgproto.AuthenticationCompleted not in kinds
    else:  # ready-for-query: the server sent ReadyForQuery, the client never saw it
        assert link.gate is not None
        assert link.gate.endswith(b"Z\x00\x00\x00\x05I")
        assert pgproto.AuthenticationCompleted in kinds
        assert not kinds & {pgproto.BackendKeyData, pgproto.ReadyForQuery}


def check_server_side(admin: Admin, step: Step, relay: Relay | None, listed: list[bool]) -> None:
    """The relay saw the client's socket close, and the server keeps no
    backend for the attempt."""
    if relay is None:
        return
    link = relay.link(0)
    assert link.client_gone.wait(PATIENCE), "the relay did not see the client's socket close"
    if step.listed:
        assert listed == [True], "the backend was not listed at the step: the check is vacuous"
    wait_until(lambda: not on_port(admin, link.server_port), "the attempt's backend to exit")


@pytest.mark.parametrize("connect_timeout", ["10", "0"], ids=["connect_timeout", "no-timeout"])
@pytest.mark.parametrize("step", STEPS, ids=lambda step: step.name)
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
def test_connect_cancelled_at_step(
    flavor: Flavor,
    step: Step,
    connect_timeout: str,
    pg18: Cluster,
    tls_material: TLSMaterial,
    syn_blackhole: SynBlackhole,
    admin: Admin,
) -> None:
    """The trace callback cancels when *step* is reported (and tells the
    relay to hold the server's answers); the cancellation propagates from
    connect(), which leaves no descriptor open -- counted in its ``finally``
    -- and no backend on the server.  With ``connect_timeout`` the adapter
    waits inside its own deadline scope; without, inside none."""
    seen: list[pgproto.Event] = []
    raised: list[BaseException] = []
    returned: list[Any] = []
    listed: list[bool] = []
    at_exit: list[int] = []
    watch: list[FdWatch] = []

    with step_target(step, pg18, tls_material, syn_blackhole, connect_timeout) as (params, relay):
        trigger = Trigger()

        def trace(event: pgproto.Event) -> None:
            seen.append(event)
            if step.trigger(event):
                if relay is not None:
                    relay.hold()
                if step.listed and relay is not None:
                    listed.append(bool(on_port(admin, relay.link(0).server_port)))
                trigger.fire()

        async def body() -> None:
            fds = FdWatch()
            watch.append(fds)
            try:
                returned.append(await flavor.adapter.connect(**params, trace=trace))
            except BaseException as exc:
                raised.append(exc)
                raise
            finally:
                fds.stop()
                at_exit.append(len(seen))

        async def main() -> bool:
            try:
                return await flavor.guarded(body, trigger)
            finally:
                for conn in returned:
                    await conn.close()

        ignore = relay.owned_fds if relay is not None else syn_blackhole.owned_fds
        with assert_no_fd_leak(ignore=ignore):
            cancelled = flavor.run(main)
        assert returned == [], "connect() returned a connection: the cancellation did not land"
        assert cancelled
        assert len(raised) == 1
        assert isinstance(raised[0], flavor.cancelled), repr(raised[0])
        [fds] = watch
        fds.assert_no_leak(ignore=ignore())
        check_step(step, seen, at_exit[0], relay)
        check_server_side(admin, step, relay, listed)


class Interrupted(KeyboardInterrupt):
    """The KeyboardInterrupt the tests raise (to tell it from a real one)."""


BLOCKING_STEPS: Final = (
    Step("tcp-connect", "blackhole", lambda e: is_status(e, ConnStatus.STARTED)),
    *STEPS[1:],
)


@pytest.mark.parametrize("step", BLOCKING_STEPS, ids=lambda step: step.name)
def test_blocking_connect_interrupted_at_step(
    step: Step,
    pg18: Cluster,
    tls_material: TLSMaterial,
    syn_blackhole: SynBlackhole,
    admin: Admin,
) -> None:
    """A KeyboardInterrupt raised by the trace callback at *step*: connect()
    closes its socket before it propagates.  (At tcp-connect the blocking
    adapter reports StatusChanged(STARTED) after starting its non-blocking
    connect(), so the socket is open then.)"""
    seen: list[pgproto.Event] = []
    listed: list[bool] = []
    with step_target(step, pg18, tls_material, syn_blackhole, "10") as (params, relay):

        def trace(event: pgproto.Event) -> None:
            seen.append(event)
            if step.trigger(event):
                if step.listed and relay is not None:
                    listed.append(bool(on_port(admin, relay.link(0).server_port)))
                raise Interrupted

        ignore = relay.owned_fds if relay is not None else syn_blackhole.owned_fds
        fds = watched_call(lambda: blocking.connect(**params, trace=trace), Interrupted)
        fds.assert_no_leak(ignore=ignore())
        assert step.trigger(seen[-1])
        if step.name == "tcp-connect":
            assert isinstance(seen[-2], pgproto.OpenConnection)
        check_server_side(admin, step, relay, listed)


def _syn_sent_to(port: int) -> bool:
    """Whether a socket of this machine is in SYN_SENT towards 127.0.0.1:*port*."""
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "02" and remote == f"0100007F:{port:04X}":
                return True
    return False


def _in_poll(native_id: int) -> bool:
    """Whether thread *native_id* of this process sleeps in poll(2) (its
    kernel wait channel; a thread waiting for the GIL shows a futex)."""
    with open(f"/proc/self/task/{native_id}/wchan", encoding="ascii") as wchan:
        return "poll" in wchan.read()


def test_blocking_connect_interrupted_by_a_signal_while_it_waits(
    syn_blackhole: SynBlackhole,
) -> None:
    """The real thing: a signal whose handler raises KeyboardInterrupt
    arrives while connect() waits in poll(2) for the black hole's SYN-ACK --
    sent once /proc/net/tcp shows the socket in SYN_SENT and the main
    thread's wait channel is poll's: the socket is closed before the
    exception leaves connect()."""
    main, main_native = threading.get_ident(), threading.get_native_id()
    sent = threading.Event()

    def interrupt_when_waiting() -> None:
        deadline = time.monotonic() + PATIENCE
        while not (_syn_sent_to(syn_blackhole.port) and _in_poll(main_native)):
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)
        sent.set()
        signal.pthread_kill(main, signal.SIGUSR1)

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, handler)
    helper = threading.Thread(target=interrupt_when_waiting)
    try:
        helper.start()
        fds = watched_call(
            lambda: blocking.connect(
                host=syn_blackhole.host,
                port=syn_blackhole.port,
                user="postgres",
                sslmode="disable",
                connect_timeout=10,
            ),
            Interrupted,
        )
        helper.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert sent.is_set()
    fds.assert_no_leak(ignore=syn_blackhole.owned_fds())
    assert not _syn_sent_to(syn_blackhole.port)


# --------------------------------------------------------------------------
# 2. a query cancelled while the server runs it, or mid-result


class Recorder:
    """A trace callback: records every event and runs the actions of the
    rules whose predicate matches (each rule fires once)."""

    def __init__(self) -> None:
        self.events: list[pgproto.Event] = []
        self._rules: list[tuple[Callable[[pgproto.Event], bool], Callable[[], object]]] = []

    def __call__(self, event: pgproto.Event) -> None:
        self.events.append(event)
        for rule in list(self._rules):
            predicate, action = rule
            if predicate(event):
                self._rules.remove(rule)
                action()

    def on(self, predicate: Callable[[pgproto.Event], bool], action: Callable[[], object]) -> None:
        self._rules.append((predicate, action))

    def clear(self) -> None:
        self.events.clear()
        self._rules.clear()

    def recovery_start(self) -> int | None:
        """Index of the first event of the cancel request's connection (its
        attempt) among the recorded events, None if there was none."""
        for index, event in enumerate(self.events):
            if isinstance(event, pgproto.AttemptStarted):
                return index
        return None

    def cancelled_on_server(self) -> bool:
        """The server reported 57014 (query cancelled), then ReadyForQuery."""
        kinds = [
            event.error.sqlstate if isinstance(event, pgproto.ErrorResponse) else type(event)
            for event in self.events
        ]
        return QUERY_CANCELED in kinds and kinds[-1] is pgproto.ReadyForQuery


def is_recovery(event: pgproto.Event) -> bool:
    return isinstance(event, pgproto.AttemptStarted)


def is_data_row(event: pgproto.Event) -> bool:
    return isinstance(event, pgproto.DataRow)


@dataclasses.dataclass
class QueryOutcome:
    """How a query that was to be cancelled ended."""

    cancelled: bool = False
    raised: BaseException | None = None
    results: list[Any] | None = None
    fds: FdWatch | None = None
    ended: float = 0.0

    def elapsed(self, trigger: Trigger) -> float:
        assert trigger.at is not None, "the trigger never fired"
        return self.ended - trigger.at


async def cancel_query(
    flavor: Flavor,
    conn: Any,
    sql: str,
    trigger: Trigger,
    controller: Callable[[], Awaitable[object]] | None = None,
) -> QueryOutcome:
    """Run *sql* on *conn* where *trigger* cancels it (with *controller*
    running as another task); the descriptors are counted again in the
    ``finally`` of the query, before anything else runs."""
    outcome = QueryOutcome()

    async def body() -> None:
        outcome.fds = FdWatch()
        try:
            outcome.results = await conn.simple_query(sql)
        except BaseException as exc:
            outcome.raised = exc
            raise
        finally:
            outcome.fds.stop()
            outcome.ended = time.monotonic()

    async def guard() -> None:
        outcome.cancelled = await flavor.guarded(body, trigger)

    if controller is None:
        await guard()
    else:
        await flavor.together(guard, controller)
    return outcome


def when_running(admin: Admin, pid: int | None, trigger: Trigger) -> Callable[[], Awaitable[None]]:
    """A controller task: fire *trigger* once pg_stat_activity shows
    ``pg_sleep(30)`` running on backend *pid*."""

    async def controller() -> None:
        await until(lambda: running(admin, pid), "pg_sleep to run")
        trigger.fire()

    return controller


def assert_recovered(flavor: Flavor, outcome: QueryOutcome, conn: Any, recorder: Recorder) -> None:
    """The cancellation went through and the connection is idle again, with
    its descriptors as they were: the CancelRequest was sent on a
    connection of its own, now closed."""
    assert outcome.cancelled, f"not cancelled: {outcome.results!r}"
    assert isinstance(outcome.raised, flavor.cancelled), repr(outcome.raised)
    assert outcome.fds is not None
    changed = (outcome.fds.after or set()) ^ outcome.fds.before
    assert not changed, f"descriptors opened or closed:\n{describe_fds(changed)}"
    assert not conn.closed
    assert conn.transaction_status == "I"
    assert recorder.recovery_start() is not None, "no CancelRequest was sent"
    assert recorder.cancelled_on_server()


@pytest.mark.parametrize("transport", ["unix", "tls"])
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
def test_query_cancelled_while_the_server_runs_it(
    flavor: Flavor, transport: str, pg18: Cluster, tls_material: TLSMaterial, admin: Admin
) -> None:
    """pg_sleep(30), cancelled from another task once the server shows it
    active: cancelled on the server (57014), drained, idle and usable."""
    recorder = Recorder()

    async def main() -> None:
        async with await flavor.adapter.connect(
            **params_for(pg18, transport, tls_material), trace=recorder
        ) as conn:
            pid = conn.backend_pid
            for _ in range(2):  # and again, on the same connection
                recorder.clear()
                trigger = Trigger()
                outcome = await cancel_query(
                    flavor, conn, SLEEP_SQL, trigger, when_running(admin, pid, trigger)
                )
                assert_recovered(flavor, outcome, conn, recorder)
                assert outcome.elapsed(trigger) < SLACK  # not the 30 s of the sleep
                # Nothing is active for that backend: it is idle after the sleep.
                assert idle_after(admin, pid, SLEEP_SQL)
                await assert_in_sync(conn)
                assert conn.backend_pid == pid

    with assert_no_fd_leak():
        flavor.run(main)


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
def test_query_cancelled_in_a_transaction(
    flavor: Flavor, pg18: Cluster, tls_material: TLSMaterial, admin: Admin
) -> None:
    """Inside BEGIN: the cancelled query fails the transaction ("E"), the
    next query is refused (25P02) and ROLLBACK brings it back to idle."""
    recorder = Recorder()

    async def main() -> None:
        async with await flavor.adapter.connect(
            **params_for(pg18, "unix", tls_material), trace=recorder
        ) as conn:
            pid = conn.backend_pid
            [begin] = await conn.simple_query("begin")
            assert begin.tag == "BEGIN"
            assert conn.transaction_status == "T"
            recorder.clear()
            trigger = Trigger()
            outcome = await cancel_query(
                flavor, conn, SLEEP_SQL, trigger, when_running(admin, pid, trigger)
            )
            assert outcome.cancelled
            assert isinstance(outcome.raised, flavor.cancelled)
            assert not conn.closed
            assert recorder.cancelled_on_server()
            assert conn.transaction_status == "E"
            found = activity(admin, pid)
            assert found is not None
            assert found[:2] == ("idle in transaction (aborted)", SLEEP_SQL)
            with pytest.raises(ServerError) as caught:
                await conn.simple_query("select 1")
            assert caught.value.sqlstate == "25P02"  # in_failed_sql_transaction
            [rollback] = await conn.simple_query("rollback")
            assert rollback.tag == "ROLLBACK"
            assert conn.transaction_status == "I"
            await assert_in_sync(conn)

    with assert_no_fd_leak():
        flavor.run(main)


@pytest.mark.parametrize("transport", ["unix", "tls"])
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
def test_query_cancelled_mid_result(
    flavor: Flavor, transport: str, pg18: Cluster, tls_material: TLSMaterial, admin: Admin
) -> None:
    """Cancelled from the trace at the first DataRow of
    :data:`ROWS_THEN_SLEEP` (the server then sleeps before the third row):
    the rest of the result is drained, not handed to the next queries."""
    recorder = Recorder()

    async def main() -> None:
        async with await flavor.adapter.connect(
            **params_for(pg18, transport, tls_material), trace=recorder
        ) as conn:
            pid = conn.backend_pid
            recorder.clear()
            trigger = Trigger()
            recorder.on(is_data_row, trigger.fire)
            outcome = await cancel_query(flavor, conn, ROWS_THEN_SLEEP, trigger)
            assert_recovered(flavor, outcome, conn, recorder)
            assert outcome.elapsed(trigger) < SLACK
            start = recorder.recovery_start()
            assert start is not None
            # The first row or the first two (the server may have flushed the
            # second by then) had arrived when the cancellation landed; the
            # third never came.
            assert sum(map(is_data_row, recorder.events[:start])) in (1, 2)
            assert sum(map(is_data_row, recorder.events)) <= 2
            assert idle_after(admin, pid, ROWS_THEN_SLEEP)
            await assert_in_sync(conn)

    with assert_no_fd_leak():
        flavor.run(main)


#: A result far larger than the socket buffers, in rows of :data:`ROW_BYTES`.
STREAM_SQL: Final = "select repeat('x', 1000) from generate_series(1, 20000)"
ROW_BYTES: Final = 1 + 4 + 2 + 4 + 1000  # 'D', length, column count, value length, value
#: What an adapter that checkpoints per read, or after each full read, may
#: read after the trigger: the rest of the chunk being parsed, and one more
#: recv() (64 kB each).
ONE_OR_TWO_READS: Final = 2 * 65536


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
def test_cancellation_lands_while_rows_keep_arriving(
    flavor: Flavor, transport: str, pg18: Cluster, tls_material: TLSMaterial, admin: Admin
) -> None:
    """Cancelled at the first DataRow of a 20 MB result while far more
    than :data:`ONE_OR_TWO_READS` already waits in the socket: the
    cancellation must land before the adapter has read half of that.

    Deterministic: the trace callback, after firing the trigger, waits (the
    event loop with it) until the backend blocks in ClientWrite -- its
    output buffers are full -- and reads how much waits in the client's
    socket (FIONREAD; the receive buffer is raised to 4 MB first, through a
    duplicate of the descriptor, so that it is at least three times two
    reads).  An adapter that only suspends when recv() finds nothing reads
    all of that before the cancellation can land (or never lets it land, if
    rows keep coming faster than it parses them); one that checkpoints per
    read, or after every full read as the adapters do, lands within two
    reads, less than half of it."""
    recorder = Recorder()
    waiting: list[int] = []

    async def main() -> None:
        watch = FdWatch()
        conn = await flavor.adapter.connect(
            **params_for(pg18, transport, tls_material), trace=recorder
        )
        watch.stop()
        fd = socket_of(watch)
        async with conn:
            with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as dup:
                dup.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            pid = conn.backend_pid

            def stall() -> None:
                trigger.fire()
                wait_until(
                    lambda: (activity(admin, pid) or ("", "", ""))[2] == "ClientWrite",
                    "the backend to block on its full socket",
                )
                waiting.append(unread_bytes(fd))

            recorder.clear()
            trigger = Trigger()
            recorder.on(is_data_row, stall)
            outcome = await cancel_query(flavor, conn, STREAM_SQL, trigger)
            [unread] = waiting
            assert unread > 3 * ONE_OR_TWO_READS, f"only {unread} bytes waited (rmem_max?)"
            start = recorder.recovery_start()
            rows = sum(map(is_data_row, recorder.events[:start]))
            assert start is not None, f"never landed: all {rows} rows were read"
            assert (rows - 1) * ROW_BYTES < unread / 2, (
                f"{rows - 1} rows ({(rows - 1) * ROW_BYTES} bytes) read after the trigger,"
                f" {unread} bytes were waiting"
            )
            assert_recovered(flavor, outcome, conn, recorder)
            await assert_in_sync(conn)

    with assert_no_fd_leak():
        flavor.run(main)


# --------------------------------------------------------------------------
# 3. the "or closed" branches


def assert_closed_cleanly(outcome: QueryOutcome, conn: Any, fd: int, ignore: set[int]) -> None:
    """The connection is closed, its socket (*fd*) with it, and nothing else
    was left open -- all of it by the time the cancelled call returned."""
    assert conn.closed
    assert outcome.fds is not None
    outcome.fds.assert_closed(fd)
    outcome.fds.assert_no_leak(ignore)


async def assert_unusable(conn: Any) -> None:
    with pytest.raises(ConnectionClosed):
        await conn.simple_query("select 1")


def _second_cancel_expected(flavor: Flavor) -> str:
    # asyncio has no shield: a second Task.cancel() interrupts the recovery.
    # trio and anyio shield it from every outer cancel scope.
    return "closed" if flavor.framework == "asyncio" else "usable"


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
def test_second_cancellation_during_the_recovery(
    flavor: Flavor, pg18: Cluster, tls_material: TLSMaterial, admin: Admin
) -> None:
    """Cancelled once while pg_sleep runs, and again as the recovery starts
    (from the trace, when the cancel request's connection attempt begins):
    asyncio (``Task.cancel()`` again; for ``asyncio.timeout``, a plain
    ``Task.cancel()`` on top of it) closes the connection; trio and anyio
    cancel an enclosing scope too, which the recovery's shield holds off,
    so the connection ends usable."""
    recorder = Recorder()
    expected = _second_cancel_expected(flavor)

    async def main() -> None:
        watch = FdWatch()
        conn = await flavor.adapter.connect(
            **params_for(pg18, "unix", tls_material, options=CHECK_CLIENT), trace=recorder
        )
        watch.stop()
        fd = socket_of(watch)
        pid = conn.backend_pid
        try:
            recorder.clear()
            trigger = Trigger()
            recorder.on(is_recovery, trigger.fire_again)
            outcome = await cancel_query(
                flavor, conn, SLEEP_SQL, trigger, when_running(admin, pid, trigger)
            )
            assert trigger.again_fired
            assert outcome.cancelled
            assert isinstance(outcome.raised, flavor.cancelled)
            if expected == "closed":
                assert_closed_cleanly(outcome, conn, fd, set())
                await assert_unusable(conn)
                await until(lambda: gone(admin, pid), "the backend to exit")
            else:
                assert_recovered(flavor, outcome, conn, recorder)
                assert idle_after(admin, pid, SLEEP_SQL)
                await assert_in_sync(conn)
        finally:
            await conn.close()

    with assert_no_fd_leak():
        flavor.run(main)


#: ``connect_timeout=1`` (rounded up to 2 s, as libpq does) bounds the recovery.
RECOVERY_BOUND: Final = 2.0


@pytest.mark.parametrize(
    ("flavor", "later"),
    [(flavor, ("refuse", "blackhole")[i % 2]) for i, flavor in enumerate(FLAVORS)],
    ids=str,
)
def test_recovery_that_cannot_finish_closes(
    flavor: Flavor, later: str, pg18: Cluster, tls_material: TLSMaterial, admin: Admin
) -> None:
    """The relay lets the first connection through and refuses (RST) or
    black-holes every later one, so the CancelRequest cannot be delivered:
    pg_sleep(30) goes on, the recovery gives up after its bound (2 s), the
    connection is closed and the cancellation goes on.  The backend notices
    the closed socket (client_connection_check_interval) and exits.  The
    bound is checked from below (it did wait for it) and generously above."""
    recorder = Recorder()
    params = params_for(pg18, "tcp", tls_material, connect_timeout="1", options=CHECK_CLIENT)
    with Relay((pg18.host, pg18.port), later=later) as relay:

        async def main() -> None:
            watch = FdWatch()
            conn = await flavor.adapter.connect(**via_relay(params, relay), trace=recorder)
            watch.stop()
            fd = socket_of(watch, relay.owned_fds())
            pid = conn.backend_pid
            try:
                recorder.clear()
                trigger = Trigger()
                outcome = await cancel_query(
                    flavor, conn, SLEEP_SQL, trigger, when_running(admin, pid, trigger)
                )
                assert outcome.cancelled
                assert isinstance(outcome.raised, flavor.cancelled)
                elapsed = outcome.elapsed(trigger)
                assert RECOVERY_BOUND - 0.05 <= elapsed < RECOVERY_BOUND + SLACK, elapsed
                assert_closed_cleanly(outcome, conn, fd, relay.owned_fds())
                assert recorder.recovery_start() is not None
                assert not recorder.cancelled_on_server()
                await assert_unusable(conn)
            finally:
                await conn.close()
            assert relay.link(0).client_gone.wait(PATIENCE)
            assert relay.accepted == (1 if later == "refuse" else 2)
            await until(lambda: gone(admin, pid), "the backend to exit")

        with assert_no_fd_leak(ignore=relay.owned_fds):
            flavor.run(main)


#: The size of a query (mostly a comment) far larger than the socket buffers.
HUGE: Final = 50_000_000


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
def test_cancelled_while_the_query_is_sent(
    flavor: Flavor, pg18: Cluster, tls_material: TLSMaterial, admin: Admin
) -> None:
    """The relay stops reading once 1 MB of the query arrived, so sending
    its 50 MB blocks; cancelled then, the server holds part of a message:
    the connection is closed at once (no CancelRequest, no Terminate), never
    left to go on mid-message.  The backend, given the rest of what was sent
    and then the end of the stream, exits."""
    recorder = Recorder()
    params = params_for(pg18, "tcp", tls_material)
    with Relay((pg18.host, pg18.port)) as relay:

        async def main() -> None:
            watch = FdWatch()
            conn = await flavor.adapter.connect(**via_relay(params, relay), trace=recorder)
            watch.stop()
            fd = socket_of(watch, relay.owned_fds())
            pid = conn.backend_pid
            sql = "select 1 -- " + "x" * HUGE
            try:
                recorder.clear()
                trigger = Trigger()
                relay.pause_client(after=1 << 20)

                async def controller() -> None:
                    await until(relay.paused.is_set, "the relay to stop reading")
                    trigger.fire()

                outcome = await cancel_query(flavor, conn, sql, trigger, controller)
                assert outcome.cancelled
                assert isinstance(outcome.raised, flavor.cancelled)
                assert outcome.elapsed(trigger) < SLACK
                assert recorder.events == [], "the query had an answer, or a cancel was sent"
                assert_closed_cleanly(outcome, conn, fd, relay.owned_fds())
                await assert_unusable(conn)
            finally:
                await conn.close()
            relay.resume_client()
            link = relay.link(0)
            assert link.client_gone.wait(PATIENCE)
            # The stream ends inside the query message: no Terminate after it.
            query_start = link.from_client.index(b"select 1 -- ") - 5  # 'Q', length
            assert link.from_client[query_start] == ord("Q")
            assert len(link.from_client) - query_start < 1 + 4 + len(sql) + 1
            assert link.from_client.endswith(b"xxxx")
            await until(lambda: gone(admin, pid), "the backend to exit")
            assert relay.accepted == 1  # and no cancel request

        with assert_no_fd_leak(ignore=relay.owned_fds):
            flavor.run(main)


# --------------------------------------------------------------------------
# 5. close() from another task


@pytest.mark.parametrize(
    "flavor", FRAMEWORKS, ids=lambda flavor: flavor.framework + "-" + flavor.loop
)
def test_close_from_another_task_wakes_the_query(
    flavor: Flavor, pg18: Cluster, tls_material: TLSMaterial, admin: Admin
) -> None:
    """A task waits for pg_sleep's result; another closes the connection:
    the first gets ConnectionClosed promptly, the socket is closed by then,
    and the backend exits (client_connection_check_interval)."""

    async def main() -> None:
        watch = FdWatch()
        conn = await flavor.adapter.connect(
            **params_for(pg18, "unix", tls_material, options=CHECK_CLIENT)
        )
        watch.stop()
        fd = socket_of(watch)
        pid = conn.backend_pid
        outcome = QueryOutcome()
        closed_at: list[float] = []

        async def query() -> None:
            outcome.fds = FdWatch()
            try:
                await conn.simple_query(SLEEP_SQL)
            except ConnectionClosed as exc:
                outcome.raised = exc
            finally:
                outcome.fds.stop()
                outcome.ended = time.monotonic()

        async def closer() -> None:
            await until(lambda: running(admin, pid), "pg_sleep to run")
            closed_at.append(time.monotonic())
            await conn.close()

        await flavor.together(query, closer)
        assert isinstance(outcome.raised, ConnectionClosed), repr(outcome.raised)
        assert outcome.ended - closed_at[0] < SLACK
        assert_closed_cleanly(outcome, conn, fd, set())
        await assert_unusable(conn)
        await until(lambda: gone(admin, pid), "the backend to exit")

    with assert_no_fd_leak():
        flavor.run(main)


# --------------------------------------------------------------------------
# the blocking adapter


def _blocking_connect(server: Cluster, tls: TLSMaterial, **kwargs: Any) -> tuple[Any, int]:
    watch = FdWatch()
    conn = blocking.connect(**params_for(server, "unix", tls, options=CHECK_CLIENT), **kwargs)
    watch.stop()
    return conn, socket_of(watch)


def test_blocking_query_interrupted_from_the_trace(
    pg18: Cluster, tls_material: TLSMaterial, admin: Admin
) -> None:
    """A KeyboardInterrupt raised by the trace at the first DataRow: the
    connection is closed (the blocking adapter has no recovery), its socket
    too, before the exception leaves simple_query(); then ConnectionClosed."""
    recorder = Recorder()
    with assert_no_fd_leak():
        conn, fd = _blocking_connect(pg18, tls_material, trace=recorder)
        pid = conn.backend_pid

        def interrupt() -> None:
            raise Interrupted

        recorder.clear()
        recorder.on(is_data_row, interrupt)
        outcome = QueryOutcome(
            fds=watched_call(lambda: conn.simple_query(ROWS_THEN_SLEEP), Interrupted)
        )
        assert_closed_cleanly(outcome, conn, fd, set())
        with pytest.raises(ConnectionClosed):
            conn.simple_query("select 1")
        wait_until(lambda: gone(admin, pid), "the backend to exit")


def test_blocking_cancel_from_another_thread(
    pg18: Cluster, tls_material: TLSMaterial, admin: Admin
) -> None:
    """cancel() from another thread while simple_query waits: the query
    fails with 57014, the connection stays usable and in sync."""
    with assert_no_fd_leak():
        conn, _ = _blocking_connect(pg18, tls_material)
        with conn:
            pid = conn.backend_pid
            errors: list[BaseException] = []

            def cancel_when_running() -> None:
                try:
                    wait_until(lambda: running(admin, pid), "pg_sleep to run")
                    conn.cancel()
                except BaseException as exc:
                    errors.append(exc)

            helper = threading.Thread(target=cancel_when_running)
            fds = FdWatch()
            helper.start()
            with pytest.raises(ServerError) as caught:
                conn.simple_query(SLEEP_SQL)
            helper.join()
            fds.stop()
            assert errors == []
            assert caught.value.sqlstate == QUERY_CANCELED
            assert fds.after == fds.before
            assert conn.transaction_status == "I"
            assert idle_after(admin, pid, SLEEP_SQL)
            blocking_assert_in_sync(conn)


def test_blocking_close_from_another_thread(
    pg18: Cluster, tls_material: TLSMaterial, admin: Admin
) -> None:
    """close() from another thread while simple_query waits: the waiting
    thread gets ConnectionClosed, and the socket is closed by then."""
    with assert_no_fd_leak():
        conn, fd = _blocking_connect(pg18, tls_material)
        pid = conn.backend_pid

        def close_when_running() -> None:
            wait_until(lambda: running(admin, pid), "pg_sleep to run")
            conn.close()

        helper = threading.Thread(target=close_when_running)
        helper.start()
        outcome = QueryOutcome(
            fds=watched_call(lambda: conn.simple_query(SLEEP_SQL), ConnectionClosed)
        )
        helper.join()
        assert_closed_cleanly(outcome, conn, fd, set())
        wait_until(lambda: gone(admin, pid), "the backend to exit")
