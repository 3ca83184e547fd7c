"""The multi-host / failover test bed works: replication, failing endpoints, fd checks.

psycopg (whose bundled libpq is the oracle elsewhere) checks the servers.
"""

from __future__ import annotations

import errno
import functools
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import pg_admin
import psycopg
import pytest
from fdcheck import assert_no_fd_leak, describe_fds, open_fds
from pgproto_adapters._cluster import Cluster, ClusterError, find_binaries
from psycopg.conninfo import make_conninfo
from servers import (
    ROLES,
    UNRESOLVABLE_HOST,
    ReplicaPair,
    SilentListener,
    TLSMaterial,
    connect_params,
    multi_host_conninfo,
)

_DEADLINE = 30.0  # seconds; generous for a loaded 2-core CI machine


def _scalar(conninfo: str, sql: str) -> Any:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


_poll = functools.partial(pg_admin.wait_until, patience=_DEADLINE, period=0.02)


# -- replication ---------------------------------------------------------------


@pytest.mark.parametrize("user", ["postgres", "trust_user"])
def test_standby_in_recovery_primary_not(replicated: ReplicaPair, user: str) -> None:
    primary, standby = replicated.primary, replicated.standby
    assert primary.major == standby.major == 18
    assert _scalar(primary.dsn(user=user), "SELECT pg_is_in_recovery()") is False
    assert _scalar(standby.dsn(user=user), "SELECT pg_is_in_recovery()") is True
    assert (primary.in_recovery(), standby.in_recovery()) == (False, True)
    assert standby.primary is primary
    assert primary.primary is None
    assert replicated.host == "127.0.0.1"
    assert replicated.ports == (primary.port, standby.port)
    assert primary.port != standby.port
    assert primary.base_dir != standby.base_dir


def test_standby_streams_from_primary(replicated: ReplicaPair) -> None:
    assert replicated.standby.psql("SELECT status FROM pg_stat_wal_receiver") == "streaming"
    assert replicated.primary.psql("SELECT count(*) FROM pg_stat_replication") == "1"


def test_row_written_on_primary_appears_on_standby(replicated: ReplicaPair) -> None:
    token = secrets.token_hex(8)
    with psycopg.connect(replicated.primary.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS testbed_rows (token text PRIMARY KEY)")
        conn.execute("INSERT INTO testbed_rows VALUES (%s)", (token,))
    with psycopg.connect(replicated.standby.dsn(), autocommit=True) as conn:

        def arrived() -> bool:
            sql = "SELECT to_regclass('testbed_rows') IS NOT NULL"
            if conn.execute(sql).fetchone() != (True,):
                return False
            found = conn.execute("SELECT 1 FROM testbed_rows WHERE token = %s", (token,))
            return found.fetchone() is not None

        _poll(arrived, "row replicated to the standby")


def test_wait_for_replay(replicated: ReplicaPair) -> None:
    token = secrets.token_hex(8)
    primary, standby = replicated.primary, replicated.standby
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS testbed_rows (token text PRIMARY KEY)")
        conn.execute("INSERT INTO testbed_rows VALUES (%s)", (token,))
    primary.wait_for_replay(standby)
    with psycopg.connect(standby.dsn()) as conn:
        found = conn.execute("SELECT count(*) FROM testbed_rows WHERE token = %s", (token,))
        assert found.fetchone() == (1,)


def test_standby_is_read_only(replicated: ReplicaPair) -> None:
    with (
        psycopg.connect(replicated.standby.dsn()) as conn,
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
    ):
        conn.execute("CREATE TABLE testbed_never (x int)")


@pytest.mark.parametrize("standby_first", [False, True], ids=["primary-first", "standby-first"])
@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ("read-write", "primary"),
        ("primary", "primary"),
        ("standby", "standby"),
        ("read-only", "standby"),
        ("prefer-standby", "standby"),
    ],
)
def test_target_session_attrs(
    replicated: ReplicaPair, attrs: str, expected: str, standby_first: bool
) -> None:
    conninfo = replicated.conninfo(standby_first=standby_first, target_session_attrs=attrs)
    assert conninfo.startswith("host=127.0.0.1,127.0.0.1 port=")
    with psycopg.connect(conninfo) as conn:
        in_recovery = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        port = conn.info.port
    want = replicated.primary if expected == "primary" else replicated.standby
    assert port == want.port
    assert in_recovery == (expected == "standby",)


