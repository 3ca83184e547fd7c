"""Fuzzing: hostile bytes in every state, split and mutated transcripts, hostile strings.

Issue 6, point 2.  The properties, checked by Hypothesis here and by the
atheris harnesses in ``tests/fuzz/`` (which import this module and run the
same checks):

1. **The machine in every state** (:data:`STATES`): the connection machine
   waiting for a name, for a transport, just connected, waiting for the reply
   to SSLRequest, in the middle of a TLS handshake against a real in-memory
   OpenSSL server (``tls_helpers.FakeServer``; TLS 1.3, TLS 1.2 and direct
   TLS), authenticating (plaintext and inside TLS, with and without
   require_auth, SCRAM, SCRAM-PLUS, protocol 3.2 negotiation), after
   AuthenticationOk, checking target_session_attrs (CHECK_WRITABLE,
   CHECK_STANDBY, CONSUME), idle, running a query, closed; and the cancel
   machine connecting, negotiating TLS, waiting for the server to hang up and
   done.  Arbitrary server bytes arrive in arbitrary chunks (sealed in TLS
   records by the fake server where there is one), with EOF, the per-address
   timer, the overall deadline, ``close()`` and ``send_query()``
   interleaved.  Then: only ``pgproto.Error`` escapes; a machine that raised
   is FAILED for good and raises the same error again; every StatusChanged is
   a step of ``pgproto._states.TRANSITIONS`` (``fake_server.assert_transitions``)
   and ``status`` is the last one reported; no call loops (every pump
   settles within a bounded number of ``next_event()`` calls); at rest the
   receive buffer holds at most one incomplete message whose length word was
   already checked against the limit for its type (:func:`check_buffer`), and
   TLS keeps at most one partial record; the password never shows in an error
   or an attempt.  Memory: a length word of 1 GiB (or 2 or 4 GiB) in every
   state allocates nothing (tracemalloc peak, :data:`MEMORY_SLACK`), and a
   DataRow that is allowed to be 1 GiB long is buffered only as far as its
   bytes arrive.
2. **Real transcripts** (``tests/data/transcripts``) replayed with the server
   bytes cut at arbitrary points -- across server turns, too -- give the
   unsplit replay's events, client bytes and outcome; with bytes flipped,
   inserted or deleted, only pgproto errors escape, the table holds, and the
   replay ends (EOF is given when the recording runs out).
3. **Connection strings**: structured keyword/value strings and URIs (with
   values aimed at every validator of ``resolve_params``), raw text and
   keyword arguments: ``parse_conninfo`` and ``resolve_params`` (isolated
   environment) raise nothing but ``ConninfoError`` (not a bare ValueError,
   IndexError, UnicodeError, ...), and a password given in the string (in
   ``password=``, ``sslpassword=``, a URI's user information or query) never
   appears in the error message.
4. **atheris**: :func:`test_atheris_harness` runs ``tests/fuzz/fuzz_machine.py``
   and ``tests/fuzz/fuzz_conninfo.py`` for a fixed number of runs from a fixed
   seed, from a seed corpus built by the harness, and fails if they find a
   crash.  ``tests/fuzz/README.md`` says how to run them for longer.

Budget: the whole module runs in well under two minutes (the atheris runs
are about 20 s each); Hypothesis example counts are set per test.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import itertools
import os
import ssl
import struct
import subprocess
import sys
import tracemalloc
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
import transcripts
import trustme
from fake_server import (
    AUTH_OK,
    ENV,
    FAILED,
    NONCE,
    OK,
    READING,
    SECRET,
    WRITING,
    assert_transitions,
    auth,
    command_complete,
    data_row,
    make_machine,
    message,
    ready,
    row_description,
    sasl,
    startup_done,
    statuses,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from secret_watch import watching
from tls_helpers import FakeServer, server_context

import pgproto
from pgproto import (
    NEED_DATA,
    CancelStateMachine,
    ConninfoError,
    ConnStatus,
    Event,
    OpenConnection,
    PollingStatus,
    ResolveHost,
)
from pgproto import _wire as wire
from pgproto._options import OPTIONS

_S = ConnStatus

#: next_event() calls one pump may take before it counts as a hang.
MAX_CALLS: Final = 5_000
#: The largest TLS record on the wire (RFC 8446 §5.2 / RFC 5246 §6.2.3) plus
#: its header: what OpenSSL may hold back while it waits for the rest.
TLS_RECORD_MAX: Final = 5 + 2**14 + 2048

_resolve: Callable[..., pgproto.ConnParams] = pgproto.resolve_params


# --------------------------------------------------------------------------
# TLS material (built once per process)


@functools.cache
def _leaf() -> trustme.LeafCert:
    return trustme.CA().issue_cert("db.example", "localhost")


@functools.cache
def _server_context(tls12: bool = False) -> ssl.SSLContext:
    return server_context(_leaf(), maximum=ssl.TLSVersion.TLSv1_2 if tls12 else None)


# --------------------------------------------------------------------------
# the driver


class Hang(AssertionError):
    """A pump that never settles."""


@dataclass
class Run:
    """One machine, its fake adapter and (for TLS states) the fake server.

    Like ``fake_server.Harness``, but a command listed in ``hold`` is left
    unanswered (the state "waiting for a name" or "for a transport"), and
    nothing is asserted while driving: the properties are checked by
    :func:`check_run` afterwards.  ``ResolveHost`` gets ``addresses[host]``
    (a recording's), or 192.0.2.10 without ``addresses``.
    """

    machine: pgproto.ConnectionStateMachine
    server: FakeServer | None = None
    hold: tuple[type[Event], ...] = ()
    addresses: dict[str, list[str]] | None = None
    events: list[Event] = field(default_factory=list)
    unsent: bytearray = field(default_factory=bytearray)
    error: pgproto.Error | None = None
    calls: int = 0

    def pump(self) -> PollingStatus:
        m = self.machine
        for _ in range(MAX_CALLS):
            self.calls += 1
            event = m.next_event()
            if event is NEED_DATA:
                status = m.poll()
                if status is WRITING:
                    data = m.data_to_send()
                    if data:
                        self.unsent += data
                        continue
                    if m._awaiting is None:
                        raise Hang("poll() says WRITING with nothing to send and no command out")
                return status
            self.events.append(event)
            if isinstance(event, self.hold):
                continue
            if isinstance(event, ResolveHost):
                addresses = self.addresses
                m.addresses_resolved(["192.0.2.10"] if addresses is None else addresses[event.host])
            elif isinstance(event, OpenConnection):
                m.connection_made()
        raise Hang(f"no settled state after {MAX_CALLS} next_event() calls")

    def feed(self, data: bytes) -> PollingStatus:
        self.machine.receive_data(data)
        return self.pump()

    def take(self) -> bytes:
        data = bytes(self.unsent)
        self.unsent.clear()
        return data

    def exchange(self) -> None:
        """Let the fake TLS server answer what the client sent, until quiet."""
        server = self.server
        assert server is not None
        for _ in range(10):
            reply = server.step(self.take())
            if not reply or self.machine.poll() is not READING:
                return
            self.feed(reply)

    def seal(self, plaintext: bytes) -> bytes:
        """*plaintext* as the fake server's TLS records (raw if it cannot)."""
        server = self.server
        if server is None or not server.done or not plaintext:
            return plaintext
        try:
            return server.send(plaintext)
        except ssl.SSLError:
            return plaintext


# --------------------------------------------------------------------------
# the states


@dataclass(frozen=True)
class State:
    name: str
    status: ConnStatus  # where the machine is when the fuzzed input starts
    build: Callable[[], Run]
    cancel: bool = False
    tls: bool = False


def _plain(
    turns: Sequence[bytes] = (), *, query: bool = False, **params: str | int | None
) -> Callable[[], Run]:
    def build() -> Run:
        run = Run(make_machine(**params))
        status = run.pump()
        for turn in turns:
            assert status is READING, status
            status = run.feed(turn)
        if query:
            run.machine.send_query("select 1")
            run.pump()
        run.take()
        return run

    return build


def _held(until: type[Event], *, made: bool = False, **params: str | int | None) -> Run:
    run = Run(make_machine(**params), hold=(until,))
    run.pump()
    if until is OpenConnection and not any(isinstance(e, OpenConnection) for e in run.events):
        raise AssertionError("no OpenConnection")
    run.hold = ()
    if made:
        run.machine.connection_made()
    return run


def _tls_hello(**params: str | int | None) -> Run:
    """The ClientHello is out; the real server has not answered."""
    run = Run(make_machine(sslmode="require", **params), server=FakeServer(_server_context()))
    run.pump()
    if params.get("sslnegotiation") != "direct":
        assert run.take() == wire.ssl_request()
        run.feed(b"S")
    return run


def _tls12_finished() -> Run:
    """TLS 1.2: the client sent its Finished and waits for the server's."""
    run = Run(make_machine(sslmode="require"), server=FakeServer(_server_context(tls12=True)))
    run.pump()
    assert run.take() == wire.ssl_request()
    run.feed(b"S")
    assert run.server is not None
    run.feed(run.server.step(run.take()))
    return run


def _tls_connected(turns: Sequence[bytes] = (), **params: str | int | None) -> Callable[[], Run]:
    def build() -> Run:
        run = _tls_hello(**params)
        run.exchange()
        for turn in turns:
            run.feed(run.seal(turn))
        run.take()
        return run

    return build


def _cancel(source: Callable[[], Run], *, until: str) -> Callable[[], Run]:
    """A cancel request for *source*'s connection, driven up to *until*."""

    def build() -> Run:
        src = source()
        assert src.machine.status is _S.OK
        tls = src.machine.ssl_in_use
        run = Run(
            CancelStateMachine(src.machine),
            hold=(OpenConnection,) if until in ("started", "made") else (),
            server=FakeServer(_server_context()) if tls else None,
        )
        run.pump()
        run.hold = ()
        if until == "made":
            run.machine.connection_made()
        elif until == "awaiting" and tls:
            assert run.take() == wire.ssl_request()
            run.feed(b"S")
            run.exchange()
        elif until == "ok":
            run.feed(b"")
        if until not in ("started", "made") and not (until == "awaiting" and tls):
            run.take()
        return run

    return build


def _closed() -> Run:
    run = _plain([AUTH_OK + startup_done()])()
    run.machine.close()
    run.pump()
    return run


V13: Final = {"server_version": "13.0"}
#: A server-first message for the fixed nonce, with a small iteration count.
SCRAM_FIRST: Final = auth(11, b"r=" + base64.b64encode(NONCE) + b"srv,s=c2FsdA==,i=16")
_ok = _plain([AUTH_OK + startup_done()])
_tls_ok = _tls_connected([AUTH_OK + startup_done()])

STATE_LIST: Final = [
    State("needed", _S.NEEDED, lambda: _held(ResolveHost)),
    State("started", _S.STARTED, lambda: _held(OpenConnection)),
    State("made", _S.MADE, lambda: _held(OpenConnection, made=True)),
    State("made-ssl", _S.MADE, lambda: _held(OpenConnection, made=True, sslmode="prefer")),
    State("ssl-reply-prefer", _S.SSL_STARTUP, _plain(sslmode="prefer")),
    State("ssl-reply-require", _S.SSL_STARTUP, _plain(sslmode="require")),
    State("tls-hello", _S.SSL_STARTUP, _tls_hello, tls=True),
    State(
        "tls-hello-direct", _S.SSL_STARTUP, lambda: _tls_hello(sslnegotiation="direct"), tls=True
    ),
    State("tls12-finished", _S.SSL_STARTUP, _tls12_finished, tls=True),
    State("tls-auth", _S.AWAITING_RESPONSE, _tls_connected(), tls=True),
    State(
        "tls-scram-plus",
        _S.AWAITING_RESPONSE,
        _tls_connected([sasl("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")], channel_binding="require"),
        tls=True,
    ),
    State("tls-auth-ok", _S.AUTH_OK, _tls_connected([AUTH_OK]), tls=True),
    State("tls-idle", _S.OK, _tls_ok, tls=True),
    State("auth", _S.AWAITING_RESPONSE, _plain()),
    State("auth-require-scram", _S.AWAITING_RESPONSE, _plain(require_auth="scram-sha-256")),
    State("auth-two-hosts", _S.AWAITING_RESPONSE, _plain(host="db1.example,db2.example")),
    State("negotiation", _S.AWAITING_RESPONSE, _plain(max_protocol_version="3.2")),
    State("scram-challenge", _S.AWAITING_RESPONSE, _plain([sasl("SCRAM-SHA-256")])),
    State("scram-final", _S.AWAITING_RESPONSE, _plain([sasl("SCRAM-SHA-256"), SCRAM_FIRST])),
    State("auth-ok", _S.AUTH_OK, _plain([AUTH_OK])),
    State("auth-ok-3.2", _S.AUTH_OK, _plain([AUTH_OK], max_protocol_version="3.2")),
    State(
        "check-writable",
        _S.CHECK_WRITABLE,
        _plain([AUTH_OK + startup_done(parameters=V13)], target_session_attrs="read-write"),
    ),
    State(
        "check-standby",
        _S.CHECK_STANDBY,
        _plain([AUTH_OK + startup_done(parameters=V13)], target_session_attrs="primary"),
    ),
    State(
        "consume",
        _S.CONSUME,
        _plain(
            [
                AUTH_OK + startup_done(parameters=V13),
                row_description("transaction_read_only")
                + data_row(b"off")
                + command_complete("SHOW"),
            ],
            target_session_attrs="read-write",
        ),
    ),
    State("idle", _S.OK, _ok),
    State("query", _S.OK, _plain([AUTH_OK + startup_done()], query=True)),
    State("closed", _S.BAD, _closed),
    State("cancel-started", _S.STARTED, _cancel(_ok, until="started"), cancel=True),
    State("cancel-made", _S.MADE, _cancel(_ok, until="made"), cancel=True),
    State(
        "cancel-ssl-reply",
        _S.SSL_STARTUP,
        _cancel(_plain([b"N", AUTH_OK + startup_done()], sslmode="prefer"), until="sent"),
        cancel=True,
    ),
    State("cancel-awaiting", _S.AWAITING_RESPONSE, _cancel(_ok, until="awaiting"), cancel=True),
    State(
        "cancel-tls-hello", _S.SSL_STARTUP, _cancel(_tls_ok, until="sent"), cancel=True, tls=True
    ),
    State(
        "cancel-tls-awaiting",
        _S.AWAITING_RESPONSE,
        _cancel(_tls_ok, until="awaiting"),
        cancel=True,
        tls=True,
    ),
    State("cancel-ok", _S.OK, _cancel(_ok, until="ok"), cancel=True),
]
STATES: Final = {state.name: state for state in STATE_LIST}
assert len(STATES) == len(STATE_LIST)


# --------------------------------------------------------------------------
# operations and their byte encoding (shared with the atheris harness)

#: ("data", raw bytes), ("sealed", bytes the fake TLS server encrypts),
#: ("server", b"": the fake TLS server answers what the client sent),
#: ("eof" | "timer" | "deadline" | "close" | "query" | "reset", b"").
Op = tuple[str, bytes]
_CONTROL: Final = ("eof", "timer", "deadline", "close", "query", "reset", "server")
_OP_CODES: Final = {"data": 0, "sealed": 1, **{name: 2 + i for i, name in enumerate(_CONTROL)}}
_OP_NAMES: Final = {code: name for name, code in _OP_CODES.items()}


def encode_ops(state: str, ops: Sequence[Op]) -> bytes:
    """The atheris input for *ops* in *state* (see :func:`decode_ops`)."""
    out = bytearray([STATE_LIST.index(STATES[state])])
    for name, data in ops:
        out.append(_OP_CODES[name])
        if name in ("data", "sealed"):
            for start in range(0, max(len(data), 1), 0xFFFF):
                piece = data[start : start + 0xFFFF]
                if start:
                    out.append(_OP_CODES[name])
                out += struct.pack("!H", len(piece)) + piece
    return bytes(out)


def decode_ops(data: bytes) -> tuple[State, list[Op]]:
    """Byte 0 picks the state; then records ``code [len16 payload]``: every
    input means something, so the fuzzer never wastes a run."""
    state = STATE_LIST[data[0] % len(STATE_LIST)] if data else STATE_LIST[0]
    ops: list[Op] = []
    pos = 1
    while pos < len(data):
        name = _OP_NAMES.get(data[pos] % 16, "data")
        pos += 1
        if name in ("data", "sealed"):
            (length,) = struct.unpack("!H", data[pos : pos + 2].rjust(2, b"\x00"))
            payload = data[pos + 2 : pos + 2 + length]
            pos += 2 + len(payload)
            ops.append((name, payload))
        else:
            ops.append((name, b""))
    return state, ops


# --------------------------------------------------------------------------
# the properties


def _texts(run: Run) -> Iterator[str]:
    if run.error is not None:
        yield str(run.error)
        yield repr(run.error)
    for attempt in run.machine.attempts:
        yield attempt.describe()
        yield repr(attempt)


def expected_limit(machine: pgproto.ConnectionStateMachine, kind: bytes) -> int:
    """libpq's limit for a message of type *kind* now (not the machine's own
    idea of it): during authentication only R and v (2000 bytes) and E (30000)
    are framed at all; afterwards rows, descriptions and copy data may be up
    to 1 GiB, everything else 30000 bytes."""
    if not machine._auth_ok:
        if kind in (b"R", b"v"):
            return wire.AUTH_MESSAGE_LIMIT
        return wire.ORDINARY_MESSAGE_LIMIT if kind == b"E" else 0
    if kind in (b"D", b"d", b"T", b"V", b"W"):
        return wire.DATA_MESSAGE_LIMIT
    return wire.ORDINARY_MESSAGE_LIMIT


def check_buffer(machine: pgproto.ConnectionStateMachine) -> None:
    """At rest, a live machine holds at most one incomplete message, whose
    length word was already accepted for its type; TLS at most one record."""
    status = machine.status
    if status is _S.BAD:
        return  # it reads nothing more; what it holds is dropped with it
    buffer = machine._in
    held = len(buffer)
    if status is _S.SSL_STARTUP and machine._tls is None:
        assert held == 0, f"{held} bytes held behind the reply to SSLRequest"
    elif held >= 5:
        start = buffer._pos
        kind, length = struct.unpack_from("!cI", buffer._data, start)
        limit = expected_limit(machine, kind)
        assert 4 <= length <= limit, (kind, length, limit)
        assert held < 1 + length, f"a complete message of {held} bytes left unparsed"
    tls = machine._tls
    if tls is not None:
        pending = tls._incoming.pending
        assert pending <= TLS_RECORD_MAX, f"TLS holds {pending} bytes of ciphertext"


def check_run(run: Run) -> None:
    """The properties every run must have (whatever the input)."""
    m = run.machine
    # Events not yet taken (the state "made" is left before its pump) count too.
    queued = list(m._events)
    changes = statuses([*run.events, *queued])
    if changes:
        assert m.status is changes[-1], (m.status, changes[-1])
    if run.error is not None:
        assert m.status is _S.BAD, m.status
        assert m.poll() is FAILED
        # Events queued before the error are still delivered, then it is raised
        # again, for good.
        for _ in range(100):
            try:
                event = m.next_event()
            except pgproto.Error as exc:
                raised: pgproto.Error = exc
                break
            assert event is not NEED_DATA, "a failed machine stopped raising its error"
            run.events.append(event)
        else:
            raise AssertionError("a failed machine keeps producing events")
        assert raised is run.error, (raised, run.error)
        with pytest.raises(pgproto.Error) as again:
            m.next_event()
        assert again.value is run.error
    assert_transitions([*run.events, *m._events])
    check_buffer(m)
    for text in _texts(run):
        assert SECRET not in text, "the password shows in an error"


def apply(run: Run, op: Op) -> None:
    """One operation, as an adapter would do it (only legal calls)."""
    m = run.machine
    name, data = op
    if name in ("data", "sealed", "eof"):
        chunk = b"" if name == "eof" else run.seal(data) if name == "sealed" else data
        if name != "eof" and not chunk:
            return
        run.feed(chunk)
    elif name == "server":
        if run.server is not None and m.poll() is READING:
            reply = run.server.step(run.take())
            if reply:
                run.feed(reply)
    elif name == "timer":
        m.timer_expired()
        run.pump()
    elif name == "deadline":
        m.deadline_expired()
        run.pump()
    elif name == "close":
        m.close()
        run.pump()
    elif name == "query":
        if m.status is _S.OK and m.poll() is OK and not isinstance(m, CancelStateMachine):
            m.send_query("select 1")
            run.pump()
    elif name == "reset":
        # PQreset starts over at the first host: drive it to the point of
        # reading, so the next bytes go to a fresh connection.
        if m.status is _S.BAD:
            m.reset()
            run.pump()
    else:  # pragma: no cover - the strategies only make the names above
        raise AssertionError(name)


def _apply_all(run: Run, ops: Sequence[Op], *, check_each: bool = False) -> Run:
    """Apply *ops* until the machine raises (kept as ``run.error``); with
    *check_each*, :func:`check_buffer` after each of them."""
    try:
        for op in ops:
            apply(run, op)
            if check_each:
                check_buffer(run.machine)
    except pgproto.Error as exc:
        run.error = exc
    return run


def fuzz_run(state: State, ops: Sequence[Op]) -> Run:
    """Build *state*, apply *ops* until the machine fails, check the properties."""
    run = state.build()
    assert run.machine.status is state.status, (state.name, run.machine.status)
    _apply_all(run, ops, check_each=True)
    check_run(run)
    return run


# --------------------------------------------------------------------------
# 1. every state, arbitrary input


def test_every_state_is_reached() -> None:
    for state in STATE_LIST:
        run = fuzz_run(state, [])
        assert run.machine.status is state.status, state.name
        assert isinstance(run.machine, CancelStateMachine) is state.cancel
        assert (run.server is not None) is state.tls, state.name
    # Never entered: GSS_STARTUP, AUTHENTICATING, SETENV (see _states.py),
    # ALLOCATED (libpq's before PQconnectStart); CHECK_TARGET is passed
    # through within one next_event() call.
    unreachable = {_S.GSS_STARTUP, _S.AUTHENTICATING, _S.SETENV, _S.ALLOCATED, _S.CHECK_TARGET}
    assert {s.status for s in STATE_LIST} == set(ConnStatus) - unreachable
    assert {s.status for s in STATE_LIST if s.cancel} >= {
        _S.STARTED,
        _S.MADE,
        _S.SSL_STARTUP,
        _S.AWAITING_RESPONSE,
        _S.OK,
    }


def _message_stream() -> st.SearchStrategy[bytes]:
    """Framed messages of likely and unlikely types, bodies sometimes lying
    about their length, sometimes with the good messages of the protocol."""
    good = st.sampled_from(
        [
            AUTH_OK,
            auth(3),
            auth(5, b"salt"),
            sasl("SCRAM-SHA-256"),
            sasl("SCRAM-SHA-256-PLUS"),
            SCRAM_FIRST,
            auth(12, b"v=AAAA"),
            startup_done(),
            ready(),
            row_description("x") + data_row(b"on") + command_complete("SHOW"),
            message(b"v", b"\x00\x03\x00\x02\x00\x00\x00\x00"),
            message(b"K", b"\x00\x00\x10\xe1" + b"k" * 32),
            message(b"S", b"in_hot_standby\x00on\x00"),
            message(b"E", b"SFATAL\x00C57P03\x00Mx\x00\x00"),
            message(b"E", b"SFATAL\x00C42704\x00Mx\x00\x00"),
            message(b"A", b"\x00\x00\x00\x01ch\x00pay\x00"),
            message(b"N", b"SNOTICE\x00Mhi\x00\x00"),
            b"S",
            b"N",
            b"E",
        ]
    )
    arbitrary = st.tuples(
        st.sampled_from(b"RSKZENvCDTIAGHWcd?\x00\xff"), st.binary(max_size=24)
    ).map(lambda kb: message(bytes([kb[0]]), kb[1]))
    header = st.tuples(
        st.sampled_from(b"RSKZEDTvA"),
        st.sampled_from(
            [0, 1, 3, 4, 5, 2001, 30001, 2**30 - 1, 2**30, 2**31 - 1, 2**31, 2**32 - 1]
        ),
    ).map(lambda kl: bytes([kl[0]]) + struct.pack("!I", kl[1]))
    return st.lists(st.one_of(good, arbitrary, arbitrary, header), max_size=6).map(b"".join)


server_input: Final = st.one_of(st.binary(max_size=200), _message_stream(), _message_stream())


@st.composite
def op_lists(draw: st.DrawFn, tls: bool) -> list[Op]:
    """Server input cut at arbitrary points, with control calls in between."""
    data = draw(server_input)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    kinds = ["data", "sealed"] if tls else ["data"]
    ops: list[Op] = []
    for piece in pieces:
        if tls and draw(st.integers(0, 3)) == 0:
            ops.append(("server", b""))
        if draw(st.integers(0, 5)) == 0:
            ops.append((draw(st.sampled_from(_CONTROL[:-1])), b""))
        ops.append((draw(st.sampled_from(kinds)), piece))
    if draw(st.booleans()):
        ops.append(("eof", b""))
    return ops


#: Every Hypothesis test here: reproducible, no deadline, no example database;
#: each sets its own ``max_examples``.
_SETTINGS: Final = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FUZZ_SETTINGS: Final = settings(
    _SETTINGS,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("name", list(STATES))
@FUZZ_SETTINGS
@given(data=st.data())
def test_arbitrary_input_in_every_state(name: str, data: st.DataObject) -> None:
    state = STATES[name]
    fuzz_run(state, data.draw(op_lists(state.tls), label="ops"))


@settings(_SETTINGS, max_examples=300)
@given(st.binary(max_size=300))
@example(b"\x00")
@example(bytes([STATE_LIST.index(STATES["tls-hello"]), _OP_CODES["server"]]))
def test_atheris_input_format(data: bytes) -> None:
    """The harness's decoding: any bytes are some state and some operations."""
    state, ops = decode_ops(data)
    fuzz_run(state, ops)


def test_op_encoding_round_trips() -> None:
    ops: list[Op] = [("data", b"R" * 70_000), ("eof", b""), ("sealed", b""), ("server", b"")]
    state, decoded = decode_ops(encode_ops("tls-auth", ops))
    assert state.name == "tls-auth"
    assert decoded == [("data", b"R" * 0xFFFF), ("data", b"R" * 4465), *ops[1:]]


# Memory.  A header that claims a huge message is refused (or, for the
# message types that may be that long, costs only the bytes that came).

#: What a run may allocate beyond the bytes it was given: the events, the
#: error, one copy of a chunk; nothing near the lengths the headers claim.
MEMORY_SLACK: Final = 512 * 1024
HUGE: Final = [2**30 - 1, 2**30, 2**31 - 1, 2**31, 2**32 - 1]


@contextlib.contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Yields a list that receives the traced peak (bytes) on exit."""
    result: list[int] = []
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        yield result
    finally:
        result.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


@pytest.mark.parametrize("length", HUGE)
def test_huge_lengths_allocate_nothing_in_any_state(length: int) -> None:
    """Every state, every type byte the state treats differently, a 1-4 GiB
    length word followed by 64 KiB of body in 4 KiB reads."""
    body = b"\x00" * 4096
    for state in STATE_LIST:
        for kind in b"RDEZ":
            run = state.build()
            ops: list[Op] = [("sealed", bytes([kind]) + struct.pack("!I", length))]
            ops += [("sealed", body)] * 16
            with peak_memory() as peak:
                run = _apply_all(run, ops)
            assert peak[0] < 16 * len(body) + MEMORY_SLACK, (state.name, kind, peak[0])
            check_run(run)


@pytest.mark.parametrize("name", ["query", "tls-idle"])
def test_a_long_data_row_costs_what_arrived(name: str) -> None:
    """A DataRow may be 1 GiB long; only its bytes so far are held, not 1 GiB."""
    run = STATES[name].build()
    if name == "tls-idle":
        run.machine.send_query("select 1")
        run.pump()
    body = b"\x01" * 16384
    with peak_memory() as peak:
        run = _apply_all(run, [("sealed", b"D" + struct.pack("!I", 2**30 - 1))])
        for _ in range(64):  # 1 MiB
            run = _apply_all(run, [("sealed", body)])
    assert run.error is None
    assert len(run.machine._in) == 5 + 64 * len(body)
    assert peak[0] < 2 * 64 * len(body) + MEMORY_SLACK, peak[0]
    check_run(run)


@settings(_SETTINGS, max_examples=40)
@given(
    name=st.sampled_from(list(STATES)),
    kind=st.integers(0, 255),
    length=st.one_of(st.sampled_from(HUGE), st.integers(2**20, 2**32 - 1)),
    chunks=st.lists(st.binary(min_size=1, max_size=8192), max_size=8),
)
def test_hostile_headers_memory_property(
    name: str, kind: int, length: int, chunks: list[bytes]
) -> None:
    run = STATES[name].build()
    ops: list[Op] = [("sealed", bytes([kind]) + struct.pack("!I", length))]
    ops += [("sealed", c) for c in chunks]
    with peak_memory() as peak:
        run = _apply_all(run, ops)
    fed = sum(len(c) for c in chunks)
    assert peak[0] < 4 * fed + MEMORY_SLACK, (peak[0], fed)
    check_run(run)


# --------------------------------------------------------------------------
# 2. transcripts: arbitrary splits and mutations

TRANSCRIPTS: Final = transcripts.load_all()
#: Tests take the name: a failure report must not print the recorded passwords.
_T_IDS: Final = [t.name for t in TRANSCRIPTS]
_BY_NAME: Final = {t.name: t for t in TRANSCRIPTS}


@dataclass(frozen=True)
class Stream:
    """A transcript's server bytes joined, and where they may not be merged."""

    data: bytes
    #: Offsets where the server waited for the client (between two turns).
    turns: tuple[int, ...]
    #: Where the answer to the query starts: no server sends it before the
    #: query, and on an idle connection it would be unsolicited.
    query: int
    eof: bool


def _stream(t: transcripts.Transcript) -> Stream:
    data = bytearray()
    turns: list[int] = []
    query = None
    eof = False
    for kind, chunk in t.steps:
        if kind == "client":
            turns.append(len(data))
            if chunk.startswith(b"Q") and query is None:
                query = len(data)
        elif kind == "server":
            data += chunk
            eof = not chunk
    return Stream(bytes(data), tuple(turns), len(data) if query is None else query, eof)


def _split(data: bytes, cuts: Sequence[int], eof: bool) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(points) if b > a]
    return [*pieces, *([b""] if eof else [])]


def _shown(events: Sequence[Event]) -> list[str]:
    return [repr(e) for e in events]


@functools.cache
def _recorded(name: str) -> tuple[list[str], bytes, dict[str, Any], ConnStatus]:
    """The replay as recorded: events, client bytes, outcome, final status."""
    result = transcripts.replay(_BY_NAME[name])
    return _shown(result.events), result.client, transcripts.outcome(result), result.machine.status


_SPLIT_SETTINGS: Final = settings(_SETTINGS, max_examples=30)


@pytest.mark.parametrize("name", _T_IDS)
@_SPLIT_SETTINGS
@given(cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_transcript_split_anywhere_is_the_recorded_replay(name: str, cuts: list[int]) -> None:
    """Each server turn cut at arbitrary points: everything is as recorded."""
    transcript = _BY_NAME[name]
    s = _stream(transcript)
    result = transcripts.replay(transcript, _split(s.data, [*cuts, *s.turns], s.eof))
    events, client, outcome, status = _recorded(transcript.name)
    assert result.unread == []
    assert _shown(result.events) == events
    assert result.client == client
    assert transcripts.outcome(result) == outcome == transcript.expected
    assert result.machine.status is status
    assert_transitions(result.events)


@pytest.mark.parametrize("name", _T_IDS)
@_SPLIT_SETTINGS
@given(cuts=st.lists(st.integers(min_value=0), max_size=12))
@example(cuts=[])
def test_transcript_split_across_turns_is_the_recorded_replay(name: str, cuts: list[int]) -> None:
    """A server that does not wait for the client (bytes of several turns in
    one read): the same events and outcome.  The client bytes are the
    recorded ones, except that when the server's final word is an error, the
    answers the machine had queued but not yet sent are dropped with the
    connection (as PQfinish drops them): what is sent is then a prefix."""
    transcript = _BY_NAME[name]
    s = _stream(transcript)
    result = transcripts.replay(transcript, _split(s.data, [*cuts, s.query], s.eof))
    events, client, outcome, status = _recorded(transcript.name)
    assert result.unread == []
    assert _shown(result.events) == events
    assert transcripts.outcome(result) == outcome == transcript.expected
    assert result.machine.status is status
    if transcript.ok:
        assert result.client == client
    else:
        assert client.startswith(result.client)
    assert_transitions(result.events)


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip", "set", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip" and out:
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and out:
            out[i] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, ord("R"), ord("E"), ord("Z")]))
        elif op == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and out:
            del out[i : i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del out[i:]
    return bytes(out)


def replay_hostile(t: transcripts.Transcript, chunks: Sequence[bytes]) -> Run:
    """Replay *t*'s parameters against *chunks*; when they run out, EOF (a
    server that hangs up), as often as the machine reconnects."""
    run = Run(transcripts.make_machine(t.params, t.nonce), addresses=t.resolved)
    queue = list(chunks)
    m = run.machine
    eofs = 0
    try:
        status = run.pump()
        while status is READING:
            if queue:
                m.receive_data(queue.pop(0))
            else:
                eofs += 1
                assert eofs <= 8, "the machine keeps reading after EOF"
                m.receive_data(b"")
            status = run.pump()
        if status is OK:
            if t.query is not None:
                m.send_query(t.query)
                status = run.pump()
                while status is READING and queue:
                    m.receive_data(queue.pop(0))
                    status = run.pump()
            m.close()
            run.pump()
    except pgproto.Error as exc:
        run.error = exc
    return run


@pytest.mark.parametrize("name", _T_IDS)
@settings(_SETTINGS, max_examples=60)
@given(data=st.data())
def test_mutated_transcripts_only_raise_pgproto_errors(name: str, data: st.DataObject) -> None:
    transcript = _BY_NAME[name]
    s = _stream(transcript)
    mutated = data.draw(mutations(s.data), label="mutated")
    cuts = data.draw(st.lists(st.integers(min_value=0), max_size=6), label="cuts")
    run = replay_hostile(transcript, _split(mutated, [*cuts, s.query], s.eof))
    check_run(run)
    password = transcript.params.get("password")
    if password:
        for text in _texts(run):
            assert password not in text, "the password shows in an error"


def test_replay_hostile_replays_the_recordings() -> None:
    """The hostile driver, given the untouched bytes, reaches the recorded end."""
    for t in TRANSCRIPTS:
        s = _stream(t)
        run = replay_hostile(t, _split(s.data, [s.query], s.eof))
        assert (run.error is None) is t.ok, t.name
        assert run.machine.status is _S.BAD
        check_run(run)


# --------------------------------------------------------------------------
# 3. connection strings

KEYWORDS: Final = [o.keyword for o in OPTIONS]
#: Values each validator of resolve_params is likely to choke on.
_VALUES: Final = [
    "",
    "0",
    "1",
    "-1",
    "65535",
    "65536",
    "99999999999999999999",
    "1e3",
    " 5",
    "5 ",
    "0x10",
    "٣",  # a Unicode digit: int() would take it
    "１２",
    "+3",
    "3.2",
    "3.1",
    "2",
    "latest",
    "require",
    "verify-full",
    "direct",
    "postgres",
    "read-write",
    "prefer-standby",
    "random",
    "!password",
    "scram-sha-256,md5",
    "none,scram-sha-256",
    "!none",
    ",",
    "a,b,",
    ",,,",
    "h1,h2",
    "127.0.0.1,::1",
    "::1",
    "1.2.3.4.5",
    "/tmp",
    "@abstract",
    "tls1.2",
    "TLSv1.3",
    "TLSv1.2",
    "on",
    "true",
    "x" * 300,
    "é",
    "\udcff",
    "\ud800",
    "a\x00b",
    "\\",
    "'",
]
_TEXT: Final = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("ab1,:/=@?&%[] '\\\t\n.-_+!#")),
        st.characters(codec="utf-8"),
        st.characters(),  # lone surrogates too
    ),
    max_size=12,
)
value_text: Final = st.one_of(st.sampled_from(_VALUES), _TEXT)
keyword_text: Final = st.one_of(
    st.sampled_from(KEYWORDS),
    st.sampled_from(KEYWORDS),
    st.sampled_from(["requiressl", "ssl", "Host", "", "foo", "host ", "pass%77ord"]),
    _TEXT,
)
#: Password markers: distinctive text a message must never contain.
PW_MARK: Final = "Pw9qZx"


