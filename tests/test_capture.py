"""Tests of the capture relay (tests/capture.py) and the ``syn_blackhole`` fixture.

They also pin down what libpq 18 (psycopg's binary build) sends on the wire:
TLS negotiation and the two cancel paths.
"""

from __future__ import annotations

import ctypes
import errno
import selectors
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pg_admin
import psycopg
import pytest
from capture import (
    CANCEL_REQUEST_CODE,
    Capture,
    CaptureRelay,
    client_tls_start,
    contains_plaintext_cancel,
    ends_with_tls_alert,
    first_packet_kind,
    last_client_record_lengths,
    measure_close_notify,
    tls_records,
)
from fdcheck import assert_no_fd_leak, open_fds
from pgproto_adapters._cluster import Cluster
from servers import SynBlackhole, TLSMaterial, connect_params


def _i32(value: int) -> bytes:
    return value.to_bytes(4, "big")


SSL_REQUEST = _i32(8) + _i32(80877103)
GSSENC_REQUEST = _i32(8) + _i32(80877104)
STARTUP_30 = _i32(41) + _i32(196608) + b"user\x00postgres\x00database\x00postgres\x00\x00"
STARTUP_32 = _i32(41) + _i32(196610) + b"user\x00postgres\x00database\x00postgres\x00\x00"


def _cancel(pid: int, key: bytes = b"\x01\x02\x03\x04") -> bytes:
    return _i32(12 + len(key)) + _i32(CANCEL_REQUEST_CODE) + _i32(pid) + key


def _record(content_type: int, payload: bytes, version: bytes = b"\x03\x03") -> bytes:
    return bytes([content_type]) + version + len(payload).to_bytes(2, "big") + payload


CLIENT_HELLO = _record(22, b"\x01" + bytes(60), version=b"\x03\x01")


# --------------------------------------------------------------------------
# Pure helpers on hand-made bytes
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "empty"),
        (SSL_REQUEST, "ssl_request"),
        (SSL_REQUEST + CLIENT_HELLO, "ssl_request"),
        (GSSENC_REQUEST, "gssenc_request"),
        (_cancel(4242), "cancel_request"),
        (_cancel(4242, bytes(32)), "cancel_request"),  # protocol 3.2 key
        (_cancel(4242, bytes(256)), "cancel_request"),  # the longest key
        (_cancel(4242, bytes(257)), "other"),
        (_cancel(4242, b""), "other"),  # length 12: no key
        (STARTUP_30, "startup"),
        (STARTUP_32, "startup"),
        (_i32(41) + _i32(2 << 16), "other"),  # protocol 2.0
        (CLIENT_HELLO, "direct_tls"),
        (b"\x16\x03", "direct_tls"),
        (b"\x16\x02", "other"),
        (SSL_REQUEST[:7], "other"),
        (_i32(9) + _i32(80877103), "other"),  # SSLRequest code with a wrong length
        (b"GET / HTTP/1.1\r\n", "other"),
    ],
)
def test_first_packet_kind(data: bytes, kind: str) -> None:
    assert first_packet_kind(data) == kind


def test_contains_plaintext_cancel() -> None:
    cancel = _cancel(4242)
    assert contains_plaintext_cancel(cancel)
    assert contains_plaintext_cancel(cancel, 4242)
    assert not contains_plaintext_cancel(cancel, 4243)
    assert contains_plaintext_cancel(b"noise" + _cancel(7, bytes(32)) + b"more", 7)
    # the code alone, or with an impossible length, is not a header
    assert not contains_plaintext_cancel(_i32(CANCEL_REQUEST_CODE) + _i32(4242))
    assert not contains_plaintext_cancel(_i32(8) + _i32(CANCEL_REQUEST_CODE) + _i32(4242))
    # a second occurrence is found after a false one
    data = _i32(0) + _i32(CANCEL_REQUEST_CODE) + _cancel(99)
    assert contains_plaintext_cancel(data, 99)
    assert not contains_plaintext_cancel(SSL_REQUEST + CLIENT_HELLO)
    assert not contains_plaintext_cancel(b"")


