"""Multi-host failover against real servers: pgproto picks what libpq picks.

Every case runs one connection string through libpq (``PQconnectdb`` and,
when it fails, ``PQping``, from psycopg's bundled libpq, in worker processes
-- see ``failover_helpers`` for why) and through each pgproto adapter
(blocking, asyncio, trio), concurrently, and compares:

* the server connected to (its port and ``pg_is_in_recovery()``), or
* when all failed: the attempts in order -- address (or the host name that
  did not resolve), port, and the reason text, parsed from libpq's message
  and taken from ``ConnectError.attempts`` -- and the ping verdict
  (``PQping`` against ``pgproto.ping_outcome``, which rests on
  ``Attempt.auth_requested`` and ``sqlstate``).

libpq itself is checked against a model of the rules (reference spec §4.3,
§4.5, §8.3): hosts in order, each failure moves on, a rejected server moves
to the next host, ``prefer-standby`` makes a second pass that accepts any
server.  So a case fails if the test bed is not what it claims (a standby
that is not in recovery) as well as when pgproto and libpq disagree.

Endpoints, one letter each in a host order:

====  =====================================================================
P     the primary of ``replicated`` (127.0.0.1)
S     its hot standby (127.0.0.1)
C     ``closed_port``: connection refused
U     :data:`UNKNOWN_HOST` (port 5432): the name does not resolve
L     ``silent_listener``: accepts and never answers (connect_timeout=2)
====  =====================================================================

Sections:

1. the matrix: every ``target_session_attrs`` x 28 host orders, also
   checked against ``psycopg.connect`` (which server only);
2. ``prefer-standby``: the standby wherever it is listed, else the primary
   in a second pass from the first host (also with the standby stopped),
   seen through the adapters' ``AttemptFailed`` events;
3. promotion of the standby of a fresh pair;
4. a silent first host costs connect_timeout, then the second answers;
5. the check queries: relays (``failover_helpers.FilterProxy``) hide
   ``in_hot_standby`` and ``default_transaction_read_only`` so that
   ``SHOW transaction_read_only`` / ``SELECT pg_is_in_recovery()`` run --
   in front of the servers and of PgBouncer, which itself forwards both
   parameters -- and the queries each client sent are compared;
6. no file descriptor leaks, per adapter;
7. the ``Attempt`` records and the message of one failure, field by field.

Isolation: no ``PG*`` variable reaches either side, ``passfile`` names a
file that does not exist, ``gssencmode=disable`` (the bundled libpq has
GSSAPI; pgproto behaves as a build without it) and ``sslmode=prefer`` (the
replicated servers have no TLS, so every connection falls back to plaintext
on the same socket, which neither client reports as an attempt).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import pytest
from failover_helpers import (
    ADAPTERS,
    CLIENTS,
    REPORTED,
    FilterProxy,
    LibpqWorkers,
    Outcome,
    Tried,
    attempt_tried,
    outcome,
    parse_libpq_message,
    pgproto_outcome,
    run_parallel,
)
from fdcheck import assert_no_fd_leak
from pgproto_adapters._cluster import PgBouncer
from servers import (
    ROLES,
    UNRESOLVABLE_HOST,
    ReplicaPair,
    SilentListener,
    drop_pg_environment,
    multi_host_conninfo,
)

import pgproto

ATTRS: Final = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")

#: Host orders of the matrix (letters as in the module docstring).
ORDERS: Final = (
    # each endpoint alone
    "P",
    "S",
    "C",
    "U",
    # both servers, both orders, and each twice
    "PS",
    "SP",
    "PP",
    "SS",
    # failures before the servers
    "CP",
    "CS",
    "UP",
    "US",
    "CUS",
    "UCP",
    # failures between the servers
    "PCS",
    "SCP",
    "PUS",
    "SUP",
    # one server, failures after it
    "PC",
    "SC",
    "SU",
    "CSU",
    # no server at all
    "CU",
    "UC",
    "CC",
    # the silent listener: before, after and among failures
    "LS",
    "PL",
    "CLU",
)

#: Concurrent connection attempts while computing the matrix.
WORKERS: Final = 16
#: Processes that run libpq (see ``failover_helpers.LibpqWorkers``).
LIBPQ_PROCESSES: Final = 8

#: libpq's reasons, verbatim (TCP, glibc).
REFUSED: Final = (
    "Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?"
)
TIMEOUT: Final = "timeout expired"

#: A host name that does not resolve, without asking a name server: glibc
#: refuses the "!" (``res_hnok``) and fails with EAI_NONAME at once.  The
#: test bed's UNRESOLVABLE_HOST goes to the configured name server, which here
#: drops queries when many arrive together (16 concurrent lookups: some take
#: 10 s and end in EAI_AGAIN; 200 in a row: some take 5 s), so the matrix,
#: which resolves a name hundreds of times concurrently, uses this one;
#: :func:`test_attempt_records` uses UNRESOLVABLE_HOST, once per adapter.
UNKNOWN_HOST: Final = "no!such!host.invalid"


def unresolved(host: str) -> str:
    """The start of libpq's message for a name that does not resolve."""
    return f'could not translate host name "{host}" to address: '


