"""The connection machine against a scripted fake server: what real servers won't do.

Every test drives :class:`pgproto.ConnectionStateMachine` through
``fake_server.Harness`` (a socket-free adapter) and feeds it hand-built
backend messages.  Error texts are asserted exactly: they are libpq's where
libpq has one (fe-connect.c, fe-auth.c, fe-protocol3.c), pgproto's own
otherwise (see ``pgproto/_machine.py`` and ``pgproto/_wire.py``).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import pytest
from fake_server import (
    AUTH_OK,
    ENV,
    FAILED,
    NONCE,
    OK,
    READING,
    SECRET,
    SSL_REQUEST,
    TERMINATE,
    WRITING,
    Harness,
    ScramServer,
    assert_transitions,
    auth,
    backend_key,
    client_messages,
    command_complete,
    connect_error,
    data_row,
    drain,
    error_response,
    fixed_nonce,
    make_machine,
    make_params,
    message,
    negotiate,
    notice,
    parameter_status,
    ready,
    row_description,
    sasl,
    startup_done,
    startup_parameters,
    status_of,
    statuses,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgproto
from pgproto import (
    NEED_DATA,
    Address,
    AttemptFailed,
    AttemptStarted,
    AuthenticationCompleted,
    AuthenticationError,
    AuthenticationRequested,
    BackendKeyData,
    CloseConnection,
    CommandComplete,
    Connected,
    ConnectError,
    ConnectionStateMachine,
    ConnStatus,
    DataRow,
    Environment,
    Event,
    LocalProtocolError,
    OpenConnection,
    ParameterStatus,
    ReadyForQuery,
    RemoteProtocolError,
    ResolveHost,
    RowDescription,
    ServerError,
    StartTimer,
    StatusChanged,
    TLSError,
    TransportError,
)
from pgproto._states import TRANSITIONS, Input, transition

_BAD_KEY = "received invalid BackendKeyData message: cancel key with length"

_S = ConnStatus

B64_NONCE = base64.b64encode(NONCE)
SALT = base64.b64encode(b"0123456789abcdef")


def server_first(iterations: int = 4096, nonce_suffix: bytes = b"srv") -> bytes:
    """A well-formed AuthenticationSASLContinue for the fixed client nonce."""
    return auth(11, b"r=" + B64_NONCE + nonce_suffix + b",s=" + SALT + b",i=%d" % iterations)


SERVER_FIRST = server_first()
CANNOT_CONNECT_NOW = error_response("57P03", "the database system is starting up")
BAD_PASSWORD = error_response("28P01", 'password authentication failed for user "alice"')
NO_HBA = error_response("28000", 'no pg_hba.conf entry for host "192.0.2.99", user "alice"')


def busy(m: pgproto.ConnectionStateMachine) -> bool:
    return m.query_in_progress


def visible(harness: Harness, exc: BaseException | None = None) -> Iterator[str]:
    """Every text a user could see: event reprs, errors, attempts, the machine."""
    machine = harness.machine
    for event in harness.events:
        yield repr(event)
    for error in (exc, machine.error):
        if error is not None:
            yield str(error)
            yield repr(error)
    for attempt in machine.attempts:
        yield repr(attempt)
        yield attempt.describe()
        yield str(attempt.error)
    yield repr(machine)
    yield repr(machine.params)
    yield repr(machine.params.hosts)


# --------------------------------------------------------------------------
# the state table and the poll contract


@pytest.mark.parametrize("status", list(ConnStatus), ids=lambda s: s.name)
def test_transition_table_is_the_only_way(status: ConnStatus) -> None:
    """For every (status, input): the table's next status, or LocalProtocolError."""
    for event in Input:
        if (status, event) in TRANSITIONS:
            assert transition(status, event) is TRANSITIONS[status, event]
        else:
            with pytest.raises(
                LocalProtocolError,
                match=f"^internal error: no transition from {status.name} on {event.name}$",
            ):
                transition(status, event)


def test_transition_table_shape() -> None:
    targets = set(TRANSITIONS.values())
    sources = {old for old, _ in TRANSITIONS}
    # BAD is terminal except for reset(); the states pgproto never enters
    # appear nowhere.
    assert [(old, event) for old, event in TRANSITIONS if old is _S.BAD] == [(_S.BAD, Input.RESET)]
    assert TRANSITIONS[_S.BAD, Input.RESET] is _S.NEEDED
    unused = {_S.GSS_STARTUP, _S.AUTHENTICATING, _S.SETENV, _S.ALLOCATED}
    assert not unused & (targets | sources)
    # OK is reached only once target_session_attrs is satisfied -- or, for a
    # cancel connection, once the server hung up after the CancelRequest.
    assert {(old, event) for (old, event), new in TRANSITIONS.items() if new is _S.OK} == {
        (_S.CHECK_TARGET, Input.TARGET_ACCEPTED),
        (_S.AWAITING_RESPONSE, Input.CANCEL_CONFIRMED),
    }
    # Every live state can fail and can retry.
    for status in sources - {_S.OK, _S.BAD}:
        assert TRANSITIONS[status, Input.FAILED] is _S.BAD
        assert TRANSITIONS[status, Input.RETRY] is _S.NEEDED


def test_poll_contract_through_a_trust_connection() -> None:
    m = make_machine()
    assert status_of(m) is _S.NEEDED
    assert m.error is None
    assert m.attempts == ()

    resolve = m.next_event()
    assert resolve == ResolveHost(host="db.example", port=5432)
    for _ in range(3):  # a command is out: nothing moves until it is answered
        assert m.poll() is WRITING
        assert m.next_event() is NEED_DATA
    assert m.data_to_send() == b""
    m.addresses_resolved(["192.0.2.10"])

    address = Address(kind="tcp", address="192.0.2.10", port=5432)
    started = m.next_event()
    assert started == AttemptStarted(
        host="db.example", address=address, encryption="plaintext", direct=False
    )
    opening = m.next_event()
    assert isinstance(opening, OpenConnection)
    assert opening.address == address
    assert m.next_event() == StatusChanged(status=_S.STARTED)
    assert m.next_event() is NEED_DATA
    assert m.poll() is WRITING  # the transport is being opened
    m.connection_made()

    assert m.next_event() == StatusChanged(status=_S.MADE)
    assert m.next_event() == StatusChanged(status=_S.AWAITING_RESPONSE)
    assert m.next_event() is NEED_DATA
    assert m.poll() is WRITING
    (startup,) = client_messages(m.data_to_send(), untyped_first=1)
    assert startup_parameters(startup.body) == (0x30000, {"user": "alice", "database": "app"})
    assert m.poll() is READING
    assert m.data_to_send() == b""

    # Half a message: nothing can progress, and saying so twice changes nothing.
    whole = AUTH_OK + startup_done()
    m.receive_data(whole[:7])
    for _ in range(3):
        assert m.next_event() is NEED_DATA
        assert m.poll() is READING
        assert status_of(m) is _S.AWAITING_RESPONSE

    # The rest in one chunk: every message is consumed before NEED_DATA.
    m.receive_data(whole[7:])
    events: list[Event] = []
    while (event := m.next_event()) is not NEED_DATA:
        events.append(event)
    assert [type(e) for e in events] == [
        AuthenticationCompleted,
        StatusChanged,  # AUTH_OK
        ParameterStatus,
        ParameterStatus,
        ParameterStatus,
        BackendKeyData,
        ReadyForQuery,
        StatusChanged,  # CHECK_TARGET
        Connected,
        StatusChanged,  # OK
    ]
    assert statuses(events) == [_S.AUTH_OK, _S.CHECK_TARGET, _S.OK]
    assert events[0] == AuthenticationCompleted(
        method="none", channel_binding=False, server_verified=False
    )
    assert events[5] == BackendKeyData(pid=4321, key=b"\x0a\x0b\x0c\x0d")
    assert events[8] == Connected(
        host="db.example", address=address, ssl_in_use=False, protocol_version=(3, 0)
    )
    assert m.poll() is OK
    assert m.next_event() is NEED_DATA
    assert m.poll() is OK
    assert status_of(m) is _S.OK
    assert m.auth_method == "none"
    assert m.backend_pid == 4321
    assert m.transaction_status == "I"
    assert m.server_parameters["server_version"] == "18.0"
    assert m.attempts == ()


