"""The connection state machine: libpq's ``PQconnectPoll`` without the IO.

Theory of operation
-------------------

One :class:`ConnectionStateMachine` makes one connection, trying hosts,
addresses and encryption methods in libpq's order until one succeeds or the
rules say stop.  It owns no socket.  Its driver (an adapter) plays three
parts, always in this loop::

    while True:
        event = machine.next_event()
        if event is NEED_DATA:
            status = machine.poll()
            if status is OK or status is FAILED: break
            if status is WRITING: transport.send(machine.data_to_send())
            else: machine.receive_data(transport.recv())   # b"" at EOF
        elif isinstance(event, OpenConnection): ... machine.connection_made()
        elif isinstance(event, CloseConnection): ... send event.data, close
        elif isinstance(event, ResolveHost): ... machine.addresses_resolved([...])
        elif isinstance(event, StartTimer): ... later machine.timer_expired()

``next_event()`` does all the work: it parses what arrived, answers it (the
answer lands in the output buffer), and returns reports (ParameterStatus,
TLSEstablished, ...) and commands (open or close a transport, resolve a
name, start the per-address timer).  When nothing can happen without the
driver, it returns ``NEED_DATA`` and ``poll()`` says what is needed, with
libpq's meaning: WRITING while output is pending or a transport is being
opened, READING while the machine waits for the server, OK and FAILED at the
end.  A command must be answered before ``next_event()`` is called again.

Failures, and what follows them, are libpq's (fe-connect.c, the outcome
table in the reference spec §4.5): a transport that cannot be opened moves
to the next address; "cannot connect now" (57P03) to the next host; a TLS
failure or a server ErrorResponse during authentication to the next
encryption method on the same address (sslmode allow/prefer), and otherwise
the end; a client-side refusal (require_auth, channel_binding, no password,
a SCRAM signature that does not verify) and any protocol violation end it at
once.  Each failed attempt is recorded as an :class:`~pgproto.Attempt` and
reported as an :class:`AttemptFailed` event; when nothing is left,
``next_event()`` raises :class:`~pgproto.ConnectError` listing them all, and
keeps raising it.  Every server-derived value is dropped between attempts
(CVE-2018-10915).

Security rules kept in code here: the byte answering SSLRequest is read
alone, and plaintext queued behind it is an error (CVE-2021-23222); an ``E``
answer to SSLRequest is reported with pgproto's own words and never read
(CVE-2024-10977); once a SCRAM exchange has started, AuthenticationOk is
accepted only after the server's signature has been verified (stricter than
libpq, see README "Differences from libpq").

After ``CONNECTION_OK`` the machine runs simple queries (``send_query``):
RowDescription, DataRow, CommandComplete, EmptyQueryResponse, ErrorResponse
and ReadyForQuery arrive as events, as do notices, notifications and
ParameterStatus changes at any time.  ``close()`` queues Terminate.
"""

from __future__ import annotations

import collections
import ipaddress
import os
from collections.abc import Callable, Sequence
from random import Random
from typing import Final

from . import _wire
from ._enums import ConnStatus, PollingStatus
from ._environment import _password_entry
from ._errors import (
    RESOLVING_STEP,
    SQLSTATE_CANNOT_CONNECT_NOW,
    Attempt,
    AuthenticationError,
    ConnectError,
    Error,
    LocalProtocolError,
    RemoteProtocolError,
    ServerError,
    TLSError,
    TransportError,
)
from ._events import (
    NEED_DATA,
    Address,
    AttemptFailed,
    AttemptStarted,
    AuthenticationCompleted,
    AuthenticationRequested,
    BackendKeyData,
    CloseConnection,
    CommandComplete,
    Connected,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    Event,
    NeedData,
    NegotiateProtocolVersion,
    NoticeResponse,
    NotificationResponse,
    OpenConnection,
    ParameterStatus,
    ReadyForQuery,
    ResolveHost,
    RowDescription,
    StartTimer,
    StatusChanged,
    TLSEstablished,
)
from ._params import ConnParams, HostParams, HostType, SourceKind
from ._scram import (
    DEFAULT_CACHE,
    MAX_ITERATIONS_DEFAULT,
    NONCE_LENGTH,
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    SaltedPasswordCache,
    ScramClient,
    md5_response,
)
from ._states import TRANSITIONS, Input, transition
from ._tls import TLSContextInfo, TLSEngine, TLSSettings, create_context

__all__ = ["ConnectionStateMachine"]

# The statuses, poll()'s answers, the state table's inputs and the host
# types as module globals: on CPython 3.11 an Enum member read as a class
# attribute is an unspecialized lookup (about 70 ns), a global is not -- and
# every step compares the status.
_S_NEEDED: Final = ConnStatus.NEEDED
_S_STARTED: Final = ConnStatus.STARTED
_S_MADE: Final = ConnStatus.MADE
_S_SSL_STARTUP: Final = ConnStatus.SSL_STARTUP
_S_AWAITING_RESPONSE: Final = ConnStatus.AWAITING_RESPONSE
_S_AUTH_OK: Final = ConnStatus.AUTH_OK
_S_CHECK_TARGET: Final = ConnStatus.CHECK_TARGET
_S_CHECK_WRITABLE: Final = ConnStatus.CHECK_WRITABLE
_S_CHECK_STANDBY: Final = ConnStatus.CHECK_STANDBY
_S_CONSUME: Final = ConnStatus.CONSUME
_S_OK: Final = ConnStatus.OK
_S_BAD: Final = ConnStatus.BAD
_P_FAILED: Final = PollingStatus.FAILED
_P_WRITING: Final = PollingStatus.WRITING
_P_READING: Final = PollingStatus.READING
_P_OK: Final = PollingStatus.OK
_NAME: Final = HostType.NAME
_ADDRESS: Final = HostType.ADDRESS
_I_AUTHENTICATION_OK: Final = Input.AUTHENTICATION_OK
_I_CHECK_ANSWERED: Final = Input.CHECK_ANSWERED
_I_CHECK_DRAINED: Final = Input.CHECK_DRAINED
_I_CHECK_STANDBY: Final = Input.CHECK_STANDBY
_I_CHECK_WRITABLE: Final = Input.CHECK_WRITABLE
_I_CLOSED: Final = Input.CLOSED
_I_FAILED: Final = Input.FAILED
_I_OPEN_REQUESTED: Final = Input.OPEN_REQUESTED
_I_RESET: Final = Input.RESET
_I_RETRY: Final = Input.RETRY
_I_SSL_REFUSED: Final = Input.SSL_REFUSED
_I_SSL_REQUEST_SENT: Final = Input.SSL_REQUEST_SENT
_I_STARTUP_DONE: Final = Input.STARTUP_DONE
_I_STARTUP_SENT: Final = Input.STARTUP_SENT
_I_TARGET_ACCEPTED: Final = Input.TARGET_ACCEPTED
_I_TLS_ESTABLISHED: Final = Input.TLS_ESTABLISHED
_I_TRANSPORT_READY: Final = Input.TRANSPORT_READY

PLAINTEXT: Final = "plaintext"
SSL: Final = "ssl"

# What happens after a failure (reference spec §4.5).
_HARD: Final = "give up"
_FALLBACK: Final = "fallback"  # next encryption method, new transport
_NEXT_ADDR: Final = "next address"
_NEXT_HOST: Final = "next host"
_RETRY: Final = "retry"  # same address, same method (application_name)

_EOF_MESSAGE: Final = (
    "server closed the connection unexpectedly\n"
    "\tThis probably means the server terminated abnormally\n"
    "\tbefore or while processing the request."
)
_SQLSTATE_INVALID_PASSWORD: Final = "28P01"  # noqa: S105 - an SQLSTATE
_SQLSTATE_UNDEFINED_OBJECT: Final = "42704"

