"""Attacks by a hostile server, through real sockets, against every adapter.

:data:`CATALOG` lists the attacks: each is a server script for
``hostile_server.HostileServer``, the connection options the victim uses,
the typed error it must end with (``ConnectError`` whose last attempt's
``error`` is that type, its message naming the fault), and how far the
client may have gone before stopping (``may_send``: nothing after the
SSLRequest, the startup packet, the SASLInitialResponse, anything).  Every
attack runs against the 5 adapter flavours (blocking, asyncio, trio,
anyio/asyncio, anyio/trio) with ``connect_timeout`` set, under an fd-leak
check; the password (and its MD5 hash) must never appear in what the client
sent in the clear.

The core's socket-free tests (test_machine.py ``test_cve_*``,
``test_failure``, test_scram.py, test_tls.py) pin the rules message by
message; here the same rules are exercised end to end: real sockets, real
TLS handshakes with trustme certificates, scramp as the SCRAM server, the
adapters' own loops.  Entries with ``error=None`` are accepted *by design*
(libpq's definition of the sslmode says the defect is not checked); they are
counted apart from the refusals.  tests/README.md ("Attacks") tabulates the
catalog; :func:`test_readme_attack_table_is_current` keeps it true.

Runtime budget: about 90 s for the whole file (it takes about 10 s).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import re
import socket
import ssl
import struct
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import psycopg
import pytest
import trio
import trustme
from fake_server import (
    AUTH_OK,
    ENV,
    SECRET,
    SSL_REQUEST,
    auth,
    backend_key,
    error_response,
    message,
    negotiate,
    parameter_status,
    ready,
    startup_done,
)
from fdcheck import assert_no_fd_leak
from hostile_server import (
    HostileServer,
    Peer,
    Record,
    ScramParts,
    Script,
    cert_end_point,
    finish_startup,
    scram_server,
    tamper_signature,
)
from pgproto_adapters import anyio as pg_anyio
from pgproto_adapters import asyncio as pg_asyncio
from pgproto_adapters import blocking as pg_blocking
from pgproto_adapters import trio as pg_trio
from tls_helpers import make_crl, serial_of, server_context

import pgproto

FLAVOURS: Final = ("blocking", "asyncio", "trio", "anyio-asyncio", "anyio-trio")
USER: Final = "mallory-victim"
#: Failures must come well before this (seconds); a hang ends in a timeout
#: error, which fails the type check anyway.
CONNECT_TIMEOUT: Final = 10
BOUND: Final = 8.0
#: The MD5 response for SECRET would also be a credential.
MD5_SECRET: Final = hashlib.md5((SECRET + USER).encode()).hexdigest().encode()  # noqa: S324

_INT32: Final = struct.Struct("!i")


# --------------------------------------------------------------------------
# the material: certificates, contexts, files


@dataclass
class Material:
    """Server TLS contexts by certificate kind, their channel-binding data,
    and the files the client options refer to."""

    files: dict[str, str]
    contexts: dict[str, ssl.SSLContext]
    cb_data: dict[str, bytes]


def _leaf_pem(leaf: trustme.LeafCert) -> bytes:
    return leaf.cert_chain_pems[0].bytes()


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    directory = tmp_path_factory.mktemp("attacks")
    ca, other_ca = trustme.CA(), trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    leaves = {
        "good": ca.issue_cert("localhost", "127.0.0.1"),
        "wrong-name": ca.issue_cert("wrong-host.example"),
        "unknown-ca": other_ca.issue_cert("localhost", "127.0.0.1"),
        "expired": ca.issue_cert(
            "localhost",
            "127.0.0.1",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        ),
        "revoked": ca.issue_cert("localhost", "127.0.0.1"),
    }
    ca_file = directory / "root.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    crl_file = directory / "root.crl"
    crl_file.write_bytes(make_crl(ca, [serial_of(leaves["revoked"])]))
    contexts = {name: server_context(leaf) for name, leaf in leaves.items()}
    contexts["no-alpn"] = server_context(leaves["good"], alpn=False)
    cb_data = {name: cert_end_point(_leaf_pem(leaf)) for name, leaf in leaves.items()}
    cb_data["no-alpn"] = cb_data["good"]
    return Material(
        files={"ca": str(ca_file), "crl": str(crl_file), "missing": str(directory / "none.crt")},
        contexts=contexts,
        cb_data=cb_data,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    with HostileServer() as hostile:
        yield hostile


# --------------------------------------------------------------------------
# script building blocks

Step = Callable[[Peer, Material], Awaitable[None]]


async def _first_packet(peer: Peer, *kinds: str) -> str:
    """Read the next untyped packet; fail the script unless it is one of *kinds*."""
    first = await peer.read_startup()
    if first.kind not in kinds:
        raise AssertionError(f"expected {' or '.join(kinds)}, got {first.kind}")
    return first.kind


async def _startup(peer: Peer) -> None:
    await _first_packet(peer, "startup")


def plain(*steps: Step) -> Step:
    """StartupMessage in plaintext, then *steps*."""

    async def script(peer: Peer, m: Material) -> None:
        await _startup(peer)
        for step in steps:
            await step(peer, m)

    return script


def over_tls(*steps: Step, cert: str = "good") -> Step:
    """SSLRequest answered ``S`` (or a direct ClientHello), a TLS handshake
    with the *cert* context, the StartupMessage, then *steps*."""

    async def script(peer: Peer, m: Material) -> None:
        if await _first_packet(peer, "ssl", "tls") == "ssl":
            await peer.send(b"S")
        await peer.start_tls(m.contexts[cert])
        await _startup(peer)
        for step in steps:
            await step(peer, m)

    return script


def ssl_reply(*chunks: bytes) -> Step:
    """Answer the SSLRequest with *chunks* (one write), then stop."""

    async def script(peer: Peer, m: Material) -> None:
        await _first_packet(peer, "ssl")
        await peer.send(*chunks)

    return script


def plain_then_garbage() -> Step:
    """Answer the SSLRequest ``S``, read the ClientHello, answer it in HTTP."""

    async def script(peer: Peer, m: Material) -> None:
        await _first_packet(peer, "ssl")
        await peer.send(b"S")
        await peer.read_raw()  # the ClientHello
        await peer.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    return script


def send(*chunks: bytes) -> Step:
    async def step(peer: Peer, m: Material) -> None:
        await peer.send(*chunks)

    return step


def hang_up() -> Step:
    async def step(peer: Peer, m: Material) -> None:
        await peer.close()

    return step


def scram(
    *,
    offer: tuple[str, ...] = ("SCRAM-SHA-256",),
    cert: str | None = None,
    server_first: Callable[[ScramParts], str] | None = None,
    server_final: Callable[[ScramParts], str] | None = None,
    stop_after: str | None = None,
) -> Step:
    """A scramp SCRAM exchange (see ``hostile_server.scram_server``)."""

    async def step(peer: Peer, m: Material) -> None:
        await scram_server(
            peer,
            SECRET,
            offer=offer,
            cb_data=m.cb_data[cert] if cert else None,
            server_first=server_first,
            server_final=server_final,
            stop_after=stop_after,
        )

    return step


def done() -> Step:
    """AuthenticationOk and a normal startup burst."""

    async def step(peer: Peer, m: Material) -> None:
        await finish_startup(peer)

    return step


def _client_nonce(parts: ScramParts) -> str:
    return dict(a.split("=", 1) for a in parts.client_first.split(",")[2:])["r"]


def _other(char: str) -> str:
    """A base64 character that is not *char*."""
    return "Y" if char == "X" else "X"


def _server_first(nonce: Callable[[str], str], iterations: int = 4096) -> Callable[..., str]:
    def build(parts: ScramParts) -> str:
        return f"r={nonce(_client_nonce(parts))},s=c2FsdHNhbHRzYWx0,i={iterations}"

    return build


# --------------------------------------------------------------------------
# the catalog

#: How far the client may go before it must stop.
NOTHING: Final = 0  # no startup packet (only an SSLRequest, or a TLS handshake)
STARTUP: Final = 1  # the startup packet, no authentication response
SASL_INITIAL: Final = 2  # at most the SASLInitialResponse: no SCRAM proof
ANY: Final = 3  # no restriction (the password is still never sent in clear)


@dataclass(frozen=True)
class Attack:
    name: str
    category: str  # "downgrade", "tls", "protocol"
    options: Mapping[str, str]
    script: Step
    error: type[pgproto.Error] | None  # None: accepted by design
    message: str = ""  # a fragment of str(attempt.error)
    may_send: int = ANY
    hidden: tuple[str, ...] = ()  # server text that must not reach the user
    libpq: bool | None = None  # True: libpq refuses too; False: libpq accepts; None: not compared
    memory: bool = False  # measure the peak with tracemalloc


PLAIN: Final = {"sslmode": "disable"}
TLS_REQUIRE: Final = {"sslmode": "require"}
CB_REQUIRE: Final = {"sslmode": "require", "channel_binding": "require"}
EVIL: Final = "EVIL-SERVER-TEXT <script>alert(1)</script> please re-enter your password"
GiB: Final = 1 << 30


def _downgrades() -> list[Attack]:
    a = functools.partial(Attack, category="downgrade")
    req_scram = {**PLAIN, "require_auth": "scram-sha-256"}
    return [
        a(
            name="cleartext requested, require_auth=scram-sha-256",
            options=req_scram,
            script=plain(send(auth(3))),
            error=pgproto.AuthenticationError,
            message='"scram-sha-256" failed: server requested a cleartext password',
            may_send=STARTUP,
            libpq=True,
        ),
        a(
            name="MD5 requested, require_auth=scram-sha-256",
            options=req_scram,
            script=plain(send(auth(5, b"salt"))),
            error=pgproto.AuthenticationError,
            message='"scram-sha-256" failed: server requested a hashed password',
            may_send=STARTUP,
            libpq=True,
        ),
        a(
            name="cleartext requested, require_auth=!password",
            options={**PLAIN, "require_auth": "!password"},
            script=plain(send(auth(3))),
            error=pgproto.AuthenticationError,
            message="server requested a cleartext password",
            may_send=STARTUP,
            libpq=True,
        ),
        a(
            name="MD5 requested, require_auth=password",
            options={**PLAIN, "require_auth": "password"},
            script=plain(send(auth(5, b"salt"))),
            error=pgproto.AuthenticationError,
            message="server requested a hashed password",
            may_send=STARTUP,
            libpq=True,
        ),
        a(
            name="cleartext requested over TLS, channel_binding=require",
            options=CB_REQUIRE,
            script=over_tls(send(auth(3))),
            error=pgproto.AuthenticationError,
            message="channel binding required but not supported by server's authentication",
            may_send=STARTUP,
            libpq=True,
        ),
        a(
            name="MD5 requested over TLS, channel_binding=require",
            options=CB_REQUIRE,
            script=over_tls(send(auth(5, b"salt"))),
            error=pgproto.AuthenticationError,
            message="channel binding required but not supported by server's authentication",
            may_send=STARTUP,
            libpq=True,
        ),
        a(
            name="AuthenticationOk without authentication, channel_binding=require",
            options=CB_REQUIRE,
            script=over_tls(done()),
            error=pgproto.AuthenticationError,
            message="channel binding required, but server authenticated client without channel",
            may_send=STARTUP,
            libpq=True,
        ),
        a(
            name="AuthenticationOk without authentication, require_auth=scram-sha-256",
            options=req_scram,
            script=plain(done()),
            error=pgproto.AuthenticationError,
            message="server did not complete authentication",
            may_send=STARTUP,
            libpq=True,
        ),
        a(
            name="AuthenticationOk without authentication, require_auth=md5",
            options={**PLAIN, "require_auth": "md5"},
            script=plain(done()),
            error=pgproto.AuthenticationError,
            message="server did not complete authentication",
            may_send=STARTUP,
            libpq=True,
        ),
        a(
            name="AuthenticationOk after SASLInitialResponse (no challenge)",
            options=PLAIN,
            script=plain(scram(stop_after="initial"), done()),
            error=pgproto.AuthenticationError,
            message="AuthenticationOk before completing the SCRAM exchange",
            may_send=SASL_INITIAL,
        ),
        a(
            name="AuthenticationOk before SCRAM server-final",
            options=PLAIN,
            script=plain(scram(stop_after="final-response"), done()),
            error=pgproto.AuthenticationError,
            message="AuthenticationOk before completing the SCRAM exchange",
        ),
        a(
            name="AuthenticationOk before SCRAM server-final, channel_binding=require",
            options=CB_REQUIRE,
            script=over_tls(
                scram(offer=("SCRAM-SHA-256-PLUS",), cert="good", stop_after="final-response"),
                done(),
            ),
            error=pgproto.AuthenticationError,
            # channel_binding's check comes first (libpq's order): not bound
            # until the server's signature is verified.
            message="channel binding required, but server authenticated client without channel",
        ),
        a(
            name="SASLFinal with a wrong server signature (AuthenticationOk follows)",
            options=PLAIN,
            script=plain(scram(server_final=tamper_signature), done()),
            error=pgproto.AuthenticationError,
            message="incorrect server signature",
            libpq=True,
        ),
        a(
            name="SCRAM-SHA-256 without -PLUS over TLS, channel_binding=require",
            options=CB_REQUIRE,
            script=over_tls(scram(stop_after="sasl")),
            error=pgproto.AuthenticationError,
            message="server did not offer an authentication method that supports channel binding",
            may_send=STARTUP,
            libpq=True,
        ),
        a(
            name="SCRAM-SHA-256-PLUS offered over plaintext",
            options=PLAIN,
            script=plain(scram(offer=("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"), stop_after="sasl")),
            error=pgproto.AuthenticationError,
            message="server offered SCRAM-SHA-256-PLUS authentication over a non-SSL connection",
            may_send=STARTUP,
            libpq=True,
        ),
        a(
            name="server nonce does not extend the client nonce",
            options=PLAIN,
            # the first character changed (a random client nonce may start with "X")
            script=plain(scram(server_first=_server_first(lambda c: _other(c[0]) + c[1:] + "srv"))),
            error=pgproto.RemoteProtocolError,
            message="nonce mismatch",
            may_send=SASL_INITIAL,
            libpq=True,
        ),
        a(
            name="server nonce shorter than the client nonce",
            options=PLAIN,
            script=plain(scram(server_first=_server_first(lambda c: c[:-1]))),
            error=pgproto.RemoteProtocolError,
            message="nonce mismatch",
            may_send=SASL_INITIAL,
            libpq=True,
        ),
        a(
            name="absurd SCRAM iteration count (1e9)",
            options=PLAIN,
            script=plain(scram(server_first=_server_first(lambda c: c + "srv", iterations=10**9))),
            error=pgproto.AuthenticationError,
            message="iteration count 1000000000, above the limit",
            may_send=SASL_INITIAL,
        ),
        a(
            name="SCRAM iteration count INT_MAX",
            options=PLAIN,
            script=plain(
                scram(server_first=_server_first(lambda c: c + "srv", iterations=2**31 - 1))
            ),
            error=pgproto.AuthenticationError,
            message="above the limit",
            may_send=SASL_INITIAL,
        ),
    ]


def _tls() -> list[Attack]:
    # unless an entry says otherwise: nothing past the SSLRequest or the TLS handshake
    a = functools.partial(Attack, category="tls", may_send=NOTHING)
    attacks = [
        a(
            name="plaintext injected after 'S' (CVE-2021-23222), sslmode=require",
            options=TLS_REQUIRE,
            script=ssl_reply(b"S", AUTH_OK, startup_done()),
            error=pgproto.RemoteProtocolError,
            message="received unencrypted data after SSL response",
            # libpq 18.6 (psycopg's wheel) does not end promptly here: it
            # waits for connect_timeout ("timeout expired"); not compared.
        ),
        a(
            name="plaintext injected after 'S' (CVE-2021-23222), sslmode=prefer",
            options={"sslmode": "prefer"},
            script=ssl_reply(b"S", AUTH_OK, startup_done()),
            error=pgproto.RemoteProtocolError,
            message="received unencrypted data after SSL response",
            # libpq 18.6 (psycopg's wheel) does not end promptly here: it
            # waits for connect_timeout ("timeout expired"); not compared.
        ),
        a(
            name="ErrorResponse to SSLRequest (CVE-2024-10977), sslmode=require",
            options=TLS_REQUIRE,
            script=ssl_reply(error_response("28000", EVIL)),
            error=pgproto.RemoteProtocolError,
            message="server sent an error response during SSL exchange",
            hidden=(EVIL, "EVIL-SERVER-TEXT", "28000"),
            libpq=True,
        ),
        a(
            name="ErrorResponse to SSLRequest (CVE-2024-10977), sslmode=prefer",
            options={"sslmode": "prefer"},
            script=ssl_reply(error_response("28000", EVIL)),
            error=pgproto.RemoteProtocolError,
            message="server sent an error response during SSL exchange",
            hidden=(EVIL, "EVIL-SERVER-TEXT", "28000"),
        ),
        a(
            name="'N' to SSLRequest, sslmode=require",
            options=TLS_REQUIRE,
            script=ssl_reply(b"N"),
            error=pgproto.TLSError,
            message="server does not support SSL, but SSL was required",
            libpq=True,
        ),
        a(
            name="'N' to SSLRequest, sslmode=verify-full",
            options={"sslmode": "verify-full", "sslrootcert": "{ca}"},
            script=ssl_reply(b"N"),
            error=pgproto.TLSError,
            message="server does not support SSL, but SSL was required",
            libpq=True,
        ),
        a(
            name="garbage instead of a TLS ServerHello",
            options=TLS_REQUIRE,
            script=plain_then_garbage(),
            error=pgproto.TLSError,
            message="SSL",
            libpq=True,
        ),
        a(
            name="direct TLS, server selects no ALPN, sslmode=require",
            options={"sslmode": "require", "sslnegotiation": "direct"},
            script=over_tls(done(), cert="no-alpn"),
            error=pgproto.TLSError,
            message="direct SSL connection was established without ALPN",
            libpq=True,
        ),
        a(
            name="direct TLS, server selects no ALPN, sslmode=verify-full",
            options={"sslmode": "verify-full", "sslnegotiation": "direct", "sslrootcert": "{ca}"},
            script=over_tls(done(), cert="no-alpn"),
            error=pgproto.TLSError,
            message="direct SSL connection was established without ALPN",
            libpq=True,
        ),
    ]
    # Certificate defects by sslmode.  "require" without a root certificate
    # checks nothing (libpq's definition); with one it verifies the chain as
    # verify-ca does; verify-full also checks the name.
    modes = {
        "require (no root certificate)": {"sslmode": "require"},
        "require + sslrootcert": {"sslmode": "require", "sslrootcert": "{ca}"},
        "verify-ca": {"sslmode": "verify-ca", "sslrootcert": "{ca}"},
        "verify-full": {"sslmode": "verify-full", "sslrootcert": "{ca}"},
    }
    defects = {
        "wrong name": ("wrong-name", "server certificate for", ("verify-full",)),
        "unknown CA": (
            "unknown-ca",
            "certificate verify failed",
            ("require + sslrootcert", "verify-ca", "verify-full"),
        ),
        "expired": (
            "expired",
            "certificate has expired",
            ("require + sslrootcert", "verify-ca", "verify-full"),
        ),
        "revoked (sslcrl)": (
            "revoked",
            "certificate revoked",
            ("require + sslrootcert", "verify-ca", "verify-full"),
        ),
    }
    for defect, (cert, text, rejecting) in defects.items():
        for mode, options in modes.items():
            if defect == "wrong name" and mode == "require + sslrootcert":
                continue  # same outcome as verify-ca: nothing new
            opts = dict(options)
            if cert == "revoked" and "sslrootcert" in opts:
                opts["sslcrl"] = "{crl}"
            refused = mode in rejecting
            attacks.append(
                a(
                    name=f"certificate {defect}, sslmode={mode}",
                    options=opts,
                    script=over_tls(
                        scram(offer=("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"), cert=cert),
                        done(),
                        cert=cert,
                    ),
                    error=pgproto.TLSError if refused else None,
                    message=text if refused else "",
                    may_send=NOTHING if refused else ANY,
                    libpq=refused,
                )
            )
    return attacks


def _protocol() -> list[Attack]:
    # unless an entry says otherwise: plaintext, and nothing past the startup packet
    a = functools.partial(Attack, category="protocol", options=PLAIN, may_send=STARTUP)
    after_ok = functools.partial(plain, send(AUTH_OK, parameter_status("server_version", "18.0")))
    return [
        a(
            name="negative length in an authentication request",
            script=plain(send(b"R" + _INT32.pack(-1) + b"\x00" * 8)),
            error=pgproto.RemoteProtocolError,
            message="more than the 2000 bytes allowed here",
            libpq=True,
        ),
        a(
            name="negative length after AuthenticationOk",
            script=after_ok(send(b"S" + _INT32.pack(-5) + b"\x00" * 8)),
            error=pgproto.RemoteProtocolError,
            message="allowed here",
            libpq=True,
        ),
        a(
            name="length 3 (< 4) in an authentication request",
            script=plain(send(b"R\x00\x00\x00\x03\x00\x00\x00\x00")),
            error=pgproto.RemoteProtocolError,
            message="invalid message length 3",
            libpq=True,
        ),
        a(
            name="length 0 after AuthenticationOk",
            script=after_ok(send(b"Z\x00\x00\x00\x00I")),
            error=pgproto.RemoteProtocolError,
            message="invalid message length 0",
            libpq=True,
        ),
        a(
            name="1 GiB authentication request",
            script=plain(send(b"R" + _INT32.pack(GiB) + b"\x00" * 64)),
            error=pgproto.RemoteProtocolError,
            message="more than the 2000 bytes allowed here",
            memory=True,
            libpq=True,
        ),
        a(
            name="1 GiB ErrorResponse during authentication",
            script=plain(send(b"E" + _INT32.pack(GiB) + b"SFATAL\x00" * 64)),
            error=pgproto.RemoteProtocolError,
            message="more than the 30000 bytes allowed here",
            memory=True,
            libpq=True,
        ),
        a(
            name="1 GiB ParameterStatus after AuthenticationOk",
            script=after_ok(send(b"S" + _INT32.pack(GiB) + b"x" * 4096)),
            error=pgproto.RemoteProtocolError,
            message="more than the 30000 bytes allowed here",
            memory=True,
            libpq=True,
        ),
        a(
            name="1 GiB DataRow during startup, 1 MB of it sent, then EOF",
            script=after_ok(send(b"D" + _INT32.pack(GiB - 1) + b"\x00" * (1 << 20)), hang_up()),
            error=pgproto.TransportError,
            message="server closed the connection unexpectedly",
            memory=True,
            libpq=True,
        ),
        a(
            name="unknown message type during authentication",
            script=plain(send(message(b"x", b"\x00\x00\x00\x00"))),
            error=pgproto.RemoteProtocolError,
            message="expected authentication request from server, but received 'x'",
            libpq=True,
        ),
        a(
            name="an HTTP server answers the startup packet",
            script=plain(send(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")),
            error=pgproto.RemoteProtocolError,
            message="expected authentication request from server, but received 'H'",
            libpq=True,
        ),
        a(
            name="unknown message type after AuthenticationOk",
            script=after_ok(send(message(b"x", b"junk"))),
            error=pgproto.RemoteProtocolError,
            message='first received character was "x"',
            libpq=True,
        ),
        a(
            name="CommandComplete during startup",
            script=after_ok(send(message(b"C", b"SELECT 1\x00"))),
            error=pgproto.RemoteProtocolError,
            message="unexpected message from server during startup",
            libpq=True,
        ),
        a(
            name="unknown authentication request code",
            script=plain(send(auth(99))),
            error=pgproto.AuthenticationError,
            message="authentication method 99 not supported",
            libpq=True,
        ),
        a(
            name="truncated authentication request (2-byte body)",
            script=plain(send(message(b"R", b"\x00\x00"))),
            error=pgproto.RemoteProtocolError,
            message="received invalid authentication request",
            libpq=True,
        ),
        a(
            name="truncated MD5 salt",
            script=plain(send(auth(5, b"ab"))),
            error=pgproto.RemoteProtocolError,
            message="received invalid authentication request",
        ),
        a(
            name="unterminated SASL mechanism list",
            script=plain(send(auth(10, b"SCRAM-SHA-256"))),
            error=pgproto.RemoteProtocolError,
            message="invalid list of authentication mechanisms",
            libpq=True,
        ),
        a(
            name="empty SASLContinue",
            script=plain(scram(stop_after="initial"), send(auth(11))),
            error=pgproto.RemoteProtocolError,
            message="malformed SCRAM message (empty message)",
            may_send=SASL_INITIAL,
            libpq=True,
        ),
        a(
            name="SASLFinal before SASLContinue",
            script=plain(scram(stop_after="initial"), send(auth(12, b"v=AAAA"))),
            error=pgproto.RemoteProtocolError,
            message="SASL authentication was not completed",
            may_send=SASL_INITIAL,
            libpq=True,
        ),
        a(
            name="unterminated ErrorResponse",
            script=plain(send(message(b"E", b"SFATAL"))),
            error=pgproto.RemoteProtocolError,
            message="malformed ErrorResponse message",
        ),
        a(
            name="truncated ParameterStatus",
            script=after_ok(send(message(b"S", b"name\x00value"))),
            error=pgproto.RemoteProtocolError,
            message="malformed ParameterStatus message",
        ),
        a(
            name="empty ReadyForQuery",
            script=after_ok(send(backend_key(), message(b"Z"))),
            error=pgproto.RemoteProtocolError,
            message="malformed ReadyForQuery message",
        ),
        a(
            name="ReadyForQuery with an unknown status",
            script=after_ok(send(backend_key(), ready(b"X"))),
            error=pgproto.RemoteProtocolError,
            message="ReadyForQuery with unknown status",
        ),
        a(
            name="NegotiateProtocolVersion upgrading 3.0 to 3.2",
            script=plain(send(negotiate((3, 2)))),
            error=pgproto.RemoteProtocolError,
            message="server requested downgrade to a higher-numbered version",
            libpq=True,
        ),
        a(
            name="NegotiateProtocolVersion upgrading 3.2 to 3.9",
            options={**PLAIN, "max_protocol_version": "3.2"},
            script=plain(send(negotiate((3, 9)))),
            error=pgproto.RemoteProtocolError,
            message="server requested downgrade to a higher-numbered version",
            libpq=True,
        ),
        a(
            name="NegotiateProtocolVersion twice",
            options={**PLAIN, "max_protocol_version": "3.2"},
            script=plain(send(negotiate((3, 0)), negotiate((3, 0)))),
            error=pgproto.RemoteProtocolError,
            message="duplicate protocol negotiation message",
        ),
        a(
            name="BackendKeyData with a 300-byte key (protocol 3.2)",
            options={**PLAIN, "max_protocol_version": "3.2"},
            script=after_ok(send(backend_key(key=b"k" * 300), ready())),
            error=pgproto.RemoteProtocolError,
            message="cancel key with length 300 is too long (maximum 256 bytes)",
            libpq=True,
        ),
        a(
            name="BackendKeyData with a 257-byte key (protocol 3.0)",
            script=after_ok(send(backend_key(key=b"k" * 257), ready())),
            error=pgproto.RemoteProtocolError,
            message="cancel key with length 257 is too long",
            libpq=True,
        ),
        a(
            name="BackendKeyData with a 3-byte key",
            script=after_ok(send(backend_key(key=b"kkk"), ready())),
            error=pgproto.RemoteProtocolError,
            message="cancel key with length 3 is too short",
            libpq=True,
        ),
    ]


CATALOG: Final[list[Attack]] = [*_downgrades(), *_tls(), *_protocol()]
CATEGORIES: Final = ("downgrade", "tls", "protocol")


# --------------------------------------------------------------------------
# running one connection per flavour


def _run_blocking(kwargs: dict[str, Any]) -> pgproto.Error | None:
    try:
        conn = pg_blocking.connect(env=ENV, **kwargs)
    except pgproto.Error as exc:
        return exc
    conn.close()
    return None


async def _connect_async(module: Any, kwargs: dict[str, Any]) -> pgproto.Error | None:
    try:
        conn = await module.connect(env=ENV, **kwargs)
    except pgproto.Error as exc:
        return exc
    await conn.close()
    return None


def run_flavour(flavour: str, kwargs: dict[str, Any]) -> pgproto.Error | None:
    """Connect and close with one flavour (async ones get an event loop of their own)."""
    if flavour == "blocking":
        return _run_blocking(kwargs)
    if flavour == "asyncio":
        return asyncio.run(_connect_async(pg_asyncio, kwargs))
    if flavour == "trio":
        return trio.run(_connect_async, pg_trio, kwargs)
    backend = flavour.removeprefix("anyio-")
    return anyio.run(_connect_async, pg_anyio, kwargs, backend=backend)


def _options(port: int, options: Mapping[str, str], m: Material) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": str(port),
        "user": USER,
        "dbname": "app",
        "password": SECRET,
        "connect_timeout": str(CONNECT_TIMEOUT),
    }
    kwargs.update({k: v.format(**m.files) for k, v in options.items()})
    return kwargs


@dataclass
class Outcome:
    error: pgproto.Error | None
    elapsed: float
    records: list[Record]
    peak: int = 0


def bind(script: Step, m: Material) -> Script:
    """*script* as the server runs it: a function of the peer alone."""

    def run(peer: Peer) -> Awaitable[None]:
        return script(peer, m)

    return run


def attack_once(
    server: HostileServer,
    m: Material,
    script: Step,
    options: Mapping[str, str],
    flavour: str,
    *,
    memory: bool = False,
    cut_after: int | None = None,
) -> Outcome:
    """One connection by *flavour* against *script*: the outcome, with no fd left open."""
    server.serve(bind(script, m), cut_after=cut_after)
    kwargs = _options(server.port, options, m)
    with assert_no_fd_leak():
        if memory:
            tracemalloc.start()
        start = time.monotonic()
        try:
            error = run_flavour(flavour, kwargs)
            elapsed = time.monotonic() - start
            peak = tracemalloc.get_traced_memory()[1] if memory else 0
        finally:
            if memory:
                tracemalloc.stop()
        records = server.wait_idle()
    return Outcome(error, elapsed, records, peak)


def _sent_level(record: Record) -> int:
    """How far the client went: NOTHING, STARTUP, SASL_INITIAL or ANY."""
    level = NOTHING
    responses = 0
    for msg in record.messages():
        if msg.kind == b"" and msg.body != SSL_REQUEST[4:]:  # not SSLRequest
            level = max(level, STARTUP)
        elif msg.kind == b"p":
            responses += 1
            is_sasl_initial = responses == 1 and msg.body.startswith(b"SCRAM-SHA-256")
            level = max(level, SASL_INITIAL if is_sasl_initial else ANY)
        elif msg.kind not in (b"", b"X"):
            level = ANY
    return level


_LEVELS: Final = {
    NOTHING: "nothing",
    STARTUP: "the startup packet",
    SASL_INITIAL: "the SASLInitialResponse",
    ANY: "anything",
}


def check_secrets(records: list[Record], may_send: int) -> None:
    for record in records:
        data = bytes(record.plaintext)
        # Booleans only (pytest shows an assertion's operands): the password
        # must not end up in a report.
        sent_password = SECRET.encode() in data
        sent_hash = MD5_SECRET in data
        assert not sent_password, "the password was sent in the clear"
        assert not sent_hash, "the MD5 password hash was sent"
        level = _sent_level(record)
        assert level <= may_send, (
            f"connection {record.index}: the client sent {_LEVELS[level]}, "
            f"where it may send at most {_LEVELS[may_send]}"
        )


def check_refused(attack: Attack, outcome: Outcome) -> None:
    error = outcome.error
    assert isinstance(error, pgproto.ConnectError), f"not a ConnectError: {error!r}"
    attempt = error.attempts[-1]
    assert attack.error is not None
    assert isinstance(attempt.error, attack.error), (
        f"{type(attempt.error).__name__}: {attempt.error} (wanted {attack.error.__name__})"
    )
    assert attack.message in str(attempt.error), str(attempt.error)
    assert attack.message in str(error)
    for text in attack.hidden:
        assert text not in str(error)
        assert all(text not in str(a.error) for a in error.attempts)


def _ids(attacks: list[Attack]) -> list[Any]:
    return [pytest.param(a, id=a.name) for a in attacks]


# --------------------------------------------------------------------------
# the sanity of the fake itself: a good server is accepted by every flavour


def expect_password() -> Step:
    async def step(peer: Peer, m: Material) -> None:
        msg = await peer.read_message()
        assert msg.kind == b"p"
        right = msg.body == SECRET.encode() + b"\x00"
        assert right, "not the password"

    return step


GOOD_SERVERS: Final = {
    "plaintext SCRAM": (PLAIN, plain(scram(), done())),
    "TLS verify-full SCRAM-PLUS, channel_binding=require": (
        {"sslmode": "verify-full", "sslrootcert": "{ca}", "channel_binding": "require"},
        over_tls(scram(offer=("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"), cert="good"), done()),
    ),
    "direct TLS with ALPN, verify-full, sslcrl": (
        {
            "sslmode": "verify-full",
            "sslrootcert": "{ca}",
            "sslcrl": "{crl}",
            "sslnegotiation": "direct",
        },
        over_tls(scram(offer=("SCRAM-SHA-256-PLUS",), cert="good"), done()),
    ),
    "cleartext password": (PLAIN, plain(send(auth(3)), expect_password(), done())),
}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("name", list(GOOD_SERVERS))
def test_the_fake_server_serves_a_good_connection(
    server: HostileServer, material: Material, name: str, flavour: str
) -> None:
    """Controls: without the attack, the same fake server is accepted, so
    the refusals below are the client's doing, not a broken fake."""
    options, script = GOOD_SERVERS[name]
    outcome = attack_once(server, material, script, options, flavour)
    assert outcome.error is None, str(outcome.error)
    (record,) = outcome.records
    assert record.script_error is None, repr(record.script_error)
    assert record.client_closed
    assert record.tls is (options.get("sslmode") != "disable")
    if "direct" in name:
        assert record.direct_tls
        assert record.alpn == "postgresql"
    kinds = [msg.kind for msg in record.messages()]
    assert kinds[-1] == b"X", kinds  # Terminate, then the close


