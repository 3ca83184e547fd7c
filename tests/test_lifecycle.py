"""The machine's lifecycle verbs of issue 4, without sockets: requirepeer,
the caller's overall deadline, reset (PQreset), and ping_outcome (PQping's
rules); and requirepeer against a real server, side by side with libpq."""

from __future__ import annotations

import asyncio
import os
import pwd
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import trio
from fake_server import (
    AUTH_OK,
    SECRET,
    TERMINATE,
    Harness,
    PeerHarness,
    auth,
    connect_error,
    error_response,
    make_machine,
    startup_done,
    statuses,
)
from pgproto_adapters import asyncio as asyncio_adapter
from pgproto_adapters import blocking
from pgproto_adapters import trio as trio_adapter
from pgproto_adapters._cluster import Cluster

import pgproto
from pgproto import (
    Attempt,
    ConnectError,
    ConninfoError,
    ConnStatus,
    OpenConnection,
    Ping,
    PollingStatus,
    ServerError,
    TransportError,
    ping_outcome,
)

# --------------------------------------------------------------------------
# requirepeer


def _peer_run(requirepeer: str, peer: int | None) -> Harness:
    machine = make_machine(host="/run/pg", requirepeer=requirepeer, password=None)
    return PeerHarness(machine, peer_uid=peer)


def test_requirepeer_accepts_the_right_user() -> None:
    me = pwd.getpwuid(os.geteuid()).pw_name
    harness = _peer_run(me, os.geteuid())
    assert harness.play([AUTH_OK + startup_done()]) is PollingStatus.OK


def test_requirepeer_rejects_another_user_and_stops() -> None:
    root = pwd.getpwuid(0).pw_name
    harness = _peer_run("somebody-else", 0)
    error = connect_error(harness)
    assert str(error.attempts[-1].error) == (
        f'requirepeer specifies "somebody-else", but actual peer user name is "{root}"'
    )
    assert harness.actions() == ["open", "close"]  # nothing was sent


@pytest.mark.parametrize(
    ("peer", "message"),
    [
        (None, "requirepeer parameter is not supported on this platform"),
        (2**31 - 7, f"local user with ID {2**31 - 7} does not exist"),
    ],
)
def test_requirepeer_without_credentials(peer: int | None, message: str) -> None:
    error = connect_error(_peer_run("postgres", peer))
    assert str(error.attempts[-1].error) == message


def test_requirepeer_is_ignored_over_tcp() -> None:
    machine = make_machine(hostaddr="192.0.2.1", requirepeer="nobody-at-all")
    harness = Harness(machine)
    assert harness.play([AUTH_OK + startup_done()]) is PollingStatus.OK
    assert not harness.of_type(OpenConnection)[0].peer_credentials


# --------------------------------------------------------------------------
# the caller's overall deadline


def test_deadline_expired_gives_up_at_once() -> None:
    harness = Harness(make_machine(host="a.example,b.example"))
    assert harness.pump() is PollingStatus.READING
    harness.machine.deadline_expired()
    error = connect_error(harness)
    assert len(error.attempts) == 1  # b.example is never tried
    assert error.attempts[0].host == "a.example"
    assert str(error.attempts[0].error) == "timeout expired (overall deadline)"
    assert harness.machine.status is ConnStatus.BAD
    assert harness.actions()[-1] == "close"
    harness.machine.deadline_expired()  # after the end: nothing happens
    assert harness.machine.status is ConnStatus.BAD
    assert harness.machine.poll() is PollingStatus.FAILED


# --------------------------------------------------------------------------
# reset


def test_reset_reconnects_from_the_first_host_in_the_same_order() -> None:
    machine = make_machine(host="a.example,b.example,c.example")
    harness = Harness(machine, refuse={"192.0.2.1"}, addresses={"a.example": ["192.0.2.1"]})
    assert harness.play([AUTH_OK + startup_done(pid=1)]) is PollingStatus.OK
    assert machine.backend_pid == 1
    assert machine.host is not None
    assert machine.host.host == "b.example"
    harness.take()
    machine.reset()
    assert harness.play([AUTH_OK + startup_done(pid=2)]) is PollingStatus.OK
    assert machine.backend_pid == 2
    closes = [data for name, data in harness.log if name == "close"]
    assert closes[-1] == TERMINATE  # the healthy connection got a Terminate
    opened = [a.address for name, a in harness.log if name == "open"]
    assert opened == ["192.0.2.1", "192.0.2.10", "192.0.2.1", "192.0.2.10"]
    walk = statuses(harness.events)
    assert ConnStatus.NEEDED in walk[walk.index(ConnStatus.OK) :]


def test_reset_after_failure_clears_the_error() -> None:
    machine = make_machine()
    harness = Harness(machine)
    connect_error(harness, [error_response("28P01", "password authentication failed")])
    machine.reset()
    assert harness.play([AUTH_OK + startup_done()]) is PollingStatus.OK
    assert machine.status is ConnStatus.OK