# Authentication request codes (protocol.h).
_AUTH_OK: Final = 0
_AUTH_CLEARTEXT: Final = 3
_AUTH_MD5: Final = 5
_AUTH_GSS: Final = 7
_AUTH_GSS_CONT: Final = 8
_AUTH_SSPI: Final = 9
_AUTH_SASL: Final = 10
_AUTH_SASL_CONT: Final = 11
_AUTH_SASL_FIN: Final = 12
_UNSUPPORTED_AUTH: Final = {
    1: "Kerberos 4 authentication not supported",
    2: "Kerberos 5 authentication not supported",
    4: "Crypt authentication not supported",
    6: "authentication method 6 not supported",
    _AUTH_GSS: "GSSAPI authentication not supported",
    _AUTH_GSS_CONT: "GSSAPI authentication not supported",
    _AUTH_SSPI: "SSPI authentication not supported",
}
_REQUIRE_AUTH_REASONS: Final = {
    _AUTH_CLEARTEXT: "server requested a cleartext password",
    _AUTH_MD5: "server requested a hashed password",
    _AUTH_GSS: "server requested GSSAPI authentication",
    _AUTH_GSS_CONT: "server requested GSSAPI authentication",
    _AUTH_SSPI: "server requested SSPI authentication",
    _AUTH_SASL: "server requested SASL authentication",
    _AUTH_SASL_CONT: "server requested SASL authentication",
    _AUTH_SASL_FIN: "server requested SASL authentication",
}


def _check_peer(required: str, peer_uid: int | None) -> Error | None:
    """requirepeer: the server process must run as the *required* user."""
    if peer_uid is None:
        return TransportError("requirepeer parameter is not supported on this platform")
    entry = _password_entry(peer_uid)
    if entry is None:
        return TransportError(f"local user with ID {peer_uid} does not exist")
    if entry[0] != required:
        return TransportError(
            f'requirepeer specifies "{required}", but actual peer user name is "{entry[0]}"'
        )
    return None


# Message length limits by phase (libpq's, fe-connect.c / fe-protocol3.c).
_DATA_TYPES: Final = frozenset(b"DdTVW")  # may be long: rows, copy data, descriptions


def _auth_limit(kind: bytes) -> int:
    if kind == b"E":
        return _wire.ORDINARY_MESSAGE_LIMIT
    if kind not in (b"R", b"v"):
        # As libpq: the type is checked before the length, so that a server
        # that is not PostgreSQL at all (HTTP, ...) is named as such.
        raise RemoteProtocolError(
            f"expected authentication request from server, but received {kind.decode('latin-1')!r}"
        )
    return _wire.AUTH_MESSAGE_LIMIT


#: After authentication: the length limit of every message type, looked up
#: in C (a dict's __getitem__, not a Python function per message).
_ordinary_limit: Final[Callable[[bytes], int]] = {
    bytes([kind]): _wire.DATA_MESSAGE_LIMIT if kind in _DATA_TYPES else _wire.ORDINARY_MESSAGE_LIMIT
    for kind in range(256)
}.__getitem__


#: Message types that end a result (so are "unexpected" during startup).
_RESULT_TYPES: Final = frozenset(b"CTDIGHWdcnst123")

#: The step names used in attempt records, by status.
_STEP_NAMES: Final = {
    _S_NEEDED: RESOLVING_STEP,
    _S_STARTED: "opening the connection",
    _S_MADE: "sending the startup packet",
    _S_SSL_STARTUP: "SSL negotiation",
    _S_AWAITING_RESPONSE: "authentication",
    _S_AUTH_OK: "waiting for the server to be ready",
    _S_CHECK_TARGET: "checking target_session_attrs",
    _S_CHECK_WRITABLE: "checking target_session_attrs",
    _S_CHECK_STANDBY: "checking target_session_attrs",
    _S_CONSUME: "checking target_session_attrs",
    _S_OK: "connected",
    _S_BAD: "failed",
}


#: How many things the machine keeps in a ConnParams' memo.
_MEMO_LIMIT: Final = 64

#: A new machine's state, but for its containers (see __init__).
_INITIAL_STATE: Final[dict[str, object]] = {
    "_status": _S_NEEDED,
    "_error": None,
    "_awaiting": None,
    "_host_index": -1,
    "_host": None,
    "_addr_index": 0,
    "_address": None,
    "_second_pass": False,
    "_method": PLAINTEXT,
    "_send_appname": True,
    "_transport_open": False,
    "_addresses": (),
    "_allowed": (),
}

#: The memo key of a ConnParams' settings (see _settings).
_SETTINGS: Final = ("settings",)


def _settings(params: ConnParams) -> dict[str, object]:
    """What a machine reads from *params*' options, once per ConnParams
    (kept in its memo): every machine made from it starts from these."""
    # The option values, read without ConnParams.__getitem__'s keyword
    # check (the keywords here are literals).
    option = params._values.get
    return {
        "_option": option,
        "_sslmode": option("sslmode") or "prefer",
        "_direct": option("sslnegotiation") == "direct",
        "_channel_binding": option("channel_binding") or "prefer",
        "_target": option("target_session_attrs") or "any",
        "_load_balance": option("load_balance_hosts") == "random",
        "_hosts": params.hosts,  # (shuffled into a list of its own with load_balance)
    }


#: The per-server state every attempt starts with (see _reset_server_state;
#: the receive buffer, the containers and the protocol version are set there).
_SERVER_STATE_DEFAULTS: Final[dict[str, object]] = {
    "_server_state_unused": True,
    "_nothing_received": True,  # no receive_data() since the transport opened
    "_eof": False,
    "_tls": None,
    "_tls_done": False,
    "_tls_info": None,
    "_backend_pid": None,
    "_backend_key": None,
    "_txn_status": None,
    "_negotiated": False,
    "_scram": None,
    "_auth_used": "none",
    "_auth_ok": False,
    "_auth_req_received": False,
    "_client_finished_auth": False,
    "_password_needed": False,
    "_password_used": False,
    "_query_active": False,
    "_check_failed": False,
}

#: Environment variables that become startup parameters (libpq's EnvironmentOptions).
_ENV_STARTUP: Final = (("PGDATESTYLE", "datestyle"), ("PGTZ", "timezone"), ("PGGEQO", "geqo"))


