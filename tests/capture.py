"""A recording TCP relay ("a capture on the loopback port") and helpers to read captures.

:class:`CaptureRelay` listens on 127.0.0.1, relays every accepted connection to
a target and records what each side sent::

    with CaptureRelay(server.host, server.port) as relay:
        conn = psycopg.connect(host="127.0.0.1", port=relay.port, ...)
        conn.close()
        assert relay.wait_closed(1)
        capture = relay.captures()[0]
        assert first_packet_kind(capture.client_bytes) == "startup"

The analysis helpers are pure functions over the recorded bytes.

PostgreSQL facts they rely on (protocol chapter "Message Formats")
-----------------------------------------------------------------

The first packet a client sends has no type byte: an Int32 length that
counts itself, then an Int32 code.

* SSLRequest: length 8, code 80877103 (``1234 << 16 | 5679``).  The server
  answers one byte, ``S`` (a TLS handshake follows, started by the client,
  so TLS begins at offset 8 of the client stream) or ``N`` (the client may
  go on in clear on the same connection: ``sslmode=prefer``/``allow``).
* GSSENCRequest: length 8, code 80877104 (``1234 << 16 | 5680``).
* CancelRequest: code 80877102 (``1234 << 16 | 5678``), then the Int32
  process ID and the secret key.  The key is 4 bytes up to protocol 3.1
  (length 16); protocol 3.2 (PostgreSQL 18) allows up to 256 bytes, so the
  length is ``12 + len(key)``, 16 to 268.
* StartupMessage: the protocol version, ``major << 16 | minor``: 196608 for
  3.0, 196610 for 3.2 (3.1 was never used); any 3.x counts here.
* Direct TLS (``sslnegotiation=direct``, PostgreSQL 17+): no SSLRequest, the
  client starts with a TLS ClientHello at once.  A TLS record header is the
  content type (22 = handshake), the record version (``0x03 0x01`` in a
  ClientHello, ``0x03 0x03`` afterwards) and an Int16 length; a startup
  packet starts with ``0x00`` (its length is far below 16 MiB), so a first
  byte ``0x16`` followed by ``0x03`` is unambiguous.

TLS: what a capture can see of a close_notify
---------------------------------------------

TLS record content types: 20 change_cipher_spec, 21 alert, 22 handshake,
23 application_data.

* TLS 1.2: after the handshake, an alert travels in a record of type 21
  (its body is encrypted, its type is not), so :func:`ends_with_tls_alert`
  sees a client's close_notify.
* TLS 1.3 (RFC 8446 section 5.2): every record protected by the traffic
  keys, alerts included, has the outer type 23; the real type is the last
  byte of the encrypted plaintext (``TLSInnerPlaintext``).  The type
  therefore says nothing, but the length does: with the AEAD ciphers
  OpenSSL negotiates by default (AES-GCM, ChaCha20-Poly1305; 16-byte tag)
  and no record padding (OpenSSL's default), a record's payload is
  ``len(plaintext) + 1 + 16``.  A close_notify (a 2-byte alert) is a
  19-byte record; libpq's Terminate (``X`` + Int32 4, 5 bytes) sent alone
  is a 22-byte record.

Measured with Python's ssl module (OpenSSL 3.0, :func:`measure_close_notify`
reproduces it): a client SSLObject over MemoryBIO that writes
``b"X\\x00\\x00\\x00\\x04"`` then calls ``unwrap()`` sends, after the
handshake, these records (type, payload length):

=====================================  =====================  ===================
negotiated                             record with Terminate  close_notify record
=====================================  =====================  ===================
TLS 1.3, TLS_AES_256_GCM_SHA384        (23, 22)               (23, 19)
TLS 1.2, ECDHE-ECDSA-AES256-GCM-SHA384 (23, 29)               (21, 26)
TLS 1.2, ECDHE-ECDSA-CHACHA20-POLY1305 (23, 21)               (21, 18)
=====================================  =====================  ===================

(TLS 1.2 AES-GCM adds an 8-byte explicit nonce: ``8 + n + 16``; TLS 1.2
ChaCha20 does not: ``n + 16``.)  So a test can assert, from
:func:`last_client_record_lengths`: "TLS 1.3 and the stream ends with
``[22, 19]``" (Terminate, then a close_notify), or, weaker and
cipher-independent, "the last record is shorter than the one before"; and
with TLS 1.2, :func:`ends_with_tls_alert`.  It cannot tell a close_notify
from any other 2-byte alert, nor from 2 bytes of application data, in
TLS 1.3.

Observed with libpq 18 (psycopg_binary 3.3.9, its own OpenSSL) against the
``pg18`` fixture, which negotiates TLS 1.3 with TLS_AES_256_GCM_SHA384:

* PQfinish() ends the client stream with records of 22 (Terminate) and 19
  (close_notify) bytes, after an SSLRequest and after direct TLS alike.
* The ClientHello carries the ALPN name ``postgresql`` in clear after an
  SSLRequest too, not only with ``sslnegotiation=direct``.
* Cancel (``tests/test_capture.py`` pins this down): PQcancelCreate()'s
  connection (libpq 17+, psycopg's ``cancel_safe()``) negotiates like the
  original connection: ``sslmode=require``/``prefer`` send an SSLRequest,
  ``sslnegotiation=direct`` starts with TLS, and ``disable``/``allow`` (a
  plaintext original connection) send a 16-byte CancelRequest in clear.
  Inside TLS the client sends the CancelRequest as one 33-byte record, then
  a 19-byte close_notify.  Legacy PQcancel() (psycopg's ``cancel()``)
  always sends the CancelRequest in clear, whatever the sslmode.  In both
  cases the server sends nothing back in clear and closes the connection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import selectors
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Final, Generic, Protocol, Self, TypeVar

from fdcheck import is_open

__all__ = [
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "SSL_REQUEST_CODE",
    "TLS_ALERT",
    "TLS_APPLICATION_DATA",
    "TLS_HANDSHAKE",
    "Capture",
    "CaptureRelay",
    "Direction",
    "RelayThread",
    "accept_pending",
    "client_tls_start",
    "contains_plaintext_cancel",
    "ends_with_tls_alert",
    "first_packet_kind",
    "last_client_record_lengths",
    "measure_close_notify",
    "selector_fd",
    "set_interest",
    "tls_records",
]

CANCEL_REQUEST_CODE: Final = 80877102  # 1234 << 16 | 5678
SSL_REQUEST_CODE: Final = 80877103  # 1234 << 16 | 5679
GSSENC_REQUEST_CODE: Final = 80877104  # 1234 << 16 | 5680

_CANCEL_MIN_LENGTH: Final = 16  # 4-byte key (protocol 3.0)
_CANCEL_MAX_LENGTH: Final = 12 + 256  # protocol 3.2: keys up to 256 bytes

TLS_CHANGE_CIPHER_SPEC: Final = 20
TLS_ALERT: Final = 21
TLS_HANDSHAKE: Final = 22
TLS_APPLICATION_DATA: Final = 23
_TLS_HEARTBEAT: Final = 24
_TLS_TYPES: Final = frozenset(
    {TLS_CHANGE_CIPHER_SPEC, TLS_ALERT, TLS_HANDSHAKE, TLS_APPLICATION_DATA, _TLS_HEARTBEAT}
)
_TLS_MAX_RECORD: Final = 2**14 + 2048  # TLSCiphertext limit (TLS 1.2; 1.3 is lower)


# --------------------------------------------------------------------------
# Analysis helpers
# --------------------------------------------------------------------------


def _int32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "big")


def first_packet_kind(client_bytes: bytes) -> str:
    """What the client's first packet is.

    One of ``"ssl_request"``, ``"gssenc_request"``, ``"cancel_request"``,
    ``"startup"`` (protocol 3.x), ``"direct_tls"`` (a TLS handshake record
    header, ``0x16 0x03``), ``"empty"`` (the client sent nothing) or
    ``"other"`` (anything else, including fewer than 8 bytes).
    """
    if not client_bytes:
        return "empty"
    if client_bytes[:2] == b"\x16\x03":
        return "direct_tls"
    if len(client_bytes) < 8:
        return "other"
    length, code = _int32(client_bytes, 0), _int32(client_bytes, 4)
    if code == SSL_REQUEST_CODE and length == 8:
        return "ssl_request"
    if code == GSSENC_REQUEST_CODE and length == 8:
        return "gssenc_request"
    if code == CANCEL_REQUEST_CODE and _CANCEL_MIN_LENGTH <= length <= _CANCEL_MAX_LENGTH:
        return "cancel_request"
    if code >> 16 == 3 and length >= 8:
        return "startup"
    return "other"


def contains_plaintext_cancel(data: bytes, pid: int | None = None) -> bool:
    """Whether a CancelRequest header appears anywhere in ``data`` in clear.

    A header is an Int32 length from 16 to 268 followed by the code
    80877102, and, if ``pid`` is given, by that process ID.  Inside TLS the
    bytes are encrypted, so a hit means the request travelled in clear (a
    false hit in ciphertext needs 8 to 12 bytes to match by chance).
    """
    needle = CANCEL_REQUEST_CODE.to_bytes(4, "big")
    want_pid = None if pid is None else pid.to_bytes(4, "big")
    at = data.find(needle, 4)
    while at != -1:
        length = _int32(data, at - 4)
        if _CANCEL_MIN_LENGTH <= length <= _CANCEL_MAX_LENGTH and (
            want_pid is None or data[at + 4 : at + 8] == want_pid
        ):
            return True
        at = data.find(needle, at + 1)
    return False


def tls_records(data: bytes, start: int) -> list[tuple[int, int]]:
    """``(content type, payload length)`` of each TLS record from ``start`` to the end.

    Raises :class:`ValueError` if a record header is malformed (unknown
    content type, a version byte other than 3, a length over 2**14 + 2048)
    or if the data ends inside a record.
    """
    records: list[tuple[int, int]] = []
    offset = start
    while offset < len(data):
        header = data[offset : offset + 5]
        if len(header) < 5:
            raise ValueError(f"truncated TLS record header at offset {offset}: {header.hex()}")
        content_type, major, length = header[0], header[1], int.from_bytes(header[3:5], "big")
        if content_type not in _TLS_TYPES or major != 3 or length > _TLS_MAX_RECORD:
            raise ValueError(f"malformed TLS record header at offset {offset}: {header.hex()}")
        if offset + 5 + length > len(data):
            raise ValueError(
                f"TLS record at offset {offset} needs {length} bytes, "
                f"only {len(data) - offset - 5} follow"
            )
        records.append((content_type, length))
        offset += 5 + length
    return records


def client_tls_start(client_bytes: bytes) -> int | None:
    """Offset where TLS begins in a client stream.

    0 for direct TLS, 8 after an SSLRequest that the client followed with a
    TLS handshake record, ``None`` otherwise (plaintext, including an
    SSLRequest refused with ``N`` and followed by a startup packet in clear).
    """
    kind = first_packet_kind(client_bytes)
    if kind == "direct_tls":
        return 0
    if kind == "ssl_request" and client_bytes[8:10] == b"\x16\x03":
        return 8
    return None


def ends_with_tls_alert(client_bytes: bytes) -> bool:
    """Whether the last TLS record the client sent has the outer type 21 (alert).

    True for a TLS 1.2 close_notify.  Always false for an alert sent after a
    TLS 1.3 handshake, whose outer type is 23: see the module docstring and
    :func:`last_client_record_lengths`.  False for a plaintext stream.
    """
    start = client_tls_start(client_bytes)
    if start is None:
        return False
    records = tls_records(client_bytes, start)
    return bool(records) and records[-1][0] == TLS_ALERT


def last_client_record_lengths(client_bytes: bytes, count: int = 2) -> list[int]:
    """Payload lengths of the last ``count`` TLS records of a client stream.

    Fewer if the client sent fewer; ``[]`` for a plaintext stream.  With
    TLS 1.3 and a 16-byte-tag AEAD, Terminate then close_notify end the
    stream with ``[22, 19]`` (module docstring).
    """
    start = client_tls_start(client_bytes)
    if start is None or count <= 0:
        return []
    return [length for _, length in tls_records(client_bytes, start)[-count:]]


def measure_close_notify(
    maximum_version: ssl.TLSVersion | None = None, ciphers: str | None = None
) -> tuple[str, str, list[tuple[int, int]]]:
    """Replay the measurement in the module docstring with Python's ssl module.

    A client SSLObject over MemoryBIO completes a handshake with a server
    SSLObject (a trustme certificate), writes a Terminate message and calls
    ``unwrap()``.  Returns ``(TLS version, cipher, records)`` where
    ``records`` are the ``(type, length)`` of the client's records after its
    handshake.
    """
    import trustme

    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    if maximum_version is not None:
        client_ctx.maximum_version = maximum_version
    if ciphers is not None:
        client_ctx.set_ciphers(ciphers)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    stream = bytearray()

    def pump() -> None:
        sent = c_out.read()
        stream.extend(sent)
        s_in.write(sent)
        c_in.write(s_out.read())

    pending = [client, server]
    while pending:
        for side in list(pending):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            else:
                pending.remove(side)
            pump()
    handshake_end = len(stream)
    client.write(b"X\x00\x00\x00\x04")
    pump()
    with contextlib.suppress(ssl.SSLWantReadError):  # the server's close_notify is not read
        client.unwrap()
    pump()
    version, cipher = client.version(), client.cipher()
    assert version is not None
    assert cipher is not None
    return version, cipher[0], tls_records(bytes(stream), handshake_end)


# --------------------------------------------------------------------------
# The relay
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Capture:
    """A snapshot of one relayed connection.

    ``closed`` is true once both directions are finished and both sockets
    closed.  ``target_error`` is set if the relay could not connect to the
    target (the client then sees EOF at once).
    """

    client_bytes: bytes
    server_bytes: bytes
    closed: bool
    target_error: OSError | None = None


def set_interest(
    selector: selectors.BaseSelector, sock: socket.socket, mask: int, data: object
) -> None:
    """Have *selector* watch *sock* for exactly the events in *mask* (none:
    unregister it), with *data* attached; nothing is done if it already does."""
    try:
        registered = selector.get_key(sock).events
    except KeyError:
        registered = 0
    if mask == registered:
        return
    if not mask:
        selector.unregister(sock)
    elif not registered:
        selector.register(sock, mask, data)
    else:
        selector.modify(sock, mask, data)


def selector_fd(selector: selectors.BaseSelector) -> int | None:
    """The descriptor of *selector* (epoll, kqueue...); None if it has none."""
    fileno = getattr(selector, "fileno", None)
    return fileno() if callable(fileno) else None


def accept_pending(listener: socket.socket) -> Iterator[socket.socket]:
    """Accept every connection waiting on the non-blocking *listener*."""
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        except ConnectionAbortedError:  # reset by the client before accept()
            continue
        yield sock


_READ_CHUNK: Final = 65536
_BUFFER_LIMIT: Final = 1 << 20  # stop reading a side while this much waits to be written


class Direction:
    """Bytes flowing from ``src`` to ``dst``.

    When ``src`` sends EOF, what is still pending is written and ``dst`` is
    then shut down for writing; a side that resets counts as EOF, and bytes
    that can no longer be delivered are dropped (still recorded).
    """

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.recorded = bytearray()  # everything read from src
        self.pending = bytearray()  # read but not yet written to dst
        self.eof = False  # src sent EOF (or failed)
        self.broken = False  # writing to dst failed: drop further bytes
        self.done = False  # eof seen, pending flushed, dst shut down for writing

    def wants_read(self) -> bool:
        return not self.eof and len(self.pending) < _BUFFER_LIMIT

    def read(self) -> bytes:
        """Read what ``src`` has and record it; ``b""`` if it has nothing yet,
        or at its EOF (or reset), which sets ``eof``."""
        try:
            data = self.src.recv(_READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:  # ECONNRESET and the like: the side is gone
            data = b""
        if not data:
            self.eof = True
        self.recorded += data
        return data

    def flush(self) -> None:
        """Write what ``dst`` takes of ``pending``; after EOF and once nothing
        is pending, shut ``dst`` down for writing and count as ``done``."""
        if self.done:
            return
        if self.pending and not self.broken:
            try:
                sent = self.dst.send(self.pending)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # EPIPE / ECONNRESET: the receiver is gone
                self.broken = True
                self.pending.clear()
            else:
                del self.pending[:sent]
        if self.broken:
            self.pending.clear()
        if self.eof and not self.pending:
            with contextlib.suppress(OSError):  # ENOTCONN after a reset
                self.dst.shutdown(socket.SHUT_WR)
            self.done = True


class _Conn:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.connecting = True
        self.up = Direction(client, server)  # client -> server
        self.down = Direction(server, client)  # server -> client
        self.closed = False
        self.target_error: OSError | None = None

    def snapshot(self) -> Capture:
        return Capture(
            bytes(self.up.recorded), bytes(self.down.recorded), self.closed, self.target_error
        )


class RelayConn(Protocol):
    """What :class:`RelayThread` needs of a relayed connection."""

    client: socket.socket
    server: socket.socket
    connecting: bool  # the target socket's connect() is in progress
    closed: bool


ConnT = TypeVar("ConnT", bound=RelayConn)


class RelayThread(Generic[ConnT]):
    """A TCP relay from 127.0.0.1:``port`` to a target, run by one thread.

    The thread runs a selector over non-blocking sockets: the listener, a
    wake-up socket pair and both sockets of every relayed connection (with
    ``TCP_NODELAY`` on both sides).  Subclasses make a connection object per
    accepted client (:meth:`_new_conn`), relay what its sockets are ready
    for once the target is connected (:meth:`_relay`), register their
    interest (:meth:`_update`) and handle an unreachable target
    (:meth:`_target_failed`); everything runs with ``_cond`` held.
    :meth:`close` wakes the thread through the socket pair, joins it and
    closes every socket.

    File descriptors: :meth:`owned_fds` returns the descriptors the relay
    holds (listener, wake pair, selector, relayed sockets) plus those it has
    closed that nobody has reopened since, so
    ``assert_no_fd_leak(ignore=relay.owned_fds)`` works while connections
    come and go.  After :meth:`close` the relay holds none.
    """

    def __init__(self, target_host: str, target_port: int, *, name: str) -> None:
        self.host: Final = "127.0.0.1"
        self.target: Final = (target_host, target_port)
        self._name = name
        family, _, _, _, sockaddr = socket.getaddrinfo(
            target_host, target_port, type=socket.SOCK_STREAM
        )[0]
        self._target_family = family
        self._target_addr = sockaddr
        self._selector_closed = False
        self._cond = threading.Condition()
        self._conns: list[ConnT] = []
        self._closed_fds: set[int] = set()
        self._error: BaseException | None = None
        self._listener = socket.create_server((self.host, 0), backlog=128)
        self._listener.setblocking(False)
        self.port: Final[int] = self._listener.getsockname()[1]
        try:
            self._wake_r, self._wake_w = socket.socketpair()
        except BaseException:
            self._listener.close()
            raise
        try:
            self._selector = selectors.DefaultSelector()
        except BaseException:
            for sock in (self._listener, self._wake_r, self._wake_w):
                sock.close()
            raise
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------

    def owned_fds(self) -> set[int]:
        """Descriptors held by the relay (see the class docstring)."""
        with self._cond:
            fds = {
                s.fileno() for s in (self._listener, self._wake_r, self._wake_w) if s.fileno() != -1
            }
            for conn in self._conns:
                fds.update(s.fileno() for s in (conn.client, conn.server) if s.fileno() != -1)
            selector = None if self._selector_closed else selector_fd(self._selector)
            if selector is not None:
                fds.add(selector)
            closed = set(self._closed_fds)
        fds |= {fd for fd in closed - fds if not is_open(fd)}
        return fds

    @property
    def alive(self) -> bool:
        """Whether the relay thread is still running."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the thread and close every socket (idempotent).

        Raises :class:`RuntimeError` if the relay thread failed.
        """
        if self._thread.is_alive():
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                raise RuntimeError(f"{self._name} thread did not stop")
        with self._cond:
            for conn in self._conns:
                self._close_sock(conn.client)
                self._close_sock(conn.server)  # ``closed`` stays as it was
            for sock in (self._listener, self._wake_r, self._wake_w):
                self._close_sock(sock)
            if not self._selector_closed:
                selector = selector_fd(self._selector)
                if selector is not None:
                    self._closed_fds.add(selector)
                self._selector.close()
                self._selector_closed = True
            self._cond.notify_all()
        if self._error is not None:
            raise RuntimeError(f"{self._name} thread failed") from self._error

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def wait_closed(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` connections are finished; false on timeout."""
        return self._wait(lambda conns: sum(conn.closed for conn in conns) >= count, timeout)

    def _wait(self, predicate: Callable[[list[ConnT]], bool], timeout: float) -> bool:
        """Wait until ``predicate(connections)`` holds (evaluated again each
        time the thread has done something); false on timeout or if the
        thread failed."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._error is not None or predicate(self._conns), timeout
            ) and (self._error is None)

    # -- relay thread -------------------------------------------------------

    def _new_conn(self, client: socket.socket, server: socket.socket) -> ConnT:
        raise NotImplementedError

    def _relay(self, conn: ConnT, sock: object, events: int) -> None:
        """``sock`` of ``conn`` is ready for ``events`` (the target is connected
        if ``sock`` is the target socket)."""
        raise NotImplementedError

    def _update(self, conn: ConnT) -> None:
        raise NotImplementedError

    def _target_failed(self, conn: ConnT, error: OSError) -> None:
        raise NotImplementedError

    def _close_sock(self, sock: socket.socket) -> None:
        """Close ``sock``, remembering its descriptor; call with the lock held."""
        fd = sock.fileno()
        if fd == -1:
            return
        with contextlib.suppress(KeyError, ValueError):  # not registered / selector closed
            self._selector.unregister(sock)
        sock.close()
        self._closed_fds.add(fd)

    def _serve(self) -> None:
        try:
            while True:
                for key, events in self._selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    if key.fileobj is self._listener:
                        self._accept_all()
                    else:
                        self._service(key.data, key.fileobj, events)
                with self._cond:
                    self._cond.notify_all()
        except BaseException as exc:  # surfaced by the waits and close()
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _accept_all(self) -> None:
        with self._cond:
            for client in accept_pending(self._listener):
                client.setblocking(False)
                server = socket.socket(self._target_family, socket.SOCK_STREAM)
                conn = self._new_conn(client, server)
                self._conns.append(conn)
                server.setblocking(False)
                # Relay each chunk at once: with Nagle's algorithm and delayed
                # ACKs a TLS handshake through the relay stalls ~40 ms per turn.
                for relayed in (client, server):
                    with contextlib.suppress(OSError):
                        relayed.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                err = server.connect_ex(self._target_addr)
                if err not in (0, errno.EINPROGRESS):
                    self._target_failed(conn, OSError(err, os.strerror(err)))
                    continue
                self._update(conn)

    def _service(self, conn: ConnT, sock: object, events: int) -> None:
        with self._cond:
            if conn.closed:
                return
            if conn.connecting and sock is conn.server:  # writable: connect() ended
                err = conn.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._target_failed(conn, OSError(err, os.strerror(err)))
                    return
                conn.connecting = False
            self._relay(conn, sock, events)

    def _finish(self, conn: ConnT) -> None:
        self._close_sock(conn.client)
        self._close_sock(conn.server)
        conn.closed = True
        self._cond.notify_all()


class CaptureRelay(RelayThread[_Conn]):
    """Relays TCP connections from 127.0.0.1:``port`` to a target and records them.

    When one side sends EOF, the relay writes what is still pending to the
    other side and then shuts that side down for writing (:class:`Direction`),
    so a client waiting for the server's EOF sees it; when both directions
    are finished, both sockets are closed and the capture counts as
    ``closed``.  Threading and descriptors: see :class:`RelayThread`.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port, name="capture relay")

    # -- public API ---------------------------------------------------------

    def captures(self) -> list[Capture]:
        """A snapshot of every connection accepted so far, in accept order."""
        with self._cond:
            return [conn.snapshot() for conn in self._conns]

    def wait_for(self, predicate: Callable[[list[Capture]], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate(self.captures())`` holds; false on timeout.

        The predicate is evaluated again each time the relay records bytes,
        accepts or finishes a connection.
        """
        return self._wait(lambda conns: predicate([conn.snapshot() for conn in conns]), timeout)

    # -- relay thread -------------------------------------------------------

    def _new_conn(self, client: socket.socket, server: socket.socket) -> _Conn:
        return _Conn(client, server)

    def _target_failed(self, conn: _Conn, error: OSError) -> None:
        """The target is unreachable: close the client (it sees EOF)."""
        conn.connecting = False
        conn.target_error = error
        conn.up.eof = conn.up.broken = conn.up.done = True
        conn.down.eof = conn.down.done = True
        self._finish(conn)

    def _relay(self, conn: _Conn, sock: object, events: int) -> None:
        for direction in (conn.up, conn.down):
            if direction.src is sock and events & selectors.EVENT_READ:
                data = direction.read()
                if not direction.broken:
                    direction.pending += data
        if not conn.connecting:
            for direction in (conn.up, conn.down):
                direction.flush()
        if conn.up.done and conn.down.done:
            self._finish(conn)
        else:
            self._update(conn)

    def _update(self, conn: _Conn) -> None:
        """Register each socket of ``conn`` for what it is waiting for."""
        client_mask = server_mask = 0
        if conn.connecting:
            server_mask = selectors.EVENT_WRITE
        else:
            if conn.down.wants_read():
                server_mask |= selectors.EVENT_READ
            if conn.up.pending and not conn.up.broken:
                server_mask |= selectors.EVENT_WRITE
            if conn.down.pending and not conn.down.broken:
                client_mask |= selectors.EVENT_WRITE
        if conn.up.wants_read():
            client_mask |= selectors.EVENT_READ
        for sock, mask in ((conn.client, client_mask), (conn.server, server_mask)):
            set_interest(self._selector, sock, mask, conn)
