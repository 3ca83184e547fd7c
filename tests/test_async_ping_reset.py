"""The async adapters' ping, overall timeout and reset, against real servers.

Every test runs with both asyncio and trio.  ``ping`` is compared with
libpq's own ``PQping`` (``libpq_oracle.ping``) on the same connection
string: a running server, a wrong or missing password, a database that does
not exist and a pg_hba rejection (the server is up: OK), a refused port, a
host name that does not resolve, a TLS failure and a server that never
answers (NO_RESPONSE), and invalid options (NO_ATTEMPT).  REJECT (57P03,
"cannot connect now") is left to ``test_lifecycle``: no fixture produces it.

``timeout=`` (the overall deadline) is checked against the silent listener,
with and without a per-address ``connect_timeout`` that would fire later, and
against a name lookup that never returns; ``connect_timeout`` alone moves on
from the silent listener to a real server.  ``reset()`` reconnects to a new
backend (new pid, new ParameterStatus values, queries work), fails with
ConnectError on a server that went away, and leaves the connection closed
when it is cancelled.

No test leaves a descriptor open: the entries of ``/proc/self/fd`` (less
the silent listener's) are counted before and after each failed connect,
timeout, cancellation and reset, inside the running event loop.

Isolation: no ``PG*`` variable, and an explicit ``passfile`` that does not
exist, for pgproto and libpq alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
import trio
from fdcheck import describe_fds, open_fds
from libpq_oracle import ping as libpq_ping
from pg_admin import until
from pgproto_adapters import asyncio as asyncio_adapter
from pgproto_adapters import trio as trio_adapter
from pgproto_adapters._cluster import Cluster
from servers import (
    ROLES,
    UNRESOLVABLE_HOST,
    SilentListener,
    TLSMaterial,
    connect_params,
    drop_pg_environment,
    multi_host_conninfo,
)

import pgproto
from pgproto import ConnectError, LocalProtocolError, Ping

#: How long a test waits for something that should happen at once.
PATIENCE: Final = 10.0
#: Seconds within which a deadline must have fired (generous: a shared machine).
SLACK: Final = 10.0
#: A host name whose lookup never returns (see ``slow_resolver``).
SLOW_HOST: Final = "never-answers.invalid"
OVERALL: Final = "timeout expired (overall deadline)"

_Adapter = Any  # pgproto_adapters.asyncio or .trio: the same functions


@dataclasses.dataclass(frozen=True)
class Runner:
    """One async adapter and the means to run a coroutine function with it."""

    name: str
    module: _Adapter
    run_fn: Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any]
    sleep: Callable[[float], Awaitable[None]]

    def run(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        return self.run_fn(fn)

    def __str__(self) -> str:
        return self.name


RUNNERS: Final = (
    Runner("asyncio", asyncio_adapter, lambda fn: asyncio.run(fn()), asyncio.sleep),
    Runner("trio", trio_adapter, trio.run, trio.sleep),
)


@pytest.fixture(params=RUNNERS, ids=str)
def runner(request: pytest.FixtureRequest) -> Runner:
    value: Runner = request.param
    return value


@pytest.fixture
def nopass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """No ``PG*`` variable; the path of a password file that does not exist."""
    drop_pg_environment(monkeypatch)
    return str(tmp_path / "no-such-pgpass")


def _conninfo(params: dict[str, str]) -> str:
    return " ".join(f"{key}='{value}'" for key, value in params.items())


# --------------------------------------------------------------------------
# descriptors


def _own_fds(silent: SilentListener | None) -> set[int]:
    """Descriptors open in this process, less the silent listener's."""
    fds = open_fds()
    if silent is not None:
        fds -= silent.owned_fds()
    return fds


@dataclasses.dataclass
class FdCount:
    """Counts this process's descriptors now; :meth:`check` compares later."""

    silent: SilentListener | None = None
    before: set[int] = dataclasses.field(default_factory=set)

    def __post_init__(self) -> None:
        self.before = _own_fds(self.silent)

    def check(self) -> None:
        after = _own_fds(self.silent)
        assert len(after) == len(self.before), (
            f"{len(self.before)} descriptors before, {len(after)} after\n"
            f"new:\n{describe_fds(after - self.before)}\n"
            f"gone:\n{describe_fds(self.before - after)}"
        )


# --------------------------------------------------------------------------
# ping, side by side with libpq


