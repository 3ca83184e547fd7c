"""A tiny scripted PostgreSQL server, and a driver, for socket-free tests of the core.

Nothing here opens a socket.  :class:`Harness` plays the adapter's part of the
loop described at the top of ``pgproto/_machine.py``: it answers commands
(``ResolveHost``, ``OpenConnection``, ...) at once, collects the bytes the
machine wants to send, and feeds it whatever server bytes a test supplies.
The message builders produce backend messages byte for byte as a server
would; :class:`ScramServer` is an independent SCRAM-SHA-256 server (RFC 5802,
hashlib only) so that the client's proof and the server's signature are
checked by code that shares nothing with pgproto.

Imported by the tests as the top-level module ``fake_server``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from capture import CANCEL_REQUEST_CODE

import pgproto
from pgproto import (
    NEED_DATA,
    CloseConnection,
    ConnectionStateMachine,
    ConnStatus,
    Environment,
    Event,
    OpenConnection,
    PollingStatus,
    ResolveHost,
    StartTimer,
    StatusChanged,
)
from pgproto._states import TRANSITIONS

#: poll()'s answers, as the tests spell them.
READING: Final = PollingStatus.READING
WRITING: Final = PollingStatus.WRITING
OK: Final = PollingStatus.OK
FAILED: Final = PollingStatus.FAILED

#: resolve_params, typed loosely: option values come from dicts.
_resolve: Callable[..., pgproto.ConnParams] = pgproto.resolve_params

__all__ = [
    "AUTH_OK",
    "ENV",
    "FAILED",
    "NONCE",
    "OK",
    "READING",
    "SECRET",
    "SSL_REQUEST",
    "TERMINATE",
    "WRITING",
    "ClientMessage",
    "Harness",
    "PeerHarness",
    "ScramServer",
    "assert_transitions",
    "auth",
    "backend_key",
    "cancel_request",
    "client_messages",
    "command_complete",
    "connect_error",
    "data_row",
    "drain",
    "error_response",
    "fields_body",
    "fixed_nonce",
    "make_machine",
    "make_params",
    "message",
    "negotiate",
    "notice",
    "parameter_status",
    "ready",
    "row_description",
    "sasl",
    "startup_done",
    "startup_parameters",
    "status_of",
    "statuses",
]

#: An isolated process environment: no PG* variables, no home (so no
#: ~/.pgpass or service file), a fixed OS user.
ENV: Final = Environment(environ={}, home=None, user="pgproto-test", uid=4242)

#: The SCRAM client nonce every test machine uses (18 bytes, as libpq draws).
NONCE: Final = b"pgproto transcript"

#: A distinctive password: tests check that it never shows up anywhere.
SECRET: Final = "Sw0rdfish-7f3c-NEVER-SHOW-ME"

_INT32: Final = struct.Struct("!i")


def fixed_nonce(count: int) -> bytes:
    """``random_bytes`` for the machine: the SCRAM nonce is the only draw."""
    assert count == len(NONCE), count
    return NONCE


def make_params(**overrides: str | int | None) -> pgproto.ConnParams:
    """Resolved parameters for a fake host (``db.example``, plaintext, SECRET)."""
    kwargs: dict[str, str | int | None] = {
        "host": "db.example",
        "port": 5432,
        "user": "alice",
        "dbname": "app",
        "sslmode": "disable",
        "password": SECRET,
    }
    kwargs.update(overrides)
    return _resolve(env=ENV, **kwargs)


def make_machine(**overrides: str | int | None) -> ConnectionStateMachine:
    """A machine for :func:`make_params` with the fixed nonce and no SCRAM cache."""
    return ConnectionStateMachine(
        make_params(**overrides), random_bytes=fixed_nonce, scram_cache=None
    )


# --------------------------------------------------------------------------
# backend messages


def message(kind: bytes, body: bytes = b"") -> bytes:
    """A backend message: type byte, length word (counting itself), body."""
    return kind + struct.pack("!I", len(body) + 4) + body


def _cstr(text: str | bytes) -> bytes:
    return (text.encode() if isinstance(text, str) else text) + b"\x00"


def auth(code: int, payload: bytes = b"") -> bytes:
    """AuthenticationXXX with request *code* (0 ok, 3 cleartext, 5 md5, 10-12 SASL)."""
    return message(b"R", _INT32.pack(code) + payload)


AUTH_OK: Final = auth(0)


def sasl(*mechanisms: str) -> bytes:
    """AuthenticationSASL offering *mechanisms*."""
    return auth(10, b"".join(_cstr(m) for m in mechanisms) + b"\x00")


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", _cstr(name) + _cstr(value))


def backend_key(pid: int = 4321, key: bytes = b"\x0a\x0b\x0c\x0d") -> bytes:
    return message(b"K", _INT32.pack(pid) + key)


def ready(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def fields_body(fields: Mapping[str, str]) -> bytes:
    return b"".join(code.encode() + _cstr(value) for code, value in fields.items()) + b"\x00"


def error_response(sqlstate: str, text: str, severity: str = "FATAL") -> bytes:
    """ErrorResponse with severity, SQLSTATE and message fields."""
    return message(b"E", fields_body({"S": severity, "V": severity, "C": sqlstate, "M": text}))


def notice(text: str) -> bytes:
    return message(b"N", fields_body({"S": "NOTICE", "V": "NOTICE", "C": "00000", "M": text}))


def negotiate(
    version: int | tuple[int, int], options: Sequence[str] = (), count: int | None = None
) -> bytes:
    """NegotiateProtocolVersion: newest supported version and unrecognised options."""
    number = version if isinstance(version, int) else (version[0] << 16) | version[1]
    announced = len(options) if count is None else count
    body = _INT32.pack(number) + _INT32.pack(announced) + b"".join(_cstr(o) for o in options)
    return message(b"v", body)


def command_complete(tag: str) -> bytes:
    return message(b"C", _cstr(tag))


def row_description(*names: str) -> bytes:
    body = struct.pack("!h", len(names))
    for name in names:
        body += _cstr(name) + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)
    return message(b"T", body)


def data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for value in values:
        body += _INT32.pack(-1) if value is None else _INT32.pack(len(value)) + value
    return message(b"D", body)


def startup_done(
    *,
    pid: int = 4321,
    key: bytes = b"\x0a\x0b\x0c\x0d",
    parameters: Mapping[str, str] | None = None,
    status: bytes = b"I",
) -> bytes:
    """What follows AuthenticationOk: ParameterStatus messages, BackendKeyData, ReadyForQuery."""
    if parameters is None:
        parameters = {
            "server_version": "18.0",
            "default_transaction_read_only": "off",
            "in_hot_standby": "off",
        }
    data = b"".join(parameter_status(k, v) for k, v in parameters.items())
    return data + backend_key(pid, key) + ready(status)


# --------------------------------------------------------------------------
# frontend messages, for assertions


SSL_REQUEST: Final = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
TERMINATE: Final = b"X\x00\x00\x00\x04"


def cancel_request(pid: int, key: bytes) -> bytes:
    """A CancelRequest (length, code, pid, key), built here, independently of
    ``pgproto._wire``."""
    return struct.pack("!III", 12 + len(key), CANCEL_REQUEST_CODE, pid) + key


@dataclass(frozen=True)
class ClientMessage:
    kind: bytes  # b"" for the untyped startup-phase packets
    body: bytes


def client_messages(data: bytes, *, untyped_first: int = 0) -> list[ClientMessage]:
    """Cut client bytes into messages; the first *untyped_first* are untyped
    (SSLRequest, StartupMessage)."""
    out: list[ClientMessage] = []
    pos = 0
    while pos < len(data):
        if len(out) < untyped_first:
            (length,) = struct.unpack_from("!I", data, pos)
            out.append(ClientMessage(b"", data[pos + 4 : pos + length]))
            pos += length
        else:
            kind = data[pos : pos + 1]
            (length,) = struct.unpack_from("!I", data, pos + 1)
            out.append(ClientMessage(kind, data[pos + 5 : pos + 1 + length]))
            pos += 1 + length
    assert pos == len(data), "trailing partial client message"
    return out


def startup_parameters(body: bytes) -> tuple[int, dict[str, str]]:
    """The protocol number and name/value pairs of a StartupMessage body."""
    (version,) = struct.unpack_from("!I", body)
    items = body[4:].split(b"\x00")
    assert items[-2:] == [b"", b""], items
    pairs = items[:-2]
    return version, {pairs[i].decode(): pairs[i + 1].decode() for i in range(0, len(pairs), 2)}


# --------------------------------------------------------------------------
# SCRAM-SHA-256, server side


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


@dataclass
class ScramServer:
    """The server half of SCRAM-SHA-256 for an ASCII *password*."""

    password: str
    salt: bytes = b"fake-server-salt"
    iterations: int = 4096
    server_nonce: str = "ServerNonce+/0123"
    client_first_bare: bytes = b""
    server_first: bytes = b""
    proof_ok: bool | None = None
    mechanism: str = ""
    _auth_message: bytes = field(default=b"", repr=False)

    def challenge(self, initial: bytes) -> bytes:
        """Take the client's SASLInitialResponse message; return AuthenticationSASLContinue."""
        (msg,) = client_messages(initial)
        assert msg.kind == b"p"
        mechanism, _, rest = msg.body.partition(b"\x00")
        self.mechanism = mechanism.decode()
        (length,) = _INT32.unpack_from(rest)
        client_first = rest[4 : 4 + length]
        assert len(client_first) == length
        gs2, _, bare = client_first.partition(b",,")
        assert gs2 in (b"n", b"y"), gs2
        self.client_first_bare = bare
        attrs = dict(item.split(b"=", 1) for item in bare.split(b","))
        nonce = attrs[b"r"] + self.server_nonce.encode()
        self.server_first = (
            b"r=" + nonce + b",s=" + base64.b64encode(self.salt) + b",i=%d" % self.iterations
        )
        return auth(11, self.server_first)

    def final(self, response: bytes) -> bytes:
        """Take the client-final message; verify the proof; return AuthenticationSASLFinal."""
        (msg,) = client_messages(response)
        assert msg.kind == b"p"
        without_proof, _, proof_attr = msg.body.rpartition(b",p=")
        proof = base64.b64decode(proof_attr)
        auth_message = self.client_first_bare + b"," + self.server_first + b"," + without_proof
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), self.salt, self.iterations)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        signature = _hmac(stored_key, auth_message)
        recovered = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        self.proof_ok = hashlib.sha256(recovered).digest() == stored_key
        server_key = _hmac(salted, b"Server Key")
        self._auth_message = auth_message
        return auth(12, b"v=" + base64.b64encode(_hmac(server_key, auth_message)))


