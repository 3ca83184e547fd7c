"""PostgreSQL protocol 3 messages used while connecting: encoders and decoders.

Frontend messages are built whole as ``bytes``.  Backend messages are framed
by :class:`ReceiveBuffer`, which validates the length word as soon as the five
header bytes are in -- a hostile length (negative, below 4, or beyond the limit
the caller sets for that message type) is rejected before any body is
buffered, so memory stays bounded whatever the server sends.  Body decoders
take the message body (without type and length) and raise
:class:`~pgproto.RemoteProtocolError` on anything malformed.

Reference: the PostgreSQL documentation, "Frontend/Backend Protocol", message
formats; libpq's fe-protocol3.c for the limits it applies during startup.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Final, NamedTuple

from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "PROTOCOL_3_0",
    "PROTOCOL_3_2",
    "SSL_REQUEST_CODE",
    "Message",
    "ReceiveBuffer",
]

PROTOCOL_3_0: Final = (3, 0)
PROTOCOL_3_2: Final = (3, 2)
CANCEL_REQUEST_CODE: Final = 80877102
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104

#: libpq's limits: authentication-phase messages and NegotiateProtocolVersion
#: may be at most 2000 bytes, ordinary non-data messages 30000 bytes.
AUTH_MESSAGE_LIMIT: Final = 2000
ORDINARY_MESSAGE_LIMIT: Final = 30000
#: The server never sends a message longer than 1 GiB.
DATA_MESSAGE_LIMIT: Final = 0x3FFFFFFF

_HEADER: Final = struct.Struct("!cI")
_INT32: Final = struct.Struct("!i")
_UINT32: Final = struct.Struct("!I")
_INT16: Final = struct.Struct("!h")


# --------------------------------------------------------------------------
# frontend


def _cstring(text: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    if b"\x00" in data:
        raise LocalProtocolError("a protocol string may not contain a NUL character")
    return data + b"\x00"


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + _UINT32.pack(len(body) + 4) + body


def startup_message(parameters: Iterable[tuple[str, str]], version: tuple[int, int]) -> bytes:
    """StartupMessage: the protocol version and ``name=value`` pairs."""
    major, minor = version
    strings = [text for pair in parameters for text in pair]
    # Every string NUL-terminated, then one more NUL: encoded in one go.
    joined = "\x00".join(strings)
    if strings and joined.count("\x00") != len(strings) - 1:
        raise LocalProtocolError("a protocol string may not contain a NUL character")
    body = _UINT32.pack((major << 16) | minor) + joined.encode("utf-8", "surrogateescape")
    body += b"\x00\x00" if strings else b"\x00"
    return _UINT32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _UINT32.pack(8) + _UINT32.pack(SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return _UINT32.pack(8) + _UINT32.pack(GSSENC_REQUEST_CODE)


def cancel_request(pid: int, key: bytes) -> bytes:
    """CancelRequest; *key* is 4 bytes (protocol 3.0) or up to 256 (3.2)."""
    body = _UINT32.pack(CANCEL_REQUEST_CODE) + _INT32.pack(pid) + key
    return _UINT32.pack(len(body) + 4) + body


def password_message(password: bytes) -> bytes:
    """PasswordMessage (cleartext or MD5): the password, NUL-terminated."""
    if b"\x00" in password:
        raise LocalProtocolError("a password may not contain a NUL character")
    return _message(b"p", password + b"\x00")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return _message(b"p", _cstring(mechanism) + _INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return _message(b"p", data)


def query(sql: str) -> bytes:
    return _message(b"Q", _cstring(sql))


def copy_fail(reason: str) -> bytes:
    return _message(b"f", _cstring(reason))


def terminate() -> bytes:
    return b"X\x00\x00\x00\x04"


#: AuthenticationOk, byte for byte.
AUTHENTICATION_OK: Final = b"R\x00\x00\x00\x08\x00\x00\x00\x00"


# --------------------------------------------------------------------------
# framing


class Message(NamedTuple):
    """One backend message: its type byte and its body.  (A named tuple: one
    is built per message received, and a tuple is the cheapest to build.)"""

    type: bytes
    body: bytes


class ReceiveBuffer:
    """Bytes received from the server, cut into messages.

    *limit* gives, for a message type byte, the largest length word accepted
    (the length word counts itself, not the type byte).  Consumed bytes are
    dropped when the buffer empties or more data arrives, not message by
    message.
    """

    __slots__ = ("_data", "_limit", "_pos")

    def __init__(self, limit: Callable[[bytes], int]) -> None:
        self._data = bytearray()
        self._pos = 0
        self._limit = limit

    def __len__(self) -> int:
        return len(self._data) - self._pos

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._data[: self._pos]
            self._pos = 0
        self._data += data

    def set_limit(self, limit: Callable[[bytes], int]) -> None:
        self._limit = limit

    def _consume(self, stop: int) -> None:
        """Everything before *stop* was taken (all of it: the buffer lets
        go of its bytes).  (next_message does the same inline: it runs once
        per message.)"""
        if stop == len(self._data):
            self._data.clear()
            self._pos = 0
        else:
            self._pos = stop

    def take_exact(self, expected: bytes) -> bool:
        """Consume *expected* -- a whole message known byte for byte -- if
        the buffer starts with it."""
        data = self._data
        pos = self._pos
        if not data.startswith(expected, pos):
            return False
        self._consume(pos + len(expected))
        return True

    def take_key_data_and_ready(self) -> tuple[int, bytes, str] | None:
        """Consume a BackendKeyData with a 4-byte key followed by a
        ReadyForQuery -- how a startup burst usually ends -- if the buffer
        starts with them: (process id, key, transaction status).  Anything
        else (a longer key, another message between them, a malformed one)
        is left for :meth:`next_message`."""
        match = _KEY_DATA_AND_READY.match(self._data, self._pos)
        if match is None:
            return None
        pid, key, status = match.groups()  # (before the buffer is cleared)
        self._consume(match.end())
        return _INT32.unpack(pid)[0], key, _TRANSACTION_STATUS[status]

    def take_byte(self) -> bytes | None:
        """The next single byte (the reply to SSLRequest/GSSENCRequest)."""
        pos = self._pos
        if pos >= len(self._data):
            return None
        self._pos = pos + 1
        return bytes(self._data[pos : pos + 1])

    def take_all(self) -> bytes:
        data = bytes(self._data[self._pos :])
        self._data.clear()
        self._pos = 0
        return data

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes arrive."""
        data = self._data
        pos = self._pos
        if len(data) - pos < 5:
            return None
        kind, length = _HEADER.unpack_from(data, pos)
        # The length is judged before the message is complete: a server
        # may not make the client wait for (and buffer) a huge one.
        if not 4 <= length <= self._limit(kind):
            raise self._bad_length(kind, length)
        end = pos + 1 + length
        if len(data) < end:
            return None
        message = Message(kind, bytes(data[pos + 5 : end]))
        if end == len(data):  # all consumed: let go of it (it may be large)
            data.clear()
            end = 0
        self._pos = end
        return message

    def _bad_length(self, kind: bytes, length: int) -> RemoteProtocolError:
        if length < 4:
            return RemoteProtocolError(
                f"invalid message length {length} for message type {_show(kind)}"
            )
        return RemoteProtocolError(
            f"message of type {_show(kind)} is {length} bytes long, more than the "
            f"{self._limit(kind)} bytes allowed here"
        )

    def take_parameter_statuses(self) -> Sequence[tuple[str, str]]:
        """Consume the complete, well-formed ParameterStatus messages at the
        front of the buffer (the bulk of a startup burst) in one call;
        anything else -- including a malformed one -- is left for
        :meth:`next_message` to cut and report."""
        data = self._data
        pos = self._pos
        # A server sends the same run to every connection: when the buffer
        # starts with the last run taken (under the same limits), those are
        # the same messages, already checked -- taken as they were.  (Any
        # messages after them are left for the next call.)
        last = _last_run[0]
        if last is not None and last[0] is self._limit and data.startswith(last[1], pos):
            self._consume(pos + len(last[1]))
            return last[2]
        run = _PARAMETER_STATUS_RUN.match(data, pos)
        if run is None:
            return ()
        # No Python loop per message (a startup burst has 15 or so):
        # regular expressions cut the run into length words and bodies, and
        # the length words are checked against the bodies' sizes with C
        # iterators.  A misfit (rare: a broken server) takes the slow road.
        stop = run.end()
        words = _PARAMETER_STATUS_WORDS.findall(data, pos, stop)
        bodies = _PARAMETER_STATUS_BODIES.findall(data, pos, stop)
        lengths = struct.unpack(f"!{len(words)}I", b"".join(words))
        if max(lengths) > self._limit(b"S") or lengths != tuple(map(_PLUS_FIVE, map(len, bodies))):
            bodies = _fitting_prefix(lengths, bodies, self._limit(b"S"))
            if not bodies:
                return ()
            stop = pos + sum(map(len, bodies)) + 6 * len(bodies)
        # "name\0value" bodies: decoded at once, then split on the NULs.
        texts = b"\x00".join(bodies).decode("utf-8", "surrogateescape").split("\x00")
        pairs = tuple(zip(texts[::2], texts[1::2], strict=True))
        if stop - pos <= _LAST_RUN_MAX:
            _last_run[0] = (self._limit, bytes(data[pos:stop]), pairs)
        self._consume(stop)
        return pairs


