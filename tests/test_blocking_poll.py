"""libpq's non-blocking connection API in the blocking adapter, against real servers.

``blocking.connect_start`` + ``Connection.connect_poll`` (``PQconnectStart`` /
``PQconnectPoll``) and ``reset`` / ``reset_start`` + ``reset_poll``
(``PQreset*``), driven the way an application with its own event loop drives
them: a ``selectors`` loop, asyncio's ``add_reader``/``add_writer`` (no
threads), and the ``select.select`` loop from README.rst, executed as written.

Covered: OK then a working query; FAILED with a ``ConnectError`` listing the
attempts (wrong password, refused port); the socket behind ``fileno()``
changing when the next host is tried; the ``CONNECTION_*`` steps against
those libpq reports through psycopg's ``pq`` layer; ``timeout()`` moving on
from a server that accepts and never answers; a new backend after a reset;
no descriptor left open (``/proc/self/fd``) after a failure, an abandoned
attempt or a close in the middle of the handshake; ``simple_query`` before
OK.

Isolation: an empty environment (no ``PG*`` variable, no home directory, so
no password or service file) for pgproto, and an explicit ``passfile`` that
does not exist for libpq.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import select
import selectors
import socket
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
from fdcheck import assert_no_fd_leak
from pgproto_adapters import blocking
from pgproto_adapters._cluster import Cluster
from servers import ROLES, TLSMaterial, connect_params

import pgproto
from pgproto import ConnectError, ConnStatus, LocalProtocolError, PollingStatus

ENV: Final = pgproto.Environment(environ={}, home=None, user="pgproto-test")
#: Generous bound on anything that should take about 2 s (a shared machine).
SLACK: Final = 10.0
#: No loop below runs longer than this (a connect_poll() that never moves on).
GIVE_UP: Final = 60.0
README: Final = Path(__file__).resolve().parent.parent / "README.rst"
#: The RST comment that precedes the example in README.rst.
EXAMPLE_MARKER: Final = ".. example: connect_poll loop"

_WAITING: Final = (PollingStatus.READING, PollingStatus.WRITING)
_DONE: Final = (PollingStatus.OK, PollingStatus.FAILED)


# --------------------------------------------------------------------------
# helpers


def _params(server: Cluster, tls: TLSMaterial, transport: str, **extra: str) -> dict[str, Any]:
    """``scram_user`` over *transport* (unix, tcp, tls), with its password (as
    keyword arguments: ``connect`` also has non-string ones)."""
    password = ROLES["scram_user"].password or ""
    return connect_params(
        server, transport, tls, **{"user": "scram_user", "password": password, **extra}
    )


def _start(params: dict[str, Any] | None = None, /, **kwargs: Any) -> blocking.Connection:
    return blocking.connect_start(env=ENV, **(params or {}), **kwargs)


def _two_hosts(first_port: int, second_port: int, **extra: str) -> dict[str, Any]:
    """``postgres`` on 127.0.0.1 at *first_port*, then at *second_port* (plaintext)."""
    return {
        "host": "127.0.0.1,127.0.0.1",
        "port": f"{first_port},{second_port}",
        "user": "postgres",
        "dbname": "postgres",
        "sslmode": "disable",
        **extra,
    }


def _wait(fd: int | blocking.Connection, status: PollingStatus, timeout: float | None) -> None:
    """``select.select`` on *fd* (a number or an object with ``fileno()``) for
    what *status* asks: readable for READING, writable for WRITING."""
    if status is PollingStatus.READING:
        select.select([fd], [], [], timeout)
    else:
        select.select([], [fd], [], timeout)


def drive_selectors(
    conn: blocking.Connection, on_poll: Callable[[PollingStatus], None] | None = None
) -> PollingStatus:
    """The PQconnectPoll loop over a DefaultSelector, re-registering the
    socket after every call (it may be a new one)."""
    give_up = time.monotonic() + GIVE_UP
    with selectors.DefaultSelector() as sel:
        while True:
            assert time.monotonic() < give_up, "connect_poll() never finished"
            status = conn.connect_poll()
            if on_poll is not None:
                on_poll(status)
            if status in _DONE:
                return status
            reading = status is PollingStatus.READING
            events = selectors.EVENT_READ if reading else selectors.EVENT_WRITE
            key = sel.register(conn.fileno(), events)
            try:
                sel.select(conn.timeout())
            finally:
                sel.unregister(key.fileobj)


def drive_select(conn: blocking.Connection) -> PollingStatus:
    """The same loop with ``select.select`` and timeout()."""
    give_up = time.monotonic() + GIVE_UP
    while (status := conn.connect_poll()) in _WAITING:
        assert time.monotonic() < give_up, "connect_poll() never finished"
        _wait(conn.fileno(), status, conn.timeout())
    return status


async def drive_asyncio(conn: blocking.Connection) -> PollingStatus:
    """The loop inside asyncio: a Future completed by add_reader/add_writer."""
    loop = asyncio.get_running_loop()
    give_up = time.monotonic() + GIVE_UP
    while (status := conn.connect_poll()) in _WAITING:
        assert time.monotonic() < give_up, "connect_poll() never finished"
        fd = conn.fileno()
        ready: asyncio.Future[None] = loop.create_future()

        def wake(ready: asyncio.Future[None] = ready) -> None:
            if not ready.done():
                ready.set_result(None)

        if status is PollingStatus.READING:
            loop.add_reader(fd, wake)
        else:
            loop.add_writer(fd, wake)
        try:
            await asyncio.wait_for(ready, conn.timeout())
        except TimeoutError:
            pass  # the next connect_poll() moves on
        finally:
            # Before the next connect_poll(), which may close this socket.
            if status is PollingStatus.READING:
                loop.remove_reader(fd)
            else:
                loop.remove_writer(fd)
    return status


def _socket_id(fd: int) -> tuple[int, int] | None:
    """(fd, inode) of the socket behind *fd*: the number alone may be reused."""
    return (fd, os.fstat(fd).st_ino) if fd >= 0 else None


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A 127.0.0.1 port that completes the TCP handshake (the kernel's
    backlog) and never answers: nobody calls accept().  (``closed_port``,
    from servers.py, refuses connections.)"""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as sock:
        yield sock.getsockname()[1]


