"""SCRAM-SHA-256[-PLUS], SASLprep and MD5: against scramp's server, RFC 7677,
independent hashlib computations, and libpq's error texts."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import scramp  # type: ignore[import-untyped]
import scramp.core  # type: ignore[import-untyped]
import scramp.utils  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproto import _scram
from pgproto._errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from pgproto._scram import (
    DEFAULT_CACHE,
    MAX_ITERATIONS_DEFAULT,
    SaltedPasswordCache,
    ScramClient,
    md5_response,
    saslprep,
)

NONCE = bytes(range(18))
CNONCE = base64.b64encode(NONCE)  # 24 characters, no padding
SALT = b"0123456789abcdef"
SALT_B64 = base64.b64encode(SALT)
CB_DATA = hashlib.sha256(b"not really a certificate").digest()
PASSWORD = "correct horse"


@pytest.fixture(autouse=True)
def _clean_default_cache() -> Iterator[None]:
    yield
    DEFAULT_CACHE.clear()


# --------------------------------------------------------------------------
# helpers: an independent implementation with hashlib/hmac


def hmac256(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


# Bound now, so that tests counting the module's PBKDF2 calls do not count these.
_pbkdf2 = hashlib.pbkdf2_hmac


def derive(prepared: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes, bytes]:
    """SaltedPassword, ClientKey, StoredKey, ServerKey (RFC 5802 section 3)."""
    salted = _pbkdf2("sha256", prepared, salt, iterations)
    client_key = hmac256(salted, b"Client Key")
    return salted, client_key, hashlib.sha256(client_key).digest(), hmac256(salted, b"Server Key")


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def server_first(
    *, suffix: bytes = b"srvnonce", salt: bytes = SALT_B64, i: bytes = b"4096", rest: bytes = b""
) -> bytes:
    return b"r=" + CNONCE + suffix + b",s=" + salt + b",i=" + i + rest


def expected_final(
    first: bytes,
    *,
    password: bytes = PASSWORD.encode(),
    salt: bytes = SALT,
    iterations: int = 4096,
    cbind: bytes = b"c=biws",
) -> tuple[bytes, bytes]:
    """The client-final-message and the right server-final-message for *first*."""
    _, client_key, stored_key, server_key = derive(password, salt, iterations)
    nonce = first.split(b",")[0][2:]
    without_proof = cbind + b",r=" + nonce
    auth_message = b"n=,r=" + CNONCE + b"," + first + b"," + without_proof
    proof = xor(client_key, hmac256(stored_key, auth_message))
    return (
        without_proof + b",p=" + b64(proof),
        b"v=" + b64(hmac256(server_key, auth_message)),
    )


def client(**kwargs: Any) -> ScramClient:
    options: dict[str, Any] = {
        "mechanism": "SCRAM-SHA-256",
        "password": PASSWORD,
        "nonce_bytes": NONCE,
        "channel_binding": "n",
        "cache": None,
    }
    options.update(kwargs)
    return ScramClient(**options)


def started(**kwargs: Any) -> ScramClient:
    scram = client(**kwargs)
    scram.initial_response()
    return scram


def challenged(**kwargs: Any) -> tuple[ScramClient, bytes]:
    """A client that has sent its proof, and the server-final-message it expects."""
    scram = started(**kwargs)
    first = server_first()
    ours = scram.handle_challenge(first)
    final_message, server_final = expected_final(first)
    assert ours == final_message
    return scram, server_final


# --------------------------------------------------------------------------
# scramp's server as an independent peer


class _EmptyUserClientFirstBare(scramp.core.ClientFirstBare):  # type: ignore[misc]
    """scramp insists on a user name; PostgreSQL ignores it and libpq sends ``n=``.

    Only scramp's parsing sees the substitute: the server still hashes the
    client-first-message-bare exactly as received.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("n=,"):
            message = "n=user" + message[2:]
        super().__init__(message)


@pytest.fixture
def scramp_server(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Any]:
    monkeypatch.setattr(scramp.core, "ClientFirstBare", _EmptyUserClientFirstBare)

    def make(
        *,
        password: bytes = PASSWORD.encode(),
        salt: bytes = SALT,
        iterations: int = 4096,
        cb_data: bytes | None = None,
    ) -> Any:
        _, _, stored_key, server_key = derive(password, salt, iterations)
        info = (salt, stored_key, server_key, iterations)
        if cb_data is None:
            return scramp.ScramMechanism("SCRAM-SHA-256").make_server(lambda _user: info)
        return scramp.ScramMechanism("SCRAM-SHA-256-PLUS").make_server(
            lambda _user: info, channel_binding=("tls-server-end-point", cb_data)
        )

    return make


def converse(scram: ScramClient, server: Any) -> None:
    """Run a whole exchange; the server's e= answers reach the client."""
    server.set_client_first(scram.initial_response().decode())
    final = scram.handle_challenge(server.get_server_first().encode())
    with contextlib.suppress(scramp.ScramException):  # the verdict arrives as e=... below
        server.set_client_final(final.decode())
    scram.handle_final(server.get_server_final().encode())


