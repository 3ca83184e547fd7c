"""``pgproto.CancelStateMachine`` (libpq 17's ``PGcancelConn``) without a server.

Every cancel runs against ``fake_server.Harness`` (a socket-free adapter);
the TLS cases put an OpenSSL server-side ``SSLObject`` over memory BIOs
(``tls_helpers.FakeServer``, trustme certificates) on the other end and
decrypt what the cancel sent.  The rules checked are libpq's (reference spec
§9.5): a copy of the connection's options, exactly one host and one address
(the ones the connection uses), the normal encryption steps, the
CancelRequest where the startup packet would go, and then only the end of the
stream counts as success.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from fake_server import (
    AUTH_OK,
    FAILED,
    OK,
    READING,
    SSL_REQUEST,
    TERMINATE,
    WRITING,
    Harness,
    PeerHarness,
    assert_transitions,
    backend_key,
    cancel_request,
    client_messages,
    connect_error,
    drain,
    error_response,
    make_machine,
    make_params,
    negotiate,
    parameter_status,
    ready,
    startup_done,
    startup_parameters,
    status_of,
    statuses,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tls_helpers import FakeServer, server_context

import pgproto
from pgproto import (
    NEED_DATA,
    Address,
    AttemptFailed,
    AttemptStarted,
    CancelStateMachine,
    CloseConnection,
    ConnectError,
    ConnectionStateMachine,
    ConnStatus,
    Event,
    LocalProtocolError,
    OpenConnection,
    PollingStatus,
    RemoteProtocolError,
    ResolveHost,
    StartTimer,
    StatusChanged,
    TLSError,
    TransportError,
)
from pgproto._states import TRANSITIONS, Input

_S = ConnStatus

PID = 4321  # fake_server's default BackendKeyData
KEY = b"\x0a\x0b\x0c\x0d"
CANCEL_CODE = 80877102
#: The CancelRequest for PID/KEY, spelled out: length 16, code 1234.5678, pid, key.
CANCEL_BYTES = b"\x00\x00\x00\x10" + b"\x04\xd2\x16\x2e" + b"\x00\x00\x10\xe1" + KEY

AWAIT_STEP = "waiting for the server to close the cancel connection"
UNEXPECTED = "unexpected response from server"
SERVER_TEXT = "SERVER-CONTROLLED-TEXT-31337"

PLAIN_STATUSES = [_S.STARTED, _S.MADE, _S.AWAITING_RESPONSE, _S.OK]
TLS_STATUSES = [_S.STARTED, _S.MADE, _S.SSL_STARTUP, _S.MADE, _S.AWAITING_RESPONSE, _S.OK]


def test_expected_bytes_are_self_consistent() -> None:
    assert cancel_request(PID, KEY) == CANCEL_BYTES
    assert len(CANCEL_BYTES) == 16


@pytest.fixture
def inputs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[ConnStatus, Input]]:
    """Every (status, input) pair the machines look up in the state table."""
    seen: list[tuple[ConnStatus, Input]] = []

    class Recording(dict[tuple[ConnStatus, Input], ConnStatus]):
        def __getitem__(self, pair: tuple[ConnStatus, Input]) -> ConnStatus:
            seen.append(pair)
            return super().__getitem__(pair)

    # _machine.py looks the table up through its module-level name.
    monkeypatch.setattr("pgproto._machine.TRANSITIONS", Recording(TRANSITIONS))
    return seen


# --------------------------------------------------------------------------
# source connections


def source(
    *,
    addresses: dict[str, list[str]] | None = None,
    refuse: set[str] | None = None,
    done: bytes | None = None,
    **params: str | int | None,
) -> Harness:
    """A connection made in plaintext (disable, allow, or prefer answered "N")."""
    h = Harness(make_machine(**params), addresses=addresses or {}, refuse=refuse or set())
    status = h.pump()
    if h.take().startswith(SSL_REQUEST):
        status = h.feed(b"N")
    assert status is READING
    status = h.feed(AUTH_OK + (startup_done() if done is None else done))
    assert status is OK, h.machine.attempts
    h.take()
    return h


def cancel_for(src: Harness | ConnectionStateMachine, **harness: Any) -> Harness:
    machine = src.machine if isinstance(src, Harness) else src
    return Harness(CancelStateMachine(machine), **harness)


@dataclass(frozen=True)
class Snapshot:
    """What a connection's user can see of it."""

    status: ConnStatus
    poll: PollingStatus
    params: dict[str, str]
    pid: int | None
    key: bytes | None
    host: Any
    address: Address | None
    attempts: tuple[Any, ...]
    ssl: bool
    tls: Any
    protocol: tuple[int, int]
    txn: str | None
    query: bool

    @classmethod
    def of(cls, m: ConnectionStateMachine) -> Snapshot:
        return cls(
            m.status,
            m.poll(),
            m.server_parameters,
            m.backend_pid,
            m.backend_key,
            m.host,
            m.address,
            m.attempts,
            m.ssl_in_use,
            m.tls,
            m.protocol_version,
            m.transaction_status,
            m.query_in_progress,
        )


# --------------------------------------------------------------------------
# TLS over memory BIOs


