"""Protocol messages: exact encodings, framing under any split, hostile input."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import pgproto
from pgproto import _wire as wire


def limits(kind: bytes) -> int:
    return wire.ORDINARY_MESSAGE_LIMIT


def test_startup_message_layout() -> None:
    data = wire.startup_message([("user", "alice"), ("database", "app")], (3, 0))
    body = b"\x00\x03\x00\x00user\x00alice\x00database\x00app\x00\x00"
    assert data == struct.pack("!I", len(body) + 4) + body
    assert wire.startup_message([], (3, 2))[4:8] == b"\x00\x03\x00\x02"


def test_request_codes() -> None:
    assert wire.ssl_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert wire.gssenc_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    assert wire.cancel_request(42, b"\x01\x02\x03\x04") == (
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x2a\x01\x02\x03\x04"
    )


def test_frontend_messages() -> None:
    assert wire.password_message(b"pw") == b"p\x00\x00\x00\x07pw\x00"
    assert wire.sasl_initial_response("SCRAM-SHA-256", b"n,,x") == (
        b"p\x00\x00\x00\x1aSCRAM-SHA-256\x00\x00\x00\x00\x04n,,x"
    )
    assert wire.sasl_response(b"abc") == b"p\x00\x00\x00\x07abc"
    assert wire.query("SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert wire.terminate() == b"X\x00\x00\x00\x04"


@pytest.mark.parametrize(
    "call", [lambda: wire.query("a\x00b"), lambda: wire.password_message(b"a\x00")]
)
def test_nul_in_frontend_strings_is_a_local_error(call: object) -> None:
    with pytest.raises(pgproto.LocalProtocolError):
        call()  # type: ignore[operator]


MESSAGES = (
    b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    + b"S\x00\x00\x00\x16server_version\x0018\x00"
    + b"K\x00\x00\x00\x0c\x00\x00\x00\x07\x01\x02\x03\x04"
    + b"Z\x00\x00\x00\x05I"
)


def test_framing_whole_and_byte_by_byte() -> None:
    whole = wire.ReceiveBuffer(limits)
    whole.feed(MESSAGES)
    expected = []
    while (m := whole.next_message()) is not None:
        expected.append(m)
    assert [m.type for m in expected] == [b"R", b"S", b"K", b"Z"]
    assert len(whole) == 0

    split = wire.ReceiveBuffer(limits)
    got = []
    for i in range(len(MESSAGES)):
        split.feed(MESSAGES[i : i + 1])
        while (m := split.next_message()) is not None:
            got.append(m)
    assert got == expected


@pytest.mark.parametrize("length", [0, 3, 0xFFFFFFFF, 0x80000000])
def test_bad_length_words_are_rejected_from_the_header(length: int) -> None:
    buf = wire.ReceiveBuffer(limits)
    buf.feed(b"E" + struct.pack("!I", length))
    with pytest.raises(pgproto.RemoteProtocolError):
        buf.next_message()


def test_huge_length_rejected_before_the_body_arrives() -> None:
    buf = wire.ReceiveBuffer(lambda kind: wire.DATA_MESSAGE_LIMIT if kind == b"D" else 2000)
    buf.feed(b"R" + struct.pack("!I", 1 << 30))
    with pytest.raises(pgproto.RemoteProtocolError, match="more than the 2000 bytes"):
        buf.next_message()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=8))
def test_arbitrary_bytes_only_raise_remote_protocol_errors(data: bytes, step: int) -> None:
    buf = wire.ReceiveBuffer(limits)
    try:
        for i in range(0, len(data), step):
            buf.feed(data[i : i + step])
            while (m := buf.next_message()) is not None:
                assert len(m.body) <= wire.ORDINARY_MESSAGE_LIMIT
                for decode in (
                    wire.parse_authentication,
                    wire.parse_parameter_status,
                    wire.parse_ready_for_query,
                    wire.parse_fields,
                    wire.parse_negotiate_protocol_version,
                    wire.parse_row_description,
                    wire.parse_data_row,
                    wire.parse_command_complete,
                ):
                    with contextlib.suppress(pgproto.RemoteProtocolError):
                        decode(m.body)
    except pgproto.RemoteProtocolError:
        pass
    assert len(buf) <= len(data)


def test_take_byte_leaves_the_rest() -> None:
    buf = wire.ReceiveBuffer(limits)
    buf.feed(b"Sjunk")
    assert buf.take_byte() == b"S"
    assert buf.take_all() == b"junk"
    assert buf.take_byte() is None


def test_decoders() -> None:
    assert wire.parse_authentication(b"\x00\x00\x00\x05salt") == (5, b"salt")
    assert wire.parse_sasl_mechanisms(b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00") == [
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-256",
    ]
    assert wire.parse_parameter_status(b"in_hot_standby\x00off\x00") == ("in_hot_standby", "off")
    assert wire.parse_ready_for_query(b"I") == "I"
    assert wire.parse_fields(b"SFATAL\x00C28P01\x00Mbad\x00\x00") == {
        "S": "FATAL",
        "C": "28P01",
        "M": "bad",
    }
    assert wire.parse_negotiate_protocol_version(b"\x00\x00\x00\x00\x00\x00\x00\x01_pq_.x\x00") == (
        0,
        ["_pq_.x"],
    )
    assert wire.parse_data_row(b"\x00\x02\x00\x00\x00\x01a\xff\xff\xff\xff") == (b"a", None)
    assert wire.parse_command_complete(b"SELECT 1\x00") == "SELECT 1"
    row = b"\x00\x01x\x00" + b"\x00" * 18
    assert wire.parse_row_description(row) == ["x"]


@pytest.mark.parametrize(
    ("version", "key", "ok"),
    [
        ((3, 0), b"\x01" * 4, True),
        ((3, 0), b"\x01" * 8, False),
        ((3, 2), b"\x01" * 32, True),
        ((3, 2), b"\x01" * 256, True),
        ((3, 2), b"\x01" * 257, False),
        ((3, 2), b"\x01" * 3, False),
    ],
)
def test_backend_key_lengths(version: tuple[int, int], key: bytes, ok: bool) -> None:
    body = b"\x00\x00\x00\x07" + key
    if ok:
        assert wire.parse_backend_key_data(body, version) == (7, key)
    else:
        with pytest.raises(pgproto.RemoteProtocolError):
            wire.parse_backend_key_data(body, version)


@pytest.mark.parametrize(
    ("decode", "body"),
    [
        (wire.parse_parameter_status, b"name\x00value"),
        (wire.parse_ready_for_query, b"X"),
        (wire.parse_ready_for_query, b"II"),
        (wire.parse_fields, b"SFATAL"),
        (wire.parse_negotiate_protocol_version, b"\x00\x00\x00\x00\x7f\xff\xff\xff"),
        (wire.parse_data_row, b"\x00\x01\x00\x00\x00\x09ab"),
        (wire.parse_data_row, b"\xff\xff"),
        (wire.parse_authentication, b"\x00\x00"),
    ],
)
def test_malformed_bodies(decode: object, body: bytes) -> None:
    with pytest.raises(pgproto.RemoteProtocolError):
        decode(body)  # type: ignore[operator]


# --------------------------------------------------------------------------
# ParameterStatus in bulk


def _parameter_status(name: bytes, value: bytes, length: int | None = None) -> bytes:
    body = name + b"\x00" + value + b"\x00"
    return b"S" + struct.pack("!I", len(body) + 4 if length is None else length) + body


def _reference_take(data: bytes, limit: int) -> tuple[list[tuple[str, str]], int]:
    """The bulk take, one message at a time: well-formed ParameterStatus
    messages from the front, stopping at the first that is not one."""
    found, pos = [], 0
    while len(data) - pos >= 5 and data[pos : pos + 1] == b"S":
        (length,) = struct.unpack_from("!I", data, pos + 1)
        end = pos + 1 + length
        if length < 4 or length > limit or end > len(data):
            break
        parts = data[pos + 5 : end].split(b"\x00")
        if len(parts) != 3 or parts[2]:
            break
        found.append(tuple(p.decode("utf-8", "surrogateescape") for p in parts[:2]))
        pos = end
    return found, pos  # type: ignore[return-value]


def _take(
    data: bytes, limit: int | Callable[[bytes], int] = wire.ORDINARY_MESSAGE_LIMIT
) -> tuple[list[tuple[str, str]], int]:
    """What calls to take_parameter_statuses() take, until one takes nothing
    (a call may take part of a run: the rest is for the next)."""
    buffer = wire.ReceiveBuffer(limit if callable(limit) else lambda kind: limit)
    buffer.feed(data)
    taken: list[tuple[str, str]] = []
    while more := buffer.take_parameter_statuses():
        taken.extend(more)
    return taken, len(data) - len(buffer)


def test_bulk_parameter_status_takes_the_run_and_stops_at_the_next_message() -> None:
    run = _parameter_status(b"server_version", b"18.6") + _parameter_status(b"TimeZone", b"UTC")
    key_data = b"K\x00\x00\x00\x0c\x00\x00\x00\x2a\x01\x02\x03\x04"
    assert _take(run + key_data) == ([("server_version", "18.6"), ("TimeZone", "UTC")], len(run))
    assert _take(b"") == ([], 0)
    assert _take(key_data) == ([], 0)
    # Empty names and values, and bytes that are not UTF-8, survive as such.
    assert _take(_parameter_status(b"", b"") + _parameter_status(b"x", b"\xff")) == (
        [("", ""), ("x", "\udcff")],
        16,
    )


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(_parameter_status(b"a", b"b", length=9), id="length-word-too-long"),
        pytest.param(_parameter_status(b"a", b"bc", length=7), id="length-word-too-short"),
        pytest.param(b"S\x00\x00\x00\x09a\x00b\x00\x00", id="three-strings"),
        pytest.param(b"S\x00\x00\x00\x07ab\x00c", id="unterminated"),
        pytest.param(_parameter_status(b"a", b"b" * 40), id="over-the-limit"),
        pytest.param(_parameter_status(b"a", b"b")[:-1], id="incomplete"),
    ],
)
def test_bulk_parameter_status_leaves_a_misfit_and_what_follows(bad: bytes) -> None:
    good = _parameter_status(b"DateStyle", b"ISO, MDY")
    after = _parameter_status(b"later", b"on")
    assert _take(good + bad + after, limit=30) == ([("DateStyle", "ISO, MDY")], len(good))
    assert _take(bad + after, limit=30) == ([], 0)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.binary(max_size=12), st.binary(max_size=12)).map(
                lambda pair: _parameter_status(
                    pair[0].replace(b"\x00", b""), pair[1].replace(b"\x00", b"")
                )
            ),
            st.binary(max_size=12),  # anything, including broken headers
            st.builds(
                lambda name, shift: _parameter_status(
                    name, b"v", length=max(0, 7 + len(name) + shift)
                ),
                st.binary(max_size=6).map(lambda b: b.replace(b"\x00", b"")),
                st.integers(min_value=-6, max_value=6),
            ),
        ),
        max_size=8,
    ),
    st.integers(min_value=4, max_value=64),
)
def test_bulk_parameter_status_matches_one_message_at_a_time(
    pieces: list[bytes], limit: int
) -> None:
    data = b"".join(pieces)
    assert _take(data, limit) == _reference_take(data, limit)


def _limit_30(kind: bytes) -> int:
    return 30


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.binary(max_size=8), st.binary(max_size=8)).map(
            lambda pair: _parameter_status(
                pair[0].replace(b"\x00", b""), pair[1].replace(b"\x00", b"")
            )
        ),
        min_size=1,
        max_size=4,
    ),
    st.binary(max_size=16),
    st.integers(min_value=0, max_value=40),
)
def test_a_run_seen_before_is_taken_as_one_message_at_a_time_would(
    run: list[bytes], after: bytes, cut: int
) -> None:
    # The second buffer starts with the run the first one took (the usual
    # case: a server sends every connection the same parameters), followed
    # by anything, or holds only part of it: the result is still what one
    # message at a time gives.
    first = b"".join(run)
    assert _take(first, _limit_30) == _reference_take(first, 30)
    for data in (first + after, first[:cut] + after, after + first):
        assert _take(data, _limit_30) == _reference_take(data, 30)
    # Under another limit the run is checked again, not taken as it was.
    assert _take(first, 10) == _reference_take(first, 10)


def test_a_run_seen_before_is_taken_in_one_call() -> None:
    run = _parameter_status(b"server_version", b"18.6") + _parameter_status(b"TimeZone", b"UTC")
    for _ in range(2):
        buffer = wire.ReceiveBuffer(_limit_30)
        buffer.feed(run + KEY_DATA)
        assert buffer.take_parameter_statuses() == (("server_version", "18.6"), ("TimeZone", "UTC"))
        assert len(buffer) == len(KEY_DATA)


# --------------------------------------------------------------------------
# whole messages known in advance: AuthenticationOk, and BackendKeyData
# (4-byte key) + ReadyForQuery, the usual end of a startup burst

KEY_DATA = b"K\x00\x00\x00\x0c\x00\x00\x30\x39\x01\x02\x03\x04"  # pid 12345
READY = b"Z\x00\x00\x00\x05I"


def _buffer(data: bytes) -> wire.ReceiveBuffer:
    buffer = wire.ReceiveBuffer(lambda kind: wire.ORDINARY_MESSAGE_LIMIT)
    buffer.feed(data)
    return buffer


def test_take_exact_consumes_only_the_whole_message() -> None:
    ok = wire.AUTHENTICATION_OK
    assert ok == b"R" + struct.pack("!Ii", 8, 0)
    buffer = _buffer(ok + b"tail")
    assert buffer.take_exact(ok)
    assert buffer.take_all() == b"tail"
    for partial in (b"", ok[:1], ok[:-1], b"R\x00\x00\x00\x0c" + ok[5:]):
        buffer = _buffer(partial)
        assert not buffer.take_exact(ok)
        assert buffer.take_all() == partial  # untouched
    buffer = _buffer(ok)
    assert buffer.take_exact(ok)
    assert len(buffer) == 0


def test_key_data_and_ready_taken_together() -> None:
    buffer = _buffer(KEY_DATA + READY + b"N...")
    assert buffer.take_key_data_and_ready() == (12345, b"\x01\x02\x03\x04", "I")
    assert buffer.take_all() == b"N..."
    buffer = _buffer(
        KEY_DATA.replace(b"\x00\x00\x30\x39", b"\xff\xff\xff\xfe") + b"Z\x00\x00\x00\x05T"
    )
    assert buffer.take_key_data_and_ready() == (-2, b"\x01\x02\x03\x04", "T")
    assert len(buffer) == 0


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(KEY_DATA, id="no-ready"),
        pytest.param(KEY_DATA + READY[:-1], id="ready-incomplete"),
        pytest.param(KEY_DATA + b"Z\x00\x00\x00\x05X", id="bad-status"),
        pytest.param(KEY_DATA + b"Z\x00\x00\x00\x06II", id="long-ready"),
        pytest.param(
            b"K\x00\x00\x00\x28" + b"\x00\x00\x30\x39" + bytes(32) + READY, id="32-byte-key"
        ),
        pytest.param(KEY_DATA + _parameter_status(b"a", b"b") + READY, id="message-between"),
        pytest.param(READY + KEY_DATA, id="other-order"),
    ],
)
def test_key_data_and_ready_leave_anything_else(data: bytes) -> None:
    buffer = _buffer(data)
    assert buffer.take_key_data_and_ready() is None
    assert buffer.take_all() == data  # for next_message() to cut and judge


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=24), st.integers(min_value=0, max_value=24))
@example(b"", 19)
@example(b"S\x00", 19)
@example(b"\x28" + bytes(8), 4)
def test_key_data_and_ready_match_one_message_at_a_time(junk: bytes, cut: int) -> None:
    """Whenever the pair is taken, next_message() would have found exactly
    a valid BackendKeyData with a 4-byte key and a valid ReadyForQuery."""
    data = (KEY_DATA + READY)[:cut] + junk
    taken = _buffer(data).take_key_data_and_ready()
    buffer = _buffer(data)
    try:
        first, second = buffer.next_message(), buffer.next_message()
        if first is None or second is None or first.type != b"K" or second.type != b"Z":
            expected = None
        else:
            expected = (
                *wire.parse_backend_key_data(first.body, wire.PROTOCOL_3_0),
                wire.parse_ready_for_query(second.body),
            )
    except pgproto.RemoteProtocolError:
        expected = None
    assert taken == expected