@pytest.mark.parametrize(
    ("flag", "mechanism", "cb_data"),
    [
        ("n", "SCRAM-SHA-256", None),
        ("y", "SCRAM-SHA-256", None),
        ("p", "SCRAM-SHA-256-PLUS", CB_DATA),
    ],
)
def test_full_exchange_against_scramp(
    scramp_server: Callable[..., Any], flag: str, mechanism: str, cb_data: bytes | None
) -> None:
    scram = client(mechanism=mechanism, channel_binding=flag, cb_data=cb_data)
    converse(scram, scramp_server(cb_data=cb_data))
    assert scram.finished
    assert scram.channel_bound is (flag == "p")
    assert scram.iterations == 4096
    assert scram.notes == []


def test_channel_binding_data_mismatch_is_refused_by_server(
    scramp_server: Callable[..., Any],
) -> None:
    scram = client(mechanism="SCRAM-SHA-256-PLUS", channel_binding="p", cb_data=b"\x00" * 32)
    with pytest.raises(AuthenticationError) as info:
        converse(scram, scramp_server(cb_data=CB_DATA))
    assert str(info.value) == (
        "error received from server in SCRAM exchange: channel-bindings-dont-match"
    )
    assert not scram.finished
    assert not scram.channel_bound


def test_wrong_password_is_refused_by_server(scramp_server: Callable[..., Any]) -> None:
    scram = client(password="wrong")
    with pytest.raises(AuthenticationError) as info:
        converse(scram, scramp_server())
    assert str(info.value) == "error received from server in SCRAM exchange: invalid-proof"
    assert not scram.finished


def test_tampered_server_final(scramp_server: Callable[..., Any]) -> None:
    scram = client()
    server = scramp_server()
    server.set_client_first(scram.initial_response().decode())
    server.set_client_final(scram.handle_challenge(server.get_server_first().encode()).decode())
    genuine = server.get_server_final().encode()
    signature = bytearray(base64.b64decode(genuine[2:]))
    signature[0] ^= 1
    with pytest.raises(AuthenticationError, match=r"^incorrect server signature$"):
        scram.handle_final(b"v=" + b64(bytes(signature)))
    assert not scram.finished
    with pytest.raises(RemoteProtocolError, match="invalid SCRAM exchange state"):
        scram.handle_final(genuine)


# --------------------------------------------------------------------------
# exact bytes


@pytest.mark.parametrize(
    ("flag", "mechanism", "header"),
    [
        ("n", "SCRAM-SHA-256", b"n,,"),
        ("y", "SCRAM-SHA-256", b"y,,"),
        ("p", "SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,"),
    ],
)
def test_initial_response_bytes(flag: str, mechanism: str, header: bytes) -> None:
    scram = client(
        mechanism=mechanism, channel_binding=flag, cb_data=CB_DATA if flag == "p" else None
    )
    assert (scram.finished, scram.channel_bound, scram.iterations, scram.notes) == (
        False,
        False,
        None,
        [],
    )
    assert scram.initial_response() == header + b"n=,r=" + CNONCE
    assert len(CNONCE) == 24


@pytest.mark.parametrize(
    ("flag", "cbind"),
    [
        ("n", b"c=biws"),
        ("y", b"c=eSws"),
        ("p", b"c=" + b64(b"p=tls-server-end-point,," + CB_DATA)),
    ],
)
def test_client_final_bytes(flag: str, cbind: bytes) -> None:
    plus = flag == "p"
    scram = started(
        mechanism="SCRAM-SHA-256-PLUS" if plus else "SCRAM-SHA-256",
        channel_binding=flag,
        cb_data=CB_DATA if plus else None,
    )
    first = server_first()
    final_message, server_final = expected_final(first, cbind=cbind)
    assert scram.handle_challenge(first) == final_message
    scram.handle_final(server_final)
    assert scram.finished
    assert scram.channel_bound is plus


def test_rfc7677_vector() -> None:
    # RFC 7677 section 3: user "user", password "pencil".  libpq sends n= with
    # a 24-character nonce, so the RFC's messages cannot be replayed; instead
    # check that our key derivation reproduces the RFC's proof and server
    # signature for the RFC's own AuthMessage, then run our n= variant.
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    rfc_nonce = b"rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    rfc_first = b"r=" + rfc_nonce + b",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    auth_message = b"n=user,r=rOprNGfwEbeRWgbNEkqO," + rfc_first + b",c=biws,r=" + rfc_nonce
    cache = SaltedPasswordCache()
    keys = cache.derived_keys(saslprep("pencil"), salt, 4096)
    salted = cache.salted_password(b"pencil", salt, 4096)
    assert salted == keys.salted_password == derive(b"pencil", salt, 4096)[0]
    client_key = keys.client_key.to_bytes(32, "big")
    proof = xor(client_key, hmac256(keys.stored_key, auth_message))
    assert b64(proof) == b"dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    signature = hmac256(keys.server_key, auth_message)
    assert b64(signature) == b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

    scram = started(password="pencil")
    first = b"r=" + CNONCE + b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    final_message, server_final = expected_final(first, password=b"pencil", salt=salt)
    assert scram.handle_challenge(first) == final_message
    scram.handle_final(server_final)
    assert scram.finished


# --------------------------------------------------------------------------
# malformed server messages


def _err(text: str) -> str:
    return f"malformed SCRAM message ({text})"