def _ping_cases(
    pg18: Cluster, pg18_notls: Cluster, tls: TLSMaterial, closed_port: int, passfile: str
) -> dict[str, tuple[str, Ping]]:
    def server(user: str, transport: str = "tcp", cluster: Cluster = pg18, **extra: str) -> str:
        params = connect_params(cluster, transport, tls, user=user, passfile=passfile, **extra)
        return _conninfo(params)

    scram = ROLES["scram_user"].password
    assert scram is not None
    refused = multi_host_conninfo(("127.0.0.1", closed_port), passfile=passfile)
    unresolvable = multi_host_conninfo((UNRESOLVABLE_HOST, pg18.port), passfile=passfile)
    return {
        "running": (server("trust_user"), Ping.OK),
        "scram, right password": (server("scram_user", password=scram), Ping.OK),
        "scram, wrong password": (server("scram_user", password="wrong"), Ping.OK),
        "scram, no password": (server("scram_user"), Ping.OK),
        "no such database": (server("trust_user", dbname="no_such_db"), Ping.OK),
        "TLS, unknown CA": (
            server("trust_user", "tls", sslrootcert=str(tls.client_cert)),
            Ping.NO_RESPONSE,
        ),
        "TLS required, server without": (
            server("trust_user", cluster=pg18_notls, sslmode="require"),
            Ping.NO_RESPONSE,
        ),
        "no pg_hba line (TLS only)": (server("sslonly_user", cluster=pg18_notls), Ping.OK),
        "refused": (refused, Ping.NO_RESPONSE),
        "unresolvable": (unresolvable, Ping.NO_RESPONSE),
        "refused, then running": (
            multi_host_conninfo(
                ("127.0.0.1", closed_port), (pg18.host, pg18.port), passfile=passfile
            ),
            Ping.OK,
        ),
        "invalid option": ("sslmode=bogus", Ping.NO_ATTEMPT),
        "unknown keyword": (f"host=127.0.0.1 port={pg18.port} no_such_option=1", Ping.NO_ATTEMPT),
    }


def test_ping_matches_libpq(
    runner: Runner,
    pg18: Cluster,
    pg18_notls: Cluster,
    tls_material: TLSMaterial,
    closed_port: int,
    nopass: str,
) -> None:
    cases = _ping_cases(pg18, pg18_notls, tls_material, closed_port, nopass)

    async def main() -> dict[str, Ping]:
        results = {}
        for name, (conninfo, _) in cases.items():
            count = FdCount()
            results[name] = await runner.module.ping(conninfo)
            count.check()
        return results

    ours = runner.run(main)
    libpq = {name: Ping(libpq_ping(conninfo)) for name, (conninfo, _) in cases.items()}
    expected = {name: outcome for name, (_, outcome) in cases.items()}
    assert ours == expected
    assert libpq == expected


def test_ping_keywords_and_env(runner: Runner, pg18: Cluster, nopass: str) -> None:
    """Keyword arguments and an injected environment reach ``connect``."""
    env = pgproto.Environment(environ={"PGPORT": str(pg18.port)}, home="/nonexistent")

    async def main() -> tuple[Ping, Ping, Ping]:
        by_keywords = await runner.module.ping(
            host=pg18.host, port=pg18.port, user="trust_user", dbname="postgres", passfile=nopass
        )
        by_env = await runner.module.ping(
            f"host={pg18.host} user=trust_user dbname=postgres passfile={nopass}", env=env
        )
        bad_keyword = await runner.module.ping(host=pg18.host, sslmode="bogus")
        return by_keywords, by_env, bad_keyword

    assert runner.run(main) == (Ping.OK, Ping.OK, Ping.NO_ATTEMPT)


def test_ping_silent_server(runner: Runner, silent_listener: SilentListener, nopass: str) -> None:
    """No answer is NO_RESPONSE, for libpq (after connect_timeout) and for
    pgproto (after the overall deadline)."""
    endpoint = (silent_listener.host, silent_listener.port)
    with_connect_timeout = multi_host_conninfo(endpoint, connect_timeout=2, passfile=nopass)
    without = multi_host_conninfo(endpoint, connect_timeout=0, passfile=nopass)

    async def main() -> tuple[Ping, float]:
        count = FdCount(silent_listener)
        start = time.monotonic()
        outcome = await runner.module.ping(without, timeout=0.5)
        elapsed = time.monotonic() - start
        count.check()
        return outcome, elapsed

    outcome, elapsed = runner.run(main)
    assert outcome is Ping.NO_RESPONSE
    assert 0.5 <= elapsed < SLACK
    assert Ping(libpq_ping(with_connect_timeout)) is Ping.NO_RESPONSE


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), True, "1", [1]])
def test_timeout_is_validated(runner: Runner, timeout: Any) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="timeout must be a positive finite number"):
            await runner.module.connect("host=127.0.0.1 port=1", timeout=timeout)
        with pytest.raises(ValueError, match="timeout must be a positive finite number"):
            await runner.module.ping("host=127.0.0.1 port=1", timeout=timeout)

    runner.run(main)


