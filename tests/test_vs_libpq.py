"""Side by side with libpq: pgproto's connection outcome equals libpq's.

The oracle is psycopg with its bundled libpq.  Every combination below is
tried with both, against the same server, and the outcomes are compared:

* connected or not;
* when connected: TLS in use (``pgconn.ssl_in_use``) and whether the server
  asked for a password (``pgconn.used_password``, compared with pgproto's
  ``auth_method != "none"``);
* when both failed: why -- an option error (no connection attempted) with
  libpq's message, or, for every attempt at the last address tried (e.g.
  TLS, then plaintext for ``sslmode=prefer``), either the server's rejection
  (its ``FATAL`` line, which the server writes identically for both) or a
  client-side refusal (``require_auth``, ``channel_binding``, certificate
  checks, missing password...) with libpq's message; pgproto reproduces
  libpq's texts.  Texts that come from the TLS library (``SSL error: ...``)
  depend on the OpenSSL build on each side and are compared as a class only.
  (psycopg tries each address of a host name separately and reports the last
  one's errors only, hence "the last address".)

libpq cannot say which authentication exchange ran, so pgproto's
``auth_method`` is checked against what the role's pg_hba method implies
instead (an ``md5`` rule with a SCRAM verifier runs SCRAM; SCRAM over TLS with
``channel_binding`` other than ``disable`` runs SCRAM-SHA-256-PLUS, which both
servers offer), and ``require_auth`` -- which libpq enforces -- cross-checks it.

Axes.  Over TCP (``host=localhost``), the full cross product of ``sslmode``
(6) x ``sslnegotiation`` (2) x role (the 9 of :data:`servers.ROLES`) x
``channel_binding`` (3) x ``require_auth`` (:data:`REQUIRE_AUTHS`, 10) runs
against a server with TLS on (``pg18``) and one with TLS off
(``pg18_notls``): 2 x 3240 cases.  Smaller slices cover PostgreSQL 15 (no
direct TLS), the Unix socket, PgBouncer (SCRAM, TLS allowed, no channel
binding, no direct TLS), a certificate that names another host
(verify-full), no root certificate anywhere (verify-* fails), and wrong or
missing passwords.

Isolation: both sides see no ``PG*`` environment variable, a fresh empty
``HOME`` (no ``~/.pgpass``, no ``~/.postgresql/``), and an explicit
``passfile`` that does not exist.

Each test loops over its sub-matrix on a small thread pool (connections are
independent; the pool only overlaps waiting on the servers) and reports every
mismatch in one assertion message.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import getpass
import itertools
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
import trio
from pgproto_adapters import asyncio as asyncio_adapter
from pgproto_adapters import blocking
from pgproto_adapters import trio as trio_adapter
from pgproto_adapters._cluster import Cluster, PgBouncer
from pgproto_adapters._common import QueryResult
from psycopg.conninfo import make_conninfo
from servers import PGBOUNCER_USERS, ROLES, TLSMaterial, drop_pg_environment

import pgproto

SSLMODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
NEGOTIATIONS: Final = ("postgres", "direct")
CHANNEL_BINDINGS: Final = ("disable", "prefer", "require")
#: ``require_auth`` values ("" = not set): each method alone, ``none``, negations,
#: lists with and without ``none``, and one value libpq rejects as an option error.
REQUIRE_AUTHS: Final = (
    "",
    "none",
    "password",
    "md5",
    "scram-sha-256",
    "!scram-sha-256",
    "!none",
    "md5,scram-sha-256",
    "scram-sha-256,none",
    "password,!md5",
)
ALL_ROLES: Final = tuple(ROLES)

#: Threads that run cases concurrently (each case runs libpq, then pgproto).
WORKERS: Final = 4
#: Mismatch lines shown in full in an assertion message.
MAX_LINES: Final = 60


# --------------------------------------------------------------------------
# isolation


@dataclasses.dataclass(frozen=True)
class Isolation:
    """What both clients read from the process: nothing of the developer's."""

    home: Path
    passfile: Path  # does not exist
    env: pgproto.Environment