Split = Callable[[bytes], list[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data]


def server_plaintext(server: FakeServer) -> bytes:
    """Everything the fake server can decrypt now."""
    out = bytearray()
    if not server.done:
        return b""
    while True:
        try:
            data = server.obj.read(65536)
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            return bytes(out)
        if not data:
            return bytes(out)
        out += data


def exchange(h: Harness, server: FakeServer, split: Split = whole, first: bytes = b"") -> bytes:
    """Carry ciphertext both ways (*first*: client bytes already taken) until
    neither side has more to say; the server's replies are fed in the pieces
    *split* cuts.  Returns what the server decrypted."""
    received = bytearray()
    for _ in range(20):
        reply = server.step(first + h.take())
        first = b""
        received += server_plaintext(server)
        if not reply:
            return bytes(received)
        for piece in split(reply):
            assert h.machine.poll() is READING
            try:
                h.feed(piece)
            except ConnectError:
                # The client gave up (certificate, ALPN, ...): next_event()
                # raises it again for the test to inspect.
                return bytes(received)
    raise AssertionError("TLS exchange did not settle")


def close_notify(server: FakeServer) -> bytes:
    """The server's close_notify alert."""
    with contextlib.suppress(ssl.SSLWantReadError):
        server.obj.unwrap()
    return server.outgoing.read()


def start_tls(h: Harness) -> bytes:
    """Pump until the ClientHello is out (after "S", or at once for direct
    TLS); returns it."""
    assert h.pump() is READING
    hello = h.take()
    if hello == SSL_REQUEST:
        assert h.feed(b"S") is READING
        hello = h.take()
    assert hello[:1] == b"\x16", hello[:16]  # a TLS handshake record
    return hello


def tls_source(leaf: trustme.LeafCert | tuple[bytes, bytes], **params: str | int | None) -> Harness:
    """A connection made over TLS (sslmode require and up, or prefer with "S")."""
    return tls_connect(leaf, make_machine(**params))


def tls_connect(
    leaf: trustme.LeafCert | tuple[bytes, bytes], machine: ConnectionStateMachine
) -> Harness:
    """Connect *machine* over TLS to a fake server presenting *leaf*."""
    h = Harness(machine)
    server = FakeServer(server_context(leaf))
    (startup,) = client_messages(exchange(h, server, first=start_tls(h)), untyped_first=1)
    assert startup_parameters(startup.body)[1]["user"] == "alice"
    assert h.feed(server.send(AUTH_OK + startup_done())) is OK
    assert h.machine.ssl_in_use
    return h


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def leaf(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("db.example", "localhost", "127.0.0.1")


@pytest.fixture
def root_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "root.crt"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def tls_cancel(
    h: Harness, leaf: trustme.LeafCert | tuple[bytes, bytes], split: Split = whole
) -> tuple[FakeServer, bytes]:
    """Run the cancel's TLS handshake; returns the server and what it decrypted."""
    server = FakeServer(server_context(leaf))
    return server, exchange(h, server, split, start_tls(h))


# --------------------------------------------------------------------------
# creation


def test_a_machine_that_never_connected_is_refused() -> None:
    m = make_machine()
    with pytest.raises(LocalProtocolError, match=r"^connection not open$"):
        CancelStateMachine(m)
    assert m.status is _S.NEEDED
    assert m.next_event() == ResolveHost(host="db.example", port=5432)


def test_a_machine_still_connecting_is_refused() -> None:
    h = Harness(make_machine())
    assert h.pump() is READING  # startup packet sent, waiting for authentication
    before = Snapshot.of(h.machine)
    with pytest.raises(LocalProtocolError, match=r"^connection not open$"):
        CancelStateMachine(h.machine)
    assert Snapshot.of(h.machine) == before
    assert h.feed(AUTH_OK + startup_done()) is OK  # and it carries on


def test_a_failed_machine_is_refused() -> None:
    h = Harness(make_machine())
    connect_error(h, [error_response("28000", "no pg_hba.conf entry")])
    with pytest.raises(LocalProtocolError, match=r"^connection not open$"):
        CancelStateMachine(h.machine)


def test_a_closed_machine_is_refused() -> None:
    h = source()
    h.machine.close()
    with pytest.raises(LocalProtocolError, match=r"^connection not open$"):
        CancelStateMachine(h.machine)


def test_a_machine_broken_by_eof_is_refused() -> None:
    h = source()
    with pytest.raises(pgproto.Error):
        h.feed(b"")
    assert h.machine.status is _S.BAD
    with pytest.raises(LocalProtocolError, match=r"^connection not open$"):
        CancelStateMachine(h.machine)


def test_no_backend_key_data() -> None:
    h = source(done=parameter_status("server_version", "18.0") + ready())
    assert h.machine.backend_key is None
    with pytest.raises(LocalProtocolError, match=r"^no cancellation key received$"):
        CancelStateMachine(h.machine)
    assert h.machine.status is _S.OK


def test_a_fresh_cancel_machine_is_allocated_and_inert() -> None:
    """PQcancelCreate only copies: no command, no byte until it is pumped."""
    c = CancelStateMachine(source().machine)
    assert c.status is _S.NEEDED
    assert c.cancel_pid == PID
    assert c.attempts == ()
    assert c.error is None
    assert c.data_to_send() == b""
    assert c.backend_pid is None  # its own connection has no backend
    assert c.backend_key is None


# --------------------------------------------------------------------------
# plaintext over TCP


def test_plaintext_cancel_to_the_same_address(inputs: list[tuple[ConnStatus, Input]]) -> None:
    src = source(addresses={"db.example": ["192.0.2.77"]})
    assert src.of_type(ResolveHost)  # the source looked the name up
    inputs.clear()
    h = cancel_for(src)  # no addresses: a lookup here would answer 192.0.2.10
    m = h.machine
    assert h.pump() is READING
    assert not h.of_type(ResolveHost)
    (opened,) = h.of_type(OpenConnection)
    assert opened.address == Address(kind="tcp", address="192.0.2.77", port=5432)
    assert opened.address == src.machine.address
    assert opened.host == "db.example"
    assert opened.peer_credentials is False
    (started,) = h.of_type(AttemptStarted)
    assert started.encryption == "plaintext"
    assert started.direct is False
    assert h.take() == CANCEL_BYTES
    assert status_of(m) is _S.AWAITING_RESPONSE
    assert m.poll() is READING
    assert m.next_event() is NEED_DATA
    assert m.poll() is READING  # still waiting: nothing more to do
    assert h.actions() == ["open", "send"]

    assert h.feed(b"") is OK
    assert m.status is _S.OK
    assert m.error is None
    assert m.attempts == ()
    assert statuses(h.events) == PLAIN_STATUSES
    assert_transitions(h.events)
    assert h.events[-1] == CloseConnection(data=b"")
    assert h.actions() == ["open", "send", "recv", "close"]
    assert not h.of_type(AttemptFailed)
    assert not h.of_type(StartTimer)
    assert inputs == [
        (_S.NEEDED, Input.OPEN_REQUESTED),
        (_S.STARTED, Input.TRANSPORT_READY),
        (_S.MADE, Input.CANCEL_SENT),
        (_S.AWAITING_RESPONSE, Input.CANCEL_CONFIRMED),
    ]
    assert all(pair in TRANSITIONS for pair in inputs)

    # Done: more pumping does nothing; close() sends no Terminate.
    assert m.next_event() is NEED_DATA
    assert m.poll() is OK
    m.close()
    assert drain(m) == [StatusChanged(status=_S.BAD)]  # no CloseConnection: already closed
    assert m.data_to_send() == b""
    assert TERMINATE not in h.sent()
    assert status_of(m) is _S.BAD
    assert m.poll() is FAILED
    m.close()  # idempotent
    assert drain(m) == []


def test_hostaddr_is_dialled_without_a_lookup() -> None:
    src = source(hostaddr="192.0.2.55")
    assert not src.of_type(ResolveHost)
    h = cancel_for(src)
    assert h.play([b""]) is OK
    assert not h.of_type(ResolveHost)
    (opened,) = h.of_type(OpenConnection)
    assert opened.address == Address(kind="tcp", address="192.0.2.55", port=5432)
    assert opened.host == "db.example"  # the name stays for messages and TLS checks
    assert h.log[1] == ("send", CANCEL_BYTES)


def test_ipv6_address_and_port() -> None:
    src = source(hostaddr="2001:db8::7", port=6543)
    h = cancel_for(src)
    assert h.play([b""]) is OK
    (opened,) = h.of_type(OpenConnection)
    assert opened.address == Address(kind="tcp", address="2001:db8::7", port=6543)


def test_socket_options_are_copied() -> None:
    src = source(
        keepalives="1",
        keepalives_idle="7",
        keepalives_interval="3",
        keepalives_count="5",
        tcp_user_timeout="1234",
    )
    h = cancel_for(src)
    h.pump()
    (source_open,) = src.of_type(OpenConnection)
    (opened,) = h.of_type(OpenConnection)
    assert opened == source_open
    assert (opened.keepalives_idle, opened.keepalives_interval, opened.keepalives_count) == (
        7,
        3,
        5,
    )
    assert opened.tcp_user_timeout == 1234
    off = cancel_for(source(keepalives="0"))
    off.pump()
    assert off.of_type(OpenConnection)[0].keepalives is False


def test_source_in_the_middle_of_a_query() -> None:
    src = source()
    src.machine.send_query("select pg_sleep(60)")
    assert src.pump() is READING
    h = cancel_for(src)
    assert h.play([b""]) is OK
    assert h.log[1] == ("send", CANCEL_BYTES)
    assert src.machine.query_in_progress
    # The source then receives the cancellation error and is idle again.
    src.feed(error_response("57014", "canceling statement due to user request", "ERROR"))
    assert src.feed(ready()) is OK
    assert not src.machine.query_in_progress


def test_pid_and_key_come_from_backend_key_data() -> None:
    key = b"\xff\x00\x80\x7f"
    src = source(done=backend_key(0x7FFFFFFF, key) + ready())
    c = CancelStateMachine(src.machine)
    assert c.cancel_pid == 0x7FFFFFFF
    h = Harness(c)
    h.pump()
    assert h.take() == cancel_request(0x7FFFFFFF, key)


# --------------------------------------------------------------------------
# protocol 3.2: long keys


@pytest.mark.parametrize("length", [4, 32, 255, 256])
def test_protocol_3_2_sends_the_whole_key(length: int) -> None:
    key = bytes(range(256))[:length][::-1]
    src = source(max_protocol_version="3.2", done=startup_done(pid=777, key=key))
    version, _ = startup_parameters(client_messages(src.log[1][1], untyped_first=1)[0].body)
    assert version == 0x30002
    assert src.machine.protocol_version == (3, 2)
    assert src.machine.backend_key == key
    h = cancel_for(src)
    assert h.pump() is READING
    sent = h.take()
    assert sent == cancel_request(777, key)
    (length_word, code, pid) = struct.unpack_from("!III", sent)
    assert length_word == 12 + length == len(sent)
    assert code == CANCEL_CODE
    assert pid == 777
    assert sent[12:] == key
    assert h.feed(b"") is OK


def test_protocol_3_2_negotiated_down_to_3_0() -> None:
    src = Harness(make_machine(max_protocol_version="3.2"))
    assert src.play([negotiate((3, 0)) + AUTH_OK + startup_done()]) is OK
    assert src.machine.protocol_version == (3, 0)
    h = cancel_for(src)
    h.pump()
    assert h.take() == CANCEL_BYTES


# --------------------------------------------------------------------------
# any byte from the server is an error


@pytest.mark.parametrize(
    "reply",
    [
        b"\x00",
        b"E",
        b"N",
        error_response("57014", SERVER_TEXT, "ERROR"),
        error_response("XX000", SERVER_TEXT) + error_response("XX000", SERVER_TEXT),
    ],
    ids=["nul", "E", "N", "error-response", "two-errors"],
)
def test_any_byte_from_the_server_is_unexpected(reply: bytes) -> None:
    src = source()
    h = cancel_for(src)
    m = h.machine
    exc = connect_error(h, [reply])
    (attempt,) = exc.attempts
    assert type(attempt.error) is RemoteProtocolError
    assert str(attempt.error) == UNEXPECTED
    assert attempt.step == AWAIT_STEP
    assert attempt.encryption == "plaintext"
    assert (attempt.host, attempt.address, attempt.port) == ("db.example", "192.0.2.10", 5432)
    assert str(exc) == (
        f'connection to server at "db.example" (192.0.2.10), port 5432 failed '
        f"({AWAIT_STEP}, plaintext): {UNEXPECTED}"
    )
    (failed,) = h.of_type(AttemptFailed)
    assert failed.next == "give up"
    assert h.actions() == ["open", "send", "recv", "close"]
    assert h.log[-1] == ("close", b"")
    assert len(h.of_type(OpenConnection)) == 1
    assert m.status is _S.BAD
    assert m.poll() is FAILED
    assert m.error is exc
    for _ in range(2):
        with pytest.raises(ConnectError) as again:
            m.next_event()
        assert again.value is exc
    assert_transitions(h.events)
    assert statuses(h.events)[-1] is _S.BAD
    # The server's words are never shown.
    for text in (str(exc), repr(exc), *map(repr, h.events)):
        assert SERVER_TEXT not in text
        assert "57014" not in text


def test_data_and_eof_in_one_read_is_still_unexpected() -> None:
    h = cancel_for(source())
    assert h.pump() is READING
    m = h.machine
    m.receive_data(b"x")
    m.receive_data(b"")
    exc = connect_error(h)
    assert str(exc.attempts[0].error) == UNEXPECTED


def test_data_after_success_is_refused_as_misuse() -> None:
    """After the hang-up the transport is closed: the adapter has nothing to feed."""
    h = cancel_for(source())
    assert h.play([b""]) is OK
    with pytest.raises(LocalProtocolError, match="no open connection"):
        h.machine.receive_data(b"late")


# --------------------------------------------------------------------------
# one host, one address


def test_refused_is_one_attempt() -> None:
    src = source()
    h = cancel_for(src, refuse={"192.0.2.10"})
    exc = connect_error(h)
    (attempt,) = exc.attempts
    assert type(attempt.error) is TransportError
    assert attempt.error.errno == 111
    assert str(attempt.error) == (
        "Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?"
    )
    assert attempt.step == "opening the connection"
    assert (attempt.host, attempt.address) == ("db.example", "192.0.2.10")
    (failed,) = h.of_type(AttemptFailed)
    assert failed.next == "give up"
    assert h.actions() == ["open"]
    assert h.take() == b""
    assert not h.of_type(CloseConnection)  # nothing was open
    assert h.machine.poll() is FAILED
    assert_transitions(h.events)


def test_multi_host_source_connected_to_its_second_host() -> None:
    addresses = {"a.example": ["192.0.2.1"], "b.example": ["192.0.2.2"]}
    src = source(host="a.example,b.example", addresses=addresses, refuse={"192.0.2.1"})
    assert src.machine.address == Address(kind="tcp", address="192.0.2.2", port=5432)
    assert len(src.machine.attempts) == 1  # the first host was refused

    ok = cancel_for(src, addresses=addresses)
    assert ok.play([b""]) is OK
    assert [e.address.address for e in ok.of_type(OpenConnection)] == ["192.0.2.2"]
    assert ok.of_type(OpenConnection)[0].host == "b.example"
    assert not ok.of_type(ResolveHost)

    # Refused there too: no other host, no other address.
    h = cancel_for(src, addresses=addresses, refuse={"192.0.2.1", "192.0.2.2"})
    exc = connect_error(h)
    (attempt,) = exc.attempts
    assert (attempt.host, attempt.address) == ("b.example", "192.0.2.2")
    assert [e.address.address for e in h.of_type(OpenConnection)] == ["192.0.2.2"]
    assert not h.of_type(ResolveHost)


def test_name_with_several_addresses_cancels_at_the_one_connected() -> None:
    addresses = {"db.example": ["192.0.2.1", "192.0.2.2", "192.0.2.3"]}
    src = source(addresses=addresses, refuse={"192.0.2.1", "192.0.2.2"})
    assert src.machine.address is not None
    assert src.machine.address.address == "192.0.2.3"
    h = cancel_for(src, addresses=addresses, refuse={"192.0.2.3"})
    exc = connect_error(h)
    assert [a.address for a in exc.attempts] == ["192.0.2.3"]
    assert [e.address.address for e in h.of_type(OpenConnection)] == ["192.0.2.3"]


@pytest.mark.parametrize("load_balance", ["random", "disable"])
def test_load_balance_random_does_not_reshuffle(load_balance: str) -> None:
    """Only one address of eight accepts; the source finds it after trying
    others (in shuffled order under random).  The cancel goes there and
    nowhere else, every time."""
    hosts = ["h1.example", "h2.example", "h3.example", "h4.example"]
    addresses = {h: [f"192.0.2.{i}1", f"192.0.2.{i}2"] for i, h in enumerate(hosts, 1)}
    others = {a for group in addresses.values() for a in group} - {"192.0.2.32"}
    src = source(
        host=",".join(hosts), load_balance_hosts=load_balance, addresses=addresses, refuse=others
    )
    target = Address(kind="tcp", address="192.0.2.32", port=5432)
    assert src.machine.address == target
    assert src.machine.host is not None
    assert src.machine.host.host == "h3.example"
    c = CancelStateMachine(src.machine)
    h = Harness(c, addresses=addresses, refuse=others)
    for _ in range(25):
        assert h.play([b""]) is OK
        c.reset()
    assert [e.address for e in h.of_type(OpenConnection)] == [target] * 25
    assert {e.host for e in h.of_type(OpenConnection)} == {"h3.example"}
    assert not h.of_type(ResolveHost)
    assert not h.of_type(AttemptFailed)
    # And refused: one attempt, the same address.
    for _ in range(10):
        refused = cancel_for(src, addresses=addresses, refuse=others | {"192.0.2.32"})
        assert [a.address for a in connect_error(refused).attempts] == ["192.0.2.32"]


def test_prefer_standby_gets_no_second_pass() -> None:
    standby = {"server_version": "18.0", "in_hot_standby": "on"}
    src = source(target_session_attrs="prefer-standby", done=startup_done(parameters=standby))
    h = cancel_for(src, refuse={"192.0.2.10"})
    exc = connect_error(h)
    assert len(exc.attempts) == 1
    assert len(h.of_type(OpenConnection)) == 1


@pytest.mark.parametrize("target", ["read-write", "primary", "standby", "read-only"])
def test_target_session_attrs_are_not_checked(target: str) -> None:
    """No SHOW / pg_is_in_recovery() on a cancel connection: only the request."""
    params = {"server_version": "18.0", "in_hot_standby": "off"}
    if target in ("standby", "read-only"):
        params["in_hot_standby"] = "on"
    params["default_transaction_read_only"] = params["in_hot_standby"]
    src = source(target_session_attrs=target, done=startup_done(parameters=params))
    h = cancel_for(src)
    assert h.play([b""]) is OK
    assert [d for name, d in h.log if name == "send"] == [CANCEL_BYTES]


# --------------------------------------------------------------------------
# timers


def test_connect_timeout_starts_a_timer_and_expires_while_waiting() -> None:
    src = source(connect_timeout="10")
    h = cancel_for(src)
    assert h.pump() is READING
    assert h.actions() == ["timer", "open", "send"]
    assert h.of_type(StartTimer) == [StartTimer(seconds=10.0)]
    m = h.machine
    m.timer_expired()
    with pytest.raises(ConnectError) as info:
        h.pump()
    (attempt,) = info.value.attempts
    assert type(attempt.error) is TransportError
    assert str(attempt.error) == "timeout expired"
    assert attempt.step == AWAIT_STEP
    assert h.log[-1] == ("close", b"")
    assert len(h.of_type(OpenConnection)) == 1
    assert m.poll() is FAILED
    assert_transitions(h.events)


def test_timer_expired_while_connecting() -> None:
    c = CancelStateMachine(source(connect_timeout="5").machine)
    events: list[Event] = []
    while not isinstance(event := c.next_event(), OpenConnection):
        assert event is not NEED_DATA
        events.append(event)
    assert StartTimer(seconds=5.0) in events
    assert c.poll() is WRITING  # the transport is being opened
    c.timer_expired()
    with pytest.raises(ConnectError) as info:
        drain(c)
    (attempt,) = info.value.attempts
    assert str(attempt.error) == "timeout expired"
    assert attempt.step == "opening the connection"
    assert c.poll() is FAILED


def test_no_timer_without_connect_timeout() -> None:
    h = cancel_for(source())
    assert h.play([b""]) is OK
    assert not h.of_type(StartTimer)


def test_timer_after_success_is_ignored() -> None:
    h = cancel_for(source(connect_timeout="10"))
    assert h.play([b""]) is OK
    h.machine.timer_expired()
    h.machine.deadline_expired()
    assert h.machine.next_event() is NEED_DATA
    assert h.machine.status is _S.OK
    assert h.machine.poll() is OK


def test_deadline_expired() -> None:
    h = cancel_for(source())
    assert h.pump() is READING
    h.machine.deadline_expired()
    with pytest.raises(ConnectError) as info:
        h.pump()
    (attempt,) = info.value.attempts
    assert str(attempt.error) == "timeout expired (overall deadline)"
    assert attempt.step == AWAIT_STEP
    assert h.log[-1] == ("close", b"")
    assert h.machine.poll() is FAILED


# --------------------------------------------------------------------------
# sslmode and sslnegotiation


@pytest.mark.parametrize("end", ["close_notify", "eof", "close_notify+split"])
@pytest.mark.parametrize("sslmode", ["require", "prefer"])
def test_cancel_goes_inside_tls(
    leaf: trustme.LeafCert, sslmode: str, end: str, inputs: list[tuple[ConnStatus, Input]]
) -> None:
    src = source(sslmode=sslmode) if sslmode == "prefer" else tls_source(leaf, sslmode=sslmode)
    inputs.clear()
    h = cancel_for(src)
    server, plaintext = tls_cancel(h, leaf)
    # SSLRequest first: sslmode is re-applied, whatever the source ended up with.
    assert h.log[1:3] == [("send", SSL_REQUEST), ("recv", b"S")]
    m = h.machine
    assert plaintext == CANCEL_BYTES
    assert server.sni == ["db.example"]
    assert status_of(m) is _S.AWAITING_RESPONSE
    assert m.poll() is READING  # session tickets after the handshake are no response
    assert m.ssl_in_use
    sent = h.sent()
    assert CANCEL_BYTES not in sent
    assert sent.startswith(SSL_REQUEST)
    (established,) = h.of_type(pgproto.TLSEstablished)
    assert established.direct is False
    assert established.alpn == "postgresql"

    if end == "eof":
        assert h.feed(b"") is OK
    else:
        alert = close_notify(server)
        assert alert
        pieces = [alert] if end == "close_notify" else [alert[:1], alert[1:7], alert[7:]]
        for piece in pieces[:-1]:
            assert h.feed(piece) is READING
        assert h.feed(pieces[-1]) is OK
    assert m.status is _S.OK
    assert m.error is None
    assert statuses(h.events) == TLS_STATUSES
    assert_transitions(h.events)
    assert h.events[-1] == CloseConnection(data=b"")
    assert len(h.of_type(OpenConnection)) == 1
    assert Input.STARTUP_SENT not in [event for _, event in inputs]
    assert (_S.MADE, Input.CANCEL_SENT) in inputs
    assert (_S.AWAITING_RESPONSE, Input.CANCEL_CONFIRMED) in inputs
    assert all(pair in TRANSITIONS for pair in inputs)
    m.close()
    assert drain(m) == [StatusChanged(status=_S.BAD)]
    assert m.data_to_send() == b""  # no Terminate, no close_notify after the end


def test_direct_tls(leaf: trustme.LeafCert) -> None:
    src = tls_source(leaf, sslmode="require", sslnegotiation="direct")
    h = cancel_for(src)
    server, plaintext = tls_cancel(h, leaf)
    assert h.actions()[:2] == ["open", "send"]
    hello = h.log[1][1]
    assert hello[:1] == b"\x16"  # a TLS ClientHello, no SSLRequest
    assert not hello.startswith(SSL_REQUEST)
    assert plaintext == CANCEL_BYTES
    (started,) = h.of_type(AttemptStarted)
    assert (started.encryption, started.direct) == ("ssl", True)
    (established,) = h.of_type(pgproto.TLSEstablished)
    assert established.direct is True
    assert established.alpn == "postgresql"
    assert h.feed(close_notify(server)) is OK
    assert statuses(h.events) == TLS_STATUSES
    assert_transitions(h.events)


def test_direct_tls_server_without_alpn_fails(leaf: trustme.LeafCert) -> None:
    src = tls_source(leaf, sslmode="require", sslnegotiation="direct")
    h = cancel_for(src)
    server = FakeServer(server_context(leaf, alpn=False))
    assert exchange(h, server, first=start_tls(h)) == b""
    exc = connect_error(h)
    (attempt,) = exc.attempts
    assert type(attempt.error) is TLSError
    assert str(attempt.error) == (
        "direct SSL connection was established without ALPN protocol negotiation extension"
    )
    assert attempt.step == "SSL negotiation"
    assert attempt.encryption == "ssl"


def test_tls_source_and_its_cancel_are_separate_sessions(leaf: trustme.LeafCert) -> None:
    src = tls_source(leaf, sslmode="require")
    before = Snapshot.of(src.machine)
    tls_before = src.machine.tls
    h = cancel_for(src)
    server, plaintext = tls_cancel(h, leaf)
    assert plaintext == CANCEL_BYTES
    assert h.machine.tls is not tls_before
    assert h.feed(close_notify(server)) is OK
    assert Snapshot.of(src.machine) == before
    assert src.machine.tls is tls_before


def test_n_under_prefer_sends_plaintext_on_the_same_socket() -> None:
    h = cancel_for(source(sslmode="prefer"))
    assert h.pump() is READING
    assert h.take() == SSL_REQUEST
    assert h.feed(b"N") is READING
    assert h.take() == CANCEL_BYTES
    assert h.feed(b"") is OK
    assert h.actions() == ["open", "send", "recv", "send", "recv", "close"]
    assert len(h.of_type(OpenConnection)) == 1
    assert statuses(h.events) == [
        _S.STARTED,
        _S.MADE,
        _S.SSL_STARTUP,
        _S.MADE,
        _S.AWAITING_RESPONSE,
        _S.OK,
    ]
    assert_transitions(h.events)
    assert not h.machine.ssl_in_use


@pytest.mark.parametrize("sslmode", ["require", "verify-ca", "verify-full"])
def test_n_when_ssl_is_required(leaf: trustme.LeafCert, root_file: str, sslmode: str) -> None:
    params: dict[str, str | int | None] = {"sslmode": sslmode}
    if sslmode != "require":
        params["sslrootcert"] = root_file
    h = cancel_for(tls_source(leaf, **params))
    assert h.pump() is READING
    assert h.take() == SSL_REQUEST
    exc = connect_error(h, [b"N"])
    (attempt,) = exc.attempts
    assert type(attempt.error) is TLSError
    assert str(attempt.error) == "server does not support SSL, but SSL was required"
    assert attempt.step == "SSL negotiation"
    assert h.take() == b""  # the request never went out
    assert len(h.of_type(OpenConnection)) == 1


@pytest.mark.parametrize("sslmode", ["disable", "allow"])
def test_disable_and_allow_send_plaintext_first(sslmode: str) -> None:
    h = cancel_for(source(sslmode=sslmode))
    assert h.pump() is READING
    assert h.take() == CANCEL_BYTES
    assert h.feed(b"") is OK
    assert statuses(h.events) == PLAIN_STATUSES
    (started,) = h.of_type(AttemptStarted)
    assert started.encryption == "plaintext"


def test_tls_failure_under_prefer_falls_back_to_plaintext() -> None:
    h = cancel_for(source(sslmode="prefer"))
    h.pump()
    assert h.feed(b"S") is READING
    h.take()
    # Not TLS at all: the handshake fails, the address is dialled again.
    assert h.feed(b"HTTP/1.1 400 Bad Request\r\n\r\n") is READING
    (failed,) = h.of_type(AttemptFailed)
    assert failed.next == "fallback"
    assert isinstance(failed.attempt.error, TLSError)
    first, second = h.of_type(OpenConnection)
    assert first.address == second.address
    assert h.take() == CANCEL_BYTES
    assert h.feed(b"") is OK
    assert h.machine.attempts == (failed.attempt,)
    assert_transitions(h.events)


def test_tls_failure_under_require_gives_up(leaf: trustme.LeafCert) -> None:
    h = cancel_for(tls_source(leaf, sslmode="require"))
    h.pump()
    assert h.feed(b"S") is READING
    h.take()
    exc = connect_error(h, [b"HTTP/1.1 400 Bad Request\r\n\r\n"])
    (attempt,) = exc.attempts
    assert type(attempt.error) is TLSError
    assert attempt.step == "SSL negotiation"
    assert len(h.of_type(OpenConnection)) == 1
    assert CANCEL_BYTES not in h.sent()


def test_reply_e_to_sslrequest(leaf: trustme.LeafCert) -> None:
    h = cancel_for(tls_source(leaf, sslmode="require"))
    h.pump()
    exc = connect_error(h, [error_response("XX000", SERVER_TEXT)])
    (attempt,) = exc.attempts
    assert str(attempt.error) == "server sent an error response during SSL exchange"
    assert SERVER_TEXT not in str(exc)


@pytest.mark.parametrize("sslmode", ["require", "prefer"])
def test_plaintext_behind_s_is_refused(
    leaf: trustme.LeafCert, sslmode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CVE-2021-23222 applies to cancel connections too: no fallback either."""
    src = source(sslmode="prefer") if sslmode == "prefer" else tls_source(leaf, sslmode="require")

    def no_tls(*args: object, **kwargs: object) -> None:
        raise AssertionError("TLS must not start")

    monkeypatch.setattr("pgproto._machine.TLSEngine", no_tls)
    h = cancel_for(src)
    h.pump()
    exc = connect_error(h, [b"S" + error_response("XX000", SERVER_TEXT)])
    (attempt,) = exc.attempts
    assert str(attempt.error) == "received unencrypted data after SSL response"
    assert h.take() == SSL_REQUEST
    assert CANCEL_BYTES not in h.sent()


def test_encrypted_response_is_unexpected(leaf: trustme.LeafCert) -> None:
    h = cancel_for(tls_source(leaf, sslmode="require"))
    server, plaintext = tls_cancel(h, leaf)
    assert plaintext == CANCEL_BYTES
    exc = connect_error(h, [server.send(error_response("57014", SERVER_TEXT, "ERROR"))])
    (attempt,) = exc.attempts
    assert type(attempt.error) is RemoteProtocolError
    assert str(attempt.error) == UNEXPECTED
    assert attempt.step == AWAIT_STEP
    assert attempt.encryption == "ssl"
    assert h.log[-1] == ("close", b"")
    assert SERVER_TEXT not in str(exc)


@pytest.mark.parametrize("sslmode", ["prefer", "allow"])
def test_unexpected_response_never_falls_back(leaf: trustme.LeafCert, sslmode: str) -> None:
    """prefer over TLS and allow in plaintext each have another method left;
    a response to the CancelRequest still ends it (PQcancelPoll: FAILED)."""
    h = cancel_for(source(sslmode=sslmode))
    if sslmode == "prefer":
        server, plaintext = tls_cancel(h, leaf)
        assert plaintext == CANCEL_BYTES
        reply = server.send(b"x")
    else:
        assert h.pump() is READING
        assert h.take() == CANCEL_BYTES
        reply = b"x"
    exc = connect_error(h, [reply])
    (attempt,) = exc.attempts
    assert str(attempt.error) == UNEXPECTED
    assert attempt.encryption == ("ssl" if sslmode == "prefer" else "plaintext")
    assert h.of_type(AttemptFailed)[-1].next == "give up"
    assert len(h.of_type(OpenConnection)) == 1


def test_one_encrypted_byte_is_unexpected(leaf: trustme.LeafCert) -> None:
    h = cancel_for(tls_source(leaf, sslmode="require"))
    server, _ = tls_cancel(h, leaf)
    exc = connect_error(h, [server.send(b"\x00") + close_notify(server)])
    assert str(exc.attempts[0].error) == UNEXPECTED


def test_verify_full_checks_the_cancel_server(
    ca: trustme.CA, leaf: trustme.LeafCert, root_file: str
) -> None:
    """The certificate is checked against the source's host name, not the address."""
    params: dict[str, str | int | None] = {
        "sslmode": "verify-full",
        "sslrootcert": root_file,
        "hostaddr": "192.0.2.55",
    }
    src = tls_source(leaf, **params)
    good = cancel_for(src)
    server, plaintext = tls_cancel(good, leaf)
    assert plaintext == CANCEL_BYTES
    (established,) = good.of_type(pgproto.TLSEstablished)
    assert established.chain_verified
    assert established.host_verified
    assert good.feed(close_notify(server)) is OK

    impostor = cancel_for(src)
    server, plaintext = tls_cancel(impostor, ca.issue_cert("elsewhere.example"))
    assert plaintext == b""  # the request never reached it
    exc = connect_error(impostor)
    (attempt,) = exc.attempts
    assert type(attempt.error) is TLSError
    assert "db.example" in str(attempt.error)
    assert attempt.step == "SSL negotiation"
    assert (attempt.host, attempt.address) == ("db.example", "192.0.2.55")
    assert len(impostor.of_type(OpenConnection)) == 1


def test_verify_ca_rejects_another_ca(leaf: trustme.LeafCert, root_file: str) -> None:
    src = tls_source(leaf, sslmode="verify-ca", sslrootcert=root_file)
    h = cancel_for(src)
    _, plaintext = tls_cancel(h, trustme.CA().issue_cert("db.example"))
    assert plaintext == b""
    (attempt,) = connect_error(h).attempts
    assert type(attempt.error) is TLSError


def test_client_certificate_and_key_passphrase_hook_are_reused(
    ca: trustme.CA, leaf: trustme.LeafCert, tmp_path: Path
) -> None:
    """The copy keeps the TLS client settings and the machine's passphrase hook."""
    client = ca.issue_cert("client@example", common_name="alice")
    cert = tmp_path / "client.crt"
    client.cert_chain_pems[0].write_to_path(str(cert))
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), password=None)
    key_path = tmp_path / "client.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"hook-passphrase"),
        )
    )
    key_path.chmod(0o600)
    asked: list[str] = []

    def hook(path: str) -> str:
        asked.append(path)
        return "hook-passphrase"

    params = make_params(sslmode="require", sslcert=str(cert), sslkey=str(key_path))
    src = tls_connect(leaf, ConnectionStateMachine(params, key_passphrase_hook=hook))
    assert asked == [str(key_path)]
    h = cancel_for(src)
    # This server insists on a client certificate signed by the CA.
    server = FakeServer(server_context(leaf, client_ca=ca, verify_mode=ssl.CERT_REQUIRED))
    assert exchange(h, server, first=start_tls(h)) == CANCEL_BYTES
    assert server.obj.getpeercert() is not None
    assert asked == [str(key_path)] * 2
    (established,) = h.of_type(pgproto.TLSEstablished)
    assert established.client_certificate is not None
    assert h.feed(close_notify(server)) is OK


