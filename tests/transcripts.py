"""Byte transcripts recorded from real servers, and their socket-free replay.

A transcript is one connection, recorded by ``tests/record_transcripts.py``
against the test bed's PostgreSQL servers: the parameters, the SCRAM nonce
the machine was given, and every chunk of bytes in the order it crossed the
socket -- ``client`` (what the machine sent), ``server`` (what one ``recv``
returned; empty means EOF) and ``close`` (the data of a CloseConnection
command, sent just before the socket was closed).  ``expected`` holds what
the connection came to: status, authentication method, server version,
backend pid, protocol version, key length, query rows, or the error.

Files are JSON (``tests/data/transcripts/<name>.json``), bytes hex-encoded,
keys sorted, so a re-recording shows up as a readable diff.

:func:`replay` runs a fresh machine with the same parameters and nonce over
any re-chunking of the server bytes; :func:`server_turns` and
:func:`server_bytes` give the two other chunkings the tests use.

Imported by the tests as the top-level module ``transcripts``.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pgproto
from pgproto import (
    NEED_DATA,
    Address,
    CloseConnection,
    ConnectionStateMachine,
    DataRow,
    Event,
    OpenConnection,
    PollingStatus,
    ResolveHost,
    StartTimer,
)

#: resolve_params, typed loosely: option values come from dicts.
_resolve: Callable[..., pgproto.ConnParams] = pgproto.resolve_params

__all__ = [
    "ENV",
    "FORMAT",
    "NONCE",
    "TRANSCRIPT_DIR",
    "Replay",
    "Transcript",
    "load",
    "load_all",
    "make_machine",
    "replay",
    "server_bytes",
    "server_turns",
]

TRANSCRIPT_DIR: Final = Path(__file__).parent / "data" / "transcripts"
FORMAT: Final = 1

#: The process environment for both recording and replay: nothing from the
#: real process (no PG* variables, no ~/.pgpass), so only ``params`` count.
ENV: Final = pgproto.Environment(environ={}, home=None, user="pgproto-transcripts", uid=4242)

#: The SCRAM client nonce (18 bytes) given to the machine when recording.
NONCE: Final = b"pgproto transcript"

STEP_KINDS: Final = ("client", "server", "close")


@dataclass(frozen=True)
class Transcript:
    name: str
    description: str
    server_major: int
    server_version: str
    params: dict[str, str]
    nonce: bytes
    #: ResolveHost answers: host name -> numeric addresses.
    resolved: dict[str, list[str]]
    #: Where the machine connected (OpenConnection.address).
    address: Address
    query: str | None
    steps: tuple[tuple[str, bytes], ...]
    expected: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.expected["status"] == "ok")

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "name": self.name,
            "description": self.description,
            "server_major": self.server_major,
            "server_version": self.server_version,
            "params": self.params,
            "nonce": self.nonce.hex(),
            "resolved": self.resolved,
            "address": {
                "kind": self.address.kind,
                "address": self.address.address,
                "port": self.address.port,
            },
            "query": self.query,
            "steps": [[kind, data.hex()] for kind, data in self.steps],
            "expected": self.expected,
        }
        return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Transcript:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown transcript format {data.get('format')!r}")
        steps = tuple((str(kind), bytes.fromhex(hexdata)) for kind, hexdata in data["steps"])
        for kind, _ in steps:
            if kind not in STEP_KINDS:
                raise ValueError(f"unknown step kind {kind!r}")
        address = data["address"]
        return cls(
            name=data["name"],
            description=data["description"],
            server_major=int(data["server_major"]),
            server_version=data["server_version"],
            params=dict(data["params"]),
            nonce=bytes.fromhex(data["nonce"]),
            resolved={k: list(v) for k, v in data["resolved"].items()},
            address=Address(kind=address["kind"], address=address["address"], port=address["port"]),
            query=data["query"],
            steps=steps,
            expected=dict(data["expected"]),
        )


def load(path: Path) -> Transcript:
    return Transcript.from_json(path.read_text(encoding="utf-8"))


def load_all() -> list[Transcript]:
    """Every transcript file, sorted by name."""
    return [load(path) for path in sorted(TRANSCRIPT_DIR.glob("*.json"))]


def make_machine(
    params: dict[str, str], nonce: bytes, *, reports: bool = True
) -> ConnectionStateMachine:
    """The machine used both to record and to replay: isolated environment,
    injected nonce, no salted-password cache shared between connections."""

    def random_bytes(count: int) -> bytes:
        if count != len(nonce):
            raise AssertionError(f"the machine drew {count} random bytes, not {len(nonce)}")
        return nonce

    return ConnectionStateMachine(
        _resolve(env=ENV, **params), random_bytes=random_bytes, scram_cache=None, reports=reports
    )


# --------------------------------------------------------------------------
# chunkings of the server bytes


def server_chunks(transcript: Transcript) -> list[bytes]:
    """The server bytes as recorded, one chunk per ``recv``."""
    return [data for kind, data in transcript.steps if kind == "server"]


def server_turns(transcript: Transcript) -> list[bytes]:
    """The server bytes joined into turns: everything the server said between
    two things the client said is one chunk (EOF stays a chunk of its own)."""
    turns: list[bytes] = []
    current = bytearray()
    pending = False
    for kind, data in transcript.steps:
        if kind == "server" and data:
            current += data
            pending = True
            continue
        if pending:
            turns.append(bytes(current))
            current.clear()
            pending = False
        if kind == "server":  # EOF
            turns.append(b"")
    if pending:
        turns.append(bytes(current))
    return turns


def server_bytes(transcript: Transcript) -> list[bytes]:
    """The server bytes one at a time (EOF, if recorded, stays last)."""
    out: list[bytes] = []
    for kind, data in transcript.steps:
        if kind == "server":
            if data:
                out.extend(data[i : i + 1] for i in range(len(data)))
            else:
                out.append(b"")
    return out


def client_bytes(steps: Iterable[tuple[str, bytes]]) -> bytes:
    """Everything the client sent (including CloseConnection data), joined."""
    return b"".join(data for kind, data in steps if kind in ("client", "close"))


# --------------------------------------------------------------------------
# replay


@dataclass
class Replay:
    """What happened when a transcript was replayed."""

    machine: ConnectionStateMachine
    steps: list[tuple[str, bytes]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    error: pgproto.Error | None = None
    #: server chunks the machine never asked for
    unread: list[bytes] = field(default_factory=list)
    #: next_event() calls made (bounded by ``max_steps``)
    calls: int = 0

    @property
    def client(self) -> bytes:
        return client_bytes(self.steps)

    @property
    def rows(self) -> list[list[str | None]]:
        return [list(e.values) for e in self.events if isinstance(e, DataRow)]

    @property
    def closes(self) -> list[bytes]:
        return [e.data for e in self.events if isinstance(e, CloseConnection)]


class _Stuck(AssertionError):
    pass


def replay(
    transcript: Transcript,
    chunks: Sequence[bytes] | None = None,
    *,
    max_steps: int = 100_000,
    reports: bool = True,
) -> Replay:
    """Run a fresh machine against *chunks* of server bytes (default: as recorded).

    The driver does what an adapter does: it answers ResolveHost with the
    recorded addresses, OpenConnection with ``connection_made()`` (checking
    the address), notes CloseConnection, sends whatever ``data_to_send()``
    returns, and gives the next chunk whenever ``poll()`` says READING.  After
    CONNECTION_OK it runs the transcript's query, if any, then ``close()``.

    A ``pgproto.Error`` raised by ``next_event()`` ends the replay and is kept
    in ``error``; anything else propagates.  Running out of chunks while the
    machine still reads, or more than *max_steps* calls to ``next_event()``,
    fails with AssertionError: that would be a hang with a real server.
    *reports* is the machine's (False: commands and essential events only).
    """
    machine = make_machine(transcript.params, transcript.nonce, reports=reports)
    result = Replay(machine=machine)
    queue = deque(chunks if chunks is not None else server_chunks(transcript))

    def pump() -> PollingStatus:
        while result.calls < max_steps:
            result.calls += 1
            event = machine.next_event()
            if event is NEED_DATA:
                status = machine.poll()
                if status is PollingStatus.WRITING:
                    data = machine.data_to_send()
                    if not data:
                        raise _Stuck("poll() says WRITING, but there is nothing to send")
                    result.steps.append(("client", data))
                    continue
                if status is not PollingStatus.READING:
                    return status
                if not queue:
                    raise _Stuck("the machine waits for server bytes the transcript does not have")
                data = queue.popleft()
                result.steps.append(("server", data))
                machine.receive_data(data)
                continue
            result.events.append(event)
            if isinstance(event, ResolveHost):
                machine.addresses_resolved(transcript.resolved[event.host])
            elif isinstance(event, OpenConnection):
                if event.address != transcript.address:
                    raise AssertionError(
                        f"connecting to {event.address}, recorded {transcript.address}"
                    )
                machine.connection_made()
            elif isinstance(event, CloseConnection):
                result.steps.append(("close", event.data))
            elif isinstance(event, StartTimer):
                pass  # no clock here: the timer never expires
        raise _Stuck(f"no settled state after {max_steps} next_event() calls")

    try:
        status = pump()
        if status is PollingStatus.OK:
            if transcript.query is not None:
                machine.send_query(transcript.query)
                pump()
            machine.close()
            pump()
    except pgproto.Error as exc:
        result.error = exc
    result.unread = list(queue)
    return result


def outcome(result: Replay) -> dict[str, Any]:
    """The facts of a finished connection, in the shape of ``expected``."""
    machine = result.machine
    out: dict[str, Any] = {}
    error = result.error
    if error is None:
        params = machine.server_parameters
        out.update(
            status="ok",
            auth_method=machine.auth_method,
            server_version=params.get("server_version"),
            backend_pid=machine.backend_pid,
            key_length=None if machine.backend_key is None else len(machine.backend_key),
            protocol_version=list(machine.protocol_version),
            transaction_status=machine.transaction_status,
            parameters=params,
            rows=result.rows,
        )
        return out
    out["status"] = "failed"
    out["error_type"] = type(error).__name__
    if isinstance(error, pgproto.ConnectError):
        last = error.attempts[-1]
        out.update(
            attempts=len(error.attempts),
            attempt_error_type=type(last.error).__name__,
            attempt_step=last.step,
            sqlstate=last.sqlstate,
            message=str(last.error),
        )
    else:
        out["message"] = str(error)
    return out