FIRST_ERRORS: list[tuple[bytes, type[Exception], str]] = [
    (b"", RemoteProtocolError, _err("empty message")),
    (server_first() + b"\x00", RemoteProtocolError, _err("length mismatch")),
    (b"\x00" + server_first(), RemoteProtocolError, _err("length mismatch")),
    (b"s=abc", RemoteProtocolError, _err('attribute "r" expected')),
    (b" r=abc", RemoteProtocolError, _err('attribute "r" expected')),
    (b"r", RemoteProtocolError, _err('expected character "=" for attribute "r"')),
    (b"r:" + CNONCE, RemoteProtocolError, _err('expected character "=" for attribute "r"')),
    (b"r=" + CNONCE[:-1], RemoteProtocolError, "invalid SCRAM response (nonce mismatch)"),
    (b"r=X" + CNONCE, RemoteProtocolError, "invalid SCRAM response (nonce mismatch)"),
    (b"r=,s=" + SALT_B64, RemoteProtocolError, "invalid SCRAM response (nonce mismatch)"),
    (b"r=" + CNONCE, RemoteProtocolError, _err('attribute "s" expected')),
    (b"r=" + CNONCE + b",i=4096", RemoteProtocolError, _err('attribute "s" expected')),
    (b"r=" + CNONCE + b",s", RemoteProtocolError, _err('expected character "=" for attribute "s"')),
    (server_first(salt=b"QQ"), RemoteProtocolError, _err("invalid salt")),
    (server_first(salt=b"QQ="), RemoteProtocolError, _err("invalid salt")),
    (server_first(salt=b"Q==="), RemoteProtocolError, _err("invalid salt")),
    (server_first(salt=b"QQ== "), RemoteProtocolError, _err("invalid salt")),
    (server_first(salt=b"QQ\n=="), RemoteProtocolError, _err("invalid salt")),
    (server_first(salt=b"QQ-_"), RemoteProtocolError, _err("invalid salt")),
    (server_first(salt=b"\xc3\xa9QQ="), RemoteProtocolError, _err("invalid salt")),
    (b"r=" + CNONCE + b",s=" + SALT_B64, RemoteProtocolError, _err('attribute "i" expected')),
    (
        b"r=" + CNONCE + b",s=" + SALT_B64 + b",x=1,i=4096",
        RemoteProtocolError,
        _err('attribute "i" expected'),
    ),
    (
        b"r=" + CNONCE + b",s=" + SALT_B64 + b",i",
        RemoteProtocolError,
        _err('expected character "=" for attribute "i"'),
    ),
    (server_first(i=b"1000001"), AuthenticationError, "1000001"),
]

INVALID_ITERATIONS = [
    b"",
    b"0",
    b"-0",
    b"-1",
    b"-4096",
    b"4096x",
    b"4096 ",
    b"x4096",
    b" ",
    b"+",
    b"-",
    b"+-4",
    b"- 4",
    b"0x10",
    b"1e3",
    b"4_096",
    b"\xd9\xa4",  # ARABIC-INDIC DIGIT FOUR: not a C digit
    b"2147483648",  # beyond a C int
    b"4294967297",  # wraps to 1 in libpq's int; rejected here
    b"9" * 40,
    b"1" + b"0" * 5000,  # more digits than Python's int() would take
]


@pytest.mark.parametrize(("message", "kind", "text"), FIRST_ERRORS)
def test_malformed_server_first(message: bytes, kind: type[Exception], text: str) -> None:
    scram = started()
    with pytest.raises(kind) as info:
        scram.handle_challenge(message)
    if kind is RemoteProtocolError:
        assert str(info.value) == text
    else:
        assert text in str(info.value)
    assert not scram.finished
    with pytest.raises(RemoteProtocolError, match=r"^invalid SCRAM exchange state$"):
        scram.handle_challenge(server_first())