# --------------------------------------------------------------------------
# Unix sockets


@pytest.mark.parametrize(
    "params",
    [
        {"sslmode": "disable"},
        {"sslmode": "prefer"},
        {"sslmode": "require"},
        {"sslmode": "require", "sslnegotiation": "direct"},
    ],
    ids=["disable", "prefer", "require", "direct"],
)
def test_unix_socket_is_always_plaintext(params: dict[str, str]) -> None:
    src = source(
        host="/run/pg", sslmode=params["sslmode"], sslnegotiation=params.get("sslnegotiation")
    )
    assert src.machine.address == Address(kind="unix", address="/run/pg/.s.PGSQL.5432", port=5432)
    h = cancel_for(src)
    assert h.pump() is READING
    assert h.take() == CANCEL_BYTES
    (opened,) = h.of_type(OpenConnection)
    assert opened.address == src.machine.address
    assert h.feed(b"") is OK
    assert statuses(h.events) == PLAIN_STATUSES


def test_unix_socket_refused() -> None:
    src = source(host="/run/pg")
    h = cancel_for(src, refuse={"/run/pg/.s.PGSQL.5432"})
    (attempt,) = connect_error(h).attempts
    assert str(attempt.error).endswith(
        "Is the server running locally and accepting connections on that socket?"
    )
    assert attempt.describe().startswith(
        'connection to server on socket "/run/pg/.s.PGSQL.5432" failed'
    )