#: The last run of ParameterStatus messages take_parameter_statuses() cut
#: (the limit function it was checked with, its bytes, its pairs); runs
#: longer than _LAST_RUN_MAX bytes are not kept.
_last_run: list[tuple[Callable[[bytes], int], bytes, tuple[tuple[str, str], ...]] | None] = [None]
_LAST_RUN_MAX: Final = 8192


def _fitting_prefix(lengths: tuple[int, ...], bodies: list[bytes], limit: int) -> list[bytes]:
    """The ParameterStatus bodies before the first whose length word does not
    describe it (name, NUL, value: the final NUL not included), or exceeds
    *limit*."""
    fitting = []
    for length, body in zip(lengths, bodies, strict=True):
        if length != len(body) + 5 or length > limit:
            break
        fitting.append(body)
    return fitting


_PLUS_FIVE: Final = (5).__add__

#: A run of messages shaped like ParameterStatus ("S", a length word, two
#: NUL-terminated strings); the length words of such a run, and the bodies
#: without their final NUL.  The shape alone does not make a message:
#: take_parameter_statuses() checks each length word.
_PARAMETER_STATUS_RUN: Final = re.compile(rb"(?:S....[^\x00]*\x00[^\x00]*\x00)+", re.DOTALL)
_PARAMETER_STATUS_WORDS: Final = re.compile(rb"S(....)[^\x00]*\x00[^\x00]*\x00", re.DOTALL)
_PARAMETER_STATUS_BODIES: Final = re.compile(rb"S....([^\x00]*\x00[^\x00]*)\x00", re.DOTALL)
#: BackendKeyData with a 4-byte key (length word 12), then ReadyForQuery
#: (length word 5) with a valid status: the process id, key and status.
_KEY_DATA_AND_READY: Final = re.compile(
    rb"K\x00\x00\x00\x0c(.{4})(.{4})Z\x00\x00\x00\x05([ITE])", re.DOTALL
)