def _conninfo_defaults_from_env(values: Iterable[tuple[str, str | None, str | None]]) -> list[str]:
    """Keywords whose default differs from the compiled-in one: something leaked in."""
    return [keyword for keyword, value, compiled in values if value not in (None, compiled)]


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Isolation:
    """No ``PG*`` variable, an empty ``HOME``; proven through both sides' defaults.

    Servers must be started before (session fixtures are; never call
    ``getfixturevalue`` for a server after this): the test bed finds its
    binaries through ``HOME``.
    """
    drop_pg_environment(monkeypatch)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    env = pgproto.Environment(environ={}, home=str(home), user=getpass.getuser(), uid=os.geteuid())

    libpq_defaults = [
        (o.keyword.decode(), _text(o.val), _text(o.compiled))
        for o in psycopg.pq.Conninfo.get_defaults()
        if o.envvar is not None and o.keyword not in (b"user", b"dbname")
    ]
    assert _conninfo_defaults_from_env(libpq_defaults) == []
    pgproto_defaults = [
        (o.keyword, o.val, o.compiled)
        for o in pgproto.conninfo_defaults(env=env)
        if o.envvar is not None and o.keyword not in ("user", "dbname")
    ]
    assert _conninfo_defaults_from_env(pgproto_defaults) == []
    return Isolation(home=home, passfile=home / "no-such-pgpass", env=env)


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


# --------------------------------------------------------------------------
# cases and outcomes


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a case connects: a server and a transport."""

    name: str  # for reports
    host: str  # host name or socket directory
    port: int
    bouncer: bool = False

    @classmethod
    def tcp(cls, name: str, server: Cluster | PgBouncer) -> Target:
        return cls(name, "localhost", server.port, isinstance(server, PgBouncer))

    @classmethod
    def unix(cls, name: str, server: Cluster) -> Target:
        return cls(f"{name}/unix", str(server.socket_dir), server.port)


@dataclasses.dataclass(frozen=True)
class Case:
    """One combination of options, tried with both clients."""

    target: Target
    user: str
    sslmode: str
    sslnegotiation: str = "postgres"
    channel_binding: str = "prefer"
    require_auth: str = ""  # not set
    root: bool = True  # sslrootcert = the trustme CA; else none at all
    password: str = "right"  # right, wrong or missing

    def params(self, tls: TLSMaterial, iso: Isolation) -> dict[str, str]:
        params = {
            "host": self.target.host,
            "port": str(self.target.port),
            "dbname": "postgres",
            "user": self.user,
            "sslmode": self.sslmode,
            "sslnegotiation": self.sslnegotiation,
            "channel_binding": self.channel_binding,
            "passfile": str(iso.passfile),
            "connect_timeout": "10",
        }
        if self.require_auth:
            params["require_auth"] = self.require_auth
        if self.root:
            params["sslrootcert"] = str(tls.ca_cert)
        if self.user == "certuser":
            params.update(sslcert=str(tls.client_cert), sslkey=str(tls.client_key))
        role = ROLES.get(self.user)
        secret = role.password if role is not None and role.password is not None else "unused"
        if self.password == "right":
            params["password"] = secret
        elif self.password == "wrong":
            params["password"] = "wrong-" + secret
        return params

    def label(self) -> str:
        parts = [
            self.target.name,
            self.user,
            f"sslmode={self.sslmode}",
            f"sslnegotiation={self.sslnegotiation}",
            f"channel_binding={self.channel_binding}",
            f"require_auth={self.require_auth or '(unset)'}",
        ]
        if not self.root:
            parts.append("no-root")
        if self.password != "right":
            parts.append(f"password={self.password}")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one client achieved.  ``auth_method`` and below: pgproto only."""

    connected: bool
    ssl: bool = False
    used_password: bool = False
    #: "" when connected, else "option: <message>", or per attempt at the last
    #: address "client: <reason>" or the server's "FATAL:  ..." line, joined
    #: with " -> " (see :func:`_failure_class`).
    failure: str = ""
    message: str = ""
    auth_method: str | None = None
    channel_binding_used: bool = False
    session_user: str | None = None

    def key(self) -> tuple[bool, bool, bool, str]:
        return (self.connected, self.ssl, self.used_password, self.failure)

    def describe(self) -> str:
        if self.connected:
            text = f"connected ssl={self.ssl} used_password={self.used_password}"
            return text + (f" auth={self.auth_method}" if self.auth_method else "")
        return f"failed [{self.failure}] {self.message!r}"