def _users() -> tuple[pwd.struct_passwd, pwd.struct_passwd]:
    me = pwd.getpwuid(os.getuid())
    other = next(e for e in pwd.getpwall() if e.pw_uid != me.pw_uid and e.pw_name != me.pw_name)
    return me, other


def peer_source(requirepeer: str, uid: int) -> Harness:
    h = PeerHarness(make_machine(host="/run/pg", requirepeer=requirepeer), peer_uid=uid)
    assert h.play([AUTH_OK + startup_done()]) is OK
    return h


def test_requirepeer_passes() -> None:
    me, _ = _users()
    src = peer_source(me.pw_name, me.pw_uid)
    h = PeerHarness(CancelStateMachine(src.machine), peer_uid=me.pw_uid)
    assert h.pump() is READING
    (opened,) = h.of_type(OpenConnection)
    assert opened.peer_credentials is True
    assert h.take() == CANCEL_BYTES
    assert h.feed(b"") is OK


@pytest.mark.parametrize("who", ["other", "unknown", "unsupported"])
def test_requirepeer_refuses_the_wrong_peer(who: str) -> None:
    me, other = _users()
    src = peer_source(me.pw_name, me.pw_uid)
    uids = {"other": other.pw_uid, "unknown": 2_000_000_000, "unsupported": None}
    h = PeerHarness(CancelStateMachine(src.machine), peer_uid=uids[who])
    exc = connect_error(h)
    (attempt,) = exc.attempts
    assert type(attempt.error) is TransportError
    assert (
        str(attempt.error)
        == {
            "other": f'requirepeer specifies "{me.pw_name}", but actual peer user name is '
            f'"{other.pw_name}"',
            "unknown": "local user with ID 2000000000 does not exist",
            "unsupported": "requirepeer parameter is not supported on this platform",
        }[who]
    )
    assert h.take() == b""  # the request never went to the wrong process
    assert [name for name, _ in h.log] == ["open", "close"]
    assert len(exc.attempts) == 1