def _libpq_statuses(conninfo: str) -> list[ConnStatus]:
    """PQstatus after PQconnectStart and after every PQconnectPoll (psycopg's pq)."""
    pgconn = psycopg.pq.PGconn.connect_start(conninfo.encode())
    try:
        seen = [ConnStatus(pgconn.status)]
        while True:
            polled = PollingStatus(pgconn.connect_poll())
            seen.append(ConnStatus(pgconn.status))
            if polled in _DONE:
                break
            _wait(pgconn.socket, polled, SLACK)
        return seen
    finally:
        pgconn.finish()


def _dedup(items: list[ConnStatus]) -> list[ConnStatus]:
    return [s for i, s in enumerate(items) if i == 0 or items[i - 1] != s]


def _is_subsequence(short: list[ConnStatus], long: list[ConnStatus]) -> bool:
    remaining = iter(long)
    return all(any(item == other for other in remaining) for item in short)


# --------------------------------------------------------------------------
# connecting


def test_selectors_loop_until_ok(pg18: Cluster, tls_material: TLSMaterial) -> None:
    conn = _start(_params(pg18, tls_material, "tcp"))
    try:
        polled: list[PollingStatus] = []
        assert drive_selectors(conn, polled.append) is PollingStatus.OK
        assert polled[-1] is PollingStatus.OK
        assert set(polled[:-1]) <= set(_WAITING)
        assert conn.status is ConnStatus.OK
        assert conn.error is None
        assert conn.timeout() is None
        assert conn.auth_method == "SCRAM-SHA-256"
        [result] = conn.simple_query("SELECT current_user, 1 + 1")
        assert result.rows == [("scram_user", "2")]
        # Polling an established connection changes nothing.
        assert conn.connect_poll() is PollingStatus.OK
        [result] = conn.simple_query("SELECT 3")
        assert result.rows == [("3",)]
    finally:
        conn.close()
    assert conn.fileno() == -1
    assert conn.connect_poll() is PollingStatus.FAILED


