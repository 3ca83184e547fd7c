"""Load (issue 6, point 4): 1,000 sequential and 200 concurrent connections
with SCRAM-SHA-256 over TLS (``sslmode=verify-full``), straight to
PostgreSQL 18 and through PgBouncer, with the blocking, asyncio and trio
adapters.  Every connection succeeds, and afterwards

* the process's open file descriptors are the set it had before the run
  (checked before any garbage collection, so a socket kept alive by a
  reference cycle counts as a leak);
* the memory traced by :mod:`tracemalloc` (after ``gc.collect()``) is back
  within :data:`MEMORY_TOLERANCE` of where it was, while the run itself
  allocates far more (the peak is in the failure message, as is the RSS
  before and after, which is reported, not asserted: the allocator keeps
  freed pages);
* no session of the load role is left on the server (pg_stat_activity,
  polled with a deadline).

The servers are this module's own (a PostgreSQL 18 cluster with
``max_connections = 300`` and a PgBouncer with a pool of 250 in front of
it), so the session fixtures are not disturbed, and they stop when the
module ends.  :func:`test_footprint_catches_retained_connections` shows that
the checks fail on a planted leak.

PgBouncer in session mode: PgBouncer itself authenticates a client (SCRAM
against the verifier in its auth_file, then it logs in to PostgreSQL with
the client's proof); the login may wait for a server connection (PgBouncer
needs the server's startup parameters, cached per pool), and the first
query takes one, which the client keeps until it disconnects.  A client
that finds the pool full waits (``cl_waiting``, up to
``query_wait_timeout``, 120 s): with the default pool of 20, the concurrent
runs below -- where every client holds its connection until all 200 are
up -- would stall.  So ``default_pool_size = 250`` (no per-database or
per-user cap), ``max_client_conn = 500``, and ``listen_backlog = 512`` so
that 200 simultaneous SYNs are not dropped (PgBouncer's default backlog is
128; PostgreSQL's is twice ``max_connections``).  The concurrent tests
check at their peak that the server has one session per client.  Idle
server connections are closed after ``server_idle_timeout = 1`` s, which
is how the role's session count returns to 0 after a run through PgBouncer.

Descriptors: at the peak this process holds 200 sockets and PgBouncer
about 400; the fixture fails (it does not skip) if ``ulimit -n`` is too low
for that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import resource
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

import pg_admin
import pytest
import trio
from fake_server import ENV
from fdcheck import describe_fds, open_fds
from pgproto_adapters import asyncio as aio_adapter
from pgproto_adapters import blocking
from pgproto_adapters import trio as trio_adapter
from pgproto_adapters._cluster import Cluster, PgBouncer, find_binaries
from servers import TLSMaterial, connect_params

LOAD_USER: Final = "load_user"
#: A distinctive password: it must never show up in any message.
LOAD_PASSWORD: Final = "L0ad-Storm-5e1a-NEVER-SHOW-ME"

SEQUENTIAL: Final = 1000
CONCURRENT: Final = 200

#: How far the traced memory may stay above its starting level after a run:
#: 256 KiB, i.e. 262 bytes per connection of a sequential run and 1.3 KiB
#: per connection of a concurrent one.
MEMORY_TOLERANCE: Final = 256 * 1024

#: A generous bound on one async run (they take 1-25 s here): it fails a hang,
#: not a slow machine.
RUN_TIMEOUT: Final = 120.0
#: Patience for the server to drop the role's sessions (PgBouncer closes
#: its idle server connections after 1 s; its janitor runs every second).
PATIENCE: Final = 30.0

wait_until = pg_admin.wait_until

#: Timings of the runs, printed when the module's servers stop (pytest -s).
TIMINGS: dict[str, float] = {}
#: The footprint of each run that passed its check, printed likewise.
FOOTPRINTS: list[str] = []


# --------------------------------------------------------------------------
# The footprint of this process, and the check that it returned


def rss_kib() -> int:
    """This process's resident set size (``VmRSS``), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Open descriptors, traced memory and RSS at one moment."""

    fds: frozenset[int]
    traced: int
    rss_kib: int

    @classmethod
    def take(cls) -> Footprint:
        """Descriptors first (before collecting: a socket that only a
        reference cycle keeps open is a leak), then memory after a full
        collection.  Resets tracemalloc's peak, so that :meth:`check` can
        say how much the run allocated at most."""
        fds = frozenset(open_fds())
        gc.collect()
        traced, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        return cls(fds, traced, rss_kib())

    def check(self, label: str, *, tolerance: int = MEMORY_TOLERANCE) -> int:
        """Fail unless descriptors and traced memory are back where they
        were; return the run's traced peak above the starting level."""
        _, peak = tracemalloc.get_traced_memory()
        after = Footprint.take()
        grew = after.traced - self.traced
        report = (
            f"{label}: traced memory {self.traced} -> {after.traced} bytes "
            f"({grew:+d}, tolerance {tolerance}; the run peaked at {peak - self.traced:+d}); "
            f"RSS {self.rss_kib} -> {after.rss_kib} KiB"
        )
        problems = []
        leaked = after.fds - self.fds
        if leaked:
            problems.append(f"{len(leaked)} file descriptor(s) leaked:\n{describe_fds(leaked)}")
        if grew > tolerance:
            problems.append("memory did not return to its starting level")
        if problems:
            raise AssertionError("\n".join([report, *problems]))
        FOOTPRINTS.append(report)
        return peak - self.traced


