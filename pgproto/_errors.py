"""The exceptions and warnings pgproto raises.

Every exception derives from :class:`Error`.  They are split by whose fault
the problem is, in the manner of h11:

* :class:`ConninfoError` -- what the user wrote (a connection string, a keyword
  argument, an environment variable, a service file) is not acceptable.  It is
  raised before any network activity, as libpq's option errors are.
* :class:`LocalProtocolError` -- the caller used the protocol machinery
  wrongly (a method called in the wrong state, a value the protocol cannot
  carry).
* :class:`RemoteProtocolError` -- the server sent something malformed, out of
  order, or forbidden at that point.
* :class:`TLSError` -- the TLS layer could not be set up or the handshake or
  certificate checks failed (``__cause__`` is the :class:`ssl.SSLError`, when
  there is one).
* :class:`AuthenticationError` -- the client refused to go on with what the
  server asked for (``require_auth``, ``channel_binding``, no password
  supplied, a SCRAM server signature that does not verify).
* :class:`ServerError` -- the server sent an ErrorResponse; it carries the
  SQLSTATE and every field.
* :class:`ConnectError` -- no connection could be made; it carries one
  :class:`Attempt` record per attempt, each with the error that ended it.

Messages never contain a password: the parsers mask secrets before they build
a message, and :class:`Error` itself offers no way to attach raw input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ._enums import Ping

__all__ = [
    "Attempt",
    "AuthenticationError",
    "ConnectError",
    "ConnectionClosed",
    "ConninfoError",
    "Error",
    "LocalProtocolError",
    "PasswordFileWarning",
    "PgprotoWarning",
    "ProtocolError",
    "RemoteProtocolError",
    "ServerError",
    "TLSError",
    "TransportError",
    "ping_outcome",
]


class Error(Exception):
    """Base class of every exception raised by pgproto."""


class ConninfoError(Error, ValueError):
    """A connection string, keyword argument or option value is invalid.

    ``str(exc)`` is libpq's message for the same fault (its gist, with secrets
    masked).  When the fault is tied to one option, :attr:`keyword` names it;
    :attr:`source` says where the offending value came from, when known.
    """

    def __init__(
        self, message: str, *, keyword: str | None = None, source: object | None = None
    ) -> None:
        super().__init__(message)
        self.keyword = keyword
        self.source = source

    @property
    def message(self) -> str:
        return str(self.args[0])


class ProtocolError(Error):
    """Base class of protocol faults, local or remote."""


class LocalProtocolError(ProtocolError):
    """The caller misused the protocol machinery."""


class ConnectionClosed(LocalProtocolError):
    """The connection was closed (by this process): raised by an operation on
    a closed connection, and in a task or thread that was waiting on the
    connection when another one closed it."""


class RemoteProtocolError(ProtocolError):
    """The server broke the protocol."""


class TLSError(Error):
    """TLS could not be set up, or the handshake or a certificate check failed."""


class AuthenticationError(Error):
    """The client refused the server's authentication, or could not answer it."""