def test_requirepeer_is_ignored_over_tcp() -> None:
    src = source(requirepeer="somebody-else")
    h = cancel_for(src)
    h.pump()
    assert h.of_type(OpenConnection)[0].peer_credentials is False
    assert h.take() == CANCEL_BYTES


# --------------------------------------------------------------------------
# reset (PQcancelReset)


def test_reset_after_success_sends_again() -> None:
    src = source(addresses={"db.example": ["192.0.2.99"]})
    m = CancelStateMachine(src.machine)
    h = Harness(m)
    assert h.play([b""]) is OK
    m.reset()
    assert m.status is _S.NEEDED
    assert m.attempts == ()
    assert m.error is None
    assert m.cancel_pid == PID
    assert h.pump() is READING
    assert h.take() == CANCEL_BYTES * 2
    assert h.feed(b"") is OK
    assert h.actions() == ["open", "send", "recv", "close", "open", "send", "recv", "close"]
    assert [e.address.address for e in h.of_type(OpenConnection)] == ["192.0.2.99"] * 2
    assert statuses(h.events) == [*PLAIN_STATUSES, _S.BAD, _S.NEEDED, *PLAIN_STATUSES]
    assert_transitions(h.events)
    assert TERMINATE not in b"".join(d for name, d in h.log if name in ("send", "close"))