def test_the_fake_server_records_the_cleartext_password(
    server: HostileServer, material: Material
) -> None:
    """The secret check can fail: a cleartext exchange shows up in the record."""
    options, script = GOOD_SERVERS["cleartext password"]
    outcome = attack_once(server, material, script, options, "blocking")
    assert outcome.error is None
    with pytest.raises(AssertionError, match="the password was sent in the clear"):
        check_secrets(outcome.records, ANY)
    with pytest.raises(AssertionError, match="where it may send at most the startup packet"):
        check_secrets([_without_password(outcome.records[0])], STARTUP)


def _without_password(record: Record) -> Record:
    data = bytes(record.plaintext).replace(SECRET.encode(), b"x" * len(SECRET))
    return Record(index=record.index, plaintext=bytearray(data))


# --------------------------------------------------------------------------
# the attacks


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("attack", _ids(CATALOG))
def test_attack(server: HostileServer, material: Material, attack: Attack, flavour: str) -> None:
    outcome = attack_once(
        server, material, attack.script, attack.options, flavour, memory=attack.memory
    )
    assert outcome.elapsed < BOUND, f"took {outcome.elapsed:.1f} s"
    (record,) = outcome.records
    assert record.script_error is None, repr(record.script_error)
    assert record.client_closed, "the client did not hang up"
    check_secrets(outcome.records, attack.may_send)
    if attack.memory:
        assert outcome.peak < 8 * 1024 * 1024, f"peak {outcome.peak} bytes"
    if attack.error is None:
        assert outcome.error is None, str(outcome.error)
        assert record.tls
        return
    check_refused(attack, outcome)


