"""Helpers for ``tests/test_failover.py``: one connection string through libpq
and through each pgproto adapter, what each of them did, and a relay that
hides ParameterStatus messages.

The oracle is libpq itself: ``psycopg.pq.PGconn.connect`` is
``PQconnectdb`` (and ``PGconn.ping`` is ``PQping``) from the libpq that
psycopg's binary wheel bundles.  ``psycopg.connect`` is not the oracle for
multi-host strings: psycopg splits them into one single-host attempt per
address, resolves names itself, applies its own timeout and builds its own
message ("Multiple connection attempts failed..."), so it shows psycopg's
loop rather than libpq's.  :func:`psycopg_outcome` is a second opinion on
which server is picked, nothing more.

psycopg holds the GIL while ``PQconnectdb`` and ``PQping`` block (measured:
a thread that ticks every 10 ms ticks twice while libpq waits 2 s on a
silent server).  In this process that would freeze every pgproto client
running beside it -- skewing their timings -- and deadlock on any relay
served by a thread here.  :class:`LibpqWorkers` therefore runs libpq in
worker processes (spawned, so no thread or descriptor of ours is copied).

An :class:`Outcome` says which server a client ended up on (its port and
``pg_is_in_recovery()``), or -- when it failed -- the attempts it made in
order, as :class:`Tried` records (address or host name, port, reason).  For
libpq they are parsed from the error message (one ``connection to server at
"…", port N failed: …`` or ``could not translate host name "…" to address:
…`` paragraph per attempt); for pgproto they come from
``ConnectError.attempts``.

:class:`FilterProxy` relays TCP connections to a server while dropping the
ParameterStatus messages named in ``strip`` (as a server older than 14 would
never send ``in_hot_standby``), and records each session's
``application_name`` and the simple queries the client sent, so a test can
see which ``target_session_attrs`` check a client ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Final, TypeVar

import psycopg
import trio
from pgproto_adapters import asyncio as asyncio_adapter
from pgproto_adapters import blocking
from pgproto_adapters import trio as trio_adapter
from psycopg import pq

import pgproto

__all__ = [
    "ADAPTERS",
    "CLIENTS",
    "FilterProxy",
    "LibpqWorkers",
    "Outcome",
    "ProxySession",
    "Tried",
    "attempt_tried",
    "libpq_outcome",
    "outcome",
    "parse_libpq_message",
    "pgproto_outcome",
    "psycopg_outcome",
    "run_parallel",
]

#: The pgproto adapters, in the order reports list them.
ADAPTERS: Final = ("blocking", "asyncio", "trio")
#: libpq first, then every adapter.
CLIENTS: Final = ("libpq", *ADAPTERS)

#: ParameterStatus names whose values a connection reports (None: not sent).
REPORTED: Final = ("in_hot_standby", "default_transaction_read_only")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Tried:
    """One failed attempt: the address (or the host name that did not resolve),
    the port (None when libpq's message names none), and the reason text."""

    where: str
    port: int | None
    reason: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one client achieved with one connection string."""

    client: str
    port: int | None = None  # the server connected to; None: failed
    in_recovery: bool | None = None  # its pg_is_in_recovery()
    tried: tuple[Tried, ...] = ()  # the failed attempts, when it failed
    ping: pgproto.Ping | None = None  # PQping / ping_outcome, when it failed
    message: str = ""  # the error message, when it failed
    elapsed: float = 0.0  # seconds spent connecting
    reported: tuple[str | None, ...] = ()  # REPORTED parameters, when connected
    error: BaseException | None = None  # pgproto's exception, when it failed

    @property
    def connected(self) -> bool:
        return self.port is not None

    def key(self) -> tuple[object, ...]:
        """What must be equal between libpq and pgproto."""
        return (self.port, self.in_recovery, self.tried, self.ping)

    def describe(self) -> str:
        if self.connected:
            return f"connected to port {self.port} (in recovery: {self.in_recovery})"
        attempts = "; ".join(f"{t.where}:{t.port} {t.reason.splitlines()[0]}" for t in self.tried)
        return f"failed [{attempts}] ping={self.ping!r}" + (
            "" if self.tried else f" {self.message!r}"
        )


# --------------------------------------------------------------------------
# libpq


_LIBPQ_ATTEMPT: Final = re.compile(
    r'connection to server at "(?P<host>[^"]*)"(?: \((?P<ip>[^)]*)\))?, port (?P<port>\d+) '
    r"failed: (?P<reason>.*)"
)
_LIBPQ_RESOLVE: Final = re.compile(r'could not translate host name "(?P<host>[^"]*)" to address: ')


def parse_libpq_message(message: str) -> tuple[Tried, ...]:
    """The attempts in one of libpq's connection error messages, in order.

    Lines that start neither kind of paragraph (``\\tIs the server running
    ...``, ``DETAIL:  ...``) continue the reason of the attempt before them.
    """
    tried: list[Tried] = []
    for line in message.rstrip("\n").split("\n"):
        if match := _LIBPQ_ATTEMPT.fullmatch(line):
            where = match["ip"] or match["host"]
            tried.append(Tried(where, int(match["port"]), match["reason"]))
        elif match := _LIBPQ_RESOLVE.match(line):
            tried.append(Tried(match["host"], None, line))
        elif tried:
            last = tried[-1]
            tried[-1] = dataclasses.replace(last, reason=f"{last.reason}\n{line}")
        else:
            tried.append(Tried("?", None, line))  # shows up as a mismatch
    return tuple(tried)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def libpq_outcome(conninfo: str) -> Outcome:
    """``PQconnectdb(conninfo)``; on failure also ``PQping(conninfo)``."""
    started = time.monotonic()
    conn = pq.PGconn.connect(conninfo.encode())
    elapsed = time.monotonic() - started
    try:
        if conn.status != pq.ConnStatus.OK:
            message = conn.error_message.decode()
            ping = pgproto.Ping(pq.PGconn.ping(conninfo.encode()))
            return Outcome(
                "libpq",
                tried=parse_libpq_message(message),
                ping=ping,
                message=message,
                elapsed=elapsed,
            )
        result = conn.exec_(b"SELECT pg_is_in_recovery()")
        port = _text(conn.port)
        assert port is not None
        return Outcome(
            "libpq",
            port=int(port),
            in_recovery=result.get_value(0, 0) == b"t",
            elapsed=elapsed,
            reported=tuple(_text(conn.parameter_status(name.encode())) for name in REPORTED),
        )
    finally:
        conn.finish()


def psycopg_outcome(conninfo: str) -> Outcome:
    """``psycopg.connect(conninfo)``: psycopg's own loop over libpq (which
    server it picks; its message is psycopg's, so no attempts are parsed)."""
    started = time.monotonic()
    try:
        conn = psycopg.connect(conninfo)
    except psycopg.Error as exc:
        return Outcome("psycopg", message=str(exc), elapsed=time.monotonic() - started)
    elapsed = time.monotonic() - started
    with conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        return Outcome(
            "psycopg", port=conn.info.port, in_recovery=bool(row and row[0]), elapsed=elapsed
        )


# --------------------------------------------------------------------------
# pgproto


AnyConnection = blocking.Connection | asyncio_adapter.Connection | trio_adapter.Connection


def attempt_tried(attempt: pgproto.Attempt) -> Tried:
    """*attempt* as libpq's message names it (no port for a name that did not resolve)."""
    if attempt.address is None:  # the host name did not resolve: libpq names no port
        return Tried(attempt.host or "?", None, str(attempt.error))
    return Tried(attempt.address, attempt.port, str(attempt.error))


def _failed(client: str, exc: Exception, elapsed: float) -> Outcome:
    if isinstance(exc, pgproto.ConnectError):
        return Outcome(
            client,
            tried=tuple(attempt_tried(a) for a in exc.attempts),
            ping=pgproto.ping_outcome(exc),
            message=str(exc),
            elapsed=elapsed,
            error=exc,
        )
    # Anything else is a bug: it must show up as a mismatch with libpq.
    return Outcome(
        client,
        tried=(Tried("?", None, f"unexpected {type(exc).__name__}: {exc}"),),
        message=str(exc),
        elapsed=elapsed,
        error=exc,
    )


def _connected(client: str, conn: AnyConnection, rows: str | None, elapsed: float) -> Outcome:
    params = conn.server_parameters
    return Outcome(
        client,
        port=conn.port,
        in_recovery=rows == "t",
        elapsed=elapsed,
        reported=tuple(params.get(name) for name in REPORTED),
    )


def _blocking(conninfo: str, trace: Callable[[pgproto.Event], None] | None) -> Outcome:
    started = time.monotonic()
    try:
        conn = blocking.connect(conninfo, trace=trace)
    except Exception as exc:
        return _failed("blocking", exc, time.monotonic() - started)
    elapsed = time.monotonic() - started
    with conn:
        [result] = conn.simple_query("SELECT pg_is_in_recovery()")
        return _connected("blocking", conn, result.rows[0][0], elapsed)


async def _async(
    name: str, module: Any, conninfo: str, trace: Callable[[pgproto.Event], None] | None
) -> Outcome:
    """One async adapter (asyncio or trio: the same functions)."""
    started = time.monotonic()
    try:
        conn = await module.connect(conninfo, trace=trace)
    except Exception as exc:
        return _failed(name, exc, time.monotonic() - started)
    elapsed = time.monotonic() - started
    async with conn:
        [result] = await conn.simple_query("SELECT pg_is_in_recovery()")
        return _connected(name, conn, result.rows[0][0], elapsed)


def pgproto_outcome(
    adapter: str, conninfo: str, *, trace: Callable[[pgproto.Event], None] | None = None
) -> Outcome:
    """Connect with one adapter (asyncio and trio get an event loop of their own)."""
    if adapter == "blocking":
        return _blocking(conninfo, trace)
    if adapter == "asyncio":
        return asyncio.run(_async("asyncio", asyncio_adapter, conninfo, trace))
    if adapter == "trio":
        return trio.run(_async, "trio", trio_adapter, conninfo, trace)
    raise ValueError(f"unknown adapter {adapter!r}")


class LibpqWorkers:
    """:func:`libpq_outcome` in worker processes (see the module docstring).

    All processes start at once, in the constructor, so that no descriptor
    appears later (``fdcheck``).  The calling thread waits without the GIL.
    """

    def __init__(self, processes: int) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=processes, mp_context=multiprocessing.get_context("spawn")
        )
        pids = {self._pool.submit(os.getpid).result() for _ in range(processes)}
        assert os.getpid() not in pids

    def outcome(self, conninfo: str) -> Outcome:
        return self._pool.submit(libpq_outcome, conninfo).result()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def outcome(client: str, conninfo: str, libpq: LibpqWorkers) -> Outcome:
    """What *client* ("libpq", "psycopg" or an adapter) does with *conninfo*."""
    if client == "libpq":
        return libpq.outcome(conninfo)
    if client == "psycopg":  # it waits without the GIL: a thread will do
        return psycopg_outcome(conninfo)
    return pgproto_outcome(client, conninfo)


