"""The real-server test bed works: checked with psycopg, whose bundled libpq is the oracle."""

from __future__ import annotations

import socket
from typing import Any

import psycopg
import pytest
from pgproto_adapters._cluster import (
    Cluster,
    ClusterError,
    PgBouncer,
    find_binaries,
    ipv6_available,
)
from psycopg.conninfo import make_conninfo
from servers import PGBOUNCER_USERS, ROLES, TRANSPORTS, Role, TLSMaterial, connect_params

_STATE_SQL = """
SELECT current_user,
       current_setting('server_version_num')::int / 10000,
       coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false),
       host(inet_client_addr())
"""


def _connect(params: dict[str, str]) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(make_conninfo("", **params))


def _session_state(params: dict[str, str]) -> tuple[Any, ...]:
    with _connect(params) as conn:
        row = conn.execute(_STATE_SQL).fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.parametrize("transport", ["unix", "tcp", "tcp6", "tls"])
def test_superuser_reachable(pg_server: Cluster, tls_material: TLSMaterial, transport: str) -> None:
    assert pg_server.ipv6 == ipv6_available()
    if transport == "tcp6" and not pg_server.ipv6:
        assert "::1" not in pg_server.psql("SHOW listen_addresses")
        return
    user, major, ssl, client_addr = _session_state(
        connect_params(pg_server, transport, tls_material)
    )
    assert (user, major, ssl) == ("postgres", pg_server.major, transport == "tls")
    expected_addr = {"unix": None, "tcp": "127.0.0.1", "tcp6": "::1"}
    if transport in expected_addr:
        assert client_addr == expected_addr[transport]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("role", ROLES.values(), ids=list(ROLES))
def test_role_matrix(
    pg_server: Cluster, tls_material: TLSMaterial, role: Role, transport: str
) -> None:
    """Each role logs in exactly where the matrix says, with the exchange it says."""
    params = connect_params(
        pg_server,
        transport,
        tls_material,
        user=role.name,
        password=role.password or "ignored",
        require_auth=role.require_auth,
    )
    if transport in role.transports:
        assert _session_state(params)[:3] == (role.name, pg_server.major, transport == "tls")
    else:
        with pytest.raises(psycopg.OperationalError, match=r"no pg_hba\.conf entry"):
            _connect(params)


_PASSWORD_CASES = [
    (role, transport)
    for role in ROLES.values()
    if role.password is not None
    for transport in sorted(role.transports)
]


@pytest.mark.parametrize(
    ("role", "transport"), _PASSWORD_CASES, ids=[f"{r.name}-{t}" for r, t in _PASSWORD_CASES]
)
def test_wrong_password_rejected(
    pg_server: Cluster, tls_material: TLSMaterial, role: Role, transport: str
) -> None:
    params = connect_params(pg_server, transport, tls_material, user=role.name, password="wrong")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _connect(params)


def test_saslprep_matters(pg_server: Cluster, tls_material: TLSMaterial) -> None:
    """The SASLprep-normalised password works too, proving the server normalised it."""
    params = connect_params(
        pg_server, "tcp", tls_material, user="scram_utf8_user", password="Grüße fix"
    )
    assert _session_state(params)[0] == "scram_utf8_user"


def test_stored_password_formats(pg_server: Cluster) -> None:
    for role in ROLES.values():
        stored = pg_server.password_hash(role.name)
        if role.password is None:
            assert stored is None
        elif role.stored == "md5":
            assert stored is not None
            assert stored.startswith("md5")
            assert len(stored) == 35
        else:
            assert stored is not None
            assert stored.startswith("SCRAM-SHA-256$4096:")


def test_certuser_needs_its_certificate(pg_server: Cluster, tls_material: TLSMaterial) -> None:
    params = connect_params(pg_server, "tls", tls_material, user="certuser")
    del params["sslcert"], params["sslkey"]
    with pytest.raises(psycopg.OperationalError, match="certificate"):
        _connect(params)