@pytest.mark.parametrize("iterations", INVALID_ITERATIONS)
def test_invalid_iteration_count(iterations: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        started().handle_challenge(server_first(i=iterations))
    assert str(info.value) == _err("invalid iteration count")


@pytest.mark.parametrize(
    "iterations", [b"4096", b"  4096", b"+4096", b"\t\n\v\f\r 4096", b"0004096", b" +04096"]
)
def test_iteration_count_parses_like_strtol(iterations: bytes) -> None:
    scram = started()
    first = server_first(i=iterations)
    final_message, server_final = expected_final(first)
    assert scram.handle_challenge(first) == final_message
    assert scram.iterations == 4096
    scram.handle_final(server_final)
    assert scram.finished


FINAL_ERRORS: list[tuple[bytes, type[Exception], str]] = [
    (b"", RemoteProtocolError, _err("empty message")),
    (b"v=\x00", RemoteProtocolError, _err("length mismatch")),
    (b"x=abc", RemoteProtocolError, _err('attribute "v" expected')),
    (b"V=abc", RemoteProtocolError, _err('attribute "v" expected')),
    (b"v", RemoteProtocolError, _err('expected character "=" for attribute "v"')),
    (b"e", RemoteProtocolError, _err('expected character "=" for attribute "e"')),
    (b"ex=1", RemoteProtocolError, _err('expected character "=" for attribute "e"')),
    (b"v=", RemoteProtocolError, _err("invalid server signature")),
    (b"v=abc", RemoteProtocolError, _err("invalid server signature")),
    (b"v=" + b64(bytes(31)), RemoteProtocolError, _err("invalid server signature")),
    (b"v=" + b64(bytes(33)), RemoteProtocolError, _err("invalid server signature")),
    (b"v=" + b64(bytes(32)), AuthenticationError, "incorrect server signature"),
    (
        b"e=invalid-proof",
        AuthenticationError,
        "error received from server in SCRAM exchange: invalid-proof",
    ),
    (
        b"e=other-error,v=whatever",
        AuthenticationError,
        "error received from server in SCRAM exchange: other-error",
    ),
    (b"e=", AuthenticationError, "error received from server in SCRAM exchange: "),
    (
        b"e=\xff",
        AuthenticationError,
        "error received from server in SCRAM exchange: \N{REPLACEMENT CHARACTER}",
    ),
]


@pytest.mark.parametrize(("message", "kind", "text"), FINAL_ERRORS)
def test_malformed_server_final(message: bytes, kind: type[Exception], text: str) -> None:
    scram, server_final = challenged()
    with pytest.raises(kind) as info:
        scram.handle_final(message)
    assert str(info.value) == text
    assert not scram.finished
    assert not scram.channel_bound
    with pytest.raises(RemoteProtocolError, match=r"^invalid SCRAM exchange state$"):
        scram.handle_final(server_final)


def test_calls_out_of_order() -> None:
    def state_error() -> Any:
        return pytest.raises(RemoteProtocolError, match=r"^invalid SCRAM exchange state$")

    with state_error():
        client().handle_challenge(server_first())
    with state_error():
        client().handle_final(b"v=abc")
    scram = started()
    with state_error():
        scram.initial_response()
    with state_error():  # the exchange is dead after any error
        scram.handle_challenge(server_first())
    with state_error():
        started().handle_final(b"v=" + b64(bytes(32)))

    scram, server_final = challenged()
    with state_error():
        scram.handle_challenge(server_first())
    scram, server_final = challenged()
    scram.handle_final(server_final)
    for call in (
        scram.initial_response,
        lambda: scram.handle_challenge(server_first()),
        lambda: scram.handle_final(server_final),
    ):
        with state_error():
            call()
    assert scram.finished  # a completed exchange stays completed


def test_libpq_checks_the_message_before_the_state() -> None:
    scram, server_final = challenged()
    scram.handle_final(server_final)
    with pytest.raises(RemoteProtocolError, match=r"\(empty message\)"):
        scram.handle_final(b"")


# --------------------------------------------------------------------------
# tolerated oddities


def test_garbage_after_server_first_is_noted_not_fatal() -> None:
    scram = started()
    first = server_first(rest=b",x=extension")
    final_message, server_final = expected_final(first)
    assert scram.handle_challenge(first) == final_message
    assert scram.notes == [_err("garbage at end of server-first-message")]
    scram.handle_final(server_final)
    assert scram.finished


def test_buffer_types_are_accepted() -> None:
    # Typed as bytes, but a caller's bytearray or memoryview works too.
    scram = started()
    first = server_first()
    final_message, server_final = expected_final(first)
    assert scram.handle_challenge(bytearray(first)) == final_message  # type: ignore[arg-type]
    scram.handle_final(memoryview(server_final))  # type: ignore[arg-type]
    assert scram.finished
    scram = started()
    with pytest.raises(RemoteProtocolError, match=r"\(length mismatch\)"):
        scram.handle_challenge(memoryview(first + b"\x00"))  # type: ignore[arg-type]


def test_one_trailing_comma_is_not_garbage() -> None:
    scram = started()
    first = server_first(rest=b",")
    final_message, server_final = expected_final(first)
    assert scram.handle_challenge(first) == final_message
    assert scram.notes == []
    scram.handle_final(server_final + b",")
    assert scram.notes == []
    assert scram.finished


def test_garbage_after_server_final_is_noted_not_fatal() -> None:
    scram, server_final = challenged()
    scram.handle_final(server_final + b",x=1")
    assert scram.notes == [_err("garbage at end of server-final-message")]
    assert scram.finished


def test_garbage_note_then_bad_signature() -> None:
    scram, _ = challenged()
    with pytest.raises(AuthenticationError, match="incorrect server signature"):
        scram.handle_final(b"v=" + b64(bytes(32)) + b",junk")
    assert scram.notes == [_err("garbage at end of server-final-message")]


def test_server_nonce_part_may_be_empty_and_salt_may_be_empty() -> None:
    scram = started()
    first = server_first(suffix=b"", salt=b"")
    final_message, server_final = expected_final(first, salt=b"")
    assert scram.handle_challenge(first) == final_message
    scram.handle_final(server_final)
    assert scram.finished


def test_salt_decoded_as_postgresql_does() -> None:
    # After a padded group, PostgreSQL keeps decoding further groups, each
    # yielding as many bytes as the padded one did.
    assert _scram.pg_b64decode(b"QQ==QUJD") == b"AA"
    assert _scram.pg_b64decode(b"QUI=QUJD") == b"ABAB"
    assert _scram.pg_b64decode(b"QQ=A") == b"A"
    assert _scram.pg_b64decode(b"QQ======") == b"A\x00"
    assert _scram.pg_b64decode(b"") == b""
    scram = started()
    first = server_first(salt=b"QQ==QUJD")
    final_message, server_final = expected_final(first, salt=b"AA")
    assert scram.handle_challenge(first) == final_message
    scram.handle_final(server_final)
    assert scram.finished


@pytest.mark.parametrize(
    ("data", "decoded"),
    [
        (b"AAAA=", None),  # binascii's strict mode would take these two
        (b"AAAA====", None),
        (b"QQ===", None),
        (b"Q===", None),
        (b"=AAA", None),
        (b"QQ==\n", None),
        (b"QQ=A", b"A"),
        (b"QR==", b"A"),  # leftover bits are ignored
    ],
)
def test_base64_padding_like_postgresql(data: bytes, decoded: bytes | None) -> None:
    assert _scram.pg_b64decode(data) == decoded
    assert _scram._pg_b64decode_slow(data) == decoded


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=16) | st.text("AQRUJD=+/ x\n", max_size=16).map(str.encode))
def test_fast_base64_path_agrees_with_postgresql_decoder(data: bytes) -> None:
    assert _scram.pg_b64decode(data) == _scram._pg_b64decode_slow(data)