def test_any_takes_the_first_host(replicated: ReplicaPair) -> None:
    for standby_first, first in [(False, replicated.primary), (True, replicated.standby)]:
        with psycopg.connect(replicated.conninfo(standby_first=standby_first)) as conn:
            assert conn.info.port == first.port


def test_promote_makes_the_standby_writable(
    replica_factory: Callable[..., ReplicaPair],
) -> None:
    pair = replica_factory()
    assert pair.standby.in_recovery()
    pair.standby.promote()
    assert not pair.standby.in_recovery()
    assert pair.standby.primary is None
    with psycopg.connect(pair.standby.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE after_promotion (x int)")
        conn.execute("INSERT INTO after_promotion VALUES (1)")
    # Both now accept writes: read-write picks whichever comes first.
    with psycopg.connect(pair.conninfo(standby_first=True, target_session_attrs="read-write")) as c:
        assert c.info.port == pair.standby.port
    with pytest.raises(ClusterError, match="not in standby mode"):
        pair.primary.promote()


def test_standby_copies_tls_hba_and_roles(pg18: Cluster, tls_material: TLSMaterial) -> None:
    standby = pg18.create_standby()
    try:
        assert standby.tls == pg18.tls is not None
        assert standby.in_recovery()
        role = ROLES["scram_user"]
        params = connect_params(
            standby,
            "tls",
            tls_material,
            user=role.name,
            password=role.password,
            require_auth=role.require_auth,
        )
        with psycopg.connect(make_conninfo("", **params)) as conn:
            assert conn.info.port == standby.port
            assert conn.pgconn.ssl_in_use
        with pytest.raises(psycopg.OperationalError, match=r"no pg_hba\.conf entry"):
            psycopg.connect(
                make_conninfo("", **connect_params(standby, "tcp", tls_material, user="certuser"))
            )
    finally:
        standby.stop()
    assert not standby.base_dir.exists()


def test_create_standby_failure_carries_the_primary_log(
    cluster_factory: Callable[..., Cluster],
) -> None:
    primary = cluster_factory(18, settings={"wal_level": "minimal", "max_wal_senders": "0"})
    with pytest.raises(ClusterError, match=r"(?s)pg_basebackup failed.*--- primary log"):
        primary.create_standby()


def test_create_standby_needs_a_running_primary() -> None:
    primary = Cluster(find_binaries(18, fetch=True))
    try:
        with pytest.raises(ClusterError, match="running primary"):
            primary.create_standby()
    finally:
        primary.stop()


# -- endpoints that fail -------------------------------------------------------


def test_closed_port_refuses(closed_port: int) -> None:
    for _ in range(3):
        with pytest.raises(ConnectionRefusedError) as info:
            socket.create_connection(("127.0.0.1", closed_port), timeout=5)
        assert info.value.errno == errno.ECONNREFUSED
    with socket.socket() as other, pytest.raises(OSError, match="in use") as info2:
        other.bind(("127.0.0.1", closed_port))
    assert info2.value.errno == errno.EADDRINUSE


def test_closed_port_refuses_libpq(closed_port: int) -> None:
    with pytest.raises(psycopg.OperationalError, match="Connection refused"):
        psycopg.connect(multi_host_conninfo(("127.0.0.1", closed_port)))


def test_silent_listener_accepts_and_never_answers(silent_listener: SilentListener) -> None:
    assert silent_listener.host == "127.0.0.1"
    before = silent_listener.accepted
    with socket.create_connection((silent_listener.host, silent_listener.port), timeout=5) as s:
        assert silent_listener.wait_accepted(before + 1, timeout=_DEADLINE)
        s.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # SSLRequest: still no answer
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):
            s.recv(1)
    assert silent_listener.accepted >= before + 1