class TransportError(Error):
    """The transport (socket, name resolution) failed; reported by an adapter.

    ``errno`` is the OS error number when there is one.
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


#: ErrorResponse/NoticeResponse field codes and their names.
FIELD_NAMES: dict[str, str] = {
    "S": "severity_localized",
    "V": "severity",
    "C": "sqlstate",
    "M": "message",
    "D": "detail",
    "H": "hint",
    "P": "position",
    "p": "internal_position",
    "q": "internal_query",
    "W": "context",
    "s": "schema_name",
    "t": "table_name",
    "c": "column_name",
    "d": "datatype_name",
    "n": "constraint_name",
    "F": "source_file",
    "L": "source_line",
    "R": "source_function",
}


class ServerError(Error):
    """The server answered with an ErrorResponse.

    :attr:`fields` maps the one-letter field codes to their values;
    :attr:`sqlstate`, :attr:`severity`, :attr:`message_text`, :attr:`detail`
    and :attr:`hint` are the common ones.
    """

    def __init__(self, fields: Mapping[str, str]) -> None:
        self.fields: dict[str, str] = dict(fields)
        severity = self.fields.get("S") or self.fields.get("V") or "ERROR"
        super().__init__(f"{severity}:  {self.fields.get('M', '(no message)')}")

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")

    @property
    def severity(self) -> str | None:
        return self.fields.get("V") or self.fields.get("S")

    @property
    def message_text(self) -> str:
        return self.fields.get("M", "")

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """One connection attempt that failed: where, at which step, and why.

    ``host`` is the host name as given (None when only hostaddr was), ``address``
    the address dialled (an IP address or a socket path), ``step`` the
    ``CONNECTION_*`` step that failed, in libpq's words, ``encryption`` what was
    in use or being set up ("ssl", "plaintext"; "none" before a connection
    was opened), ``error`` the exception,
    ``auth_requested`` whether the server had asked for authentication (so it
    was up and accepting connections: :func:`ping_outcome` uses it).
    """

    host: str | None
    address: str | None
    port: int | None
    step: str
    encryption: str
    error: BaseException
    auth_requested: bool = False

    @property
    def sqlstate(self) -> str | None:
        return self.error.sqlstate if isinstance(self.error, ServerError) else None

    def describe(self) -> str:
        """libpq's shape: ``connection to server at "h" (a), port p failed: ...``."""
        if self.host and self.host.startswith(("/", "@")):
            where = f'connection to server on socket "{self.address}"'
        elif self.host and self.address and self.host != self.address:
            where = f'connection to server at "{self.host}" ({self.address}), port {self.port}'
        else:
            where = f'connection to server at "{self.host or self.address}", port {self.port}'
        notes = "".join(f"\n{note}" for note in getattr(self.error, "__notes__", ()))
        how = self.step if self.encryption == "none" else f"{self.step}, {self.encryption}"
        return f"{where} failed ({how}): {self.error}{notes}"

    @property
    def hostaddr(self) -> str | None:
        """The address dialled (numeric IP or socket path); same as :attr:`address`."""
        return self.address


class ConnectError(Error):
    """No connection could be established.

    :attr:`attempts` lists every attempt in order; the message lists them all,
    one line each, in libpq's "connection to server at ... failed:" shape.
    """

    def __init__(self, attempts: Sequence[Attempt], message: str | None = None) -> None:
        self.attempts: tuple[Attempt, ...] = tuple(attempts)
        if message is None:
            message = "\n".join(a.describe() for a in self.attempts) or "no connection attempt made"
        super().__init__(message)

    @property
    def sqlstate(self) -> str | None:
        """The SQLSTATE of the last attempt that got one, else None."""
        for attempt in reversed(self.attempts):
            if attempt.sqlstate:
                return attempt.sqlstate
        return None


class PgprotoWarning(UserWarning):
    """Base class of the warnings pgproto issues through :mod:`warnings`."""


class PasswordFileWarning(PgprotoWarning):
    """The password file was ignored (not a plain file, or readable by others)."""


#: The step name of attempts that never reached an address.
RESOLVING_STEP: Final = "resolving the host"
#: "cannot connect now": the server is starting up, shutting down, ...
SQLSTATE_CANNOT_CONNECT_NOW: Final = "57P03"


def ping_outcome(error: BaseException | None) -> Ping:
    """libpq's ``PQping`` verdict for the outcome of a connection attempt.

    *error* is what connecting raised (None: it succeeded).  Invalid options
    mean NO_ATTEMPT.  Otherwise the last attempt that reached an address
    decides (libpq resets this state per address, and a host that does not
    resolve leaves it alone): a server that asked for authentication, or sent
    any SQLSTATE but 57P03 (cannot connect now), is up -- OK; 57P03 is
    REJECT; no SQLSTATE at all (refused, timed out, TLS failure, ...) is
    NO_RESPONSE.
    """
    if error is None:
        return Ping.OK
    if isinstance(error, ConninfoError):
        return Ping.NO_ATTEMPT
    if not isinstance(error, ConnectError):
        return Ping.NO_RESPONSE
    for attempt in reversed(error.attempts):
        if attempt.step == RESOLVING_STEP:
            continue
        if attempt.auth_requested:
            return Ping.OK
        sqlstate = attempt.sqlstate
        if sqlstate is None or len(sqlstate) != 5:
            return Ping.NO_RESPONSE
        return Ping.REJECT if sqlstate == SQLSTATE_CANNOT_CONNECT_NOW else Ping.OK
    return Ping.NO_RESPONSE