def test_reset_after_failure() -> None:
    src = source()
    h = cancel_for(src, refuse={"192.0.2.10"})
    m = h.machine
    connect_error(h)
    h.refuse.clear()
    m.reset()
    assert m.error is None
    assert m.attempts == ()
    assert m.poll() is READING
    assert h.play([b""]) is OK
    assert h.take() == CANCEL_BYTES
    assert_transitions(h.events)


def test_reset_after_an_unexpected_response() -> None:
    h = cancel_for(source())
    connect_error(h, [b"?"])
    h.take()
    h.machine.reset()
    assert h.play([b""]) is OK
    assert h.take() == CANCEL_BYTES
    assert len(h.of_type(OpenConnection)) == 2


def test_reset_while_waiting_closes_without_terminate() -> None:
    h = cancel_for(source())
    assert h.pump() is READING
    h.machine.reset()
    assert h.pump() is READING
    assert h.actions() == ["open", "send", "close", "open", "send"]
    assert h.log[2] == ("close", b"")
    assert h.take() == CANCEL_BYTES * 2
    assert h.feed(b"") is OK


def test_close_while_waiting_sends_nothing(leaf: trustme.LeafCert) -> None:
    h = cancel_for(tls_source(leaf, sslmode="require"))
    tls_cancel(h, leaf)
    m = h.machine
    m.close()
    assert drain(m) == [StatusChanged(status=_S.BAD), CloseConnection(data=b"")]
    assert m.data_to_send() == b""
    assert m.status is _S.BAD
    assert m.poll() is FAILED


