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

Multi-host and failover
-----------------------

``replicated`` is a PostgreSQL 18 primary and a streaming hot standby of it
(:meth:`Cluster.create_standby`), as a :class:`ReplicaPair` with
``.primary``, ``.standby``, ``.host``, ``.ports`` and
``.conninfo(standby_first=False, **params)`` (a multi-host
``host=h1,h2 port=p1,p2`` string).  No TLS; pg_hba trusts every local and
host connection (plus the ``local replication postgres`` line every Cluster
has); roles ``postgres`` (superuser) and ``trust_user``.  Do not promote it:
``replica_factory()`` builds a fresh pair, stopped at the end of the session,
for tests that do (``replica_factory(major=18, **cluster_kwargs)``).  The
primary runs with ``synchronous_commit = off``: after writing on it, call
``pair.primary.wait_for_replay(pair.standby)`` before reading on the standby.

Endpoints that fail in known ways, all on 127.0.0.1:

* ``closed_port``: a port whose connections are refused (ECONNREFUSED) for
  the whole session; a socket is bound to it but never listens, so no other
  process can take it.
* ``silent_listener``: a :class:`SilentListener` whose thread accepts every
  connection and never sends a byte, keeping the sockets open until the end
  of the session; ``.accepted`` counts them and ``.wait_accepted(n)`` waits
  for the count.  Its sockets live in this process: pass
  ``ignore=silent_listener.owned_fds`` to ``fdcheck.assert_no_fd_leak``.
* :data:`UNRESOLVABLE_HOST`: a host name whose resolution fails at once.