def test_reset_keeps_the_load_balanced_order() -> None:
    hosts = ",".join(f"h{i}.example" for i in range(6))
    machine = make_machine(host=hosts, load_balance_hosts="random")
    harness = Harness(machine)
    harness.play([AUTH_OK + startup_done()])
    first = machine.host
    machine.reset()
    harness.play([AUTH_OK + startup_done()])
    assert machine.host == first


# --------------------------------------------------------------------------
# ping_outcome: PQping's rules


def _attempt(error: BaseException, *, step: str = "authentication", auth: bool = False) -> Attempt:
    return Attempt(
        host="h",
        address="192.0.2.1",
        port=5432,
        step=step,
        encryption="plaintext",
        error=error,
        auth_requested=auth,
    )


def _server_error(sqlstate: str) -> ServerError:
    return ServerError({"S": "FATAL", "C": sqlstate, "M": "no"})


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [
        ([_attempt(TransportError("refused"), step="opening the connection")], Ping.NO_RESPONSE),
        ([_attempt(_server_error("57P03"))], Ping.REJECT),
        ([_attempt(_server_error("28P01"))], Ping.OK),
        ([_attempt(_server_error("53300"))], Ping.OK),
        ([_attempt(pgproto.AuthenticationError("no password supplied"), auth=True)], Ping.OK),
        # The last attempt decides ...
        ([_attempt(_server_error("57P03")), _attempt(TransportError("refused"))], Ping.NO_RESPONSE),
        ([_attempt(TransportError("refused")), _attempt(_server_error("57P03"))], Ping.REJECT),
        # ... but a host that never resolved leaves the last address's verdict.
        (
            [
                _attempt(_server_error("57P03")),
                _attempt(TransportError("unknown"), step="resolving the host"),
            ],
            Ping.REJECT,
        ),
        ([_attempt(TransportError("unknown"), step="resolving the host")], Ping.NO_RESPONSE),
    ],
)
def test_ping_outcome(attempts: list[Attempt], expected: Ping) -> None:
    assert ping_outcome(ConnectError(attempts)) is expected


def test_ping_outcome_success_and_bad_options() -> None:
    assert ping_outcome(None) is Ping.OK
    assert ping_outcome(ConninfoError("invalid sslmode value")) is Ping.NO_ATTEMPT


def test_attempt_records_the_authentication_request() -> None:
    machine = make_machine(password=None)
    error = connect_error(Harness(machine), [auth(5, b"salt")])
    assert error.attempts[-1].auth_requested
    assert ping_outcome(error) is Ping.OK
    machine = make_machine()
    error = connect_error(Harness(machine), [error_response("57P03", "starting up")])
    assert not error.attempts[-1].auth_requested
    assert ping_outcome(error) is Ping.REJECT
    assert SECRET not in str(error)


# --------------------------------------------------------------------------
# requirepeer against a real server, with libpq


def _server_user(cluster: Cluster) -> str:
    return pwd.getpwuid(os.stat(cluster.data_dir).st_uid).pw_name


@pytest.mark.parametrize("match", [True, False])
def test_requirepeer_real_server(pg18: Cluster, match: bool) -> None:
    owner = _server_user(pg18)
    wanted = owner if match else "pgproto-nobody"
    conninfo = pg18.dsn(host=str(pg18.socket_dir), user="trust_user", requirepeer=wanted)
    try:
        psycopg.connect(conninfo).close()
        libpq_error = None
    except psycopg.OperationalError as exc:
        libpq_error = str(exc)
    try:
        blocking.connect(conninfo).close()
        ours = None
    except ConnectError as exc:
        ours = str(exc.attempts[-1].error)
    if match:
        assert libpq_error is None
        assert ours is None
    else:
        expected = f'requirepeer specifies "{wanted}", but actual peer user name is "{owner}"'
        assert libpq_error is not None
        assert expected in libpq_error
        assert ours == expected


def test_a_server_that_is_not_postgresql_is_named_as_such() -> None:
    # The type byte is checked before the length word, as libpq does.
    error = connect_error(Harness(make_machine()), [b"HTTP/1.1 400 Bad Request\r\n\r\n"])
    assert str(error.attempts[-1].error) == (
        "expected authentication request from server, but received 'H'"
    )


# --------------------------------------------------------------------------
# an abstract Unix socket (@name) on a real server, with libpq