def test_slow_base64_decoder_on_canonical_input() -> None:
    for n in range(40):
        data = bytes(range(n))
        assert _scram._pg_b64decode_slow(b64(data)) == data


def test_server_nonce_bytes_are_kept_verbatim() -> None:
    scram = started()
    first = server_first(suffix=b"\xff\xfe=%\x01")
    final_message, server_final = expected_final(first)
    assert scram.handle_challenge(first) == final_message
    scram.handle_final(server_final)
    assert scram.finished


# --------------------------------------------------------------------------
# the iteration cap


def test_iteration_cap_default() -> None:
    assert MAX_ITERATIONS_DEFAULT == 1_000_000
    scram = started()
    with pytest.raises(AuthenticationError) as info:
        scram.handle_challenge(server_first(i=b"1000001"))
    assert "1000001" in str(info.value)
    assert "1000000" in str(info.value)
    assert scram.iterations == 1000001  # what the server asked for


def test_iteration_cap_custom(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append(iterations)
        return real(name, password, salt, iterations)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    with pytest.raises(AuthenticationError, match=r"\b11\b.*\b10\b"):
        started(max_iterations=10).handle_challenge(server_first(i=b"11"))
    assert calls == []  # refused before any work
    scram = started(max_iterations=10)
    first = server_first(i=b"10")
    final_message, _ = expected_final(first, iterations=10)
    assert scram.handle_challenge(first) == final_message
    assert calls == [10]


# --------------------------------------------------------------------------
# scram_client_key / scram_server_key


def test_client_and_server_keys_against_scramp(scramp_server: Callable[..., Any]) -> None:
    _, client_key, _, server_key = derive(PASSWORD.encode(), SALT, 4096)
    scram = client(password=None, client_key=client_key, server_key=server_key)
    converse(scram, scramp_server())
    assert scram.finished


def test_client_key_without_server_key_fails_like_libpq(
    scramp_server: Callable[..., Any],
) -> None:
    _, client_key, _, _ = derive(PASSWORD.encode(), SALT, 4096)
    scram = client(password=None, client_key=client_key)
    server = scramp_server()
    server.set_client_first(scram.initial_response().decode())
    first = server.get_server_first().encode()
    server.set_client_final(scram.handle_challenge(first).decode())  # the server accepts us
    with pytest.raises(AuthenticationError, match=r"^incorrect server signature$"):
        scram.handle_final(server.get_server_final().encode())


def test_client_key_without_server_key_verifies_with_zero_salted_password() -> None:
    # What libpq actually checks against: the ServerKey of an all-zero
    # SaltedPassword.  A signature made with that key passes.
    _, client_key, _, _ = derive(PASSWORD.encode(), SALT, 4096)
    scram = started(password="ignored when a client key is given", client_key=client_key)
    first = server_first()
    final_message, _ = expected_final(first)
    assert scram.handle_challenge(first) == final_message
    without_proof = final_message.rsplit(b",p=", 1)[0]
    auth_message = b"n=,r=" + CNONCE + b"," + first + b"," + without_proof
    zero_server_key = hmac256(bytes(32), b"Server Key")
    scram.handle_final(b"v=" + b64(hmac256(zero_server_key, auth_message)))
    assert scram.finished


def test_password_with_server_key(scramp_server: Callable[..., Any]) -> None:
    _, _, _, server_key = derive(PASSWORD.encode(), SALT, 4096)
    scram = client(server_key=server_key)
    converse(scram, scramp_server())
    assert scram.finished
    scram = client(server_key=bytes(32))
    with pytest.raises(AuthenticationError, match=r"^incorrect server signature$"):
        converse(scram, scramp_server())


# --------------------------------------------------------------------------
# constructor checks


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mechanism": "SCRAM-SHA-1"},
        {"mechanism": "SCRAM-SHA-256-PLUS"},  # with flag n
        {"channel_binding": "p"},  # plain mechanism
        {"mechanism": "SCRAM-SHA-256-PLUS", "channel_binding": "p"},  # no cb_data
        {"cb_data": CB_DATA},  # flag n
        {"channel_binding": "x"},
        {"nonce_bytes": bytes(17)},
        {"nonce_bytes": bytes(24)},
        {"password": None},
        {"client_key": bytes(31)},
        {"password": None, "client_key": bytes(32), "server_key": bytes(33)},
        {"max_iterations": 0},
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        client(**kwargs)


# --------------------------------------------------------------------------
# secrets stay secret


def test_password_never_in_repr_or_errors() -> None:
    secret = "Sup3r-s3cret-\N{LATIN SMALL LETTER E WITH ACUTE}\udcff\ud800"
    markers = ("Sup3r", "s3cret")
    seen: list[str] = []
    scram = client(password=secret)
    seen.append(repr(scram))
    scram.initial_response()
    seen.append(repr(scram))
    for bad in (b"", b"x", server_first(i=b"0"), server_first(i=b"2000000")):
        scram = started(password=secret)
        with pytest.raises((RemoteProtocolError, AuthenticationError)) as info:
            scram.handle_challenge(bad)
        seen += [str(info.value), repr(info.value.args), repr(info.value.__context__)]
        seen.append(repr(scram))
    scram = started(password=secret)
    scram.handle_challenge(server_first(i=b"2"))
    with pytest.raises(AuthenticationError) as info:
        scram.handle_final(b"v=" + b64(bytes(32)))
    seen += [str(info.value), repr(info.value.__context__), repr(scram)]
    with pytest.raises(LocalProtocolError) as local:
        client(password=secret, nonce_bytes=b"short")
    seen.append(str(local.value))
    cache = SaltedPasswordCache()
    cache.salted_password(saslprep(secret), SALT, 2)
    seen.append(repr(cache))
    assert not [text for text in seen for marker in markers if marker in text]
    assert "\N{LATIN SMALL LETTER E WITH ACUTE}" not in "".join(seen)


# --------------------------------------------------------------------------
# SASLprep


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        ("", b""),
        ("pencil", b"pencil"),
        # ASCII is used as is: no control-character check
        ("pass\x07word\x7f\x1b", b"pass\x07word\x7f\x1b"),
        # C.1.2 spaces map to U+0020, B.1 characters vanish
        ("a\u00a0b", b"a b"),
        ("a\u3000b\u00adc\ufeff", b"a bc"),
        ("\u2003x", b" x"),
        # NFKC
        ("\ufb01", b"fi"),
        ("\u2168", b"IX"),
        ("\u00aa", b"a"),
        ("A\u0301", "\u00c1".encode()),
        ("\N{LATIN SMALL LETTER E WITH ACUTE}t\N{LATIN SMALL LETTER E WITH ACUTE}", "été".encode()),
        # R and AL characters: fine when the string begins and ends with one
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628".encode()),
    ],
)
def test_saslprep(password: str, prepared: bytes) -> None:
    assert saslprep(password) == prepared