def test_reset_over_tls(leaf: trustme.LeafCert) -> None:
    h = cancel_for(tls_source(leaf, sslmode="require"))
    for _ in range(2):
        _, plaintext = tls_cancel(h, leaf)
        assert plaintext == CANCEL_BYTES
        assert h.feed(b"") is OK
        h.machine.reset()
    assert len(h.of_type(pgproto.TLSEstablished)) == 2


def test_a_finished_cancel_takes_no_query() -> None:
    """CONNECTION_OK on a cancel connection means "delivered, hung up": there is
    no session to query (libpq's PGcancelConn has no PQsendQuery at all)."""
    h = cancel_for(source())
    assert h.play([b""]) is OK
    with pytest.raises(LocalProtocolError):
        h.machine.send_query("select 1")
    assert h.machine.data_to_send() == b""
    assert h.machine.poll() is OK  # refused without breaking anything


# --------------------------------------------------------------------------
# the source connection is left alone


def test_the_source_is_not_modified() -> None:
    src = source(
        connect_timeout="10",
        addresses={"db.example": ["192.0.2.40"]},
        done=parameter_status("server_version", "18.0")
        + parameter_status("TimeZone", "UTC")
        + backend_key(99, b"KEY!")
        + ready(b"T"),
    )
    m = src.machine
    before = Snapshot.of(m)
    params_before = m.params
    for run in ("ok", "refused", "unexpected", "reset"):
        h = cancel_for(src, refuse={"192.0.2.40"} if run == "refused" else set())
        if run == "ok":
            assert h.play([b""]) is OK
        elif run == "refused":
            connect_error(h)
        elif run == "unexpected":
            connect_error(h, [b"x"])
        else:
            h.play([b""])
            h.machine.reset()
            h.pump()
            h.machine.close()
        assert Snapshot.of(m) == before, run
        assert m.params is params_before
        assert m.next_event() is NEED_DATA  # no event leaked into the source
        assert m.data_to_send() == b""
    assert before.params == {"server_version": "18.0", "TimeZone": "UTC"}
    assert (before.pid, before.key, before.txn) == (99, b"KEY!", "T")
    # Still usable.
    m.send_query("select 1")
    assert src.pump() is READING
    assert src.take() == b"Q\x00\x00\x00\rselect 1\x00"