def test_tls_records() -> None:
    stream = SSL_REQUEST + CLIENT_HELLO + _record(20, b"\x01") + _record(23, bytes(69))
    assert tls_records(stream, 8) == [(22, 61), (20, 1), (23, 69)]
    assert tls_records(stream, len(stream)) == []
    with pytest.raises(ValueError, match="malformed"):
        tls_records(stream, 0)  # the SSLRequest is no TLS record
    with pytest.raises(ValueError, match="malformed"):
        tls_records(_record(99, b"x"), 0)
    with pytest.raises(ValueError, match="malformed"):
        tls_records(b"\x17\x03\x03\xff\xff" + bytes(0xFFFF), 0)  # longer than TLS allows
    with pytest.raises(ValueError, match="needs 69 bytes"):
        tls_records(_record(23, bytes(69))[:-1], 0)
    with pytest.raises(ValueError, match="truncated"):
        tls_records(_record(23, bytes(3)) + b"\x17\x03", 0)


def test_client_tls_start() -> None:
    assert client_tls_start(CLIENT_HELLO) == 0
    assert client_tls_start(SSL_REQUEST + CLIENT_HELLO) == 8
    assert client_tls_start(SSL_REQUEST) is None  # no answer yet, or the server refused
    assert client_tls_start(SSL_REQUEST + STARTUP_30) is None  # refused: startup in clear
    assert client_tls_start(STARTUP_30) is None
    assert client_tls_start(GSSENC_REQUEST + STARTUP_30) is None
    assert client_tls_start(b"") is None


def test_alert_and_record_lengths() -> None:
    tls12 = SSL_REQUEST + CLIENT_HELLO + _record(23, bytes(29)) + _record(21, bytes(26))
    assert ends_with_tls_alert(tls12)
    assert last_client_record_lengths(tls12) == [29, 26]
    tls13 = CLIENT_HELLO + _record(23, bytes(69)) + _record(23, bytes(22)) + _record(23, bytes(19))
    assert not ends_with_tls_alert(tls13)  # a TLS 1.3 alert has the outer type 23
    assert last_client_record_lengths(tls13) == [22, 19]
    assert last_client_record_lengths(tls13, 3) == [69, 22, 19]
    assert last_client_record_lengths(tls13, 10) == [61, 69, 22, 19]
    assert last_client_record_lengths(tls13, 0) == []
    assert not ends_with_tls_alert(STARTUP_30)
    assert last_client_record_lengths(STARTUP_30) == []
    assert ends_with_tls_alert(SSL_REQUEST + CLIENT_HELLO + _record(21, bytes(2)))


def test_ends_with_tls_alert_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="malformed"):
        ends_with_tls_alert(SSL_REQUEST + CLIENT_HELLO + b"\x00" * 9)


def test_close_notify_tls13_is_a_19_byte_application_data_record() -> None:
    version, cipher, records = measure_close_notify()
    assert version == "TLSv1.3"
    assert cipher in {
        "TLS_AES_256_GCM_SHA384",
        "TLS_AES_128_GCM_SHA256",
        "TLS_CHACHA20_POLY1305_SHA256",
    }
    assert records == [(23, 5 + 1 + 16), (23, 2 + 1 + 16)]


def test_close_notify_tls12_is_an_alert_record() -> None:
    version, cipher, records = measure_close_notify(ssl.TLSVersion.TLSv1_2)
    assert version == "TLSv1.2"
    assert "GCM" in cipher
    assert records == [(23, 8 + 5 + 16), (21, 8 + 2 + 16)]  # explicit nonce + data + tag
    version, cipher, records = measure_close_notify(
        ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
    )
    assert "CHACHA20" in cipher
    assert records == [(23, 5 + 16), (21, 2 + 16)]


