"""LISTEN/NOTIFY, notices, ParameterStatus after startup and close(), in
every adapter, against real servers.

Every scenario runs in the five ways pgproto can be used: the blocking
adapter, the asyncio adapter under ``asyncio.run``, the trio adapter under
``trio.run``, and the anyio adapter under ``anyio.run`` on its asyncio and
on its trio backend (test ids ``blocking``, ``asyncio``, ``trio``,
``anyio-asyncio``, ``anyio-trio``).  A :class:`Driver` gives the five one
async interface: the scenarios are coroutines that orchestrate with anyio's
primitives (task groups, worker threads, ``fail_after``), which run on
``asyncio.run`` and ``trio.run`` as they do on ``anyio.run``.  The blocking
driver runs each blocking call in a worker thread, so that the event loop
stays free to watch the server and to send from other sessions meanwhile;
the generator ``notifies()`` is consumed in that thread.  Two tests use the
blocking adapter plainly (no event loop), closing the connection from a
second thread while the main thread waits.

What is checked, on ``pg18`` (and on ``pg15`` by one smoke test per adapter):

* 100 notifications from another session (psycopg, or a blocking pgproto
  connection) arrive in order with the sender's pid, the channel and the
  payload: sent in one transaction, as 100 statements, and with payloads
  of varied sizes (empty, multi-byte UTF-8, 7999 bytes -- the server
  refuses 8000) on two channels interleaved (one with a non-ASCII,
  mixed-case name), over a Unix socket and TLS; notifications that arrive
  while a query runs (the trace shows them before its ReadyForQuery) come
  out of the next ``notifies()`` first; ``timeout=`` ends an iteration on
  which nothing comes, ``stop_after=`` ends it early without losing what
  is buffered;
* (async adapters) one task iterates ``notifies()`` while another runs
  queries on the same connection: each query preempts the waiting
  iterator and completes, and no notification is lost or reordered;
* notices: the handler gets every NoticeResponse in order -- also one sent
  during connect (a WARNING PostgreSQL 15+ emits at login for a
  placeholder in a prefix that ``session_preload_libraries=plpgsql``
  reserves) -- with the same severities, messages and SQLSTATEs libpq
  (psycopg) reports; it can be replaced; one that raises is logged on
  ``pgproto`` and does not harm the connection (nor connect); the default
  handler logs on ``pgproto.notice`` at the documented levels and writes
  nothing to stdout/stderr;
* ParameterStatus after startup: ``SET``, ``RESET``, ``RESET ALL``, ``SET``
  undone by ROLLBACK (also after an error) or by a savepoint rollback,
  ``SET LOCAL``: ``server_parameters`` and ``transaction_status`` agree with
  psycopg's ``conn.info`` after every step;
* close(): idempotent; Terminate on the wire when healthy (a recording
  relay: plaintext ends with ``X\\0\\0\\0\\4``; TLS 1.3 ends with the
  records of Terminate and close_notify, 22 and 19 bytes -- see
  ``capture.py``), then the backend leaves pg_stat_activity; nothing at all
  after the connection broke (backend terminated); close() wakes a task
  (thread) waiting in ``notifies()`` or in a query with ConnectionClosed,
  leaving no file descriptor open; operations after close() raise
  ConnectionClosed;
* a FATAL at idle (``pg_terminate_backend`` while waiting in
  ``notifies()``): the iteration raises, the connection is closed and
  sends nothing more; the error is the server's FATAL (ServerError 57P01),
  also when the FATAL and the end of the stream come in separate reads;
* a query on a connection whose backend was terminated raises the
  server's FATAL (57P01), as libpq does.

"The other session" is psycopg in autocommit mode over the Unix socket.
No fixed sleeps: waiting for the server (or for the connection to wait)
polls with a deadline (:data:`PATIENCE`); every scenario runs under
``fail_after``.  Timing bounds are generous (:data:`SLACK`): they only show
that something did not wait for a notification that never comes, or for a
30 s ``pg_sleep``.

Where a test peeks at a private attribute (is the connection waiting on its
socket right now?), it says so: that is the only way to make sure the
interesting interleaving happens, rather than hoping for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import psycopg
import pytest
import trio
from capture import CaptureRelay, client_tls_start, last_client_record_lengths, tls_records
from fake_server import TERMINATE, message
from fdcheck import assert_no_fd_leak
from pg_admin import (
    SLEEP_SQL,
    Admin,
    activity,
    admin_session,
    gone,
    running,
    until,
    wait_until,
)
from pgproto_adapters import anyio as anyio_adapter
from pgproto_adapters import asyncio as asyncio_adapter
from pgproto_adapters import blocking
from pgproto_adapters import trio as trio_adapter
from pgproto_adapters._cluster import Cluster, quote_literal
from pgproto_adapters._common import AsyncConnectionBase, ConnectionBase, QueryResult
from servers import TLSMaterial, connect_params

import pgproto
from pgproto import ConnectionClosed, NoticeResponse, NotificationResponse, ServerError

#: How long a test waits for something that should happen soon.
PATIENCE: Final = 10.0
#: An upper bound for what must end long before its natural end.
SLACK: Final = 5.0
ROOT: Final = Path(__file__).resolve().parent.parent
#: TLS 1.3 with a 16-byte AEAD tag (see capture.py): payload = plaintext + 17.
TLS13_OVERHEAD: Final = 17
TLS13_SUITES: Final = frozenset(
    {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"}
)
#: (state, query, wait_event_type) of a backend, None once it is gone.
_activity = functools.partial(activity, columns=("state", "query", "wait_event_type"))
#: Wait for the server (or for the connection to wait), polling every 5 ms.
_until = functools.partial(until, patience=PATIENCE, period=0.005)
#: :func:`_until` for plain threads.
_wait_until = functools.partial(wait_until, patience=PATIENCE, period=0.005)

Main = Callable[[], Coroutine[Any, Any, None]]


pytestmark = pytest.mark.usefixtures("no_pg_environment")


# --------------------------------------------------------------------------
# the five ways to use pgproto, behind one async interface


class Driver:
    """One adapter: connect, query, collect notifications, close -- awaitable."""

    name: str

    def run(self, main: Main) -> None:
        raise NotImplementedError

    async def connect(self, params: Mapping[str, Any], **kwargs: Any) -> ConnectionBase:
        raise NotImplementedError

    async def query(self, conn: ConnectionBase, sql: str) -> list[QueryResult]:
        raise NotImplementedError

    async def collect(
        self, conn: ConnectionBase, *, timeout: float | None = None, stop_after: int | None = None
    ) -> list[NotificationResponse]:
        """Iterate ``notifies()`` to its end."""
        raise NotImplementedError

    async def close(self, conn: ConnectionBase) -> None:
        raise NotImplementedError

    async def cancel(self, conn: ConnectionBase) -> None:
        raise NotImplementedError

    def parked(self, conn: ConnectionBase) -> bool:
        """Is ``notifies()`` waiting on the idle socket right now?  (Private
        attributes: the only way to know.)"""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class AsyncDriver(Driver):
    def __init__(
        self,
        name: str,
        connect: Callable[..., Awaitable[AsyncConnectionBase]],
        runner: Callable[[Main], None],
    ) -> None:
        self.name = name
        self._connect = connect
        self._runner = runner

    def run(self, main: Main) -> None:
        self._runner(main)

    @staticmethod
    def _conn(conn: ConnectionBase) -> AsyncConnectionBase:
        assert isinstance(conn, AsyncConnectionBase)
        return conn

    async def connect(self, params: Mapping[str, Any], **kwargs: Any) -> ConnectionBase:
        return await self._connect(**params, **kwargs)

    async def query(self, conn: ConnectionBase, sql: str) -> list[QueryResult]:
        return await self._conn(conn).simple_query(sql)

    async def collect(
        self, conn: ConnectionBase, *, timeout: float | None = None, stop_after: int | None = None
    ) -> list[NotificationResponse]:
        iterator = self._conn(conn).notifies(timeout=timeout, stop_after=stop_after)
        return [n async for n in iterator]

    async def close(self, conn: ConnectionBase) -> None:
        await self._conn(conn).close()

    async def cancel(self, conn: ConnectionBase) -> None:
        await self._conn(conn).cancel()

    def parked(self, conn: ConnectionBase) -> bool:
        c = self._conn(conn)
        # notifies() holds the lock while it waits; the transport's ``idle``
        # (a flag for asyncio, a cancel scope for trio and anyio) is set for
        # the duration of the wait itself.
        return bool(c._lock.locked()) and bool(getattr(c._io, "idle", None))


class BlockingDriver(Driver):
    """Each call in a worker thread (the loop stays free for the test).  A
    call cancelled by the test's ``fail_after`` closes the connection, which
    wakes the thread: a hang fails instead of hanging."""

    name = "blocking"

    def run(self, main: Main) -> None:
        anyio.run(main, backend="asyncio")

    @staticmethod
    def _conn(conn: ConnectionBase) -> blocking.Connection:
        assert isinstance(conn, blocking.Connection)
        return conn

    @staticmethod
    async def _thread(conn: blocking.Connection | None, call: Callable[[], Any]) -> Any:
        try:
            return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            if conn is not None:
                conn.close()
            raise

    async def connect(self, params: Mapping[str, Any], **kwargs: Any) -> ConnectionBase:
        conn = await self._thread(None, functools.partial(blocking.connect, **params, **kwargs))
        assert isinstance(conn, blocking.Connection)
        return conn

    async def query(self, conn: ConnectionBase, sql: str) -> list[QueryResult]:
        c = self._conn(conn)
        results: list[QueryResult] = await self._thread(c, lambda: c.simple_query(sql))
        return results

    async def collect(
        self, conn: ConnectionBase, *, timeout: float | None = None, stop_after: int | None = None
    ) -> list[NotificationResponse]:
        c = self._conn(conn)
        got: list[NotificationResponse] = await self._thread(
            c, lambda: list(c.notifies(timeout=timeout, stop_after=stop_after))
        )
        return got

    async def close(self, conn: ConnectionBase) -> None:
        self._conn(conn).close()  # from the loop's thread: "another thread"

    async def cancel(self, conn: ConnectionBase) -> None:
        self._conn(conn).cancel()  # only used on closed connections: no waiting

    def parked(self, conn: ConnectionBase) -> bool:
        return self._conn(conn)._io.waiting == blocking.WAIT_READ


def _run_asyncio(main: Main) -> None:
    asyncio.run(main())


def _run_trio(main: Main) -> None:
    trio.run(main)


def _run_anyio_asyncio(main: Main) -> None:
    anyio.run(main, backend="asyncio")


def _run_anyio_trio(main: Main) -> None:
    anyio.run(main, backend="trio")


ASYNC_DRIVERS: Final[list[Driver]] = [
    AsyncDriver("asyncio", asyncio_adapter.connect, _run_asyncio),
    AsyncDriver("trio", trio_adapter.connect, _run_trio),
    AsyncDriver("anyio-asyncio", anyio_adapter.connect, _run_anyio_asyncio),
    AsyncDriver("anyio-trio", anyio_adapter.connect, _run_anyio_trio),
]
DRIVERS: Final[list[Driver]] = [BlockingDriver(), *ASYNC_DRIVERS]

every_adapter = pytest.mark.parametrize("drv", DRIVERS, ids=str)
async_adapters = pytest.mark.parametrize("drv", ASYNC_DRIVERS, ids=str)


# --------------------------------------------------------------------------
# helpers


def _params(server: Cluster, transport: str, tls: TLSMaterial, **extra: str) -> dict[str, Any]:
    """The superuser over *transport* (trust; TLS with verify-full); typed
    ``Any`` to be spread into ``psycopg.connect()`` as well."""
    return connect_params(server, transport, tls, **extra)


def _relayed(
    server: Cluster, relay: CaptureRelay, transport: str, tls: TLSMaterial
) -> dict[str, Any]:
    """Parameters that reach *server* through *relay*: tcp, or tls verifying
    the name ``localhost`` while dialling the relay's address."""
    where = {"hostaddr": relay.host} if transport == "tls" else {"host": relay.host}
    return connect_params(server, transport, tls, port=str(relay.port), **where)