_SERVER_LINE: Final = re.compile(r"(FATAL|ERROR|PANIC):  ")
_ATTEMPT_PREFIX: Final = re.compile(r"connection to server (?:at|on) [^\n]*? failed: ")
_PSYCOPG_PREFIX: Final = re.compile(r"^connection (?:failed|is bad): ")
_TLS_LIBRARY_TEXT: Final = re.compile(r"SSL (?:SYSCALL )?error: ")


def _failure_class(last_reason: str) -> str:
    """What ended the last attempt, from its text (libpq's, or pgproto's copy of it).

    The server's words (its first line) and the client's own refusals are kept
    verbatim; texts that come from the TLS library ("SSL error: ...") depend on
    its version and are only classed.
    """
    reason = last_reason.strip()
    first_line = reason.split("\n", 1)[0]
    if _SERVER_LINE.match(first_line):
        return first_line
    if _TLS_LIBRARY_TEXT.match(reason):
        return "client: SSL error (text from the TLS library)"
    return f"client: {reason}"


def _failure_classes(reasons: Iterable[str]) -> str:
    return " -> ".join(_failure_class(reason) for reason in reasons)


def libpq_outcome(params: dict[str, str]) -> Outcome:
    """Connect with psycopg (its libpq does the work)."""
    try:
        conn = psycopg.connect(make_conninfo("", **params))
    except psycopg.Error as exc:
        message = _PSYCOPG_PREFIX.sub("", str(exc)).strip()
        reasons = _ATTEMPT_PREFIX.split(message)
        if len(reasons) == 1:  # no attempt was made: libpq refused the options
            return Outcome(False, failure=f"option: {message}", message=message)
        # psycopg tries each address of the host itself and raises the last
        # one's error: it holds the reasons of every attempt at that address.
        return Outcome(False, failure=_failure_classes(reasons[1:]), message=message)
    try:
        return Outcome(True, conn.pgconn.ssl_in_use, conn.pgconn.used_password)
    finally:
        conn.close()


def _pgproto_failure(exc: Exception) -> Outcome:
    if isinstance(exc, pgproto.ConninfoError):
        return Outcome(False, failure=f"option: {exc}", message=str(exc))
    if isinstance(exc, pgproto.ConnectError) and exc.attempts:
        last = exc.attempts[-1]
        at_last_address = [
            str(a.error) for a in exc.attempts if (a.host, a.address) == (last.host, last.address)
        ]
        return Outcome(False, failure=_failure_classes(at_last_address), message=str(exc))
    # Anything else is a pgproto bug; the class makes sure it is reported.
    return Outcome(False, failure=f"unexpected {type(exc).__name__}", message=str(exc))


def _pgproto_success(
    conn: blocking.Connection | asyncio_adapter.Connection | trio_adapter.Connection,
    session_user: str | None,
) -> Outcome:
    method = conn.auth_method
    return Outcome(
        True,
        conn.ssl_in_use,
        method is not None and method != "none",
        auth_method=method,
        channel_binding_used=conn.channel_binding_used,
        session_user=session_user,
    )


def _first_value(results: Sequence[QueryResult]) -> str | None:
    return results[0].rows[0][0] if results and results[0].rows else None