def run_parallel(jobs: Sequence[Callable[[], T]], *, workers: int) -> list[T]:
    """Run *jobs* on a thread pool; results in job order (exceptions re-raised)."""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [future.result() for future in futures]


# --------------------------------------------------------------------------
# a relay that hides ParameterStatus messages


_SSL_REQUEST: Final = 80877103
_GSSENC_REQUEST: Final = 80877104
_STARTUP_TIMEOUT: Final = 10.0


def _recv_exact(sock: socket.socket, count: int) -> bytes | None:
    """Exactly *count* bytes, or None at end of file (or on a socket error)."""
    chunks = bytearray()
    while len(chunks) < count:
        try:
            chunk = sock.recv(count - len(chunks))
        except OSError:
            return None
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def _recv_message(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """One typed protocol message: (header, body)."""
    header = _recv_exact(sock, 5)
    if header is None:
        return None
    (length,) = struct.unpack("!i", header[1:])
    body = _recv_exact(sock, length - 4)
    return None if body is None else (header, body)


@dataclasses.dataclass
class ProxySession:
    """One client connection through a :class:`FilterProxy`."""

    client: socket.socket
    upstream: socket.socket | None = None
    application_name: str | None = None
    queries: list[str] = dataclasses.field(default_factory=list)
    stripped: list[str] = dataclasses.field(default_factory=list)
    threads: list[threading.Thread] = dataclasses.field(default_factory=list)
    _finished: int = 0

    def shutdown(self) -> None:
        """Wake both relay threads (they see end of file)."""
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class FilterProxy:
    """A relay on 127.0.0.1 to ``upstream`` that drops the ParameterStatus
    messages named in ``strip`` and records every session.

    Clients must not ask for TLS (an SSLRequest or GSSENCRequest is answered
    ``N`` by the relay itself, so ``sslmode=prefer`` falls back to plaintext
    and the relay can read the stream).  Each session runs on two threads, one
    per direction; :meth:`close` shuts every socket down and joins them.
    """

    def __init__(self, upstream: tuple[str, int], *, strip: Iterable[str] = ()) -> None:
        self.upstream: Final = upstream
        self.strip: Final = frozenset(strip)
        self.host: Final = "127.0.0.1"
        self._listener = socket.create_server((self.host, 0))
        self._listener.settimeout(0.1)  # the accept loop checks for close() this often
        self.port: Final[int] = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sessions: list[ProxySession] = []
        self._closing = threading.Event()
        self._errors: list[BaseException] = []
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="filter-proxy", daemon=True
        )
        self._acceptor.start()

    def sessions(self, application_name: str | None = None) -> list[ProxySession]:
        """Sessions so far (those of one ``application_name`` if given), in order."""
        with self._lock:
            return [
                s
                for s in self._sessions
                if application_name is None or s.application_name == application_name
            ]

    def queries(self, application_name: str) -> list[list[str]]:
        """The queries of each session of *application_name*."""
        return [list(s.queries) for s in self.sessions(application_name)]

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._closing.is_set():
                    self._errors.append(exc)
                return
            client.settimeout(None)
            session = ProxySession(client)
            thread = threading.Thread(
                target=self._client_to_server, args=(session,), name="proxy-c2s", daemon=True
            )
            session.threads.append(thread)
            with self._lock:
                self._sessions.append(session)
            thread.start()

    def _finish(self, session: ProxySession) -> None:
        session.shutdown()
        with self._lock:
            session._finished += 1
            last = session._finished == len(session.threads)
        if last:
            session.client.close()
            if session.upstream is not None:
                session.upstream.close()

    def _client_to_server(self, session: ProxySession) -> None:
        try:
            self._relay_client(session)
        except BaseException as exc:  # surfaced by close()
            self._errors.append(exc)
        finally:
            self._finish(session)

    def _relay_client(self, session: ProxySession) -> None:
        client = session.client
        while True:  # the startup packet, after any encryption request
            head = _recv_exact(client, 4)
            if head is None:
                return
            (length,) = struct.unpack("!i", head)
            body = _recv_exact(client, length - 4)
            if body is None:
                return
            (code,) = struct.unpack("!i", body[:4])
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                client.sendall(b"N")
                continue
            break
        fields = body[4:].split(b"\x00")
        params = dict(zip(fields[0::2], fields[1::2], strict=False))
        name = params.get(b"application_name")
        session.application_name = None if name is None else name.decode()
        upstream = socket.create_connection(self.upstream, timeout=_STARTUP_TIMEOUT)
        upstream.settimeout(None)
        session.upstream = upstream
        thread = threading.Thread(
            target=self._server_to_client, args=(session,), name="proxy-s2c", daemon=True
        )
        with self._lock:
            session.threads.append(thread)
        thread.start()
        upstream.sendall(head + body)
        while (message := _recv_message(client)) is not None:
            header, payload = message
            if header[:1] == b"Q":
                session.queries.append(payload.rstrip(b"\x00").decode())
            try:
                upstream.sendall(header + payload)
            except OSError:
                return

    def _server_to_client(self, session: ProxySession) -> None:
        try:
            assert session.upstream is not None
            while (message := _recv_message(session.upstream)) is not None:
                header, payload = message
                if header[:1] == b"S":
                    name = payload.split(b"\x00", 1)[0].decode()
                    if name in self.strip:
                        session.stripped.append(name)
                        continue
                try:
                    session.client.sendall(header + payload)
                except OSError:
                    return
        except BaseException as exc:  # surfaced by close()
            self._errors.append(exc)
        finally:
            self._finish(session)

    def close(self) -> None:
        """Stop accepting, end every session and join the threads."""
        self._closing.set()
        self._acceptor.join(timeout=10)
        self._listener.close()
        for session in self.sessions():
            session.shutdown()
        for session in self.sessions():
            for thread in list(session.threads):
                thread.join(timeout=10)
                if thread.is_alive():
                    raise RuntimeError("a filter proxy thread did not stop")
        if self._errors:
            raise RuntimeError(f"filter proxy failed: {self._errors!r}") from self._errors[0]

    def __enter__(self) -> FilterProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