def test_foreign_asyncio_loop(pg18: Cluster, tls_material: TLSMaterial) -> None:
    """Two connections (TLS and Unix socket) driven at once by asyncio's loop."""
    conns = [
        _start(_params(pg18, tls_material, "tls")),
        _start(_params(pg18, tls_material, "unix")),
    ]

    async def main() -> list[PollingStatus]:
        return list(await asyncio.gather(*(drive_asyncio(c) for c in conns)))

    try:
        assert asyncio.run(main()) == [PollingStatus.OK, PollingStatus.OK]
        assert conns[0].ssl_in_use
        assert conns[0].auth_method == "SCRAM-SHA-256-PLUS"
        assert not conns[1].ssl_in_use
        for conn in conns:
            assert conn.simple_query("SELECT 1")[0].rows == [("1",)]
    finally:
        for conn in conns:
            conn.close()


def test_fileno_changes_when_the_next_host_is_tried(pg18: Cluster, closed_port: int) -> None:
    """The first host refuses; the socket to watch changes to the second one's."""
    conn = _start(_two_hosts(closed_port, pg18.port))
    try:
        sockets = [_socket_id(conn.fileno())]

        def note(status: PollingStatus) -> None:
            sockets.append(_socket_id(conn.fileno()))

        assert drive_selectors(conn, note) is PollingStatus.OK
        # The refused connect() is still in progress after connect_start.
        assert sockets[0] is not None
        distinct = {s for s in sockets if s is not None}
        assert len(distinct) == 2, sockets
        [refused] = conn.machine.attempts
        assert refused.port == closed_port
        assert isinstance(refused.error, pgproto.TransportError)
        assert refused.error.errno == errno.ECONNREFUSED
        assert conn.port == pg18.port
        assert conn.simple_query("SELECT 1")[0].rows == [("1",)]
    finally:
        conn.close()


def test_wrong_password_fails(pg18: Cluster, tls_material: TLSMaterial) -> None:
    with assert_no_fd_leak():
        conn = _start(_params(pg18, tls_material, "tcp", password="wrong"))
        assert drive_select(conn) is PollingStatus.FAILED
        assert conn.status is ConnStatus.BAD
        assert conn.fileno() == -1
        assert conn.timeout() is None
        assert isinstance(conn.error, ConnectError)
        [attempt] = conn.error.attempts
        assert attempt.sqlstate == "28P01"
        assert attempt.port == pg18.port
        assert 'password authentication failed for user "scram_user"' in str(conn.error)
        # FAILED stays FAILED; the error is libpq's message for blocking connect too.
        assert conn.connect_poll() is PollingStatus.FAILED
        with pytest.raises(ConnectError) as blocking_error:
            blocking.connect(env=ENV, **_params(pg18, tls_material, "tcp", password="wrong"))
        assert str(blocking_error.value) == str(conn.error)
        conn.close()


def test_refused_port_fails(closed_port: int) -> None:
    with assert_no_fd_leak():
        conn = _start(host="127.0.0.1", port=str(closed_port), user="postgres", sslmode="disable")
        assert conn.status is ConnStatus.STARTED  # the connect() is in progress
        assert conn.fileno() >= 0
        assert drive_select(conn) is PollingStatus.FAILED
        assert conn.fileno() == -1
        assert isinstance(conn.error, ConnectError)
        [attempt] = conn.error.attempts
        assert isinstance(attempt.error, pgproto.TransportError)
        assert attempt.error.errno == errno.ECONNREFUSED
        assert str(conn.error).startswith(
            f'connection to server at "127.0.0.1", port {closed_port} failed'
            " (opening the connection, plaintext): Connection refused"
        )
        with pytest.raises(LocalProtocolError):
            conn.simple_query("SELECT 1")