# --------------------------------------------------------------------------
# the driver


@dataclass
class Harness:
    """Drives one machine; answers its commands as a well-behaved adapter would.

    ``addresses`` maps host names to what ``ResolveHost`` returns (default
    ``["192.0.2.10"]``); connections to addresses in ``refuse`` fail with
    ECONNREFUSED.  ``log`` records ``("open", Address)``, ``("close", data)``,
    ``("send", data)``, ``("recv", data)`` and ``("timer", seconds)`` in order;
    ``events`` every event ``next_event()`` returned.
    """

    machine: ConnectionStateMachine
    addresses: dict[str, list[str]] = field(default_factory=dict)
    refuse: set[str] = field(default_factory=set)
    max_steps: int = 10_000
    events: list[Event] = field(default_factory=list)
    log: list[tuple[str, Any]] = field(default_factory=list)
    _unsent: bytearray = field(default_factory=bytearray)

    def pump(self) -> PollingStatus:
        """Run until the machine waits for the server or is done; return ``poll()``.

        Raises whatever ``next_event()`` raises.
        """
        for _ in range(self.max_steps):
            event = self.machine.next_event()
            if event is NEED_DATA:
                status = self.machine.poll()
                if status is PollingStatus.WRITING:
                    data = self.machine.data_to_send()
                    assert data, "poll() says WRITING but there is nothing to send"
                    self.log.append(("send", data))
                    self._unsent += data
                    continue
                return status
            self.events.append(event)
            self._answer(event)
        raise AssertionError(f"no settled state after {self.max_steps} next_event() calls")

    def _answer(self, event: Event) -> None:
        machine = self.machine
        if isinstance(event, ResolveHost):
            machine.addresses_resolved(self.addresses.get(event.host, ["192.0.2.10"]))
        elif isinstance(event, OpenConnection):
            self.log.append(("open", event.address))
            if event.address.address in self.refuse:
                machine.connection_failed(ConnectionRefusedError(111, "Connection refused"))
            else:
                machine.connection_made()
        elif isinstance(event, CloseConnection):
            self.log.append(("close", event.data))
        elif isinstance(event, StartTimer):
            self.log.append(("timer", event.seconds))

    def feed(self, data: bytes) -> PollingStatus:
        """Give the machine server bytes (``b""`` is EOF), then :meth:`pump`."""
        self.log.append(("recv", data))
        self.machine.receive_data(data)
        return self.pump()

    def play(self, turns: Iterable[bytes]) -> PollingStatus:
        """:meth:`pump`, then feed each turn in order while the machine reads."""
        status = self.pump()
        for turn in turns:
            assert status is PollingStatus.READING, status
            status = self.feed(turn)
        return status

    def take(self) -> bytes:
        """Client bytes sent since the last call."""
        data = bytes(self._unsent)
        self._unsent.clear()
        return data

    def of_type(self, kind: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def actions(self) -> list[str]:
        """The log's action names (``open``, ``send``, ``recv``, ``close``, ...)."""
        return [name for name, _ in self.log]

    def sent(self) -> bytes:
        """Every byte the machine sent so far (the log's ``send`` entries)."""
        return b"".join(data for name, data in self.log if name == "send")


@dataclass
class PeerHarness(Harness):
    """A :class:`Harness` that answers OpenConnection (of an address not in
    ``refuse``) with ``connection_made(peer_uid=peer_uid)``, as an adapter
    that read the Unix socket's peer credentials would."""

    peer_uid: int | None = None

    def _answer(self, event: Event) -> None:
        if isinstance(event, OpenConnection) and event.address.address not in self.refuse:
            assert event.peer_credentials is (event.address.kind == "unix")
            self.log.append(("open", event.address))
            self.machine.connection_made(peer_uid=self.peer_uid)
            return
        super()._answer(event)


def connect_error(harness: Harness, turns: Iterable[bytes] = ()) -> pgproto.ConnectError:
    """Play *turns* and return the ConnectError the machine raises."""
    try:
        harness.play(turns)
    except pgproto.ConnectError as exc:
        return exc
    raise AssertionError(f"no ConnectError; machine status {harness.machine.status.name}")


def drain(m: ConnectionStateMachine) -> list[Event]:
    """The events queued up to NEED_DATA."""
    events: list[Event] = []
    while (event := m.next_event()) is not NEED_DATA:
        assert isinstance(event, Event)
        events.append(event)
    return events


def status_of(m: ConnectionStateMachine) -> ConnStatus:
    """The machine's status (a function, not the property: mypy would
    narrow ``m.status`` across calls)."""
    return m.status


def statuses(events: list[Event]) -> list[ConnStatus]:
    """The statuses of the StatusChanged events among *events*."""
    return [e.status for e in events if isinstance(e, StatusChanged)]


def assert_transitions(events: list[Event], start: ConnStatus = ConnStatus.NEEDED) -> None:
    """Every StatusChanged is a step the TRANSITIONS table allows."""
    allowed = {(old, new) for (old, _), new in TRANSITIONS.items()}
    current = start
    for status in statuses(events):
        assert (current, status) in allowed, f"{current.name} -> {status.name}"
        current = status