# --------------------------------------------------------------------------
# the overall deadline


def _last_error(exc: ConnectError) -> str:
    return str(exc.attempts[-1].error)


def test_overall_timeout_on_a_silent_server(
    runner: Runner, silent_listener: SilentListener, nopass: str
) -> None:
    endpoint = (silent_listener.host, silent_listener.port)
    conninfo = multi_host_conninfo(endpoint, connect_timeout=0, passfile=nopass)

    async def main() -> tuple[ConnectError, float]:
        count = FdCount(silent_listener)
        accepted = silent_listener.accepted
        start = time.monotonic()
        with pytest.raises(ConnectError) as caught:
            await runner.module.connect(conninfo, timeout=1)
        elapsed = time.monotonic() - start
        count.check()
        assert silent_listener.wait_accepted(accepted + 1)  # it did reach the server
        return caught.value, elapsed

    error, elapsed = runner.run(main)
    # sslmode=prefer: SSLRequest was out; no plaintext retry after the deadline.
    assert [(a.step, str(a.error)) for a in error.attempts] == [("SSL negotiation", OVERALL)]
    assert OVERALL in str(error)
    assert 1.0 <= elapsed < SLACK


def test_overall_timeout_comes_before_connect_timeout(
    runner: Runner, pg18: Cluster, silent_listener: SilentListener, nopass: str
) -> None:
    """With a later per-address deadline, the overall one fires, and no
    other host is tried."""
    conninfo = multi_host_conninfo(
        (silent_listener.host, silent_listener.port),
        (pg18.host, pg18.port),
        connect_timeout=10,
        passfile=nopass,
    )

    async def main() -> tuple[ConnectError, float]:
        count = FdCount(silent_listener)
        start = time.monotonic()
        with pytest.raises(ConnectError) as caught:
            await runner.module.connect(conninfo, timeout=0.5)
        elapsed = time.monotonic() - start
        count.check()
        return caught.value, elapsed

    error, elapsed = runner.run(main)
    assert [_last_error(error)] == [str(a.error) for a in error.attempts]  # one attempt
    assert _last_error(error) == OVERALL
    assert elapsed < SLACK


def test_connect_timeout_moves_on_to_the_next_host(
    runner: Runner, pg18: Cluster, silent_listener: SilentListener, nopass: str
) -> None:
    """``host=<silent>,<real> connect_timeout=2``, no overall deadline: the
    first host times out and the second one answers.  Then a reset (which
    starts again from the silent host) is cancelled: the connection is
    closed and no descriptor is left."""
    conninfo = multi_host_conninfo(
        (silent_listener.host, silent_listener.port),
        (pg18.host, pg18.port),
        connect_timeout=2,
        passfile=nopass,
    )

    async def main() -> float:
        count = FdCount(silent_listener)
        start = time.monotonic()
        conn = await runner.module.connect(conninfo)
        elapsed = time.monotonic() - start
        try:
            assert conn.port == pg18.port
            [result] = await conn.simple_query("SELECT 1")
            assert result.rows == [("1",)]
            accepted = silent_listener.accepted
            await _cancel_when_accepted(runner, silent_listener, accepted, conn.reset())
            assert conn.closed
            with pytest.raises(LocalProtocolError):
                await conn.simple_query("SELECT 1")
        finally:
            await conn.close()
            await conn.close()
        count.check()
        return elapsed

    elapsed = runner.run(main)
    assert 2.0 <= elapsed < SLACK


async def _cancel_when_accepted(
    runner: Runner, silent: SilentListener, accepted: int, operation: Awaitable[Any]
) -> None:
    """Run *operation*; cancel it once the silent listener has accepted a
    new connection (so it waits for the server's answer)."""

    def reached() -> bool:
        return silent.accepted > accepted

    if runner.name == "asyncio":
        task = asyncio.ensure_future(operation)
        await until(reached, "the listener to accept", patience=PATIENCE, period=0.01)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return

    async def run_it() -> None:
        await operation

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_it)
            await until(reached, "the listener to accept", patience=PATIENCE, period=0.01)
            scope.cancel()
    assert scope.cancelled_caught