def _show(kind: bytes) -> str:
    return repr(kind.decode("latin-1"))


# --------------------------------------------------------------------------
# backend bodies


class _Reader:
    """A cursor over one message body; every read is bounds-checked."""

    __slots__ = ("_body", "_pos", "_what")

    def __init__(self, body: bytes, what: str) -> None:
        self._body = body
        self._pos = 0
        self._what = what

    def _fail(self, problem: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"malformed {self._what} message: {problem}")

    def int32(self) -> int:
        if self._pos + 4 > len(self._body):
            raise self._fail("truncated")
        (value,) = _INT32.unpack_from(self._body, self._pos)
        self._pos += 4
        return int(value)

    def int16(self) -> int:
        if self._pos + 2 > len(self._body):
            raise self._fail("truncated")
        (value,) = _INT16.unpack_from(self._body, self._pos)
        self._pos += 2
        return int(value)

    def byte(self) -> bytes:
        if self._pos >= len(self._body):
            raise self._fail("truncated")
        value = self._body[self._pos : self._pos + 1]
        self._pos += 1
        return value

    def cstring(self) -> bytes:
        end = self._body.find(b"\x00", self._pos)
        if end < 0:
            raise self._fail("unterminated string")
        value = self._body[self._pos : end]
        self._pos = end + 1
        return value

    def take(self, count: int) -> bytes:
        if count < 0 or self._pos + count > len(self._body):
            raise self._fail("truncated")
        value = self._body[self._pos : self._pos + count]
        self._pos += count
        return value

    def rest(self) -> bytes:
        value = self._body[self._pos :]
        self._pos = len(self._body)
        return value

    def end(self) -> None:
        if self._pos != len(self._body):
            raise self._fail("unexpected trailing data")


def text(data: bytes) -> str:
    """Server text, decoded leniently (messages may arrive before the
    encoding is settled)."""
    return data.decode("utf-8", "replace")


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    """AuthenticationXXX: the request code and its payload."""
    if len(body) < 4:
        raise RemoteProtocolError("malformed authentication request message: truncated")
    (code,) = _INT32.unpack_from(body)
    return code, body[4:]


def parse_sasl_mechanisms(payload: bytes) -> list[str]:
    """The mechanism list of AuthenticationSASL."""
    reader = _Reader(payload, "AuthenticationSASL")
    mechanisms: list[str] = []
    while True:
        name = reader.cstring()
        if not name:
            break
        mechanisms.append(text(name))
    reader.end()
    return mechanisms


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    parts = body.split(b"\x00")
    if len(parts) != 3 or parts[2]:
        # Let the general reader say what is wrong.
        reader = _Reader(body, "ParameterStatus")
        reader.cstring()
        reader.cstring()
        reader.end()
        raise RemoteProtocolError("malformed ParameterStatus message")  # pragma: no cover
    return parts[0].decode("utf-8", "surrogateescape"), parts[1].decode("utf-8", "surrogateescape")