# --------------------------------------------------------------------------
# The relay over plain sockets
# --------------------------------------------------------------------------


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def target() -> Iterator[socket.socket]:
    """A listening socket for the relay to connect to; accept() times out after 10 s."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        yield listener


def _port(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def test_relay_client_half_close(target: socket.socket) -> None:
    with CaptureRelay("127.0.0.1", _port(target)) as relay:
        with socket.create_connection((relay.host, relay.port), timeout=10) as client:
            server, _ = target.accept()
            with server:
                server.settimeout(10)
                client.sendall(b"hello")
                client.shutdown(socket.SHUT_WR)
                assert _read_to_eof(server) == b"hello"  # the EOF went through
                server.sendall(b"world")
                server.shutdown(socket.SHUT_WR)
                assert _read_to_eof(client) == b"world"
        assert relay.wait_closed(1)
        assert relay.captures() == [Capture(b"hello", b"world", closed=True)]


def test_relay_server_closes_first(target: socket.socket) -> None:
    with CaptureRelay("127.0.0.1", _port(target)) as relay:
        with socket.create_connection((relay.host, relay.port), timeout=10) as client:
            server, _ = target.accept()
            client.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
            with server:
                server.settimeout(10)
                assert server.recv(8) == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
                server.sendall(b"N")
            # the client, still able to write, sees the server's data then its EOF
            assert _read_to_eof(client) == b"N"
            assert not relay.captures()[0].closed
        assert relay.wait_closed(1)
        (capture,) = relay.captures()
        assert capture.server_bytes == b"N"
        assert first_packet_kind(capture.client_bytes) == "ssl_request"


def test_relay_bulk_both_ways(target: socket.socket) -> None:
    """More than the relay buffers per direction (1 MiB), both ways at once."""
    up = bytes(range(256)) * 12_000  # ~3 MB
    down = bytes(reversed(range(256))) * 10_000
    with CaptureRelay("127.0.0.1", _port(target)) as relay, ThreadPoolExecutor(2) as pool:
        with socket.create_connection((relay.host, relay.port), timeout=10) as client:
            server, _ = target.accept()
            with server:
                server.settimeout(10)

                def send(sock: socket.socket, data: bytes) -> None:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)

                sent = [pool.submit(send, client, up), pool.submit(send, server, down)]
                assert _read_to_eof(server) == up
                assert _read_to_eof(client) == down
                for future in sent:
                    future.result(timeout=10)
        assert relay.wait_closed(1)
        assert relay.captures() == [Capture(up, down, closed=True)]


def test_relay_many_connections_in_accept_order(target: socket.socket) -> None:
    with CaptureRelay("127.0.0.1", _port(target)) as relay:
        for index in range(5):
            with socket.create_connection((relay.host, relay.port), timeout=10) as client:
                server, _ = target.accept()
                with server:
                    client.sendall(b"c%d" % index)
                    client.shutdown(socket.SHUT_WR)
                    server.sendall(b"s%d" % index)
            assert relay.wait_closed(index + 1)
        assert [(c.client_bytes, c.server_bytes) for c in relay.captures()] == [
            (b"c%d" % i, b"s%d" % i) for i in range(5)
        ]


def test_relay_unreachable_target(closed_port: int) -> None:
    with CaptureRelay("127.0.0.1", closed_port) as relay:
        with socket.create_connection((relay.host, relay.port), timeout=10) as client:
            assert _read_to_eof(client) == b""
        assert relay.wait_closed(1)
        (capture,) = relay.captures()
        assert capture.closed
        assert isinstance(capture.target_error, OSError)
        assert capture.target_error.errno == errno.ECONNREFUSED


def test_relay_wait_for_and_timeout(target: socket.socket) -> None:
    with CaptureRelay("127.0.0.1", _port(target)) as relay:
        assert not relay.wait_closed(1, timeout=0.05)
        with socket.create_connection((relay.host, relay.port), timeout=10) as client:
            server, _ = target.accept()
            with server:
                client.sendall(b"ping")
                assert relay.wait_for(lambda cs: bool(cs) and cs[0].client_bytes == b"ping")
                assert not relay.captures()[0].closed
        assert relay.wait_closed(1)


def test_relay_leaks_no_descriptors(target: socket.socket) -> None:
    with assert_no_fd_leak():
        relay = CaptureRelay("127.0.0.1", _port(target))
        with relay:
            # descriptors of live relayed connections are the relay's own
            with (
                assert_no_fd_leak(ignore=relay.owned_fds),
                socket.create_connection((relay.host, relay.port), timeout=10) as client,
            ):
                server, _ = target.accept()
                with server:
                    client.sendall(b"x")
                    assert relay.wait_for(lambda cs: cs[0].client_bytes == b"x")
                    # listener, wake pair, selector, both relayed sockets
                    assert len(relay.owned_fds() & open_fds()) == 6
            assert relay.wait_closed(1)
            # a connection still open when the relay closes is closed with it
            client = socket.create_connection((relay.host, relay.port), timeout=10)
            server, _ = target.accept()
            assert relay.wait_for(lambda cs: len(cs) == 2)
        assert not relay.owned_fds() & open_fds()
        with client, server:
            assert _read_to_eof(client) == b""  # the relay closed its end
            assert _read_to_eof(server) == b""
        assert relay.captures()[1] == Capture(b"", b"", closed=False)
    relay.close()  # idempotent


# --------------------------------------------------------------------------
# libpq through the relay
# --------------------------------------------------------------------------


@pytest.fixture
def relay(pg18: Cluster) -> Iterator[CaptureRelay]:
    with CaptureRelay(pg18.host, pg18.port) as relay:
        yield relay


def _params(
    pg18: Cluster, tls_material: TLSMaterial, relay: CaptureRelay, **extra: str
) -> dict[str, Any]:
    return connect_params(pg18, "tcp", tls_material, host=relay.host, port=str(relay.port), **extra)


def _session(
    pg18: Cluster, tls_material: TLSMaterial, relay: CaptureRelay, **extra: str
) -> tuple[Capture, dict[str, str]]:
    """Connect through the relay, note the TLS attributes, close; return the capture."""
    with psycopg.connect(**_params(pg18, tls_material, relay, **extra)) as conn:
        row = conn.execute(
            "SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
        assert row is not None
        attributes = {"protocol": row[1], "cipher": row[2]} if row[0] else {}
    assert relay.wait_closed(1)
    (capture,) = relay.captures()
    return capture, attributes


def test_libpq_plaintext(pg18: Cluster, tls_material: TLSMaterial, relay: CaptureRelay) -> None:
    capture, attributes = _session(pg18, tls_material, relay, sslmode="disable")
    assert attributes == {}
    assert first_packet_kind(capture.client_bytes) == "startup"
    assert b"user\x00postgres\x00" in capture.client_bytes
    assert client_tls_start(capture.client_bytes) is None
    assert capture.client_bytes.endswith(b"X\x00\x00\x00\x04")  # Terminate
    assert capture.server_bytes.startswith(b"R\x00\x00\x00\x08\x00\x00\x00\x00")  # AuthOk


def test_libpq_sslrequest(pg18: Cluster, tls_material: TLSMaterial, relay: CaptureRelay) -> None:
    capture, attributes = _session(pg18, tls_material, relay, sslmode="require")
    data = capture.client_bytes
    assert first_packet_kind(data) == "ssl_request"
    assert capture.server_bytes[:1] == b"S"
    assert client_tls_start(data) == 8
    assert first_packet_kind(data[8:]) == "direct_tls"  # a ClientHello, not a startup packet
    assert b"postgresql" in data  # libpq sends ALPN "postgresql" after an SSLRequest too
    assert b"user\x00postgres" not in data
    records = tls_records(data, 8)  # the whole rest parses as TLS
    assert records[0][0] == 22
    _assert_close_notify(data, attributes)


def test_libpq_direct_tls(pg18: Cluster, tls_material: TLSMaterial, relay: CaptureRelay) -> None:
    capture, attributes = _session(
        pg18, tls_material, relay, sslmode="require", sslnegotiation="direct"
    )
    data = capture.client_bytes
    assert first_packet_kind(data) == "direct_tls"
    assert client_tls_start(data) == 0
    assert b"postgresql" in data  # the ALPN protocol name, in the clear ClientHello
    assert b"user\x00postgres" not in data
    _assert_close_notify(data, attributes)


def _assert_close_notify(data: bytes, attributes: dict[str, str]) -> None:
    """libpq's PQfinish sends Terminate, then SSL_shutdown() sends close_notify."""
    if attributes["protocol"] == "TLSv1.3":
        assert not ends_with_tls_alert(data)
        assert last_client_record_lengths(data) == [5 + 1 + 16, 2 + 1 + 16], attributes
    else:
        assert ends_with_tls_alert(data), attributes