def _kv_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _kv_escape(value: str) -> str:
    """*value* unquoted, its spaces, quotes and backslashes escaped."""
    return "".join("\\" + c if c in " \t\n\r\x0b\x0c'\\" else c for c in value)


def _uri_quote(value: str) -> str:
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value  # a lone surrogate: left for the parser to refuse
    out = []
    for byte in data:
        char = chr(byte)
        out.append(char if char.isalnum() and byte < 128 else f"%{byte:02X}")
    return "".join(out)


@st.composite
def kv_strings(draw: st.DrawFn) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        keyword = draw(keyword_text)
        value = draw(value_text)
        form = draw(st.sampled_from(["quoted", "quoted", "plain", "raw"]))
        if form == "quoted":
            text = _kv_quote(value)
        elif form == "plain":
            text = _kv_escape(value) or "''"
        else:
            text = value
        parts.append(f"{keyword}={text}")
    return draw(st.sampled_from([" ", "  ", "\t", "\n"])).join(parts)


@st.composite
def uri_strings(draw: st.DrawFn) -> str:
    out = draw(st.sampled_from(["postgresql://", "postgres://"]))
    if draw(st.booleans()):
        out += draw(st.one_of(_TEXT.map(_uri_quote), _TEXT))
        if draw(st.booleans()):
            out += ":" + draw(st.one_of(_TEXT.map(_uri_quote), _TEXT))
        out += "@"
    hosts = draw(
        st.lists(
            st.one_of(
                st.sampled_from(["h", "[::1]", "[::1", "[]", "127.0.0.1", "%2Ftmp", ""]),
                _TEXT.map(_uri_quote),
                _TEXT,
            ),
            max_size=3,
        )
    )
    ports = [
        draw(st.one_of(st.sampled_from(["", ":5432", ":0", ":x", ":99999"]), _TEXT)) for _ in hosts
    ]
    out += ",".join(h + p for h, p in zip(hosts, ports, strict=True))
    if draw(st.booleans()):
        out += "/" + draw(st.one_of(_TEXT.map(_uri_quote), _TEXT))
    params = draw(st.lists(st.tuples(keyword_text, value_text), max_size=4))
    if params:
        quote = draw(st.booleans())
        out += "?" + "&".join(f"{k}={_uri_quote(v) if quote else v}" for k, v in params)
    return out


