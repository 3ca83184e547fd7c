"""What the connection machine tells its driver.

:meth:`ConnectionStateMachine.next_event` returns one of these at a time, or
:data:`NEED_DATA`.  There are two kinds:

* **Commands** ask the adapter to do transport work the core cannot do: look
  up a host name (:class:`ResolveHost`), open a connection
  (:class:`OpenConnection`), close it (:class:`CloseConnection`), start the
  per-address timer (:class:`StartTimer`).  The adapter must carry each one
  out and report back (``addresses_resolved``/``resolve_failed``,
  ``connection_made``/``connection_failed``, ``timer_expired``) before it asks
  for the next event.
* **Reports** say what happened: the state changed, TLS is up, the server
  asked for a password, a ParameterStatus arrived, an attempt failed, a query
  returned a row.  An adapter may ignore them (``pgproto connect --trace``
  prints them).

Every event is a frozen, slotted, keyword-only dataclass.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

from ._enums import ConnStatus
from ._errors import Attempt, ServerError

__all__ = [
    "NEED_DATA",
    "Address",
    "AttemptFailed",
    "AttemptStarted",
    "AuthenticationCompleted",
    "AuthenticationRequested",
    "BackendKeyData",
    "CloseConnection",
    "CommandComplete",
    "Connected",
    "DataRow",
    "EmptyQueryResponse",
    "ErrorResponse",
    "Event",
    "NeedData",
    "NegotiateProtocolVersion",
    "NoticeResponse",
    "NotificationResponse",
    "OpenConnection",
    "ParameterStatus",
    "ReadyForQuery",
    "ResolveHost",
    "RowDescription",
    "StartTimer",
    "StatusChanged",
    "TLSEstablished",
]


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event()`` when nothing more can happen until the driver
#: acts on ``poll()`` (send the pending bytes, or receive more).
NEED_DATA: Final = _NeedData.NEED_DATA
#: The type of :data:`NEED_DATA`, for annotations.
NeedData: TypeAlias = Literal[_NeedData.NEED_DATA]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base class of every event."""


# --------------------------------------------------------------------------
# addresses and commands


@dataclass(frozen=True, slots=True, kw_only=True)
class Address:
    """Where to connect: a TCP address or a Unix-domain socket.

    ``kind`` is ``"tcp"`` (``address`` is a numeric IPv4 or IPv6 address) or
    ``"unix"`` (``address`` is the socket path; a leading ``"@"`` names a
    Linux abstract socket).  ``port`` is the server port (part of the socket
    path for ``"unix"``).
    """

    kind: Literal["tcp", "unix"]
    address: str
    port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolveHost(Event):
    """Command: resolve *host* (a DNS name) for TCP port *port*.

    Answer with ``addresses_resolved([...numeric addresses in resolver
    order...])`` or ``resolve_failed(message)``.
    """

    host: str
    port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StartTimer(Event):
    """Command: (re)start the per-address deadline of *seconds*.

    When it expires before the machine is OK or FAILED, call
    ``timer_expired()``.  A new StartTimer replaces the previous one; a
    :class:`Connected` event or failure ends it.
    """

    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenConnection(Event):
    """Command: open a transport connection to *address*.

    ``host`` is the host name the attempt belongs to (for messages; the
    adapter never resolves it again).  ``keepalives`` and friends are the TCP
    socket options to apply.  Answer with ``connection_made()`` or
    ``connection_failed(error)``.  With ``peer_credentials`` (a Unix socket
    and ``requirepeer`` set), pass the server process's user id, read from the
    connected socket, as ``connection_made(peer_uid=...)`` (None when the
    platform cannot tell).
    """

    address: Address
    host: str | None
    keepalives: bool
    keepalives_idle: int | None
    keepalives_interval: int | None
    keepalives_count: int | None
    tcp_user_timeout: int | None
    peer_credentials: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseConnection(Event):
    """Command: send *data* (may be empty), then close the transport."""

    data: bytes = b""


# --------------------------------------------------------------------------
# reports: connection progress


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusChanged(Event):
    """The machine moved to *status* (libpq's ``CONNECTION_*`` step)."""

    status: ConnStatus


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptStarted(Event):
    """A new transport connection is about to be opened.

    ``encryption`` is the method this attempt tries first: ``"ssl"`` or
    ``"plaintext"``; ``direct`` tells whether TLS starts without SSLRequest.
    """

    host: str | None
    address: Address
    encryption: str
    direct: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptFailed(Event):
    """An attempt failed; ``next`` says what the machine does about it:
    ``"fallback"`` (same address, next encryption method), ``"next address"``,
    ``"next host"``, ``"retry"`` (same address, adjusted startup packet) or
    ``"give up"``."""

    attempt: Attempt
    next: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSEstablished(Event):
    """The TLS handshake completed and the certificate checks passed."""

    version: str | None
    cipher: str | None
    alpn: str | None
    chain_verified: bool
    host_verified: bool
    root: str | None
    client_certificate: str | None
    direct: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthenticationRequested(Event):
    """The server asked for authentication: ``method`` is ``"password"``,
    ``"md5"`` or ``"sasl"`` (``mechanisms`` lists what it offered, and
    ``mechanism`` what pgproto chose)."""

    method: str
    mechanisms: tuple[str, ...] = ()
    mechanism: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthenticationCompleted(Event):
    """AuthenticationOk was accepted.

    ``method`` is what was used: ``"none"`` (the server asked for nothing),
    ``"password"``, ``"md5"``, ``"SCRAM-SHA-256"`` or ``"SCRAM-SHA-256-PLUS"``;
    ``channel_binding`` is True when a -PLUS exchange completed;
    ``server_verified`` when the server proved it knows the password (SCRAM).
    """

    method: str
    channel_binding: bool
    server_verified: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class NegotiateProtocolVersion(Event):
    """The server offered an older protocol version; pgproto accepted it."""

    version: tuple[int, int]
    unsupported_options: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ParameterStatus(Event):
    name: str
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendKeyData(Event):
    """The key for cancel requests (repr hides the secret key)."""

    pid: int
    key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class NoticeResponse(Event):
    fields: dict[str, str]

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def severity(self) -> str:
        return self.fields.get("V") or self.fields.get("S", "")


@dataclass(frozen=True, slots=True, kw_only=True)
class NotificationResponse(Event):
    pid: int
    channel: str
    payload: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadyForQuery(Event):
    """``status`` is the transaction status: ``"I"``, ``"T"`` or ``"E"``."""

    status: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Connected(Event):
    """The connection is ready (``CONNECTION_OK``)."""

    host: str | None
    address: Address
    ssl_in_use: bool
    protocol_version: tuple[int, int]


# --------------------------------------------------------------------------
# reports: simple queries


@dataclass(frozen=True, slots=True, kw_only=True)
class RowDescription(Event):
    columns: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DataRow(Event):
    """One row, every value text (decoded as UTF-8) or None for NULL."""

    values: tuple[str | None, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandComplete(Event):
    tag: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EmptyQueryResponse(Event):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorResponse(Event):
    """The server reported an error for a query (the connection stays
    usable; ReadyForQuery follows)."""

    error: ServerError