@pytest.mark.parametrize(
    "password",
    [
        "\x07\u00e9",  # ASCII control (C.2.1) in a non-ASCII string
        "\u00e9\x00",  # NUL (C.2.1)
        "a\u0085",  # C.2.2 control
        "a\u200eb",  # LEFT-TO-RIGHT MARK (C.8)
        "a\u202eb",  # RIGHT-TO-LEFT OVERRIDE (C.8)
        "a\ue000",  # private use (C.3)
        "a\U000f0000",  # plane 15 private use (C.3)
        "a\ufdd0",  # non-character (C.4)
        "a\ufffd",  # REPLACEMENT CHARACTER (C.6)
        "a\u2ff0",  # ideographic description character (C.7)
        "a\U000e0041",  # tag (C.9)
        "a\u0221",  # unassigned in Unicode 3.2 (A.1), assigned today
        "a\U0001f600",  # unassigned in Unicode 3.2 (A.1)
        "\u0627a",  # RandALCat with LCat
        "\u06271",  # RandALCat not last
        "1\u0627",  # RandALCat not first
        "\u00ad",  # empty after mapping
        "\u00ad\u200c\ufe0f",  # empty after mapping
    ],
)
def test_saslprep_falls_back_to_raw_bytes(password: str) -> None:
    assert saslprep(password) == password.encode("utf-8")


@pytest.mark.parametrize(
    ("password", "raw"),
    [
        ("abc\udcff", b"abc\xff"),  # undecodable byte kept by surrogateescape
        ("\udcc3(", b"\xc3("),  # invalid sequence
        ("\udc28", b"\xed\xb0\xa8"),  # not an escaped byte: encoded as a surrogate
        ("caf\udce9", b"caf\xe9"),  # Latin-1 text read as UTF-8
        ("\ud800x", b"\xed\xa0\x80x"),  # lone surrogate surrogateescape cannot map
        ("\udcff\ud800", b"\xff\xed\xa0\x80"),  # both kinds
    ],
)
def test_saslprep_invalid_utf8_uses_raw_bytes(password: str, raw: bytes) -> None:
    assert saslprep(password) == raw


def test_saslprep_escaped_bytes_that_are_valid_utf8_get_prepared() -> None:
    # The str stands for its bytes: C2 A0 is U+00A0, which maps to a space.
    assert saslprep("x\udcc2\udca0") == b"x "