def test_two_cancel_machines_are_independent() -> None:
    src = source()
    a, b = cancel_for(src), cancel_for(src, refuse={"192.0.2.10"})
    assert a.pump() is READING
    connect_error(b)
    assert status_of(a.machine) is _S.AWAITING_RESPONSE
    assert a.feed(b"") is OK


# --------------------------------------------------------------------------
# any split of the server's side


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@dataclass(frozen=True)
class Outcome:
    ok: bool
    error: str | None
    step: str | None
    statuses: tuple[ConnStatus, ...]
    sent: bytes
    server_got: bytes


def _outcome(h: Harness, error: ConnectError | None, server_got: bytes = b"") -> Outcome:
    assert_transitions(h.events)
    plain = h.sent()
    attempt = error.attempts[0] if error is not None else None
    if error is not None:
        assert len(error.attempts) == 1
    return Outcome(
        ok=error is None and h.machine.poll() is OK,
        error=str(attempt.error) if attempt is not None else None,
        step=attempt.step if attempt is not None else None,
        statuses=tuple(statuses(h.events)),
        # What went out: compared on success only (when the server's junk
        # arrives together with "N", the queued request is dropped with the
        # failed attempt instead of being flushed first), and not for TLS,
        # whose ciphertext differs from run to run.
        sent=plain if error is None and not server_got else b"",
        server_got=server_got,
    )


def _plain_run(sslmode: str, stream: bytes, cuts: list[int]) -> Outcome:
    h = cancel_for(source(sslmode=sslmode))
    error: ConnectError | None = None
    try:
        status = h.pump()
        for piece in [*_chunks(stream, cuts), b""]:
            if status is not READING:
                break
            status = h.feed(piece)
    except ConnectError as exc:
        error = exc
    return _outcome(h, error)


plain_streams = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=40),
    st.sampled_from([error_response("57014", SERVER_TEXT, "ERROR"), b"\x00"]),
)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    sslmode=st.sampled_from(["disable", "prefer"]),
    tail=plain_streams,
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_any_split_of_plaintext_gives_the_same_outcome(
    sslmode: str, tail: bytes, cuts: list[int]
) -> None:
    stream = (b"N" if sslmode == "prefer" else b"") + tail
    reference = _plain_run(sslmode, stream, [])
    assert _plain_run(sslmode, stream, cuts) == reference
    # And the reference is libpq's rule: success iff nothing followed.
    assert reference.ok is (tail == b"")
    if not reference.ok:
        assert (reference.error, reference.step) == (UNEXPECTED, AWAIT_STEP)
    if reference.ok:
        assert reference.sent == (SSL_REQUEST if sslmode == "prefer" else b"") + CANCEL_BYTES


def _tls_run(
    leaf: trustme.LeafCert, src: ConnectionStateMachine, end: str, split: Split
) -> tuple[Outcome, list[int]]:
    h = cancel_for(src)
    error: ConnectError | None = None
    sizes: list[int] = []

    def counting(data: bytes) -> list[bytes]:
        pieces = split(data)
        assert b"".join(pieces) == data
        sizes.append(len(pieces))
        return pieces

    server = FakeServer(server_context(leaf))
    got = b""
    try:
        got = exchange(h, server, counting, start_tls(h))
        if end == "close_notify":
            tail = close_notify(server)
        elif end == "eof":
            tail = b""
        elif end == "response":
            tail = server.send(error_response("57014", SERVER_TEXT, "ERROR"))
        else:
            tail = server.send(b"Z") + close_notify(server)
        for piece in [*(counting(tail) if tail else []), b""]:
            if h.machine.poll() is not READING:
                break
            h.feed(piece)
    except ConnectError as exc:
        error = exc
    return _outcome(h, error, got), sizes


@pytest.fixture(scope="module")
def tls_sources(leaf: trustme.LeafCert) -> dict[bool, ConnectionStateMachine]:
    """Connections made over TLS, by ``direct``: after an SSLRequest, or direct."""
    return {
        False: tls_source(leaf, sslmode="require").machine,
        True: tls_source(leaf, sslmode="require", sslnegotiation="direct").machine,
    }


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    direct=st.booleans(),
    end=st.sampled_from(["close_notify", "eof", "response", "byte+close_notify"]),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=12),
)
def test_any_split_of_the_ciphertext_gives_the_same_outcome(
    leaf: trustme.LeafCert,
    tls_sources: dict[bool, ConnectionStateMachine],
    direct: bool,
    end: str,
    cuts: list[int],
) -> None:
    src = tls_sources[direct]
    reference, _ = _tls_run(leaf, src, end, whole)
    outcome, sizes = _tls_run(leaf, src, end, lambda data: _chunks(data, cuts))
    assert outcome == reference
    assert reference.server_got == CANCEL_BYTES
    if end in ("close_notify", "eof"):
        assert reference.ok
        assert list(reference.statuses) == TLS_STATUSES
    else:
        assert not reference.ok
        assert (reference.error, reference.step) == (UNEXPECTED, AWAIT_STEP)
    assert sizes  # the server's flights went through the splitter


def test_the_splitter_really_splits(
    leaf: trustme.LeafCert, tls_sources: dict[bool, ConnectionStateMachine]
) -> None:
    """Control for the property above: a byte-by-byte split feeds many pieces."""
    outcome, sizes = _tls_run(
        leaf, tls_sources[False], "close_notify", lambda d: [bytes([b]) for b in d]
    )
    assert outcome.ok
    assert sum(sizes) > 500