# --------------------------------------------------------------------------
# EOF at every byte offset of a successful SCRAM handshake

EOF_SCRIPT: Final = plain(scram(), done())


@pytest.fixture(scope="module")
def transcript_length(server: HostileServer, material: Material) -> int:
    outcome = attack_once(server, material, EOF_SCRIPT, PLAIN, "blocking")
    assert outcome.error is None, str(outcome.error)
    (record,) = outcome.records
    return record.wire_sent


def _check_eof_outcome(outcome: Outcome, offset: int) -> None:
    assert outcome.elapsed < BOUND, f"offset {offset}: took {outcome.elapsed:.1f} s"
    error = outcome.error
    assert isinstance(error, pgproto.ConnectError), f"offset {offset}: {error!r}"
    cause = error.attempts[-1].error
    assert isinstance(cause, pgproto.TransportError), f"offset {offset}: {cause!r}"
    assert "server closed the connection unexpectedly" in str(cause)
    (record,) = outcome.records
    assert record.cut
    assert record.wire_sent == offset
    assert record.client_closed
    check_secrets(outcome.records, ANY)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_eof_at_every_offset(
    server: HostileServer, material: Material, transcript_length: int, flavour: str
) -> None:
    """The server hangs up after 0, 1, 2, ... bytes of a complete SCRAM
    handshake and startup: every cut ends in "server closed the connection
    unexpectedly", none hangs, nothing leaks."""
    assert 250 < transcript_length < 600, transcript_length
    for offset in range(transcript_length):  # attack_once checks the fds of each
        outcome = attack_once(server, material, EOF_SCRIPT, PLAIN, flavour, cut_after=offset)
        _check_eof_outcome(outcome, offset)


