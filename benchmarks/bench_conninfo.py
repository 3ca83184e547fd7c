"""Connection-string parse rates: pgproto against libpq (through psycopg).

Run from the repository root::

    python benchmarks/bench_conninfo.py [--repeat N] [--min-time SECONDS]

For each of a set of realistic connection strings it times, in one process,

* ``pgproto.parse_conninfo(s)``,
* ``psycopg.conninfo.conninfo_to_dict(s)`` (libpq's ``PQconninfoParse`` plus
  psycopg's conversion of the result to a dict) -- the baseline of the ratio,
* ``psycopg.pq.Conninfo.parse(s.encode())`` ("PQparse": libpq's call and
  psycopg's wrapping of its option array, without the dict), and
* ``pgproto.resolve_params(s, env=...)`` when pgproto has it (else "n/a"),

and prints microseconds per call (best of ``--repeat`` runs, timeit-style, each
run long enough to last ``--min-time``) and the ratio pgproto/psycopg.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import Conninfo

import pgproto

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


def _environment() -> object:
    """A fixed, file-free environment for resolve_params (no home, no passfile)."""
    env_class: Any = getattr(pgproto, "Environment", None)
    if env_class is None:
        return ENV
    try:
        return env_class(environ=ENV, home=None, user="bench")
    except TypeError:
        return env_class.from_os(ENV)


def _resolver() -> Callable[[str], object] | None:
    resolve: Any = getattr(pgproto, "resolve_params", None)
    if resolve is None:
        return None
    env = _environment()

    def call(conninfo: str) -> object:
        return resolve(conninfo, env=env)

    return call


def _libpq_parse(conninfo: str) -> object:
    """libpq's PQconninfoParse alone (encoding included, no dict building)."""
    return Conninfo.parse(conninfo.encode())


def _check(name: str, conninfo: str) -> None:
    """Both parsers must accept the string and agree, or the timing is meaningless."""
    mine = pgproto.parse_conninfo(conninfo)
    theirs = conninfo_to_dict(conninfo)
    if mine != theirs:
        print(f"warning: {name}: results differ: {mine!r} != {theirs!r}")


def _fmt_us(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e6:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=7, help="runs per measurement (best kept)")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per run, at least")
    args = parser.parse_args(argv)
    repeat: int = args.repeat
    min_time: float = args.min_time

    resolve = _resolver()
    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"pgproto {pgproto.__version__}, psycopg {psycopg.__version__} "
        f"(libpq {psycopg.pq.version()}, {psycopg.pq.__impl__}); "
        f"best of {repeat}, runs of >= {min_time * 1e3:.0f} ms"
    )
    header = f"{'connection string':<22} {'pgproto µs':>11} {'psycopg µs':>11} {'ratio':>7}"
    header += f" {'PQparse µs':>11} {'resolve µs':>11}"
    print(header)
    print("-" * len(header))

    ratios: list[float] = []
    failures: list[str] = []
    total_mine = total_theirs = total_raw = 0.0
    total_resolve: float | None = 0.0 if resolve is not None else None
    for name, conninfo in CONNINFOS:
        _check(name, conninfo)
        mine = seconds_per_call(pgproto.parse_conninfo, conninfo, repeat=repeat, min_time=min_time)
        theirs = seconds_per_call(conninfo_to_dict, conninfo, repeat=repeat, min_time=min_time)
        raw = seconds_per_call(_libpq_parse, conninfo, repeat=repeat, min_time=min_time)
        resolved: float | None = None
        if resolve is not None:
            try:
                resolved = seconds_per_call(resolve, conninfo, repeat=repeat, min_time=min_time)
            except Exception as exc:  # report, keep benchmarking the rest
                failures.append(f"resolve_params failed on {name!r}: {exc!r}")
        ratios.append(mine / theirs)
        total_mine += mine
        total_theirs += theirs
        total_raw += raw
        if total_resolve is not None:
            total_resolve = None if resolved is None else total_resolve + resolved
        print(
            f"{name:<22} {_fmt_us(mine):>11} {_fmt_us(theirs):>11} {mine / theirs:>7.2f}"
            f" {_fmt_us(raw):>11} {_fmt_us(resolved):>11}"
        )

    print("-" * len(header))
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(
        f"{'all (sum of one each)':<22} {_fmt_us(total_mine):>11} {_fmt_us(total_theirs):>11}"
        f" {total_mine / total_theirs:>7.2f} {_fmt_us(total_raw):>11}"
        f" {_fmt_us(total_resolve):>11}"
    )
    print(f"geometric mean of ratios pgproto/psycopg: {geomean:.2f}")
    for failure in failures:
        print(failure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