def _query_failed(exc: Exception) -> str:
    """Stands in for ``current_user`` when the query failed, so the report shows it."""
    return f"<select current_user failed: {exc!r}>"


def _keywords(params: dict[str, str]) -> dict[str, Any]:
    """``params`` as keyword arguments (``connect`` also has non-string keywords)."""
    return dict(params)


def pgproto_outcome(params: dict[str, str], iso: Isolation) -> Outcome:
    """Connect with pgproto's blocking adapter and ask the server who we are."""
    try:
        conn = blocking.connect(env=iso.env, **_keywords(params))
    except Exception as exc:
        return _pgproto_failure(exc)
    try:
        try:
            user = _first_value(conn.simple_query("select current_user"))
        except Exception as exc:
            user = _query_failed(exc)
        return _pgproto_success(conn, user)
    finally:
        conn.close()


def implied_auth_method(case: Case, ssl: bool) -> str:
    """The exchange the server must have chosen, from the role's pg_hba line."""
    if case.target.bouncer:
        return "SCRAM-SHA-256"  # PgBouncer 1.x never offers SCRAM-SHA-256-PLUS
    role = ROLES.get(case.user)
    if role is None or role.method in ("trust", "cert"):
        return "none"
    if role.method == "password":
        return "password"
    if role.method == "md5" and role.stored == "md5":
        return "md5"
    return "SCRAM-SHA-256-PLUS" if ssl and case.channel_binding != "disable" else "SCRAM-SHA-256"


@dataclasses.dataclass
class Comparison:
    """The outcomes of every case, and what disagrees."""

    results: list[tuple[Case, Outcome, Outcome]]

    def mismatches(self) -> list[str]:
        lines = []
        for case, lib, pgp in self.results:
            if lib.key() != pgp.key():
                lines.append(
                    f"{case.label()}\n    libpq:   {lib.describe()}\n    pgproto: {pgp.describe()}"
                )
        return lines

    def auth_problems(self) -> list[str]:
        """Connected pgproto sessions whose exchange or user is not what pg_hba implies."""
        lines = []
        for case, _, pgp in self.results:
            if not pgp.connected:
                continue
            expected = implied_auth_method(case, pgp.ssl)
            plus = expected.endswith("-PLUS")
            if (pgp.auth_method, pgp.channel_binding_used, pgp.session_user) != (
                expected,
                plus,
                case.user,
            ):
                lines.append(
                    f"{case.label()}: auth_method={pgp.auth_method} "
                    f"channel_binding_used={pgp.channel_binding_used} "
                    f"current_user={pgp.session_user}; expected {expected}, {plus}, {case.user}"
                )
        return lines

    def connected_users(self) -> set[str]:
        """Users libpq logged in as at least once (proof the matrix is not vacuous)."""
        return {case.user for case, lib, _ in self.results if lib.connected}

    def check(self) -> None:
        mismatches = self.mismatches()
        auth = self.auth_problems()
        if not mismatches and not auth:
            return
        parts = [f"{len(self.results)} cases compared"]
        if mismatches:
            parts.append(f"{len(mismatches)} outcome mismatches, by kind:")
            parts.extend(self._kinds())
            parts.append("first mismatches:")
            parts.extend(mismatches[:MAX_LINES])
            if len(mismatches) > MAX_LINES:
                parts.append(f"... and {len(mismatches) - MAX_LINES} more")
        if auth:
            parts.append(f"{len(auth)} connections with an unexpected exchange:")
            parts.extend(auth[:MAX_LINES])
        pytest.fail("\n".join(parts), pytrace=False)

    def _kinds(self) -> list[str]:
        kinds: collections.Counter[tuple[str, str]] = collections.Counter()
        for _, lib, pgp in self.results:
            if lib.key() != pgp.key():
                kinds[_short(lib), _short(pgp)] += 1
        return [f"  {n:5d} x libpq {a} / pgproto {b}" for (a, b), n in sorted(kinds.items())]