#: The longest cancel key protocol 3.2 allows.
MAX_CANCEL_KEY_LENGTH: Final = 256


def parse_backend_key_data(body: bytes, version: tuple[int, int]) -> tuple[int, bytes]:
    """BackendKeyData: the process id and the secret key (4 bytes in 3.0,
    4 to 256 bytes in 3.2)."""
    if len(body) < 4:
        raise RemoteProtocolError("malformed BackendKeyData message: truncated")
    (pid,) = _INT32.unpack_from(body)
    key = body[4:]
    # libpq's checks and wording (fe-protocol3.c, getBackendKeyData).
    prefix = "received invalid BackendKeyData message: cancel key with length"
    if len(key) < 4:
        raise RemoteProtocolError(f"{prefix} {len(key)} is too short (minimum 4 bytes)")
    if len(key) > MAX_CANCEL_KEY_LENGTH:
        raise RemoteProtocolError(
            f"{prefix} {len(key)} is too long (maximum {MAX_CANCEL_KEY_LENGTH} bytes)"
        )
    if version < PROTOCOL_3_2 and len(key) != 4:
        raise RemoteProtocolError(
            f"{prefix} {len(key)} not allowed in protocol version 3.0 (must be 4 bytes)"
        )
    return pid, key


def parse_ready_for_query(body: bytes) -> str:
    status = _TRANSACTION_STATUS.get(body)
    if status is None:
        reader = _Reader(body, "ReadyForQuery")  # let it say what is wrong
        reader.byte()
        reader.end()
        raise RemoteProtocolError(f"ReadyForQuery with unknown status {_show(body)}")
    return status


_TRANSACTION_STATUS: Final = {b"I": "I", b"T": "T", b"E": "E"}  # (ReadyForQuery)


def parse_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse: field code to value."""
    reader = _Reader(body, "ErrorResponse")
    fields: dict[str, str] = {}
    while True:
        code = reader.byte()
        if code == b"\x00":
            break
        fields[code.decode("latin-1")] = text(reader.cstring())
    reader.end()
    return fields


def parse_negotiate_protocol_version(body: bytes) -> tuple[int, list[str]]:
    """NegotiateProtocolVersion: the newest minor version the server
    supports, and the protocol options it did not recognise.

    Faults are reported in libpq's words (pqGetNegotiateProtocolVersion3):
    a negative option count has its own message, any other structural fault
    is "message too short".
    """
    prefix = "received invalid protocol negotiation message: "
    if len(body) >= 8 and _INT32.unpack_from(body, 4)[0] < 0:
        raise RemoteProtocolError(
            prefix + "server reported negative number of unsupported parameters"
        )
    try:
        reader = _Reader(body, "NegotiateProtocolVersion")
        minor = reader.int32()
        count = reader.int32()
        if count > len(body):
            raise RemoteProtocolError("more options announced than the message can hold")
        options = [text(reader.cstring()) for _ in range(count)]
        reader.end()
    except RemoteProtocolError:
        raise RemoteProtocolError(prefix + "message too short") from None
    return minor, options


def parse_notification(body: bytes) -> tuple[int, str, str]:
    """NotificationResponse: the notifying backend's pid, channel, payload."""
    reader = _Reader(body, "NotificationResponse")
    pid = reader.int32()
    channel = text(reader.cstring())
    payload = text(reader.cstring())
    reader.end()
    return pid, channel, payload


def parse_row_description(body: bytes) -> list[str]:
    reader = _Reader(body, "RowDescription")
    count = reader.int16()
    if count < 0:
        raise RemoteProtocolError(f"malformed RowDescription message: {count} fields")
    names = []
    for _ in range(count):
        names.append(text(reader.cstring()))
        reader.take(18)  # table oid, column, type oid, size, modifier, format
    reader.end()
    return names


def parse_data_row(body: bytes) -> tuple[bytes | None, ...]:
    reader = _Reader(body, "DataRow")
    count = reader.int16()
    if count < 0:
        raise RemoteProtocolError(f"malformed DataRow message: {count} columns")
    values: list[bytes | None] = []
    for _ in range(count):
        length = reader.int32()
        values.append(None if length == -1 else reader.take(length))
    reader.end()
    return tuple(values)


def parse_command_complete(body: bytes) -> str:
    reader = _Reader(body, "CommandComplete")
    tag = reader.cstring()
    reader.end()
    return text(tag)
