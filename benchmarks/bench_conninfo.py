"""Connection-string parse rates: pgproto against libpq (through psycopg).

Run from the repository root::

    python benchmarks/bench_conninfo.py [--repeat N] [--min-time SECONDS]

For each of a set of realistic connection strings it times, in one process,

* ``pgproto.parse_conninfo(s)``,
* ``psycopg.conninfo.conninfo_to_dict(s)`` (libpq's ``PQconninfoParse`` plus
  psycopg's conversion of the result to a dict) -- the baseline of the ratio,
* ``psycopg.pq.Conninfo.parse(s.encode())`` ("PQparse": libpq's call and
  psycopg's wrapping of its option array, without the dict), and
* ``pgproto.resolve_params(s, env=...)``, twice: "resolve" empties pgproto's
  cache of resolved parameters before each call (the work of a first
  connection), "cached" does not (a repeated connection string),

and prints microseconds per call (best of ``--repeat`` runs, timeit-style, each
run long enough to last ``--min-time``) and the ratio pgproto/psycopg.  The
exit status is 1 if pgproto and libpq disagree on a string or resolve_params
fails on one (the timings would then mean nothing).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable
from typing import Final

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import Conninfo

import pgproto
from pgproto import _params

CONNINFOS: Final[list[tuple[str, str]]] = [
    ("kv short", "host=localhost dbname=app"),
    (
        "kv typical",
        "host=db.internal port=5432 dbname=orders user=orders_rw "
        "sslmode=verify-full connect_timeout=10",
    ),
    (
        "kv long, quoted",
        "host='db1.example.com,db2.example.com' port='5432,5433' dbname='my db' "
        "user=app password='p@ss w\\'ord' application_name='billing worker' "
        "options='-c statement_timeout=5000 -c search_path=app,public' "
        "sslmode=verify-full sslrootcert='/etc/ssl/certs/root ca.pem' "
        "target_session_attrs=read-write keepalives=1 keepalives_idle=30",
    ),
    ("kv unix socket", "host=/var/run/postgresql dbname=postgres"),
    ("uri short", "postgresql://localhost/app"),
    ("uri user+password", "postgresql://app_user:s3cr3t%21@db.example.com:5432/app"),
    (
        "uri multi-host",
        "postgresql://app:pw@db1.example.com:5432,db2.example.com:5433,db3.example.com"
        "/app?target_session_attrs=read-write&load_balance_hosts=random",
    ),
    (
        "uri query params",
        "postgres://user:pass@host:5432/db?sslmode=verify-full"
        "&sslrootcert=%2Fetc%2Fssl%2Froot.pem&application_name=my%20app"
        "&connect_timeout=10&options=-c%20geqo%3Doff",
    ),
    ("uri ipv6", "postgresql://[2001:db8::1]:5432,[::1]/db?ssl=true"),
    ("uri socket in query", "postgresql:///app?host=%2Fvar%2Frun%2Fpostgresql&port=5433"),
]

ENV: Final[dict[str, str]] = {"PGAPPNAME": "bench", "PGCONNECT_TIMEOUT": "10"}


def _time_calls(fn: Callable[[str], object], arg: str, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn(arg)
    return time.perf_counter() - start


def seconds_per_call(
    fn: Callable[[str], object], arg: str, *, repeat: int, min_time: float
) -> float:
    """Best-of-*repeat* time of one call, as ``timeit.Timer.autorange`` sizes runs."""
    number = 1
    while True:
        elapsed = _time_calls(fn, arg, number)
        if elapsed >= min_time:
            break
        # Grow towards min_time quickly but without overshooting wildly.
        factor = min(10.0, max(2.0, 1.2 * min_time / max(elapsed, 1e-9)))
        number = math.ceil(number * factor)
    best = elapsed
    for _ in range(repeat - 1):
        best = min(best, _time_calls(fn, arg, number))
    return best / number


def _resolver(*, cached: bool) -> Callable[[str], object]:
    """resolve_params in a fixed, file-free environment (no home, no
    password file); without *cached*, its cache is emptied before each call."""
    env = pgproto.Environment(environ=ENV, home=None, user="bench")
    resolve, cache = pgproto.resolve_params, _params._RESOLVED

    if cached:

        def call(conninfo: str) -> object:
            return resolve(conninfo, env=env)

    else:

        def call(conninfo: str) -> object:
            cache.clear()
            return resolve(conninfo, env=env)

    return call


def _libpq_parse(conninfo: str) -> object:
    """libpq's PQconninfoParse alone (encoding included, no dict building)."""
    return Conninfo.parse(conninfo.encode())