def _wait_sleeping(pg18: Cluster, pid: int) -> None:
    """Wait until backend ``pid`` is inside pg_sleep(), so a cancel is not ignored.

    A cancel that reaches a backend still waiting for the query is dropped
    (PostgreSQL ignores SIGINT while reading a command).  This polls
    pg_stat_activity from an admin session.
    """
    with pg_admin.admin_session(pg18) as admin:
        pg_admin.wait_until(
            lambda: pg_admin.activity(admin, pid, ("wait_event",)) == ("PgSleep",),
            f"backend {pid} to sleep",
            patience=10,
            period=0.005,
        )


def _legacy_cancel(conn: psycopg.Connection[Any]) -> None:
    """libpq's legacy PQcancel() on ``conn``, called through ctypes.

    This is what ``conn.cancel()`` does, except that psycopg's binary build
    calls PQcancel() *holding the GIL*: PQcancel() blocks until the server
    closes the cancel connection, and the relay thread, which has to carry
    that connection, never runs again (a deadlock).  ctypes releases the GIL
    around the call.  The library is the one psycopg_binary loaded, so the
    PGconn pointer belongs to it.
    """
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/libpq" in line}
    assert len(paths) == 1, paths
    libpq = ctypes.CDLL(paths.pop())
    libpq.PQgetCancel.restype = ctypes.c_void_p
    libpq.PQgetCancel.argtypes = [ctypes.c_void_p]
    libpq.PQcancel.restype = ctypes.c_int
    libpq.PQcancel.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    libpq.PQfreeCancel.restype = None
    libpq.PQfreeCancel.argtypes = [ctypes.c_void_p]
    pgconn: Any = conn.pgconn  # pgconn_ptr is not in psycopg's PGconn protocol
    cancel = libpq.PQgetCancel(pgconn.pgconn_ptr)
    assert cancel
    try:
        errbuf = ctypes.create_string_buffer(256)
        assert libpq.PQcancel(cancel, errbuf, len(errbuf)) == 1, errbuf.value
    finally:
        libpq.PQfreeCancel(cancel)


