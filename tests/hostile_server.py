"""A scriptable fake PostgreSQL server on a real socket, for attack tests.

:class:`HostileServer` listens on ``127.0.0.1`` (a random port) with an
asyncio loop running in a background thread, so that the blocking adapter
and every async adapter (asyncio, trio, anyio) can connect to it from the
test's thread.  Each accepted connection runs the current *script*: a
coroutine function taking a :class:`Peer`, which speaks the server's side
one step at a time -- read the SSLRequest or startup packet, answer ``S`` /
``N`` / anything, switch to TLS (memory-BIO server side, with or without
ALPN; direct TLS when the client opens with a ClientHello), read typed
client messages, send any bytes, hang up.  Scripts may misbehave at every
step; :func:`scram_server` gives them a correct SCRAM-SHA-256(-PLUS)
exchange to start from, with scramp as the engine (no code shared with
pgproto).

Every byte the client sent is recorded per connection, as plaintext (TLS
records decrypted; the handshake itself left out) in :attr:`Record.plaintext`,
so a test can assert that no password, no SCRAM proof, no startup packet went
out where it must not.  After the script returns (or fails), the connection
is drained until the client closes it -- still recording -- and only then
closed, so the record is complete once :meth:`HostileServer.wait_idle`
returns.  The client has to hang up by itself: a client that waits instead
of refusing runs into its own ``connect_timeout``.

``cut_after`` (see :meth:`HostileServer.serve`) ends the server's output
after that many bytes on the wire (a half-close: the client sees EOF at that
exact offset of the transcript).

Imported by the tests as the top-level module ``hostile_server``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import ssl
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import scramp  # type: ignore[import-untyped]
from capture import CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, SSL_REQUEST_CODE, TLS_HANDSHAKE
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from fake_server import AUTH_OK, ClientMessage, auth, sasl, startup_done

__all__ = [
    "ClientEOF",
    "HostileServer",
    "Peer",
    "Record",
    "ScramParts",
    "Script",
    "Startup",
    "TLSFailed",
    "cert_end_point",
    "finish_startup",
    "parse_client_stream",
    "scram_server",
    "tamper_signature",
]

#: How long a script may run, and how long the drain waits for the client to
#: hang up: generous, only there so that a broken test cannot hang the suite.
SCRIPT_TIMEOUT: Final = 20.0
DRAIN_TIMEOUT: Final = 20.0

_UINT32: Final = struct.Struct("!I")


class ClientEOF(Exception):
    """The client closed the connection while the script was reading."""


class TLSFailed(Exception):
    """The server side of the TLS handshake failed (the client refused it)."""


class _Cut(Exception):
    """Internal: the ``cut_after`` budget is spent; the output was closed."""


@dataclass
class Startup:
    """The first packet of a connection.

    ``kind`` is ``"ssl"`` (SSLRequest), ``"gss"`` (GSSENCRequest),
    ``"cancel"``, ``"startup"`` (a StartupMessage; ``version`` and
    ``params`` filled) or ``"tls"`` (a ClientHello: direct TLS; nothing was
    consumed, call :meth:`Peer.start_tls`).
    """

    kind: str
    version: tuple[int, int] = (0, 0)
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class Record:
    """What happened on one accepted connection."""

    index: int
    plaintext: bytearray = field(default_factory=bytearray)
    wire_sent: int = 0  # bytes the server wrote on the socket
    tls: bool = False  # a TLS handshake completed
    direct_tls: bool = False
    alpn: str | None = None
    tls_error: str | None = None
    cut: bool = False
    client_closed: bool = False  # the client hung up (EOF seen)
    script_error: BaseException | None = None  # a script bug or an unexpected client move
    done: threading.Event = field(default_factory=threading.Event)

    def messages(self) -> list[ClientMessage]:
        """The client's plaintext cut into messages (see :func:`parse_client_stream`)."""
        return parse_client_stream(bytes(self.plaintext))


