"""Protocol messages: exact encodings, framing under any split, hostile input."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
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
