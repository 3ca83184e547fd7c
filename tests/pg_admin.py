"""The "other session" of the real-server tests, and polling with a deadline.

A test that watches a server (pg_stat_activity), terminates a backend or
sends NOTIFY does it from :func:`admin_session`: a superuser psycopg
connection over the Unix socket in autocommit mode, so that every query sees
fresh statistics.

No fixed sleeps: :func:`wait_until` (plain threads) and :func:`until` (any
event loop: anyio's sleep works under asyncio, trio and anyio) poll a check
until it holds and fail after a deadline.  The poll period and the patience
are the caller's, so that each test module keeps its own timing::

    wait_until = functools.partial(pg_admin.wait_until, patience=PATIENCE, period=0.005)

Imported by the tests as the top-level module ``pg_admin``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import anyio
import psycopg
from pgproto_adapters._cluster import Cluster
from psycopg.sql import SQL, Identifier

__all__ = [
    "SLEEP_SQL",
    "Admin",
    "activity",
    "admin_session",
    "gone",
    "running",
    "until",
    "wait_until",
]

#: The query a test cancels or interrupts: it runs for long after any bound.
SLEEP_SQL: Final = "select pg_sleep(30)"

Admin = psycopg.Connection[tuple[Any, ...]]


@contextlib.contextmanager
def admin_session(server: Cluster) -> Iterator[Admin]:
    """A superuser session (psycopg, Unix socket, autocommit) on *server*."""
    conn = psycopg.connect(
        host=str(server.socket_dir),
        port=server.port,
        user="postgres",
        dbname="postgres",
        autocommit=True,
    )
    with conn:
        yield conn


def activity(
    admin: Admin, pid: int | None, columns: Sequence[str] = ("state", "query")
) -> tuple[Any, ...] | None:
    """The *columns* of backend *pid*'s row in pg_stat_activity (by default
    ``(state, query)``), None if it is gone."""
    query = SQL("select {} from pg_stat_activity where pid = %s").format(
        SQL(", ").join(Identifier(column) for column in columns)
    )
    return admin.execute(query, (pid,)).fetchone()


def gone(admin: Admin, pid: int | None) -> bool:
    """Backend *pid* has left pg_stat_activity."""
    return activity(admin, pid) is None


def running(admin: Admin, pid: int | None, sql: str = SLEEP_SQL) -> bool:
    """Backend *pid* is active, running *sql*."""
    return activity(admin, pid) == ("active", sql)


def wait_until(check: Callable[[], bool], what: str, *, patience: float, period: float) -> None:
    """Poll *check* every *period* seconds until it holds; fail after *patience*."""
    deadline = time.monotonic() + patience
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(period)


async def until(check: Callable[[], bool], what: str, *, patience: float, period: float) -> None:
    """:func:`wait_until` in any event loop (anyio's sleep works in all)."""
    deadline = time.monotonic() + patience
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(period)