def test_poll_during_a_query() -> None:
    h = Harness(make_machine())
    assert h.play([AUTH_OK + startup_done()]) is OK
    h.machine.send_query("select 1, null")
    assert h.machine.poll() is WRITING
    assert h.pump() is READING
    assert h.take().endswith(b"Q\x00\x00\x00\x13select 1, null\x00")
    assert busy(h.machine)
    reply = (
        row_description("?column?", "?column?")
        + data_row(b"1", None)
        + command_complete("SELECT 1")
        + ready(b"T")
    )
    assert h.feed(reply[:-1]) is READING
    assert h.feed(reply[-1:]) is OK
    assert not busy(h.machine)
    assert h.machine.transaction_status == "T"
    assert h.of_type(RowDescription) == [RowDescription(columns=("?column?", "?column?"))]
    assert h.of_type(DataRow) == [DataRow(values=("1", None))]
    assert h.of_type(CommandComplete) == [CommandComplete(tag="SELECT 1")]
    # Notices and ParameterStatus may come at any time.
    assert h.feed(notice("hello") + parameter_status("TimeZone", "UTC")) is OK
    assert h.machine.server_parameters["TimeZone"] == "UTC"
    assert_transitions(h.events)


def test_every_scripted_run_follows_the_table() -> None:
    """StatusChanged sequences of a few complete runs, checked step by step."""
    runs: list[Harness] = []
    h = Harness(make_machine(sslmode="prefer"))
    h.play([b"N", AUTH_OK + startup_done()])
    runs.append(h)
    h = Harness(make_machine(sslmode="allow"))
    with pytest.raises(ConnectError):
        h.play([NO_HBA, b"N"])
    runs.append(h)
    h = Harness(make_machine(target_session_attrs="read-write"))
    h.play(
        [
            AUTH_OK + startup_done(parameters={"server_version": "13.0"}),
            row_description("transaction_read_only")
            + data_row(b"off")
            + command_complete("SHOW")
            + ready(),
        ]
    )
    runs.append(h)
    for run in runs:
        assert_transitions(run.events)
    assert statuses(runs[2].events)[-5:] == [
        _S.CHECK_TARGET,
        _S.CHECK_WRITABLE,
        _S.CONSUME,
        _S.CHECK_TARGET,
        _S.OK,
    ]


# --------------------------------------------------------------------------
# SSLRequest and its reply


def ssl_harness(sslmode: str = "require", **params: str) -> Harness:
    h = Harness(make_machine(sslmode=sslmode, **params))
    assert h.pump() is READING
    assert h.take() == SSL_REQUEST
    return h


def test_reply_s_alone_starts_tls() -> None:
    """The control for the CVE test below: 'S' alone begins the TLS handshake."""
    h = ssl_harness()
    assert h.feed(b"S") is READING
    hello = h.take()
    assert hello[:1] == b"\x16"  # a TLS handshake record: the ClientHello
    assert h.machine.status is _S.SSL_STARTUP


