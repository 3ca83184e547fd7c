"""Cancel requests: libpq 17's ``PGcancelConn`` without the IO.

Theory of operation
-------------------

A query is cancelled over a *new* connection to the server the query runs
on: the client sends a CancelRequest (the backend's process id and secret
key) and the server, having signalled the backend, hangs up without a word.

libpq before 17 (``PQcancel``) always sent it in plaintext.  libpq 17's
``PQcancelCreate`` copies every connection option and runs the normal
``PQconnectPoll`` steps on the copy -- socket, SSLRequest or direct TLS per
``sslmode``/``sslnegotiation`` with the same fallbacks, certificate checks,
``requirepeer`` -- and sends the CancelRequest where a normal connection
sends its startup packet, inside TLS when TLS was negotiated.  The copy has
exactly one host (the one the connection is using) and one address (the one
it is connected to): no name lookup, no other host, no prefer-standby
second pass, no Terminate.  Then it waits: any byte from the server is
"unexpected response from server"; the end of the stream is success.

:class:`CancelStateMachine` is that copy.  It is a
:class:`~pgproto.ConnectionStateMachine` whose host list is fixed and whose
``CONNECTION_MADE`` and ``CONNECTION_AWAITING_RESPONSE`` steps do the cancel
request's work (two rows of the state table: CANCEL_SENT and
CANCEL_CONFIRMED); everything else -- the encryption methods, the per-address
``connect_timeout`` timer, the attempts recorded on failure -- is the
connection machine's, so an adapter drives it with the same pump loop and
it ends in ``CONNECTION_OK`` (the request was delivered) or ``ConnectError``.
"""

from __future__ import annotations

from typing import Final

from . import _wire
from ._enums import ConnStatus
from ._errors import LocalProtocolError, RemoteProtocolError, TLSError
from ._events import CloseConnection
from ._machine import _HARD, _STEP_NAMES, SSL, ConnectionStateMachine, _Failure
from ._states import Input

__all__ = ["CancelStateMachine"]

_S = ConnStatus

_CANCEL_STEP_NAMES: Final = {
    **_STEP_NAMES,
    _S.NEEDED: "preparing the cancel request",
    _S.MADE: "sending the cancel request",
    _S.AWAITING_RESPONSE: "waiting for the server to close the cancel connection",
}


class CancelStateMachine(ConnectionStateMachine):
    """A cancel request for the query running on *connection* (libpq's
    ``PQcancelCreate``), sent the way *connection* was made: same options,
    same host entry, same address, same encryption rules.

    Raises :class:`~pgproto.LocalProtocolError` at once when there is
    nothing to cancel: *connection* is not established ("connection not
    open") or the server sent no BackendKeyData ("no cancellation key
    received").  Drive it like a connection: it ends in ``CONNECTION_OK``
    when the server has taken the request (closed the connection), else
    ``next_event()`` raises :class:`~pgproto.ConnectError`.  ``reset()``
    makes it ready to be sent again (``PQcancelReset``).
    """

    _step_names = _CANCEL_STEP_NAMES

    def __init__(self, connection: ConnectionStateMachine) -> None:
        host, address = connection.host, connection.address
        pid, key = connection.backend_pid, connection.backend_key
        if connection.status is not _S.OK or host is None or address is None:
            raise LocalProtocolError("connection not open")
        if pid is None or key is None:
            raise LocalProtocolError("no cancellation key received")
        # The source connection's key passphrase hook (for its client
        # certificate); no SCRAM, so no nonce source and no cache.
        super().__init__(
            connection.params,
            key_passphrase_hook=connection._key_passphrase_hook,
            scram_cache=None,
        )
        self._pid = pid
        self._key = key
        self._cancel_host = host
        self._cancel_address = address

    @property
    def cancel_pid(self) -> int:
        """The backend process whose query this request cancels."""
        return self._pid

    # Hosts and addresses: exactly the ones the connection uses.

    def _next_host(self) -> None:
        if self._host_index >= 0:  # tried already: nothing else to try
            self._host_index = 1
            self._give_up()
            return
        self._host_index = 0
        self._host = self._cancel_host
        self._addresses = [self._cancel_address]
        self._addr_index = 0
        self._open(new_address=True)

    def _hosts_left(self) -> bool:
        return False

    # CONNECTION_MADE: the CancelRequest instead of the startup packet.

    def _made(self) -> bool:
        if self._method == SSL and not self._tls_done:
            return super()._made()
        self._write(_wire.cancel_request(self._pid, self._key))
        self._set(Input.CANCEL_SENT)
        return True

    # CONNECTION_AWAITING_RESPONSE: wait for the server to hang up.

    def _step(self) -> bool:
        status = self._status
        if status is _S.OK:  # delivered; the transport is closed
            return False
        if status is not _S.AWAITING_RESPONSE:
            return super()._step()
        if self._tls is not None:
            try:
                self._pull_tls()
            except TLSError:
                # A TLS stream cut without close_notify after the request
                # went out: the server hung up, which is all we wait for.
                if not self._eof:
                    raise
        if len(self._in):
            raise _Failure(RemoteProtocolError("unexpected response from server"), _HARD)
        if not self._eof:
            return False
        self._set(Input.CANCEL_CONFIRMED)
        self._transport_open = False
        self._events.append(CloseConnection())
        return True

    def send_query(self, sql: str) -> None:
        """Refused: a cancel connection carries no query."""
        raise LocalProtocolError("a cancel request connection cannot run queries")

    def close(self) -> None:
        """Abandon the request (``PQcancelFinish``); never sends Terminate."""
        self._out.clear()
        if self._status is _S.OK:
            self._set(Input.CLOSED)
        elif self._status is not _S.BAD:
            self._set(Input.FAILED)
        if self._transport_open:
            self._events.append(CloseConnection())
            self._transport_open = False
        self._awaiting = None