def _cancel_capture(
    pg18: Cluster, tls_material: TLSMaterial, relay: CaptureRelay, method: str, **extra: str
) -> tuple[Capture, int]:
    """Cancel ``SELECT pg_sleep(30)`` through the relay; the cancel connection's capture."""
    with (
        psycopg.connect(**_params(pg18, tls_material, relay, **extra)) as conn,
        ThreadPoolExecutor(1) as pool,
    ):
        pid = conn.info.backend_pid
        query = pool.submit(conn.execute, "SELECT pg_sleep(30)")
        _wait_sleeping(pg18, pid)
        if method == "cancel_safe":
            conn.cancel_safe(timeout=10)
        else:
            _legacy_cancel(conn)
        # both calls return after the server closed the cancel connection
        assert relay.wait_closed(1)
        assert isinstance(query.exception(timeout=10), psycopg.errors.QueryCanceled)
    assert relay.wait_closed(2)
    main, cancel = relay.captures()
    assert first_packet_kind(main.client_bytes) in {"startup", "ssl_request", "direct_tls"}
    return cancel, pid


@pytest.mark.parametrize(
    ("method", "extra", "kind", "tls_start"),
    [
        # libpq 17+ PQcancelCreate/PQcancelBlocking: the cancel connection
        # negotiates like the original one
        ("cancel_safe", {"sslmode": "disable"}, "cancel_request", None),
        ("cancel_safe", {"sslmode": "require"}, "ssl_request", 8),
        ("cancel_safe", {"sslmode": "require", "sslnegotiation": "direct"}, "direct_tls", 0),
        ("cancel_safe", {"sslmode": "prefer"}, "ssl_request", 8),
        ("cancel_safe", {"sslmode": "allow"}, "cancel_request", None),  # allow: plaintext first
        # legacy PQcancel (psycopg's conn.cancel(), see _legacy_cancel) never uses TLS
        ("cancel", {"sslmode": "disable"}, "cancel_request", None),
        ("cancel", {"sslmode": "require"}, "cancel_request", None),
        ("cancel", {"sslmode": "require", "sslnegotiation": "direct"}, "cancel_request", None),
        ("cancel", {"sslmode": "prefer"}, "cancel_request", None),
    ],
    ids=lambda value: "-".join(value.values()) if isinstance(value, dict) else None,
)
def test_libpq_cancel_on_the_wire(
    pg18: Cluster,
    tls_material: TLSMaterial,
    relay: CaptureRelay,
    method: str,
    extra: dict[str, str],
    kind: str,
    tls_start: int | None,
) -> None:
    cancel, pid = _cancel_capture(pg18, tls_material, relay, method, **extra)
    data = cancel.client_bytes
    assert first_packet_kind(data) == kind
    assert client_tls_start(data) == tls_start
    if tls_start is None:
        assert contains_plaintext_cancel(data, pid)
        assert len(data) == int.from_bytes(data[:4], "big")  # the request and nothing else
        assert cancel.server_bytes == b""  # the server just closes
    else:
        assert not contains_plaintext_cancel(data)
        # the CancelRequest (16 bytes) in one record, then SSL_shutdown()'s close_notify
        assert last_client_record_lengths(data) == [16 + 1 + 16, 2 + 1 + 16] or (
            ends_with_tls_alert(data)  # if TLS 1.2 were negotiated
        )
        if tls_start == 8:
            assert cancel.server_bytes[:1] == b"S"