#: The check queries of target_session_attrs (spec §8.3).
SHOW: Final = "SHOW transaction_read_only"
IN_RECOVERY: Final = "SELECT pg_catalog.pg_is_in_recovery()"


def check_query(target: str, hidden: frozenset[str]) -> str | None:
    """The query libpq sends for *target* when the server did not report the
    parameters in *hidden*: read-write/read-only need both, the others only
    in_hot_standby."""
    if target in ("read-write", "read-only") and hidden:
        return SHOW
    if target in ("primary", "standby", "prefer-standby") and "in_hot_standby" in hidden:
        return IN_RECOVERY
    return None


#: What the helpers ask once connected (not a check: no ``pg_catalog.``).
OUR_QUERY: Final = "SELECT pg_is_in_recovery()"

_app_names = itertools.count(1)


# --------------------------------------------------------------------------
# endpoints, connection strings and the model


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One place a host list can point at."""

    code: str  # its letter in an order
    label: str
    host: str
    port: int
    standby: bool | None  # None: not a server
    read_only: bool = False  # default_transaction_read_only=on

    @property
    def where(self) -> str:
        """How both clients name it in an attempt."""
        return self.host

    def failure(self) -> str:
        """The reason a non-server fails (a prefix for the unresolvable name)."""
        return {"C": REFUSED, "U": unresolved(self.host), "L": TIMEOUT}[self.code]


@pytest.fixture(scope="module", autouse=True)
def _no_pg_environment() -> Iterator[None]:
    """No PG* variable reaches libpq or pgproto in this module."""
    with pytest.MonkeyPatch.context() as patch:
        drop_pg_environment(patch)
        yield


@pytest.fixture(scope="module")
def libpq(_no_pg_environment: None) -> Iterator[LibpqWorkers]:
    """libpq, in worker processes that see this module's environment."""
    workers = LibpqWorkers(LIBPQ_PROCESSES)
    yield workers
    workers.close()