def test_abstract_unix_socket(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory(18)
    name = f"@pgproto-test-{cluster.port}"
    # The server listens in its directory and in the abstract namespace.
    cluster._settings["unix_socket_directories"] = f"{cluster.socket_dir}, {name}"
    cluster._write_conf()
    cluster.restart()
    conninfo = f"host={name} port={cluster.port} user=postgres dbname=postgres"
    # libpq itself (psycopg.connect resolves host names in Python, and
    # does not know "@" names).
    theirs = psycopg.pq.PGconn.connect(conninfo.encode())
    try:
        assert theirs.status == psycopg.pq.ConnStatus.OK, theirs.get_error_message()
    finally:
        theirs.finish()
    with blocking.connect(conninfo) as conn:
        assert conn.hostaddr == f"{name}/.s.PGSQL.{cluster.port}"
        assert conn.simple_query("SELECT inet_server_addr() IS NULL")[0].rows == [("t",)]

    async def via(module: Any) -> str | None:
        conn = await module.connect(conninfo)
        try:
            hostaddr: str | None = conn.hostaddr
            return hostaddr
        finally:
            await conn.close()

    assert asyncio.run(via(asyncio_adapter)) == f"{name}/.s.PGSQL.{cluster.port}"
    assert trio.run(via, trio_adapter) == f"{name}/.s.PGSQL.{cluster.port}"
    with pytest.raises(ConnectError) as failure:
        blocking.connect(f"host=@pgproto-nobody-{cluster.port} port=1 user=postgres")
    assert "No such file or directory" in str(failure.value) or "refused" in str(failure.value)


# --------------------------------------------------------------------------
# hostaddr is dialled; host names the server for TLS and the password file


def _outcome_libpq(conninfo: str) -> str:
    conn = psycopg.pq.PGconn.connect(conninfo.encode())
    try:
        if conn.status == psycopg.pq.ConnStatus.OK:
            return "ok"
        return str(conn.get_error_message())
    finally:
        conn.finish()


def _outcome_pgproto(conninfo: str) -> str:
    try:
        with blocking.connect(conninfo) as conn:
            assert conn.hostaddr == "127.0.0.1"
            return "ok"
    except ConnectError as exc:
        return str(exc.attempts[-1].error)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", "ok"),  # the certificate names localhost: verified by host
        ("db.invalid", 'server certificate for "localhost" (and 2 other names) does not match'),
        # No host name: verify-full has nothing to check (the IP SAN is not used).
        (None, "host name must be specified for a verified SSL connection"),
    ],
)
def test_hostaddr_dialled_host_verified(
    pg18: Cluster, tls_material: Any, tmp_path: Any, host: str | None, expected: str
) -> None:
    conninfo = (
        f"hostaddr=127.0.0.1 port={pg18.port} user=trust_user dbname=postgres "
        f"sslmode=verify-full sslrootcert={tls_material.ca_cert} passfile={tmp_path}/none"
    )
    if host is not None:
        conninfo += f" host={host}"
    theirs, ours = _outcome_libpq(conninfo), _outcome_pgproto(conninfo)
    if expected == "ok":
        assert (theirs, ours) == ("ok", "ok")
    else:
        assert expected in theirs
        assert expected in ours


def test_hostaddr_password_file_matches_the_host_name(pg18: Cluster, tmp_path: Any) -> None:
    passfile = tmp_path / "pgpass"
    passfile.write_text(
        f"127.0.0.1:{pg18.port}:*:scram_user:wrong-for-the-address\n"
        f"db.example:{pg18.port}:*:scram_user:pw-scram\n"
    )
    passfile.chmod(0o600)
    conninfo = (
        f"host=db.example hostaddr=127.0.0.1 port={pg18.port} user=scram_user "
        f"dbname=postgres sslmode=disable passfile={passfile}"
    )
    assert _outcome_libpq(conninfo) == "ok"
    assert _outcome_pgproto(conninfo) == "ok"
    # Without the host name, the address is the lookup key: the wrong password.
    by_address = conninfo.replace("host=db.example ", "")
    assert "password authentication failed" in _outcome_libpq(by_address)
    assert "password authentication failed" in _outcome_pgproto(by_address)


def test_host_name_with_a_lone_surrogate_is_a_conninfo_error() -> None:
    """No encoding can carry it (libpq could never be given it): refused while
    resolving the parameters, naming the option, before any network activity."""
    with pytest.raises(ConninfoError) as failure:
        blocking.connect("port=5432 user=u sslmode=disable", host="\ud800x.invalid")
    assert failure.value.keyword == "host"
    assert "\ud800" not in str(failure.value)


@pytest.mark.parametrize("host", ["a" * 64 + ".invalid"])
def test_host_names_python_cannot_encode_fail_in_the_resolver(host: str) -> None:
    conninfo = "port=5432 user=u sslmode=disable"
    errors: list[ConnectError] = []
    with pytest.raises(ConnectError) as failure:
        blocking.connect(conninfo, host=host)
    errors.append(failure.value)

    async def via(module: Any) -> None:
        with pytest.raises(ConnectError) as failure:
            await module.connect(conninfo, host=host)
        errors.append(failure.value)

    asyncio.run(via(asyncio_adapter))
    trio.run(via, trio_adapter)
    for error in errors:
        assert "could not translate host name" in str(error.attempts[-1].error)