# Where scramp's saslprep (RFC 4013 read literally, Unicode 3.2 throughout)
# and PostgreSQL's pg_saslprep part ways.  We follow PostgreSQL.
SCRAMP_DIFFERENCES = [
    # ASCII passes unchecked in PostgreSQL; scramp rejects control characters
    ("pass\x07", b"pass\x07"),
    # U+200B is in both C.1.2 and B.1: PostgreSQL maps it to a space first
    ("a\u200bb\u00e9", "a b\u00e9".encode()),
    # prohibition is checked before normalization: U+0340 is in C.8 ...
    ("a\u0340", b"a\xcd\x80"),
    # ... and so is bidi: U+FB1D is R, its decomposition ends with an NSM
    ("\u05d0\ufb1d", "\u05d0\u05d9\u05b4".encode()),
    # U+2135 ALEF SYMBOL is L, but normalizes to HEBREW LETTER ALEF (R)
    ("\u2135a", "\u05d0a".encode()),
    ("\u05d0\u2135", "\u05d0\u2135".encode()),
    # NFKC with current Unicode data (PostgreSQL 18 ships 16.0), not 3.2
    ("\U0002f868", "\u36fc".encode()),
    # an empty result is a failure: the raw bytes are used
    ("\u00ad", b"\xc2\xad"),
]


@pytest.mark.parametrize(("password", "prepared"), SCRAMP_DIFFERENCES)
def test_saslprep_follows_postgresql_where_scramp_differs(password: str, prepared: bytes) -> None:
    assert saslprep(password) == prepared
    try:
        theirs: bytes | None = scramp.utils.saslprep(password).encode()
    except scramp.ScramException:
        theirs = None
    assert theirs != prepared


def test_non_ascii_password_against_scramp(scramp_server: Callable[..., Any]) -> None:
    password = "p\u00e4ss\u00a0\ufb01"
    scram = client(password=password)
    converse(scram, scramp_server(password="p\u00e4ss fi".encode()))
    assert scram.finished
    scram = client(password="\u05d0\u2135")  # prohibited: raw bytes on both sides
    converse(scram, scramp_server(password="\u05d0\u2135".encode()))
    assert scram.finished


# --------------------------------------------------------------------------
# the cache


@pytest.fixture
def pbkdf2_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes, int]]:
    calls: list[tuple[bytes, bytes, int]] = []
    real = hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append((password, salt, iterations))
        return real(name, password, salt, iterations)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    return calls


def test_second_exchange_hits_the_cache(
    scramp_server: Callable[..., Any], pbkdf2_calls: list[tuple[bytes, bytes, int]]
) -> None:
    cache = SaltedPasswordCache()
    for _ in range(2):
        scram = client(cache=cache)
        converse(scram, scramp_server())
        assert scram.finished
    assert (cache.misses, cache.hits) == (1, 1)
    assert len(pbkdf2_calls) == 1
    # a different salt or iteration count is a different entry
    converse(client(cache=cache), scramp_server(salt=b"another salt value"))
    converse(client(cache=cache), scramp_server(iterations=4097))
    assert (cache.misses, cache.hits, len(pbkdf2_calls)) == (3, 1, 3)


def test_default_cache_is_shared(
    scramp_server: Callable[..., Any], pbkdf2_calls: list[tuple[bytes, bytes, int]]
) -> None:
    DEFAULT_CACHE.clear()
    try:
        for _ in range(3):
            scram = ScramClient(
                mechanism="SCRAM-SHA-256",
                password=PASSWORD,
                nonce_bytes=NONCE,
                channel_binding="n",
            )
            converse(scram, scramp_server())
            assert scram.finished
        assert (DEFAULT_CACHE.misses, DEFAULT_CACHE.hits, len(pbkdf2_calls)) == (1, 2, 1)
    finally:
        DEFAULT_CACHE.clear()


def test_no_cache_always_derives(pbkdf2_calls: list[tuple[bytes, bytes, int]]) -> None:
    DEFAULT_CACHE.clear()
    for _ in range(2):
        challenged(cache=None)
    assert len(pbkdf2_calls) == 2
    assert len(DEFAULT_CACHE) == 0


def test_cache_matches_pbkdf2_and_is_lru(pbkdf2_calls: list[tuple[bytes, bytes, int]]) -> None:
    cache = SaltedPasswordCache(maxsize=2)
    assert cache.salted_password(b"a", SALT, 3) == _pbkdf2("sha256", b"a", SALT, 3)
    assert cache.get(b"a", SALT, 3) == _pbkdf2("sha256", b"a", SALT, 3)
    assert (cache.misses, cache.hits) == (1, 1)
    cache.salted_password(b"b", SALT, 3)
    cache.salted_password(b"a", SALT, 3)  # a is now the most recent
    cache.salted_password(b"c", SALT, 3)  # evicts b
    assert len(cache) == 2
    del pbkdf2_calls[:]
    cache.salted_password(b"a", SALT, 3)
    cache.salted_password(b"c", SALT, 3)
    assert pbkdf2_calls == []
    cache.salted_password(b"b", SALT, 3)
    assert pbkdf2_calls == [(b"b", SALT, 3)]
    assert len(cache) == 2
    assert cache.maxsize == 2
    cache.clear()
    assert (len(cache), cache.hits, cache.misses) == (0, 0, 0)