@pytest.mark.parametrize("sslmode", ["require", "prefer"])
def test_cve_2021_23222_plaintext_after_s(sslmode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes queued behind 'S' in the same read are an error, never TLS input."""

    def no_tls(*args: object, **kwargs: object) -> None:
        raise AssertionError("TLS must not start")

    monkeypatch.setattr("pgproto._machine.TLSEngine", no_tls)
    h = ssl_harness(sslmode)
    injected = AUTH_OK + startup_done()
    exc = connect_error(h, [b"S" + injected])
    (attempt,) = exc.attempts  # no fallback to plaintext, even under prefer
    assert type(attempt.error) is RemoteProtocolError
    assert str(attempt.error) == "received unencrypted data after SSL response"
    assert attempt.step == "SSL negotiation"
    assert attempt.encryption == "ssl"
    assert h.of_type(AttemptFailed)[-1].next == "give up"
    assert h.take() == b""  # no ClientHello, nothing else
    assert h.actions() == ["open", "send", "recv", "close"]
    m = h.machine
    assert m.poll() is FAILED
    assert m.status is _S.BAD
    m.receive_data(b"more")  # ignored
    assert m.poll() is FAILED
    for _ in range(2):
        with pytest.raises(ConnectError) as again:
            m.next_event()
        assert again.value is exc
    assert m.poll() is FAILED
    assert not h.of_type(AuthenticationCompleted)
    assert not h.of_type(ParameterStatus)


@pytest.mark.parametrize("sslmode", ["require", "prefer", "allow"])
def test_cve_2024_10977_error_reply_is_not_read(sslmode: str) -> None:
    """An 'E' reply to SSLRequest: pgproto's fixed words, the server's text unread."""
    server_text = "SERVER-CONTROLLED-TEXT-31337"
    h = Harness(make_machine(sslmode=sslmode))
    # Under allow, plaintext goes first; its rejection leads to SSLRequest.
    h.play([NO_HBA] if sslmode == "allow" else [])
    assert h.take().endswith(SSL_REQUEST)
    exc = connect_error(h, [error_response("XX000", server_text)])
    attempt = exc.attempts[-1]
    assert type(attempt.error) is RemoteProtocolError
    assert str(attempt.error) == "server sent an error response during SSL exchange"
    assert attempt.step == "SSL negotiation"
    assert len(exc.attempts) == (2 if sslmode == "allow" else 1)
    assert h.of_type(AttemptFailed)[-1].next == "give up"
    for text in visible(h, exc):
        assert server_text not in text
        assert "XX000" not in text


def test_invalid_reply_to_sslrequest() -> None:
    exc = connect_error(ssl_harness("prefer"), [b"X"])
    (attempt,) = exc.attempts
    assert type(attempt.error) is RemoteProtocolError
    assert str(attempt.error) == "received invalid response to SSL negotiation: X"


def test_n_when_ssl_is_required() -> None:
    exc = connect_error(ssl_harness("require"), [b"N"])
    (attempt,) = exc.attempts
    assert type(attempt.error) is TLSError
    assert str(attempt.error) == "server does not support SSL, but SSL was required"


def test_n_under_prefer_continues_on_the_same_socket() -> None:
    h = ssl_harness("prefer")
    assert h.feed(b"N") is READING
    (startup,) = client_messages(h.take(), untyped_first=1)
    assert startup_parameters(startup.body)[1]["user"] == "alice"
    assert h.feed(AUTH_OK + startup_done()) is OK
    assert h.actions() == ["open", "send", "recv", "send", "recv"]  # no close in between
    assert len(h.of_type(OpenConnection)) == 1
    assert h.machine.attempts == ()
    assert h.machine.ssl_in_use is False
    assert statuses(h.events)[:5] == [
        _S.STARTED,
        _S.MADE,
        _S.SSL_STARTUP,
        _S.MADE,
        _S.AWAITING_RESPONSE,
    ]


def test_n_under_prefer_then_error_does_not_reconnect() -> None:
    h = ssl_harness("prefer")
    exc = connect_error(h, [b"N", NO_HBA])
    (attempt,) = exc.attempts
    assert attempt.sqlstate == "28000"
    assert attempt.encryption == "plaintext"
    assert len(h.of_type(OpenConnection)) == 1


def test_tls_failure_under_prefer_reconnects_in_plaintext() -> None:
    h = ssl_harness("prefer")
    h.feed(b"S")
    h.take()
    # Not a TLS record at all: the handshake fails.
    assert h.feed(b"HTTP/1.1 400 Bad Request\r\n\r\n") is READING
    (failed,) = h.of_type(AttemptFailed)
    assert failed.next == "fallback"
    assert isinstance(failed.attempt.error, TLSError)
    opens = h.of_type(OpenConnection)
    assert len(opens) == 2
    assert opens[0].address == opens[1].address
    (startup,) = client_messages(h.take(), untyped_first=1)
    assert startup_parameters(startup.body)[0] == 0x30000
    assert h.actions()[-3:] == ["close", "open", "send"]


def test_allow_tries_plaintext_then_reconnects_with_sslrequest() -> None:
    h = Harness(make_machine(sslmode="allow"))
    assert h.pump() is READING
    (startup,) = client_messages(h.take(), untyped_first=1)
    assert startup.body[:4] == b"\x00\x03\x00\x00"
    assert h.feed(NO_HBA) is READING
    assert h.take() == SSL_REQUEST
    assert h.actions() == ["open", "send", "recv", "close", "open", "send"]
    assert h.log[3] == ("close", b"")
    first, second = h.of_type(OpenConnection)
    assert first.address == second.address
    (failed,) = h.of_type(AttemptFailed)
    assert failed.next == "fallback"
    assert failed.attempt.encryption == "plaintext"
    assert failed.attempt.sqlstate == "28000"
    assert [e.encryption for e in h.of_type(AttemptStarted)] == ["plaintext", "ssl"]
    exc = connect_error(h, [b"N"])
    assert [str(a.error) for a in exc.attempts][1] == (
        "server does not support SSL, but SSL was required"
    )


# --------------------------------------------------------------------------
# a table of failures: params, server turns, the last attempt's error


@dataclass(frozen=True)
class Case:
    id: str
    turns: tuple[bytes, ...]
    error: type[BaseException]
    message: str
    params: Mapping[str, str] = field(default_factory=dict)
    step: str = "authentication"


def _case(
    name: str,
    turns: list[bytes],
    error: type[BaseException],
    message: str,
    step: str = "authentication",
    **params: str,
) -> Case:
    return Case(name, tuple(turns), error, message, params, step)


RA = 'authentication method requirement "{}" failed: {}'
NEG = "received invalid protocol negotiation message: "
P32 = {"max_protocol_version": "3.2"}

CASES = [
    # unexpected messages and lengths before authentication
    *(
        _case(
            f"unexpected-{kind.decode()}",
            [msg],
            RemoteProtocolError,
            f"expected authentication request from server, but received '{kind.decode()}'",
        )
        for kind, msg in [
            (b"S", parameter_status("server_version", "18.0")),
            (b"K", backend_key()),
            (b"Z", ready()),
            (b"N", notice("hi")),
            (b"C", command_complete("SELECT 1")),
        ]
    ),
    _case(
        "R-too-long",
        [b"R" + struct.pack("!I", 2001)],
        RemoteProtocolError,
        "message of type 'R' is 2001 bytes long, more than the 2000 bytes allowed here",
    ),
    _case(
        "v-too-long",
        [b"v" + struct.pack("!I", 2001)],
        RemoteProtocolError,
        "message of type 'v' is 2001 bytes long, more than the 2000 bytes allowed here",
    ),
    _case(
        "E-too-long",
        [b"E" + struct.pack("!I", 30001)],
        RemoteProtocolError,
        "message of type 'E' is 30001 bytes long, more than the 30000 bytes allowed here",
    ),
    _case(
        "R-length-below-4",
        [b"R" + struct.pack("!I", 3)],
        RemoteProtocolError,
        "invalid message length 3 for message type 'R'",
    ),
    _case(
        "R-without-code",
        [message(b"R", b"\x00\x00\x00")],
        RemoteProtocolError,
        "received invalid authentication request",
    ),
    _case(
        "md5-salt-length",
        [auth(5, b"abc")],
        RemoteProtocolError,
        "received invalid authentication request",
    ),
    # unsupported requests
    *(
        _case(f"code-{code}", [auth(code)], AuthenticationError, text)
        for code, text in [
            (1, "Kerberos 4 authentication not supported"),
            (2, "Kerberos 5 authentication not supported"),
            (4, "Crypt authentication not supported"),
            (6, "authentication method 6 not supported"),
            (7, "GSSAPI authentication not supported"),
            (8, "GSSAPI authentication not supported"),
            (9, "SSPI authentication not supported"),
            (13, "authentication method 13 not supported"),
            (99, "authentication method 99 not supported"),
        ]
    ),
    # require_auth
    _case(
        "require-scram-but-trust",
        [AUTH_OK],
        AuthenticationError,
        RA.format("scram-sha-256", "server did not complete authentication"),
        require_auth="scram-sha-256",
    ),
    _case(
        "require-password-but-md5",
        [auth(5, b"salt")],
        AuthenticationError,
        RA.format("password", "server requested a hashed password"),
        require_auth="password",
    ),
    _case(
        "require-md5-but-sasl",
        [sasl("SCRAM-SHA-256")],
        AuthenticationError,
        RA.format("md5", "server requested SASL authentication"),
        require_auth="md5",
    ),
    _case(
        "require-not-password",
        [auth(3)],
        AuthenticationError,
        RA.format("!password", "server requested a cleartext password"),
        require_auth="!password",
    ),
    _case(
        "require-password-but-unknown-code",
        [auth(99)],
        AuthenticationError,
        RA.format("password", "server requested an unknown authentication type"),
        require_auth="password",
    ),
    _case(
        "require-password-but-scram-mechanism",
        [sasl("SCRAM-SHA-256")],
        AuthenticationError,
        RA.format("password", "server requested SASL authentication"),
        require_auth="password",
    ),
    _case(
        "require-not-scram",
        [sasl("SCRAM-SHA-256")],
        AuthenticationError,
        RA.format("!scram-sha-256", "server requested SCRAM-SHA-256 authentication"),
        require_auth="!scram-sha-256",
    ),
    _case(
        "require-not-none",
        [AUTH_OK],
        AuthenticationError,
        RA.format("!none", "server did not complete authentication"),
        require_auth="!none",
    ),
    # channel_binding=require without TLS
    _case(
        "channel-binding-sasl-without-ssl",
        [sasl("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")],
        AuthenticationError,
        "channel binding required, but SSL not in use",
        channel_binding="require",
    ),
    _case(
        "channel-binding-password",
        [auth(3)],
        AuthenticationError,
        "channel binding required but not supported by server's authentication request",
        channel_binding="require",
    ),
    _case(
        "channel-binding-trust",
        [AUTH_OK],
        AuthenticationError,
        "channel binding required, but server authenticated client without channel binding",
        channel_binding="require",
    ),
    # SASL
    *(
        _case(
            f"plus-over-plaintext-{cb}",
            [sasl("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS")],
            AuthenticationError,
            "server offered SCRAM-SHA-256-PLUS authentication over a non-SSL connection",
            channel_binding=cb,
        )
        for cb in ("prefer", "disable")
    ),
    _case(
        "sasl-no-known-mechanism",
        [sasl("OAUTHBEARER-X", "SCRAM-SHA-1")],
        AuthenticationError,
        "none of the server's SASL authentication mechanisms are supported",
    ),
    _case(
        "sasl-bad-list",
        [auth(10, b"SCRAM-SHA-256")],
        RemoteProtocolError,
        "fe_sendauth: invalid authentication request from server: "
        "invalid list of authentication mechanisms",
    ),
    _case(
        "sasl-twice",
        [sasl("SCRAM-SHA-256"), sasl("SCRAM-SHA-256")],
        AuthenticationError,
        "duplicate SASL authentication request",
    ),
    _case(
        "sasl-continue-without-sasl",
        [SERVER_FIRST],
        RemoteProtocolError,
        "fe_sendauth: invalid authentication request from server: "
        "AUTH_REQ_SASL_CONT without AUTH_REQ_SASL",
    ),
    _case(
        "sasl-final-without-sasl",
        [auth(12, b"v=AAAA")],
        RemoteProtocolError,
        "fe_sendauth: invalid authentication request from server: "
        "AUTH_REQ_SASL_CONT without AUTH_REQ_SASL",
    ),
    _case(
        "sasl-final-before-challenge",
        [sasl("SCRAM-SHA-256"), auth(12, b"v=AAAA")],
        RemoteProtocolError,
        "AuthenticationSASLFinal received from server, but SASL authentication was not completed",
    ),
    _case(
        "ok-before-challenge",
        [sasl("SCRAM-SHA-256"), AUTH_OK],
        AuthenticationError,
        "server sent AuthenticationOk before completing the SCRAM exchange "
        "(it did not prove that it knows the password)",
    ),
    _case(
        "ok-before-server-final",
        [sasl("SCRAM-SHA-256"), SERVER_FIRST, AUTH_OK],
        AuthenticationError,
        "server sent AuthenticationOk before completing the SCRAM exchange "
        "(it did not prove that it knows the password)",
    ),
    _case(
        "ok-before-server-final-require-auth",
        [sasl("SCRAM-SHA-256"), SERVER_FIRST, AUTH_OK],
        AuthenticationError,
        RA.format("scram-sha-256", "server did not complete authentication"),
        require_auth="scram-sha-256",
    ),
    _case(
        "scram-nonce-mismatch",
        [sasl("SCRAM-SHA-256"), auth(11, b"r=someone-else,s=" + SALT + b",i=4096")],
        RemoteProtocolError,
        "invalid SCRAM response (nonce mismatch)",
    ),
    _case(
        "scram-bad-signature",
        [sasl("SCRAM-SHA-256"), SERVER_FIRST, auth(12, b"v=" + base64.b64encode(bytes(32)))],
        AuthenticationError,
        "incorrect server signature",
    ),
    _case(
        "scram-server-error",
        [sasl("SCRAM-SHA-256"), SERVER_FIRST, auth(12, b"e=invalid-proof")],
        AuthenticationError,
        "error received from server in SCRAM exchange: invalid-proof",
    ),
    # no password
    *(
        _case(
            f"no-password-{name}",
            [request],
            AuthenticationError,
            "fe_sendauth: no password supplied",
            password="",
        )
        for name, request in [
            ("cleartext", auth(3)),
            ("md5", auth(5, b"salt")),
            ("scram", sasl("SCRAM-SHA-256")),
        ]
    ),
    # NegotiateProtocolVersion
    _case(
        "negotiate-duplicate",
        [negotiate((3, 0)) + negotiate((3, 0))],
        RemoteProtocolError,
        "received duplicate protocol negotiation message",
        **P32,
    ),
    _case(
        "negotiate-higher",
        [negotiate((3, 2))],
        RemoteProtocolError,
        NEG + "server requested downgrade to a higher-numbered version",
    ),
    _case(
        "negotiate-pre-3.0",
        [negotiate((2, 0))],
        RemoteProtocolError,
        NEG + "server requested downgrade to pre-3.0 protocol version",
        **P32,
    ),
    _case(
        "negotiate-3.1",
        [negotiate((3, 1))],
        RemoteProtocolError,
        NEG + "server requested downgrade to non-existent 3.1 protocol version",
        **P32,
    ),
    _case(
        "negotiate-no-changes",
        [negotiate((3, 2))],
        RemoteProtocolError,
        NEG + "server negotiated but asks for no changes",
        **P32,
    ),
    _case(
        "negotiate-below-min",
        [negotiate((3, 0))],
        RemoteProtocolError,
        'server only supports protocol version 3.0, but "min_protocol_version" was set to 3.2',
        min_protocol_version="3.2",
    ),
    _case(
        "negotiate-pq-option",
        [negotiate((3, 0), ["_pq_.compression"])],
        RemoteProtocolError,
        NEG
        + 'server reported an unsupported parameter that was not requested ("_pq_.compression")',
    ),
    _case(
        "negotiate-option-without-prefix",
        [negotiate((3, 0), ["compression"])],
        RemoteProtocolError,
        NEG + 'server reported unsupported parameter name without a "_pq_." prefix ("compression")',
        **P32,
    ),
    _case(
        "negotiate-short",
        [message(b"v", b"\x00\x03\x00\x00")],
        RemoteProtocolError,
        NEG + "message too short",
        **P32,
    ),
    _case(
        "negotiate-truncated-options",
        [negotiate((3, 0), [], count=2)],
        RemoteProtocolError,
        NEG + "message too short",
        **P32,
    ),
    _case(
        "negotiate-after-auth-ok",
        [AUTH_OK + negotiate((3, 0))],
        RemoteProtocolError,
        'unexpected response from server; first received character was "v"',
        step="waiting for the server to be ready",
        **P32,
    ),
    # after AuthenticationOk
    _case(
        "key-3.0-long",
        [AUTH_OK + backend_key(key=bytes(8))],
        RemoteProtocolError,
        _BAD_KEY + " 8 not allowed in protocol version 3.0 (must be 4 bytes)",
        step="waiting for the server to be ready",
    ),
    _case(
        "key-3.0-short",
        [AUTH_OK + backend_key(key=bytes(3))],
        RemoteProtocolError,
        _BAD_KEY + " 3 is too short (minimum 4 bytes)",
        step="waiting for the server to be ready",
    ),
    _case(
        "key-3.0-after-negotiation",
        [negotiate((3, 0)) + AUTH_OK + backend_key(key=bytes(32))],
        RemoteProtocolError,
        _BAD_KEY + " 32 not allowed in protocol version 3.0 (must be 4 bytes)",
        step="waiting for the server to be ready",
        **P32,
    ),
    _case(
        "key-3.2-short",
        [AUTH_OK + backend_key(key=bytes(3))],
        RemoteProtocolError,
        _BAD_KEY + " 3 is too short (minimum 4 bytes)",
        step="waiting for the server to be ready",
        **P32,
    ),
    _case(
        "key-3.2-long",
        [AUTH_OK + backend_key(key=bytes(257))],
        RemoteProtocolError,
        _BAD_KEY + " 257 is too long (maximum 256 bytes)",
        step="waiting for the server to be ready",
        **P32,
    ),
    _case(
        "key-no-pid",
        [AUTH_OK + message(b"K", b"\x00\x01")],
        RemoteProtocolError,
        "malformed BackendKeyData message: truncated",
        step="waiting for the server to be ready",
    ),
    _case(
        "command-complete-during-startup",
        [AUTH_OK + command_complete("SELECT 1")],
        RemoteProtocolError,
        "unexpected message from server during startup",
        step="waiting for the server to be ready",
    ),
    _case(
        "data-row-during-startup",
        [AUTH_OK + data_row(b"1")],
        RemoteProtocolError,
        "unexpected message from server during startup",
        step="waiting for the server to be ready",
    ),
    _case(
        "unknown-type-during-startup",
        [AUTH_OK + message(b"?", b"")],
        RemoteProtocolError,
        'unexpected response from server; first received character was "?"',
        step="waiting for the server to be ready",
    ),
    _case(
        "auth-request-after-auth-ok",
        [AUTH_OK + auth(3)],
        RemoteProtocolError,
        'unexpected response from server; first received character was "R"',
        step="waiting for the server to be ready",
    ),
    _case(
        "bad-ready-status",
        [AUTH_OK + ready(b"X")],
        RemoteProtocolError,
        "ReadyForQuery with unknown status 'X'",
        step="waiting for the server to be ready",
    ),
    _case(
        "error-after-auth-ok",
        [AUTH_OK + error_response("53300", "sorry, too many clients already")],
        ServerError,
        "FATAL:  sorry, too many clients already",
        step="waiting for the server to be ready",
    ),
    _case(
        "error-during-auth",
        [BAD_PASSWORD],
        ServerError,
        'FATAL:  password authentication failed for user "alice"',
    ),
    _case(
        "eof-during-auth",
        [b""],
        TransportError,
        "server closed the connection unexpectedly\n"
        "\tThis probably means the server terminated abnormally\n"
        "\tbefore or while processing the request.",
    ),
    _case(
        "eof-after-auth-ok",
        [AUTH_OK, b""],
        TransportError,
        "server closed the connection unexpectedly\n"
        "\tThis probably means the server terminated abnormally\n"
        "\tbefore or while processing the request.",
        step="waiting for the server to be ready",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_failure(case: Case) -> None:
    h = Harness(make_machine(**case.params))
    exc = connect_error(h, case.turns)
    attempt = exc.attempts[-1]
    assert type(attempt.error) is case.error
    assert str(attempt.error) == case.message
    assert attempt.step == case.step
    assert len(exc.attempts) == 1  # one host, sslmode=disable: nothing else to try
    assert h.of_type(AttemptFailed)[-1].next == "give up"
    m = h.machine
    assert m.error is exc
    assert m.status is _S.BAD
    assert m.poll() is FAILED
    with pytest.raises(ConnectError) as again:
        m.next_event()
    assert again.value is exc
    m.receive_data(b"anything")
    assert m.poll() is FAILED
    assert h.log[-1] == ("close", b"")  # dropped, never Terminate
    if case.step == "authentication":
        assert m.auth_method is None
    if isinstance(attempt.error, ServerError):
        assert attempt.sqlstate is not None
        assert exc.sqlstate == attempt.sqlstate
    assert_transitions(h.events)
    for text in visible(h, exc):
        assert SECRET not in text


def test_negotiate_negative_count() -> None:
    h = Harness(make_machine(**P32))
    exc = connect_error(h, [negotiate((3, 0), [], count=-1)])
    assert str(exc.attempts[-1].error) == (
        NEG + "server reported negative number of unsupported parameters"
    )


def test_no_password_sets_password_needed() -> None:
    for request in (auth(3), auth(5, b"salt"), sasl("SCRAM-SHA-256")):
        h = Harness(make_machine(password=None))
        assert not h.machine.password_needed
        exc = connect_error(h, [request])
        assert str(exc.attempts[-1].error) == "fe_sendauth: no password supplied"
        assert h.machine.password_needed
    h = Harness(make_machine())
    h.play([auth(3), AUTH_OK + startup_done()])
    assert not h.machine.password_needed
    assert h.machine.auth_method == "password"


# --------------------------------------------------------------------------
# authentication that succeeds


def test_cleartext_and_md5_answers() -> None:
    h = Harness(make_machine())
    h.play([auth(3)])
    _, answer = client_messages(h.take(), untyped_first=1)
    assert (answer.kind, answer.body) == (b"p", SECRET.encode() + b"\x00")
    h = Harness(make_machine(user="alice"))
    h.play([auth(5, b"\x01\x02\x03\x04")])
    _, answer = client_messages(h.take(), untyped_first=1)
    inner = hashlib.md5(SECRET.encode() + b"alice").hexdigest().encode()  # noqa: S324
    outer = hashlib.md5(inner + b"\x01\x02\x03\x04").hexdigest().encode()  # noqa: S324
    assert (answer.kind, answer.body) == (b"p", b"md5" + outer + b"\x00")


@pytest.mark.parametrize("require_auth", [None, "scram-sha-256", "!password,!md5"])
def test_scram_against_an_independent_server(require_auth: str | None) -> None:
    server = ScramServer(password=SECRET, iterations=4096)
    h = Harness(make_machine(require_auth=require_auth))
    assert h.play([sasl("SCRAM-SHA-256")]) is READING
    assert h.feed(server.challenge(_last_send(h))) is READING
    assert h.feed(server.final(_last_send(h))) is READING
    assert server.proof_ok is True
    assert server.mechanism == "SCRAM-SHA-256"
    assert h.feed(AUTH_OK + startup_done()) is OK
    assert h.of_type(AuthenticationCompleted) == [
        AuthenticationCompleted(method="SCRAM-SHA-256", channel_binding=False, server_verified=True)
    ]
    assert h.machine.auth_method == "SCRAM-SHA-256"
    assert h.machine.channel_binding_used is False


def _last_send(h: Harness) -> bytes:
    return bytes(next(data for name, data in reversed(h.log) if name == "send"))


def test_scram_prefers_scram_when_plus_is_absent_and_flags_n() -> None:
    h = Harness(make_machine())
    h.play([sasl("SCRAM-SHA-256", "X-UNKNOWN")])
    (initial,) = client_messages(_last_send(h))
    assert initial.body.startswith(b"SCRAM-SHA-256\x00")
    assert initial.body.endswith(b"n,,n=,r=" + B64_NONCE)
    (requested,) = h.of_type(AuthenticationRequested)
    assert requested == AuthenticationRequested(
        method="sasl", mechanisms=("SCRAM-SHA-256", "X-UNKNOWN"), mechanism="SCRAM-SHA-256"
    )


def test_server_final_in_sasl_continue_is_verified() -> None:
    """libpq accepts the server-final message in SASLContinue too (and sends nothing)."""
    server = ScramServer(password=SECRET)
    h = Harness(make_machine())
    h.play([sasl("SCRAM-SHA-256")])
    h.feed(server.challenge(_last_send(h)))
    final = server.final(_last_send(h))
    as_continue = auth(11, final[9:])
    sent_before = len([1 for name, _ in h.log if name == "send"])
    assert h.feed(as_continue) is READING
    assert len([1 for name, _ in h.log if name == "send"]) == sent_before
    assert h.feed(AUTH_OK + startup_done()) is OK


# --------------------------------------------------------------------------
# several hosts and addresses; transport answers


def two_hosts(**params: str) -> Harness:
    return Harness(
        make_machine(host="db1.example,db2.example", **params),
        addresses={"db1.example": ["192.0.2.1", "192.0.2.2"], "db2.example": ["198.51.100.7"]},
    )


def test_cannot_connect_now_moves_to_the_next_host() -> None:
    h = two_hosts()
    assert h.play([CANNOT_CONNECT_NOW]) is READING
    resolves = h.of_type(ResolveHost)
    assert [r.host for r in resolves] == ["db1.example", "db2.example"]
    assert [o.address.address for o in h.of_type(OpenConnection)] == ["192.0.2.1", "198.51.100.7"]
    (failed,) = h.of_type(AttemptFailed)
    assert failed.next == "next host"
    assert failed.attempt.sqlstate == "57P03"
    assert h.feed(AUTH_OK + startup_done()) is OK
    assert h.machine.host is not None
    assert h.machine.host.host == "db2.example"
    assert h.machine.attempts == (failed.attempt,)
    assert_transitions(h.events)


@pytest.mark.parametrize(
    "reply", [BAD_PASSWORD, NO_HBA, error_response("3D000", 'database "app" does not exist')]
)
def test_other_errors_with_two_hosts_give_up(reply: bytes) -> None:
    h = two_hosts()
    exc = connect_error(h, [reply])
    assert len(exc.attempts) == 1
    assert [r.host for r in h.of_type(ResolveHost)] == ["db1.example"]
    assert len(h.of_type(OpenConnection)) == 1
    assert h.of_type(AttemptFailed)[-1].next == "give up"


def test_error_after_auth_ok_with_two_hosts_gives_up() -> None:
    h = two_hosts(sslmode="prefer")
    exc = connect_error(h, [b"N", AUTH_OK + CANNOT_CONNECT_NOW])
    assert len(exc.attempts) == 1
    assert exc.sqlstate == "57P03"
    assert len(h.of_type(OpenConnection)) == 1


def test_target_session_attrs_rejects_with_terminate_and_moves_on() -> None:
    h = two_hosts(target_session_attrs="read-write")
    read_only = startup_done(
        parameters={
            "server_version": "18.0",
            "default_transaction_read_only": "on",
            "in_hot_standby": "off",
        }
    )
    assert h.play([AUTH_OK + read_only]) is READING
    (failed,) = h.of_type(AttemptFailed)
    assert failed.next == "next host"
    assert str(failed.attempt.error) == "session is read-only"
    assert failed.attempt.step == "checking target_session_attrs"
    assert ("close", TERMINATE) in h.log
    assert [r.host for r in h.of_type(ResolveHost)] == ["db1.example", "db2.example"]
    assert h.feed(AUTH_OK + startup_done()) is OK
    assert h.machine.host is not None
    assert h.machine.host.host == "db2.example"


def test_undefined_object_retries_without_application_name() -> None:
    """Servers before 9.0 reject application_name (42704): libpq retries without it."""
    h = Harness(make_machine(application_name="app1"))
    h.play([])
    (startup,) = client_messages(h.take(), untyped_first=1)
    assert startup_parameters(startup.body)[1]["application_name"] == "app1"
    unknown = error_response("42704", 'unrecognized configuration parameter "application_name"')
    assert h.feed(AUTH_OK + unknown) is READING
    (failed,) = h.of_type(AttemptFailed)
    assert failed.next == "retry"
    first, second = h.of_type(OpenConnection)
    assert first.address == second.address
    (startup,) = client_messages(h.take(), untyped_first=1)
    assert "application_name" not in startup_parameters(startup.body)[1]
    assert h.feed(AUTH_OK + startup_done()) is OK


def test_connection_refused_moves_to_the_next_address_then_host() -> None:
    h = two_hosts()
    h.refuse = {"192.0.2.1", "192.0.2.2"}
    assert h.pump() is READING
    assert [o.address.address for o in h.of_type(OpenConnection)] == [
        "192.0.2.1",
        "192.0.2.2",
        "198.51.100.7",
    ]
    first, second = h.machine.attempts
    # The second address was db1's last: what comes next is another host.
    assert [f.next for f in h.of_type(AttemptFailed)] == ["next address", "next host"]
    for attempt, address in ((first, "192.0.2.1"), (second, "192.0.2.2")):
        assert attempt.address == address
        assert attempt.step == "opening the connection"
        assert type(attempt.error) is TransportError
        assert attempt.error.errno == 111
        assert str(attempt.error) == (
            "Connection refused\n"
            "\tIs the server running on that host and accepting TCP/IP connections?"
        )
    assert h.feed(AUTH_OK + startup_done()) is OK


def test_everything_refused() -> None:
    h = two_hosts()
    h.refuse = {"192.0.2.1", "192.0.2.2", "198.51.100.7"}
    exc = connect_error(h)
    assert [a.address for a in exc.attempts] == ["192.0.2.1", "192.0.2.2", "198.51.100.7"]
    assert str(exc).count("Connection refused") == 3
    assert [f.next for f in h.of_type(AttemptFailed)] == ["next address", "next host", "give up"]
    assert h.machine.poll() is FAILED


@pytest.mark.parametrize("how", ["refused", "cannot-connect-now"])
def test_the_last_attempt_says_give_up(how: str) -> None:
    h = Harness(make_machine())
    if how == "refused":
        h.refuse = {"192.0.2.10"}
        connect_error(h)
    else:
        connect_error(h, [CANNOT_CONNECT_NOW])
    assert h.of_type(AttemptFailed)[-1].next == "give up"


def test_unix_socket_refused_hint() -> None:
    h = Harness(make_machine(host="/run/pg"))
    h.refuse = {"/run/pg/.s.PGSQL.5432"}
    exc = connect_error(h)
    (attempt,) = exc.attempts
    assert str(attempt.error) == (
        "Connection refused\n"
        "\tIs the server running locally and accepting connections on that socket?"
    )


def test_resolve_failed_and_empty_answers_move_to_the_next_host() -> None:
    m = make_machine(host="db1.example,db2.example,db3.example")
    assert m.next_event() == ResolveHost(host="db1.example", port=5432)
    m.resolve_failed("Name or service not known")
    seen = _until(m, ResolveHost)
    assert seen[1:] == [StatusChanged(status=_S.NEEDED), ResolveHost(host="db2.example", port=5432)]
    failed = seen[0]
    assert isinstance(failed, AttemptFailed)
    assert failed.next == "next host"
    assert failed.attempt.step == "resolving the host"
    assert str(failed.attempt.error) == (
        'could not translate host name "db1.example" to address: Name or service not known'
    )
    m.addresses_resolved([])
    seen = _until(m, ResolveHost)
    assert seen[-1] == ResolveHost(host="db3.example", port=5432)
    failed = seen[0]
    assert isinstance(failed, AttemptFailed)
    assert str(failed.attempt.error) == 'could not translate host name "db2.example" to address'
    assert m.poll() is WRITING
    m.resolve_failed("Temporary failure in name resolution")
    with pytest.raises(ConnectError) as exc:
        _until(m, ResolveHost)
    assert len(exc.value.attempts) == 3
    assert m.poll() is FAILED


def _until(m: pgproto.ConnectionStateMachine, kind: type[Event]) -> list[Event]:
    seen: list[Event] = []
    for _ in range(100):
        event = m.next_event()
        assert event is not NEED_DATA, seen
        seen.append(event)
        if isinstance(event, kind):
            return seen
    raise AssertionError(seen)


def test_timer_expired_while_connecting_moves_to_the_next_address() -> None:
    m = make_machine(host="db1.example", connect_timeout="10")
    _until(m, ResolveHost)
    m.addresses_resolved(["192.0.2.1", "192.0.2.2"])
    seen = _until(m, OpenConnection)
    assert StartTimer(seconds=10.0) in seen
    assert m.poll() is WRITING
    m.timer_expired()
    seen = _until(m, OpenConnection)
    (failed,) = [e for e in seen if isinstance(e, AttemptFailed)]
    assert failed.next == "next address"
    assert failed.attempt.address == "192.0.2.1"
    assert type(failed.attempt.error) is TransportError
    assert str(failed.attempt.error) == "timeout expired"
    assert StartTimer(seconds=10.0) in seen  # a new address, a new deadline
    assert not any(isinstance(e, CloseConnection) for e in seen)  # nothing was open
    opening = seen[-1]
    assert isinstance(opening, OpenConnection)
    assert opening.address.address == "192.0.2.2"
    m.connection_made()


def test_timer_expired_while_reading_closes_and_moves_on() -> None:
    h = Harness(make_machine(host="db1.example", connect_timeout="10"))
    h.addresses = {"db1.example": ["192.0.2.1", "192.0.2.2"]}
    assert h.pump() is READING
    h.machine.timer_expired()
    assert h.pump() is READING
    # A timer for the name lookup, then one per address.
    assert h.actions() == ["timer", "timer", "open", "send", "close", "timer", "open", "send"]
    assert h.log[4] == ("close", b"")
    (attempt,) = h.machine.attempts
    assert str(attempt.error) == "timeout expired"
    assert attempt.step == "authentication"
    h.machine.timer_expired()
    exc = connect_error(h)
    assert [str(a.error) for a in exc.attempts] == ["timeout expired", "timeout expired"]


def test_timer_during_resolve_moves_to_the_next_host() -> None:
    m = make_machine(host="db1.example,db2.example", connect_timeout="10")
    h = Harness(m, addresses={"db1.example": ["192.0.2.1", "192.0.2.2"]})
    assert h.pump() is READING
    m.receive_data(CANNOT_CONNECT_NOW)  # next host: db1's second address is skipped
    seen = _until(m, ResolveHost)
    assert seen[-2:] == [StartTimer(seconds=10.0), ResolveHost(host="db2.example", port=5432)]
    m.timer_expired()  # the lookup of db2 takes too long: db2 fails, nothing is opened
    events: list[Event] = []

    def collect() -> None:
        while (event := m.next_event()) is not NEED_DATA:
            events.append(event)

    with pytest.raises(ConnectError) as exc:
        collect()
    assert not any(isinstance(e, OpenConnection) for e in events)
    last = exc.value.attempts[-1]
    assert (last.host, last.address, str(last.error)) == ("db2.example", None, "timeout expired")
    assert last.step == "resolving the host"


def test_timer_after_ok_is_ignored() -> None:
    h = Harness(make_machine(connect_timeout="10"))
    assert h.play([AUTH_OK + startup_done()]) is OK
    h.machine.timer_expired()
    assert h.pump() is OK
    assert h.machine.attempts == ()


# --------------------------------------------------------------------------
# misuse by the driver


@pytest.mark.parametrize(
    ("answer", "text"),
    [
        (
            lambda m: m.connection_made(),
            "unexpected answer to a connect command (waiting for nothing)",
        ),
        (
            lambda m: m.connection_failed("boom"),
            "unexpected answer to a connect command (waiting for nothing)",
        ),
        (
            lambda m: m.addresses_resolved(["192.0.2.1"]),
            "unexpected answer to a resolve command (waiting for nothing)",
        ),
        (
            lambda m: m.resolve_failed("nope"),
            "unexpected answer to a resolve command (waiting for nothing)",
        ),
    ],
)
def test_answer_without_a_command(
    answer: Callable[[pgproto.ConnectionStateMachine], None], text: str
) -> None:
    m = make_machine()
    with pytest.raises(LocalProtocolError) as exc:
        answer(m)
    assert str(exc.value) == text
    _assert_poisoned(m, exc.value)


def _assert_poisoned(m: pgproto.ConnectionStateMachine, error: LocalProtocolError) -> None:
    assert m.status is _S.BAD
    assert m.poll() is FAILED
    # What is still queued (the change to BAD, closing an open transport)
    # comes out first; then the error, for good.
    while True:
        try:
            event = m.next_event()
        except LocalProtocolError:
            break
        assert isinstance(event, StatusChanged | CloseConnection)
    for _ in range(2):
        with pytest.raises(LocalProtocolError) as again:
            m.next_event()
        assert again.value is error
    assert m.error is error
    with pytest.raises(LocalProtocolError):
        m.connection_made()
    assert m.error is error  # the first misuse stays the reason
    assert m.poll() is FAILED


def test_wrong_answer_to_a_command() -> None:
    m = make_machine()
    assert isinstance(m.next_event(), ResolveHost)
    with pytest.raises(LocalProtocolError) as exc:
        m.connection_made()
    assert str(exc.value) == "unexpected answer to a connect command (waiting for resolve)"
    _assert_poisoned(m, exc.value)


def test_wrong_answer_mid_connection() -> None:
    h = Harness(make_machine())
    assert h.pump() is READING
    with pytest.raises(LocalProtocolError) as exc:
        h.machine.addresses_resolved(["192.0.2.1"])
    assert str(exc.value) == "unexpected answer to a resolve command (waiting for nothing)"
    _assert_poisoned(h.machine, exc.value)


def test_receive_data_without_a_transport() -> None:
    m = make_machine()
    with pytest.raises(LocalProtocolError) as exc:
        m.receive_data(b"R")
    assert str(exc.value) == "receive_data() called with no open connection"
    _assert_poisoned(m, exc.value)


@pytest.mark.parametrize("when", ["start", "reading", "auth-ok"])
def test_send_query_before_ok(when: str) -> None:
    h = Harness(make_machine())
    expected = {"start": "NEEDED", "reading": "AWAITING_RESPONSE", "auth-ok": "AUTH_OK"}[when]
    if when != "start":
        h.play([AUTH_OK] if when == "auth-ok" else [])
    with pytest.raises(LocalProtocolError) as exc:
        h.machine.send_query("select 1")
    assert str(exc.value) == (
        "a query can only be sent on an idle connection "
        f"(status {expected}, query in progress: False)"
    )
    # Refused without harm: the connection attempt carries on.
    assert h.machine.status.name == expected
    assert h.machine.error is None
    if when != "start":
        rest = [startup_done()] if when == "auth-ok" else [AUTH_OK + startup_done()]
        for turn in rest:
            h.feed(turn)
        assert h.machine.status is _S.OK


def test_send_query_while_busy() -> None:
    h = Harness(make_machine())
    h.play([AUTH_OK + startup_done()])
    h.machine.send_query("select 1")
    with pytest.raises(LocalProtocolError) as exc:
        h.machine.send_query("select 2")
    assert str(exc.value) == (
        "a query can only be sent on an idle connection (status OK, query in progress: True)"
    )
    # The first query goes on.
    h.feed(row_description("?column?") + data_row(b"1") + command_complete("SELECT 1") + ready())
    assert h.machine.status is _S.OK
    assert h.machine.error is None


def test_query_with_nul_is_refused() -> None:
    h = Harness(make_machine())
    h.play([AUTH_OK + startup_done()])
    with pytest.raises(
        LocalProtocolError, match=r"^a protocol string may not contain a NUL character$"
    ):
        h.machine.send_query("select '\x00'")


def test_close_is_idempotent_and_terminates_once() -> None:
    h = Harness(make_machine())
    h.play([AUTH_OK + startup_done()])
    before = len(h.events)
    h.machine.close()
    h.pump()
    h.machine.close()
    h.machine.close()
    assert h.pump() is FAILED
    closes = h.of_type(CloseConnection)
    assert closes == [CloseConnection(data=TERMINATE)]
    assert h.events[before:] == [StatusChanged(status=_S.BAD), CloseConnection(data=TERMINATE)]
    assert h.machine.data_to_send() == b""
    assert h.machine.status is _S.BAD
    assert h.machine.error is None
    assert h.machine.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        h.machine.send_query("select 1")


def test_close_while_connecting_drops_without_terminate() -> None:
    h = Harness(make_machine())
    assert h.pump() is READING
    h.machine.close()
    h.machine.close()
    assert h.pump() is FAILED
    assert h.of_type(CloseConnection) == [CloseConnection(data=b"")]
    assert h.machine.status is _S.BAD


def test_close_after_a_failure_emits_nothing() -> None:
    h = Harness(make_machine())
    exc = connect_error(h, [BAD_PASSWORD])
    count = len(h.events)
    h.machine.close()
    with pytest.raises(ConnectError) as again:
        h.machine.next_event()
    assert again.value is exc
    assert len(h.events) == count
    assert len(h.of_type(CloseConnection)) == 1


# --------------------------------------------------------------------------
# secrets


def _failure_runs() -> Iterator[tuple[str, Harness, BaseException | None]]:
    for case in CASES:
        h = Harness(make_machine(**case.params))
        try:
            h.play(case.turns)
        except pgproto.Error as exc:
            yield case.id, h, exc
    scenarios: dict[str, Callable[[Harness], object]] = {
        "cleartext-then-bad-password": lambda h: h.play([auth(3), BAD_PASSWORD]),
        "md5-then-bad-password": lambda h: h.play([auth(5, b"salt"), BAD_PASSWORD]),
        "scram-bad-signature": lambda h: h.play(
            [sasl("SCRAM-SHA-256"), SERVER_FIRST, auth(12, b"v=" + base64.b64encode(bytes(32)))]
        ),
        "cleartext-then-eof": lambda h: h.play([auth(3), b""]),
    }
    for name, run in scenarios.items():
        h = Harness(make_machine())
        try:
            run(h)
        except pgproto.Error as exc:
            yield name, h, exc
        else:
            raise AssertionError(name)


def test_the_password_never_shows() -> None:
    count = 0
    for name, h, exc in _failure_runs():
        for text in visible(h, exc):
            assert SECRET not in text, name
        count += 1
    assert count == len(CASES) + 4


def test_the_password_is_only_ever_sent() -> None:
    h = Harness(make_machine())
    h.play([auth(3), AUTH_OK + startup_done()])
    sent = h.sent()
    assert SECRET.encode() in sent
    for text in visible(h):
        assert SECRET not in text


def test_close_mid_auth_does_not_flush_the_password() -> None:
    m = make_machine()
    h = Harness(m)
    h.pump()
    m.receive_data(auth(3))
    # The driver reads the request but closes before sending the answer.
    events: list[Event] = []
    while (event := m.next_event()) is not NEED_DATA:
        events.append(event)
    assert m.poll() is WRITING
    m.close()
    while (event := m.next_event()) is not NEED_DATA:
        events.append(event)
    closes = [e for e in events if isinstance(e, CloseConnection)]
    assert closes == [CloseConnection(data=b"")]
    assert all(SECRET not in repr(e) for e in events)


def test_status_always_matches_the_last_status_changed() -> None:
    h = Harness(make_machine())
    h.pump()
    h.machine.close()
    h.pump()
    assert statuses(h.events)[-1] is h.machine.status


# --------------------------------------------------------------------------
# EOF


@pytest.mark.parametrize("phase", ["auth", "ready"])
def test_eof_with_a_partial_message_fails(phase: str) -> None:
    h = Harness(make_machine())
    h.play([AUTH_OK + startup_done()] if phase == "ready" else [])
    status = h.feed(b"R\x00\x00")
    for _ in range(3):
        try:
            status = h.feed(b"")
        except pgproto.Error:
            status = h.machine.poll()
        if status is FAILED:
            break
    assert status is FAILED


def test_eof_while_idle_breaks_the_connection() -> None:
    h = Harness(make_machine())
    h.play([AUTH_OK + startup_done()])
    with pytest.raises(TransportError) as exc:
        h.feed(b"")
    assert str(exc.value).startswith("server closed the connection unexpectedly")
    assert h.machine.poll() is FAILED
    assert h.log[-1] == ("close", b"")


# --------------------------------------------------------------------------
# arbitrary server bytes in every phase


@dataclass(frozen=True)
class Phase:
    params: Mapping[str, str]
    turns: tuple[bytes, ...]
    query: bool = False


SMALL_FIRST = server_first(iterations=16)

PHASES = {
    "ssl-reply": Phase({"sslmode": "prefer"}, ()),
    "tls-handshake": Phase({"sslmode": "prefer"}, (b"S",)),
    "auth": Phase({}, ()),
    "negotiation": Phase(P32, ()),
    "scram-challenge": Phase({}, (sasl("SCRAM-SHA-256"),)),
    "scram-final": Phase({}, (sasl("SCRAM-SHA-256"), SMALL_FIRST)),
    "after-auth": Phase({}, (AUTH_OK,)),
    "check-target": Phase(
        {"target_session_attrs": "read-write"},
        (AUTH_OK + startup_done(parameters={"server_version": "13.0"}),),
    ),
    "idle": Phase({}, (AUTH_OK + startup_done(),)),
    "query": Phase({}, (AUTH_OK + startup_done(),), query=True),
}


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def _fuzz_run(phase: Phase, data: bytes, cuts: list[int], eof: bool) -> Harness:
    h = Harness(make_machine(**phase.params), max_steps=2_000)
    error: pgproto.Error | None = None
    try:
        h.play(phase.turns)
        if phase.query:
            h.machine.send_query("select 1")
            h.pump()
        for chunk in [*_chunks(data, cuts), *([b""] if eof else [])]:
            if h.machine.poll() is FAILED:
                break
            h.feed(chunk)
    except pgproto.Error as exc:
        error = exc
    if error is not None:
        # A typed error, and the machine is done for good.
        m = h.machine
        assert m.status is _S.BAD
        assert m.poll() is FAILED
        with pytest.raises(pgproto.Error) as again:
            m.next_event()
        assert again.value is error
    assert_transitions(h.events)
    return h


server_bytes = st.one_of(
    st.binary(max_size=120),
    # sequences of well-framed messages with arbitrary types and bodies
    st.lists(
        st.tuples(st.sampled_from(b"RSKZENvCDTIAGHW?\x00\xff"), st.binary(max_size=24)).map(
            lambda kb: message(bytes([kb[0]]), kb[1])
        ),
        max_size=6,
    ).map(b"".join),
)


@pytest.mark.parametrize("name", list(PHASES))
@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    data=server_bytes,
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    eof=st.booleans(),
)
def test_arbitrary_server_bytes_only_raise_pgproto_errors(
    name: str, data: bytes, cuts: list[int], eof: bool
) -> None:
    _fuzz_run(PHASES[name], data, cuts, eof)


def test_fuzz_driver_reaches_every_phase() -> None:
    for name, phase in PHASES.items():
        h = _fuzz_run(phase, b"", [], eof=False)
        expected = {
            "ssl-reply": _S.SSL_STARTUP,
            "tls-handshake": _S.SSL_STARTUP,
            "after-auth": _S.AUTH_OK,
            "check-target": _S.CHECK_WRITABLE,
            "idle": _S.OK,
            "query": _S.OK,
        }.get(name, _S.AWAITING_RESPONSE)
        assert h.machine.status is expected, name
    assert h.machine.query_in_progress


@pytest.mark.parametrize("name", list(PHASES))
def test_every_message_type_in_every_phase(name: str) -> None:
    """Every type byte, well framed, with a short body: a typed error or progress."""
    for kind in range(256):
        _fuzz_run(PHASES[name], message(bytes([kind]), b"\x00\x00\x00\x00"), [], eof=False)


# --------------------------------------------------------------------------
# the startup packet (reference spec §7.1)


def _startup(env: Environment = ENV, **params: str | int | None) -> tuple[int, dict[str, str]]:
    machine = ConnectionStateMachine(
        _resolve_with(env, **params), random_bytes=fixed_nonce, scram_cache=None
    )
    h = Harness(machine)
    assert h.pump() is READING
    (startup,) = client_messages(h.take(), untyped_first=1)
    return startup_parameters(startup.body)


def _resolve_with(env: Environment, **overrides: str | int | None) -> pgproto.ConnParams:
    kwargs: dict[str, str | int | None] = {
        "host": "db.example",
        "user": "alice",
        "dbname": "app",
        "sslmode": "disable",
    }
    kwargs.update(overrides)
    return pgproto.resolve_params(env=env, **kwargs)  # type: ignore[arg-type]


def test_startup_packet_minimal() -> None:
    version, pairs = _startup()
    assert version == 196608  # 3.0 unless asked
    assert list(pairs.items()) == [("user", "alice"), ("database", "app")]


def test_startup_packet_every_parameter_in_libpq_order() -> None:
    env = Environment(
        environ={"PGDATESTYLE": "ISO, DMY", "PGTZ": "Europe/Paris", "PGGEQO": "off"},
        user="pgproto-test",
        uid=4242,
        client_encoding="LATIN1",
    )
    version, pairs = _startup(
        env,
        replication="database",
        options="-c search_path=app",
        application_name="reporting",
        fallback_application_name="pgproto-tests",
        client_encoding="auto",
        max_protocol_version="3.2",
    )
    assert version == 196610
    assert list(pairs.items()) == [
        ("user", "alice"),
        ("database", "app"),
        ("replication", "database"),
        ("options", "-c search_path=app"),
        ("application_name", "reporting"),
        ("client_encoding", "LATIN1"),  # client_encoding=auto, from the locale
        ("datestyle", "ISO, DMY"),
        ("timezone", "Europe/Paris"),
        ("geqo", "off"),
    ]


def test_startup_packet_fallback_application_name() -> None:
    assert _startup(fallback_application_name="fb")[1]["application_name"] == "fb"
    # An explicitly empty application_name suppresses the fallback (libpq's rule).
    params = pgproto.resolve_params(
        "host=db.example user=alice dbname=app sslmode=disable application_name=''",
        env=ENV,
        fallback_application_name="fb",
    )
    h = Harness(ConnectionStateMachine(params, random_bytes=fixed_nonce, scram_cache=None))
    assert h.pump() is READING
    (startup,) = client_messages(h.take(), untyped_first=1)
    assert "application_name" not in startup_parameters(startup.body)[1]


def test_startup_packet_default_env_values_are_not_sent() -> None:
    env = Environment(
        environ={"PGDATESTYLE": "DEFAULT", "PGTZ": "default", "PGGEQO": ""},
        user="pgproto-test",
        uid=4242,
    )
    pairs = _startup(env)[1]
    assert "datestyle" not in pairs
    assert "timezone" not in pairs
    assert pairs["geqo"] == ""  # set but empty is sent as it is, as libpq does


def test_commands_and_startup_packet_are_kept_per_params_within_a_bound() -> None:
    """The OpenConnection commands and the StartupMessage depend on the
    parameters alone: a second machine over the same ConnParams (what
    resolve_params' cache hands out) gets the very same command and sends
    the same packet.  A host name that keeps resolving to new addresses does
    not grow the memo beyond its bound."""
    params = make_params()

    def opened(address: str) -> tuple[ConnectionStateMachine, OpenConnection]:
        m = ConnectionStateMachine(params)
        assert isinstance(m.next_event(), ResolveHost)
        m.addresses_resolved([address])
        commands = [e for e in drain(m) if isinstance(e, OpenConnection)]
        assert len(commands) == 1
        assert commands[0].address.address == address
        return m, commands[0]

    m1, first = opened("192.0.2.1")
    m1.connection_made()
    drain(m1)
    m2, second = opened("192.0.2.1")
    assert second is first
    m2.connection_made()
    drain(m2)
    packet = m1.data_to_send()
    assert b"user\x00alice\x00database\x00app\x00" in packet
    assert m2.data_to_send() == packet
    for i in range(2, 200):
        opened(f"192.0.2.{i}")
    assert len(params._memo) <= 64
