"""Session-scoped pytest fixtures for real PostgreSQL 15 and 18 servers and PgBouncer.

Load from ``tests/conftest.py`` with::

    pytest_plugins = ["tests.servers"]

Servers start lazily, the first time a test asks for them, and are stopped
at the end of the session.  A missing binary fails the test loudly; nothing
here skips.

Role / pg_hba matrix (identical on ``pg15``, ``pg18`` and ``pg18_notls``)
-----------------------------------------------------------------------

Transports: ``unix`` = Unix socket (``local`` rules), ``tcp`` = TCP without
TLS (``host`` / ``hostnossl`` rules), ``tls`` = TCP with TLS (``host`` /
``hostssl`` rules).

================  ==============  ==============  ================  =============
role              pg_hba method   password kept   reachable over    require_auth
================  ==============  ==============  ================  =============
postgres          trust           (none)          unix, tcp, tls    none
trust_user        trust           (none)          unix, tcp, tls    none
password_user     password        scram-sha-256   unix, tcp, tls    password
md5_user          md5             md5             unix, tcp, tls    md5
md5scram_user     md5             scram-sha-256   unix, tcp, tls    scram-sha-256
scram_user        scram-sha-256   scram-sha-256   unix, tcp, tls    scram-sha-256
scram_utf8_user   scram-sha-256   scram-sha-256   unix, tcp, tls    scram-sha-256
certuser          cert            (none)          tls               none
sslonly_user      scram-sha-256   scram-sha-256   tls (hostssl)     scram-sha-256
nossl_user        scram-sha-256   scram-sha-256   tcp (hostnossl)   scram-sha-256
================  ==============  ==============  ================  =============

Notes:

* ``md5scram_user`` shows that an ``md5`` rule upgrades to SCRAM when the
  stored password is a SCRAM verifier.
* ``scram_utf8_user``'s password contains a no-break space and the "ﬁ"
  ligature, which SASLprep maps to a space and "fi": a client that skips
  SASLprep fails to log in.
* ``sslonly_user`` and ``nossl_user`` exist for ``sslmode=allow`` / ``prefer``
  fallback: the first attempt is rejected by pg_hba and libpq retries with the
  other choice.
* ``certuser`` logs in with the client certificate from ``tls_material``
  (CN=certuser); without it, or without TLS, it is rejected.
* ``require_auth`` is the libpq option that proves which exchange the server
  chose; every other combination of role and transport has no pg_hba line
  and fails with "no pg_hba.conf entry".

``pgbouncer`` listens on 127.0.0.1 in front of ``pg18`` with
``auth_type = scram-sha-256``; its auth_file holds the SCRAM verifiers of
``scram_user`` and ``scram_utf8_user`` (read from pg_authid), so PgBouncer
authenticates clients with SCRAM and passes the proof through to PostgreSQL.
It accepts TLS (``client_tls_sslmode = allow``) with the same server
certificate.

``pg18_notls`` is ``pg18`` with ``ssl = off``: the same roles and pg_hba
lines, but TLS requests are refused (``hostssl`` lines never match, so
``certuser`` and ``sslonly_user`` cannot log in).

TLS: one trustme CA signs the server certificate (localhost, 127.0.0.1, ::1),
a certificate for ``wrong.example`` (served by ``pg18_wrong_cert``) and the
client certificate of ``certuser``.  Server certificates are in
``tls_material.server`` / ``.wrong_name`` as :class:`TLSFiles`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import trustme
from pgproto_adapters._cluster import Cluster, PgBouncer, TLSFiles, find_binaries

__all__ = [
    "PGBOUNCER_USERS",
    "ROLES",
    "TRANSPORTS",
    "Role",
    "TLSMaterial",
    "cluster_factory",
    "connect_params",
    "hba_lines",
    "pg15",
    "pg18",
    "pg18_notls",
    "pg18_wrong_cert",
    "pg_server",
    "pgbouncer",
    "tls_material",
]

TRANSPORTS: Final = ("unix", "tcp", "tls")
_ALL: Final = frozenset(TRANSPORTS)


@dataclasses.dataclass(frozen=True)
class Role:
    """One row of the matrix in the module docstring."""

    name: str
    method: str
    password: str | None
    stored: str  # password_encryption used when storing ``password``
    transports: frozenset[str]
    require_auth: str
    hba_type: str = "host"  # for TCP: host, hostssl or hostnossl


ROLES: Final[dict[str, Role]] = {
    r.name: r
    for r in (
        Role("trust_user", "trust", None, "scram-sha-256", _ALL, "none"),
        Role("password_user", "password", "pw-password", "scram-sha-256", _ALL, "password"),
        Role("md5_user", "md5", "pw-md5", "md5", _ALL, "md5"),
        Role("md5scram_user", "md5", "pw-md5scram", "scram-sha-256", _ALL, "scram-sha-256"),
        Role("scram_user", "scram-sha-256", "pw-scram", "scram-sha-256", _ALL, "scram-sha-256"),
        Role(
            "scram_utf8_user",
            "scram-sha-256",
            "Grüße\u00a0\ufb01x",
            "scram-sha-256",
            _ALL,
            "scram-sha-256",
        ),
        Role("certuser", "cert", None, "scram-sha-256", frozenset({"tls"}), "none", "hostssl"),
        Role(
            "sslonly_user",
            "scram-sha-256",
            "pw-sslonly",
            "scram-sha-256",
            frozenset({"tls"}),
            "scram-sha-256",
            "hostssl",
        ),
        Role(
            "nossl_user",
            "scram-sha-256",
            "pw-nossl",
            "scram-sha-256",
            frozenset({"tcp"}),
            "scram-sha-256",
            "hostnossl",
        ),
    )
}

#: Users that ``pgbouncer`` knows (by SCRAM verifier).
PGBOUNCER_USERS: Final = ("scram_user", "scram_utf8_user")


def hba_lines() -> list[str]:
    """pg_hba.conf lines for :data:`ROLES` (the Cluster adds the superuser's local line)."""
    lines = ["host all postgres all trust"]
    for role in ROLES.values():
        if "unix" in role.transports:
            lines.append(f"local all {role.name} {role.method}")
        lines.append(f"{role.hba_type} all {role.name} all {role.method}")
    return lines


@dataclasses.dataclass(frozen=True)
class TLSMaterial:
    """Certificates from one trustme CA, written to files."""

    ca: trustme.CA
    ca_cert: Path
    server: TLSFiles  # localhost, 127.0.0.1, ::1; its ``ca`` verifies client certs
    wrong_name: TLSFiles  # wrong.example only
    client_cert: Path  # CN=certuser
    client_key: Path


def connect_params(
    server: Cluster | PgBouncer,
    transport: str,
    tls: TLSMaterial,
    *,
    user: str = "postgres",
    password: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """libpq keywords reaching ``server`` over ``transport`` (unix, tcp, tcp6 or tls).

    TLS uses ``sslmode=verify-full`` with host name ``localhost``; plaintext
    transports use ``sslmode=disable``.  ``certuser`` gets the client
    certificate.  ``extra`` overrides anything.
    """
    params = {"port": str(server.port), "dbname": "postgres", "user": user, "connect_timeout": "10"}
    if transport == "unix":
        params.update(host=str(server.socket_dir), sslmode="disable")
    elif transport == "tcp":
        params.update(host="127.0.0.1", sslmode="disable")
    elif transport == "tcp6":
        params.update(host="::1", sslmode="disable")
    elif transport == "tls":
        params.update(host="localhost", sslmode="verify-full", sslrootcert=str(tls.ca_cert))
        if user == "certuser":
            params.update(sslcert=str(tls.client_cert), sslkey=str(tls.client_key))
    else:
        raise ValueError(f"unknown transport {transport!r}")
    if password is not None:
        params["password"] = password
    params.update(extra)
    return params


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    """The CA, server, wrong-name and client certificates (keys are 0600, as libpq wants)."""
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca_cert = directory / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_cert))

    def write(name: str, leaf: trustme.LeafCert) -> tuple[Path, Path]:
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        key.chmod(0o600)
        return cert, key

    server_cert, server_key = write("server", ca.issue_cert("localhost", "127.0.0.1", "::1"))
    wrong_cert, wrong_key = write("wrong-name", ca.issue_cert("wrong.example"))
    client_cert, client_key = write("certuser", ca.issue_cert("certuser", common_name="certuser"))
    return TLSMaterial(
        ca=ca,
        ca_cert=ca_cert,
        server=TLSFiles(server_cert, server_key, ca_cert),
        wrong_name=TLSFiles(wrong_cert, wrong_key, ca_cert),
        client_cert=client_cert,
        client_key=client_key,
    )