def test_sslmode_fallbacks(pg_server: Cluster, tls_material: TLSMaterial) -> None:
    """pg_hba rejects the first choice of allow/prefer, and libpq retries with the other."""
    ssl_only = connect_params(
        pg_server, "tcp", tls_material, user="sslonly_user", password="pw-sslonly"
    )
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        _connect(ssl_only)
    assert _session_state({**ssl_only, "sslmode": "allow"})[2] is True

    no_ssl = connect_params(pg_server, "tcp", tls_material, user="nossl_user", password="pw-nossl")
    with pytest.raises(psycopg.OperationalError, match="SSL encryption"):
        _connect({**no_ssl, "sslmode": "require"})
    assert _session_state({**no_ssl, "sslmode": "prefer"})[2] is False


def test_tls_host_name_checked(pg_server: Cluster, tls_material: TLSMaterial) -> None:
    params = connect_params(
        pg_server, "tls", tls_material, host="wrong.example", hostaddr="127.0.0.1"
    )
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        _connect(params)
    assert _session_state({**params, "sslmode": "verify-ca"})[2] is True


def test_wrong_name_certificate(pg18_wrong_cert: Cluster, tls_material: TLSMaterial) -> None:
    params = connect_params(pg18_wrong_cert, "tls", tls_material)
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        _connect(params)
    assert _session_state({**params, "sslmode": "verify-ca"})[2] is True
    assert _session_state({**params, "host": "wrong.example", "hostaddr": "127.0.0.1"})[2] is True


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@pytest.mark.parametrize("user", PGBOUNCER_USERS)
def test_pgbouncer_scram(
    pgbouncer: PgBouncer, tls_material: TLSMaterial, user: str, transport: str
) -> None:
    role = ROLES[user]
    assert role.password is not None
    params = connect_params(
        pgbouncer,
        transport,
        tls_material,
        user=user,
        password=role.password,
        require_auth="scram-sha-256",
    )
    with _connect(params) as conn:
        row = conn.execute("SELECT current_user, inet_server_port()").fetchone()
        assert conn.pgconn.ssl_in_use is (transport == "tls")
    # inet_server_port() is NULL: PgBouncer reaches PostgreSQL over its Unix socket.
    assert row == (user, None)
    with pytest.raises(psycopg.OperationalError, match="SASL authentication failed"):
        _connect({**params, "password": "wrong"})


def test_pgbouncer_rejects_unknown_user(pgbouncer: PgBouncer, tls_material: TLSMaterial) -> None:
    params = connect_params(pgbouncer, "tcp", tls_material, user="md5_user", password="pw-md5")
    with pytest.raises(psycopg.OperationalError):
        _connect(params)


def test_cluster_lifecycle(tls_material: TLSMaterial) -> None:
    """stop() shuts the server down, frees the port and deletes the directory."""
    with Cluster(find_binaries(15), tls=tls_material.server) as cluster:
        base, port = cluster.base_dir, cluster.port
        assert cluster.psql("SHOW ssl") == "on"
        cluster.set_hba(["host all all all reject"])
        with pytest.raises(psycopg.OperationalError, match="rejects connection"):
            psycopg.connect(cluster.dsn(sslmode="disable"))
        with psycopg.connect(cluster.dsn(host="socket")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not cluster.running
    assert not base.exists()
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", port), timeout=5),
    ):
        pass
    cluster.stop()  # idempotent


def test_start_failure_carries_server_log() -> None:
    cluster = Cluster(find_binaries(18), settings={"shared_buffers": "lots"})
    base = cluster.base_dir
    with pytest.raises(ClusterError, match=r"(?s)failed to start.*server log.*shared_buffers"):
        cluster.start()
    assert not base.exists()


def test_missing_binaries_fail_loudly() -> None:
    with pytest.raises(ClusterError, match="PostgreSQL 7 binaries not found"):
        find_binaries(7)


def test_pgbouncer_start_failure_carries_log(pg18: Cluster) -> None:
    bouncer = PgBouncer(pg18, auth_file={}, settings={"pool_mode": "sideways"})
    base = bouncer.base_dir
    with pytest.raises(ClusterError, match=r"(?s)pgbouncer exited.*pool_mode"):
        bouncer.start()
    assert not base.exists()