def _short(outcome: Outcome) -> str:
    if outcome.connected:
        return f"connected(ssl={outcome.ssl}, pw={outcome.used_password})"
    return f"failed[{outcome.failure[:100]}]"


def compare(cases: Sequence[Case], tls: TLSMaterial, iso: Isolation) -> Comparison:
    """Run every case with libpq then pgproto; results in case order."""
    assert not any(key.startswith("PG") for key in os.environ)

    def run(case: Case) -> tuple[Case, Outcome, Outcome]:
        params = case.params(tls, iso)
        return case, libpq_outcome(params), pgproto_outcome(params, iso)

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return Comparison(list(pool.map(run, cases)))


def product(
    targets: Iterable[Target],
    users: Iterable[str],
    *,
    sslmodes: Iterable[str] = SSLMODES,
    negotiations: Iterable[str] = NEGOTIATIONS,
    channel_bindings: Iterable[str] = CHANNEL_BINDINGS,
    require_auths: Iterable[str] = REQUIRE_AUTHS,
    root: bool = True,
    passwords: Iterable[str] = ("right",),
) -> list[Case]:
    """The cross product of the given axes, in a fixed order."""
    return [
        Case(target, user, mode, neg, cb, ra, root, pw)
        for target, user, mode, neg, cb, ra, pw in itertools.product(
            targets,
            users,
            sslmodes,
            negotiations,
            channel_bindings,
            require_auths,
            passwords,
        )
    ]


# --------------------------------------------------------------------------
# the matrices

_TCP_SERVERS: Final = {
    # fixture name: users libpq must log in as somewhere in the matrix
    "pg18": set(ALL_ROLES),
    "pg18_notls": set(ALL_ROLES) - {"certuser", "sslonly_user"},
}


@pytest.fixture(scope="session", params=list(_TCP_SERVERS))
def tcp_server(request: pytest.FixtureRequest) -> tuple[str, Cluster]:
    """``pg18`` and ``pg18_notls`` in turn, with their fixture name (session-scoped,
    so that it starts before :func:`isolated` changes ``HOME``)."""
    cluster: Cluster = request.getfixturevalue(request.param)
    return request.param, cluster


def test_tcp_full_matrix(
    tcp_server: tuple[str, Cluster], tls_material: TLSMaterial, isolated: Isolation
) -> None:
    """sslmode x sslnegotiation x role x channel_binding x require_auth over TCP."""
    name, server = tcp_server
    cases = product([Target.tcp(name, server)], ALL_ROLES)
    assert len(cases) == 3240
    comparison = compare(cases, tls_material, isolated)
    comparison.check()
    assert comparison.connected_users() == _TCP_SERVERS[name]


def test_pg15(pg15: Cluster, tls_material: TLSMaterial, isolated: Isolation) -> None:
    """PostgreSQL 15: no direct TLS; SCRAM with and without channel binding."""
    cases = product(
        [Target.tcp("pg15", pg15)],
        ALL_ROLES,
        channel_bindings=("disable", "require"),
        require_auths=("", "none", "md5,scram-sha-256", "!none"),
    )
    comparison = compare(cases, tls_material, isolated)
    comparison.check()
    assert comparison.connected_users() == set(ALL_ROLES)


def test_unix_socket(pg18: Cluster, tls_material: TLSMaterial, isolated: Isolation) -> None:
    """Over the socket TLS is never used, whatever sslmode says; ``local`` lines decide."""
    cases = product(
        [Target.unix("pg18", pg18)],
        ALL_ROLES,
        sslmodes=("disable", "prefer", "require", "verify-full"),
        channel_bindings=("prefer", "require"),
        require_auths=("", "none", "password", "scram-sha-256", "!none", "md5,scram-sha-256"),
    )
    comparison = compare(cases, tls_material, isolated)
    comparison.check()
    reachable = {name for name, role in ROLES.items() if "unix" in role.transports}
    assert comparison.connected_users() == reachable