def _check(name: str, conninfo: str) -> str | None:
    """Both parsers must accept the string and agree, or the timing is
    meaningless: the disagreement, if any."""
    mine = pgproto.parse_conninfo(conninfo)
    theirs = conninfo_to_dict(conninfo)
    if mine != theirs:
        return f"warning: {name}: results differ: {mine!r} != {theirs!r}"
    return None


def _fmt_us(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e6:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=7, help="runs per measurement (best kept)")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per run, at least")
    args = parser.parse_args(argv)
    repeat: int = args.repeat
    min_time: float = args.min_time

    resolvers = {"resolve": _resolver(cached=False), "cached": _resolver(cached=True)}
    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"pgproto {pgproto.__version__}, psycopg {psycopg.__version__} "
        f"(libpq {psycopg.pq.version()}, {psycopg.pq.__impl__}); "
        f"best of {repeat}, runs of >= {min_time * 1e3:.0f} ms"
    )
    header = f"{'connection string':<22} {'pgproto µs':>11} {'psycopg µs':>11} {'ratio':>7}"
    header += f" {'PQparse µs':>11}" + "".join(f" {name + ' µs':>11}" for name in resolvers)
    print(header)
    print("-" * len(header))

    ratios: list[float] = []
    failures: list[str] = []
    total_mine = total_theirs = total_raw = 0.0
    totals: dict[str, float | None] = dict.fromkeys(resolvers, 0.0)
    for name, conninfo in CONNINFOS:
        disagreement = _check(name, conninfo)
        if disagreement is not None:
            print(disagreement)
            failures.append(disagreement)
        mine = seconds_per_call(pgproto.parse_conninfo, conninfo, repeat=repeat, min_time=min_time)
        theirs = seconds_per_call(conninfo_to_dict, conninfo, repeat=repeat, min_time=min_time)
        raw = seconds_per_call(_libpq_parse, conninfo, repeat=repeat, min_time=min_time)
        resolved: dict[str, float | None] = {}
        for kind, resolve in resolvers.items():
            try:
                resolved[kind] = seconds_per_call(
                    resolve, conninfo, repeat=repeat, min_time=min_time
                )
            except Exception as exc:  # report, keep benchmarking the rest
                resolved[kind] = None
                failures.append(f"resolve_params failed on {name!r}: {exc!r}")
            total, this = totals[kind], resolved[kind]
            totals[kind] = None if total is None or this is None else total + this
        ratios.append(mine / theirs)
        total_mine += mine
        total_theirs += theirs
        total_raw += raw
        print(
            f"{name:<22} {_fmt_us(mine):>11} {_fmt_us(theirs):>11} {mine / theirs:>7.2f}"
            f" {_fmt_us(raw):>11}" + "".join(f" {_fmt_us(v):>11}" for v in resolved.values())
        )

    print("-" * len(header))
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(
        f"{'all (sum of one each)':<22} {_fmt_us(total_mine):>11} {_fmt_us(total_theirs):>11}"
        f" {total_mine / total_theirs:>7.2f} {_fmt_us(total_raw):>11}"
        + "".join(f" {_fmt_us(v):>11}" for v in totals.values())
    )
    print(f"geometric mean of ratios pgproto/psycopg: {geomean:.2f}")
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