def test_cancelled_connect_leaves_no_socket(
    runner: Runner, silent_listener: SilentListener, nopass: str
) -> None:
    conninfo = multi_host_conninfo(
        (silent_listener.host, silent_listener.port), connect_timeout=0, passfile=nopass
    )

    async def main() -> None:
        for timeout in (None, 60, None):  # without and with a deadline's cancel scope
            count = FdCount(silent_listener)
            accepted = silent_listener.accepted
            await _cancel_when_accepted(
                runner, silent_listener, accepted, runner.module.connect(conninfo, timeout=timeout)
            )
            count.check()

    runner.run(main)


def test_failed_connects_leave_no_socket(
    runner: Runner, pg18: Cluster, closed_port: int, nopass: str
) -> None:
    conninfos = [
        multi_host_conninfo(("127.0.0.1", closed_port), passfile=nopass),
        multi_host_conninfo(("127.0.0.1", closed_port), (UNRESOLVABLE_HOST, 5432), passfile=nopass),
        multi_host_conninfo((pg18.host, pg18.port), user="no_such_role", passfile=nopass),
        multi_host_conninfo(
            (pg18.host, pg18.port), user="scram_user", password="wrong", passfile=nopass
        ),
    ]

    async def main() -> list[ConnectError]:
        count = FdCount()
        errors = []
        for conninfo in conninfos:
            with pytest.raises(ConnectError) as caught:
                await runner.module.connect(conninfo, timeout=30)
            errors.append(caught.value)
        count.check()
        return errors

    refused = runner.run(main)[0]
    # libpq's words, not asyncio's ("Connect call failed ...").
    libpq = psycopg.pq.PGconn.connect(conninfos[0].encode())
    assert libpq.status == psycopg.pq.ConnStatus.BAD
    libpq_message = libpq.get_error_message().rstrip("\n")
    libpq.finish()
    assert libpq_message.endswith(f" failed: {_last_error(refused)}")


# --------------------------------------------------------------------------
# name resolution