def test_pgbouncer(pgbouncer: PgBouncer, tls_material: TLSMaterial, isolated: Isolation) -> None:
    """SCRAM through PgBouncer (TLS allowed, no -PLUS, no direct TLS), and a user it lacks."""
    cases = product(
        [Target.tcp("pgbouncer", pgbouncer)],
        [*PGBOUNCER_USERS, "md5_user"],
        require_auths=("", "none", "scram-sha-256", "!scram-sha-256", "md5,scram-sha-256"),
    )
    comparison = compare(cases, tls_material, isolated)
    comparison.check()
    assert comparison.connected_users() == set(PGBOUNCER_USERS)


def test_wrong_name_certificate(
    pg18_wrong_cert: Cluster, tls_material: TLSMaterial, isolated: Isolation
) -> None:
    """A certificate for another name: verify-full fails, verify-ca and below connect."""
    target = Target.tcp("pg18_wrong_cert", pg18_wrong_cert)
    cases = [
        *product(
            [target],
            ["postgres"],
            channel_bindings=("prefer", "require"),
            require_auths=("", "none"),
        ),
        *product(
            [target], ["postgres"], require_auths=("",), channel_bindings=("prefer",), root=False
        ),
    ]
    comparison = compare(cases, tls_material, isolated)
    comparison.check()
    assert comparison.connected_users() == {"postgres"}


def test_no_root_certificate(
    pg18: Cluster, pg18_notls: Cluster, tls_material: TLSMaterial, isolated: Isolation
) -> None:
    """No sslrootcert, no ``~/.postgresql/root.crt``: verify-* fails, require is unverified."""
    cases = product(
        [Target.tcp("pg18", pg18), Target.tcp("pg18_notls", pg18_notls)],
        ["trust_user", "scram_user", "certuser", "sslonly_user"],
        channel_bindings=("prefer", "require"),
        require_auths=("",),
        root=False,
    )
    comparison = compare(cases, tls_material, isolated)
    comparison.check()
    assert comparison.connected_users() == {"trust_user", "scram_user", "certuser", "sslonly_user"}


def test_wrong_or_missing_password(
    pg18: Cluster, tls_material: TLSMaterial, isolated: Isolation
) -> None:
    """The server rejects a wrong password; a missing one is refused by the client."""
    users = [name for name, role in ROLES.items() if role.password is not None]
    cases = product(
        [Target.tcp("pg18", pg18), Target.unix("pg18", pg18)],
        users,
        sslmodes=("allow", "prefer", "require"),
        negotiations=("postgres",),
        channel_bindings=("prefer",),
        require_auths=("",),
        passwords=("wrong", "missing"),
    )
    comparison = compare(cases, tls_material, isolated)
    comparison.check()
    assert comparison.connected_users() == set()


# --------------------------------------------------------------------------
# the async adapters, on a handful of cases


_SMOKE_CONNECTED: Final = {"scram_user", "md5scram_user", "certuser", "nossl_user", "md5_user"}


def _smoke_cases(pg18: Cluster, pg18_notls: Cluster) -> list[Case]:
    tls_target, plain = Target.tcp("pg18", pg18), Target.tcp("pg18_notls", pg18_notls)
    return [
        Case(tls_target, "scram_user", "verify-full", "direct", "require"),
        Case(tls_target, "md5scram_user", "require", channel_binding="disable"),
        Case(tls_target, "certuser", "verify-ca"),
        Case(tls_target, "nossl_user", "prefer"),
        Case(plain, "md5_user", "prefer", require_auth="md5"),
        Case(plain, "sslonly_user", "allow"),
        Case(plain, "scram_user", "require"),
        Case(tls_target, "password_user", "prefer", require_auth="!password"),
        Case(tls_target, "scram_utf8_user", "disable", password="wrong"),
        Case(tls_target, "trust_user", "prefer", "direct"),
    ]


