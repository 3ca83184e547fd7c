"""Every status change of the connection machine, in one table.

Rule 1: a machine's status changes only by a lookup in :data:`TRANSITIONS`
(the machine's ``_set``, or :func:`transition`); a (status, input) pair
missing from the table is a bug in pgproto, reported by :func:`transition`
as :class:`~pgproto.LocalProtocolError`.

Rule 2: the inputs are what *happened* (a reply byte was read, a handshake
finished), not what to do next.  Which input fires is decided by the machine
in ``_machine.py``; the table only says where each one leads.

The states are libpq's ``CONNECTION_*`` values (``ConnStatus``) so that
``status`` means what it means in libpq.  ``CONNECTION_GSS_STARTUP``,
``CONNECTION_AUTHENTICATING`` and ``CONNECTION_SETENV`` are never entered:
pgproto has no GSSAPI and no OAuth flow, and SETENV has been unused since
PostgreSQL 14.
"""

from __future__ import annotations

import enum
from typing import Final

from ._enums import ConnStatus
from ._errors import LocalProtocolError

__all__ = ["TRANSITIONS", "Input", "transition"]


class Input(enum.Enum):
    """What happened."""

    # Members are singletons: identity hashing is exact, and it is C-level
    # (Enum's own __hash__ is Python code, run on every status change).
    __hash__ = object.__hash__

    OPEN_REQUESTED = enum.auto()  # an address was chosen, the adapter opens it
    TRANSPORT_READY = enum.auto()  # connection_made()
    SSL_REQUEST_SENT = enum.auto()  # SSLRequest queued (or direct TLS begins)
    SSL_REFUSED = enum.auto()  # "N": continue in plaintext on the same socket
    TLS_ESTABLISHED = enum.auto()  # handshake and certificate checks done
    STARTUP_SENT = enum.auto()  # StartupMessage queued
    AUTHENTICATION_OK = enum.auto()  # AuthenticationOk accepted
    STARTUP_DONE = enum.auto()  # ReadyForQuery after authentication
    CHECK_WRITABLE = enum.auto()  # SHOW transaction_read_only sent
    CHECK_STANDBY = enum.auto()  # SELECT pg_is_in_recovery() sent
    CHECK_ANSWERED = enum.auto()  # the check query's row arrived
    CHECK_DRAINED = enum.auto()  # ReadyForQuery after the check query
    TARGET_ACCEPTED = enum.auto()  # target_session_attrs satisfied
    RETRY = enum.auto()  # another attempt: next method, address or host
    FAILED = enum.auto()  # nothing left to try, or a fatal error
    CLOSED = enum.auto()  # close() on a healthy connection
    RESET = enum.auto()  # reset(): start again from the first host
    CANCEL_SENT = enum.auto()  # CancelRequest queued (cancel connections only)
    CANCEL_CONFIRMED = enum.auto()  # the server closed the cancel connection


_S = ConnStatus
_ANY_LIVE: Final = (
    _S.NEEDED,
    _S.STARTED,
    _S.MADE,
    _S.SSL_STARTUP,
    _S.AWAITING_RESPONSE,
    _S.AUTH_OK,
    _S.CHECK_TARGET,
    _S.CHECK_WRITABLE,
    _S.CHECK_STANDBY,
    _S.CONSUME,
)

TRANSITIONS: Final[dict[tuple[ConnStatus, Input], ConnStatus]] = {
    (_S.NEEDED, Input.OPEN_REQUESTED): _S.STARTED,
    (_S.STARTED, Input.TRANSPORT_READY): _S.MADE,
    (_S.MADE, Input.SSL_REQUEST_SENT): _S.SSL_STARTUP,
    (_S.SSL_STARTUP, Input.SSL_REFUSED): _S.MADE,
    (_S.SSL_STARTUP, Input.TLS_ESTABLISHED): _S.MADE,
    (_S.MADE, Input.STARTUP_SENT): _S.AWAITING_RESPONSE,
    (_S.AWAITING_RESPONSE, Input.AUTHENTICATION_OK): _S.AUTH_OK,
    (_S.AUTH_OK, Input.STARTUP_DONE): _S.CHECK_TARGET,
    (_S.CHECK_TARGET, Input.CHECK_WRITABLE): _S.CHECK_WRITABLE,
    (_S.CHECK_TARGET, Input.CHECK_STANDBY): _S.CHECK_STANDBY,
    (_S.CHECK_WRITABLE, Input.CHECK_ANSWERED): _S.CONSUME,
    (_S.CHECK_STANDBY, Input.CHECK_ANSWERED): _S.CONSUME,
    (_S.CONSUME, Input.CHECK_DRAINED): _S.CHECK_TARGET,
    (_S.CHECK_TARGET, Input.TARGET_ACCEPTED): _S.OK,
    (_S.OK, Input.CLOSED): _S.BAD,
    (_S.OK, Input.FAILED): _S.BAD,
    (_S.BAD, Input.RESET): _S.NEEDED,
    # A cancel connection (_cancel.py) sends CancelRequest where a normal
    # one sends the startup packet, and is done when the server hangs up.
    (_S.MADE, Input.CANCEL_SENT): _S.AWAITING_RESPONSE,
    (_S.AWAITING_RESPONSE, Input.CANCEL_CONFIRMED): _S.OK,
    **{(s, Input.RETRY): _S.NEEDED for s in _ANY_LIVE},
    **{(s, Input.FAILED): _S.BAD for s in _ANY_LIVE},
}


def transition(status: ConnStatus, event: Input) -> ConnStatus:
    """The status that *event* leads to from *status*."""
    try:
        return TRANSITIONS[status, event]
    except KeyError:
        raise LocalProtocolError(
            f"internal error: no transition from {status.name} on {event.name}"
        ) from None