def test_conninfo_error_raises_at_once() -> None:
    with pytest.raises(pgproto.ConninfoError, match='invalid sslmode value: "bogus"'):
        blocking.connect_start("sslmode=bogus", env=ENV)


def test_unix_socket_that_does_not_exist_fails_in_connect_start(tmp_path: Path) -> None:
    """A failure that needs no waiting is over when connect_start returns
    (libpq's PQconnectStart returns a CONNECTION_BAD connection)."""
    conn = _start(host=str(tmp_path), port="5432", user="postgres")
    assert conn.status is ConnStatus.BAD
    assert conn.fileno() == -1
    assert conn.connect_poll() is PollingStatus.FAILED
    assert isinstance(conn.error, ConnectError)
    assert "No such file or directory" in str(conn.error)


@pytest.mark.parametrize("transport", ["unix", "tcp", "tls"])
def test_status_walks_libpq_steps(pg18: Cluster, tls_material: TLSMaterial, transport: str) -> None:
    """Every CONNECTION_* step the machine takes (StatusChanged, in order) is
    libpq's; what is visible between polls, for libpq and for pgproto, are
    steps of that walk in the same order."""
    expected = {
        "unix": ["STARTED", "MADE", "AWAITING_RESPONSE", "AUTH_OK", "CHECK_TARGET", "OK"],
        "tcp": ["STARTED", "MADE", "AWAITING_RESPONSE", "AUTH_OK", "CHECK_TARGET", "OK"],
        "tls": [
            "STARTED",
            "MADE",
            "SSL_STARTUP",
            "MADE",
            "AWAITING_RESPONSE",
            "AUTH_OK",
            "CHECK_TARGET",
            "OK",
        ],
    }[transport]
    params = _params(pg18, tls_material, transport)
    walk: list[ConnStatus] = []

    def trace(event: pgproto.Event) -> None:
        if isinstance(event, pgproto.StatusChanged):
            walk.append(event.status)

    conn = _start(params, trace=trace)
    try:
        seen = [conn.status]
        assert drive_selectors(conn, lambda _: seen.append(conn.status)) is PollingStatus.OK
    finally:
        conn.close()
    walk = walk[: walk.index(ConnStatus.OK) + 1]  # close() adds BAD
    assert [s.name for s in walk] == expected
    assert _is_subsequence(_dedup(seen), walk), (seen, walk)

    libpq_conninfo = psycopg.conninfo.make_conninfo(
        "", **params, passfile="/nonexistent/pgpass", gssencmode="disable"
    )
    libpq_seen = _libpq_statuses(libpq_conninfo)
    assert libpq_seen[-1] is ConnStatus.OK
    assert _is_subsequence(_dedup(libpq_seen), walk), (libpq_seen, walk)


def test_timeout_moves_on_from_a_silent_server(pg18: Cluster, silent_port: int) -> None:
    """connect_timeout=2: a caller that waits with timeout() reaches the
    second host about 2 s after the first one stopped answering."""
    conn = _start(_two_hosts(silent_port, pg18.port, connect_timeout="2"))
    started = time.monotonic()
    try:
        timeout = conn.timeout()
        assert timeout is not None
        assert 0 < timeout <= 2
        assert drive_select(conn) is PollingStatus.OK
        elapsed = time.monotonic() - started
        assert 1.5 < elapsed < SLACK
        [timed_out] = conn.machine.attempts
        assert timed_out.port == silent_port
        assert str(timed_out.error) == "timeout expired"
        assert conn.port == pg18.port
        assert conn.timeout() is None
        assert conn.simple_query("SELECT 1")[0].rows == [("1",)]
    finally:
        conn.close()


