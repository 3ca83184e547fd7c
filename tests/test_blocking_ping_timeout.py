"""The blocking adapter's ping, overall timeout and bounded name lookup,
against real servers; the same cases as the async adapters
(``test_async_ping_reset``), with libpq's PQping as the oracle."""

from __future__ import annotations

import threading
import time

import pytest
from libpq_oracle import ping as libpq_ping
from pgproto_adapters import blocking
from pgproto_adapters._cluster import Cluster
from servers import SilentListener, TLSMaterial, multi_host_conninfo
from test_async_ping_reset import (  # the shared cases and fixtures
    OVERALL,
    SLACK,
    SLOW_HOST,
    FdCount,
    _ping_cases,
    nopass,
    slow_resolver,
)

from pgproto import ConnectError, Ping

__all__ = ["nopass", "slow_resolver"]  # fixtures, re-exported for pytest


def test_ping_matches_libpq(
    pg18: Cluster,
    pg18_notls: Cluster,
    tls_material: TLSMaterial,
    closed_port: int,
    nopass: str,
) -> None:
    cases = _ping_cases(pg18, pg18_notls, tls_material, closed_port, nopass)
    ours = {}
    for name, (conninfo, _) in cases.items():
        count = FdCount()
        ours[name] = blocking.ping(conninfo)
        count.check()
    libpq = {name: Ping(libpq_ping(conninfo)) for name, (conninfo, _) in cases.items()}
    expected = {name: outcome for name, (_, outcome) in cases.items()}
    assert ours == expected
    assert libpq == expected
    assert blocking.ping("sslmode=bogus") is Ping.NO_ATTEMPT


def test_overall_timeout(silent_listener: SilentListener, nopass: str) -> None:
    conninfo = multi_host_conninfo(
        (silent_listener.host, silent_listener.port),
        (silent_listener.host, silent_listener.port),
        connect_timeout=30,
        passfile=nopass,
    )
    count = FdCount(silent_listener)
    started = time.monotonic()
    with pytest.raises(ConnectError) as failure:
        blocking.connect(conninfo, timeout=1)
    elapsed = time.monotonic() - started
    count.check()
    assert 0.9 <= elapsed < SLACK
    (attempt,) = failure.value.attempts  # the second host is never tried
    assert str(attempt.error) == OVERALL
    assert blocking.ping(conninfo, timeout=1) is Ping.NO_RESPONSE


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), True, "1"])
def test_timeout_must_be_a_positive_number(timeout: object) -> None:
    with pytest.raises(ValueError, match="timeout must be a positive finite number"):
        blocking.connect("host=/nonexistent", timeout=timeout)  # type: ignore[arg-type]


def test_connect_timeout_bounds_a_stalled_name_lookup(
    pg18: Cluster, slow_resolver: threading.Event, nopass: str
) -> None:
    conninfo = multi_host_conninfo(
        (SLOW_HOST, pg18.port), (pg18.host, pg18.port), connect_timeout=2, passfile=nopass
    )
    started = time.monotonic()
    with blocking.connect(conninfo, user="trust_user") as conn:
        assert conn.port == pg18.port
        assert conn.host == pg18.host
    assert 1.9 <= time.monotonic() - started < SLACK
    slow_resolver.set()


def test_overall_timeout_bounds_a_stalled_name_lookup(
    slow_resolver: threading.Event, nopass: str
) -> None:
    conninfo = multi_host_conninfo((SLOW_HOST, 5432), passfile=nopass)
    started = time.monotonic()
    with pytest.raises(ConnectError) as failure:
        blocking.connect(conninfo, timeout=1)
    assert time.monotonic() - started < SLACK
    assert str(failure.value.attempts[-1].error) == OVERALL
    assert failure.value.attempts[-1].step == "resolving the host"
    slow_resolver.set()