TLS_EOF_OPTIONS: Final = {"sslmode": "verify-full", "sslrootcert": "{ca}"}
TLS_EOF_SCRIPT: Final = over_tls(scram(offer=("SCRAM-SHA-256-PLUS",), cert="good"), done())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_eof_at_a_spread_of_offsets_over_tls(
    server: HostileServer, material: Material, flavour: str
) -> None:
    """Cut the wire (not the plaintext) anywhere: mid-handshake, mid-record.
    The error is TLSError or TransportError, never anything else, and the
    client never goes on in plaintext."""
    full = attack_once(server, material, TLS_EOF_SCRIPT, TLS_EOF_OPTIONS, flavour)
    assert full.error is None, str(full.error)
    length = full.records[0].wire_sent
    # ECDSA signatures vary in length by a byte or two from one handshake to
    # the next, so the transcript does too: stay clear of its very end, and
    # should a run be shorter than the offset, it must have succeeded.
    for offset in sorted({*range(0, length - 8, max(1, length // 120)), 1, length - 8}):
        outcome = attack_once(
            server, material, TLS_EOF_SCRIPT, TLS_EOF_OPTIONS, flavour, cut_after=offset
        )
        assert outcome.elapsed < BOUND, f"offset {offset}: took {outcome.elapsed:.1f} s"
        if not outcome.records[0].cut:
            assert outcome.error is None, str(outcome.error)
            continue
        error = outcome.error
        assert isinstance(error, pgproto.ConnectError), f"offset {offset}: {error!r}"
        cause = error.attempts[-1].error
        assert isinstance(cause, pgproto.TLSError | pgproto.TransportError), (
            f"offset {offset}: {cause!r}"
        )
        check_secrets(outcome.records, ANY)


# --------------------------------------------------------------------------
# libpq (through psycopg) against the same fake server


def _libpq_refuses(server: HostileServer, m: Material, attack: Attack) -> tuple[bool, str]:
    server.serve(bind(attack.script, m))
    kwargs = _options(server.port, attack.options, m)
    try:
        with psycopg.connect(**kwargs):
            pass
    except psycopg.OperationalError as exc:
        refused, text = True, str(exc)
    else:
        refused, text = False, ""
    server.wait_idle()
    return refused, text


@pytest.mark.parametrize("attack", _ids([a for a in CATALOG if a.libpq is not None]))
def test_libpq_agrees(
    server: HostileServer,
    material: Material,
    attack: Attack,
    no_pg_environment: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libpq (psycopg) refuses the same attacks and accepts the same
    by-design cases; its messages are not compared (pgproto's are its own
    where it is stricter)."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql, no ~/.pgpass
    refused, text = _libpq_refuses(server, material, attack)
    assert refused is attack.libpq, text
    for hidden in attack.hidden:
        assert hidden not in text


# --------------------------------------------------------------------------
# the README table


def attack_counts() -> dict[str, tuple[int, int, int]]:
    """Per category: (attacks, refused, accepted by design)."""
    counts: dict[str, tuple[int, int, int]] = {}
    for category in CATEGORIES:
        entries = [a for a in CATALOG if a.category == category]
        refused = sum(1 for a in entries if a.error is not None)
        counts[category] = (len(entries), refused, len(entries) - refused)
    return counts


def readme_table() -> str:
    """The table tests/README.md must contain, row for row."""
    lines = [
        "| category | attacks | refused | accepted by design | runs (× 5 adapters) |",
        "|---|---:|---:|---:|---:|",
    ]
    total = [0, 0, 0]
    for category, (tried, refused, accepted) in attack_counts().items():
        lines.append(f"| {category} | {tried} | {refused} | {accepted} | {tried * 5} |")
        total = [total[0] + tried, total[1] + refused, total[2] + accepted]
    lines.append(f"| **total** | {total[0]} | {total[1]} | {total[2]} | {total[0] * 5} |")
    return "\n".join(lines)


def test_readme_attack_table_is_current() -> None:
    readme = (Path(__file__).parent / "README.md").read_text()
    section = readme.split("## Attacks", 1)[1].split("\n## ", 1)[0]
    found = "\n".join(line.strip() for line in section.splitlines() if re.match(r"\s*\|", line))
    assert found == readme_table(), "tests/README.md is stale; the table should be:\n" + (
        readme_table()
    )


def test_catalog_names_are_unique_and_categories_known() -> None:
    names = [a.name for a in CATALOG]
    assert len(names) == len(set(names))
    assert {a.category for a in CATALOG} == set(CATEGORIES)


def test_the_hostile_server_shuts_down_cleanly(material: Material) -> None:
    """Its own start and stop leave no descriptor and no thread behind,
    even with a connection still open when it stops."""
    threads = threading.active_count()
    with assert_no_fd_leak():
        hostile = HostileServer().start()
        hostile.serve(bind(plain(send(b"hello")), material))
        with socket.create_connection(("127.0.0.1", hostile.port)) as sock:
            sock.sendall(b"\x00\x00\x00\x08\x00\x03\x00\x00")  # a startup packet
            assert sock.recv(5) == b"hello"  # the connection is being served
            hostile.stop()
            assert sock.recv(1) == b""  # the server hung up
    assert threading.active_count() == threads