def role_backends(admin: pg_admin.Admin) -> int:
    """Sessions of the load role on the server (any state)."""
    row = admin.execute(
        "select count(*) from pg_stat_activity where usename = %s", (LOAD_USER,)
    ).fetchone()
    assert row is not None
    count: int = row[0]
    return count


def wait_no_backends(admin: pg_admin.Admin, *, patience: float = PATIENCE) -> None:
    wait_until(
        lambda: role_backends(admin) == 0,
        f"no session of {LOAD_USER} on the server",
        patience=patience,
        period=0.05,
    )


# --------------------------------------------------------------------------
# The servers


@dataclasses.dataclass
class LoadBed:
    cluster: Cluster
    bouncer: PgBouncer
    admin: pg_admin.Admin
    #: libpq keywords per target ("direct", "pgbouncer").
    params: dict[str, dict[str, Any]]
    #: Whether SCRAM-SHA-256-PLUS is used on each target.
    channel_binding: dict[str, bool]


TARGETS: Final = ("direct", "pgbouncer")


def _hba() -> list[str]:
    # hostssl: only TLS reaches the role; local: PgBouncer's server connections.
    return [
        f"hostssl all {LOAD_USER} all scram-sha-256",
        f"local all {LOAD_USER} scram-sha-256",
    ]


def _check_connection(conn: Any, channel_binding: bool) -> None:
    # Proof of the exchange: require_auth=scram-sha-256 already refuses
    # anything else; channel_binding=require where the server offers -PLUS.
    assert conn.auth_method == ("SCRAM-SHA-256-PLUS" if channel_binding else "SCRAM-SHA-256")
    assert conn.channel_binding_used is channel_binding