def test_cache_of_size_zero_stores_nothing() -> None:
    cache = SaltedPasswordCache(maxsize=0)
    cache.salted_password(b"a", SALT, 2)
    cache.salted_password(b"a", SALT, 2)
    assert (len(cache), cache.hits, cache.misses) == (0, 0, 2)
    with pytest.raises(ValueError, match="negative"):
        SaltedPasswordCache(maxsize=-1)


def test_cache_keys_are_inputs_unambiguous() -> None:
    cache = SaltedPasswordCache()
    # the same concatenation split differently must not collide
    assert cache.salted_password(b"ab", b"c", 2) != cache.salted_password(b"a", b"bc", 2)
    assert cache.misses == 2


def test_cache_holds_no_password() -> None:
    cache = SaltedPasswordCache()
    password = b"Sup3r-s3cret"
    cache.salted_password(password, SALT, 2)
    ((key, entry),) = cache._entries.items()
    assert len(key) == 32
    assert password not in key
    assert all(password not in value for value in entry if isinstance(value, bytes))
    assert "Sup3r" not in repr(cache)


def test_cache_thread_safety() -> None:
    cache = SaltedPasswordCache(maxsize=3)
    passwords = [b"p%d" % n for n in range(5)]
    expected = {p: hashlib.pbkdf2_hmac("sha256", p, SALT, 50) for p in passwords}
    errors: list[str] = []
    barrier = threading.Barrier(8)

    def work(offset: int) -> None:
        barrier.wait()
        for n in range(200):
            password = passwords[(n + offset) % len(passwords)]
            if cache.salted_password(password, SALT, 50) != expected[password]:
                errors.append("wrong value")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cache.hits + cache.misses == 8 * 200
    assert len(cache) <= 3


# --------------------------------------------------------------------------
# MD5


def test_md5_response() -> None:
    # The stored form of user "postgres" with password "postgres", as found in
    # pg_authid.rolpassword of old clusters.
    inner = hashlib.md5(b"postgrespostgres", usedforsecurity=False).hexdigest()
    assert "md5" + inner == "md53175bce1d3201d16594cebf9d7eb3f9d"
    salt = b"\x01\x02\x03\x04"
    expected = "md5" + hashlib.md5(inner.encode() + salt, usedforsecurity=False).hexdigest()
    response = md5_response("postgres", "postgres", salt)
    assert response == expected.encode()
    assert len(response) == 35
    assert response.startswith(b"md5")
    assert b"\x00" not in response


def test_md5_response_uses_raw_bytes() -> None:
    salt = b"\xff\x00\x10\x80"
    password, user = "\u00e9t\u00e9\udcff\u00a0", "\u00fcser"
    raw = b"\xc3\xa9t\xc3\xa9\xff\xc2\xa0" + "\u00fcser".encode()
    inner = hashlib.md5(raw, usedforsecurity=False).hexdigest().encode()
    assert (
        md5_response(user, password, salt)
        == b"md5" + hashlib.md5(inner + salt, usedforsecurity=False).hexdigest().encode()
    )


# --------------------------------------------------------------------------
# robustness


_ATTR = st.sampled_from([b"r=", b"s=", b"i=", b"e=", b"v=", b"r", b"", b"x=", b","])
_VALUE = st.one_of(
    st.binary(max_size=12),
    st.sampled_from(
        [CNONCE, CNONCE + b"srv", SALT_B64, b"QQ==", b"4", b" +7", b"0", b"-3", b"99", b"9" * 30]
    ),
)
_MESSAGE = st.one_of(
    st.binary(max_size=64),
    st.lists(st.tuples(_ATTR, _VALUE), max_size=5).map(
        lambda parts: b",".join(a + v for a, v in parts)
    ),
    st.builds(
        lambda suffix, salt, i, rest: b"r=" + CNONCE + suffix + b",s=" + salt + b",i=" + i + rest,
        st.binary(max_size=6),
        st.sampled_from([SALT_B64, b"", b"QQ", b"QQ==QQ==", b"=", b"\xff"]),
        st.sampled_from([b"1", b"8", b"9", b" 2", b"+3", b"0", b"-1", b"x", b"", b"4294967297"]),
        st.sampled_from([b"", b",", b",x=1", b"\x00", b",e=oops"]),
    ),
)


@settings(max_examples=200, deadline=None)
@given(first=_MESSAGE, final=_MESSAGE)
def test_random_server_messages_raise_only_protocol_errors(first: bytes, final: bytes) -> None:
    scram = started(max_iterations=8)
    try:
        scram.handle_challenge(first)
    except (RemoteProtocolError, AuthenticationError):
        assert not scram.finished
        return
    try:
        scram.handle_final(final)
    except (RemoteProtocolError, AuthenticationError):
        assert not scram.finished
    else:  # a random signature verifies only by accident
        raise AssertionError("random server-final-message accepted")


def test_well_formed_message_gets_through_with_a_small_cap() -> None:
    # Sanity for the strategy above: not everything it makes is refused.
    scram = started(max_iterations=8)
    assert scram.handle_challenge(server_first(i=b"8")).startswith(b"c=biws,r=" + CNONCE)
