"""Replay byte transcripts recorded from real PostgreSQL 15 and 18 servers.

Each transcript (tests/data/transcripts/, re-recorded by
``tests/record_transcripts.py``) is replayed through a fresh machine with the
recorded parameters and SCRAM nonce, with the server bytes cut three ways --
as recorded, one chunk per server turn, one byte at a time -- and once more
with junk after the last server message.  The client bytes must equal the
recording exactly, and the outcome must be the recorded one.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable

import pytest
import transcripts
from fake_server import SSL_REQUEST, TERMINATE, client_messages, data_row, startup_parameters
from transcripts import Replay, Transcript, outcome, replay, server_bytes, server_turns

import pgproto
from pgproto import (
    AuthenticationCompleted,
    AuthenticationRequested,
    CloseConnection,
    Connected,
    ConnStatus,
    Event,
    NegotiateProtocolVersion,
    OpenConnection,
    PollingStatus,
    ReadyForQuery,
    StatusChanged,
)

TRANSCRIPTS = transcripts.load_all()
BY_NAME = {t.name: t for t in TRANSCRIPTS}
OK = [t for t in TRANSCRIPTS if t.ok]
FAILED = [t for t in TRANSCRIPTS if not t.ok]


def _ids(items: list[Transcript]) -> list[str]:
    return [t.name for t in items]


def _client_steps(
    steps: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...],
) -> list[tuple[str, bytes]]:
    return [(kind, data) for kind, data in steps if kind != "server"]


def test_the_set_covers_the_scenarios() -> None:
    assert set(BY_NAME) >= {
        "trust_unix_pg18",
        "password_pg18",
        "md5_pg18",
        "scram_pg15",
        "scram_pg18",
        "scram_saslprep_pg18",
        "wrong_password_pg18",
        "no_hba_entry_pg18",
        "ssl_refused_prefer_pg18",
        "negotiate_pg15",
        "protocol_3_2_pg18",
    }
    for t in TRANSCRIPTS:
        assert t.nonce == transcripts.NONCE
        assert t.server_version.startswith(f"postgres (PostgreSQL) {t.server_major}.")
        if t.ok:
            assert t.server_version.endswith(t.expected["server_version"])


@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=_ids(TRANSCRIPTS))
def test_json_round_trip(transcript: Transcript) -> None:
    path = transcripts.TRANSCRIPT_DIR / f"{transcript.name}.json"
    assert transcript.to_json() == path.read_text(encoding="utf-8")
    assert Transcript.from_json(transcript.to_json()) == transcript


# --------------------------------------------------------------------------
# (a), (b), (c): three chunkings, same bytes out, same outcome


CHUNKINGS: dict[str, Callable[[Transcript], list[bytes] | None]] = {
    "recorded": lambda t: None,
    "turns": server_turns,
    "bytes": server_bytes,
}


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=_ids(TRANSCRIPTS))
def test_replay(transcript: Transcript, chunking: str) -> None:
    result = replay(transcript, CHUNKINGS[chunking](transcript))
    assert result.unread == []
    assert outcome(result) == transcript.expected
    # Every client chunk (and every CloseConnection) is the recorded one, in order.
    assert _client_steps(result.steps) == _client_steps(transcript.steps)
    assert result.client == transcripts.client_bytes(transcript.steps)
    if chunking == "recorded":
        assert result.steps == list(transcript.steps)
    machine = result.machine
    assert machine.status is ConnStatus.BAD  # closed, or failed
    assert machine.poll() is PollingStatus.FAILED


@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=_ids(TRANSCRIPTS))
def test_events_do_not_depend_on_chunking(transcript: Transcript) -> None:
    recorded = _shown(replay(transcript).events)
    assert _shown(replay(transcript, server_turns(transcript)).events) == recorded
    assert _shown(replay(transcript, server_bytes(transcript)).events) == recorded


#: What a machine made with ``reports=False`` still produces.
ESSENTIAL: tuple[type[Event], ...] = (
    pgproto.ResolveHost,
    OpenConnection,
    CloseConnection,
    pgproto.StartTimer,
    pgproto.NoticeResponse,
    pgproto.NotificationResponse,
    pgproto.RowDescription,
    pgproto.DataRow,
    pgproto.CommandComplete,
    pgproto.EmptyQueryResponse,
    pgproto.ErrorResponse,
)


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=_ids(TRANSCRIPTS))
def test_without_reports_only_the_reports_are_missing(
    transcript: Transcript, chunking: str
) -> None:
    """``reports=False``: the same bytes, outcome and error; the commands,
    notices and query results unchanged; of the reports only a query's
    ReadyForQuery (which ends its results) is left."""
    chunks = CHUNKINGS[chunking](transcript)
    full = replay(transcript, chunks)
    quiet = replay(transcript, chunks, reports=False)
    assert quiet.steps == full.steps
    assert outcome(quiet) == outcome(full) == transcript.expected
    assert repr(quiet.error) == repr(full.error)
    last_ready = None
    if transcript.query is not None and full.error is None:
        # The query's ReadyForQuery is the last one before the Terminate.
        last_ready = max(i for i, e in enumerate(full.events) if isinstance(e, ReadyForQuery))
    kept = [e for i, e in enumerate(full.events) if isinstance(e, ESSENTIAL) or i == last_ready]
    assert _shown(quiet.events) == _shown(kept)
    assert all(isinstance(e, (*ESSENTIAL, ReadyForQuery)) for e in quiet.events)
    assert quiet.machine.server_parameters == full.machine.server_parameters
    assert repr(quiet.machine.attempts) == repr(full.machine.attempts)


def _shown(events: list[Event]) -> list[str]:
    # Exceptions inside AttemptFailed compare by identity: compare reprs.
    return [repr(e) for e in events]


def test_turns_are_what_the_server_said_between_client_messages() -> None:
    t = BY_NAME["ssl_refused_prefer_pg18"]
    turns = server_turns(t)
    assert turns[0] == b"N"
    assert b"".join(turns) == b"".join(d for k, d in t.steps if k == "server")
    assert len(turns) == sum(1 for k, _ in t.steps if k == "client")


# --------------------------------------------------------------------------
# what the transcripts show, scenario by scenario


def _events(t: Transcript) -> Replay:
    result = replay(t)
    assert result.error is None or not t.ok
    return result


@pytest.mark.parametrize("transcript", OK, ids=_ids(OK))
def test_ok_connections_end_with_terminate(transcript: Transcript) -> None:
    result = _events(transcript)
    assert result.closes == [TERMINATE]
    assert result.steps[-1] == ("close", TERMINATE)
    connected = [e for e in result.events if isinstance(e, Connected)]
    assert len(connected) == 1
    assert connected[0].address == transcript.address
    assert connected[0].ssl_in_use is False
    statuses = [e.status for e in result.events if isinstance(e, StatusChanged)]
    assert statuses[-2:] == [ConnStatus.OK, ConnStatus.BAD]


@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=_ids(TRANSCRIPTS))
def test_startup_message(transcript: Transcript) -> None:
    first = transcript.steps[0][1]
    if transcript.params.get("sslmode") == "prefer":
        assert first == SSL_REQUEST
        first = transcript.steps[2][1]
    (startup,) = client_messages(first, untyped_first=1)
    version, pairs = startup_parameters(startup.body)
    wanted = (3, 2) if transcript.params.get("max_protocol_version") == "3.2" else (3, 0)
    assert version == (wanted[0] << 16) | wanted[1]
    assert pairs == {
        "user": transcript.params["user"],
        "database": "postgres",
        "application_name": "pgproto-transcript",
    }


def test_trust_over_unix_socket_with_a_query() -> None:
    t = BY_NAME["trust_unix_pg18"]
    assert t.address.kind == "unix"
    assert t.address.address == f"{t.params['host']}/.s.PGSQL.{t.params['port']}"
    result = _events(t)
    assert result.rows == [["1", None]]
    assert t.expected["auth_method"] == "none"
    query = [d for k, d in result.steps if k == "client"][-1]
    assert query == b"Q" + struct.pack("!I", 4 + 15) + b"select 1, null\x00"
    done = [e for e in result.events if isinstance(e, AuthenticationCompleted)]
    assert done == [
        AuthenticationCompleted(method="none", channel_binding=False, server_verified=False)
    ]


@pytest.mark.parametrize("name", ["password_pg18", "md5_pg18", "md5_pg15"])
def test_password_messages(name: str) -> None:
    t = BY_NAME[name]
    client = [d for k, d in t.steps if k == "client"]
    (answer,) = client_messages(client[1])
    assert answer.kind == b"p"
    if name.startswith("md5"):
        assert t.expected["auth_method"] == "md5"
        assert answer.body.startswith(b"md5")
        assert len(answer.body) == 3 + 32 + 1
        assert t.params["password"].encode() not in answer.body
    else:
        assert t.expected["auth_method"] == "password"
        assert answer.body == t.params["password"].encode() + b"\x00"


@pytest.mark.parametrize(
    "name", ["scram_pg15", "scram_pg18", "scram_saslprep_pg18", "ssl_refused_prefer_pg18"]
)
def test_scram_exchange(name: str) -> None:
    t = BY_NAME[name]
    result = _events(t)
    client = [d for k, d in t.steps if k == "client"]
    if name == "ssl_refused_prefer_pg18":
        client = client[1:]
    (initial,) = client_messages(client[1])
    nonce = base64.b64encode(transcripts.NONCE)
    assert initial.body == (
        b"SCRAM-SHA-256\x00" + struct.pack("!i", 8 + len(nonce)) + b"n,,n=,r=" + nonce
    )
    (final,) = client_messages(client[2])
    assert final.body.startswith(b"c=biws,r=" + nonce)
    requested = [e for e in result.events if isinstance(e, AuthenticationRequested)]
    assert requested == [
        AuthenticationRequested(
            method="sasl", mechanisms=("SCRAM-SHA-256",), mechanism="SCRAM-SHA-256"
        )
    ]
    done = [e for e in result.events if isinstance(e, AuthenticationCompleted)]
    assert done == [
        AuthenticationCompleted(method="SCRAM-SHA-256", channel_binding=False, server_verified=True)
    ]


def test_ssl_refused_then_plaintext_on_the_same_socket() -> None:
    t = BY_NAME["ssl_refused_prefer_pg18"]
    result = _events(t)
    assert [k for k, _ in t.steps[:3]] == ["client", "server", "client"]
    assert t.steps[1] == ("server", b"N")
    opens = [e for e in result.events if isinstance(e, OpenConnection)]
    assert len(opens) == 1
    assert result.closes == [TERMINATE]  # the only close is the final one
    assert result.machine.attempts == ()


def test_negotiate_protocol_version_pg15() -> None:
    t = BY_NAME["negotiate_pg15"]
    result = _events(t)
    negotiated = [e for e in result.events if isinstance(e, NegotiateProtocolVersion)]
    assert negotiated == [NegotiateProtocolVersion(version=(3, 0), unsupported_options=())]
    assert t.expected["protocol_version"] == [3, 0]
    assert t.expected["key_length"] == 4
    assert t.steps[1][1].startswith(b"v\x00\x00\x00\x0c\x00\x03\x00\x00\x00\x00\x00\x00")


def test_protocol_3_2_pg18_has_a_long_cancel_key() -> None:
    t = BY_NAME["protocol_3_2_pg18"]
    result = _events(t)
    assert t.expected["protocol_version"] == [3, 2]
    assert t.expected["key_length"] == 32
    assert result.machine.backend_key is not None
    assert len(result.machine.backend_key) == 32
    assert not any(isinstance(e, NegotiateProtocolVersion) for e in result.events)


@pytest.mark.parametrize(
    ("name", "sqlstate", "text"),
    [
        ("wrong_password_pg18", "28P01", 'password authentication failed for user "scram_user"'),
        (
            "no_hba_entry_pg18",
            "28000",
            'no pg_hba.conf entry for host "[local]", user "nossl_user"',
        ),
    ],
)
def test_rejections(name: str, sqlstate: str, text: str) -> None:
    t = BY_NAME[name]
    result = replay(t)
    error = result.error
    assert isinstance(error, pgproto.ConnectError)
    assert error.sqlstate == sqlstate
    (attempt,) = error.attempts  # no second attempt: sslmode=disable, one host
    assert isinstance(attempt.error, pgproto.ServerError)
    assert attempt.error.sqlstate == sqlstate
    assert text in attempt.error.message_text
    assert attempt.step == "authentication"
    assert result.closes == [b""]  # dropped, no Terminate
    assert result.machine.poll() is PollingStatus.FAILED
    with pytest.raises(pgproto.ConnectError) as again:
        result.machine.next_event()
    assert again.value is error
    if name == "wrong_password_pg18":
        assert t.params["password"] not in str(error)


# --------------------------------------------------------------------------
# (d) junk after the last server message


GARBAGE = b"\xff\x00garbage"
#: The length word of GARBAGE (b"\x00gar") is far above the 30000-byte limit
#: for an ordinary message, so the header alone is rejected.
GARBAGE_ERROR = "message of type 'ÿ' is 6775154 bytes long, more than the 30000 bytes allowed here"
STRAY_ROW = data_row(b"x")
STRAY_ROW_ERROR = "unexpected message 'D' from server on an idle connection"
#: Fewer bytes than a message header: nothing can be parsed yet.
PARTIAL = b"\xff\x00"

JUNK = {
    "garbage": (GARBAGE, GARBAGE_ERROR),
    "stray-row": (STRAY_ROW, STRAY_ROW_ERROR),
    "partial": (PARTIAL, None),
}


def _with_junk(chunks: list[bytes], junk: bytes) -> list[bytes]:
    return [*chunks[:-1], chunks[-1] + junk]


def _recorded(t: Transcript) -> list[bytes]:
    return [d for k, d in t.steps if k == "server"]


@pytest.mark.parametrize("junk", list(JUNK))
@pytest.mark.parametrize("chunking", ["recorded", "turns"])
@pytest.mark.parametrize("transcript", OK, ids=_ids(OK))
def test_junk_after_the_last_message_of_a_good_connection(
    transcript: Transcript, chunking: str, junk: str
) -> None:
    """The machine parses everything it was given, even after CONNECTION_OK.

    Junk that arrives in the same chunk as the last ReadyForQuery is therefore
    read at once: a complete bad header or an unexpected message is a
    RemoteProtocolError (not a ConnectError: the connection was made, then
    broken), raised after every event of the good messages was delivered; the
    transport is dropped without Terminate, and the machine is BAD for good.
    Fewer bytes than a header are kept unread, and the connection closes
    normally.
    """
    data, message = JUNK[junk]
    chunks = _recorded(transcript) if chunking == "recorded" else server_turns(transcript)
    clean = replay(transcript, chunks)
    result = replay(transcript, _with_junk(chunks, data))
    assert result.unread == []
    if message is None:
        assert outcome(result) == transcript.expected
        assert result.steps[:-1] == [
            *clean.steps[:-2],
            (clean.steps[-2][0], clean.steps[-2][1] + data),
        ]
        assert result.closes == [TERMINATE]
        return
    error = result.error
    assert type(error) is pgproto.RemoteProtocolError
    assert str(error) == message
    # Everything up to CONNECTION_OK (and the query's results) was reported
    # as usual ...
    closed = clean.events.index(StatusChanged(status=ConnStatus.BAD))
    prefix = clean.events[:closed]
    assert result.events[: len(prefix)] == prefix
    assert isinstance(prefix[-1], ReadyForQuery if transcript.query else StatusChanged)
    # ... and then the transport was dropped, without Terminate.
    tail = result.events[len(prefix) :]
    assert [e for e in tail if not isinstance(e, StatusChanged)] == [CloseConnection(data=b"")]
    assert [e for e in tail if isinstance(e, StatusChanged)] in (
        [],
        [StatusChanged(status=ConnStatus.BAD)],
    )
    assert result.client == transcripts.client_bytes(transcript.steps)[: -len(TERMINATE)]
    machine = result.machine
    assert machine.status is ConnStatus.BAD
    assert machine.poll() is PollingStatus.FAILED
    with pytest.raises(pgproto.RemoteProtocolError) as again:
        machine.next_event()
    assert again.value is error
    machine.close()  # nothing left to close
    with pytest.raises(pgproto.RemoteProtocolError):
        machine.next_event()


@pytest.mark.parametrize("junk", list(JUNK))
@pytest.mark.parametrize("transcript", FAILED, ids=_ids(FAILED))
def test_junk_after_a_fatal_error_is_never_read(transcript: Transcript, junk: str) -> None:
    """After the FATAL ErrorResponse the machine is done: whatever follows it
    in the same chunk is left in the buffer and changes nothing."""
    data, _ = JUNK[junk]
    clean = replay(transcript)
    result = replay(transcript, _with_junk(_recorded(transcript), data))
    assert result.unread == []
    assert outcome(result) == transcript.expected
    assert _shown(result.events) == _shown(clean.events)
    assert result.client == clean.client


@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=_ids(TRANSCRIPTS))
def test_junk_in_later_chunks_is_never_asked_for(transcript: Transcript) -> None:
    """Byte by byte, the machine stops asking once it is OK (or FAILED): the
    junk is never received, and the recording replays exactly."""
    chunks = server_bytes(transcript) + [GARBAGE[i : i + 1] for i in range(len(GARBAGE))]
    result = replay(transcript, chunks)
    assert result.unread == [GARBAGE[i : i + 1] for i in range(len(GARBAGE))]
    assert outcome(result) == transcript.expected
    assert result.client == transcripts.client_bytes(transcript.steps)