def _terminate(admin: Admin, pid: int | None) -> None:
    admin.execute("select pg_terminate_backend(%s)", (pid,))


async def _value(drv: Driver, conn: ConnectionBase, sql: str) -> str | None:
    [result] = await drv.query(conn, sql)
    [(value,)] = result.rows
    return value


def _query_message(sql: str) -> bytes:
    """The simple Query message for *sql*."""
    return message(b"Q", sql.encode() + b"\0")


def _client_records(client_bytes: bytes) -> list[tuple[int, int]]:
    start = client_tls_start(client_bytes)
    assert start is not None, "the client did not speak TLS"
    return tls_records(client_bytes, start)


# --------------------------------------------------------------------------
# senders: "another session"

Message = tuple[str, str]  # (channel, payload)


def _send_psycopg(server: Cluster, messages: Sequence[Message], *, one_transaction: bool) -> int:
    """Send *messages* from a new psycopg session (payloads as parameters);
    its backend pid."""
    with admin_session(server) as other:
        pid = other.info.backend_pid
        block: contextlib.AbstractContextManager[Any] = (
            other.transaction() if one_transaction else contextlib.nullcontext()
        )
        with block:
            for channel, payload in messages:
                other.execute("select pg_notify(%s, %s)", (channel, payload))
    return pid