@pytest.fixture
def slow_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """``getaddrinfo`` for :data:`SLOW_HOST` blocks until the event is set
    (or 60 s); every other name resolves as usual."""
    release = threading.Event()
    real = socket.getaddrinfo

    def fake(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        flags = kwargs.get("flags", args[4] if len(args) > 4 else 0)
        if name == SLOW_HOST and not flags & socket.AI_NUMERICHOST:
            release.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    yield release
    release.set()


def test_overall_timeout_bounds_name_resolution(
    runner: Runner, slow_resolver: threading.Event, nopass: str
) -> None:
    conninfo = multi_host_conninfo((SLOW_HOST, 5432), connect_timeout=0, passfile=nopass)

    async def main() -> tuple[ConnectError, float]:
        count = FdCount()
        start = time.monotonic()
        try:
            with pytest.raises(ConnectError) as caught:
                await runner.module.connect(conninfo, timeout=0.5)
        finally:
            slow_resolver.set()  # asyncio.run waits for its resolver thread
        elapsed = time.monotonic() - start
        count.check()
        return caught.value, elapsed

    error, elapsed = runner.run(main)
    assert _last_error(error) == OVERALL
    assert error.attempts[-1].step == "resolving the host"
    assert elapsed < SLACK


def test_connect_timeout_bounds_name_resolution(
    runner: Runner, pg18: Cluster, slow_resolver: threading.Event, nopass: str
) -> None:
    """The name lookup gets the per-address budget; then the next host."""
    conninfo = multi_host_conninfo(
        (SLOW_HOST, 5432), (pg18.host, pg18.port), connect_timeout=2, passfile=nopass
    )

    async def main() -> tuple[int | None, list[tuple[str | None, str, str]]]:
        start = time.monotonic()
        try:
            conn = await runner.module.connect(conninfo)
        finally:
            slow_resolver.set()
        assert 2.0 <= time.monotonic() - start < SLACK
        async with conn:
            [result] = await conn.simple_query("SELECT 1")
            assert result.rows == [("1",)]
            return conn.port, [(a.host, a.step, str(a.error)) for a in conn.machine.attempts]

    port, attempts = runner.run(main)
    assert port == pg18.port
    assert attempts == [(SLOW_HOST, "resolving the host", "timeout expired")]


def test_unencodable_host_name_fails_like_libpq(runner: Runner, nopass: str) -> None:
    """A label longer than 63 characters: Python's IDNA codec refuses it;
    libpq hands the bytes to getaddrinfo, which says it does not exist."""
    name = "a" * 64 + ".invalid"
    conninfo = multi_host_conninfo((name, 5432), passfile=nopass)

    async def main() -> tuple[ConnectError, Ping]:
        with pytest.raises(ConnectError) as caught:
            await runner.module.connect(conninfo)
        return caught.value, await runner.module.ping(conninfo)

    error, ping = runner.run(main)
    assert _last_error(error).startswith(f'could not translate host name "{name}" to address: ')
    assert ping is Ping(libpq_ping(conninfo)) is Ping.NO_RESPONSE


# --------------------------------------------------------------------------
# reset


@pytest.mark.parametrize("transport", ["tcp", "tls", "unix"])
def test_reset_reconnects(
    runner: Runner, pg18: Cluster, tls_material: TLSMaterial, transport: str, nopass: str
) -> None:
    password = ROLES["scram_user"].password
    assert password is not None
    params = connect_params(
        pg18,
        transport,
        tls_material,
        user="scram_user",
        password=password,
        passfile=nopass,
        application_name="before",
    )

    async def main() -> None:
        count = FdCount()
        conn = await runner.module.connect(**params)
        try:
            old_pid = conn.backend_pid
            assert old_pid is not None
            await conn.simple_query("SET application_name = 'changed'")
            assert conn.server_parameters["application_name"] == "changed"
            await conn.reset()
            assert not conn.closed
            assert conn.backend_pid not in (None, old_pid)
            assert conn.server_parameters["application_name"] == "before"
            assert conn.ssl_in_use is (transport == "tls")
            assert conn.auth_method == (
                "SCRAM-SHA-256-PLUS" if transport == "tls" else "SCRAM-SHA-256"
            )
            [result] = await conn.simple_query("SELECT pg_backend_pid(), current_user")
            assert result.rows == [(str(conn.backend_pid), "scram_user")]
            # The old backend got Terminate and went away.
            gone = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {old_pid:d}"  # noqa: S608
            deadline = time.monotonic() + PATIENCE
            while (await conn.simple_query(gone))[0].rows != [("0",)]:
                assert time.monotonic() < deadline, "the old backend is still there"
                await runner.sleep(0.02)
            await conn.reset()  # twice in a row
            [result] = await conn.simple_query("SELECT 1")
            assert result.rows == [("1",)]
        finally:
            await conn.close()
        count.check()

    runner.run(main)


def test_reset_after_close_and_after_failure_reconnects(
    runner: Runner, pg18: Cluster, nopass: str
) -> None:
    """reset() is what a broken connection is for; it works on a closed one too."""
    conninfo = multi_host_conninfo((pg18.host, pg18.port), user="trust_user", passfile=nopass)

    async def main() -> None:
        count = FdCount()
        conn = await runner.module.connect(conninfo)
        pid = conn.backend_pid
        await conn.close()
        assert conn.closed
        await conn.reset()
        assert not conn.closed
        assert conn.backend_pid != pid
        # The server ends the backend: the next query fails, the connection closes.
        async with await runner.module.connect(conninfo) as admin:
            await admin.simple_query(f"SELECT pg_terminate_backend({conn.backend_pid})")
        assert isinstance(await _until_broken(runner, conn), pgproto.Error)
        assert conn.closed
        await conn.reset()
        [result] = await conn.simple_query("SELECT 1")
        assert result.rows == [("1",)]
        await conn.close()
        count.check()

    runner.run(main)


async def _until_broken(runner: Runner, conn: Any) -> BaseException:
    """Query *conn* until it fails (a backend's termination is asynchronous)."""
    for _ in range(200):
        try:
            await conn.simple_query("SELECT 1")
        except Exception as exc:
            return exc
        await runner.sleep(0.02)
    raise AssertionError("the connection stayed up")


def test_reset_on_a_server_that_went_away(
    runner: Runner, cluster_factory: Callable[..., Cluster]
) -> None:
    cluster = cluster_factory(18)
    conninfo = cluster.dsn(connect_timeout=5)

    async def main() -> ConnectError:
        count = FdCount()
        conn = await runner.module.connect(conninfo)
        cluster.stop()
        with pytest.raises(ConnectError) as caught:
            await conn.reset()
        assert conn.closed
        await conn.close()
        await conn.close()
        with pytest.raises(LocalProtocolError):
            await conn.simple_query("SELECT 1")
        with pytest.raises(ConnectError):  # and again
            await conn.reset()
        await conn.close()
        count.check()
        return caught.value

    error = runner.run(main)
    assert len(error.attempts) == 1
    assert "Connection refused" in _last_error(error)