@pytest.fixture(scope="module")
def passfile(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A password file that does not exist (neither side reads ~/.pgpass)."""
    return str(tmp_path_factory.mktemp("failover") / "no-such-pgpass")


@pytest.fixture(scope="module")
def endpoints(
    replicated: ReplicaPair, closed_port: int, silent_listener: SilentListener
) -> dict[str, Endpoint]:
    return {
        "P": Endpoint("P", "primary", replicated.host, replicated.primary.port, False),
        "S": Endpoint("S", "standby", replicated.host, replicated.standby.port, True),
        "C": Endpoint("C", "closed", "127.0.0.1", closed_port, None),
        "U": Endpoint("U", "unknown", UNKNOWN_HOST, 5432, None),
        "L": Endpoint("L", "silent", silent_listener.host, silent_listener.port, None),
    }


def conninfo(
    hosts: Sequence[Endpoint | tuple[str, int]], attrs: str, passfile: str, **extra: str | int
) -> str:
    """A multi-host string; connect_timeout=2 when the silent listener is listed."""
    pairs = [(e.host, e.port) if isinstance(e, Endpoint) else e for e in hosts]
    silent = any(isinstance(e, Endpoint) and e.code == "L" for e in hosts)
    params: dict[str, str | int] = {
        "target_session_attrs": attrs,
        "connect_timeout": 2 if silent else 10,
        "sslmode": "prefer",
        "gssencmode": "disable",
        "passfile": passfile,
        **extra,
    }
    return multi_host_conninfo(*pairs, **params)


def rejection(target: str, standby: bool, read_only: bool = False) -> str | None:
    """Why a server is rejected for *target* (spec §8.3), or None if accepted."""
    if target == "read-write" and (standby or read_only):
        return "session is read-only"
    if target == "read-only" and not (standby or read_only):
        return "session is not read-only"
    if target == "primary" and standby:
        return "server is in hot standby mode"
    if target in ("standby", "prefer-standby") and not standby:
        return "server is not in hot standby mode"
    return None


@dataclasses.dataclass(frozen=True)
class Visit:
    """One server reached by the model: under which target, and its verdict."""

    endpoint: Endpoint
    target: str
    rejected: str | None


@dataclasses.dataclass(frozen=True)
class Expected:
    """What libpq must do with a host order, by the rules."""

    picked: Endpoint | None
    tried: tuple[Tried, ...]  # failed attempts, before the pick or all of them
    visits: tuple[Visit, ...]  # every server that answered, in order

    @property
    def timeouts(self) -> int:
        return sum(t.reason == TIMEOUT for t in self.tried)


def expected(attrs: str, hosts: Sequence[Endpoint]) -> Expected:
    """Walk the host list as libpq does (spec §4.3 and §8.3)."""
    tried: list[Tried] = []
    visits: list[Visit] = []
    passes = [attrs, "any"] if attrs == "prefer-standby" else [attrs]
    for target in passes:
        for endpoint in hosts:
            if endpoint.standby is None:
                port = None if endpoint.code == "U" else endpoint.port
                tried.append(Tried(endpoint.where, port, endpoint.failure()))
                continue
            reason = rejection(target, endpoint.standby, endpoint.read_only)
            visits.append(Visit(endpoint, target, reason))
            if reason is None:
                return Expected(endpoint, tuple(tried), tuple(visits))
            tried.append(Tried(endpoint.where, endpoint.port, reason))
    return Expected(None, tuple(tried), tuple(visits))


def _category(tried: Tried) -> Tried:
    """*tried* with the unresolvable name's resolver text cut off (it is the
    C library's: "Name or service not known" or "No address associated...")."""
    prefix = unresolved(tried.where)
    if tried.reason.startswith(prefix):
        return dataclasses.replace(tried, reason=prefix)
    return tried


def _report(title: str, outcomes: dict[str, Outcome]) -> str:
    lines = [title]
    for client, result in outcomes.items():
        lines.append(f"  {client:9s} {result.describe()} ({result.elapsed:.2f} s)")
        if not result.connected:
            lines.extend(f"            | {line}" for line in result.message.splitlines())
    return "\n".join(lines)


def check_against_libpq(
    outcomes: dict[str, Outcome], want: Expected, title: str, labels: dict[int, str]
) -> None:
    """libpq follows the model; every adapter equals libpq."""
    libpq = outcomes["libpq"]
    report = _report(title, outcomes)
    if want.picked is None:
        assert not libpq.connected, f"libpq connected, the rules say it fails\n{report}"
        assert [_category(t) for t in libpq.tried] == list(want.tried), (
            f"libpq's attempts are not the rules'\n{report}"
        )
    else:
        assert (libpq.port, libpq.in_recovery) == (want.picked.port, want.picked.standby), (
            f"libpq did not pick {want.picked.label}\n{report}"
        )
    for adapter in ADAPTERS:
        mine = outcomes[adapter]
        if mine.key() != libpq.key():
            got = labels.get(mine.port or 0, "nothing")
            pytest.fail(
                f"{adapter} differs from libpq (libpq picked "
                f"{labels.get(libpq.port or 0, 'nothing')}, {adapter} {got})\n{report}",
                pytrace=False,
            )


def run_clients(
    libpq: LibpqWorkers, make_conninfo: Callable[[str], str], clients: Sequence[str] = CLIENTS
) -> dict[str, Outcome]:
    """Every client at once (each on its own thread and, for asyncio and trio,
    its own event loop); *make_conninfo* gets the client's name."""
    jobs = [functools.partial(outcome, client, make_conninfo(client), libpq) for client in clients]
    return dict(zip(clients, run_parallel(jobs, workers=len(jobs)), strict=True))


def _labels(endpoints: dict[str, Endpoint]) -> dict[int, str]:
    return {e.port: e.label for e in endpoints.values()}


# --------------------------------------------------------------------------
# 1. the matrix


MatrixKey = tuple[str, str]  # (attrs, order)


@pytest.fixture(scope="module")
def matrix(
    endpoints: dict[str, Endpoint], passfile: str, libpq: LibpqWorkers
) -> dict[MatrixKey, dict[str, Outcome]]:
    """Every (attrs, order) with every client and psycopg.connect, computed
    once, concurrently."""
    # The slow cases (the silent listener) first, so that they overlap.
    cases = [(attrs, order) for order in ORDERS for attrs in ATTRS]
    cases.sort(key=lambda case: "L" not in case[1])
    clients = (*CLIENTS, "psycopg")
    jobs: list[Callable[[], Outcome]] = []
    for attrs, order in cases:
        text = conninfo([endpoints[c] for c in order], attrs, passfile)
        jobs.extend(functools.partial(outcome, client, text, libpq) for client in clients)
    results = iter(run_parallel(jobs, workers=WORKERS))
    return {case: {client: next(results) for client in clients} for case in cases}


@pytest.mark.slow
@pytest.mark.parametrize("attrs", ATTRS)
@pytest.mark.parametrize("order", ORDERS)
def test_matrix(
    matrix: dict[MatrixKey, dict[str, Outcome]],
    endpoints: dict[str, Endpoint],
    attrs: str,
    order: str,
) -> None:
    hosts = [endpoints[c] for c in order]
    want = expected(attrs, hosts)
    outcomes = dict(matrix[attrs, order])
    psycopg = outcomes.pop("psycopg")
    title = f"host order {'-'.join(e.label for e in hosts)}, target_session_attrs={attrs}"
    check_against_libpq(outcomes, want, title, _labels(endpoints))
    # psycopg.connect (its own loop over libpq) picks the same server.
    libpq = outcomes["libpq"]
    assert (psycopg.port, psycopg.in_recovery) == (libpq.port, libpq.in_recovery), (
        f"psycopg.connect: {psycopg.describe()}\n{_report(title, outcomes)}"
    )
    # Each connect_timeout expiry takes 2 s (no less), per client.
    for client, result in outcomes.items():
        assert 1.9 * want.timeouts <= result.elapsed < 2.0 * want.timeouts + 8.0, (
            f"{client}: {result.elapsed:.2f} s for {want.timeouts} timeouts\n{title}"
        )


@pytest.mark.slow
def test_matrix_is_not_vacuous(matrix: dict[MatrixKey, dict[str, Outcome]]) -> None:
    """The matrix connects to both servers and fails, through every kind of failure."""
    libpq = [outcomes["libpq"] for outcomes in matrix.values()]
    assert len(matrix) == len(ATTRS) * len(ORDERS) == 168
    assert {o.in_recovery for o in libpq if o.connected} == {False, True}
    failed = [o for o in libpq if not o.connected]
    assert 40 < len(failed) < 130
    reasons = {_category(t).reason.split("\n")[0] for o in failed for t in o.tried}
    assert reasons == {
        REFUSED.split("\n")[0],
        unresolved(UNKNOWN_HOST),
        TIMEOUT,
        "session is read-only",
        "session is not read-only",
        "server is in hot standby mode",
        "server is not in hot standby mode",
    }
    assert {o.ping for o in failed} == {pgproto.Ping.OK, pgproto.Ping.NO_RESPONSE}


# --------------------------------------------------------------------------
# 2. prefer-standby


def _traced(adapter: str, text: str) -> tuple[Outcome, list[Tried]]:
    """Connect with *adapter*, keeping the attempts it reported on the way."""
    attempts: list[Tried] = []

    def trace(event: pgproto.Event) -> None:
        if isinstance(event, pgproto.AttemptFailed):
            attempts.append(attempt_tried(event.attempt))

    return pgproto_outcome(adapter, text, trace=trace), attempts


def _traced_clients(
    libpq: LibpqWorkers, text: str
) -> tuple[dict[str, Outcome], dict[str, list[Tried]]]:
    jobs: list[Callable[[], tuple[Outcome, list[Tried]]]] = [lambda: (libpq.outcome(text), [])]
    jobs.extend(functools.partial(_traced, adapter, text) for adapter in ADAPTERS)
    results = run_parallel(jobs, workers=len(jobs))
    outcomes = {client: result[0] for client, result in zip(CLIENTS, results, strict=True)}
    traces = {client: result[1] for client, result in zip(CLIENTS, results, strict=True)}
    return outcomes, traces


@pytest.mark.parametrize(
    "order",
    ["PC", "CP", "UP", "P", "PS", "CPS", "SP"],
)
def test_prefer_standby(
    endpoints: dict[str, Endpoint], passfile: str, libpq: LibpqWorkers, order: str
) -> None:
    """The standby when one is up, wherever it is listed; else the primary,
    reached in a second pass that starts again from the first host."""
    hosts = [endpoints[c] for c in order]
    want = expected("prefer-standby", hosts)
    assert want.picked is not None
    assert want.picked.code == ("S" if "S" in order else "P")
    outcomes, traces = _traced_clients(libpq, conninfo(hosts, "prefer-standby", passfile))
    check_against_libpq(outcomes, want, f"prefer-standby, {order}", _labels(endpoints))
    for adapter in ADAPTERS:
        assert [_category(t) for t in traces[adapter]] == list(want.tried), adapter


@pytest.mark.slow
@pytest.mark.parametrize("standby_first", [True, False], ids=["standby-first", "primary-first"])
def test_prefer_standby_with_the_standby_stopped(
    replica_factory: Callable[..., ReplicaPair],
    passfile: str,
    libpq: LibpqWorkers,
    standby_first: bool,
) -> None:
    pair = replica_factory()
    primary = Endpoint("P", "primary", pair.host, pair.primary.port, False)
    stopped = Endpoint("C", "stopped standby", pair.host, pair.standby.port, None)
    pair.standby.stop()  # its port now refuses connections
    hosts = [stopped, primary] if standby_first else [primary, stopped]
    want = expected("prefer-standby", hosts)
    assert want.picked == primary
    outcomes, traces = _traced_clients(libpq, conninfo(hosts, "prefer-standby", passfile))
    labels = {primary.port: "primary", stopped.port: "stopped standby"}
    check_against_libpq(outcomes, want, "prefer-standby, standby stopped", labels)
    # pass 1: both fail; pass 2 starts from the first host again.
    first_pass = [
        Tried(stopped.host, stopped.port, REFUSED),
        Tried(primary.host, primary.port, "server is not in hot standby mode"),
    ]
    if not standby_first:
        first_pass.reverse()
    second_pass = [Tried(stopped.host, stopped.port, REFUSED)] if standby_first else []
    for adapter in ADAPTERS:
        assert traces[adapter] == first_pass + second_pass, adapter


# --------------------------------------------------------------------------
# 3. promotion


@pytest.mark.slow
def test_promotion(
    replica_factory: Callable[..., ReplicaPair], passfile: str, libpq: LibpqWorkers
) -> None:
    pair = replica_factory()
    old_primary, standby = pair.primary.port, pair.standby.port
    hosts = [(pair.host, standby), (pair.host, old_primary)]

    def outcomes(attrs: str) -> dict[str, Outcome]:
        return run_clients(libpq, lambda _client: conninfo(hosts, attrs, passfile))

    before = outcomes("read-write")
    for client, result in before.items():
        assert (result.port, result.in_recovery) == (old_primary, False), client

    pair.primary.stop()
    pair.standby.promote()

    after = outcomes("read-write")
    for client, result in after.items():
        assert (result.port, result.in_recovery) == (standby, False), _report(client, after)

    still_standby = outcomes("standby")
    want = (
        Tried(pair.host, standby, "server is not in hot standby mode"),
        Tried(pair.host, old_primary, REFUSED),
    )
    for client, result in still_standby.items():
        assert not result.connected, _report(client, still_standby)
        assert result.tried == want, _report(client, still_standby)
        assert result.ping is pgproto.Ping.NO_RESPONSE, client  # the last one refused

    # No standby is up any more: prefer-standby takes the new primary in pass 2.
    preferring = outcomes("prefer-standby")
    for client, result in preferring.items():
        assert (result.port, result.in_recovery) == (standby, False), client


# --------------------------------------------------------------------------
# 4. a silent first host


@pytest.mark.slow
@pytest.mark.parametrize(
    ("real", "attrs", "sslmode"),
    [("P", "any", "prefer"), ("S", "standby", "disable")],
    ids=["primary-ssl-prefer", "standby-ssl-disable"],
)
def test_silent_first_host(
    endpoints: dict[str, Endpoint],
    silent_listener: SilentListener,
    passfile: str,
    libpq: LibpqWorkers,
    real: str,
    attrs: str,
    sslmode: str,
) -> None:
    """The silent host costs connect_timeout (2 s), then the real one answers."""
    hosts = [endpoints["L"], endpoints[real]]
    text = conninfo(hosts, attrs, passfile, sslmode=sslmode)
    assert "connect_timeout=2" in text
    before = silent_listener.accepted
    with assert_no_fd_leak(ignore=silent_listener.owned_fds):
        results = run_clients(libpq, lambda _client: text)
    assert silent_listener.wait_accepted(before + len(CLIENTS))
    for client, result in results.items():
        assert result.error is None, _report(client, results)
        assert (result.port, result.in_recovery) == (
            endpoints[real].port,
            endpoints[real].standby,
        ), _report(client, results)
        assert 1.9 <= result.elapsed < 10, f"{client}: {result.elapsed:.2f} s"


# --------------------------------------------------------------------------
# 5. the check queries: SHOW transaction_read_only / SELECT pg_is_in_recovery()


#: Which parameters a set of relays hides: both (as a server before 14
#: would), or one of them.
HIDDEN: Final = {
    "both": frozenset(REPORTED),
    "no-default_transaction_read_only": frozenset({"default_transaction_read_only"}),
    "no-in_hot_standby": frozenset({"in_hot_standby"}),
}


@pytest.fixture(scope="module")
def all_relays(replicated: ReplicaPair) -> Iterator[dict[str, dict[str, FilterProxy]]]:
    """For each entry of :data:`HIDDEN`, relays to the primary ("P") and the
    standby ("S") that hide those parameters."""
    relays: dict[str, dict[str, FilterProxy]] = {}
    try:
        for name, hidden in HIDDEN.items():
            relays[name] = {}
            for code, server in (("P", replicated.primary), ("S", replicated.standby)):
                relays[name][code] = FilterProxy((server.host, server.port), strip=hidden)
        yield relays
    finally:
        for group in relays.values():
            for relay in group.values():
                relay.close()


@pytest.fixture(scope="module")
def server_relays(all_relays: dict[str, dict[str, FilterProxy]]) -> dict[str, FilterProxy]:
    """The relays that hide both parameters."""
    return all_relays["both"]


@pytest.fixture(scope="module")
def bouncer_relays(pgbouncer: PgBouncer) -> Iterator[dict[str, FilterProxy]]:
    """Relays to PgBouncer: one hiding the two parameters, one passing all."""
    upstream = (pgbouncer.host, pgbouncer.port)
    with (
        FilterProxy(upstream, strip=REPORTED) as stripped,
        FilterProxy(upstream) as plain,
    ):
        yield {"stripped": stripped, "plain": plain}


def _app_name(client: str) -> str:
    return f"failover-{next(_app_names)}-{client}"


def expected_sessions(
    want: Expected, relay_of: dict[str, FilterProxy], client: str, hidden: frozenset[str]
) -> dict[int, list[list[str]]]:
    """Per relay port: the queries of each session of *client*, in order, by
    the rules.  When libpq fails, its PQping walks the same path again."""
    sessions: dict[int, list[list[str]]] = {relay.port: [] for relay in relay_of.values()}
    rounds = 2 if client == "libpq" and want.picked is None else 1
    for visit in want.visits * rounds:
        queries = [q for q in [check_query(visit.target, hidden)] if q is not None]
        if visit.rejected is None:
            queries.append(OUR_QUERY)
        sessions[visit.endpoint.port].append(queries)
    return sessions


@pytest.mark.parametrize("attrs", ATTRS)
@pytest.mark.parametrize(
    ("hidden", "order"),
    [
        ("both", "SP"),
        ("both", "PS"),
        ("both", "CS"),
        ("no-default_transaction_read_only", "SP"),
        ("no-in_hot_standby", "SP"),
    ],
)
def test_check_queries_when_parameters_are_not_reported(
    all_relays: dict[str, dict[str, FilterProxy]],
    closed_port: int,
    passfile: str,
    libpq: LibpqWorkers,
    attrs: str,
    hidden: str,
    order: str,
) -> None:
    """Without in_hot_standby and default_transaction_read_only, both clients
    ask: SHOW for read-write/read-only, pg_is_in_recovery() for the others.
    Without one of them: SHOW for read-write/read-only (they need both), and
    pg_is_in_recovery() only when in_hot_standby is missing."""
    server_relays = all_relays[hidden]
    relay_endpoints = {
        "P": Endpoint("P", "primary relay", "127.0.0.1", server_relays["P"].port, False),
        "S": Endpoint("S", "standby relay", "127.0.0.1", server_relays["S"].port, True),
        "C": Endpoint("C", "closed", "127.0.0.1", closed_port, None),
    }
    hosts = [relay_endpoints[c] for c in order]
    want = expected(attrs, hosts)
    names = {client: _app_name(client) for client in CLIENTS}
    results = run_clients(
        libpq, lambda client: conninfo(hosts, attrs, passfile, application_name=names[client])
    )
    check_against_libpq(results, want, f"relays {order}, {attrs}", _labels(relay_endpoints))
    for client in CLIENTS:
        seen = {relay.port: relay.queries(names[client]) for relay in server_relays.values()}
        assert seen == expected_sessions(want, server_relays, client, HIDDEN[hidden]), client
    for relay in server_relays.values():
        for session in relay.sessions(names["libpq"]):
            assert set(session.stripped) == HIDDEN[hidden]  # the relay works


def _bouncer_conninfo(port: int, attrs: str, **extra: str) -> str:
    role = ROLES["scram_user"]
    assert role.password is not None
    return multi_host_conninfo(
        ("127.0.0.1", port),
        user=role.name,
        password=role.password,
        target_session_attrs=attrs,
        sslmode="disable",
        gssencmode="disable",
        **extra,
    )


def test_pgbouncer_reports_the_read_only_parameters(
    pgbouncer: PgBouncer, passfile: str, libpq: LibpqWorkers
) -> None:
    """PgBouncer (1.18 here) replays the server's ParameterStatus messages,
    in_hot_standby and default_transaction_read_only included: no check
    query is needed through it."""
    results = run_clients(
        libpq, lambda _client: _bouncer_conninfo(pgbouncer.port, "read-write", passfile=passfile)
    )
    for client, result in results.items():
        assert result.port == pgbouncer.port, _report(client, results)
        assert result.reported == ("off", "off"), client


@pytest.mark.parametrize("attrs", ATTRS)
@pytest.mark.parametrize("route", ["direct", "plain", "stripped"])
def test_pgbouncer_target_session_attrs(
    pgbouncer: PgBouncer,
    bouncer_relays: dict[str, FilterProxy],
    passfile: str,
    libpq: LibpqWorkers,
    attrs: str,
    route: str,
) -> None:
    """Through PgBouncer (SCRAM, in front of a primary): the same verdicts as
    libpq; the check query runs only when the parameters are hidden."""
    port = pgbouncer.port if route == "direct" else bouncer_relays[route].port
    names = {client: _app_name(client) for client in CLIENTS}
    results = run_clients(
        libpq,
        lambda client: _bouncer_conninfo(
            port, attrs, application_name=names[client], passfile=passfile
        ),
    )
    bouncer = Endpoint("P", "pgbouncer", "127.0.0.1", port, False)
    want = expected(attrs, [bouncer])
    check_against_libpq(results, want, f"pgbouncer {route}, {attrs}", {port: "pgbouncer"})
    if route == "direct":
        return
    relay = bouncer_relays[route]
    # "plain": in_hot_standby and default_transaction_read_only arrive.
    hidden = frozenset(REPORTED) if route == "stripped" else frozenset()
    for client in CLIENTS:
        wanted = expected_sessions(want, {route: relay}, client, hidden)[relay.port]
        assert relay.queries(names[client]) == wanted, client


@pytest.mark.parametrize(
    ("attrs", "server", "options"),
    [
        ("read-write", "P", ""),
        ("read-only", "S", ""),
        ("primary", "P", ""),
        ("standby", "S", ""),
        # SHOW says "on" on a primary: that is no reason to claim in_hot_standby.
        ("read-only", "P", "-c default_transaction_read_only=on"),
    ],
    ids=["read-write", "read-only", "primary", "standby", "read-only-primary"],
)
def test_checks_do_not_invent_parameter_status(
    server_relays: dict[str, FilterProxy],
    passfile: str,
    libpq: LibpqWorkers,
    attrs: str,
    server: str,
    options: str,
) -> None:
    """After a check query the connection reports the ParameterStatus the
    server sent, and no more: libpq's PQparameterStatus has no in_hot_standby
    or default_transaction_read_only when the server did not send them."""
    relay = server_relays[server]
    extra = {"options": options} if options else {}
    results = run_clients(
        libpq, lambda _client: conninfo([("127.0.0.1", relay.port)], attrs, passfile, **extra)
    )
    assert results["libpq"].reported == (None, None)
    assert results["libpq"].in_recovery == (server == "S")
    invented = []
    for adapter in ADAPTERS:
        assert results[adapter].connected, _report(adapter, results)
        assert results[adapter].in_recovery == (server == "S"), adapter
        if results[adapter].reported != results["libpq"].reported:
            shown = dict(zip(REPORTED, results[adapter].reported, strict=True))
            invented.append(f"{adapter}: server_parameters has {shown}")
    assert not invented, "\n".join([*invented, "(the server sent neither; libpq reports None)"])


@pytest.mark.parametrize("attrs", ATTRS)
@pytest.mark.parametrize("route", ["direct", "relay"])
def test_read_only_primary(
    endpoints: dict[str, Endpoint],
    server_relays: dict[str, FilterProxy],
    passfile: str,
    libpq: LibpqWorkers,
    attrs: str,
    route: str,
) -> None:
    """``default_transaction_read_only=on`` (set through ``options``) makes
    the primary a read-only session: read-write finds no server, read-only
    takes the primary; primary/standby only look at recovery.  Through the
    relay the answer comes from ``SHOW transaction_read_only``."""
    if route == "direct":
        ports = {"P": endpoints["P"].port, "S": endpoints["S"].port}
    else:
        ports = {code: relay.port for code, relay in server_relays.items()}
    hosts = [
        Endpoint("P", "read-only primary", "127.0.0.1", ports["P"], False, read_only=True),
        Endpoint("S", "standby", "127.0.0.1", ports["S"], True, read_only=True),
    ]
    want = expected(attrs, hosts)
    options = "-c default_transaction_read_only=on"
    results = run_clients(libpq, lambda _client: conninfo(hosts, attrs, passfile, options=options))
    check_against_libpq(
        results, want, f"{route}, read-only primary, {attrs}", _labels({e.code: e for e in hosts})
    )


# --------------------------------------------------------------------------
# 6. no descriptor leaks


#: (order, target_session_attrs, the endpoint connected to or None)
LEAK_CASES: Final = (
    ("CULS", "read-write", None),  # refused, unresolved, timeout, rejected
    ("PP", "standby", None),  # rejected twice
    ("CU", "any", None),
    ("CUSP", "read-write", "P"),  # failures, a rejection, then a server
    ("PS", "prefer-standby", "S"),
    ("CP", "prefer-standby", "P"),  # the second pass
    ("US", "any", "S"),
)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_no_fd_leak(
    endpoints: dict[str, Endpoint],
    silent_listener: SilentListener,
    passfile: str,
    adapter: str,
) -> None:
    texts = [
        (conninfo([endpoints[c] for c in order], attrs, passfile), picked)
        for order, attrs, picked in LEAK_CASES
    ]
    pgproto_outcome(adapter, texts[-1][0])  # warm-up: lazily created objects
    results = []
    with assert_no_fd_leak(ignore=silent_listener.owned_fds):
        for text, _ in texts:
            results.append(pgproto_outcome(adapter, text))
    for (order, attrs, picked), result in zip(LEAK_CASES, results, strict=True):
        want = endpoints[picked].port if picked else None
        assert result.port == want, f"{order} {attrs}: {result.describe()}"
        assert result.connected or isinstance(result.error, pgproto.ConnectError)


# --------------------------------------------------------------------------
# 7. the attempt records


_PGPROTO_NOTE: Final = re.compile(r" failed \([^)]*\): ")


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_attempt_records(
    endpoints: dict[str, Endpoint], passfile: str, libpq: LibpqWorkers, adapter: str
) -> None:
    closed, standby = endpoints["C"], endpoints["S"]
    unknown = Endpoint("U", "unknown", UNRESOLVABLE_HOST, 5432, None)  # through the name server
    text = conninfo([closed, unknown, standby], "read-write", passfile)
    results = run_clients(libpq, lambda _client: text, clients=("libpq", adapter))
    theirs, mine = results["libpq"], results[adapter]
    assert isinstance(mine.error, pgproto.ConnectError), _report(adapter, results)
    attempts = mine.error.attempts
    assert len(attempts) == 3, attempts

    unresolved_prefix = unresolved(UNRESOLVABLE_HOST)
    refused, not_found, rejected = attempts
    assert (refused.host, refused.address, refused.port) == ("127.0.0.1", "127.0.0.1", closed.port)
    assert refused.step == "opening the connection"
    assert isinstance(refused.error, pgproto.TransportError)
    assert refused.error.errno == errno.ECONNREFUSED
    assert (refused.sqlstate, refused.auth_requested) == (None, False)

    assert (not_found.host, not_found.address, not_found.port) == (UNRESOLVABLE_HOST, None, 5432)
    assert not_found.step == "resolving the host"
    assert isinstance(not_found.error, pgproto.TransportError)
    assert str(not_found.error).startswith(unresolved_prefix)
    assert (not_found.sqlstate, not_found.auth_requested) == (None, False)

    assert (rejected.host, rejected.address, rejected.port) == (
        "127.0.0.1",
        "127.0.0.1",
        standby.port,
    )
    assert rejected.step == "checking target_session_attrs"
    assert rejected.encryption == "plaintext"  # sslmode=prefer fell back on the same socket
    assert str(rejected.error) == "session is read-only"
    assert rejected.sqlstate is None
    assert rejected.auth_requested  # AuthenticationOk arrived: the server is up
    assert mine.error.sqlstate is None

    # PQping agrees: the last address tried was a server that let us in.
    assert theirs.ping is mine.ping is pgproto.Ping.OK

    # The message: libpq's lines, with pgproto's "(step, encryption)" after
    # "failed" (a documented difference).
    libpq_lines = theirs.message.rstrip("\n").split("\n")
    mine_lines = [_PGPROTO_NOTE.sub(" failed: ", line) for line in str(mine.error).split("\n")]
    assert libpq_lines[:2] == [
        f'connection to server at "127.0.0.1", port {closed.port} failed: Connection refused',
        "\tIs the server running on that host and accepting TCP/IP connections?",
    ]
    assert mine_lines[:2] == libpq_lines[:2]
    assert (
        mine_lines[-1]
        == libpq_lines[-1]
        == (
            f'connection to server at "127.0.0.1", port {standby.port} failed: session is read-only'
        )
    )
    # The name that did not resolve: libpq's line is the reason alone;
    # pgproto puts it after a "connection to server at ... failed" prefix.
    assert libpq_lines[2].startswith(unresolved_prefix)
    assert mine_lines[2].endswith(libpq_lines[2]), (mine_lines[2], libpq_lines[2])
    assert parse_libpq_message(theirs.message) == mine.tried