def test_silent_listener_times_out_libpq(silent_listener: SilentListener) -> None:
    before = silent_listener.accepted
    conninfo = multi_host_conninfo(
        (silent_listener.host, silent_listener.port), connect_timeout=2, sslmode="disable"
    )
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="timeout"):
        psycopg.connect(conninfo)
    assert 1.5 < time.monotonic() - started < 10
    assert silent_listener.wait_accepted(before + 1, timeout=_DEADLINE)


def test_unresolvable_host_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(socket.gaierror) as info:
        socket.getaddrinfo(UNRESOLVABLE_HOST, 5432, type=socket.SOCK_STREAM)
    elapsed = time.monotonic() - started
    assert info.value.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None))
    assert elapsed < 3, f"resolving {UNRESOLVABLE_HOST} took {elapsed:.1f} s"


def test_unresolvable_host_then_primary(replicated: ReplicaPair, closed_port: int) -> None:
    conninfo = multi_host_conninfo(
        (UNRESOLVABLE_HOST, 5432),
        ("127.0.0.1", closed_port),
        (replicated.host, replicated.primary.port),
    )
    with psycopg.connect(conninfo) as conn:
        assert conn.info.port == replicated.primary.port


# -- fd checks -----------------------------------------------------------------


def test_open_fds_lists_real_descriptors() -> None:
    fds = open_fds()
    assert {0, 1, 2} <= fds
    assert open_fds() == fds  # the listing's own descriptor is not reported
    read_end, write_end = os.pipe()
    try:
        assert open_fds() - fds == {read_end, write_end}
    finally:
        os.close(read_end)
        os.close(write_end)
    assert open_fds() == fds


def test_fdcheck_detects_a_leak() -> None:
    leaked: list[int] = []
    with (
        pytest.raises(AssertionError, match=r"2 file descriptor\(s\) leaked:\n\d+ -> pipe:\["),
        assert_no_fd_leak(),
    ):
        leaked.extend(os.pipe())
    for fd in leaked:
        os.close(fd)
    assert describe_fds(leaked).count("<closed") == 2


def test_fdcheck_passes_when_closed(tmp_path: Any) -> None:
    with assert_no_fd_leak():
        with (tmp_path / "x").open("w") as f:
            f.write("x")
        socket.socket().close()


def test_fdcheck_ignores_the_listener(silent_listener: SilentListener) -> None:
    before = silent_listener.accepted
    address = (silent_listener.host, silent_listener.port)
    with (
        assert_no_fd_leak(ignore=silent_listener.owned_fds),
        socket.create_connection(address, timeout=5),
    ):
        assert silent_listener.wait_accepted(before + 1, timeout=_DEADLINE)

    def connect_and_close() -> None:
        socket.create_connection(address, timeout=5).close()
        assert silent_listener.wait_accepted(before + 2, timeout=_DEADLINE)

    # Without ``ignore``, the socket the listener accepted counts as a leak.
    with pytest.raises(AssertionError, match=r"socket:\["), assert_no_fd_leak():
        connect_and_close()


def test_wait_errors_carry_both_logs(
    replicated: ReplicaPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replicated.standby, "timeout", 0.1)
    with pytest.raises(ClusterError, match=r"never: not reached within 0\.1 s") as info:
        replicated.standby._wait_for("never", lambda: False, also=replicated.primary)
    message = str(info.value)
    assert "--- standby log" in message
    assert "--- primary log" in message
    assert "started streaming WAL" in message  # the standby's walreceiver
    assert "connection received" not in message  # psql polling noise is left out