def parse_client_stream(data: bytes) -> list[ClientMessage]:
    """Client bytes as messages: any SSLRequest/GSSENCRequest packets, one
    startup packet (kind ``b""``), then typed messages.  A trailing partial
    message is returned as kind ``b"?"`` with what there is."""
    out: list[ClientMessage] = []
    pos = 0
    untyped = True
    while pos < len(data):
        if untyped:
            if len(data) - pos < 8:
                out.append(ClientMessage(b"?", data[pos:]))
                break
            (length,) = _UINT32.unpack_from(data, pos)
            (code,) = _UINT32.unpack_from(data, pos + 4)
            if length < 8 or len(data) - pos < length:
                out.append(ClientMessage(b"?", data[pos:]))
                break
            out.append(ClientMessage(b"", data[pos + 4 : pos + length]))
            pos += length
            if code not in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
                untyped = False
        else:
            if len(data) - pos < 5:
                out.append(ClientMessage(b"?", data[pos:]))
                break
            kind = data[pos : pos + 1]
            (length,) = _UINT32.unpack_from(data, pos + 1)
            if length < 4 or len(data) - pos < 1 + length:
                out.append(ClientMessage(b"?", data[pos:]))
                break
            out.append(ClientMessage(kind, data[pos + 5 : pos + 1 + length]))
            pos += 1 + length
    return out


class Peer:
    """The server's end of one connection, for a script."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: Record,
        cut_after: int | None,
    ) -> None:
        self.record = record
        self._reader = reader
        self._writer = writer
        self._cut_after = cut_after
        self._buf = bytearray()  # received, not yet consumed (plaintext or, before TLS, raw)
        self._tls: ssl.SSLObject | None = None
        self._in_bio: ssl.MemoryBIO | None = None
        self._out_bio: ssl.MemoryBIO | None = None
        self._eof = False
        self.write_closed = False

    # -- receiving ------------------------------------------------------------

    async def _fill(self) -> bool:
        """Read more from the client into the buffer; False at EOF."""
        while True:
            if self._tls is not None and await self._decrypt():
                return True
            if self._eof:
                return False
            raw = await self._reader.read(65536)
            if not raw:
                self._eof = True
                self.record.client_closed = True
                return False
            if self._tls is None:
                self._buf += raw
                return True
            assert self._in_bio is not None
            self._in_bio.write(raw)

    async def _decrypt(self) -> bool:
        """Move what TLS can decrypt now into the buffer; True if anything came."""
        assert self._tls is not None
        got = False
        while True:
            try:
                chunk = self._tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLError):
                # close_notify or a broken record: no more plaintext.
                self._eof = True
                self.record.client_closed = True
                break
            if not chunk:
                break
            self._buf += chunk
            got = True
        await self._flush_tls()
        return got

    def _consume(self, count: int) -> bytes:
        data = bytes(self._buf[:count])
        del self._buf[:count]
        self.record.plaintext += data
        return data

    async def _need(self, count: int) -> None:
        while len(self._buf) < count:
            if not await self._fill():
                raise ClientEOF(f"client closed the connection ({len(self._buf)} of {count} bytes)")

    async def read_startup(self) -> Startup:
        """The next untyped packet (or the start of a direct-TLS ClientHello)."""
        await self._need(1)
        if self._tls is None and self._buf[0] == TLS_HANDSHAKE:
            return Startup("tls")
        await self._need(8)
        (length,) = _UINT32.unpack_from(self._buf)
        if length < 8 or length > 10000:
            raise AssertionError(f"bad startup packet length {length}")
        await self._need(length)
        packet = self._consume(length)
        (code,) = _UINT32.unpack_from(packet, 4)
        if code == SSL_REQUEST_CODE:
            return Startup("ssl")
        if code == GSSENC_REQUEST_CODE:
            return Startup("gss")
        if code == CANCEL_REQUEST_CODE:
            return Startup("cancel")
        # Not fake_server.startup_parameters: that one insists on the final
        # terminator, this one takes a bare version (length 8) too.
        items = packet[8:].split(b"\x00")
        pairs = items[:-2]
        params = {pairs[i].decode(): pairs[i + 1].decode() for i in range(0, len(pairs) - 1, 2)}
        return Startup("startup", (code >> 16, code & 0xFFFF), params)

    async def read_message(self) -> ClientMessage:
        """The next typed client message."""
        await self._need(5)
        (length,) = _UINT32.unpack_from(self._buf, 1)
        if length < 4 or length > 100_000:
            raise AssertionError(f"bad client message length {length}")
        await self._need(1 + length)
        data = self._consume(1 + length)
        return ClientMessage(data[:1], data[5:])

    async def read_raw(self) -> bytes:
        """Whatever bytes arrive next, not recorded: for a ClientHello the
        script will not answer with TLS."""
        if not self._buf and not await self._fill():
            raise ClientEOF("client closed the connection")
        data = bytes(self._buf)
        self._buf.clear()
        return data

    async def drain(self) -> None:
        """Record everything until the client hangs up."""
        while await self._fill():
            self._consume(len(self._buf))
        self._consume(len(self._buf))

    # -- sending --------------------------------------------------------------

    async def _write_raw(self, data: bytes) -> None:
        if self.write_closed or not data:
            return
        if self._cut_after is not None:
            room = self._cut_after - self.record.wire_sent
            if len(data) > room:
                data = data[: max(room, 0)]
                if data:
                    self._writer.write(data)
                    self.record.wire_sent += len(data)
                self.record.cut = True
                await self.close()
                raise _Cut
        self._writer.write(data)
        self.record.wire_sent += len(data)
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    async def _flush_tls(self) -> None:
        if self._out_bio is not None:
            await self._write_raw(self._out_bio.read())

    async def send(self, *chunks: bytes) -> None:
        """Send *chunks* (encrypted once TLS is on), as one write."""
        data = b"".join(chunks)
        if self._tls is None:
            await self._write_raw(data)
            return
        self._tls.write(data)
        await self._flush_tls()

    async def close(self) -> None:
        """Hang up our side (a half-close: EOF for the client); the
        connection is drained and closed once the script returns."""
        if not self.write_closed:
            self.write_closed = True
            with contextlib.suppress(OSError):
                if self._writer.can_write_eof():
                    self._writer.write_eof()

    # -- TLS ------------------------------------------------------------------

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Run the server side of a TLS handshake; afterwards :meth:`send`
        encrypts and the read methods decrypt.  Bytes already received (a
        direct-TLS ClientHello) are handed to TLS, not recorded.  Raises
        :class:`TLSFailed` if the handshake fails, :class:`ClientEOF` if the
        client hangs up during it."""
        in_bio, out_bio = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(in_bio, out_bio, server_side=True)
        if self._buf:
            self.record.direct_tls = True
            in_bio.write(bytes(self._buf))
            self._buf.clear()
        self._in_bio, self._out_bio = in_bio, out_bio
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush_tls()
                raw = await self._reader.read(65536)
                if not raw:
                    self._eof = True
                    self.record.client_closed = True
                    self.record.tls_error = "client closed the connection during the handshake"
                    raise ClientEOF("client closed the connection during the handshake") from None
                in_bio.write(raw)
            except ssl.SSLError as exc:
                self.record.tls_error = str(exc)
                with contextlib.suppress(_Cut):
                    await self._flush_tls()
                raise TLSFailed(str(exc)) from exc
        self._tls = obj
        self.record.tls = True
        self.record.alpn = obj.selected_alpn_protocol()
        await self._flush_tls()


