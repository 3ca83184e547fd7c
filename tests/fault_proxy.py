"""A TCP proxy that injects one fault at a chosen step of a PostgreSQL handshake.

:class:`FaultProxy` listens on 127.0.0.1 and relays every accepted
connection to a real server (one thread, a selector, non-blocking sockets
with ``TCP_NODELAY`` on both sides, like ``capture.CaptureRelay``).  While it
relays, it cuts both streams into *units* and, on every connection, applies
its :class:`Fault` when the server->client unit named by the fault's
:class:`Point` begins::

    with FaultProxy(server.host, server.port) as clean:
        ...connect through clean.port and close...
        points = handshake_points(clean.sessions()[0])
    fault = Fault("stall", points["scram_continue"])
    with FaultProxy(server.host, server.port, fault) as proxy:
        ...connect with host=127.0.0.1,127.0.0.1 port=<proxy.port>,<server.port>...
        assert proxy.sessions()[0].hit.step == "scram_continue"

Units
-----

The client->server stream starts with an untyped packet (Int32 length,
Int32 code): an SSLRequest (8 bytes) or a StartupMessage.  The server
answers an SSLRequest with one byte (a unit of its own); after ``S`` both
streams are TLS records (5-byte header: type, version, Int16 length), after
``N`` or a StartupMessage they are typed protocol messages (type byte, Int32
length counting itself).  A client that starts with a TLS record header
(``sslnegotiation=direct``) makes both streams TLS records from the start.

Points: flights
---------------

A server unit's *flight* is the number of times the client sent at least one
complete unit before it, minus one: each flight answers one client flight
(``S`` answers the SSLRequest, ServerHello... the ClientHello,
AuthenticationSASL the StartupMessage, SASLContinue the SASLInitialResponse,
SASLFinal... ReadyForQuery the SASLResponse).  As the server sends nothing
unprompted during a handshake, the server's next flight can only begin once
the client's flight has passed the proxy, so a flight number and an index
inside the flight name the same step on every run, whatever the timing --
provided the server sends no extra flight of its own (TLS 1.3 session
tickets would: PostgreSQL sends none, see ``tests/test_faults.py``).
:func:`handshake_points` reads the points of each step from a clean run
through the proxy against the same server, and :func:`flight_shape` lets a
test check that every client sees the same flights.

Faults (each applied once per connection, where its point begins)
-----------------------------------------------------------------

* ``cut``: the bytes before the point are delivered, then both sockets are
  closed (the client sees EOF, the server too);
* ``reset``: the same, but the client's socket is closed with ``SO_LINGER``
  zero, so the client sees a TCP RST (ECONNRESET);
* ``stall``: the bytes before the point are delivered, then nothing more in
  either direction; the proxy keeps reading and dropping both sides, and
  closes both sockets once the client closes (so the server's backend ends
  as soon as the client gives up);
* ``corrupt``: the unit at the point is delivered with one bit of one byte
  flipped (``Fault.corrupt_at``: an offset in the unit, negative from its
  end; the flipped bit is ``Fault.mask``), everything else is relayed
  unchanged.

:meth:`FaultProxy.sessions` reports, for every connection, the units seen in
both directions and the :class:`Hit` (the step, flight, index and unit the
fault landed on; ``None`` if the connection never reached the point).

File descriptors: :meth:`FaultProxy.owned_fds` (for
``fdcheck.assert_no_fd_leak(ignore=...)``) returns the descriptors the proxy
holds, plus those it closed that nobody has reopened since.  After
:meth:`FaultProxy.close` it holds none and its thread has ended.
"""

from __future__ import annotations

import contextlib
import dataclasses
import selectors
import socket
import struct
from collections.abc import Callable
from typing import Final, Literal

from capture import TLS_HANDSHAKE, Direction, RelayThread, first_packet_kind, set_interest

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "FaultProxy",
    "Hit",
    "Point",
    "Session",
    "Unit",
    "flight_shape",
    "flights",
    "handshake_points",
]

FaultKind = Literal["cut", "reset", "stall", "corrupt"]
FAULT_KINDS: Final[tuple[FaultKind, ...]] = ("cut", "reset", "stall", "corrupt")

_FLUSH_TIMEOUT: Final = 2.0  # a cut first delivers the bytes before its point

