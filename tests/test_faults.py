"""Faults mid-handshake against real servers, and a server killed during a connection storm.

Part 1: one fault per case, injected by ``fault_proxy.FaultProxy`` in front
of ``pg18`` at one step of the handshake, on every connection through it:

* kinds: ``cut`` (EOF), ``reset`` (TCP RST), ``stall`` (nothing more, the
  sockets stay open), ``corrupt`` (one bit of the last byte of the unit);
* transports: TLS (``sslmode=verify-full``) after an SSLRequest, direct TLS
  (``sslnegotiation=direct``, ``verify-full``: ALPN ``postgresql``, no
  SSLRequest) and plaintext TCP, all with ``scram_user`` (SCRAM-SHA-256);
* points, read from a clean run through the proxy (``fault_proxy`` module
  docstring: each point is a server flight and a unit in it, the same on
  every run): TLS -- the answer to SSLRequest, the first encrypted handshake
  record, AuthenticationSASL, SASLContinue, and the last record, which
  carries SASLFinal, AuthenticationOk ... ReadyForQuery (PostgreSQL sends
  them in one TLS record, so "before ReadyForQuery" is that record);
  direct TLS -- the same, with the ServerHello (the server's first byte) in
  place of the answer: libpq does not fall back either (every connection
  through the proxy, libpq's too, is checked to open with a ClientHello);
  plaintext -- AuthenticationSASL, SASLContinue, SASLFinal and the
  ReadyForQuery message itself.

A few TLS cases (every kind, at SASLContinue and before ReadyForQuery) run
in front of ``pg15`` as well: an older server, with a smaller parameter
burst and, by default, only the P-256 group, so the TLS 1.3 handshake takes
a HelloRetryRequest flight more (``fault_proxy.handshake_points``).

The connection string lists the proxy first and the server itself second
(``host=127.0.0.1,127.0.0.1 port=<proxy>,<server> connect_timeout=2``).
Each case runs libpq (``PQconnectdb`` from psycopg's bundled libpq, in a
worker process: ``failover_helpers``) and the five pgproto flavours
(blocking, asyncio, trio, anyio on asyncio, anyio on trio) at the same
time, each on its own connection through the proxy, and checks:

* the decision: pgproto reaches the second server exactly when libpq does,
  and both agree with :data:`EXPECTED` (a model of libpq's rules, reference
  spec section 4.5: a timeout moves on to the next host, a read error, EOF or
  a TLS failure with nothing to fall back to ends the connection);
* the proxy attempt (``AttemptFailed`` trace events, else
  ``ConnectError.attempts``): host, address and port of the proxy, the step
  (:data:`STEPS`), and the type of the error (:data:`ERRORS`);
* a bound: each client ends within ``connect_timeout`` per host plus
  :data:`SLACK` (generous: it fails on a hang, not on a slow machine);
* the fault landed where meant on every connection (``Hit.step``);
* nothing left behind: no file descriptor (``fdcheck``, ignoring the
  proxy's), no thread, no task (asyncio, trio and anyio count their tasks
  before and after), no backend on the server (pg_stat_activity).

A few of the cases run in front of PgBouncer too (plaintext SCRAM; its
pooled server connections outlive the clients, so no backend count there).

Part 2: a dedicated PostgreSQL 18 cluster (TLS, SCRAM, from
``cluster_factory``) receives a storm: 60 asyncio or trio workers (30
blocking threads) each connect again and again, keeping every connection,
until the server is gone; ``pg_ctl stop -m immediate`` is issued once
:data:`TRIGGER` connections are made, so attempts are in flight when the
server dies.  Every attempt ends -- connected (and then broken: the next
query fails with a typed ``pgproto.Error``), or failed with
``ConnectError`` whose attempts carry typed errors -- within
``connect_timeout`` plus :data:`SLACK`; every worker sees a failure; no
task, thread or descriptor is left.  The cluster is removed afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import anyio
import pg_admin
import pytest
import trio
from capture import TLS_HANDSHAKE
from failover_helpers import LibpqWorkers, Outcome, run_parallel
from fake_server import ENV
from fault_proxy import FAULT_KINDS, Fault, FaultProxy, Point, flight_shape, handshake_points
from fdcheck import assert_no_fd_leak
from pgproto_adapters import anyio as anyio_adapter
from pgproto_adapters import asyncio as asyncio_adapter
from pgproto_adapters import blocking
from pgproto_adapters import trio as trio_adapter
from pgproto_adapters._cluster import Cluster, PgBouncer
from psycopg.conninfo import make_conninfo
from servers import ROLES, TLSMaterial, connect_params, drop_pg_environment

import pgproto

pytestmark = pytest.mark.usefixtures("no_pg_environment")

CONNECT_TIMEOUT: Final = 2
#: Added to ``connect_timeout`` x hosts: generous, it only has to catch a hang.
SLACK: Final = 6.0
USER: Final = "scram_user"
PASSWORD: Final = ROLES[USER].password
FLAVOURS: Final = ("blocking", "asyncio", "trio", "anyio-asyncio", "anyio-trio")

wait_until = functools.partial(pg_admin.wait_until, patience=15.0, period=0.01)


# --------------------------------------------------------------------------
# running the clients


@dataclasses.dataclass
class Result:
    """What one client did with one connection string."""

    client: str
    port: int | None = None  # the server port it ended up on; None: failed
    error: BaseException | None = None  # pgproto's exception
    failed: list[pgproto.AttemptFailed] = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    leftovers: list[str] = dataclasses.field(default_factory=list)  # tasks left running
    libpq: Outcome | None = None

    @property
    def connected(self) -> bool:
        return self.port is not None

    def describe(self) -> str:
        if self.libpq is not None:
            return self.libpq.describe()
        if self.connected:
            return f"connected to {self.port}"
        return f"{type(self.error).__name__}: {self.error}"


def _on(result: Result) -> Callable[[pgproto.Event], None]:
    def trace(event: pgproto.Event) -> None:
        if isinstance(event, pgproto.AttemptFailed):
            result.failed.append(event)

    return trace


def run_blocking(dsn: str) -> Result:
    result = Result("blocking")
    started = time.monotonic()
    try:
        conn = blocking.connect(dsn, env=ENV, trace=_on(result))
    except Exception as exc:
        result.error = exc
    else:
        with conn:
            conn.simple_query("select 1")
            result.port = conn.port
    result.elapsed = time.monotonic() - started
    return result


async def _async_body(name: str, module: Any, dsn: str, count: Callable[[], int]) -> Result:
    result = Result(name)
    before = count()
    started = time.monotonic()
    try:
        conn = await module.connect(dsn, env=ENV, trace=_on(result))
    except Exception as exc:
        result.error = exc
    else:
        async with conn:
            await conn.simple_query("select 1")
            result.port = conn.port
    result.elapsed = time.monotonic() - started
    after = count()
    if after != before:
        result.leftovers.append(f"{after - before} task(s) left running")
    return result


def _asyncio_tasks() -> int:
    return len(asyncio.all_tasks())


def _trio_tasks() -> int:
    return trio.lowlevel.current_statistics().tasks_living


def _anyio_tasks() -> int:
    return len(anyio.get_running_tasks())


def run_flavour(flavour: str, dsn: str) -> Result:
    """Connect with one pgproto flavour (async ones get an event loop of their own)."""
    if flavour == "blocking":
        return run_blocking(dsn)
    if flavour == "asyncio":
        return asyncio.run(_async_body("asyncio", asyncio_adapter, dsn, _asyncio_tasks))
    if flavour == "trio":
        return trio.run(_async_body, "trio", trio_adapter, dsn, _trio_tasks)
    backend = flavour.removeprefix("anyio-")
    return anyio.run(_async_body, flavour, anyio_adapter, dsn, _anyio_tasks, backend=backend)


def run_libpq(libpq: LibpqWorkers, dsn: str) -> Result:
    outcome = libpq.outcome(_libpq_extra(dsn))
    return Result("libpq", port=outcome.port, elapsed=outcome.elapsed, libpq=outcome)


# --------------------------------------------------------------------------
# the model: what libpq does, and what pgproto must report


#: Points per transport (``fault_proxy.handshake_points``).
STEPS: Final = {
    "tls": ("ssl_answer", "tls_handshake", "auth_request", "scram_continue", "before_ready"),
    "direct": ("server_hello", "tls_handshake", "auth_request", "scram_continue", "before_ready"),
    "tcp": ("auth_request", "scram_continue", "scram_final", "before_ready"),
}

#: The ``CONNECTION_*`` step pgproto names for a fault at each point.
PGPROTO_STEP: Final = {
    "ssl_answer": "SSL negotiation",
    "server_hello": "SSL negotiation",
    "tls_handshake": "SSL negotiation",
    "auth_request": "authentication",
    "scram_continue": "authentication",
    "scram_final": "authentication",
    ("tls", "before_ready"): "authentication",  # the record carries SASLFinal too
    ("direct", "before_ready"): "authentication",
    ("tcp", "before_ready"): "waiting for the server to be ready",
}

#: Transports that encrypt: after an SSLRequest, and direct TLS (no fallback
#: either way: ``verify-full``, and ``sslnegotiation=direct`` never retries).
TLS_TRANSPORTS: Final = ("tls", "direct")

NEXT_HOST: Final = "next host"  # connected to the healthy server
GIVE_UP: Final = "give up"  # the connection failed, the healthy server untried
CONNECTED_HERE: Final = "connected here"  # connected through the faulty proxy


def expected_decision(kind: str, transport: str, step: str) -> str:
    """libpq's decision (reference spec section 4.5), checked against libpq itself.

    A stall is a ``connect_timeout`` expiry: next address, so the healthy
    host.  EOF, a reset, a TLS failure with no other encryption method
    allowed (``verify-full``), a malformed message, an authentication
    failure: the whole connection fails.  One exception: libpq accepts a
    ReadyForQuery whose status byte is unknown (``PQTRANS_UNKNOWN``) and
    connects through the proxy.
    """
    if kind == "stall":
        return NEXT_HOST
    if (kind, transport, step) == ("corrupt", "tcp", "before_ready"):
        return CONNECTED_HERE
    return GIVE_UP


def pgproto_decision(kind: str, transport: str, step: str) -> str:
    """pgproto's decision: libpq's, but for the one difference README.rst lists.

    A ReadyForQuery whose status byte is not I, T or E is a protocol
    violation for pgproto: the attempt fails and no other host is tried.
    """
    if (kind, transport, step) == ("corrupt", "tcp", "before_ready"):
        return GIVE_UP
    return expected_decision(kind, transport, step)


def expected_error(kind: str, transport: str, step: str) -> tuple[type[BaseException], ...]:
    """The type of ``Attempt.error`` for the proxy attempt."""
    in_tls = transport in TLS_TRANSPORTS and step != "ssl_answer"
    if kind == "stall":
        return (pgproto.TransportError,)  # timeout expired
    if kind == "cut":
        return (pgproto.TLSError,) if in_tls else (pgproto.TransportError,)
    if kind == "reset":
        # libpq words a reset inside TLS as "server closed the connection
        # unexpectedly"; pgproto reports the TLS layer's "unexpected eof".
        return (pgproto.TLSError, pgproto.TransportError) if in_tls else (pgproto.TransportError,)
    # corrupt: one bit of the last byte of the unit
    if in_tls:
        return (pgproto.TLSError,)  # bad record MAC
    return {
        "ssl_answer": (pgproto.RemoteProtocolError,),  # S -> R: invalid response
        "auth_request": (pgproto.RemoteProtocolError,),  # mechanism list unterminated
        "scram_continue": (pgproto.ServerError,),  # i=4097: the server rejects the proof
        # the signature's base64 padding "=" becomes "<": malformed, as libpq says
        "scram_final": (pgproto.RemoteProtocolError,),
        "before_ready": (pgproto.RemoteProtocolError,),  # status I -> H
    }[step]


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def libpq() -> Iterator[LibpqWorkers]:
    """One libpq worker process, spawned without any PG* variable."""
    with pytest.MonkeyPatch.context() as patch:
        drop_pg_environment(patch)
        workers = LibpqWorkers(1)
    try:
        yield workers
    finally:
        workers.close()


Server = Cluster | PgBouncer


def _params(server: Server, transport: str, tls: TLSMaterial, **extra: str) -> dict[str, str]:
    if transport == "direct":
        extra = {"sslnegotiation": "direct", **extra}
    return connect_params(
        server,
        "tls" if transport in TLS_TRANSPORTS else "tcp",
        tls,
        user=USER,
        password=PASSWORD,
        host="127.0.0.1",
        connect_timeout=str(CONNECT_TIMEOUT),
        **extra,
    )


def _libpq_extra(dsn: str) -> str:
    """libpq isolated as pgproto is by ``ENV``: no password file, and no GSSAPI
    (the bundled libpq has it; pgproto behaves as a build without it)."""
    return f"{dsn} passfile=/nonexistent gssencmode=disable"


@pytest.fixture(scope="module")
def clean_points(
    libpq: LibpqWorkers, tls_material: TLSMaterial
) -> Callable[[Server, str], dict[str, Point]]:
    """``clean_points(server, transport)``: the points of each step, from a
    clean run of pgproto through the proxy; libpq must show the same
    handshake flights (so a point means the same step for both)."""
    cache: dict[tuple[int, str], dict[str, Point]] = {}

    def find(server: Server, transport: str) -> dict[str, Point]:
        key = (server.port, transport)
        if key not in cache:
            shapes = []
            for client in ("pgproto", "libpq"):
                with FaultProxy(server.host, server.port) as proxy:
                    dsn = make_conninfo(
                        "", **_params(server, transport, tls_material, port=str(proxy.port))
                    )
                    if client == "pgproto":
                        blocking.connect(dsn, env=ENV).close()
                    else:
                        assert libpq.outcome(_libpq_extra(dsn)).connected
                    assert proxy.wait_closed(1)
                    [session] = proxy.sessions()
                shapes.append(flight_shape(session))
                if client == "pgproto":
                    cache[key] = handshake_points(session)
            handshake = max(point.flight for point in cache[key].values()) + 1
            assert shapes[0][:handshake] == shapes[1][:handshake], shapes
        return cache[key]

    return find


def _backends(admin: pg_admin.Admin) -> int:
    row = admin.execute(
        "select count(*) from pg_stat_activity"
        " where backend_type = 'client backend' and pid <> pg_backend_pid()"
    ).fetchone()
    assert row is not None
    return int(row[0])


# --------------------------------------------------------------------------
# part 1: one fault per case


def _cases(transports: tuple[str, ...], kinds: tuple[str, ...]) -> list[Any]:
    return [
        (kind, transport, step)
        for transport in transports
        for step in STEPS[transport]
        for kind in kinds
    ]


def run_case(
    kind: str,
    transport: str,
    step: str,
    server: Server,
    points: dict[str, Point],
    libpq: LibpqWorkers,
    tls: TLSMaterial,
    admin: pg_admin.Admin | None,
) -> None:
    """One fault, every client at once; the checks of the module docstring."""
    fault = Fault(kind, points[step])  # type: ignore[arg-type]
    threads_before = set(threading.enumerate())
    backends_before = _backends(admin) if admin is not None else 0
    proxy = FaultProxy(server.host, server.port, fault)
    with assert_no_fd_leak(ignore=proxy.owned_fds):
        try:
            params = _params(server, transport, tls)
            params.update(host="127.0.0.1,127.0.0.1", port=f"{proxy.port},{server.port}")
            dsn = make_conninfo("", **params)
            jobs = [functools.partial(run_libpq, libpq, dsn)]
            jobs += [functools.partial(run_flavour, flavour, dsn) for flavour in FLAVOURS]
            results = run_parallel(jobs, workers=len(jobs))
            # every client closed its connection through the proxy (PQping adds one)
            assert proxy.wait_closed(len(results)), "a connection through the proxy stayed open"
            sessions = proxy.sessions()
        finally:
            proxy.close()
    if admin is not None:
        wait_until(lambda: _backends(admin) <= backends_before, "the backends to end")
    assert set(threading.enumerate()) <= threads_before, "a thread was left running"

    # the fault landed where meant, on every connection
    assert sessions
    assert all(s.hit is not None and s.hit.step == step for s in sessions), [
        s.hit for s in sessions
    ]
    if transport == "direct":
        # every connection, libpq's included, opened with a ClientHello: no
        # SSLRequest and no plaintext retry through the proxy
        assert all(s.client_units[0].kind == f"tls {TLS_HANDSHAKE}" for s in sessions), [
            s.client_units[:1] for s in sessions
        ]

    [oracle, *flavours] = results
    assert oracle.libpq is not None
    port_of: dict[str, int | None] = {
        NEXT_HOST: server.port,
        CONNECTED_HERE: proxy.port,
        GIVE_UP: None,
    }
    decision = expected_decision(kind, transport, step)
    want_port = port_of[decision]
    bound = CONNECT_TIMEOUT * 2 + SLACK
    # libpq is the oracle: first check that it did what the model says
    assert oracle.port == want_port, f"libpq: {oracle.describe()}"
    if decision == GIVE_UP:
        assert [(t.where, t.port) for t in oracle.libpq.tried] == [("127.0.0.1", proxy.port)]
    assert oracle.elapsed < bound
    decision = pgproto_decision(kind, transport, step)
    want_port = port_of[decision]
    for result in flavours:
        what = f"{result.client}: {result.describe()}"
        assert result.elapsed < bound, f"{what} took {result.elapsed:.1f} s"
        assert not result.leftovers, f"{what}: {result.leftovers}"
        assert result.port == want_port, what
        if decision == CONNECTED_HERE:
            continue
        # the proxy attempt: where, at which step, why
        if decision == GIVE_UP:
            assert isinstance(result.error, pgproto.ConnectError), what
            [attempt] = result.error.attempts
            # where libpq connected, PQping would say OK: so must pgproto's verdict
            want_ping = oracle.libpq.ping if oracle.port is None else pgproto.Ping.OK
            assert pgproto.ping_outcome(result.error) == want_ping, what
        else:
            [failed] = result.failed
            assert failed.next == NEXT_HOST, what
            attempt = failed.attempt
            assert "timeout expired" in str(attempt.error), what
        want_step = PGPROTO_STEP.get(step) or PGPROTO_STEP[(transport, step)]
        assert (attempt.host, attempt.address, attempt.port) == (
            "127.0.0.1",
            "127.0.0.1",
            proxy.port,
        ), what
        assert attempt.step == want_step, what
        want_encryption = "ssl" if transport in TLS_TRANSPORTS else "plaintext"
        assert attempt.encryption == want_encryption, what
        assert isinstance(attempt.error, expected_error(kind, transport, step)), (
            f"{what}: {type(attempt.error).__name__}"
        )
        described = attempt.describe()
        assert f'"127.0.0.1", port {proxy.port} failed ({want_step}' in described, described


@pytest.mark.parametrize(
    ("kind", "transport", "step"), _cases(("tls", "tcp", "direct"), FAULT_KINDS)
)
def test_fault_pg18(
    kind: str,
    transport: str,
    step: str,
    clean_points: Callable[[Server, str], dict[str, Point]],
    libpq: LibpqWorkers,
    pg18: Cluster,
    tls_material: TLSMaterial,
) -> None:
    """A fault in front of PostgreSQL 18; the server itself is the second host."""
    points = clean_points(pg18, transport)
    with pg_admin.admin_session(pg18) as admin:
        run_case(kind, transport, step, pg18, points, libpq, tls_material, admin)


@pytest.mark.parametrize(
    ("kind", "step"),
    [(kind, step) for step in ("scram_continue", "before_ready") for kind in FAULT_KINDS],
)
def test_fault_pg15(
    kind: str,
    step: str,
    clean_points: Callable[[Server, str], dict[str, Point]],
    libpq: LibpqWorkers,
    pg15: Cluster,
    tls_material: TLSMaterial,
) -> None:
    """Every kind of fault in front of PostgreSQL 15 (TLS after an SSLRequest)
    at the two late points: an older server's handshake (fewer ParameterStatus
    messages in its last flight) gets the same decisions."""
    points = clean_points(pg15, "tls")
    with pg_admin.admin_session(pg15) as admin:
        run_case(kind, "tls", step, pg15, points, libpq, tls_material, admin)


@pytest.mark.parametrize(
    ("kind", "step"),
    [
        ("stall", "scram_continue"),
        ("cut", "scram_continue"),
        ("corrupt", "scram_final"),
        ("reset", "before_ready"),
    ],
)
def test_fault_pgbouncer(
    kind: str,
    step: str,
    clean_points: Callable[[Server, str], dict[str, Point]],
    libpq: LibpqWorkers,
    pgbouncer: PgBouncer,
    tls_material: TLSMaterial,
) -> None:
    """A few faults in front of PgBouncer (plaintext SCRAM); PgBouncer itself
    is the second host.  Its pooled server connections outlive the clients,
    so the backends are not counted."""
    points = clean_points(pgbouncer, "tcp")
    run_case(kind, "tcp", step, pgbouncer, points, libpq, tls_material, None)


# --------------------------------------------------------------------------
# part 2: the server killed during a connection storm

STORM: Final = 60  # concurrent workers (asyncio, trio)
STORM_THREADS: Final = 30  # blocking threads
TRIGGER: Final = 8  # the stop is issued once this many attempts have connected
STORM_HBA: Final = [f"hostssl all {USER} 127.0.0.1/32 scram-sha-256"]
STORM_SETTINGS: Final = {"max_connections": "300"}
#: How long a storm may take: pg_ctl's own time comes on top of the attempts'.
STORM_PATIENCE: Final = CONNECT_TIMEOUT + SLACK + 30


@dataclasses.dataclass
class Storm:
    """What the attempts of one storm did.

    Each worker connects again and again (keeping every connection it makes)
    until the server has been stopped, so attempts are in flight when it
    dies; a worker stops at its first failed attempt.
    """

    workers: int
    failed: list[BaseException] = dataclasses.field(default_factory=list)  # connect raised
    held: int = 0  # connections made
    broken: list[BaseException] = dataclasses.field(default_factory=list)  # query after stop
    survived: int = 0  # connected and still answering after the stop: must stay 0
    slowest: float = 0.0

    def record_time(self, started: float) -> None:
        self.slowest = max(self.slowest, time.monotonic() - started)

    def check(self) -> None:
        print(
            f"storm of {self.workers} workers: {self.held} connected then broken, "
            f"{len(self.failed)} failed, slowest attempt {self.slowest:.2f} s; errors: "
            + ", ".join(sorted({_cause(e) for e in self.failed + self.broken}))
        )
        assert self.held >= TRIGGER
        assert len(self.broken) + self.survived == self.held
        assert self.survived == 0, "a connection outlived the server"
        assert 1 <= len(self.failed) <= self.workers
        for error in self.failed:
            assert isinstance(error, pgproto.ConnectError), repr(error)
            for attempt in error.attempts:
                assert isinstance(attempt.error, pgproto.Error), repr(attempt.error)
        for error in self.broken:
            assert isinstance(error, pgproto.Error), repr(error)
        assert self.slowest < CONNECT_TIMEOUT + SLACK, f"an attempt took {self.slowest:.1f} s"


def _cause(error: BaseException) -> str:
    if isinstance(error, pgproto.ConnectError):
        return " / ".join(f"{type(a.error).__name__}({a.step})" for a in error.attempts)
    return type(error).__name__


def stop_immediately(cluster: Cluster) -> None:
    """``pg_ctl stop -m immediate`` (``Cluster.stop()`` shuts down fast, then
    removes the cluster; it has no immediate mode)."""
    done = cluster._server_cmd(
        "pg_ctl", "stop", "-D", str(cluster.data_dir), "-m", "immediate", "-w", "-t", "30"
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def storm_cluster(
    cluster_factory: Callable[..., Cluster], tls_material: TLSMaterial
) -> Iterator[Cluster]:
    """A PostgreSQL 18 cluster of its own (TLS, SCRAM), removed after the test."""
    cluster = cluster_factory(18, tls=tls_material.server, hba=STORM_HBA, settings=STORM_SETTINGS)
    try:
        cluster.create_role(USER, PASSWORD)
        yield cluster
    finally:
        cluster.stop()


def _storm_dsn(cluster: Cluster, tls: TLSMaterial) -> str:
    return make_conninfo("", **_params(cluster, "tls", tls))


class AsyncStorm:
    """One storm under asyncio or trio: ``lib`` gives the event type and the
    hop to a worker thread (for pg_ctl, which blocks)."""

    def __init__(self, module: Any, dsn: str, cluster: Cluster, lib: Any) -> None:
        self.module, self.dsn, self.cluster, self.lib = module, dsn, cluster, lib
        self.storm = Storm(STORM)
        self.trigger, self.stopped = lib.Event(), lib.Event()

    async def worker(self) -> None:
        storm = self.storm
        held = []
        try:
            while not self.stopped.is_set():
                started = time.monotonic()
                try:
                    held.append(await self.module.connect(self.dsn, env=ENV))
                except Exception as exc:
                    storm.failed.append(exc)
                    break
                finally:
                    storm.record_time(started)
                storm.held += 1
                if storm.held == TRIGGER:
                    self.trigger.set()
            await self.stopped.wait()
            for conn in held:
                try:
                    await conn.simple_query("select 1")
                except pgproto.Error as exc:
                    storm.broken.append(exc)
                else:
                    storm.survived += 1
        finally:
            for conn in held:
                await conn.close()

    async def stopper(self) -> None:
        try:
            await self.trigger.wait()
            await self.lib.to_thread(stop_immediately, self.cluster)
        finally:
            self.stopped.set()


def test_storm_asyncio(storm_cluster: Cluster, tls_material: TLSMaterial) -> None:
    """asyncio: every attempt ends, typed, in time; no task, no descriptor left."""
    dsn = _storm_dsn(storm_cluster, tls_material)

    async def main() -> Storm:
        run = AsyncStorm(asyncio_adapter, dsn, storm_cluster, _AsyncioLib)
        before = len(asyncio.all_tasks())
        async with asyncio.timeout(STORM_PATIENCE):
            await asyncio.gather(run.stopper(), *(run.worker() for _ in range(STORM)))
        assert len(asyncio.all_tasks()) == before
        return run.storm

    with assert_no_fd_leak():
        storm = asyncio.run(main())
    storm.check()


def test_storm_trio(storm_cluster: Cluster, tls_material: TLSMaterial) -> None:
    """trio: the same."""
    dsn = _storm_dsn(storm_cluster, tls_material)

    async def main() -> Storm:
        run = AsyncStorm(trio_adapter, dsn, storm_cluster, _TrioLib)
        before = _trio_tasks()
        with trio.fail_after(STORM_PATIENCE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run.stopper)
                for _ in range(STORM):
                    nursery.start_soon(run.worker)
        assert _trio_tasks() == before
        return run.storm

    with assert_no_fd_leak():
        storm = trio.run(main)
    storm.check()


def test_storm_blocking(storm_cluster: Cluster, tls_material: TLSMaterial) -> None:
    """Blocking threads: the same; every thread ends."""
    dsn = _storm_dsn(storm_cluster, tls_material)
    storm = Storm(STORM_THREADS)
    lock = threading.Lock()
    trigger, stopped = threading.Event(), threading.Event()

    def worker() -> None:
        held = []
        try:
            while not stopped.is_set():
                started = time.monotonic()
                try:
                    held.append(blocking.connect(dsn, env=ENV))
                except Exception as exc:
                    with lock:
                        storm.failed.append(exc)
                    break
                finally:
                    with lock:
                        storm.record_time(started)
                with lock:
                    storm.held += 1
                    if storm.held == TRIGGER:
                        trigger.set()
            stopped.wait(STORM_PATIENCE)
            for conn in held:
                try:
                    conn.simple_query("select 1")
                except pgproto.Error as exc:
                    with lock:
                        storm.broken.append(exc)
                else:
                    with lock:
                        storm.survived += 1
        finally:
            for conn in held:
                conn.close()

    threads_before = set(threading.enumerate())
    with assert_no_fd_leak():
        threads = [threading.Thread(target=worker) for _ in range(STORM_THREADS)]
        for thread in threads:
            thread.start()
        try:
            assert trigger.wait(STORM_PATIENCE), "too few attempts connected"
            stop_immediately(storm_cluster)
        finally:
            stopped.set()
            for thread in threads:
                thread.join(STORM_PATIENCE)
    assert set(threading.enumerate()) <= threads_before, "an attempt did not end"
    storm.check()


class _AsyncioLib:
    Event = asyncio.Event

    @staticmethod
    async def to_thread(fn: Callable[..., None], *args: Any) -> None:
        await asyncio.to_thread(fn, *args)


class _TrioLib:
    Event = trio.Event

    @staticmethod
    async def to_thread(fn: Callable[..., None], *args: Any) -> None:
        await trio.to_thread.run_sync(fn, *args)