class _Failure(Exception):
    """Internal: an attempt failed with *error*; *outcome* says what follows."""

    def __init__(self, error: BaseException, outcome: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.outcome = outcome


def _shuffle(items: list[object], rng: Random) -> None:
    """libpq's "inside-out" Fisher-Yates shuffle (libpq_prng / pqConnectOptions2)."""
    for i in range(1, len(items)):
        j = rng.randint(0, i)
        items[i], items[j] = items[j], items[i]


class ConnectionStateMachine:
    """One connection to PostgreSQL, from resolved parameters to ready.

    *params* comes from :func:`~pgproto.resolve_params`.  *random_bytes*
    supplies the SCRAM client nonce (default :func:`os.urandom`); *rng* the
    ``load_balance_hosts=random`` shuffles (default seeded from the OS).
    *key_passphrase_hook* is libpq's ``PQsetSSLKeyPassHook``: called with the
    key file's path, it returns the passphrase.  *scram_cache* caches SCRAM
    salted passwords across connections (None disables it);
    *max_scram_iterations* caps the iteration count a server may demand.

    *reports*: with False the machine produces only what a driver must act
    on -- the commands, NoticeResponse, NotificationResponse, and the
    results of a query (RowDescription ... ReadyForQuery) -- and none of
    the reports that only tell what happened (StatusChanged,
    AttemptStarted/AttemptFailed, TLSEstablished, Authentication*,
    ParameterStatus, BackendKeyData, the startup ReadyForQuery, Connected,
    NegotiateProtocolVersion).  Its properties (``status``,
    ``server_parameters``, ``backend_pid``, ...) and errors are the same;
    a driver that does not trace saves the cost of building and
    dispatching about 25 events per connection.
    """

    # Per-server state, reset before every attempt (_reset_server_state).
    _in: _wire.ReceiveBuffer
    _eof: bool
    _tls: TLSEngine | None
    _tls_done: bool
    _tls_info: TLSContextInfo | None
    _server_params: dict[str, str]
    _backend_pid: int | None
    _backend_key: bytes | None
    _txn_status: str | None
    _pversion: tuple[int, int]
    _negotiated: bool
    _scram: ScramClient | None
    _auth_used: str
    _auth_ok: bool
    _auth_req_received: bool
    _client_finished_auth: bool
    _password_needed: bool
    _password_used: bool
    _query_active: bool
    _check_rows: list[tuple[str | None, ...]]
    _check_failed: bool
    _checked: dict[str, bool]
    _server_state_unused: bool  # reset, and no attempt has used it since
    _nothing_received: bool

    # Set from the ConnParams' settings (_settings) by __init__.
    _option: Callable[[str], str | None]
    _sslmode: str
    _direct: bool
    _channel_binding: str
    _target: str
    _load_balance: bool  # load_balance_hosts=random
    _hosts: Sequence[HostParams]  # (in the order they are tried)

    # Set from _INITIAL_STATE by __init__.
    _status: ConnStatus
    _error: Error | None
    _awaiting: str | None  # "resolve" / "connect": a command is out
    # Where we are in the host and address lists.
    _host_index: int
    _host: HostParams | None
    _addr_index: int
    _address: Address | None
    _second_pass: bool  # prefer-standby, second round
    _method: str
    _send_appname: bool
    _transport_open: bool
    _addresses: Sequence[Address]  # the current host's
    _allowed: Sequence[str]  # encryption methods for the current address (spec §6.1)

    #: What each status is doing, for :class:`~pgproto.Attempt` records.
    _step_names: dict[ConnStatus, str] = _STEP_NAMES

    def __init__(
        self,
        params: ConnParams,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        rng: Random | None = None,
        key_passphrase_hook: Callable[[str], str] | None = None,
        scram_cache: SaltedPasswordCache | None = DEFAULT_CACHE,
        max_scram_iterations: int = MAX_ITERATIONS_DEFAULT,
        reports: bool = True,
    ) -> None:
        self.params = params
        self._reports = reports
        self._random_bytes = random_bytes
        self._key_passphrase_hook = key_passphrase_hook
        self._scram_cache = scram_cache
        self._max_scram_iterations = max_scram_iterations
        self.__dict__.update(_INITIAL_STATE)  # the immutable state, in one go
        settings = params._memo.get(_SETTINGS)
        if settings is None:
            settings = params._memo[_SETTINGS] = _settings(params)
        self.__dict__.update(settings)  # what the options say, read once per ConnParams
        self._rng = rng
        if self._load_balance:
            if rng is None:
                self._rng = Random(os.urandom(16))
            hosts = list(params.hosts)
            _shuffle(hosts, self._rng)  # type: ignore[arg-type]
            self._hosts = hosts
        self._events: collections.deque[Event] = collections.deque()
        self._out = bytearray()
        self._attempts: list[Attempt] = []
        self._failed: set[str] = set()
        self._reset_server_state()

    # ----------------------------------------------------------------------
    # public state

    @property
    def status(self) -> ConnStatus:
        """libpq's ``PQstatus``: the ``CONNECTION_*`` step."""
        return self._status

    @property
    def error(self) -> Error | None:
        """The error that made the machine FAILED, if it is."""
        return self._error

    @property
    def attempts(self) -> tuple[Attempt, ...]:
        """Every failed attempt so far."""
        return tuple(self._attempts)

    @property
    def host(self) -> HostParams | None:
        """The host entry being tried (or connected to)."""
        return self._host

    @property
    def address(self) -> Address | None:
        """The address being tried (or connected to)."""
        return self._address

    @property
    def ssl_in_use(self) -> bool:
        return self._tls is not None and self._tls_done

    @property
    def tls(self) -> TLSEngine | None:
        """The TLS engine once the handshake is done (version, cipher, ...)."""
        return self._tls if self._tls_done else None

    @property
    def protocol_version(self) -> tuple[int, int]:
        return self._pversion

    @property
    def backend_pid(self) -> int | None:
        return self._backend_pid

    @property
    def backend_key(self) -> bytes | None:
        return self._backend_key

    @property
    def server_parameters(self) -> dict[str, str]:
        """ParameterStatus values reported so far (a copy)."""
        return dict(self._server_params)

    @property
    def transaction_status(self) -> str | None:
        """``"I"``, ``"T"`` or ``"E"`` from the last ReadyForQuery."""
        return self._txn_status

    @property
    def auth_method(self) -> str | None:
        """The authentication used: ``"none"``, ``"password"``, ``"md5"``,
        ``"SCRAM-SHA-256"`` or ``"SCRAM-SHA-256-PLUS"`` (once AuthenticationOk
        was accepted)."""
        return self._auth_used if self._auth_ok else None

    @property
    def channel_binding_used(self) -> bool:
        return self._scram is not None and self._scram.channel_bound

    @property
    def password_needed(self) -> bool:
        """libpq's ``PQconnectionNeedsPassword`` condition: the server asked for
        a password and none was supplied."""
        return self._password_needed and not self._password_used

    @property
    def query_in_progress(self) -> bool:
        return self._query_active

    # ----------------------------------------------------------------------
    # the verbs

    def poll(self) -> PollingStatus:
        """What the driver must do next (call after ``next_event()`` returned
        ``NEED_DATA``)."""
        if self._status is _S_BAD:
            return _P_FAILED
        if self._out or self._awaiting is not None:
            return _P_WRITING
        if self._status is _S_OK and not self._query_active:
            return _P_OK
        return _P_READING

    def data_to_send(self) -> bytes:
        """Every byte waiting to go to the server (already encrypted when TLS is on)."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; ``b""`` means the server closed the connection."""
        if self._status is _S_BAD:
            return
        if not self._transport_open:
            raise self._misuse("receive_data() called with no open connection")
        self._nothing_received = False
        if not data:
            self._eof = True
        if self._tls is not None:
            self._tls.receive_ciphertext(data)
        elif data:
            self._in.feed(data)

    def next_event(self) -> Event | NeedData:
        """The next event, or ``NEED_DATA``.

        Raises :class:`~pgproto.ConnectError` once no connection can be made,
        and, after CONNECTION_OK, the error that broke the connection.
        """
        while True:
            if self._events:
                return self._events.popleft()
            if self._error is not None:
                raise self._error
            if self._awaiting is not None or self._status is _S_BAD:
                return NEED_DATA
            try:
                progressed = self._step()
            except _Failure as failure:
                self._attempt_failed(failure.error, failure.outcome)
                continue
            except Error as exc:
                self._attempt_failed(exc, _HARD)
                continue
            if not progressed and not self._events:
                return NEED_DATA

    # Answers to commands.

    def addresses_resolved(self, addresses: Sequence[str]) -> None:
        """Answer to :class:`ResolveHost`: the numeric addresses, in resolver order."""
        self._answer("resolve")
        assert self._host is not None
        port = self._host.port
        found = [Address(kind="tcp", address=a, port=port) for a in addresses]
        if not found:
            self._attempt_failed(
                TransportError(f'could not translate host name "{self._host.host}" to address'),
                _NEXT_HOST,
            )
            return
        self._start_addresses(found)

    def resolve_failed(self, message: str) -> None:
        """Answer to :class:`ResolveHost`: the name could not be resolved."""
        self._answer("resolve")
        assert self._host is not None
        self._attempt_failed(
            TransportError(
                f'could not translate host name "{self._host.host}" to address: {message}'
            ),
            _NEXT_HOST,
        )

    def connection_made(self, *, peer_uid: int | None = None) -> None:
        """Answer to :class:`OpenConnection`: the transport is connected.

        *peer_uid* is the server process's user id when the command asked for
        ``peer_credentials`` (None: the platform cannot tell).
        """
        self._answer("connect")
        self._transport_open = True
        self._set(_I_TRANSPORT_READY)
        required = self._option("requirepeer")
        if required and self._address is not None and self._address.kind == "unix":
            error = _check_peer(required, peer_uid)
            if error is not None:
                self._attempt_failed(error, _HARD)

    def connection_failed(self, error: OSError | str) -> None:
        """Answer to :class:`OpenConnection`: the transport could not be opened."""
        self._answer("connect")
        if isinstance(error, OSError):
            text = error.strerror or str(error)
            errno = error.errno
        else:
            text, errno = error, None
        assert self._address is not None
        if self._address.kind == "unix":
            hint = "Is the server running locally and accepting connections on that socket?"
        else:
            hint = "Is the server running on that host and accepting TCP/IP connections?"
        self._attempt_failed(TransportError(f"{text}\n\t{hint}", errno=errno), _NEXT_ADDR)

    def deadline_expired(self) -> None:
        """The caller's overall deadline passed: fail the current attempt
        with "timeout expired" and give up (no further hosts are tried)."""
        if self._status in (_S_OK, _S_BAD):
            return
        self._awaiting = None
        self._attempt_failed(TransportError("timeout expired (overall deadline)"), _HARD)

    def reset(self) -> None:
        """libpq's PQreset: close the connection (Terminate if it is healthy)
        and start again from the first host, with the same parameters and the
        same host order.  Pump the machine as after construction."""
        self.close()
        self._error = None
        self._attempts = []
        self._host_index = -1
        self._host = None
        self._addresses = ()
        self._addr_index = 0
        self._address = None
        self._second_pass = False
        self._reset_server_state()
        self._set(_I_RESET)

    def timer_expired(self) -> None:
        """The per-address deadline of the last :class:`StartTimer` passed."""
        if self._status in (_S_OK, _S_BAD):
            return
        resolving = self._awaiting == "resolve"
        self._awaiting = None
        self._attempt_failed(
            TransportError("timeout expired"), _NEXT_HOST if resolving else _NEXT_ADDR
        )

    # Use of an established connection.

    def send_query(self, sql: str) -> None:
        """Queue a simple query (only on an idle CONNECTION_OK connection)."""
        if self._status is not _S_OK or self._query_active:
            # Refused, and nothing else changes (PQsendQuery's rule): the
            # connection attempt or the running query carries on.
            raise LocalProtocolError(
                "a query can only be sent on an idle connection "
                f"(status {self._status.name}, query in progress: {self._query_active})"
            )
        self._write(_wire.query(sql))
        self._query_active = True

    def close(self) -> None:
        """Close the connection: Terminate if it is healthy, then a
        :class:`CloseConnection` command.  Idempotent."""
        if self._status is _S_OK:
            self._write(_wire.terminate())
            if self._tls is not None:
                self._tls.close()
                self._out += self._tls.ciphertext_to_send()
            self._set(_I_CLOSED)
        else:
            # Abandoning a connection that is not established: what is queued
            # (perhaps a password) is dropped, as PQfinish drops it.
            self._out.clear()
            if self._status is not _S_BAD:
                self._set(_I_FAILED)
        if self._transport_open:
            self._events.append(CloseConnection(data=self.data_to_send()))
            self._transport_open = False
        self._awaiting = None

    # ----------------------------------------------------------------------
    # internals: bookkeeping

    def _misuse(self, message: str) -> LocalProtocolError:
        error = LocalProtocolError(message)
        self._poison(error)
        return error

    def _poison(self, error: Error) -> None:
        if self._status is not _S_BAD:
            self._set(_I_FAILED)
        if self._error is None:
            self._error = error
        self._awaiting = None
        self._close_transport()

    def _answer(self, what: str) -> None:
        if self._awaiting != what:
            expected = self._awaiting or "nothing"
            raise self._misuse(f"unexpected answer to a {what} command (waiting for {expected})")
        self._awaiting = None

    def _set(self, event: Input) -> None:
        try:  # (the table's lookup, without a call per status change)
            self._status = TRANSITIONS[self._status, event]
        except KeyError:
            transition(self._status, event)  # raises: a pair missing from the table is a bug
            raise
        if self._reports:
            self._events.append(StatusChanged(status=self._status))

    def _write(self, data: bytes) -> None:
        if self._tls is not None and self._tls_done:
            self._tls.send(data)
            self._out += self._tls.ciphertext_to_send()
        else:
            self._out += data

    def _reset_server_state(self) -> None:
        """Forget everything the last server said (pqDropServerData)."""
        self.__dict__.update(_SERVER_STATE_DEFAULTS)  # the immutable values, in one go
        self._in = _wire.ReceiveBuffer(_auth_limit)
        self._server_params = {}
        self._pversion = self.params.max_protocol_version
        self._check_rows = []
        self._checked = {}

    def _close_transport(self) -> None:
        if self._transport_open:
            self._out.clear()
            self._events.append(CloseConnection())
            self._transport_open = False

    def _current_attempt(self, error: BaseException) -> Attempt:
        host = self._host
        address = self._address
        return Attempt(
            host=(host.host if host is not None else None),
            address=(address.address if address is not None else (host.hostaddr if host else None)),
            port=(host.port if host is not None else None),
            step=self._step_names.get(self._status, self._status.name),
            encryption=(
                "none" if self._status is _S_NEEDED else SSL if self._method == SSL else PLAINTEXT
            ),
            error=error,
            auth_requested=self._auth_req_received,
        )

    def _attempt_failed(self, error: BaseException, outcome: str) -> None:
        """Record a failed attempt and move on as *outcome* says."""
        if self._status is _S_OK:
            # A broken established connection: no more attempts.
            self._close_transport()
            self._poison(error if isinstance(error, Error) else TransportError(str(error)))
            return
        attempt = self._current_attempt(error)
        self._attempts.append(attempt)
        if outcome == _FALLBACK:
            self._failed.add(self._method)
            following = self._next_method()
            outcome = _FALLBACK if following is not None else _HARD
        elif outcome == _NEXT_ADDR and self._addr_index + 1 >= len(self._addresses):
            outcome = _NEXT_HOST
        if outcome == _NEXT_HOST and not self._hosts_left():
            outcome = _HARD
        if self._reports:
            self._events.append(AttemptFailed(attempt=attempt, next=outcome))
        self._close_transport()
        if outcome == _HARD:
            self._give_up()
            return
        self._set(_I_RETRY)
        if outcome == _FALLBACK:
            self._open(new_address=False)
        elif outcome == _RETRY:
            self._open(new_address=False, reset_methods=False)
        elif outcome == _NEXT_ADDR:
            self._addr_index += 1
            if self._addr_index < len(self._addresses):
                self._open(new_address=True)
            else:
                self._next_host()
        else:
            self._next_host()

    # ----------------------------------------------------------------------
    # hosts, addresses, methods

    def _next_host(self) -> None:
        """Move to the next host entry (CONNECTION_NEEDED with try_next_host)."""
        while True:
            self._host_index += 1
            if self._host_index >= len(self._hosts):
                if self._target == "prefer-standby" and not self._second_pass and self._hosts:
                    self._second_pass = True
                    self._host_index = 0
                else:
                    self._host_index = len(self._hosts)
                    self._give_up()
                    return
            host = self._hosts[self._host_index]
            self._host = host
            self._address = None
            if host.error:
                self._record_host_error(TransportError(host.error))
                continue
            if host.type is _NAME:
                assert host.host is not None
                if self.params.connect_timeout is not None:
                    # The name lookup gets the per-address budget too.
                    self._events.append(StartTimer(seconds=float(self.params.connect_timeout)))
                self._awaiting = "resolve"
                self._events.append(ResolveHost(host=host.host, port=host.port))
                return
            if host.type is _ADDRESS:
                assert host.hostaddr is not None
                try:
                    ipaddress.ip_address(host.hostaddr)
                except ValueError:
                    self._record_host_error(
                        TransportError(
                            f'could not parse network address "{host.hostaddr}": '
                            "Name or service not known"
                        )
                    )
                    continue
                self._start_addresses([Address(kind="tcp", address=host.hostaddr, port=host.port)])
                return
            memo = self.params._memo
            key = ("unix", host.host, host.port)
            address = memo.get(key)
            if address is None:
                assert host.host is not None
                path = f"{host.host}/.s.PGSQL.{host.port}"
                if len(path.encode("utf-8", "surrogateescape")) >= 108:  # sizeof(sun_path)
                    self._record_host_error(
                        TransportError(
                            f'Unix-domain socket path "{path}" is too long (maximum 107 bytes)'
                        )
                    )
                    continue
                address = Address(kind="unix", address=path, port=host.port)
                memo[key] = address  # (one per host: bounded)
            self._start_addresses([address])
            return

    def _give_up(self) -> None:
        """Nothing is left to try: FAILED, with every attempt in the error."""
        self._set(_I_FAILED)
        self._error = ConnectError(self._attempts)

    def _hosts_left(self) -> bool:
        """Is there another host to try after the current one?"""
        if self._host_index + 1 < len(self._hosts):
            return True
        return self._target == "prefer-standby" and not self._second_pass

    def _record_host_error(self, error: Error) -> None:
        attempt = self._current_attempt(error)
        self._attempts.append(attempt)
        following = _NEXT_HOST if self._hosts_left() else _HARD
        if self._reports:
            self._events.append(AttemptFailed(attempt=attempt, next=following))

    def _start_addresses(self, addresses: list[Address]) -> None:
        if self._load_balance:
            assert self._rng is not None
            _shuffle(addresses, self._rng)  # type: ignore[arg-type]
        self._addresses = addresses
        self._addr_index = 0
        self._open(new_address=True)

    def _next_method(self) -> str | None:
        for method in self._allowed:
            if method not in self._failed:
                return method
        return None

    def _open(self, *, new_address: bool, reset_methods: bool = True) -> None:
        """CONNECTION_NEEDED for the current address: choose the encryption
        method and ask the adapter for a transport."""
        address = self._addresses[self._addr_index]
        self._address = address
        if new_address:
            self._failed = set()
            self._send_appname = True
            if self.params.connect_timeout is not None:
                self._events.append(StartTimer(seconds=float(self.params.connect_timeout)))
        if reset_methods:
            # init_allowed_encryption_methods: Unix sockets are always plaintext.
            if address.kind == "unix" or self._sslmode == "disable":
                self._allowed = [PLAINTEXT]
            elif self._sslmode == "allow":
                self._allowed = [PLAINTEXT, SSL]
            elif self._sslmode == "prefer":
                self._allowed = [SSL, PLAINTEXT]
            else:
                self._allowed = [SSL]
            method = self._next_method()
            if method is None:  # cannot happen: _allowed is never empty
                raise LocalProtocolError("internal error: no encryption method left")
            self._method = method
        if not self._server_state_unused:  # (the first attempt's: __init__ reset it)
            self._reset_server_state()
        self._server_state_unused = False
        if self._reports:
            self._events.append(
                AttemptStarted(
                    host=self._host.host if self._host else None,
                    address=address,
                    encryption=self._method,
                    direct=self._method == SSL and self._direct,
                )
            )
        # The command depends on the parameters, the host and the address
        # alone (and is immutable): made once per ConnParams.
        memo = self.params._memo
        host = self._host.host if self._host else None
        key = ("open", host, address.kind, address.address, address.port)
        command = memo.get(key)
        if command is None:
            params = self.params
            command = OpenConnection(
                address=address,
                host=host,
                keepalives=params.keepalives,
                peer_credentials=address.kind == "unix" and bool(self._option("requirepeer")),
                keepalives_idle=params.keepalives_idle,
                keepalives_interval=params.keepalives_interval,
                keepalives_count=params.keepalives_count,
                tcp_user_timeout=params.tcp_user_timeout,
            )
            if len(memo) < _MEMO_LIMIT:  # (name lookups may keep finding new addresses)
                memo[key] = command
        self._events.append(command)
        self._set(_I_OPEN_REQUESTED)
        self._awaiting = "connect"

    # ----------------------------------------------------------------------
    # the work of each state

    def _step(self) -> bool:
        """Advance as far as the input allows.  True when a further step
        may do more now; False when the machine waits for input, or for
        what it just queued to be sent (nothing can answer it before)."""
        status = self._status
        if status is _S_AWAITING_RESPONSE:
            return self._awaiting_step()
        if status is _S_AUTH_OK:
            return self._startup_burst()
        if status is _S_NEEDED:
            self._next_host()
            return True
        if status is _S_MADE:
            return self._made()
        if status is _S_SSL_STARTUP:
            return self._ssl_startup()
        if status is _S_CHECK_TARGET:
            self._check_target()
            return True
        message = self._next_message()
        if message is None:
            return False
        if status is _S_OK:
            self._ready_message(message)
        elif status in (_S_CHECK_WRITABLE, _S_CHECK_STANDBY, _S_CONSUME):
            self._check_message(message)
        else:  # pragma: no cover - STARTED waits for connection_made()
            raise LocalProtocolError(f"internal error: no work defined for {status.name}")
        return True

    def _awaiting_step(self) -> bool:
        """AWAITING_RESPONSE: the server's authentication requests, and the
        startup burst that usually arrives with AuthenticationOk."""
        if self._nothing_received:
            # The step right after the startup packet was queued, on a
            # plaintext connection: nothing can be buffered yet.
            return False
        if self._tls is not None:
            self._pull_tls()
        buffer = self._in
        if buffer.take_exact(_wire.AUTHENTICATION_OK):
            # The usual first reply, known byte for byte: handled as
            # framing and parsing it would have it handled.
            self._auth_req_received = True
            self._authenticate(_AUTH_OK, b"")
        else:
            message = self._buffered_message()
            if message is None:
                return False
            self._awaiting_response(message)
            if self._status is not _S_AUTH_OK:
                return True
        return self._take_startup_burst()  # (TLS pulled above)

    def _startup_burst(self) -> bool:
        """AUTH_OK: see :meth:`_take_startup_burst`."""
        if self._tls is not None:
            self._pull_tls()
        return self._take_startup_burst()

    def _take_startup_burst(self) -> bool:
        """What the server sends after AuthenticationOk, all at once
        (ParameterStatus -- taken in bulk --, BackendKeyData, ...,
        ReadyForQuery), then the target_session_attrs check, in one step;
        from what the receive buffer holds (TLS already pulled)."""
        buffer, progressed = self._in, False
        while True:
            pairs = buffer.take_parameter_statuses()
            if pairs:
                progressed = True
                self._server_params.update(pairs)
                if self._reports:
                    self._events.extend(ParameterStatus(name=n, value=v) for n, v in pairs)
            ending = buffer.take_key_data_and_ready()
            if ending is not None:  # the usual end of the burst, taken whole
                self._key_data(ending[0], ending[1])
                self._startup_ready(ending[2])
                break
            message = self._buffered_message()
            if message is None:
                return progressed
            self._auth_ok_message(message)
            if self._status is not _S_AUTH_OK:
                break
        if self._status is _S_CHECK_TARGET:
            self._check_target()
        return bool(self._in) or self._eof  # anything after ReadyForQuery

    def _next_message(self) -> _wire.Message | None:
        """The next message; None until more input arrives (at the end of
        the stream, a failure: what is buffered can never be completed)."""
        if self._tls is not None:
            self._pull_tls()
        return self._buffered_message()

    def _buffered_message(self) -> _wire.Message | None:
        """As :meth:`_next_message`, from what the receive buffer holds
        (TLS already pulled)."""
        message = self._in.next_message()
        if message is None and self._eof:
            raise _Failure(TransportError(_EOF_MESSAGE), _HARD)
        return message

    def _pull_tls(self) -> None:
        """Move what TLS can decrypt now into the receive buffer; a
        close_notify is the end of the stream."""
        tls = self._tls
        assert tls is not None
        plaintext = tls.receive()
        if plaintext:
            self._in.feed(plaintext)
        if tls.eof:
            self._eof = True

    # MADE: send SSLRequest, begin direct TLS, or send the startup packet.

    def _made(self) -> bool:
        if self._method == SSL and not self._tls_done:
            if self._direct:
                self._start_tls()
                self._set(_I_SSL_REQUEST_SENT)
                self._handshake()
            else:
                self._out += _wire.ssl_request()
                self._set(_I_SSL_REQUEST_SENT)
            return False  # nothing can come back before this is sent
        # The receive buffer frames with _auth_limit until AuthenticationOk
        # (_reset_server_state made it so).
        # The packet depends on the parameters alone (and on these two):
        # built once per ConnParams, which resolve_params caches.
        memo = self.params._memo
        key = ("startup", self._send_appname, self._pversion)
        packet = memo.get(key)
        if packet is None:
            packet = memo[key] = _wire.startup_message(self._startup_parameters(), key[2])
        self._write(packet)
        self._set(_I_STARTUP_SENT)
        return False  # nothing can come back before this is sent

    def _startup_parameters(self) -> list[tuple[str, str]]:
        option = self._option
        pairs = [("user", option("user") or ""), ("database", option("dbname") or "")]
        for keyword in ("replication", "options"):
            value = option(keyword)
            if value:
                pairs.append((keyword, value))
        if self._send_appname:
            appname = option("application_name")
            if appname is None:
                appname = option("fallback_application_name")
            if appname:
                pairs.append(("application_name", appname))
        encoding = option("client_encoding")
        if encoding:
            pairs.append(("client_encoding", encoding))
        environ = self.params.env.environ
        for variable, name in _ENV_STARTUP:
            value = environ.get(variable)
            if value is not None and value.lower() != "default":
                pairs.append((name, value))
        return pairs

    # SSL_STARTUP: the reply to SSLRequest, then the handshake.

    def _start_tls(self) -> None:
        assert self._host is not None
        try:
            settings = TLSSettings.from_params(
                self.params,
                self._host,
                home=self.params.env.home,
                key_passphrase_hook=self._key_passphrase_hook,
            )
            info = create_context(settings)
            self._tls = TLSEngine(info, settings)
        except TLSError as exc:
            raise _Failure(exc, _FALLBACK) from None
        self._tls_info = info

    def _ssl_startup(self) -> bool:
        if self._tls is None:
            reply = self._in.take_byte()
            if reply is None:
                if self._eof:
                    raise _Failure(TransportError(_EOF_MESSAGE), _FALLBACK)
                return False
            if reply == b"S":
                if self._in:
                    # CVE-2021-23222: nothing may ride in plaintext behind "S".
                    raise _Failure(
                        RemoteProtocolError("received unencrypted data after SSL response"), _HARD
                    )
                self._start_tls()
                return self._handshake() or True
            if reply == b"N":
                self._failed.add(SSL)
                following = self._next_method()
                if following is None:
                    raise _Failure(
                        TLSError("server does not support SSL, but SSL was required"), _HARD
                    )
                self._method = following
                self._set(_I_SSL_REFUSED)
                return True
            if reply == b"E":
                # CVE-2024-10977: the server's text is not read, let alone shown.
                raise _Failure(
                    RemoteProtocolError("server sent an error response during SSL exchange"), _HARD
                )
            raise _Failure(
                RemoteProtocolError(
                    f"received invalid response to SSL negotiation: {reply.decode('latin-1')}"
                ),
                _HARD,
            )
        return self._handshake()

    def _handshake(self) -> bool:
        tls = self._tls
        assert tls is not None
        try:
            done = tls.do_handshake()
        except TLSError as exc:
            self._out += tls.ciphertext_to_send()
            raise _Failure(exc, _FALLBACK) from None
        self._out += tls.ciphertext_to_send()
        if not done:
            return False
        self._tls_done = True
        info = self._tls_info
        assert info is not None
        if self._reports:
            self._events.append(
                TLSEstablished(
                    version=tls.version,
                    cipher=tls.cipher,
                    alpn=tls.alpn,
                    chain_verified=tls.verified_chain,
                    host_verified=tls.host_verified,
                    root=info.root_source,
                    client_certificate=info.client_cert,
                    direct=self._direct,
                )
            )
        self._set(_I_TLS_ESTABLISHED)
        return True

    # AWAITING_RESPONSE: authentication.

    def _awaiting_response(self, message: _wire.Message) -> None:
        kind = message.type
        if kind == b"R":
            if len(message.body) < 4:
                raise RemoteProtocolError("received invalid authentication request")
            code, payload = _wire.parse_authentication(message.body)
            self._auth_req_received = True
            self._authenticate(code, payload)
        elif kind == b"E":
            error = ServerError(_wire.parse_fields(message.body))
            if error.sqlstate == SQLSTATE_CANNOT_CONNECT_NOW:
                raise _Failure(error, _NEXT_HOST)
            source = self._host.password_source if self._host is not None else None
            if (
                error.sqlstate == _SQLSTATE_INVALID_PASSWORD
                and self._password_used
                and source is not None
                and source.kind is SourceKind.PASSWORD_FILE
            ):
                # pgpassfileWarning: say where the rejected password came from.
                error.add_note(f'password retrieved from file "{source.path}"')
            raise _Failure(error, _FALLBACK)
        elif kind == b"v":
            if self._negotiated:
                raise RemoteProtocolError("received duplicate protocol negotiation message")
            self._negotiate(message.body)
        else:  # pragma: no cover - _auth_limit refuses other types while framing
            raise RemoteProtocolError(
                "expected authentication request from server, but received "
                f"{kind.decode('latin-1')!r}"
            )

    def _negotiate(self, body: bytes) -> None:
        newest, options = _wire.parse_negotiate_protocol_version(body)
        version = (newest >> 16, newest & 0xFFFF)
        prefix = "received invalid protocol negotiation message: "
        if version > self._pversion:
            raise RemoteProtocolError(
                prefix + "server requested downgrade to a higher-numbered version"
            )
        if version < (3, 0):
            raise RemoteProtocolError(
                prefix + "server requested downgrade to pre-3.0 protocol version"
            )
        if version == (3, 1):
            raise RemoteProtocolError(
                prefix + "server requested downgrade to non-existent 3.1 protocol version"
            )
        if version == self._pversion and not options:
            raise RemoteProtocolError(prefix + "server negotiated but asks for no changes")
        low = self.params.min_protocol_version
        if version < low:
            raise RemoteProtocolError(
                f"server only supports protocol version {version[0]}.{version[1]}, but "
                f'"min_protocol_version" was set to {low[0]}.{low[1]}'
            )
        for option in options:
            if not option.startswith("_pq_."):
                raise RemoteProtocolError(
                    prefix + "server reported unsupported parameter name without a "
                    f'"_pq_." prefix ("{option}")'
                )
            raise RemoteProtocolError(
                prefix
                + f'server reported an unsupported parameter that was not requested ("{option}")'
            )
        self._negotiated = True
        self._pversion = version
        if self._reports:
            self._events.append(NegotiateProtocolVersion(version=version, unsupported_options=()))

    def _require_auth_failure(self, reason: str) -> AuthenticationError:
        return AuthenticationError(
            f'authentication method requirement "{self.params["require_auth"]}" failed: {reason}'
        )

    def _check_expected(self, code: int) -> None:
        """check_expected_areq: may the server ask for this now?"""
        required = self.params.require_auth
        if code == _AUTH_OK:
            if self._option("sslcertmode") == "require":
                tls = self._tls if self._tls_done else None
                if tls is None or not tls.client_cert_requested:
                    raise AuthenticationError("server did not request an SSL certificate")
                if not tls.client_cert_sent:
                    raise AuthenticationError(
                        "server accepted connection without a valid SSL certificate"
                    )
            if required is not None and required.auth_required and not self._client_finished_auth:
                raise self._require_auth_failure("server did not complete authentication")
            if self._channel_binding == "require" and not (
                self._scram is not None and self._scram.channel_bound
            ):
                raise AuthenticationError(
                    "channel binding required, but server authenticated client without "
                    "channel binding"
                )
            if self._scram is not None and not self._scram.finished:
                # Stricter than libpq: a started SCRAM exchange must finish.
                raise AuthenticationError(
                    "server sent AuthenticationOk before completing the SCRAM exchange "
                    "(it did not prove that it knows the password)"
                )
            return
        if required is not None:
            if code not in _REQUIRE_AUTH_REASONS:
                raise self._require_auth_failure("server requested an unknown authentication type")
            if code not in required.requests:
                raise self._require_auth_failure(_REQUIRE_AUTH_REASONS[code])
        if self._channel_binding == "require" and code not in (
            _AUTH_SASL,
            _AUTH_SASL_CONT,
            _AUTH_SASL_FIN,
        ):
            raise AuthenticationError(
                "channel binding required but not supported by server's authentication request"
            )

    def _password(self) -> str:
        self._password_needed = True
        assert self._host is not None
        password = self._host.password
        if not password:
            raise AuthenticationError("fe_sendauth: no password supplied")
        self._password_used = True
        return password

    def _authenticate(self, code: int, payload: bytes) -> None:
        self._check_expected(code)
        if code == _AUTH_OK:
            self._auth_ok = True
            scram = self._scram
            if self._reports:
                self._events.append(
                    AuthenticationCompleted(
                        method=self._auth_used,
                        channel_binding=scram is not None and scram.channel_bound,
                        server_verified=scram is not None and scram.finished,
                    )
                )
            self._in.set_limit(_ordinary_limit)
            self._set(_I_AUTHENTICATION_OK)
            return
        if code == _AUTH_CLEARTEXT:
            if self._reports:
                self._events.append(AuthenticationRequested(method="password"))
            password = self._password()
            self._write(_wire.password_message(password.encode("utf-8", "surrogateescape")))
            self._auth_used = "password"
            self._client_finished_auth = True
        elif code == _AUTH_MD5:
            if self._reports:
                self._events.append(AuthenticationRequested(method="md5"))
            if len(payload) != 4:
                raise RemoteProtocolError("received invalid authentication request")
            password = self._password()
            user = self.params["user"] or ""
            self._write(_wire.password_message(md5_response(user, password, payload)))
            self._auth_used = "md5"
            self._client_finished_auth = True
        elif code == _AUTH_SASL:
            self._sasl_start(payload)
        elif code in (_AUTH_SASL_CONT, _AUTH_SASL_FIN):
            self._sasl_continue(code, payload)
        elif code in _UNSUPPORTED_AUTH:
            raise AuthenticationError(_UNSUPPORTED_AUTH[code])
        else:
            raise AuthenticationError(f"authentication method {code} not supported")

    def _sasl_start(self, payload: bytes) -> None:
        tls = self._tls if self._tls_done else None
        if self._channel_binding == "require" and tls is None:
            raise AuthenticationError("channel binding required, but SSL not in use")
        if self._scram is not None:
            raise AuthenticationError("duplicate SASL authentication request")
        try:
            mechanisms = _wire.parse_sasl_mechanisms(payload)
        except RemoteProtocolError:
            raise RemoteProtocolError(
                "fe_sendauth: invalid authentication request from server: "
                "invalid list of authentication mechanisms"
            ) from None
        selected: str | None = None
        for mechanism in mechanisms:
            if mechanism == SCRAM_SHA_256_PLUS:
                if tls is None:
                    # Someone between us and the server may have stripped TLS.
                    raise AuthenticationError(
                        "server offered SCRAM-SHA-256-PLUS authentication over a non-SSL connection"
                    )
                if self._channel_binding != "disable":
                    selected = mechanism
            elif mechanism == SCRAM_SHA_256 and selected is None:
                selected = mechanism
        if self._reports:
            self._events.append(
                AuthenticationRequested(
                    method="sasl", mechanisms=tuple(mechanisms), mechanism=selected
                )
            )
        if selected is None:
            raise AuthenticationError(
                "none of the server's SASL authentication mechanisms are supported"
            )
        required = self.params.require_auth
        if required is not None and SCRAM_SHA_256 not in required.sasl_mechanisms:
            raise self._require_auth_failure(f"server requested {selected} authentication")
        if self._channel_binding == "require" and selected != SCRAM_SHA_256_PLUS:
            raise AuthenticationError(
                "channel binding is required, but server did not offer an authentication "
                "method that supports channel binding"
            )
        client_key = self.params.scram_client_key
        password = None if client_key is not None else self._password()
        if selected == SCRAM_SHA_256_PLUS:
            assert tls is not None
            flag, cb_data = "p", tls.channel_binding_data()
        elif tls is not None and self._channel_binding != "disable":
            flag, cb_data = "y", None
        else:
            flag, cb_data = "n", None
        scram = ScramClient(
            mechanism=selected,
            password=password,
            nonce_bytes=self._random_bytes(NONCE_LENGTH),
            channel_binding=flag,
            cb_data=cb_data,
            client_key=client_key,
            server_key=self.params.scram_server_key,
            max_iterations=self._max_scram_iterations,
            cache=self._scram_cache,
        )
        self._scram = scram
        self._auth_used = selected
        self._write(_wire.sasl_initial_response(selected, scram.initial_response()))

    def _sasl_continue(self, code: int, payload: bytes) -> None:
        scram = self._scram
        if scram is None:
            raise RemoteProtocolError(
                "fe_sendauth: invalid authentication request from server: "
                "AUTH_REQ_SASL_CONT without AUTH_REQ_SASL"
            )
        if scram.awaiting_challenge:
            if code == _AUTH_SASL_FIN:
                raise RemoteProtocolError(
                    "AuthenticationSASLFinal received from server, but SASL authentication "
                    "was not completed"
                )
            self._write(_wire.sasl_response(scram.handle_challenge(payload)))
            return
        scram.handle_final(payload)
        self._client_finished_auth = True

    # AUTH_OK: ParameterStatus, BackendKeyData, ... until ReadyForQuery.

    def _common_message(self, message: _wire.Message) -> bool:
        """Messages that may come at any time after authentication."""
        kind = message.type
        if kind == b"S":
            name, value = _wire.parse_parameter_status(message.body)
            self._server_params[name] = value
            if self._reports:
                self._events.append(ParameterStatus(name=name, value=value))
        elif kind == b"N":
            self._events.append(NoticeResponse(fields=_wire.parse_fields(message.body)))
        elif kind == b"A":
            pid, channel, payload = _wire.parse_notification(message.body)
            self._events.append(NotificationResponse(pid=pid, channel=channel, payload=payload))
        else:
            return False
        return True

    def _auth_ok_message(self, message: _wire.Message) -> None:
        kind = message.type
        if kind == b"K":
            self._key_data(*_wire.parse_backend_key_data(message.body, self._pversion))
        elif kind == b"Z":
            self._startup_ready(_wire.parse_ready_for_query(message.body))
        elif kind == b"E":
            error = ServerError(_wire.parse_fields(message.body))
            if (
                error.sqlstate == _SQLSTATE_UNDEFINED_OBJECT
                and self._send_appname
                and (self.params["application_name"] or self.params["fallback_application_name"])
            ):
                # Servers before 9.0 reject application_name: retry without it.
                self._send_appname = False
                raise _Failure(error, _RETRY)
            raise _Failure(error, _HARD)
        elif self._common_message(message):
            return
        elif kind[0] in _RESULT_TYPES:
            raise RemoteProtocolError("unexpected message from server during startup")
        else:
            raise RemoteProtocolError(
                "unexpected response from server; first received character was "
                f'"{kind.decode("latin-1")}"'
            )

    def _key_data(self, pid: int, key: bytes) -> None:
        """BackendKeyData."""
        self._backend_pid, self._backend_key = pid, key
        if self._reports:
            self._events.append(BackendKeyData(pid=pid, key=key))

    def _startup_ready(self, status: str) -> None:
        """ReadyForQuery: the startup is done."""
        self._txn_status = status
        if self._reports:
            self._events.append(ReadyForQuery(status=status))
        self._set(_I_STARTUP_DONE)

    # CHECK_TARGET: target_session_attrs (reference spec §8.3).

    def _flag(self, name: str) -> bool | None:
        checked = self._checked.get(name)
        if checked is not None:
            return checked
        value = self._server_params.get(name)
        return None if value is None else value == "on"

    def _check_target(self) -> None:
        target = "any" if self._second_pass else self._target
        if target in ("read-write", "read-only"):
            read_only = self._flag("default_transaction_read_only")
            standby = self._flag("in_hot_standby")
            if read_only is None or standby is None:
                self._send_check("SHOW transaction_read_only", _I_CHECK_WRITABLE)
                return
            if target == "read-write" and (read_only or standby):
                self._reject_server("session is read-only")
                return
            if target == "read-only" and not (read_only or standby):
                self._reject_server("session is not read-only")
                return
        elif target in ("primary", "standby", "prefer-standby"):
            standby = self._flag("in_hot_standby")
            if standby is None and self._server_version() >= 90000:
                self._send_check("SELECT pg_catalog.pg_is_in_recovery()", _I_CHECK_STANDBY)
                return
            standby = bool(standby)
            if target == "primary" and standby:
                self._reject_server("server is in hot standby mode")
                return
            if target != "primary" and not standby:
                self._reject_server("server is not in hot standby mode")
                return
        assert self._host is not None
        assert self._address is not None
        if self._reports:
            self._events.append(
                Connected(
                    host=self._host.host,
                    address=self._address,
                    ssl_in_use=self.ssl_in_use,
                    protocol_version=self._pversion,
                )
            )
        self._set(_I_TARGET_ACCEPTED)

    def _server_version(self) -> int:
        """``server_version`` as libpq's PQserverVersion number (0 if unknown)."""
        text = self._server_params.get("server_version", "")
        parts: list[int] = []
        for piece in text.split(".")[:3]:
            digits = ""
            for char in piece:
                if not char.isdigit():
                    break
                digits += char
            if not digits:
                break
            parts.append(int(digits))
            if len(digits) != len(piece):
                break
        if not parts:
            return 0
        if len(parts) >= 3:
            return (100 * parts[0] + parts[1]) * 100 + parts[2]
        if len(parts) == 2:
            return (
                10000 * parts[0] + parts[1] if parts[0] >= 10 else (100 * parts[0] + parts[1]) * 100
            )
        return 10000 * parts[0]

    def _send_check(self, sql: str, event: Input) -> None:
        self._check_rows = []
        self._check_failed = False
        self._write(_wire.query(sql))
        self._set(event)

    def _reject_server(self, reason: str) -> None:
        self._write(_wire.terminate())
        data = self.data_to_send()
        self._attempts.append(self._current_attempt(Error(reason)))
        following = _NEXT_HOST if self._hosts_left() else _HARD
        if self._reports:
            self._events.append(AttemptFailed(attempt=self._attempts[-1], next=following))
        if self._transport_open:
            self._events.append(CloseConnection(data=data))
            self._transport_open = False
        self._set(_I_RETRY)
        self._next_host()

    def _check_message(self, message: _wire.Message) -> None:
        if self._common_message(message):
            return
        kind = message.type
        status = self._status
        if kind == b"T":
            return
        if kind == b"D":
            values = _wire.parse_data_row(message.body)
            self._check_rows.append(tuple(None if v is None else _wire.text(v) for v in values))
            return
        if kind == b"E":
            self._check_failed = True
            return
        if kind == b"C" and status is not _S_CONSUME:
            rows = self._check_rows
            if self._check_failed or len(rows) != 1 or len(rows[0]) != 1:
                self._check_failed = True
                return
            value = rows[0][0] or ""
            # libpq keeps check results in its own flags, not in the
            # server's parameters (PQparameterStatus never shows them).
            if status is _S_CHECK_WRITABLE:
                flag = value.startswith("on")
                self._checked["default_transaction_read_only"] = flag
                self._checked["in_hot_standby"] = flag
            else:
                self._checked["in_hot_standby"] = value.startswith("t")
            self._set(_I_CHECK_ANSWERED)
            return
        if kind == b"Z":
            self._txn_status = _wire.parse_ready_for_query(message.body)
            if status is _S_CONSUME:
                self._set(_I_CHECK_DRAINED)
                return
            what = (
                '"SHOW transaction_read_only" failed'
                if status is _S_CHECK_WRITABLE
                else '"SELECT pg_is_in_recovery()" failed'
            )
            self._reject_server(what)
            return
        raise RemoteProtocolError(
            f"unexpected response from server; first received character was "
            f'"{kind.decode("latin-1")}"'
        )

    # OK: results of simple queries, and asynchronous messages.

    def _ready_message(self, message: _wire.Message) -> None:
        if self._common_message(message):
            return
        kind = message.type
        if kind == b"E":
            self._events.append(ErrorResponse(error=ServerError(_wire.parse_fields(message.body))))
            return
        if not self._query_active:
            raise RemoteProtocolError(
                f"unexpected message {kind.decode('latin-1')!r} from server on an idle connection"
            )
        if kind == b"T":
            self._events.append(
                RowDescription(columns=tuple(_wire.parse_row_description(message.body)))
            )
        elif kind == b"D":
            values = _wire.parse_data_row(message.body)
            self._events.append(
                DataRow(values=tuple(None if v is None else _wire.text(v) for v in values))
            )
        elif kind == b"C":
            self._events.append(CommandComplete(tag=_wire.parse_command_complete(message.body)))
        elif kind == b"I":
            self._events.append(EmptyQueryResponse())
        elif kind == b"Z":
            self._txn_status = _wire.parse_ready_for_query(message.body)
            self._query_active = False
            self._events.append(ReadyForQuery(status=self._txn_status))
        elif kind == b"G":
            # COPY FROM STDIN is not supported by simple_query: refuse it.
            self._write(
                _wire.copy_fail("COPY FROM STDIN is not supported by pgproto's simple queries")
            )
        elif kind in (b"H", b"W", b"d", b"c"):
            pass  # COPY TO STDOUT data is discarded
        else:
            raise RemoteProtocolError(
                "unexpected response from server; first received character was "
                f'"{kind.decode("latin-1")}"'
            )
