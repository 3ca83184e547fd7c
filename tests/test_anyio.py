"""The anyio adapter against real servers, every scenario on both of
anyio's backends (asyncio and trio).

The tests are coroutines run by anyio's pytest plugin: the ``anyio_backend``
fixture below is parametrised to ``"asyncio"`` and ``"trio"``, so every test
id carries ``asyncio`` or ``trio``.  They use ``pgproto_adapters.anyio`` and
only anyio's primitives (task groups, cancel scopes, its clock).

What is checked (on ``pg15`` and ``pg18`` for the main scenarios, on
``pg18`` for the rest):

* connecting over a Unix socket, TCP, TLS (SCRAM-SHA-256-PLUS with
  ``channel_binding=require``) and direct TLS (``sslnegotiation=direct``,
  PostgreSQL 18; PostgreSQL 15 refuses it), and what the connection reports
  (host, hostaddr, port, ssl_in_use, backend_pid, server_parameters)
  against what the server says of the session; ``close()`` twice, the
  async context manager (on success and on error);
* ``ping`` (OK, NO_RESPONSE, NO_ATTEMPT) side by side with the blocking,
  asyncio and trio adapters and with libpq's PQping;
* ``reset()`` after the backend was terminated from another session, and a
  reset cancelled by a cancel scope;
* ``connect_timeout`` and ``timeout=`` against a server that never answers;
* ``cancel()`` of a running ``pg_sleep(30)`` from another task, over a Unix
  socket, TLS and direct TLS (a recording relay shows the CancelRequest
  travelled inside TLS);
* a ``simple_query`` cancelled by a cancel scope (``CancelScope.cancel()``
  and a ``move_on_after`` deadline) while the server runs it: the query is
  cancelled on the server and the connection stays usable (in a transaction:
  left failed, "E");
* a connect cancelled by a cancel scope at several steps leaves no file
  descriptor open;
* notices (the handler, the default logger), LISTEN/NOTIFY (also sharing
  the connection with queries, and cut short by a cancel scope), close()
  waking a waiting task, and ParameterStatus after startup.

"The other session" (watching pg_stat_activity, terminating a backend,
sending NOTIFY) is a psycopg connection in autocommit mode, so that every
query sees fresh statistics.  Its queries are short and run in the event
loop's thread; the NOTIFY senders run in a worker thread, to overlap with
the adapter's work.

No fixed sleeps: a test that waits for the server polls it (every 5 ms)
with a deadline of :data:`PATIENCE`, and the waits run under
``fail_after``, so that a hang fails instead of waiting for
``pg_sleep(30)``.  The only tight timing assertion is the issue's
"cancelled within 1 s of cancel()"; the other bounds are generous
(:data:`SLACK`) and only prove that something did not wait for its natural
end (a 30 s sleep, a 10 s grace).
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
import anyio.to_thread
import psycopg
import pytest
import trio
from capture import CaptureRelay, client_tls_start, contains_plaintext_cancel, first_packet_kind
from fdcheck import assert_no_fd_leak
from libpq_oracle import ping as libpq_ping
from pg_admin import SLEEP_SQL, Admin, activity, admin_session, gone, running, until
from pgproto_adapters import anyio as pa
from pgproto_adapters import asyncio as asyncio_adapter
from pgproto_adapters import blocking
from pgproto_adapters import trio as trio_adapter
from pgproto_adapters._cluster import Cluster
from servers import ROLES, SilentListener, TLSMaterial, connect_params, multi_host_conninfo

import pgproto
from pgproto import ConnectError, ConnectionClosed, ConnStatus, Ping, ServerError

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_pg_environment")]

#: How long a test waits for something that should happen soon.
PATIENCE: Final = 10.0
#: An upper bound for what must end long before its natural end.
SLACK: Final = 8.0
#: The issue's bound between cancel() and the query's error.
CANCEL_BOUND: Final = 1.0
SCRAM_PASSWORD: Final = ROLES["scram_user"].password or ""
ROOT: Final = Path(__file__).resolve().parent.parent
#: Wait for the server with :func:`pg_admin.until`, polling every 5 ms.
_until = functools.partial(until, patience=PATIENCE, period=0.005)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


# --------------------------------------------------------------------------
# helpers


def _params(server: Cluster, transport: str, tls: TLSMaterial, **extra: str) -> dict[str, Any]:
    """scram_user over *transport* (``direct``: TLS with sslnegotiation=direct);
    TLS insists on channel binding.  (Typed ``Any`` to be spread into
    ``connect()``'s keywords.)"""
    if transport == "direct":
        transport = "tls"
        extra.setdefault("sslnegotiation", "direct")
    if transport == "tls":
        extra.setdefault("channel_binding", "require")
    params: dict[str, Any] = connect_params(
        server, transport, tls, user="scram_user", password=SCRAM_PASSWORD, **extra
    )
    return params


async def _value(conn: pa.Connection, sql: str) -> str | None:
    [result] = await conn.simple_query(sql)
    [(value,)] = result.rows
    return value


def _conninfo(params: dict[str, str]) -> str:
    return " ".join(f"{key}='{value}'" for key, value in params.items())


# --------------------------------------------------------------------------
# connecting


@pytest.mark.parametrize("transport", ["unix", "tcp", "tls"])
async def test_connect(pg_server: Cluster, tls_material: TLSMaterial, transport: str) -> None:
    await _check_connect(pg_server, tls_material, transport)


async def test_connect_direct_tls(pg18: Cluster, tls_material: TLSMaterial) -> None:
    await _check_connect(pg18, tls_material, "direct")


async def _check_connect(server: Cluster, tls: TLSMaterial, transport: str) -> None:
    params = _params(server, transport, tls, application_name="pgproto-anyio")
    encrypted = transport in ("tls", "direct")
    with anyio.fail_after(PATIENCE), admin_session(server) as admin:
        conn = await pa.connect(**params)
        try:
            pid = conn.backend_pid
            assert pid is not None
            assert repr(conn).startswith("<pgproto_adapters.anyio.Connection OK ")
            assert conn.port == server.port
            if transport == "unix":
                assert conn.host == str(server.socket_dir)
                assert conn.hostaddr == f"{server.socket_dir}/.s.PGSQL.{server.port}"
            elif transport == "tcp":
                assert (conn.host, conn.hostaddr) == ("127.0.0.1", "127.0.0.1")
            else:
                assert conn.host == "localhost"
                assert conn.hostaddr in ("127.0.0.1", "::1")
            assert conn.ssl_in_use is encrypted
            assert conn.auth_method == ("SCRAM-SHA-256-PLUS" if encrypted else "SCRAM-SHA-256")
            assert conn.channel_binding_used is encrypted
            assert conn.transaction_status == "I"
            assert conn.machine.status is ConnStatus.OK
            parameters = conn.server_parameters
            assert parameters["application_name"] == "pgproto-anyio"
            assert parameters["session_authorization"] == "scram_user"
            assert parameters["server_version"].split(".")[0] == str(
                admin.info.server_version // 10000
            )
            assert parameters["client_encoding"] == "UTF8"

            # What the server says of this session.
            [result] = await conn.simple_query(
                "select pg_backend_pid(), current_user, current_setting('application_name'),"
                " coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false),"
                " current_setting('server_version')"
            )
            assert result.columns == (
                "pg_backend_pid",
                "current_user",
                "current_setting",
                "coalesce",
                "current_setting",
            )
            assert result.rows == [
                (
                    str(pid),
                    "scram_user",
                    "pgproto-anyio",
                    "t" if encrypted else "f",
                    parameters["server_version"],
                )
            ]
            assert result.tag == "SELECT 1"
            assert activity(admin, pid) is not None
        finally:
            await conn.close()
        assert conn.closed
        await conn.close()  # idempotent
        assert conn.closed
        with pytest.raises(ConnectionClosed):
            await conn.simple_query("select 1")
        with pytest.raises(ConnectionClosed):
            await conn.cancel()
        # Terminate reached the server: the backend goes away.
        await _until(lambda: gone(admin, pid), "the backend to exit")

        # The async context manager closes, on success and on error.
        async with await pa.connect(**params) as conn2:
            pid2 = conn2.backend_pid
            assert await _value(conn2, "select 2") == "2"
        assert conn2.closed
        opened: list[pa.Connection] = []

        async def fail_inside() -> None:
            async with await pa.connect(**params) as conn3:
                opened.append(conn3)
                raise ZeroDivisionError

        with pytest.raises(ZeroDivisionError):
            await fail_inside()
        [conn3] = opened
        pid3 = conn3.backend_pid
        assert conn3.closed
        await _until(
            lambda: gone(admin, pid2) and gone(admin, pid3),
            "the backends to exit",
        )


async def test_direct_tls_is_refused_by_pg15(pg15: Cluster, tls_material: TLSMaterial) -> None:
    """PostgreSQL 15 does not speak direct TLS: the attempt fails (not a hang)."""
    params = _params(pg15, "direct", tls_material, connect_timeout="5")
    with anyio.fail_after(PATIENCE), assert_no_fd_leak(), pytest.raises(ConnectError):
        await pa.connect(**params)


# --------------------------------------------------------------------------
# ping


def _other_pings(conninfo: str) -> tuple[Ping, Ping, Ping, Ping]:
    """The blocking, asyncio and trio adapters' and libpq's ping (in a thread)."""
    return (
        blocking.ping(conninfo),
        asyncio.run(asyncio_adapter.ping(conninfo)),
        trio.run(trio_adapter.ping, conninfo),
        Ping(libpq_ping(conninfo)),
    )


async def test_ping(
    pg_server: Cluster, tls_material: TLSMaterial, closed_port: int, tmp_path: Path
) -> None:
    nopass = str(tmp_path / "no-such-pgpass")
    cases = {
        "up, trust": (
            _conninfo(connect_params(pg_server, "tcp", tls_material, user="trust_user")),
            Ping.OK,
        ),
        "up, TLS, SCRAM without a password": (
            _conninfo(
                connect_params(pg_server, "tls", tls_material, user="scram_user", passfile=nopass)
            ),
            Ping.OK,
        ),
        "up, unix": (_conninfo(_params(pg_server, "unix", tls_material)), Ping.OK),
        "refused": (
            multi_host_conninfo(("127.0.0.1", closed_port), passfile=nopass),
            Ping.NO_RESPONSE,
        ),
        "invalid option": (f"host=127.0.0.1 port={pg_server.port} sslmode=bogus", Ping.NO_ATTEMPT),
        "unknown keyword": (f"host=127.0.0.1 port={pg_server.port} no_such=1", Ping.NO_ATTEMPT),
    }
    ours: dict[str, Ping] = {}
    others: dict[str, tuple[Ping, Ping, Ping, Ping]] = {}
    with anyio.fail_after(PATIENCE * 2):
        for name, (conninfo, _) in cases.items():
            with assert_no_fd_leak():
                ours[name] = await pa.ping(conninfo)
            others[name] = await anyio.to_thread.run_sync(_other_pings, conninfo)
    expected = {name: outcome for name, (_, outcome) in cases.items()}
    assert ours == expected
    assert others == {name: (outcome,) * 4 for name, outcome in expected.items()}
    # Keywords and timeout= go through as for connect().
    assert await pa.ping(**_params(pg_server, "unix", tls_material), timeout=5) is Ping.OK
    assert await pa.ping(host="127.0.0.1", port=closed_port) is Ping.NO_RESPONSE
    assert await pa.ping(host="127.0.0.1", sslmode="bogus") is Ping.NO_ATTEMPT


# --------------------------------------------------------------------------
# reset


@pytest.mark.parametrize("transport", ["unix", "tls"])
@pytest.mark.parametrize("observed", [False, True], ids=["unnoticed", "after-failure"])
async def test_reset_after_terminate(
    pg_server: Cluster, tls_material: TLSMaterial, transport: str, observed: bool
) -> None:
    """The backend is terminated by another session; reset() connects anew,
    whether or not the connection noticed (a failed query) first."""
    params = _params(pg_server, transport, tls_material, application_name="before")
    with anyio.fail_after(PATIENCE), admin_session(pg_server) as admin:
        conn = await pa.connect(**params)
        try:
            old = conn.backend_pid
            await conn.simple_query("set application_name = 'changed'")
            assert conn.server_parameters["application_name"] == "changed"
            [(terminated,)] = admin.execute("select pg_terminate_backend(%s)", (old,)).fetchall()
            assert terminated is True
            await _until(lambda: gone(admin, old), "the backend to exit")
            if observed:
                # (Which error: see test_query_on_a_terminated_backend.)
                with pytest.raises((ServerError, pgproto.TransportError)):
                    await conn.simple_query("select 1")
                assert conn.closed
            await conn.reset()
            assert not conn.closed
            assert conn.backend_pid not in (None, old)
            assert conn.ssl_in_use is (transport == "tls")
            assert conn.server_parameters["application_name"] == "before"
            assert conn.transaction_status == "I"
            assert await _value(conn, "select pg_backend_pid()") == str(conn.backend_pid)
            assert activity(admin, conn.backend_pid) == ("idle", "select pg_backend_pid()")
        finally:
            await conn.close()


@pytest.mark.parametrize("transport", ["unix", "tls"])
async def test_query_on_a_terminated_backend(
    pg18: Cluster, tls_material: TLSMaterial, transport: str
) -> None:
    """A backend terminated while idle sends FATAL 57P01 ("terminating
    connection due to administrator command") and hangs up; the next query
    reports that error -- as libpq does (psycopg: AdminShutdown), and as
    the adapter's ``notifies()`` does for a connection that breaks while it
    waits."""
    params = _params(pg18, transport, tls_material)
    with anyio.fail_after(PATIENCE), admin_session(pg18) as admin:
        # libpq, for the record.
        libpq = psycopg.connect(**params)
        with libpq:
            admin.execute("select pg_terminate_backend(%s)", (libpq.info.backend_pid,))
            await _until(lambda: gone(admin, libpq.info.backend_pid), "exit")
            with pytest.raises(psycopg.errors.AdminShutdown):
                libpq.execute("select 1")

        conn = await pa.connect(**params)
        try:
            pid = conn.backend_pid
            admin.execute("select pg_terminate_backend(%s)", (pid,))
            await _until(lambda: gone(admin, pid), "the backend to exit")
            with pytest.raises(ServerError) as caught:
                await conn.simple_query("select 1")
            assert caught.value.sqlstate == "57P01"
            assert conn.closed
        finally:
            await conn.close()


async def test_reset_cancelled_by_scope(pg18: Cluster, tls_material: TLSMaterial) -> None:
    """A reset() cancelled (at the SCRAM exchange, via the connection's
    trace) leaves the connection closed and no descriptor open; another
    reset() then connects."""
    params = _params(pg18, "tls", tls_material)
    scopes: list[anyio.CancelScope] = []

    def trace(event: pgproto.Event) -> None:
        if scopes and isinstance(event, pgproto.AuthenticationRequested):
            scopes.pop().cancel()

    with anyio.fail_after(PATIENCE):
        conn = await pa.connect(**params, trace=trace)
        try:
            old = conn.backend_pid
            with assert_no_fd_leak():
                with anyio.CancelScope() as scope:
                    scopes.append(scope)
                    await conn.reset()
                assert scope.cancelled_caught
                assert conn.closed
                with pytest.raises(ConnectionClosed):
                    await conn.simple_query("select 1")
                await conn.reset()
                assert conn.machine.status is ConnStatus.OK
                assert conn.backend_pid not in (None, old)
                assert await _value(conn, "select 1") == "1"
                await conn.close()
        finally:
            await conn.close()


# --------------------------------------------------------------------------
# deadlines


async def test_connect_timeout_on_a_silent_server(silent_listener: SilentListener) -> None:
    """``connect_timeout=1`` against a server that accepts and never answers."""
    conninfo = multi_host_conninfo(
        (silent_listener.host, silent_listener.port), connect_timeout=1, sslmode="disable"
    )
    with anyio.fail_after(PATIENCE), assert_no_fd_leak(ignore=silent_listener.owned_fds):
        accepted = silent_listener.accepted
        start = time.monotonic()
        with pytest.raises(ConnectError) as caught:
            await pa.connect(conninfo)
        elapsed = time.monotonic() - start
    assert silent_listener.accepted > accepted  # it reached the server
    assert "timeout expired" in str(caught.value)
    assert [(a.step, str(a.error)) for a in caught.value.attempts] == [
        ("authentication", "timeout expired")
    ]
    # libpq treats a connect_timeout of 1 as 2 (its minimum).
    assert 2.0 <= elapsed < SLACK


@pytest.mark.parametrize("connect_timeout", ["0", "10"])
async def test_overall_timeout(
    silent_listener: SilentListener, pg18: Cluster, connect_timeout: str
) -> None:
    """``timeout=`` ends the attempt, before a later ``connect_timeout``, and
    tries no other host; after a successful connect it no longer applies."""
    conninfo = multi_host_conninfo(
        (silent_listener.host, silent_listener.port),
        (pg18.host, pg18.port),
        connect_timeout=connect_timeout,
    )
    with anyio.fail_after(PATIENCE), assert_no_fd_leak(ignore=silent_listener.owned_fds):
        start = time.monotonic()
        with pytest.raises(ConnectError) as caught:
            await pa.connect(conninfo, timeout=0.5)
        elapsed = time.monotonic() - start
    assert [str(a.error) for a in caught.value.attempts] == ["timeout expired (overall deadline)"]
    assert 0.5 <= elapsed < SLACK
    with anyio.fail_after(PATIENCE):
        conn = await pa.connect(pg18.dsn(), timeout=0.5)
        async with conn:
            # Runs past the connect's deadline: no longer in force.
            assert await _value(conn, "select pg_sleep(0.7)::text") == ""


# --------------------------------------------------------------------------
# cancel()


@pytest.mark.parametrize("transport", ["unix", "tls"])
async def test_cancel(pg_server: Cluster, tls_material: TLSMaterial, transport: str) -> None:
    await _check_cancel(pg_server, tls_material, transport)


async def test_cancel_direct_tls(pg18: Cluster, tls_material: TLSMaterial) -> None:
    await _check_cancel(pg18, tls_material, "direct")


async def _check_cancel(server: Cluster, tls: TLSMaterial, transport: str) -> None:
    """``pg_sleep(30)`` in one task, ``cancel()`` from another once the server
    shows the query running: 57014 within a second, the connection usable.
    Over TCP the connection goes through a recording relay, which shows the
    CancelRequest (the relay's second connection) inside TLS."""
    with contextlib.ExitStack() as stack:
        relay: CaptureRelay | None = None
        extra: dict[str, str] = {}
        if transport != "unix":
            relay = stack.enter_context(CaptureRelay("127.0.0.1", server.port))
            extra = {"hostaddr": "127.0.0.1", "port": str(relay.port)}
            if transport == "tls":
                extra["sslnegotiation"] = "postgres"
        params = _params(server, transport, tls, **extra)
        admin = stack.enter_context(admin_session(server))
        with anyio.fail_after(PATIENCE):
            conn = await pa.connect(**params)
        async with conn:
            pid = conn.backend_pid
            caught: list[tuple[BaseException, float]] = []

            async def sleeper() -> None:
                try:
                    await conn.simple_query(SLEEP_SQL)
                except ServerError as exc:
                    caught.append((exc, time.monotonic()))

            with anyio.fail_after(PATIENCE):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(sleeper)
                    await _until(lambda: running(admin, pid), "pg_sleep to run")
                    start = time.monotonic()
                    await conn.cancel()
            [(error, when)] = caught
            assert isinstance(error, ServerError)
            assert error.sqlstate == "57014"
            assert when - start < CANCEL_BOUND
            assert not conn.closed
            assert conn.transaction_status == "I"
            assert await _value(conn, "select 1") == "1"
            assert conn.backend_pid == pid
            # Nothing running now: cancel() is harmless and returns.
            with anyio.fail_after(PATIENCE):
                await conn.cancel(timeout=5)
            assert await _value(conn, "select 2") == "2"
        if relay is not None:
            assert relay.wait_for(lambda caps: len(caps) >= 3 and caps[1].closed, PATIENCE)
            main, cancel = relay.captures()[:2]
            start_at = 0 if transport == "direct" else 8
            assert client_tls_start(main.client_bytes) == start_at
            assert client_tls_start(cancel.client_bytes) == start_at
            assert first_packet_kind(cancel.client_bytes) == (
                "direct_tls" if transport == "direct" else "ssl_request"
            )
            assert not contains_plaintext_cancel(cancel.client_bytes)


# --------------------------------------------------------------------------
# a query cancelled by a cancel scope


async def _scope_cancel(
    conn: pa.Connection, admin: Admin, trigger: str
) -> tuple[anyio.CancelScope, float]:
    """Run ``pg_sleep(30)`` under ``move_on_after`` in a task; once the server
    shows it running, end the scope (``cancel()`` or its deadline).  The
    scope, and how long the cancelled call took to return after that."""
    pid = conn.backend_pid
    returned: list[float] = []

    async def victim(
        *, task_status: anyio.abc.TaskStatus[anyio.CancelScope] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.move_on_after(600) as scope:
            task_status.started(scope)
            await conn.simple_query(SLEEP_SQL)
        returned.append(time.monotonic())

    with anyio.fail_after(PATIENCE * 2):
        async with anyio.create_task_group() as tg:
            scope = await tg.start(victim)
            await _until(lambda: running(admin, pid), "pg_sleep to run")
            start = time.monotonic()
            if trigger == "cancel":
                scope.cancel()
            else:
                scope.deadline = anyio.current_time()
    [end] = returned
    return scope, end - start


@pytest.mark.parametrize("trigger", ["cancel", "deadline"])
@pytest.mark.parametrize("transport", ["unix", "tls"])
async def test_query_cancelled_by_scope(
    pg_server: Cluster, tls_material: TLSMaterial, transport: str, trigger: str
) -> None:
    params = _params(pg_server, transport, tls_material)
    with admin_session(pg_server) as admin:
        with anyio.fail_after(PATIENCE):
            conn = await pa.connect(**params)
        async with conn:
            pid = conn.backend_pid
            scope, elapsed = await _scope_cancel(conn, admin, trigger)
            assert scope.cancelled_caught
            assert elapsed < SLACK  # cancelled on the server, not waited out (30 s)
            assert not conn.closed
            assert conn.transaction_status == "I"
            # The server ran it to its cancellation: nothing active for that pid.
            assert activity(admin, pid) == ("idle", SLEEP_SQL)
            with anyio.fail_after(PATIENCE):
                assert await _value(conn, "select 1") == "1"
            assert conn.backend_pid == pid
            # And again, on the same connection.
            scope, _ = await _scope_cancel(conn, admin, trigger)
            assert scope.cancelled_caught
            assert not conn.closed
            assert await _value(conn, "select 2") == "2"


async def test_query_cancelled_by_scope_in_a_transaction(
    pg18: Cluster, tls_material: TLSMaterial
) -> None:
    params = _params(pg18, "tls", tls_material)
    with admin_session(pg18) as admin:
        with anyio.fail_after(PATIENCE):
            conn = await pa.connect(**params)
        async with conn:
            pid = conn.backend_pid
            await conn.simple_query("begin")
            assert conn.transaction_status == "T"
            scope, elapsed = await _scope_cancel(conn, admin, "cancel")
            assert scope.cancelled_caught
            assert elapsed < SLACK
            assert not conn.closed
            assert conn.transaction_status == "E"
            assert activity(admin, pid) == ("idle in transaction (aborted)", SLEEP_SQL)
            with anyio.fail_after(PATIENCE):
                with pytest.raises(ServerError) as caught:
                    await conn.simple_query("select 1")
                assert caught.value.sqlstate == "25P02"  # in_failed_sql_transaction
                [result] = await conn.simple_query("rollback")
                assert result.tag == "ROLLBACK"
                assert conn.transaction_status == "I"
                assert await _value(conn, "select 1") == "1"


# --------------------------------------------------------------------------
# a connect cancelled at several steps


def _is_status(status: ConnStatus) -> Callable[[pgproto.Event], bool]:
    def check(event: pgproto.Event) -> bool:
        return isinstance(event, pgproto.StatusChanged) and event.status is status

    return check


_CONNECT_STEPS: Final[dict[str, Callable[[pgproto.Event], bool]]] = {
    "OpenConnection": lambda event: isinstance(event, pgproto.OpenConnection),
    "SSL_STARTUP": _is_status(ConnStatus.SSL_STARTUP),
    "AuthenticationRequested": lambda event: isinstance(event, pgproto.AuthenticationRequested),
    "AUTH_OK": _is_status(ConnStatus.AUTH_OK),
}


@pytest.mark.parametrize("connect_timeout", ["10", "0"], ids=["connect_timeout", "no-timeout"])
@pytest.mark.parametrize(
    ("transport", "step"),
    [("tls", step) for step in _CONNECT_STEPS]
    + [("unix", step) for step in _CONNECT_STEPS if step != "SSL_STARTUP"],
)
async def test_connect_cancelled_at_a_step(
    pg18: Cluster, tls_material: TLSMaterial, transport: str, step: str, connect_timeout: str
) -> None:
    """The trace callback cancels the enclosing scope when *step* is seen
    (SCRAM; over TLS after an SSLRequest, or a Unix socket, which has no
    SSL_STARTUP), with and without ``connect_timeout`` (the adapter's own
    deadline scope, or none).

    Up to AuthenticationRequested, the connect has to read again, so the
    cancellation interrupts it: it raises, and the descriptors are counted
    right after it returned, with no checkpoint in between: the adapter
    closes its socket itself (after ``anyio.notify_closing``), on either
    backend.

    AUTH_OK is different: the server sends AuthenticationOk together with
    the rest of the startup (ParameterStatus, BackendKeyData, ReadyForQuery:
    PostgreSQL does not flush after AuthenticationOk), so the machine reads
    nothing more and the connect returns a connection without reaching
    another checkpoint -- as anyio's (and trio's) cooperative cancellation
    allows.  The caller owns it then; used the usual way (``async with``),
    the cancellation lands at its first checkpoint and ``__aexit__`` closes
    it, which leaves no descriptor either."""
    extra = {"sslnegotiation": "postgres"} if transport == "tls" else {}
    params = _params(pg18, transport, tls_material, connect_timeout=connect_timeout, **extra)
    matches = _CONNECT_STEPS[step]
    seen: list[pgproto.Event] = []
    returned: list[pa.Connection] = []
    with anyio.fail_after(PATIENCE):
        with assert_no_fd_leak():
            with anyio.CancelScope() as scope:

                def trace(event: pgproto.Event) -> None:
                    seen.append(event)
                    if matches(event):
                        scope.cancel()

                conn = await pa.connect(**params, trace=trace)
                returned.append(conn)
                async with conn:
                    await anyio.lowlevel.checkpoint()
                    pytest.fail("the pending cancellation was not delivered")
        assert scope.cancelled_caught
        assert [event for event in seen if matches(event)] != []
        connected = any(isinstance(event, pgproto.Connected) for event in seen)
        if step == "AUTH_OK":
            assert connected
            [conn] = returned
            assert conn.closed
        else:
            assert not connected
            assert returned == []


# --------------------------------------------------------------------------
# notices


_NOTICES_SQL: Final = "DO $$ BEGIN RAISE NOTICE 'hello %', 1; RAISE WARNING 'w'; END $$"


@pytest.mark.parametrize("transport", ["unix", "tls"])
async def test_notice_handler(
    pg_server: Cluster, tls_material: TLSMaterial, transport: str
) -> None:
    received: list[tuple[str, str]] = []

    def handler(notice: pgproto.NoticeResponse) -> None:
        received.append((notice.severity, notice.message))

    with anyio.fail_after(PATIENCE):
        async with await pa.connect(
            **_params(pg_server, transport, tls_material), notice_handler=handler
        ) as conn:
            assert conn.notice_handler is handler
            [result] = await conn.simple_query(_NOTICES_SQL)
            assert result.tag == "DO"
            assert received == [("NOTICE", "hello 1"), ("WARNING", "w")]
            # Settable; a handler that raises is logged, not raised.
            late: list[str] = []
            conn.notice_handler = lambda notice: late.append(notice.message)
            await conn.simple_query(_NOTICES_SQL)
            assert late == ["hello 1", "w"]
            assert len(received) == 2

            def broken(notice: pgproto.NoticeResponse) -> None:
                raise RuntimeError("handler failed")

            conn.notice_handler = broken
            assert await _value(conn, "select 1") == "1"
            await conn.simple_query(_NOTICES_SQL)
            assert await _value(conn, "select 2") == "2"


async def test_notice_handler_errors_are_logged(
    pg18: Cluster, tls_material: TLSMaterial, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(notice: pgproto.NoticeResponse) -> None:
        raise RuntimeError(f"handler failed on {notice.message}")

    with anyio.fail_after(PATIENCE):
        async with await pa.connect(
            **_params(pg18, "unix", tls_material), notice_handler=broken
        ) as conn:
            with caplog.at_level(logging.ERROR, logger="pgproto"):
                await conn.simple_query(_NOTICES_SQL)
            assert await _value(conn, "select 1") == "1"
    failures = [r for r in caplog.records if r.name == "pgproto"]
    assert len(failures) == 2
    assert [str(r.exc_info[1]) for r in failures if r.exc_info] == [
        "handler failed on hello 1",
        "handler failed on w",
    ]


async def test_default_notice_handler_logs(
    pg18: Cluster,
    tls_material: TLSMaterial,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG, logger="pgproto.notice")
    with anyio.fail_after(PATIENCE):
        async with await pa.connect(**_params(pg18, "tls", tls_material)) as conn:
            capfd.readouterr()
            await conn.simple_query(_NOTICES_SQL)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("pgproto.notice", logging.INFO, "NOTICE:  hello 1"),
        ("pgproto.notice", logging.WARNING, "WARNING:  w"),
    ]
    captured = capfd.readouterr()
    assert captured.err == ""
    assert captured.out == ""


_UNCONFIGURED_SCRIPT: Final = """
import sys, anyio
from pgproto_adapters import anyio as pa
params = dict(arg.split("=", 1) for arg in sys.argv[2:])
async def main():
    async with await pa.connect(**params) as conn:
        await conn.simple_query({sql!r})
anyio.run(main, backend=sys.argv[1])
print("done")
"""


async def test_default_notice_handler_is_silent_without_logging_config(
    pg18: Cluster, tls_material: TLSMaterial, anyio_backend: str
) -> None:
    """In a fresh interpreter that configures no logging (pytest's own
    logging handlers are absent there), the default handler writes nothing
    to stderr: libpq's default notice processor prints to stderr, pgproto's
    must not."""
    params = _params(pg18, "unix", tls_material)
    script = _UNCONFIGURED_SCRIPT.format(sql=_NOTICES_SQL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "adapters")])
    with anyio.fail_after(PATIENCE * 3):
        result = await anyio.run_process(
            [
                sys.executable,
                "-c",
                textwrap.dedent(script),
                anyio_backend,
                *(f"{k}={v}" for k, v in params.items()),
            ],
            env=env,
            check=False,
            stderr=subprocess.PIPE,
        )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "done\n"
    assert result.stderr.decode() == ""


