"""Human-readable tracing of a connection, step by step (``pgproto connect --trace``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from pgproto import (
    AttemptFailed,
    AttemptStarted,
    AuthenticationCompleted,
    AuthenticationRequested,
    BackendKeyData,
    CloseConnection,
    Connected,
    Event,
    NegotiateProtocolVersion,
    NoticeResponse,
    OpenConnection,
    ParameterStatus,
    ReadyForQuery,
    ResolveHost,
    StartTimer,
    StatusChanged,
    TLSEstablished,
)

__all__ = ["Tracer", "describe"]

_TRANSACTION = {"I": "idle", "T": "in a transaction", "E": "in a failed transaction"}


def describe(event: Event) -> str | None:
    """One line for *event*, or None for events not worth a line."""
    if isinstance(event, StatusChanged):
        return f"status CONNECTION_{event.status.name}"
    if isinstance(event, ResolveHost):
        return f'resolving host name "{event.host}"'
    if isinstance(event, StartTimer):
        return f"connect_timeout: {event.seconds:g} s for this address"
    if isinstance(event, AttemptStarted):
        where = event.address.address
        if event.address.kind == "tcp":
            where += f" port {event.address.port}"
            if event.host and event.host != event.address.address:
                where = f'"{event.host}" ({where})'
        else:
            where = f"Unix socket {where}"
        how = event.encryption
        if event.encryption == "ssl":
            how += " (direct TLS)" if event.direct else " (SSLRequest)"
        return f"attempt: {where}, encryption {how}"
    if isinstance(event, OpenConnection):
        return "opening the connection"
    if isinstance(event, CloseConnection):
        return "closing the connection"
    if isinstance(event, TLSEstablished):
        checks = []
        if event.chain_verified:
            checks.append(f"certificate chain verified against {event.root}")
        else:
            checks.append("certificate chain NOT verified (no root certificate)")
        checks.append("host name verified" if event.host_verified else "host name not checked")
        if event.client_certificate:
            checks.append(f"client certificate {event.client_certificate}")
        return (
            f"TLS established: {event.version}, {event.cipher}, ALPN {event.alpn or 'none'}; "
            + "; ".join(checks)
        )
    if isinstance(event, AuthenticationRequested):
        if event.method == "sasl":
            return (
                f"server requests SASL authentication, offering {', '.join(event.mechanisms)}; "
                f"using {event.mechanism}"
            )
        return f"server requests {event.method} authentication"
    if isinstance(event, AuthenticationCompleted):
        text = f"authenticated: method {event.method}"
        if event.method.startswith("SCRAM"):
            text += ", channel binding " + ("used" if event.channel_binding else "not used")
            text += ", server signature " + (
                "verified" if event.server_verified else "NOT verified"
            )
        return text
    if isinstance(event, NegotiateProtocolVersion):
        return f"server negotiated protocol version {event.version[0]}.{event.version[1]}"
    if isinstance(event, ParameterStatus):
        return f"parameter {event.name} = {event.value}"
    if isinstance(event, BackendKeyData):
        return f"backend pid {event.pid}, cancel key of {len(event.key)} bytes"
    if isinstance(event, NoticeResponse):
        return f"notice: {event.severity}: {event.message}"
    if isinstance(event, ReadyForQuery):
        return f"ready for query ({_TRANSACTION.get(event.status, event.status)})"
    if isinstance(event, AttemptFailed):
        return f"attempt failed ({event.next}): {event.attempt.describe()}"
    if isinstance(event, Connected):
        version = f"{event.protocol_version[0]}.{event.protocol_version[1]}"
        return f"connected (TLS: {'yes' if event.ssl_in_use else 'no'}, protocol {version})"
    return None


class Tracer:
    """Prints each event with the milliseconds since the tracer was made."""

    def __init__(self, out: TextIO, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.out = out
        self.clock = clock
        self.start = clock()

    def elapsed_ms(self) -> float:
        return (self.clock() - self.start) * 1000.0

    def __call__(self, event: Event) -> None:
        line = describe(event)
        if line is not None:
            self.line(line)

    def line(self, text: str) -> None:
        first, *rest = text.splitlines() or [""]
        self.out.write(f"{self.elapsed_ms():9.2f} ms  {first}\n")
        for more in rest:
            self.out.write(f"{'':14}{more}\n")
        self.out.flush()