def test_blocking_connect_moves_on_from_a_silent_server(pg18: Cluster, silent_port: int) -> None:
    """connect() is the same code waiting in poll(2): the deadline fires there too."""
    with assert_no_fd_leak():
        started = time.monotonic()
        conn = blocking.connect(env=ENV, **_two_hosts(silent_port, pg18.port, connect_timeout="2"))
        try:
            assert 1.5 < time.monotonic() - started < SLACK
            assert [str(a.error) for a in conn.machine.attempts] == ["timeout expired"]
            assert conn.simple_query("SELECT 1")[0].rows == [("1",)]
        finally:
            conn.close()


def test_large_query_round_trip(pg18: Cluster) -> None:
    """A query larger than the socket buffers: partial sends wait for the
    socket to drain, and full-buffer reads carry on reading."""
    size = 8 * 1024 * 1024
    with blocking.connect(pg18.dsn(sslmode="disable"), env=ENV) as conn:
        [result] = conn.simple_query(f"SELECT length('{'x' * size}'), repeat('y', {size})")
        [(length, text)] = result.rows
        assert length == str(size)
        assert text == "y" * size


def test_timeout_is_none_without_connect_timeout(silent_port: int) -> None:
    conn = _start(host="127.0.0.1", port=str(silent_port), user="postgres", sslmode="disable")
    try:
        assert conn.timeout() is None
        assert conn.connect_poll() in _WAITING
    finally:
        conn.close()


def test_timeout_fails_the_last_host(silent_port: int) -> None:
    with assert_no_fd_leak():
        conn = _start(
            host="127.0.0.1",
            port=str(silent_port),
            user="postgres",
            sslmode="disable",
            connect_timeout="2",
        )
        started = time.monotonic()
        assert drive_select(conn) is PollingStatus.FAILED
        assert 1.5 < time.monotonic() - started < SLACK
        assert isinstance(conn.error, ConnectError)
        assert "timeout expired" in str(conn.error)
        assert conn.fileno() == -1


# --------------------------------------------------------------------------
# abandoning, misuse


def test_close_mid_handshake_leaves_no_fd(
    pg18: Cluster, tls_material: TLSMaterial, silent_port: int
) -> None:
    """close() after connect_start, after each poll of a TLS handshake, and
    while a silent server holds the connection: no descriptor stays open."""
    params = _params(pg18, tls_material, "tls")
    steps = 0
    while True:
        with assert_no_fd_leak():
            conn = _start(params)
            for _ in range(steps):
                if (polled := conn.connect_poll()) not in _WAITING:
                    break
                _wait(conn, polled, SLACK)
            status = conn.status
            conn.close()
            conn.close()  # idempotent
            assert conn.fileno() == -1
            assert conn.status is ConnStatus.BAD
            assert conn.connect_poll() is PollingStatus.FAILED
        if status is ConnStatus.OK:
            break
        steps += 1
        assert steps < 50
    with assert_no_fd_leak():
        conn = _start(host="127.0.0.1", port=str(silent_port), user="postgres", sslmode="disable")
        while conn.connect_poll() is PollingStatus.WRITING:
            select.select([], [conn], [], SLACK)
        assert conn.status is ConnStatus.AWAITING_RESPONSE  # the startup packet is out
        assert conn.connect_poll() is PollingStatus.READING
        conn.close()


def test_simple_query_before_ok_raises(pg18: Cluster, tls_material: TLSMaterial) -> None:
    conn = _start(_params(pg18, tls_material, "tls"))
    try:
        assert conn.status is not ConnStatus.OK
        with pytest.raises(LocalProtocolError, match="not established"):
            conn.simple_query("SELECT 1")
        # The attempt is not harmed.
        assert drive_select(conn) is PollingStatus.OK
        assert conn.simple_query("SELECT 1")[0].rows == [("1",)]
    finally:
        conn.close()


# --------------------------------------------------------------------------
# reset


def _backend_pid(conn: blocking.Connection) -> int:
    [result] = conn.simple_query("SELECT pg_backend_pid()")
    value = result.rows[0][0]
    assert value is not None
    return int(value)