#: A connection's script.
Script = Callable[[Peer], Awaitable[None]]


class HostileServer:
    """The listening socket, the loop thread, the current script, the records.

    Use as a context manager (or :meth:`start` / :meth:`stop`).  Per test:
    :meth:`serve` sets the script (and forgets old records), the client
    connects to :attr:`port`, then :meth:`wait_idle` returns the records once
    every connection has been drained and closed.
    """

    def __init__(self) -> None:
        self.port = 0
        self.records: list[Record] = []
        self._script: Script | None = None
        self._cut_after: int | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="hostile-server", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def start(self) -> HostileServer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(timeout=10)
        return self

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            # Connections first: Server.wait_closed() may wait for them.
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=5)
            if self._server is not None:
                await asyncio.wait_for(self._server.wait_closed(), 5)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- per test -------------------------------------------------------------

    def serve(self, script: Script, *, cut_after: int | None = None) -> None:
        """Run *script* for every following connection; forget old records."""
        with self._lock:
            self._script = script
            self._cut_after = cut_after
            self.records = []

    def wait_idle(self, timeout: float = DRAIN_TIMEOUT + 5) -> list[Record]:
        """Wait until every connection accepted so far is finished; return
        the records (the script's failures are re-raised by the caller's
        checks, see :attr:`Record.script_error`)."""
        with self._lock:
            records = list(self.records)
        for record in records:
            if not record.done.wait(timeout):
                raise AssertionError(f"connection {record.index} still open after {timeout} s")
        return records

    # -- the connection handler ----------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            record = Record(index=len(self.records))
            self.records.append(record)
            script, cut_after = self._script, self._cut_after
        peer = Peer(reader, writer, record, cut_after)
        try:
            try:
                if script is not None:
                    async with asyncio.timeout(SCRIPT_TIMEOUT):
                        await script(peer)
            except (_Cut, ClientEOF, TLSFailed):
                pass  # a TLS failure is in record.tls_error
            except Exception as exc:  # a script bug, or the client did something unplanned
                record.script_error = exc
            with contextlib.suppress(Exception):
                async with asyncio.timeout(DRAIN_TIMEOUT):
                    await peer.drain()
        except asyncio.CancelledError:
            pass  # stop(): the server is going away; end quietly
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)
            record.done.set()