@pytest.fixture(scope="module")
def bed(tls_material: TLSMaterial) -> Iterator[LoadBed]:
    """The servers, the admin session and a warm-up of every adapter on
    every target (caches filled: SCRAM keys, TLS contexts, imports)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * CONCURRENT + 128  # PgBouncer inherits this limit: clients + servers
    if soft != resource.RLIM_INFINITY and soft < needed:
        pytest.fail(f"ulimit -n is {soft}; the load tests need at least {needed}")
    started_tracing = not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    try:
        yield from _servers(tls_material)
    finally:
        if started_tracing:
            tracemalloc.stop()
    if TIMINGS:
        width = max(map(len, TIMINGS))
        lines = [f"  {name:<{width}}  {seconds:6.2f} s" for name, seconds in TIMINGS.items()]
        sys.stderr.write("\ntest_load timings:\n" + "\n".join(lines) + "\n")
    if FOOTPRINTS:
        sys.stderr.write("test_load footprints:\n  " + "\n  ".join(FOOTPRINTS) + "\n")


def _servers(tls_material: TLSMaterial) -> Iterator[LoadBed]:
    cluster = Cluster(
        find_binaries(18, fetch=True),
        hba=_hba(),
        tls=tls_material.server,
        settings={"max_connections": "300", "log_connections": "off"},
    )
    with cluster:
        cluster.create_role(LOAD_USER, LOAD_PASSWORD)
        verifier = cluster.password_hash(LOAD_USER)
        assert verifier is not None
        bouncer = PgBouncer(
            cluster,
            auth_file={LOAD_USER: verifier},
            tls=tls_material.server,
            settings={
                "max_client_conn": "500",
                "default_pool_size": "250",
                "max_db_connections": "0",
                "max_user_connections": "0",
                "server_idle_timeout": "1",
                "listen_backlog": "512",
            },
        )
        with bouncer, pg_admin.admin_session(cluster) as admin:
            common = {
                "user": LOAD_USER,
                "password": LOAD_PASSWORD,
                "require_auth": "scram-sha-256",
            }
            params: dict[str, dict[str, Any]] = {
                # PostgreSQL offers SCRAM-SHA-256-PLUS over TLS: binding is required.
                "direct": connect_params(
                    cluster, "tls", tls_material, **common, channel_binding="require"
                ),
                "pgbouncer": connect_params(bouncer, "tls", tls_material, **common),
            }
            load = LoadBed(cluster, bouncer, admin, params, {"direct": True})
            # PgBouncer 1.18 offers only SCRAM-SHA-256 to its clients; should
            # a version offer -PLUS, the load runs require it.
            with blocking.connect(env=ENV, **params["pgbouncer"], channel_binding="prefer") as conn:
                plus = load.channel_binding["pgbouncer"] = conn.channel_binding_used
            params["pgbouncer"]["channel_binding"] = "require" if plus else "prefer"
            _warm_up(load)
            yield load


def _warm_up(load: LoadBed) -> None:
    for target in TARGETS:
        for sequential in SEQUENTIAL_RUNS.values():
            sequential(load, target, 2)
        for concurrent in CONCURRENT_RUNS.values():
            concurrent(load, target, 2, None)
    wait_no_backends(load.admin)


# --------------------------------------------------------------------------
# The runs


def run_blocking_sequential(
    load: LoadBed, target: str, count: int, *, keep: list[blocking.Connection] | None = None
) -> None:
    """*count* times: connect, ``select 1``, close (or append to *keep*)."""
    params, binding = load.params[target], load.channel_binding[target]
    for _ in range(count):
        conn = blocking.connect(env=ENV, **params)
        if keep is not None:
            keep.append(conn)
        try:
            _check_connection(conn, binding)
            assert conn.simple_query("select 1")[-1].rows == [("1",)]
        finally:
            if keep is None:
                conn.close()


async def asyncio_sequential(load: LoadBed, target: str, count: int) -> None:
    params, binding = load.params[target], load.channel_binding[target]
    async with asyncio.timeout(RUN_TIMEOUT):
        for _ in range(count):
            conn = await aio_adapter.connect(env=ENV, **params)
            try:
                _check_connection(conn, binding)
                assert (await conn.simple_query("select 1"))[-1].rows == [("1",)]
            finally:
                await conn.close()


PeakCheck = Callable[[], None] | None


class _Barrier:
    """Counts the connections that are up; the last one runs *at_peak*
    (all *count* are open then) and releases everybody."""

    def __init__(self, count: int, at_peak: PeakCheck, event: Any) -> None:
        self.count, self.at_peak, self.event = count, at_peak, event
        self.up = 0

    def arrive(self) -> None:
        self.up += 1
        if self.up == self.count:
            if self.at_peak is not None:
                self.at_peak()
            self.event.set()


async def _hold(
    connect: Callable[..., Awaitable[Any]], load: LoadBed, target: str, barrier: _Barrier
) -> None:
    conn = await connect(env=ENV, **load.params[target])
    try:
        _check_connection(conn, load.channel_binding[target])
        assert (await conn.simple_query("select 1"))[-1].rows == [("1",)]
        barrier.arrive()
        await barrier.event.wait()
    finally:
        await conn.close()


async def asyncio_concurrent(load: LoadBed, target: str, count: int, at_peak: PeakCheck) -> None:
    """*count* tasks connect at once, each runs ``select 1``, all wait until
    every one is up, then all close."""
    barrier = _Barrier(count, at_peak, asyncio.Event())
    async with asyncio.timeout(RUN_TIMEOUT), asyncio.TaskGroup() as group:
        for _ in range(count):
            group.create_task(_hold(aio_adapter.connect, load, target, barrier))


async def trio_concurrent(load: LoadBed, target: str, count: int, at_peak: PeakCheck) -> None:
    """:func:`asyncio_concurrent` in a trio nursery."""
    barrier = _Barrier(count, at_peak, trio.Event())
    with trio.fail_after(RUN_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(_hold, trio_adapter.connect, load, target, barrier)


#: The sequential runs per adapter: (load, target, count).
SEQUENTIAL_RUNS: Final[dict[str, Callable[[LoadBed, str, int], None]]] = {
    "blocking": run_blocking_sequential,
    "asyncio": lambda load, target, count: asyncio.run(asyncio_sequential(load, target, count)),
}
#: The concurrent runs per adapter: (load, target, count, at_peak).
CONCURRENT_RUNS: Final[dict[str, Callable[[LoadBed, str, int, PeakCheck], None]]] = {
    "asyncio": lambda load, target, count, at_peak: asyncio.run(
        asyncio_concurrent(load, target, count, at_peak)
    ),
    "trio": lambda load, target, count, at_peak: trio.run(
        trio_concurrent, load, target, count, at_peak
    ),
}


def _peak_check(load: LoadBed, count: int) -> Callable[[], None]:
    """At the peak, the server has a session of the role per client (also
    through PgBouncer, whose pool is big enough for all of them)."""

    def check() -> None:
        assert role_backends(load.admin) == count

    return check


def measured_run(load: LoadBed, what: str, target: str, run: Callable[[], object]) -> int:
    """*run* (*what*: "blocking 1000 sequential", ...), timed, between two
    footprints that must match, then no session left: the run's traced peak."""
    before = Footprint.take()
    start = time.perf_counter()
    run()
    TIMINGS[f"{what} {target}"] = time.perf_counter() - start
    peak = before.check(f"{what} connections, {target}")
    wait_no_backends(load.admin)
    return peak