def test_reset(pg18: Cluster, tls_material: TLSMaterial) -> None:
    seen: list[pgproto.Event] = []
    conn = blocking.connect(env=ENV, trace=seen.append, **_params(pg18, tls_material, "tls"))
    try:
        first = _backend_pid(conn)
        assert first == conn.backend_pid
        conn.simple_query("SET application_name = 'before reset'")
        seen.clear()
        conn.reset()
        assert conn.status is ConnStatus.OK
        assert not conn.closed
        assert conn.backend_pid is not None
        assert conn.backend_pid != first
        assert _backend_pid(conn) == conn.backend_pid
        assert conn.ssl_in_use
        assert conn.auth_method == "SCRAM-SHA-256-PLUS"
        [result] = conn.simple_query("SHOW application_name")
        assert result.rows == [("",)]
        assert any(isinstance(e, pgproto.Connected) for e in seen)  # the tracer is kept
    finally:
        conn.close()


def test_reset_start_and_poll(pg18: Cluster, tls_material: TLSMaterial) -> None:
    conn = blocking.connect(env=ENV, **_params(pg18, tls_material, "tcp"))
    try:
        first = _backend_pid(conn)
        with assert_no_fd_leak():
            assert conn.reset_start() is True
            assert conn.status is not ConnStatus.OK
            with pytest.raises(LocalProtocolError):
                conn.simple_query("SELECT 1")
            while (status := conn.reset_poll()) in _WAITING:
                _wait(conn, status, conn.timeout())
            assert status is PollingStatus.OK
            second = _backend_pid(conn)
            assert second != first
            # A second reset: the old socket is closed, one new one is open.
            assert conn.reset_start()
            assert drive_select(conn) is PollingStatus.OK
            assert _backend_pid(conn) not in (first, second)
    finally:
        conn.close()


def test_reset_of_a_closed_connection_reconnects(pg18: Cluster) -> None:
    conn = blocking.connect(pg18.dsn(sslmode="disable"), env=ENV)
    conn.close()
    conn.reset()
    try:
        assert conn.simple_query("SELECT 1")[0].rows == [("1",)]
    finally:
        conn.close()


def test_failed_reset_raises_and_leaves_no_fd(closed_port: int) -> None:
    """A reset that cannot connect raises ConnectError, like connect()."""
    conn = _start(host="127.0.0.1", port=str(closed_port), user="postgres", sslmode="disable")
    assert drive_select(conn) is PollingStatus.FAILED
    with assert_no_fd_leak():
        with pytest.raises(ConnectError, match="Connection refused"):
            conn.reset()
        assert conn.status is ConnStatus.BAD
        assert conn.fileno() == -1
        assert isinstance(conn.error, ConnectError)
    conn.close()


# --------------------------------------------------------------------------
# the README example, executed as written


def readme_example() -> str:
    """The literal block after EXAMPLE_MARKER in README.rst."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(EXAMPLE_MARKER)
    intro = next(i for i in range(start + 1, len(lines)) if lines[i].rstrip().endswith("::"))
    block: list[str] = []
    for line in lines[intro + 1 :]:
        if line.strip() and not line.startswith(" "):
            break
        block.append(line)
    code = textwrap.dedent("\n".join(block)).strip()
    assert code, "no code block after the README marker"
    return code + "\n"


def test_readme_example_runs(pg18: Cluster, closed_port: int) -> None:
    code = readme_example()
    assert "select.select" in code
    assert "timeout()" in code
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    functions = [
        value
        for name, value in namespace.items()
        if callable(value) and getattr(value, "__module__", None) == "readme_example"
    ]
    assert len(functions) == 1, re.findall(r"^def \w+", code, re.M)
    [connect_nonblocking] = functions
    conn = connect_nonblocking(pg18.dsn(sslmode="disable", connect_timeout=5))
    try:
        assert isinstance(conn, blocking.Connection)
        assert conn.simple_query("SELECT 42")[0].rows == [("42",)]
    finally:
        conn.close()
    with pytest.raises(ConnectError, match="Connection refused"):
        connect_nonblocking(f"host=127.0.0.1 port={closed_port} sslmode=disable")