# --------------------------------------------------------------------------
# SCRAM, server side (scramp)


def cert_end_point(cert_pem: bytes) -> bytes:
    """tls-server-end-point channel binding data for a server certificate
    (RFC 5929: its signature hash, SHA-256 for MD5/SHA-1)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    return hashlib.new(algorithm.name, cert.public_bytes(Encoding.DER)).digest()


_SALT: Final = b"hostile-server-salt!"
_ITERATIONS: Final = 4096


@functools.cache
def _auth_info(password: str) -> tuple[Any, ...]:
    """scramp's stored verifier for *password* (computed once: PBKDF2 is slow)."""
    mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
    info: tuple[Any, ...] = mechanism.make_auth_info(
        password, iteration_count=_ITERATIONS, salt=_SALT
    )
    return info


@dataclass
class ScramParts:
    """The messages of one SCRAM exchange, as the client and scramp said them."""

    mechanism: str = ""
    client_first: str = ""
    server_first: str = ""
    client_final: str = ""
    server_final: str = ""


async def scram_server(
    peer: Peer,
    password: str,
    *,
    offer: tuple[str, ...] = ("SCRAM-SHA-256",),
    cb_data: bytes | None = None,
    server_first: Callable[[ScramParts], str] | None = None,
    server_final: Callable[[ScramParts], str] | None = None,
    stop_after: str | None = None,
) -> ScramParts:
    """A SCRAM exchange with scramp as the server: AuthenticationSASL
    offering *offer*, then Continue and Final.  *server_first* /
    *server_final* may replace what scramp would send (they see what was
    said so far, scramp's own message included); *stop_after*
    (``"sasl"``, ``"initial"``, ``"continue"``, ``"final-response"``)
    returns early at that point.  Does not send
    AuthenticationOk."""
    parts = ScramParts()
    await peer.send(sasl(*offer))
    if stop_after == "sasl":
        return parts
    initial = await peer.read_message()
    if initial.kind != b"p":
        raise AssertionError(f"expected SASLInitialResponse, got {initial.kind!r}")
    mechanism, _, rest = initial.body.partition(b"\x00")
    parts.mechanism = mechanism.decode()
    (length,) = struct.unpack_from("!i", rest)
    parts.client_first = rest[4 : 4 + length].decode()
    if stop_after == "initial":
        return parts
    info = _auth_info(password)
    binding = ("tls-server-end-point", cb_data) if parts.mechanism.endswith("-PLUS") else None
    server = scramp.ScramMechanism(parts.mechanism).make_server(
        lambda _user: info, channel_binding=binding
    )
    # scramp insists on a user name; PostgreSQL ignores it and libpq sends
    # "n=".  Only scramp's parser sees a substitute: the AuthMessage is
    # computed over the client-first-message-bare exactly as received.
    gs2, sep, bare = parts.client_first.partition(",,")
    if bare.startswith("n=,"):
        server.set_client_first(gs2 + sep + "n=user" + bare[2:])
        server.client_first_bare = bare
    else:
        server.set_client_first(parts.client_first)
    parts.server_first = server.get_server_first()
    if server_first is not None:
        parts.server_first = server_first(parts)
    await peer.send(auth(11, parts.server_first.encode()))
    if stop_after == "continue":
        return parts
    final = await peer.read_message()
    if final.kind != b"p":
        raise AssertionError(f"expected SASLResponse, got {final.kind!r}")
    parts.client_final = final.body.decode()
    if stop_after == "final-response":
        return parts
    with contextlib.suppress(scramp.ScramException):  # the verdict travels as e=...
        server.set_client_final(parts.client_final)
    parts.server_final = server.get_server_final()
    if server_final is not None:
        parts.server_final = server_final(parts)
    await peer.send(auth(12, parts.server_final.encode()))
    return parts


def tamper_signature(parts: ScramParts) -> str:
    """scramp's server-final with one bit of the signature flipped."""
    signature = bytearray(base64.b64decode(parts.server_final[2:]))
    signature[0] ^= 1
    return "v=" + base64.b64encode(bytes(signature)).decode()


async def finish_startup(peer: Peer, **startup: Any) -> None:
    """AuthenticationOk and the startup burst; then wait for the client."""
    await peer.send(AUTH_OK, startup_done(**startup))