# --------------------------------------------------------------------------
# notifications


def _notify(server: Cluster, count: int, *, one_transaction: bool) -> int:
    """Send *count* notifications on ``ch`` (payloads 0, 1, ...) from a new
    session; its backend pid."""
    with admin_session(server) as other:
        pid = other.info.backend_pid
        block: contextlib.AbstractContextManager[Any] = (
            other.transaction() if one_transaction else contextlib.nullcontext()
        )
        with block:
            for i in range(count):
                other.execute("select pg_notify('ch', %s)", (str(i),))
    return pid


@pytest.mark.parametrize("one_transaction", [True, False], ids=["one-transaction", "separate"])
async def test_notifications(
    pg_server: Cluster, tls_material: TLSMaterial, one_transaction: bool
) -> None:
    """100 notifications sent (by a worker thread) while the task waits in
    ``notifies()``: all arrive, in order."""
    with anyio.fail_after(PATIENCE):
        async with await pa.connect(**_params(pg_server, "tls", tls_material)) as conn:
            await conn.simple_query("listen ch")
            got: list[pgproto.NotificationResponse] = []
            sender: list[int] = []

            async def send() -> None:
                sender.append(
                    await anyio.to_thread.run_sync(
                        lambda: _notify(pg_server, 100, one_transaction=one_transaction)
                    )
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                async for notification in conn.notifies(stop_after=100):
                    got.append(notification)
            assert [n.payload for n in got] == [str(i) for i in range(100)]
            assert {(n.channel, n.pid) for n in got} == {("ch", sender[0])}
            # Nothing more: a timeout ends the iteration quietly.
            assert [n async for n in conn.notifies(timeout=0.05)] == []
            assert await _value(conn, "select 1") == "1"


async def test_notifications_share_the_connection_with_queries(
    pg18: Cluster, tls_material: TLSMaterial
) -> None:
    """One task iterates ``notifies()``, another runs queries on the same
    connection meanwhile -- some of which notify the connection itself, so
    that those notifications arrive during a query and must be kept for the
    iterator -- while a worker thread sends notifications from another
    session."""
    others, own = 100, 20
    with anyio.fail_after(PATIENCE):
        async with await pa.connect(**_params(pg18, "unix", tls_material)) as conn:
            await conn.simple_query("listen ch")
            got: list[pgproto.NotificationResponse] = []
            answers: list[str | None] = []
            sender: list[int] = []

            async def listener() -> None:
                async for notification in conn.notifies(stop_after=others + own):
                    got.append(notification)

            async def queries() -> None:
                await _until(lambda: len(got) >= 1, "the first notification")
                for i in range(own):
                    [result] = await conn.simple_query(
                        f"select {i}, pg_notify('ch', 'self-{i}')::text"
                    )
                    answers.append(result.rows[0][0])

            async def send() -> None:
                sender.append(
                    await anyio.to_thread.run_sync(
                        lambda: _notify(pg18, others, one_transaction=False)
                    )
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(listener)
                tg.start_soon(queries)
                tg.start_soon(send)
            assert answers == [str(i) for i in range(own)]
            foreign = [n for n in got if n.pid == sender[0]]
            mine = [n for n in got if n.pid == conn.backend_pid]
            assert [n.payload for n in foreign] == [str(i) for i in range(others)]
            assert [n.payload for n in mine] == [f"self-{i}" for i in range(own)]
            assert len(got) == others + own


async def test_notifies_cancelled_by_scope(pg18: Cluster, tls_material: TLSMaterial) -> None:
    """A ``notifies()`` iteration cut short by a cancel scope while it waits
    leaves the connection usable; what arrives later is not lost."""
    with anyio.fail_after(PATIENCE):
        async with await pa.connect(**_params(pg18, "unix", tls_material)) as conn:
            await conn.simple_query("listen ch")
            with anyio.CancelScope() as scope:

                async def stop_when_waiting() -> None:
                    await _until(lambda: conn._io.idle is not None, "the iterator to wait")
                    scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(stop_when_waiting)
                    async for notification in conn.notifies():
                        pytest.fail(f"unexpected {notification}")
            assert scope.cancelled_caught
            assert not conn.closed
            assert await _value(conn, "select 1") == "1"
            await anyio.to_thread.run_sync(lambda: _notify(pg18, 3, one_transaction=True))
            got = [n.payload async for n in conn.notifies(stop_after=3)]
            assert got == ["0", "1", "2"]


async def test_close_wakes_a_notifies_waiter(pg18: Cluster, tls_material: TLSMaterial) -> None:
    """A task waiting in ``notifies()`` (parked in its idle read) gets
    ConnectionClosed when another task closes the connection."""
    with anyio.fail_after(PATIENCE), admin_session(pg18) as admin:
        conn = await pa.connect(**_params(pg18, "tls", tls_material))
        pid = conn.backend_pid
        await conn.simple_query("listen ch")
        outcome: list[BaseException] = []
        got: list[str] = []

        async def waiter() -> None:
            try:
                async for notification in conn.notifies():
                    got.append(notification.payload)
            except ConnectionClosed as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.to_thread.run_sync(lambda: _notify(pg18, 1, one_transaction=False))
            await _until(lambda: got == ["0"], "the notification")
            # The waiter went straight back to its idle read (a private
            # attribute: the transport's cancel scope for that read).
            await _until(lambda: conn._io.idle is not None, "the waiter to wait")
            await conn.close()
        assert len(outcome) == 1
        assert isinstance(outcome[0], ConnectionClosed)
        assert conn.closed
        await _until(lambda: gone(admin, pid), "the backend to exit")


async def test_close_wakes_a_running_query(pg18: Cluster, tls_material: TLSMaterial) -> None:
    """A task waiting for a query's result gets ConnectionClosed when another
    task closes the connection."""
    with anyio.fail_after(PATIENCE), admin_session(pg18) as admin:
        conn = await pa.connect(**_params(pg18, "unix", tls_material))
        pid = conn.backend_pid
        outcome: list[BaseException] = []

        async def sleeper() -> None:
            try:
                await conn.simple_query(SLEEP_SQL)
            except ConnectionClosed as exc:
                outcome.append(exc)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sleeper)
                await _until(lambda: running(admin, pid), "pg_sleep to run")
                await conn.close()
            assert len(outcome) == 1
            assert conn.closed
        finally:
            # The backend sleeps on regardless (it has not read the Terminate).
            admin.execute("select pg_terminate_backend(%s)", (pid,))


# --------------------------------------------------------------------------
# ParameterStatus after startup


@pytest.mark.parametrize("transport", ["unix", "tls"])
async def test_parameter_status_after_startup(
    pg_server: Cluster, tls_material: TLSMaterial, transport: str
) -> None:
    with anyio.fail_after(PATIENCE):
        async with await pa.connect(
            **_params(pg_server, transport, tls_material, options="-c TimeZone=UTC")
        ) as conn:
            assert conn.server_parameters["TimeZone"] == "UTC"
            await conn.simple_query("set application_name = 'renamed'")
            assert conn.server_parameters["application_name"] == "renamed"
            await conn.simple_query("SET TimeZone = 'Europe/Paris'")
            assert conn.server_parameters["TimeZone"] == "Europe/Paris"
            # A SET undone by ROLLBACK is reported again.
            await conn.simple_query("begin; set TimeZone = 'Asia/Tokyo'")
            assert conn.server_parameters["TimeZone"] == "Asia/Tokyo"
            await conn.simple_query("rollback")
            assert conn.server_parameters["TimeZone"] == "Europe/Paris"
            assert await _value(conn, "show TimeZone") == "Europe/Paris"