def _start_matrix_cluster(major: int, tls: TLSMaterial | None) -> Cluster:
    """A cluster with the role matrix; ``tls=None`` leaves ``ssl = off``."""
    server_tls = tls.server if tls is not None else None
    cluster = Cluster(find_binaries(major, fetch=True), hba=hba_lines(), tls=server_tls)
    try:
        cluster.start()
        for role in ROLES.values():
            cluster.create_role(role.name, role.password, password_encryption=role.stored)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def pg15(tls_material: TLSMaterial) -> Iterator[Cluster]:
    """PostgreSQL 15 (Debian) with TLS and the role matrix."""
    cluster = _start_matrix_cluster(15, tls_material)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pg18(tls_material: TLSMaterial) -> Iterator[Cluster]:
    """PostgreSQL 18 (PyPI build) with TLS and the role matrix."""
    cluster = _start_matrix_cluster(18, tls_material)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pg18_notls() -> Iterator[Cluster]:
    """PostgreSQL 18 with the role matrix and ``ssl = off``."""
    cluster = _start_matrix_cluster(18, None)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session", params=["pg15", "pg18"])
def pg_server(request: pytest.FixtureRequest) -> Cluster:
    """Each of ``pg15`` and ``pg18`` in turn."""
    cluster: Cluster = request.getfixturevalue(request.param)
    return cluster


@pytest.fixture(scope="session")
def pg18_wrong_cert(tls_material: TLSMaterial) -> Iterator[Cluster]:
    """PostgreSQL 18 whose certificate names only ``wrong.example``; everyone is trusted."""
    with Cluster(find_binaries(18, fetch=True), tls=tls_material.wrong_name) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def pgbouncer(pg18: Cluster, tls_material: TLSMaterial) -> Iterator[PgBouncer]:
    """PgBouncer in front of ``pg18`` with SCRAM auth for :data:`PGBOUNCER_USERS`."""
    secrets: dict[str, str] = {}
    for user in PGBOUNCER_USERS:
        secret = pg18.password_hash(user)
        assert secret is not None
        secrets[user] = secret
    with PgBouncer(pg18, auth_file=secrets, tls=tls_material.server) as bouncer:
        yield bouncer


@pytest.fixture(scope="session")
def cluster_factory() -> Iterator[Callable[..., Cluster]]:
    """Start more clusters: ``cluster_factory(major, **cluster_kwargs)``; stopped at the end."""
    started: list[Cluster] = []

    def make(major: int, **kwargs: Any) -> Cluster:
        cluster = Cluster(find_binaries(major, fetch=True), **kwargs)
        started.append(cluster)
        return cluster.start()

    yield make
    for cluster in started:
        cluster.stop()