conninfo_text: Final = st.one_of(
    kv_strings(),
    kv_strings(),
    uri_strings(),
    uri_strings(),
    _TEXT,
    st.text(max_size=40),
    st.tuples(st.sampled_from(["postgresql://", "postgres://"]), st.text(max_size=30)).map("".join),
)


def check_conninfo(conninfo: str, passwords: Sequence[str] = ()) -> None:
    """parse_conninfo and resolve_params raise only ConninfoError, and its
    message quotes none of *passwords* (warnings neither)."""
    messages: list[str] = []
    # The suite's secret watch (tests/secret_watch.py) would take every
    # generated value of a password option for a password and find it in
    # unrelated messages ("require" as sslmode and as a password): record into
    # a private scanner; the markers are checked below.
    with watching(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in (
            lambda: pgproto.parse_conninfo(conninfo),
            lambda: _resolve(conninfo, env=ENV),
            lambda: _resolve(env=ENV, dbname=conninfo, user="u"),
            lambda: _resolve(conninfo, env=ENV, expand_dbname=False),
        ):
            try:
                call()
            except ConninfoError as exc:
                messages.append(str(exc))
                messages.append(repr(exc))
    messages += [str(w.message) for w in caught]
    for password in passwords:
        for text in messages:
            assert password not in text, "a password is quoted in an error message"


STRING_SETTINGS: Final = settings(_SETTINGS, max_examples=700)


@STRING_SETTINGS
@given(conninfo_text)
@example("port=٣")
@example("postgresql://h:%FF")
@example("host=a,b port=1,2,3")
@example("hostaddr=::1%eth0")
@example("sslmode=verify-full sslrootcert=system")
@example("require_auth=")
@example("min_protocol_version=3.2 max_protocol_version=3.0")
@example("service=\ud800")
def test_arbitrary_connection_strings_raise_only_conninfo_error(conninfo: str) -> None:
    check_conninfo(conninfo)


#: Options holding a file path that pgproto hands to os.open()/os.stat():
#: a NUL or a lone surrogate given as a keyword argument once escaped from
#: there as ValueError / UnicodeEncodeError (test_unencodable_path_options).
PATH_OPTIONS: Final = ("passfile", "sslrootcert", "sslkeylogfile")


@STRING_SETTINGS
@given(st.dictionaries(st.sampled_from(KEYWORDS), value_text, max_size=5), st.booleans())
@example({"host": "a\x00b", "password": "\ud800"}, True)
def test_arbitrary_keyword_arguments_raise_only_conninfo_error(
    kwargs: dict[str, str], expand: bool
) -> None:
    with watching(), warnings.catch_warnings(), contextlib.suppress(ConninfoError):
        warnings.simplefilter("ignore")
        _resolve(env=ENV, expand_dbname=expand, **kwargs)


@pytest.mark.parametrize("value", ["a\x00b", "\ud800"], ids=["nul", "surrogate"])
@pytest.mark.parametrize("keyword", PATH_OPTIONS)
def test_unencodable_path_options(keyword: str, value: str) -> None:
    """Refused while resolving, naming the option, never reaching a file call."""
    with watching(), pytest.raises(ConninfoError, match=f'option "{keyword}"') as info:
        _resolve(env=ENV, host="db.example", sslmode="verify-ca", **{keyword: value})
    assert info.value.keyword == keyword


_PW_TEXT: Final = st.text(
    alphabet=st.one_of(st.sampled_from(list("ab1 '\\%,:@/?&=[]#\t")), st.characters(codec="utf-8")),
    max_size=5,
)


@st.composite
def strings_with_password(draw: st.DrawFn) -> tuple[str, str]:
    """A connection string whose password (the marker, with odd characters
    around it) is set in a way the grammar makes unambiguous."""
    password = draw(_PW_TEXT).replace("\x00", "") + PW_MARK + draw(_PW_TEXT).replace("\x00", "")
    others = draw(st.lists(st.tuples(keyword_text, value_text), max_size=3))
    where = draw(st.sampled_from(["kv-quoted", "kv-plain", "uri-userinfo", "uri-query"]))
    keyword = draw(st.sampled_from(["password", "sslpassword"]))
    if where.startswith("kv"):
        value = _kv_quote(password) if where == "kv-quoted" else _kv_escape(password)
        parts = [f"{k}={_kv_quote(v)}" for k, v in others]
        parts.insert(draw(st.integers(0, len(parts))), f"{keyword}={value}")
        return " ".join(parts), password
    pairs = [f"{_uri_quote(k)}={_uri_quote(v)}" for k, v in others]
    host = draw(st.sampled_from(["h", "[::1]", "h:5432", "h:x", "[", "", "a,b"]))
    if where == "uri-userinfo":
        query = "?" + "&".join(pairs) if pairs else ""
        return f"postgresql://u:{_uri_quote(password)}@{host}/db{query}", password
    pairs.insert(draw(st.integers(0, len(pairs))), f"{keyword}={_uri_quote(password)}")
    return f"postgresql://{host}/db?" + "&".join(pairs), password


@STRING_SETTINGS
@given(strings_with_password())
def test_a_password_in_the_string_is_never_quoted(case: tuple[str, str]) -> None:
    conninfo, password = case
    check_conninfo(conninfo, [password, PW_MARK])


@pytest.mark.parametrize(
    "conninfo",
    [
        f"postgresql://[::1&?password={PW_MARK}",
        f"postgresql://[]&?password={PW_MARK}",
        f"postgresql://[::1]x&?password={PW_MARK}",
        # atheris found it: a parameter in the (malformed) host whose value
        # runs on over the real "?password=" once hid it from the masking.
        f"postgresql://[h/&b=%full?password={PW_MARK}%5Bh",
        f"postgresql://[h&b=1?x=2?password={PW_MARK}&y=3",
    ],
)
def test_uri_password_after_an_ampersand_in_the_host_is_masked(conninfo: str) -> None:
    with watching(), pytest.raises(ConninfoError) as info:
        pgproto.parse_conninfo(conninfo)
    assert PW_MARK not in str(info.value)


@settings(_SETTINGS, max_examples=300, suppress_health_check=())
@given(st.binary(max_size=80))
@example(b"\x03[h/&b?=%full")  # the atheris finding above, as the harness got it
def test_conninfo_harness_input_format(data: bytes) -> None:
    check_conninfo_bytes(data)


def check_conninfo_bytes(data: bytes) -> None:
    """The atheris conninfo harness's property: bytes decoded (surrogates
    kept) as a connection string; a marker password inserted when byte 0 says so."""
    text = data[1:].decode("utf-8", "surrogateescape")
    mode = data[0] % 4 if data else 0
    if mode == 0:
        check_conninfo(text)
    elif mode == 1:
        check_conninfo(f"password={_kv_quote(PW_MARK + text)} {text}", [PW_MARK])
    elif mode == 2:
        check_conninfo(f"postgresql://u:{_uri_quote(text + PW_MARK)}@{text}", [PW_MARK])
    else:
        # No "?" before the query: the first one starts it, so the password
        # would be part of another parameter's name (and could be quoted).
        host = text.replace("?", "")
        check_conninfo(f"postgresql://{host}?password={_uri_quote(PW_MARK + text)}", [PW_MARK])


# --------------------------------------------------------------------------
# 4. the atheris harnesses, for a fixed budget

FUZZ_DIR: Final = Path(__file__).parent / "fuzz"
#: Runs per harness in CI (about 20 s each on an idle machine), and the seed.
#: -max_total_time bounds a slow machine: libFuzzer then stops early, cleanly.
ATHERIS_RUNS: Final = {"fuzz_machine.py": 12_000, "fuzz_conninfo.py": 10_000}
ATHERIS_SEED: Final = 6
ATHERIS_TIMEOUT: Final = 120  # a generous bound that still fails a hang


def seed_corpus_machine() -> list[bytes]:
    """Inputs that drive each state somewhere interesting (the harness's seeds)."""
    corpus: list[bytes] = []
    for state in STATE_LIST:
        corpus.append(encode_ops(state.name, []))
        corpus.append(encode_ops(state.name, [("eof", b"")]))
        corpus.append(encode_ops(state.name, [("sealed", AUTH_OK + startup_done())]))
        corpus.append(encode_ops(state.name, [("sealed", row_description("x") + data_row(b"1"))]))
        corpus.append(encode_ops(state.name, [("server", b""), ("timer", b"")]))
    for t in TRANSCRIPTS:
        corpus.append(encode_ops("auth", [("data", _stream(t).data[:2000])]))
    return corpus


def seed_corpus_conninfo() -> list[bytes]:
    return [
        b"\x00host=db port=5432 user=u",
        b"\x00postgresql://u@h1:1,h2:2/db?sslmode=require&target_session_attrs=read-write",
        b"\x01 host=a",
        b"\x02h:5432/db",
        b"\x03h/db?sslmode=verify-full",
        b"\x00require_auth=!md5,!password channel_binding=require",
        b"\x00min_protocol_version=3.0 max_protocol_version=latest",
    ]


@pytest.mark.skipif(sys.platform != "linux", reason="atheris is installed on Linux only")
@pytest.mark.parametrize("harness", list(ATHERIS_RUNS))
def test_atheris_harness(harness: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    artifacts = tmp_path / "artifacts"
    corpus.mkdir()
    artifacts.mkdir()
    script = FUZZ_DIR / harness
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(
        [sys.executable, str(script), "--write-corpus", str(corpus)],
        check=True,
        env=env,
        timeout=ATHERIS_TIMEOUT,
    )
    assert any(corpus.iterdir())
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            f"-runs={ATHERIS_RUNS[harness]}",
            f"-seed={ATHERIS_SEED}",
            f"-artifact_prefix={artifacts}/",
            "-rss_limit_mb=2048",
            "-max_len=4096",
            f"-max_total_time={ATHERIS_TIMEOUT}",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=ATHERIS_TIMEOUT + 60,
        check=False,
    )
    crashes = sorted(p.name for p in artifacts.iterdir())
    tail = proc.stderr[-4000:]
    assert proc.returncode == 0, f"{harness} failed ({proc.returncode}), {crashes}:\n{tail}"
    assert not crashes, f"{harness} found {crashes}:\n{tail}"
    assert "Done" in proc.stderr, tail