def test_libpq_through_relay_leaks_nothing(pg18: Cluster, tls_material: TLSMaterial) -> None:
    with assert_no_fd_leak():
        with CaptureRelay(pg18.host, pg18.port) as relay:
            _session(pg18, tls_material, relay, sslmode="require")
        assert relay.captures()[0].closed


# --------------------------------------------------------------------------
# syn_blackhole
# --------------------------------------------------------------------------


def test_syn_blackhole_connect_stays_in_progress(syn_blackhole: SynBlackhole) -> None:
    assert syn_blackhole.queue_full()
    with (
        assert_no_fd_leak(ignore=syn_blackhole.owned_fds),
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock,
    ):
        sock.setblocking(False)
        assert sock.connect_ex((syn_blackhole.host, syn_blackhole.port)) == errno.EINPROGRESS
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_WRITE)
            started = time.monotonic()
            assert selector.select(2.0) == []  # not writable: no SYN-ACK came back
            assert time.monotonic() - started >= 1.9
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        with pytest.raises(OSError, match="not connected") as info:
            sock.getpeername()
        assert info.value.errno == errno.ENOTCONN
    assert syn_blackhole.queue_full()


def test_syn_blackhole_libpq_times_out(syn_blackhole: SynBlackhole) -> None:
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="timeout"):
        psycopg.connect(
            host=syn_blackhole.host,
            port=syn_blackhole.port,
            user="postgres",
            dbname="postgres",
            connect_timeout=2,
        )
    assert 1.5 <= time.monotonic() - started < 10


def test_syn_blackhole_many_clients(syn_blackhole: SynBlackhole) -> None:
    """Several pending clients at once: none completes."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(4)]
    try:
        with selectors.DefaultSelector() as selector:
            for sock in socks:
                sock.setblocking(False)
                assert sock.connect_ex((syn_blackhole.host, syn_blackhole.port)) == (
                    errno.EINPROGRESS
                )
                selector.register(sock, selectors.EVENT_WRITE)
            assert selector.select(1.0) == []
    finally:
        for sock in socks:
            sock.close()