``multi_host_conninfo((host, port), ...)`` combines any of these (and
clusters' ``(host, port)``) into one connection string.

``no_pg_environment`` (not autouse) removes every ``PG*`` environment
variable for the duration of a test, so that none reaches pgproto, libpq or
psycopg.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import selectors
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import trustme
from capture import accept_pending, selector_fd
from pgproto_adapters._cluster import (
    Cluster,
    PgBouncer,
    TLSFiles,
    _conninfo_value,
    find_binaries,
)

__all__ = [
    "PGBOUNCER_USERS",
    "ROLES",
    "TRANSPORTS",
    "UNRESOLVABLE_HOST",
    "ReplicaPair",
    "Role",
    "SilentListener",
    "SynBlackhole",
    "TLSMaterial",
    "closed_port",
    "cluster_factory",
    "connect_params",
    "drop_pg_environment",
    "hba_lines",
    "multi_host_conninfo",
    "no_pg_environment",
    "pg15",
    "pg18",
    "pg18_notls",
    "pg18_wrong_cert",
    "pg_server",
    "pgbouncer",
    "replica_factory",
    "replicated",
    "silent_listener",
    "syn_blackhole",
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


def drop_pg_environment(patch: pytest.MonkeyPatch) -> None:
    """Remove every ``PG*`` environment variable through *patch* (which restores them)."""
    for key in list(os.environ):
        if key.startswith("PG"):
            patch.delenv(key)


@pytest.fixture
def no_pg_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``PG*`` variable reaches pgproto, libpq or psycopg during the test.

    A module opts in with ``pytestmark = pytest.mark.usefixtures("no_pg_environment")``.
    """
    drop_pg_environment(monkeypatch)


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


# --------------------------------------------------------------------------
# Multi-host and failover
# --------------------------------------------------------------------------

#: A host name that fails to resolve at once, without asking a name server:
#: "!" is not a valid host-name character, so glibc's resolver rejects the
#: name locally (EAI_NONAME, "Name or service not known", in about 2 ms).  A
#: reserved but well-formed name (``does-not-exist.invalid``) goes to the
#: configured name server, which on a loaded CI machine sometimes answers
#: only after seconds, or with "Temporary failure in name resolution".
#: ``test_testbed`` fails if resolution takes longer than a few seconds.
UNRESOLVABLE_HOST: Final = "no!such!host.invalid"


def multi_host_conninfo(*endpoints: tuple[str, int], **params: str | int) -> str:
    """``host=h1,h2,... port=p1,p2,...`` plus ``params``.

    Defaults: ``user=postgres dbname=postgres connect_timeout=10``; ``params``
    override them.
    """
    if not endpoints:
        raise ValueError("at least one endpoint is needed")
    items: dict[str, str | int] = {
        "host": ",".join(host for host, _ in endpoints),
        "port": ",".join(str(port) for _, port in endpoints),
        "user": "postgres",
        "dbname": "postgres",
        "connect_timeout": 10,
        **params,
    }
    return " ".join(f"{key}={_conninfo_value(str(value))}" for key, value in items.items())


@dataclasses.dataclass(frozen=True)
class ReplicaPair:
    """A primary and a streaming hot standby of it (both listening on 127.0.0.1)."""

    primary: Cluster
    standby: Cluster

    @property
    def host(self) -> str:
        """The address both servers listen on."""
        return self.primary.host

    @property
    def ports(self) -> tuple[int, int]:
        """``(primary port, standby port)``."""
        return (self.primary.port, self.standby.port)

    def conninfo(self, *, standby_first: bool = False, **params: str | int) -> str:
        """A two-host connection string, primary first unless ``standby_first``."""
        servers = (self.standby, self.primary) if standby_first else (self.primary, self.standby)
        return multi_host_conninfo(*((s.host, s.port) for s in servers), **params)

    def stop(self) -> None:
        """Stop the standby, then the primary, and remove both."""
        try:
            self.standby.stop()
        finally:
            self.primary.stop()


def _start_pair(major: int = 18, **cluster_kwargs: Any) -> ReplicaPair:
    primary = Cluster(find_binaries(major, fetch=True), **cluster_kwargs)
    try:
        primary.start()
        primary.create_role("trust_user")  # before the base backup: no replay wait
        standby = primary.create_standby()
    except BaseException:
        primary.stop()
        raise
    return ReplicaPair(primary, standby)


@pytest.fixture(scope="session")
def replicated() -> Iterator[ReplicaPair]:
    """PostgreSQL 18 primary + hot standby; trust everywhere; postgres and trust_user."""
    pair = _start_pair(18)
    yield pair
    pair.stop()


@pytest.fixture(scope="session")
def replica_factory() -> Iterator[Callable[..., ReplicaPair]]:
    """Fresh pairs like ``replicated``: ``replica_factory(major=18, **cluster_kwargs)``."""
    started: list[ReplicaPair] = []

    def make(major: int = 18, **cluster_kwargs: Any) -> ReplicaPair:
        pair = _start_pair(major, **cluster_kwargs)
        started.append(pair)
        return pair

    yield make
    for pair in reversed(started):
        pair.stop()


@pytest.fixture(scope="session")
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections for the whole session.

    The socket is bound without SO_REUSEADDR and never listens: the kernel
    answers a SYN with RST, no other socket can bind the port, and the
    kernel does not hand it out as an ephemeral port either.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port


class SilentListener:
    """Accepts every TCP connection on 127.0.0.1 and never sends anything.

    One thread waits in a selector on the listening socket and one end of a
    socket pair; :meth:`close` writes to the other end to wake it, joins it,
    then closes every accepted socket.
    """

    def __init__(self) -> None:
        self.host: Final = "127.0.0.1"
        self._listener = socket.create_server((self.host, 0), backlog=128)
        self._listener.setblocking(False)
        self.port: Final[int] = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()  # made here, so its fd predates any test
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._cond = threading.Condition()
        self._conns: list[socket.socket] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="silent-listener", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while True:
                for key, _ in self._selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    self._accept_all()
        except BaseException as exc:  # surfaced by close()
            self._error = exc

    def _accept_all(self) -> None:
        for conn in accept_pending(self._listener):
            with self._cond:
                self._conns.append(conn)
                self._cond.notify_all()

    @property
    def accepted(self) -> int:
        """How many connections have been accepted so far."""
        with self._cond:
            return len(self._conns)

    def wait_accepted(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` connections were accepted; false on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._conns) >= count, timeout)

    def owned_fds(self) -> set[int]:
        """File descriptors this listener holds (for ``fdcheck.assert_no_fd_leak``)."""
        socks = [self._listener, self._wake_r, self._wake_w]
        with self._cond:
            socks.extend(self._conns)
        fds = {s.fileno() for s in socks}
        selector = selector_fd(self._selector)
        if selector is not None:
            fds.add(selector)
        fds.discard(-1)
        return fds

    def close(self) -> None:
        """Stop the thread and close every socket (idempotent)."""
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                raise RuntimeError("silent listener thread did not stop")
        with self._cond:
            conns, self._conns = self._conns, []
        for sock in (*conns, self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()
        if self._error is not None:
            raise RuntimeError("silent listener thread failed") from self._error


@pytest.fixture(scope="session")
def silent_listener() -> Iterator[SilentListener]:
    """A :class:`SilentListener` for the whole session."""
    with contextlib.closing(SilentListener()) as listener:
        yield listener


class SynBlackhole:
    """A TCP endpoint on 127.0.0.1 where a client's connect() never completes.

    A socket listens with backlog 0 and never accepts; the constructor
    connects to it itself until its accept queue is full (one connection, as
    Linux counts a queue of backlog 0 full at one entry).  From then on
    Linux drops every SYN to the port without answering (``tcp_conn_request``
    checks ``sk_acceptq_is_full`` and counts ``ListenOverflows``), so a
    client's non-blocking ``connect()`` returns EINPROGRESS and the socket
    never becomes writable: the client retransmits its SYN (after 1, 3, 7,
    15, 31 and 63 s with ``net.ipv4.tcp_syn_retries = 6``) and its kernel
    gives up with ETIMEDOUT after about 127 s, unless the client's own
    timeout ends the attempt first.

    Checked on Linux 6.18 with ``tcp_syncookies = 1``, both with
    ``net.ipv4.tcp_abort_on_overflow = 0`` (the default) and ``= 1`` (in a
    network namespace): the setting does not matter.  The SYN is dropped
    before abort_on_overflow is consulted; that setting only decides
    whether the final ACK of a handshake whose SYN-ACK went out *before*
    the queue filled is ignored or answered with RST.  The fixture fills the
    queue before anyone else connects, and :meth:`queue_full` reads the
    listener's queue length (``TCP_INFO``: ``tcpi_unacked`` is the accept
    queue length and ``tcpi_sacked`` the backlog for a listening socket) to
    prove it is full, failing loudly otherwise.
    """

    def __init__(self, fill_timeout: float = 5.0) -> None:
        self.host: Final = "127.0.0.1"
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._fillers: list[socket.socket] = []
        try:
            self._listener.bind((self.host, 0))
            self._listener.listen(0)
            self.port: Final[int] = self._listener.getsockname()[1]
            self._fill(fill_timeout)
        except BaseException:
            self.close()
            raise

    def queue_full(self) -> bool:
        """Whether the listener's accept queue is full (so SYNs are dropped)."""
        info = self._listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        queued = int.from_bytes(info[24:28], sys.byteorder)  # tcpi_unacked
        backlog = int.from_bytes(info[28:32], sys.byteorder)  # tcpi_sacked
        return queued > backlog

    def _fill(self, timeout: float) -> None:
        with selectors.DefaultSelector() as selector:
            while not self.queue_full():
                if len(self._fillers) >= 8:
                    raise RuntimeError("syn_blackhole: the accept queue does not fill up")
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                err = sock.connect_ex((self.host, self.port))
                if err == 0:
                    self._fillers.append(sock)
                    continue
                if err != errno.EINPROGRESS:
                    sock.close()
                    raise OSError(err, f"syn_blackhole: filling connect failed: {err}")
                selector.register(sock, selectors.EVENT_WRITE)
                completed = bool(selector.select(timeout))
                selector.unregister(sock)
                if not completed:  # this SYN was dropped already: the queue is full
                    sock.close()
                    break
                self._fillers.append(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, f"syn_blackhole: filling connect failed: {err}")
        if not self.queue_full():
            raise RuntimeError("syn_blackhole: the accept queue is not full")

    def owned_fds(self) -> set[int]:
        """File descriptors this endpoint holds (for ``fdcheck.assert_no_fd_leak``)."""
        fds = {s.fileno() for s in (self._listener, *self._fillers)}
        fds.discard(-1)
        return fds

    def close(self) -> None:
        """Close the listener (resetting the queued connections), then the fillers."""
        self._listener.close()
        for sock in self._fillers:
            sock.close()
        self._fillers.clear()


@pytest.fixture(scope="session")
def syn_blackhole() -> Iterator[SynBlackhole]:
    """A :class:`SynBlackhole` for the whole session: connecting to it never completes."""
    with contextlib.closing(SynBlackhole()) as blackhole:
        yield blackhole