# Framings of a stream (see the module docstring).
_FIRST: Final = "first"  # untyped length-prefixed packet (client only)
_WAIT: Final = "wait"  # client: waiting for the answer to its request
_ANSWER: Final = "answer"  # server: one byte answering SSLRequest / GSSENCRequest
_TLS: Final = "tls"
_TYPED: Final = "typed"
_UNKNOWN: Final = "unknown"  # server bytes before the client's first packet


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of a stream: where it starts, how long it is, what it is.

    ``kind`` is ``"ssl_request"``, ``"gssenc_request"``, ``"startup"``
    (client first packets), ``"answer S"`` / ``"answer N"`` (the reply to a
    request), ``"tls 22"`` (a TLS record of that content type) or a
    protocol message type (``"R"``, ``"Z"`` ...).  ``flight`` and ``index``
    are set for server units (module docstring); client units have the
    number of their flight and their index in it too.
    """

    offset: int
    length: int
    kind: str
    flight: int
    index: int


@dataclasses.dataclass(frozen=True)
class Point:
    """A server->client unit, by flight and index, with the name of its step."""

    step: str
    flight: int
    index: int


@dataclasses.dataclass(frozen=True)
class Fault:
    """One fault: what (``kind``) and where (``point``)."""

    kind: FaultKind
    point: Point
    corrupt_at: int = -1  # byte of the unit to corrupt; negative: from its end
    mask: int = 0x01  # bits flipped in that byte

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if not 0 < self.mask < 256:
            raise ValueError("mask must flip at least one bit of one byte")


@dataclasses.dataclass(frozen=True)
class Hit:
    """Where a fault landed on one connection.

    ``offset`` is the server->client stream offset of the unit (the client
    received exactly the ``offset`` bytes before it intact), ``flipped`` the
    stream offset of the corrupted byte (``corrupt`` only).
    """

    step: str
    kind: FaultKind
    unit: Unit
    client_units: int  # complete client units seen when the fault landed
    flipped: int | None = None


@dataclasses.dataclass(frozen=True)
class Session:
    """A snapshot of one relayed connection."""

    client_bytes: bytes
    server_bytes: bytes
    client_units: tuple[Unit, ...]
    server_units: tuple[Unit, ...]
    hit: Hit | None
    closed: bool
    target_error: OSError | None


def flights(units: tuple[Unit, ...]) -> list[list[Unit]]:
    """Units grouped by flight, in order."""
    grouped: list[list[Unit]] = []
    for unit in units:
        if unit.flight == len(grouped):
            grouped.append([])
        grouped[unit.flight].append(unit)
    return grouped


def flight_shape(session: Session) -> list[list[str]]:
    """The kinds of the server's units, flight by flight (lengths vary with
    names and nonces; the shape does not)."""
    return [[unit.kind for unit in flight] for flight in flights(session.server_units)]


def handshake_points(session: Session) -> dict[str, Point]:
    """The points of each handshake step, read from a clean run.

    The clean run must use SCRAM; what follows the handshake (queries, the
    server's close_notify) is ignored.

    TLS after an SSLRequest:

    * ``ssl_answer``: the ``S`` byte;
    * ``server_hello``: the server's first TLS record (its ServerHello, or a
      HelloRetryRequest: PostgreSQL before 18 offers only the P-256 group by
      default, so a client whose first key share is X25519 is asked again,
      and the handshake takes one more flight);
    * ``tls_handshake``: the server's first encrypted handshake record (TLS
      1.3), the first record after the (last) ServerHello;
    * ``auth_request``: the first record after the handshake (AuthenticationSASL);
    * ``scram_continue``: the record carrying AuthenticationSASLContinue;
    * ``before_ready``: the last record of the flight that answers the
      SASLResponse, which carries ReadyForQuery (PostgreSQL 18 sends
      SASLFinal, AuthenticationOk ... ReadyForQuery in one record);
    * ``scram_final``: the first record of that flight, only if it has
      more than one.

    Direct TLS (``sslnegotiation=direct``): the same but ``ssl_answer``;
    with no SSLRequest every flight comes one earlier, and ``server_hello``
    is the server's first byte.

    Plaintext: ``auth_request`` (AuthenticationSASL), ``scram_continue``,
    ``scram_final`` and ``before_ready`` (the ReadyForQuery message itself).

    Raises :class:`ValueError` if the run does not have the expected shape.
    """
    groups = flights(session.server_units)
    shape = flight_shape(session)
    points: dict[str, Point] = {}

    def name(step: str, unit: Unit) -> None:
        points[step] = Point(step, unit.flight, unit.index)

    def tls_steps(first: int) -> dict[str, Point]:
        # the handshake flight is the first with an encrypted record; any
        # before it (from ``first``) are HelloRetryRequest flights: ServerHello
        # and ChangeCipherSpec records only
        hello = first
        while (
            hello < len(groups)
            and shape[hello][0] == f"tls {TLS_HANDSHAKE}"
            and "tls 23" not in shape[hello]
        ):
            hello += 1
        if hello + 4 > len(groups) or shape[hello][0] != f"tls {TLS_HANDSHAKE}":
            raise ValueError(f"unexpected TLS handshake shape: {shape}")
        encrypted = [u for u in groups[hello] if u.kind == "tls 23"]
        if not encrypted:
            raise ValueError(f"no encrypted handshake record (TLS 1.2?): {shape}")
        name("server_hello", groups[first][0])
        name("tls_handshake", encrypted[0])
        name("auth_request", groups[hello + 1][0])
        name("scram_continue", groups[hello + 2][0])
        if len(groups[hello + 3]) > 1:
            name("scram_final", groups[hello + 3][0])
        name("before_ready", groups[hello + 3][-1])
        return points

    if shape and shape[0] == ["answer S"]:
        # 'S', handshake, AuthenticationSASL, SASLContinue, SASLFinal..ReadyForQuery
        name("ssl_answer", groups[0][0])
        return tls_steps(1)
    if shape and shape[0] and shape[0][0] == f"tls {TLS_HANDSHAKE}":
        # direct TLS: the same without the answer
        return tls_steps(0)
    if shape and shape[0] and shape[0][0] == "R":
        if len(groups) < 3 or shape[1] != ["R"] or "Z" not in shape[2]:
            raise ValueError(f"unexpected plaintext SCRAM shape: {shape}")
        name("auth_request", groups[0][0])
        name("scram_continue", groups[1][0])
        name("scram_final", groups[2][0])
        name("before_ready", groups[2][shape[2].index("Z")])
        return points
    raise ValueError(f"unknown handshake shape: {shape}")


# --------------------------------------------------------------------------
# framing


def _unit_length(framing: str, data: bytearray, offset: int) -> int | None:
    """The length of the unit starting at ``offset``; None until its header is in."""
    available = len(data) - offset
    if framing == _ANSWER:
        return 1
    if framing == _FIRST:
        if available < 4:
            return None
        return max(4, int.from_bytes(data[offset : offset + 4], "big", signed=True))
    if framing == _TLS:
        if available < 5:
            return None
        return 5 + int.from_bytes(data[offset + 3 : offset + 5], "big")
    # typed messages (and anything unknown, parsed the same way)
    if available < 5:
        return None
    return 1 + max(4, int.from_bytes(data[offset + 1 : offset + 5], "big", signed=True))


class _Stream(Direction):
    """One direction: bytes read, bytes waiting to be written, units."""

    def __init__(self, src: socket.socket, dst: socket.socket, framing: str) -> None:
        super().__init__(src, dst)
        self.framing = framing
        self.released = 0  # recorded bytes moved to pending (or dropped)
        self.parsed = 0  # offset of the next unit to parse
        self.units: list[Unit] = []
        self.current: int | None = None  # length of the unit at ``parsed``, once known


class _Conn:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.connecting = True
        self.up = _Stream(client, server, _FIRST)
        self.down = _Stream(server, client, _UNKNOWN)
        self.hit: Hit | None = None
        self.stalled = False
        self.hold: int | None = None  # down: do not release past this offset
        self.closed = False
        self.target_error: OSError | None = None
        # flight bookkeeping (module docstring)
        self.client_done_at_last_server_unit = -1  # len(up.units) when a server unit last began
        self.server_flight = -1
        self.server_index = 0
        self.server_done_at_last_client_unit = -1
        self.client_flight = -1
        self.client_index = 0

    def snapshot(self) -> Session:
        return Session(
            bytes(self.up.recorded),
            bytes(self.down.recorded),
            tuple(self.up.units),
            tuple(self.down.units),
            self.hit,
            self.closed,
            self.target_error,
        )


# --------------------------------------------------------------------------
# the proxy


class FaultProxy(RelayThread[_Conn]):
    """Relays TCP connections from 127.0.0.1:``port`` to a server, injecting ``fault``.

    ``fault=None`` relays faithfully (a clean run to read points from); see
    the module docstring for the rest, and ``capture.RelayThread`` for the
    thread and the descriptors.
    """

    def __init__(self, target_host: str, target_port: int, fault: Fault | None = None) -> None:
        self.fault: Final = fault
        super().__init__(target_host, target_port, name="fault proxy")

    # -- public API ---------------------------------------------------------

    def sessions(self) -> list[Session]:
        """A snapshot of every connection accepted so far, in accept order."""
        with self._cond:
            return [conn.snapshot() for conn in self._conns]

    def wait_for(self, predicate: Callable[[list[Session]], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate(self.sessions())`` holds; false on timeout
        (or if the proxy thread failed)."""
        return self._wait(lambda conns: predicate([conn.snapshot() for conn in conns]), timeout)

    # -- proxy thread -------------------------------------------------------

    def _new_conn(self, client: socket.socket, server: socket.socket) -> _Conn:
        return _Conn(client, server)

    def _target_failed(self, conn: _Conn, error: OSError) -> None:
        conn.target_error = error
        self._finish(conn)

    def _relay(self, conn: _Conn, sock: object, events: int) -> None:
        for stream in (conn.up, conn.down):
            readable = stream.src is sock and events & selectors.EVENT_READ
            if readable and self._read(conn, stream):  # the fault closed it
                return
        if conn.stalled:
            if conn.up.eof:  # the client gave up: release the server
                self._finish(conn)
            else:
                self._update(conn)
            return
        for stream in (conn.up, conn.down):
            stream.flush()
        if conn.up.done and conn.down.done:
            self._finish(conn)
        else:
            self._update(conn)

    def _read(self, conn: _Conn, stream: _Stream) -> bool:
        """Read what ``stream.src`` has; true if the connection is now closed."""
        if not stream.read():
            return False
        self._parse(conn, stream)
        if conn.closed:
            return True
        if conn.stalled:  # nothing goes through any more
            stream.released = len(stream.recorded)
            return False
        limit = len(stream.recorded)
        if stream is conn.down and conn.hold is not None:
            limit = min(limit, conn.hold)
        if not stream.broken:
            stream.pending += stream.recorded[stream.released : limit]
        stream.released = max(stream.released, limit)
        return False

    def _parse(self, conn: _Conn, stream: _Stream) -> None:
        """Cut new units off ``stream``; apply the fault when its point begins."""
        while stream.parsed < len(stream.recorded) and not conn.closed:
            start = stream.parsed
            if stream.current is None:
                if stream is conn.up and stream.framing == _WAIT:
                    return  # the client sent more before the answer: keep it unparsed
                if stream is conn.up and stream.framing == _FIRST:
                    head = bytes(stream.recorded[start : start + 2])
                    if len(head) < 2:
                        return
                    if head == b"\x16\x03":  # direct TLS: records from the start
                        stream.framing = conn.down.framing = _TLS
                is_new = not stream.units or stream.units[-1].offset != start
                if stream is conn.down and is_new:
                    self._server_unit_begins(conn, start)
                    if conn.closed or conn.stalled:
                        return
                stream.current = _unit_length(stream.framing, stream.recorded, start)
                if stream.current is None:
                    return
            if start + stream.current > len(stream.recorded):
                return
            length = stream.current
            stream.current = None
            stream.parsed = start + length
            if stream is conn.up:
                self._client_unit(conn, start, length)
            else:
                self._server_unit_complete(conn, start, length)

    def _client_unit(self, conn: _Conn, start: int, length: int) -> None:
        stream = conn.up
        unit_bytes = bytes(stream.recorded[start : start + length])
        if stream.framing == _FIRST:
            kind = first_packet_kind(unit_bytes)
            if kind not in ("ssl_request", "gssenc_request"):
                kind = "startup"
                stream.framing = _TYPED
                conn.down.framing = _TYPED
            else:
                stream.framing = _WAIT
                conn.down.framing = _ANSWER
        else:
            kind = _kind(stream.framing, unit_bytes)
        if conn.server_done_at_last_client_unit != len(conn.down.units):
            conn.client_flight += 1
            conn.client_index = 0
        else:
            conn.client_index += 1
        conn.server_done_at_last_client_unit = len(conn.down.units)
        stream.units.append(Unit(start, length, kind, conn.client_flight, conn.client_index))

    def _server_unit_begins(self, conn: _Conn, start: int) -> None:
        stream = conn.down
        if stream.framing == _UNKNOWN:
            stream.framing = _TYPED
        client_done = len(conn.up.units)  # complete client units
        if client_done != conn.client_done_at_last_server_unit:
            conn.server_flight += 1
            conn.server_index = 0
        else:
            conn.server_index += 1
        conn.client_done_at_last_server_unit = client_done
        # the kind is known once the unit is complete; a placeholder until then
        unit = Unit(start, 0, "?", conn.server_flight, conn.server_index)
        stream.units.append(unit)
        fault = self.fault
        if fault is None or conn.hit is not None:
            return
        if (fault.point.flight, fault.point.index) != (unit.flight, unit.index):
            return
        conn.hold = start  # nothing of this unit is released before the fault
        if stream.released > start:  # cannot happen: units are parsed before release
            raise AssertionError("fault point already relayed")
        if fault.kind == "corrupt":
            return  # applied when the unit is complete
        conn.hit = Hit(fault.point.step, fault.kind, unit, client_done)
        # deliver what came before the point, then act
        stream.pending += stream.recorded[stream.released : start]
        stream.released = start
        if fault.kind == "stall":
            conn.stalled = True
            self._deliver(stream)
            stream.released = len(stream.recorded)
            conn.up.released = len(conn.up.recorded)
            conn.up.pending.clear()
            return
        self._deliver(stream)
        if fault.kind == "reset":
            with contextlib.suppress(OSError):
                conn.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._finish(conn)

    def _server_unit_complete(self, conn: _Conn, start: int, length: int) -> None:
        stream = conn.down
        unit_bytes = bytes(stream.recorded[start : start + length])
        last = stream.units[-1]
        if stream.framing == _ANSWER:
            kind = f"answer {unit_bytes.decode('latin-1')}"
            if unit_bytes == b"S":
                stream.framing = conn.up.framing = _TLS
            else:  # N (or an error): plaintext follows, the client starts over
                stream.framing = _TYPED
                conn.up.framing = _FIRST
            self._parse(conn, conn.up)  # anything the client sent early
        else:
            kind = _kind(stream.framing, unit_bytes)
        unit = dataclasses.replace(last, length=length, kind=kind)
        stream.units[-1] = unit
        fault = self.fault
        if (
            fault is not None
            and fault.kind == "corrupt"
            and conn.hit is None
            and conn.hold == start
        ):
            at = fault.corrupt_at if fault.corrupt_at >= 0 else length + fault.corrupt_at
            if not 0 <= at < length:
                raise ValueError(f"corrupt_at {fault.corrupt_at} outside a {length}-byte unit")
            corrupted = bytearray(unit_bytes)
            corrupted[at] ^= fault.mask
            conn.hit = Hit(fault.point.step, fault.kind, unit, len(conn.up.units), start + at)
            stream.pending += stream.recorded[stream.released : start] + corrupted
            stream.released = start + length
            conn.hold = None
        elif conn.hit is not None and conn.hit.unit.offset == start:
            conn.hit = dataclasses.replace(conn.hit, unit=unit)

    def _deliver(self, stream: _Stream) -> None:
        """Write everything pending now (a cut or stall delivers what precedes its point)."""
        if not stream.pending or stream.broken:
            stream.pending.clear()
            return
        sock = stream.dst
        try:
            sock.setblocking(True)
            sock.settimeout(_FLUSH_TIMEOUT)
            sock.sendall(stream.pending)
        except OSError:
            stream.broken = True
        finally:
            with contextlib.suppress(OSError):
                sock.setblocking(False)
        stream.pending.clear()

    def _update(self, conn: _Conn) -> None:
        client_mask = server_mask = 0
        if conn.connecting:
            server_mask = selectors.EVENT_WRITE
        else:
            if not conn.down.eof:
                server_mask |= selectors.EVENT_READ
            if conn.up.pending and not conn.up.broken and not conn.stalled:
                server_mask |= selectors.EVENT_WRITE
            if conn.down.pending and not conn.down.broken and not conn.stalled:
                client_mask |= selectors.EVENT_WRITE
        if not conn.up.eof:
            client_mask |= selectors.EVENT_READ
        for sock, mask in ((conn.client, client_mask), (conn.server, server_mask)):
            set_interest(self._selector, sock, mask, conn)


def _kind(framing: str, unit_bytes: bytes) -> str:
    if framing == _TLS:
        return f"tls {unit_bytes[0]}"
    return unit_bytes[:1].decode("latin-1")