def _send_pgproto(server: Cluster, messages: Sequence[Message], *, one_transaction: bool) -> int:
    """Send *messages* from a new blocking pgproto session (payloads as SQL
    literals; one transaction is one simple query); its backend pid."""
    statements = [
        f"select pg_notify({quote_literal(channel)}, {quote_literal(payload)})"
        for channel, payload in messages
    ]
    with blocking.connect(
        host=str(server.socket_dir),
        port=str(server.port),
        user="postgres",
        dbname="postgres",
        sslmode="disable",
    ) as other:
        pid = other.backend_pid
        assert pid is not None
        if one_transaction:
            other.simple_query("begin; " + "; ".join(statements) + "; commit")
        else:
            for statement in statements:
                other.simple_query(statement)
    return pid


def _fill(prefix: str, char: str, size: int) -> str:
    """*prefix*, then *char* repeated, padded with ``z`` to exactly *size* UTF-8 bytes."""
    room = size - len(prefix.encode())
    unit = len(char.encode())
    text = prefix + char * (room // unit) + "z" * (room % unit)
    assert len(text.encode()) == size
    return text


#: The largest payload the server accepts is 7999 bytes ("must be shorter
#: than 8000 bytes"; 8000 fails with "payload string too long").
MAX_PAYLOAD: Final = 7999
CHANNELS: Final = ("alpha", "Beta Ω")
LISTEN_BOTH: Final = 'listen alpha; listen "Beta Ω"'


def _varied_payload(i: int) -> str:
    """Payload number *i*: unique (a transaction folds duplicates on a
    channel), of many sizes and alphabets."""
    tag = f"{i}:"
    kind = i % 8
    if kind == 0:
        return "" if i == 0 else tag
    if kind == 1:
        return tag + "ünïcödé 🐘 日本語 ñ Ω"
    if kind == 2:
        return _fill(tag, "x", MAX_PAYLOAD)
    if kind == 3:
        return _fill(tag, "é", MAX_PAYLOAD)  # 2-byte characters
    if kind == 4:
        return _fill(tag, "日", MAX_PAYLOAD)  # 3-byte characters
    if kind == 5:
        return _fill(tag, "🐘", MAX_PAYLOAD)  # 4-byte characters
    if kind == 6:
        return tag + "quote ' double \" backslash \\ tab\t newline\n $$ end"
    return tag + "y" * (i * 37)


def _messages(mode: str) -> list[Message]:
    if mode.startswith("varied"):
        return [(CHANNELS[i % 2], _varied_payload(i)) for i in range(100)]
    return [("ch", str(i)) for i in range(100)]


#: mode -> (sender, one_transaction)
SEND_MODES: Final[dict[str, tuple[Callable[..., int], bool]]] = {
    "one-transaction": (_send_psycopg, True),
    "separate-statements": (_send_pgproto, False),
    "varied-separate": (_send_psycopg, False),
    "varied-one-transaction": (_send_pgproto, True),
}


def _triples(got: Sequence[NotificationResponse]) -> list[tuple[int, str, str]]:
    return [(n.pid, n.channel, n.payload) for n in got]


# --------------------------------------------------------------------------
# 1. notifications arrive, all and in order


def test_varied_payloads_are_what_the_test_claims() -> None:
    """The payload mix holds what the docstring says: 100 unique payloads,
    the empty one, multi-byte UTF-8, and a dozen at the 7999-byte maximum."""
    payloads = [p for _, p in _messages("varied-separate")]
    assert len(set(payloads)) == 100
    assert "" in payloads
    sizes = [len(p.encode()) for p in payloads]
    assert max(sizes) == MAX_PAYLOAD
    assert sizes.count(MAX_PAYLOAD) == 50  # kinds 2 to 5
    assert any(len(p.encode()) > len(p) for p in payloads)


@every_adapter
@pytest.mark.parametrize("mode", list(SEND_MODES))
@pytest.mark.parametrize("transport", ["unix", "tls"])
def test_notifications_arrive_in_order(
    pg18: Cluster, tls_material: TLSMaterial, drv: Driver, mode: str, transport: str
) -> None:
    """100 notifications sent by another session while the connection waits
    in ``notifies()`` all arrive, in order, with the sender's pid."""
    sender, one_transaction = SEND_MODES[mode]
    messages = _messages(mode)
    params = _params(pg18, transport, tls_material)

    async def main() -> None:
        with anyio.fail_after(PATIENCE):
            conn = await drv.connect(params)
            try:
                await drv.query(conn, LISTEN_BOTH if mode.startswith("varied") else "listen ch")
                sender_pid: list[int] = []

                async def send() -> None:
                    await _until(lambda: drv.parked(conn), "notifies() to wait")
                    call = functools.partial(
                        sender, pg18, messages, one_transaction=one_transaction
                    )
                    sender_pid.append(await anyio.to_thread.run_sync(call))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(send)
                    got = await drv.collect(conn, stop_after=len(messages))
                [pid] = sender_pid
                assert pid != conn.backend_pid
                assert _triples(got) == [(pid, ch, payload) for ch, payload in messages]
                # Nothing more came, and the connection is still good.
                assert await drv.collect(conn, timeout=0.05) == []
                assert await _value(drv, conn, "select 1") == "1"
            finally:
                await drv.close(conn)

    drv.run(main)


ADVISORY_KEY: Final = 7_001_234


@every_adapter
def test_notifications_during_a_query_are_kept(
    pg18: Cluster, tls_material: TLSMaterial, drv: Driver
) -> None:
    """Notifications that arrive while the connection runs a query (its
    backend blocked on a lock while another session notifies) are kept, and
    come out of the next ``notifies()`` before those that arrive later."""
    events: list[pgproto.Event] = []
    params = _params(pg18, "tls", tls_material)

    async def main() -> None:
        with anyio.fail_after(PATIENCE), admin_session(pg18) as admin, admin_session(pg18) as other:
            conn = await drv.connect(params, trace=events.append)
            pid = conn.backend_pid
            other_pid = other.info.backend_pid
            try:
                await drv.query(conn, "listen ch")
                admin.execute("select pg_advisory_lock(%s)", (ADVISORY_KEY,))
                mark = len(events)

                async def blocked_query() -> None:
                    await drv.query(
                        conn,
                        "select pg_notify('ch', 'self'), "
                        f"pg_advisory_xact_lock({ADVISORY_KEY})::text",
                    )

                async with anyio.create_task_group() as tg:
                    tg.start_soon(blocked_query)
                    await _until(
                        lambda: (_activity(admin, pid) or (None,) * 3)[2] == "Lock",
                        "the query to wait for the lock",
                    )
                    for i in range(5):
                        other.execute("select pg_notify('ch', %s)", (f"during-{i}",))
                    admin.execute("select pg_advisory_unlock(%s)", (ADVISORY_KEY,))
                # The query's own events: the six notifications came before
                # its ReadyForQuery, i.e. while simple_query() was reading.
                kinds = [
                    type(e).__name__
                    for e in events[mark:]
                    if isinstance(e, NotificationResponse | pgproto.ReadyForQuery)
                ]
                assert kinds == ["NotificationResponse"] * 6 + ["ReadyForQuery"]
                for i in range(3):
                    other.execute("select pg_notify('ch', %s)", (f"after-{i}",))
                got = await drv.collect(conn, stop_after=9)
                assert _triples(got) == [
                    *((other_pid, "ch", f"during-{i}") for i in range(5)),
                    (pid, "ch", "self"),
                    *((other_pid, "ch", f"after-{i}") for i in range(3)),
                ]
            finally:
                await drv.close(conn)

    drv.run(main)


@every_adapter
def test_notifies_timeout_and_stop_after(
    pg18: Cluster, tls_material: TLSMaterial, drv: Driver
) -> None:
    """``timeout=`` ends an iteration on which nothing comes (after about
    that long); ``stop_after=`` ends it early and what was already received
    stays for the next one."""
    params = _params(pg18, "unix", tls_material)

    async def main() -> None:
        with anyio.fail_after(PATIENCE), admin_session(pg18) as other:
            conn = await drv.connect(params)
            try:
                await drv.query(conn, "listen ch")
                start = time.monotonic()
                assert await drv.collect(conn, timeout=0.3) == []
                elapsed = time.monotonic() - start
                assert 0.25 <= elapsed < SLACK
                assert await _value(drv, conn, "select 'usable'") == "usable"
                # Ten in one transaction: one read gets them all.
                with other.transaction():
                    for i in range(10):
                        other.execute("select pg_notify('ch', %s)", (str(i),))
                first = await drv.collect(conn, stop_after=4)
                assert [n.payload for n in first] == ["0", "1", "2", "3"]
                rest = await drv.collect(conn, stop_after=6, timeout=PATIENCE)
                assert [n.payload for n in rest] == [str(i) for i in range(4, 10)]
                assert await drv.collect(conn, timeout=0.05) == []
                # A timeout with some buffered: they come, then it ends.
                await drv.query(conn, "select pg_notify('ch', 'buffered')")
                got = await drv.collect(conn, timeout=0.2)
                assert [(n.pid, n.payload) for n in got] == [(conn.backend_pid, "buffered")]
            finally:
                await drv.close(conn)

    drv.run(main)


# --------------------------------------------------------------------------
# 2. one task iterates notifies() while another runs queries


@async_adapters
def test_notifies_share_the_connection_with_queries(
    pg18: Cluster, tls_material: TLSMaterial, drv: Driver
) -> None:
    """A listener task iterates ``notifies()``; another task runs queries on
    the same connection.  With nothing to notify, each query (started while
    the listener is parked on the socket) completes promptly; then, while a
    worker thread sends 100 notifications from another session, 30 queries
    that notify the connection itself run back to back.  Every query gets
    its answer, and every notification arrives, in order per sender."""
    foreign, own, idle_queries = 100, 30, 20
    params = _params(pg18, "tls", tls_material)

    async def main() -> None:
        with anyio.fail_after(PATIENCE * 2):
            conn = await drv.connect(params)
            try:
                await drv.query(conn, "listen ch")
                got: list[NotificationResponse] = []
                answers: list[str | None] = []
                durations: list[float] = []
                sender: list[int] = []

                async def listener() -> None:
                    got.extend(await drv.collect(conn, stop_after=foreign + own))

                async def send() -> None:
                    messages = [("ch", str(i)) for i in range(foreign)]
                    call = functools.partial(_send_psycopg, pg18, messages, one_transaction=False)
                    sender.append(await anyio.to_thread.run_sync(call))

                async def queries() -> None:
                    for i in range(idle_queries):
                        await _until(lambda: drv.parked(conn), "the listener to wait")
                        start = time.monotonic()
                        answers.append(await _value(drv, conn, f"select {i}"))
                        durations.append(time.monotonic() - start)
                    async with anyio.create_task_group() as inner:
                        inner.start_soon(send)
                        for i in range(own):
                            [result] = await drv.query(
                                conn, f"select {i}, pg_notify('ch', 'self-{i}')::text"
                            )
                            answers.append(result.rows[0][0])

                async with anyio.create_task_group() as tg:
                    tg.start_soon(listener)
                    tg.start_soon(queries)
                assert answers == [str(i) for i in range(idle_queries)] + [
                    str(i) for i in range(own)
                ]
                assert max(durations) < SLACK
                [other_pid] = sender
                assert [n.payload for n in got if n.pid == other_pid] == [
                    str(i) for i in range(foreign)
                ]
                assert [n.payload for n in got if n.pid == conn.backend_pid] == [
                    f"self-{i}" for i in range(own)
                ]
                assert len(got) == foreign + own
                assert {n.channel for n in got} == {"ch"}
                assert await drv.collect(conn, timeout=0.05) == []
            finally:
                await drv.close(conn)

    drv.run(main)


# --------------------------------------------------------------------------
# 3. notices

#: A WARNING during connect: loading plpgsql (session_preload_libraries, a
#: superuser setting) reserves the "plpgsql." prefix and removes a
#: placeholder set in it (PostgreSQL 15+, MarkGUCPrefixReserved).
LOGIN_NOTICE_OPTIONS: Final = (
    "-c client_min_messages=notice -c session_preload_libraries=plpgsql -c plpgsql.bogus=1"
)
LOGIN_WARNING: Final = (
    "WARNING",
    'invalid configuration parameter name "plpgsql.bogus", removing it',
    "42602",
)
NOTICES_SQL: Final = (
    "set client_min_messages = log; "
    "DO $$ BEGIN "
    "RAISE NOTICE 'n %', 1; RAISE WARNING 'w'; RAISE INFO 'i'; RAISE NOTICE 'ünï 🐘'; "
    "RAISE LOG 'l'; RAISE DEBUG 'not sent'; "
    "RAISE NOTICE 'last' USING DETAIL = 'the detail', HINT = 'the hint'; "
    "END $$"
)
NOTICES: Final = [
    ("NOTICE", "n 1", "00000"),
    ("WARNING", "w", "01000"),
    ("INFO", "i", "00000"),
    ("NOTICE", "ünï 🐘", "00000"),
    ("LOG", "l", "00000"),
    ("NOTICE", "last", "00000"),
]
#: What the default handler logs for NOTICES_SQL (level, message).
LOGGED: Final = [
    (logging.INFO, "NOTICE:  n 1"),
    (logging.WARNING, "WARNING:  w"),
    (logging.INFO, "INFO:  i"),
    (logging.INFO, "NOTICE:  ünï 🐘"),
    (logging.DEBUG, "LOG:  l"),
    (logging.INFO, "NOTICE:  last"),
]


def _notice(n: NoticeResponse) -> tuple[str, str, str | None]:
    return (n.severity, n.message, n.fields.get("C"))


def _libpq_notices(server: Cluster) -> list[tuple[str | None, str | None, str | None]]:
    """What libpq (psycopg's notice handler) reports for NOTICES_SQL."""
    seen: list[tuple[str | None, str | None, str | None]] = []
    with admin_session(server) as oracle:
        oracle.add_notice_handler(
            lambda d: seen.append((d.severity_nonlocalized, d.message_primary, d.sqlstate))
        )
        oracle.execute(NOTICES_SQL)
    return seen


@every_adapter
def test_notice_handler(
    pg18: Cluster, tls_material: TLSMaterial, drv: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler gets every notice in order (the one during connect too),
    as libpq reports them; it can be replaced; one that raises is logged on
    ``pgproto`` -- during connect as well -- and the connection carries on."""
    assert _libpq_notices(pg18) == NOTICES
    params = _params(pg18, "unix", tls_material, options=LOGIN_NOTICE_OPTIONS)

    def broken(notice: NoticeResponse) -> None:
        raise RuntimeError(f"handler failed on {notice.message}")

    async def main() -> None:
        with anyio.fail_after(PATIENCE):
            received: list[NoticeResponse] = []
            conn = await drv.connect(params, notice_handler=received.append)
            try:
                assert [_notice(n) for n in received] == [LOGIN_WARNING]
                assert received[0].fields.get("D") == '"plpgsql" is now a reserved prefix.'
                assert conn.notice_handler == received.append
                received.clear()
                [_, result] = await drv.query(conn, NOTICES_SQL)
                assert result.tag == "DO"
                assert [_notice(n) for n in received] == NOTICES
                assert received[-1].fields.get("D") == "the detail"
                assert received[-1].fields.get("H") == "the hint"
                # Replaced by assignment.
                second: list[NoticeResponse] = []
                conn.notice_handler = second.append
                await drv.query(conn, NOTICES_SQL)
                assert [_notice(n) for n in second] == NOTICES
                assert len(received) == len(NOTICES)
                # A handler that raises.
                conn.notice_handler = broken
                caplog.clear()
                with caplog.at_level(logging.ERROR, logger="pgproto"):
                    await drv.query(conn, NOTICES_SQL)
                assert await _value(drv, conn, "select 'still fine'") == "still fine"
                assert conn.transaction_status == "I"
                failures = [r for r in caplog.records if r.name == "pgproto"]
                assert [str(r.exc_info[1]) for r in failures if r.exc_info] == [
                    f"handler failed on {message}" for _, message, _ in NOTICES
                ]
                assert all(r.levelno == logging.ERROR for r in failures)
            finally:
                await drv.close(conn)
            # During connect.
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="pgproto"):
                conn = await drv.connect(params, notice_handler=broken)
            try:
                assert await _value(drv, conn, "select 'connected'") == "connected"
            finally:
                await drv.close(conn)
            failures = [r for r in caplog.records if r.name == "pgproto"]
            assert [str(r.exc_info[1]) for r in failures if r.exc_info] == [
                f"handler failed on {LOGIN_WARNING[1]}"
            ]

    drv.run(main)


@every_adapter
def test_default_notice_handler_logs(
    pg18: Cluster,
    tls_material: TLSMaterial,
    drv: Driver,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Without a handler, notices go to the ``pgproto.notice`` logger
    (WARNING as WARNING, NOTICE and INFO as INFO, LOG as DEBUG), the one
    during connect included, and nothing reaches stdout or stderr."""
    params = _params(pg18, "tls", tls_material, options=LOGIN_NOTICE_OPTIONS)
    capfd.readouterr()
    caplog.set_level(logging.DEBUG, logger="pgproto.notice")

    async def main() -> None:
        with anyio.fail_after(PATIENCE):
            conn = await drv.connect(params)
            try:
                await drv.query(conn, NOTICES_SQL)
            finally:
                await drv.close(conn)

    drv.run(main)
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("pgproto")]
    assert logged == [(logging.WARNING, f"WARNING:  {LOGIN_WARNING[1]}"), *LOGGED]
    assert {r.name for r in caplog.records if r.name.startswith("pgproto")} == {"pgproto.notice"}
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == ""


_UNCONFIGURED_SCRIPT: Final = """
import asyncio, sys
import anyio, trio
from pgproto_adapters import anyio as pa, asyncio as pasyncio, blocking, trio as ptrio
which = sys.argv[1]
params = dict(arg.split("=", 1) for arg in sys.argv[2:])
sql = "DO $$ BEGIN RAISE NOTICE 'n'; RAISE WARNING 'w'; END $$"
async def main(module):
    conn = await module.connect(**params)
    await conn.simple_query(sql)
    await conn.close()
if which == "blocking":
    with blocking.connect(**params) as conn:
        conn.simple_query(sql)
elif which == "asyncio":
    asyncio.run(main(pasyncio))
elif which == "trio":
    trio.run(main, ptrio)
else:
    anyio.run(main, pa, backend=which.split("-")[1])
print("done")
"""


@every_adapter
def test_default_notice_handler_is_silent_without_logging_config(
    pg18: Cluster, tls_material: TLSMaterial, drv: Driver
) -> None:
    """In a fresh interpreter that configures no logging (pytest's handlers
    are absent there), the default handler writes nothing to stderr --
    unlike libpq's default notice processor."""
    params = _params(pg18, "unix", tls_material)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "adapters")])
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_UNCONFIGURED_SCRIPT),
            drv.name,
            *(f"{k}={v}" for k, v in params.items()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=PATIENCE * 3,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n"
    assert result.stderr == ""


# --------------------------------------------------------------------------
# 4. ParameterStatus after startup

STARTUP_OPTIONS: Final = "-c TimeZone=UTC -c DateStyle=ISO,DMY"
TRACKED: Final = ("application_name", "TimeZone", "DateStyle")
#: (sql, fails, expected application_name / TimeZone / DateStyle, transaction status)
PARAMETER_STEPS: Final[list[tuple[str, bool, tuple[str, str, str], str]]] = [
    ("select 1", False, ("", "UTC", "ISO, DMY"), "I"),
    ("set application_name = 'first app'", False, ("first app", "UTC", "ISO, DMY"), "I"),
    # The server keeps application_name ASCII (PostgreSQL 16+: \x escapes).
    ("set application_name = 'app ü'", False, ("app \\xc3\\xbc", "UTC", "ISO, DMY"), "I"),
    ("set TimeZone = 'Europe/Paris'", False, ("app \\xc3\\xbc", "Europe/Paris", "ISO, DMY"), "I"),
    (
        "set DateStyle = 'German, DMY'",
        False,
        ("app \\xc3\\xbc", "Europe/Paris", "German, DMY"),
        "I",
    ),
    ("reset TimeZone", False, ("app \\xc3\\xbc", "UTC", "German, DMY"), "I"),
    ("reset application_name", False, ("", "UTC", "German, DMY"), "I"),
    # Within a transaction that is rolled back: the server reports the new
    # value at once, and the old one again after ROLLBACK.
    ("begin; set DateStyle = 'SQL, MDY'", False, ("", "UTC", "SQL, MDY"), "T"),
    ("set application_name = 'in tx'", False, ("in tx", "UTC", "SQL, MDY"), "T"),
    ("rollback", False, ("", "UTC", "German, DMY"), "I"),
    # ... also when the transaction failed first.
    ("begin; set TimeZone = 'Asia/Tokyo'", False, ("", "Asia/Tokyo", "German, DMY"), "T"),
    # The error aborts the transaction, and that reverts the setting already
    # (AbortTransaction, not the ROLLBACK command): the old value is reported.
    ("select 1/0", True, ("", "UTC", "German, DMY"), "E"),
    ("rollback", False, ("", "UTC", "German, DMY"), "I"),
    # SET LOCAL lasts until the end of its transaction.
    ("begin; set local TimeZone = 'Asia/Tokyo'; commit", False, ("", "UTC", "German, DMY"), "I"),
    # A savepoint rolled back undoes only what followed it.
    (
        "begin; set TimeZone = 'America/New_York'; savepoint s; "
        "set TimeZone = 'Asia/Tokyo'; rollback to savepoint s",
        False,
        ("", "America/New_York", "German, DMY"),
        "T",
    ),
    ("commit", False, ("", "America/New_York", "German, DMY"), "I"),
    ("reset all", False, ("", "UTC", "ISO, DMY"), "I"),
]
_LIBPQ_STATUS: Final = {
    psycopg.pq.TransactionStatus.IDLE: "I",
    psycopg.pq.TransactionStatus.INTRANS: "T",
    psycopg.pq.TransactionStatus.INERROR: "E",
}


def _oracle_run(oracle: Admin, sql: str, fails: bool) -> None:
    if fails:
        with pytest.raises(psycopg.Error):
            oracle.execute(sql)
    else:
        oracle.execute(sql)


@every_adapter
def test_parameter_status_after_startup(
    pg18: Cluster, tls_material: TLSMaterial, drv: Driver
) -> None:
    """``server_parameters`` follows the server's ParameterStatus messages
    after startup exactly as libpq's ``PQparameterStatus`` does (psycopg
    runs the same statements side by side), and ``transaction_status`` as
    ``PQtransactionStatus``."""
    params = _params(pg18, "unix", tls_material, options=STARTUP_OPTIONS)

    async def main() -> None:
        with anyio.fail_after(PATIENCE), psycopg.connect(**params, autocommit=True) as oracle:
            conn = await drv.connect(params)
            try:
                for sql, fails, expected, status in PARAMETER_STEPS:
                    if fails:
                        with pytest.raises(ServerError):
                            await drv.query(conn, sql)
                    else:
                        await drv.query(conn, sql)
                    _oracle_run(oracle, sql, fails)
                    mine = dict(conn.server_parameters)
                    assert tuple(mine[name] for name in TRACKED) == expected, sql
                    theirs = {name: oracle.info.parameter_status(name) for name in mine}
                    assert mine == theirs, sql
                    assert conn.transaction_status == status, sql
                    assert _LIBPQ_STATUS[oracle.info.transaction_status] == status, sql
                assert await _value(drv, conn, "show DateStyle") == "ISO, DMY"
            finally:
                await drv.close(conn)

    drv.run(main)


# --------------------------------------------------------------------------
# 5. close


async def _after_close(drv: Driver, conn: ConnectionBase) -> None:
    """Everything but close() raises ConnectionClosed; close() is quiet."""
    assert conn.closed
    with pytest.raises(ConnectionClosed):
        await drv.query(conn, "select 1")
    with pytest.raises(ConnectionClosed):
        await drv.collect(conn)
    with pytest.raises(ConnectionClosed):
        await drv.collect(conn, timeout=0.05)
    with pytest.raises(ConnectionClosed):
        await drv.cancel(conn)
    await drv.close(conn)
    await drv.close(conn)
    assert conn.closed


@every_adapter
@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_close_sends_terminate(
    pg18: Cluster, tls_material: TLSMaterial, drv: Driver, transport: str
) -> None:
    """A healthy connection's close() sends Terminate -- in clear, or inside
    TLS followed by close_notify -- and nothing else; the backend exits at
    once; close() again does nothing; operations after it raise
    ConnectionClosed; no descriptor is left open."""
    with admin_session(pg18) as admin, CaptureRelay(pg18.host, pg18.port) as relay:
        params = _relayed(pg18, relay, transport, tls_material)
        pids: list[int | None] = []
        before: list[bytes] = []

        async def main() -> None:
            with anyio.fail_after(PATIENCE):
                conn = await drv.connect(params)
                pids.append(conn.backend_pid)
                assert conn.ssl_in_use is (transport == "tls")
                if transport == "tls":
                    engine = conn.machine.tls
                    assert engine is not None
                    assert engine.version == "TLSv1.3"
                    assert engine.cipher in TLS13_SUITES
                assert await _value(drv, conn, "select 'answered'") == "answered"
                # Everything the client sent so far reached the relay (the
                # server answered it).
                before.append(relay.captures()[0].client_bytes)
                await drv.close(conn)
                await _after_close(drv, conn)

        with assert_no_fd_leak(ignore=relay.owned_fds):
            drv.run(main)
        assert relay.wait_closed(1)
        [capture] = relay.captures()
        assert capture.client_bytes.startswith(before[0])
        tail = capture.client_bytes[len(before[0]) :]
        if transport == "tcp":
            assert tail == TERMINATE
        else:
            # capture.py: TLS 1.3 hides the record types, the lengths tell --
            # Terminate alone is a 22-byte record, close_notify a 19-byte one.
            assert last_client_record_lengths(capture.client_bytes) == [22, 19]
            assert len(_client_records(capture.client_bytes)) - len(_client_records(before[0])) == 2
            assert len(tail) == (5 + 22) + (5 + 19)
        _wait_until(lambda: gone(admin, pids[0]), "the backend to exit")


@every_adapter
@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_close_sends_nothing_after_the_backend_was_terminated(
    pg18: Cluster, tls_material: TLSMaterial, drv: Driver, transport: str
) -> None:
    """The server terminated the backend and a query found the connection
    broken: it is closed, the client's last bytes are that query (no
    Terminate, no close_notify), and close() -- twice -- sends nothing more."""
    sql = "select 'after'"
    with admin_session(pg18) as admin, CaptureRelay(pg18.host, pg18.port) as relay:
        params = _relayed(pg18, relay, transport, tls_material)

        async def main() -> None:
            with anyio.fail_after(PATIENCE):
                conn = await drv.connect(params)
                pid = conn.backend_pid
                assert await _value(drv, conn, "select 'before'") == "before"
                _terminate(admin, pid)
                await _until(lambda: gone(admin, pid), "the backend to exit")
                with pytest.raises(ServerError) as info:
                    await drv.query(conn, sql)
                assert info.value.sqlstate == "57P01"
                assert conn.closed
                # The client closed its socket when the query failed.
                assert await anyio.to_thread.run_sync(relay.wait_closed, 1)
                sent = relay.captures()[0].client_bytes
                await drv.close(conn)
                await _after_close(drv, conn)
                assert relay.captures()[0].client_bytes == sent

        with assert_no_fd_leak(ignore=relay.owned_fds):
            drv.run(main)
        [capture] = relay.captures()
        if transport == "tcp":
            assert capture.client_bytes.endswith(_query_message(sql))
        else:
            last = len(_query_message(sql)) + TLS13_OVERHEAD
            assert last_client_record_lengths(capture.client_bytes, 1) == [last]


@every_adapter
def test_close_is_quiet_after_an_unnoticed_termination(
    pg18: Cluster, tls_material: TLSMaterial, drv: Driver
) -> None:
    """The backend was terminated while the connection sat idle, and nobody
    looked: close() (twice) does not raise."""
    params = _params(pg18, "tls", tls_material)

    async def main() -> None:
        with anyio.fail_after(PATIENCE), admin_session(pg18) as admin:
            conn = await drv.connect(params)
            pid = conn.backend_pid
            _terminate(admin, pid)
            await _until(lambda: gone(admin, pid), "the backend to exit")
            await drv.close(conn)
            await _after_close(drv, conn)

    with assert_no_fd_leak():
        drv.run(main)


@every_adapter
@pytest.mark.parametrize("transport", ["unix", "tls"])
def test_query_after_termination_reports_the_servers_fatal(
    pg18: Cluster, tls_material: TLSMaterial, drv: Driver, transport: str
) -> None:
    """A query on a connection whose backend was terminated raises the FATAL
    the server sent before hanging up (ServerError 57P01), as libpq does
    (psycopg: AdminShutdown), and the connection is closed."""
    params = _params(pg18, transport, tls_material)
    with admin_session(pg18) as admin, psycopg.connect(**params) as oracle:
        _terminate(admin, oracle.info.backend_pid)
        _wait_until(lambda: gone(admin, oracle.info.backend_pid), "the backend to exit")
        with pytest.raises(psycopg.errors.AdminShutdown):
            oracle.execute("select 1")

        async def main() -> None:
            with anyio.fail_after(PATIENCE):
                conn = await drv.connect(params)
                try:
                    pid = conn.backend_pid
                    _terminate(admin, pid)
                    await _until(lambda: gone(admin, pid), "the backend to exit")
                    with pytest.raises(ServerError) as info:
                        await drv.query(conn, "select 1")
                    assert info.value.sqlstate == "57P01"
                    assert "terminating connection due to administrator command" in str(info.value)
                    assert isinstance(info.value.__cause__, pgproto.TransportError)
                    assert conn.closed
                finally:
                    await drv.close(conn)

        drv.run(main)


@every_adapter
@pytest.mark.parametrize("waiting_in", ["notifies", "query"])
def test_close_wakes_a_waiter(
    pg18: Cluster, tls_material: TLSMaterial, drv: Driver, waiting_in: str
) -> None:
    """A task (for blocking: a thread) waiting in ``notifies()`` or in a
    running ``simple_query`` gets ConnectionClosed promptly when another
    closes the connection; no descriptor is left open."""
    params = _params(pg18, "tls", tls_material)
    pids: list[int | None] = []

    async def main() -> None:
        with anyio.fail_after(PATIENCE), admin_session(pg18) as admin:
            conn = await drv.connect(params)
            pid = conn.backend_pid
            pids.append(pid)
            woken: list[float] = []

            async def wait() -> None:
                if waiting_in == "notifies":
                    await drv.collect(conn)
                else:
                    await drv.query(conn, SLEEP_SQL)

            async def waiter() -> None:
                with pytest.raises(ConnectionClosed):
                    await wait()
                woken.append(time.monotonic())

            await drv.query(conn, "listen ch")
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                if waiting_in == "notifies":
                    await _until(lambda: drv.parked(conn), "notifies() to wait")
                else:
                    await _until(lambda: running(admin, pid), "pg_sleep to run")
                closed_at = time.monotonic()
                await drv.close(conn)
            [woken_at] = woken
            assert woken_at - closed_at < SLACK
            await _after_close(drv, conn)
            if waiting_in == "notifies":
                await _until(lambda: gone(admin, pid), "the backend to exit")

    try:
        with assert_no_fd_leak():
            drv.run(main)
    finally:
        if waiting_in == "query" and pids:
            with admin_session(pg18) as admin:  # it sleeps on: it has not read the Terminate
                _terminate(admin, pids[0])


@pytest.mark.parametrize("waiting_in", ["notifies", "query"])
def test_blocking_close_from_another_thread(
    pg18: Cluster, tls_material: TLSMaterial, waiting_in: str
) -> None:
    """Plain threads: the main thread waits in ``notifies()`` or in
    ``simple_query("select pg_sleep(30)")``; another thread calls close().
    The main thread raises ConnectionClosed promptly, finishes the close
    (Terminate on the wire: the connection was healthy), and no descriptor
    is left open.  (A watchdog terminates the backend if the main thread is
    not woken, so that a failure does not hang.)"""
    with admin_session(pg18) as admin, CaptureRelay(pg18.host, pg18.port) as relay:
        params = _relayed(pg18, relay, "tcp", tls_material)
        with assert_no_fd_leak(ignore=relay.owned_fds):
            conn = blocking.connect(**params)
            pid = conn.backend_pid
            conn.simple_query("listen ch")
            closed_at: list[float] = []
            raised = threading.Event()
            problems: list[BaseException] = []

            def ready() -> bool:
                if waiting_in == "notifies":
                    return conn._io.waiting == blocking.WAIT_READ  # private: parked in poll()
                return running(admin, pid)

            def closer() -> None:
                try:
                    _wait_until(ready, f"the main thread to wait in {waiting_in}")
                    closed_at.append(time.monotonic())
                    conn.close()
                    if not raised.wait(PATIENCE):
                        problems.append(AssertionError("close() did not wake the main thread"))
                except BaseException as exc:
                    problems.append(exc)
                if problems:
                    _terminate(admin, pid)  # the watchdog

            def wait() -> None:
                if waiting_in == "notifies":
                    for _ in conn.notifies():
                        pass
                else:
                    conn.simple_query(SLEEP_SQL)

            thread = threading.Thread(target=closer, name="closer")
            thread.start()
            try:
                with pytest.raises(ConnectionClosed):
                    wait()
                raised_at = time.monotonic()
                raised.set()
            finally:
                raised.set()
                thread.join(PATIENCE * 2)
            assert not thread.is_alive()
            assert problems == []
            assert raised_at - closed_at[0] < SLACK
            assert conn.closed
            with pytest.raises(ConnectionClosed):
                conn.simple_query("select 1")
            with pytest.raises(ConnectionClosed):
                next(conn.notifies())
            conn.close()
        if waiting_in == "query":
            _terminate(admin, pid)  # it sleeps on: it has not read the Terminate
        assert relay.wait_closed(1)
        assert relay.captures()[0].client_bytes.endswith(TERMINATE)
        _wait_until(lambda: gone(admin, pid), "the backend to exit")


# --------------------------------------------------------------------------
# 6. a FATAL at idle


async def _fatal_in_notifies(
    drv: Driver, conn: ConnectionBase, admin: Admin
) -> BaseException | None:
    """Terminate *conn*'s backend while a task waits in ``notifies()``; what
    that task raised (None if nothing)."""
    pid = conn.backend_pid
    await drv.query(conn, "listen ch")
    raised: list[BaseException | None] = []

    async def waiter() -> None:
        try:
            got = await drv.collect(conn)
        except pgproto.Error as exc:
            raised.append(exc)
        else:
            raise AssertionError(f"notifies() ended quietly after {got}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await _until(lambda: drv.parked(conn), "notifies() to wait")
        _terminate(admin, pid)
    await _until(lambda: gone(admin, pid), "the backend to exit")
    return raised[0] if raised else None


@every_adapter
@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_fatal_at_idle_closes_the_connection(
    pg18: Cluster, tls_material: TLSMaterial, drv: Driver, transport: str
) -> None:
    """``pg_terminate_backend`` while the connection waits in ``notifies()``:
    the iteration raises, the connection is closed, and nothing more is
    sent (no Terminate, no close_notify) -- not by the failure, not by
    close().  (Which error: the next test.)"""
    with admin_session(pg18) as admin, CaptureRelay(pg18.host, pg18.port) as relay:
        params = _relayed(pg18, relay, transport, tls_material)

        async def main() -> None:
            with anyio.fail_after(PATIENCE):
                conn = await drv.connect(params)
                error = await _fatal_in_notifies(drv, conn, admin)
                assert isinstance(error, pgproto.Error)
                assert conn.closed
                assert await anyio.to_thread.run_sync(relay.wait_closed, 1)
                sent = relay.captures()[0].client_bytes
                await _after_close(drv, conn)
                assert relay.captures()[0].client_bytes == sent

        with assert_no_fd_leak(ignore=relay.owned_fds):
            drv.run(main)
        [capture] = relay.captures()
        if transport == "tcp":
            assert b"C57P01\x00" in capture.server_bytes  # the FATAL did reach the client
            assert capture.client_bytes.endswith(_query_message("listen ch"))
        else:
            last = len(_query_message("listen ch")) + TLS13_OVERHEAD
            assert last_client_record_lengths(capture.client_bytes, 1) == [last]


@every_adapter
@pytest.mark.parametrize(
    ("server", "transport"),
    [("pg18", "unix"), ("pg18", "tcp"), ("pg18", "tls"), ("pg15", "unix")],
    ids=["pg18-unix", "pg18-tcp", "pg18-tls", "pg15-unix"],
)
def test_fatal_at_idle_raises_the_servers_error(
    request: pytest.FixtureRequest,
    tls_material: TLSMaterial,
    drv: Driver,
    server: str,
    transport: str,
) -> None:
    """The error ``notifies()`` raises is the server's FATAL: ServerError
    57P01 "terminating connection due to administrator command".

    In plaintext the FATAL and the end of the stream always come in two
    reads (recv() returns the data, then b""): the error must be kept from
    one read to the next.  Over TLS the FATAL record and the server's
    close_notify come in one read or two, from run to run."""
    cluster: Cluster = request.getfixturevalue(server)
    params = _params(cluster, transport, tls_material)

    async def main() -> None:
        with anyio.fail_after(PATIENCE), admin_session(cluster) as admin:
            conn = await drv.connect(params)
            try:
                error = await _fatal_in_notifies(drv, conn, admin)
            finally:
                await drv.close(conn)
            assert conn.closed
            assert isinstance(error, ServerError), repr(error)
            assert error.sqlstate == "57P01"
            assert "terminating connection due to administrator command" in str(error)

    drv.run(main)


# --------------------------------------------------------------------------
# PostgreSQL 15: one smoke test per adapter


@every_adapter
def test_pg15_smoke(pg15: Cluster, tls_material: TLSMaterial, drv: Driver) -> None:
    """On PostgreSQL 15 over TLS: a notice during connect and after,
    100 notifications in one transaction in order, ParameterStatus after
    startup, the backend's exit on close(), and a FATAL at idle ending
    ``notifies()`` and closing the connection."""
    params = _params(pg15, "tls", tls_material, options=LOGIN_NOTICE_OPTIONS)
    messages = _messages("one-transaction")

    async def main() -> None:
        with anyio.fail_after(PATIENCE), admin_session(pg15) as admin:
            received: list[NoticeResponse] = []
            conn = await drv.connect(params, notice_handler=received.append)
            pid = conn.backend_pid
            try:
                assert [_notice(n) for n in received] == [LOGIN_WARNING]
                await drv.query(conn, "DO $$ BEGIN RAISE NOTICE 'on 15'; END $$")
                assert [_notice(n) for n in received[1:]] == [("NOTICE", "on 15", "00000")]
                await drv.query(conn, "set application_name = 'smoke'; listen ch")
                assert conn.server_parameters["application_name"] == "smoke"
                sender: list[int] = []

                async def send() -> None:
                    await _until(lambda: drv.parked(conn), "notifies() to wait")
                    call = functools.partial(_send_psycopg, pg15, messages, one_transaction=True)
                    sender.append(await anyio.to_thread.run_sync(call))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(send)
                    got = await drv.collect(conn, stop_after=len(messages))
                assert _triples(got) == [(sender[0], ch, payload) for ch, payload in messages]
            finally:
                await drv.close(conn)
            await _after_close(drv, conn)
            await _until(lambda: gone(admin, pid), "the backend to exit")
            # A FATAL at idle ends notifies() and closes the connection.
            conn = await drv.connect(params)
            assert isinstance(await _fatal_in_notifies(drv, conn, admin), pgproto.Error)
            await _after_close(drv, conn)

    with assert_no_fd_leak():
        drv.run(main)