# --------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("adapter", SEQUENTIAL_RUNS)
def test_sequential(bed: LoadBed, adapter: str, target: str) -> None:
    measured_run(
        bed,
        f"{adapter} {SEQUENTIAL} sequential",
        target,
        lambda: SEQUENTIAL_RUNS[adapter](bed, target, SEQUENTIAL),
    )


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("adapter", CONCURRENT_RUNS)
def test_concurrent(bed: LoadBed, adapter: str, target: str) -> None:
    at_peak = _peak_check(bed, CONCURRENT)
    peak = measured_run(
        bed,
        f"{adapter} {CONCURRENT} concurrent",
        target,
        lambda: CONCURRENT_RUNS[adapter](bed, target, CONCURRENT, at_peak),
    )
    assert peak > 4 * MEMORY_TOLERANCE  # the tolerance is small next to the run


# --------------------------------------------------------------------------
# The checks can fail


def test_footprint_catches_retained_connections(bed: LoadBed) -> None:
    """Connections kept in a list -- closed: only memory grows; open: their
    sockets leak and their sessions stay on the server."""
    kept: list[blocking.Connection] = []
    before = Footprint.take()
    run_blocking_sequential(bed, "direct", 100, keep=kept)
    try:
        for conn in kept[50:]:
            conn.close()
        with pytest.raises(AssertionError) as caught:
            before.check("planted leak")
        message = str(caught.value)
        assert "50 file descriptor(s) leaked" in message
        assert "memory did not return to its starting level" in message
        shows_password = LOAD_PASSWORD in message  # a bool: pytest would print the text
        assert not shows_password
        with pytest.raises(AssertionError, match="timed out waiting for no session"):
            wait_no_backends(bed.admin, patience=0.5)
        assert role_backends(bed.admin) == 50

        for conn in kept[:50]:
            conn.close()
        with pytest.raises(AssertionError, match="memory did not return") as caught:
            before.check("planted leak, closed")
        assert "leaked" not in str(caught.value)  # the descriptors are back
        # A closed connection that stays referenced keeps about 8.5 KiB: had
        # each of a sequential run's connections leaked even a tenth of that,
        # the tolerance would be exceeded more than twice over.
        retained = (Footprint.take().traced - before.traced) / len(kept)
        assert retained * SEQUENTIAL / 10 > 2 * MEMORY_TOLERANCE, retained
    finally:
        for conn in kept:
            conn.close()
        kept.clear()
    wait_no_backends(bed.admin)
    before.check("planted leak, released")