async def _async_outcome(adapter: Any, params: dict[str, str], iso: Isolation) -> Outcome:
    """Connect with an async *adapter* module (asyncio or trio), run one query."""
    try:
        conn = await adapter.connect(env=iso.env, **_keywords(params))
    except Exception as exc:
        return _pgproto_failure(exc)
    try:
        try:
            user = _first_value(await conn.simple_query("select current_user"))
        except Exception as exc:
            user = _query_failed(exc)
        return _pgproto_success(conn, user)
    finally:
        await conn.close()


def _async_comparison(
    cases: Sequence[Case],
    tls: TLSMaterial,
    iso: Isolation,
    run_pgproto: Callable[[dict[str, str]], Outcome],
) -> Comparison:
    results = []
    for case in cases:
        params = case.params(tls, iso)
        results.append((case, libpq_outcome(params), run_pgproto(params)))
    return Comparison(results)


def test_asyncio_adapter(
    pg18: Cluster, pg18_notls: Cluster, tls_material: TLSMaterial, isolated: Isolation
) -> None:
    comparison = _async_comparison(
        _smoke_cases(pg18, pg18_notls),
        tls_material,
        isolated,
        lambda params: asyncio.run(_async_outcome(asyncio_adapter, params, isolated)),
    )
    comparison.check()
    assert comparison.connected_users() == _SMOKE_CONNECTED


def test_trio_adapter(
    pg18: Cluster, pg18_notls: Cluster, tls_material: TLSMaterial, isolated: Isolation
) -> None:
    comparison = _async_comparison(
        _smoke_cases(pg18, pg18_notls),
        tls_material,
        isolated,
        lambda params: trio.run(_async_outcome, trio_adapter, params, isolated),
    )
    comparison.check()
    assert comparison.connected_users() == _SMOKE_CONNECTED


# --------------------------------------------------------------------------
# the harness itself


def test_harness_reports_differences() -> None:
    """A difference in any compared field fails the comparison; equal outcomes pass."""
    case = Case(Target("fake", "localhost", 1), "scram_user", "require")
    libpq = Outcome(True, ssl=True, used_password=True)
    good = dataclasses.replace(
        libpq,
        auth_method="SCRAM-SHA-256-PLUS",
        channel_binding_used=True,
        session_user="scram_user",
    )
    Comparison([(case, libpq, good)]).check()
    for bad in (
        dataclasses.replace(good, ssl=False),
        dataclasses.replace(good, used_password=False),
        Outcome(False, failure="client: channel binding required, but ..."),
    ):
        with pytest.raises(pytest.fail.Exception, match="1 outcome mismatches"):
            Comparison([(case, libpq, bad)]).check()
    for bad in (
        dataclasses.replace(good, auth_method="SCRAM-SHA-256"),
        dataclasses.replace(good, channel_binding_used=False),
        dataclasses.replace(good, session_user="postgres"),
    ):
        with pytest.raises(pytest.fail.Exception, match="1 connections with an unexpected"):
            Comparison([(case, libpq, bad)]).check()
    failed = Outcome(False, failure="FATAL:  password authentication failed")
    Comparison([(case, failed, failed)]).check()
    with pytest.raises(pytest.fail.Exception, match="1 outcome mismatches"):
        Comparison([(case, failed, Outcome(False, failure="client: fe_sendauth"))]).check()


@pytest.mark.parametrize(
    ("reason", "failure"),
    [
        (
            'FATAL:  no pg_hba.conf entry for host "::1"\nDETAIL:  x',
            'FATAL:  no pg_hba.conf entry for host "::1"',
        ),
        ("fe_sendauth: no password supplied\n", "client: fe_sendauth: no password supplied"),
        ("SSL error: certificate verify failed", "client: SSL error (text from the TLS library)"),
        ("SSL SYSCALL error: EOF detected", "client: SSL error (text from the TLS library)"),
    ],
    ids=["server", "client", "tls-library", "tls-library-syscall"],
)
def test_failure_class(reason: str, failure: str) -> None:
    assert _failure_class(reason) == failure
