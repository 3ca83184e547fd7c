"""Password authentication: SCRAM-SHA-256[-PLUS], MD5, and SASLprep, as libpq does them.

Theory of operation
-------------------

SCRAM (RFC 5802, with SHA-256 per RFC 7677) takes two round trips, and
:class:`ScramClient` is a small state machine over them.  The caller moves the
bytes; this module only turns server payloads into client payloads:

``initial_response()``
    client-first-message: the GS2 header (``n,,``, ``y,,`` or
    ``p=tls-server-end-point,,``) followed by ``n=,r=<nonce>``.  As in libpq
    the user name is always empty (the server takes it from the startup
    packet), and the nonce is the base64 form of 18 random bytes, which the
    caller supplies so that this module never touches a random source.
``handle_challenge(server_first)``
    Checks the server-first-message the way libpq does (attributes ``r``,
    ``s``, ``i`` in exactly that order; the combined nonce must start with
    ours; libpq's own base64 decoder for the salt; a ``strtol``-like parse of
    the iteration count), derives the keys and returns the
    client-final-message carrying the proof.
``handle_final(server_final)``
    Checks the ``v=`` server signature in constant time.  An ``e=`` answer is
    the server refusing us.

Key derivation is ``SaltedPassword = PBKDF2-HMAC-SHA-256(password, salt, i)``
followed by a few HMACs.  PBKDF2 dominates the cost of a connection, so the
derived keys are kept in a :class:`SaltedPasswordCache` (RFC 5802 section 5.1
allows a client to cache them): a second connection with the same password,
salt and iteration count skips PBKDF2 and the key HMACs, leaving two HMACs
per exchange (the proof and the server signature).  The cache is keyed by a
SHA-256 digest of a length-prefixed encoding of its inputs and never holds the
password itself.  The ``scram_client_key``/``scram_server_key`` connection
options replace the derived keys altogether.

Where libpq is quirky, this module is too:

* a server nonce that merely *starts with* the client nonce is accepted, even
  when the server added nothing to it;
* an empty salt is accepted;
* unknown data after the last attribute of the server-first or server-final
  message is not fatal: libpq records a "garbage at end" message and carries
  on, and so do we (the text goes to :attr:`ScramClient.notes`);
* with a client key but no server key, libpq verifies the server signature
  with a key derived from an all-zero SaltedPassword, so verification fails
  with "incorrect server signature"; reproduced deliberately.

Deliberate differences from libpq, both about the iteration count:

* pgproto caps it (:data:`MAX_ITERATIONS_DEFAULT`, adjustable); libpq has no
  cap, so a hostile server can make it burn CPU for as long as it likes;
* libpq stores ``strtol``'s ``long`` result in an ``int``, so a value beyond
  2**31 - 1 wraps (to a negative count, rejected, or sometimes to a small
  positive one, accepted); pgproto rejects every such value as an invalid
  iteration count.

Passwords go through :func:`saslprep`, which follows PostgreSQL's
``pg_saslprep`` rather than RFC 4013 to the letter (see its docstring); MD5
authentication uses the raw password bytes (:func:`md5_response`).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import stringprep
import struct
import threading
import unicodedata
from collections import OrderedDict
from typing import Final, NamedTuple

from ._errors import AuthenticationError, LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_CACHE",
    "MAX_ITERATIONS_DEFAULT",
    "SCRAM_SHA_256",
    "SCRAM_SHA_256_PLUS",
    "SaltedPasswordCache",
    "ScramClient",
    "md5_response",
    "saslprep",
]

#: pgproto's cap on the iteration count a server may ask for.  libpq has none.
MAX_ITERATIONS_DEFAULT: Final = 1_000_000

SCRAM_SHA_256: Final = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS: Final = "SCRAM-SHA-256-PLUS"

#: libpq's raw nonce length (SCRAM_RAW_NONCE_LEN); base64 makes 24 characters.
NONCE_LENGTH: Final = 18
#: SHA-256 output size: every SCRAM key, signature and proof has this length.
KEY_LENGTH: Final = 32

# The iteration count lands in a C int in libpq.
_INT_MAX: Final = 2**31 - 1


# --------------------------------------------------------------------------
# SASLprep


def _raw_bytes(text: str) -> bytes:
    """The bytes a str stands for: UTF-8, with surrogateescape'd bytes restored.

    Lone surrogates that surrogateescape cannot restore (outside U+DC80..U+DCFF)
    are encoded as their three-byte forms, which are not valid UTF-8 either.
    The UnicodeEncodeError is dropped before anything else happens, so no
    traceback can carry the text (a password) along.
    """
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        pass
    return b"".join(
        bytes((ord(c) - 0xDC00,))
        if 0xDC80 <= ord(c) <= 0xDCFF
        else c.encode("utf-8", "surrogatepass")
        for c in text
    )


def _prohibited(c: str) -> bool:
    """SASLprep's prohibited output (RFC 4013 section 2.3) or unassigned (A.1).

    Python's :mod:`stringprep` tables are RFC 3454's, the same ones libpq
    carries.  C.1.2 and B.1 are absent: mapping has removed them already.
    """
    return (
        stringprep.in_table_c21_c22(c)
        or stringprep.in_table_a1(c)
        or stringprep.in_table_c3(c)
        or stringprep.in_table_c4(c)
        or stringprep.in_table_c5(c)
        or stringprep.in_table_c6(c)
        or stringprep.in_table_c7(c)
        or stringprep.in_table_c8(c)
        or stringprep.in_table_c9(c)
    )


def _saslprep_text(text: str) -> str | None:
    """pg_saslprep on a decoded, non-ASCII string; None where it reports PROHIBITED."""
    # Map.  A non-ASCII space goes to U+0020 before the "mapped to nothing"
    # test, so U+200B (in both tables) becomes a space, as in libpq.
    mapped: list[str] = []
    for c in text:
        if stringprep.in_table_c12(c):
            mapped.append(" ")
        elif not stringprep.in_table_b1(c):
            mapped.append(c)
    if not mapped:
        return None
    # Prohibit and check bidi -- on the mapped string, before normalization.
    if any(_prohibited(c) for c in mapped):
        return None
    in_randal = stringprep.in_table_d1
    if any(in_randal(c) for c in mapped) and (
        not in_randal(mapped[0])
        or not in_randal(mapped[-1])
        or any(stringprep.in_table_d2(c) for c in mapped)
    ):
        return None
    # Normalize with current Unicode data: PostgreSQL uses its own recent
    # tables here, not Unicode 3.2.
    return unicodedata.normalize("NFKC", "".join(mapped))


def saslprep(password: str) -> bytes:
    """The password bytes SCRAM hashes: PostgreSQL's pg_saslprep plus libpq's fallback.

    * A pure ASCII password is used unchanged (no control-character check).
    * Otherwise the password's bytes must be valid UTF-8, else they are used
      raw.  (A str stands for the bytes it encodes to with surrogateescape,
      so passwords read from undecodable files keep their bytes.)
    * RFC 3454 C.1.2 spaces are mapped to U+0020 and B.1 characters removed;
      an empty result means the raw bytes are used.
    * The prohibited-output, unassigned (A.1) and bidi checks run on that
      mapped string before NFKC normalization, as in PostgreSQL; any failure
      means the raw bytes are used.
    * Otherwise the NFKC form, in UTF-8.

    The server applies the same rules when it stores a SCRAM secret, which is
    why falling back to the raw bytes interoperates.
    """
    if password.isascii():
        return password.encode("ascii")
    raw = _raw_bytes(password)
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None:
        return raw
    prepared = _saslprep_text(text)
    return raw if prepared is None else prepared.encode("utf-8")


# --------------------------------------------------------------------------
# MD5


def md5_response(user: str, password: str, salt: bytes) -> bytes:
    """The AuthenticationMD5Password answer, without its NUL terminator.

    ``"md5" + hex(md5(hex(md5(password + user)) + salt))``: 35 ASCII bytes.
    The password and user name are used as raw bytes, with no SASLprep.
    """
    inner = hashlib.md5(_raw_bytes(password) + _raw_bytes(user), usedforsecurity=False)
    outer = hashlib.md5(inner.hexdigest().encode("ascii") + salt, usedforsecurity=False)
    return b"md5" + outer.hexdigest().encode("ascii")


# --------------------------------------------------------------------------
# Key derivation and the cache


class _Keys(NamedTuple):
    salted_password: bytes
    client_key: int  # as an integer, ready to be XORed into the proof
    stored_key: bytes
    server_key: bytes


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


def _keys_from_salted(salted_password: bytes) -> _Keys:
    client_key = _hmac_sha256(salted_password, b"Client Key")
    return _Keys(
        salted_password,
        int.from_bytes(client_key, "big"),
        hashlib.sha256(client_key).digest(),
        _hmac_sha256(salted_password, b"Server Key"),
    )


def _derive_keys(password: bytes, salt: bytes, iterations: int) -> _Keys:
    return _keys_from_salted(hashlib.pbkdf2_hmac("sha256", password, salt, iterations))


_CACHE_KEY_HEADER: Final = struct.Struct(">QQQ")


def _cache_key(password: bytes, salt: bytes, iterations: int) -> bytes:
    # Both lengths come first, so the encoding is unambiguous.
    header = _CACHE_KEY_HEADER.pack(len(password), len(salt), iterations)
    return hashlib.sha256(header + password + salt).digest()


# What libpq verifies with when it has a client key but no server key: the
# ServerKey of a SaltedPassword that was never filled in.
_ZERO_SERVER_KEY: Final = _hmac_sha256(bytes(KEY_LENGTH), b"Server Key")


class SaltedPasswordCache:
    """A bounded, thread-safe LRU cache of SCRAM key material.

    Entries are keyed by a SHA-256 digest of the prepared password, the salt
    and the iteration count (length-prefixed), never by the password itself.
    Each entry holds the SaltedPassword and the keys derived from it, so a
    hit skips PBKDF2 and the key HMACs.  ``maxsize=0`` stores nothing.

    :attr:`hits` and :attr:`misses` count lookups.  PBKDF2 runs outside the
    lock, so two threads missing on the same entry at once both compute it.
    """

    __slots__ = ("_entries", "_lock", "_maxsize", "hits", "misses")

    def __init__(self, maxsize: int = 64) -> None:
        if maxsize < 0:
            raise ValueError("maxsize must not be negative")
        self._maxsize = maxsize
        self._entries: OrderedDict[bytes, _Keys] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return (
            f"<SaltedPasswordCache {len(self._entries)}/{self._maxsize} entries, "
            f"{self.hits} hits, {self.misses} misses>"
        )

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    def salted_password(self, password: bytes, salt: bytes, iterations: int) -> bytes:
        """PBKDF2-HMAC-SHA-256 of the (prepared) password, from the cache when possible."""
        return self.derived_keys(password, salt, iterations).salted_password

    get = salted_password

    def derived_keys(self, password: bytes, salt: bytes, iterations: int) -> _Keys:
        """SaltedPassword and the keys derived from it, from the cache when possible."""
        key = _cache_key(password, salt, iterations)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            self.misses += 1
        entry = _derive_keys(password, salt, iterations)
        if self._maxsize:
            with self._lock:
                self._entries[key] = entry
                self._entries.move_to_end(key)
                while len(self._entries) > self._maxsize:
                    self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        """Forget every entry and reset the counters."""
        with self._lock:
            self._entries.clear()
            self.hits = 0
            self.misses = 0


#: The cache shared by every :class:`ScramClient` that is not given another.
DEFAULT_CACHE: Final[SaltedPasswordCache] = SaltedPasswordCache()


# --------------------------------------------------------------------------
# Parsing helpers (libpq's rules)


def _attr_value(part: bytes, attr: bytes) -> bytes:
    """libpq's read_attr_value on one comma-separated part: ``<attr>=<value>``.

    The callers split the message on its first commas, which is where libpq's
    reader stops; a missing part arrives here empty.
    """
    if part[:1] == attr and part[1:2] == b"=":
        return part[2:]
    if part[:1] != attr:
        raise RemoteProtocolError(f'malformed SCRAM message (attribute "{attr.decode()}" expected)')
    raise RemoteProtocolError(
        f'malformed SCRAM message (expected character "=" for attribute "{attr.decode()}")'
    )


_B64_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_INVALID: Final = 0xFF
_B64_VALUES: Final = bytes(
    _B64_ALPHABET.index(c) if c in _B64_ALPHABET else _B64_INVALID for c in range(256)
)


def _pg_b64decode_slow(src: bytes) -> bytes | None:
    """PostgreSQL's base64 decoder (src/common/base64.c), None where it fails.

    The alphabet is strict and whitespace is an error; the first ``=`` must
    come third or fourth in its group of four, but once one has been seen,
    later groups (even letters) are still decoded, each yielding as many bytes
    as the padded group did.  The length must be a multiple of four.
    """
    out = bytearray()
    acc = pos = end = 0
    for c in src:
        if c == 0x3D:  # "="
            if not end:
                if pos == 2:
                    end = 1
                elif pos == 3:
                    end = 2
                else:
                    return None
            value = 0
        else:
            value = _B64_VALUES[c]
            if value == _B64_INVALID:
                return None
        acc = (acc << 6) | value
        pos += 1
        if pos == 4:
            out.append((acc >> 16) & 0xFF)
            if end != 1:
                out.append((acc >> 8) & 0xFF)
            if end == 0:
                out.append(acc & 0xFF)
            acc = pos = 0
    return bytes(out) if pos == 0 else None


def pg_b64decode(src: bytes) -> bytes | None:
    """PostgreSQL's base64 decoding, with binascii as the fast path.

    binascii's strict mode tolerates surplus padding after a complete group
    ("AAAA="), which PostgreSQL rejects, so the fast path only takes input
    whose length is a multiple of four and whose "=" are among the last two
    characters.  Such input, if binascii accepts it, is ordinary base64 that
    PostgreSQL decodes to the same bytes; everything else takes the slow,
    faithful path.
    """
    if not len(src) % 4 and b"=" not in src[:-2]:
        try:
            return binascii.a2b_base64(src, strict_mode=True)
        except binascii.Error:
            pass
    return _pg_b64decode_slow(src)


_C_SPACE: Final = b" \t\n\v\f\r"


def _strtol(text: bytes) -> int | None:
    """C ``strtol(text, &end, 10)`` where the whole text must be consumed.

    Leading whitespace and a sign are allowed; None when there are no digits
    or anything follows them.  Overlong values come back as something beyond
    the C int range without being converted in full.
    """
    text = text.lstrip(_C_SPACE)
    sign = text[:1]
    digits = text[1:] if sign in (b"+", b"-") else text
    if not digits.isdigit():  # bytes.isdigit: ASCII digits only, False when empty
        return None
    digits = digits.lstrip(b"0") or b"0"
    value = int(digits) if len(digits) <= 12 else 1 << 40
    return -value if sign == b"-" else value


def _b64encode(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False)


# --------------------------------------------------------------------------
# The exchange

_INIT: Final = 0
_NONCE_SENT: Final = 1
_PROOF_SENT: Final = 2
_FINISHED: Final = 3
_FAILED: Final = 4
_STATE_NAMES: Final = ("init", "nonce-sent", "proof-sent", "finished", "failed")

_GS2_PLUS: Final = b"p=tls-server-end-point,,"
_GS2_YES: Final = b"y,,"
_GS2_NO: Final = b"n,,"

_GARBAGE_FIRST: Final = "malformed SCRAM message (garbage at end of server-first-message)"
_GARBAGE_FINAL: Final = "malformed SCRAM message (garbage at end of server-final-message)"


def _state_error() -> RemoteProtocolError:
    return RemoteProtocolError("invalid SCRAM exchange state")


class ScramClient:
    """The client side of one SCRAM-SHA-256[-PLUS] exchange, as libpq runs it.

    *channel_binding* is the GS2 flag: ``"n"`` (no TLS, or channel binding
    disabled), ``"y"`` (TLS, but the server offered no -PLUS mechanism) or
    ``"p"`` (SCRAM-SHA-256-PLUS with tls-server-end-point; *cb_data* is the
    certificate hash).  *nonce_bytes* are 18 random bytes from the caller.
    *client_key*/*server_key* are the raw 32-byte ``scram_client_key`` and
    ``scram_server_key``; with a client key no password is needed.

    Call :meth:`initial_response`, :meth:`handle_challenge` and
    :meth:`handle_final` once each, in that order.  Malformed server messages
    raise :class:`RemoteProtocolError`; a refusal by the server (``e=``), a
    server signature that does not verify, or an iteration count above
    *max_iterations* raise :class:`AuthenticationError`.  After any error the
    exchange is dead, and every further call raises ``invalid SCRAM exchange
    state``.  Non-fatal complaints (libpq's "garbage at end" messages) are
    appended to :attr:`notes`.

    The password, its prepared form and the keys never appear in ``repr()``
    or in an exception message; the prepared password is dropped as soon as
    the keys are derived.
    """

    __slots__ = (
        "_auth_message",
        "_cache",
        "_cbind_attr",
        "_client_first_bare",
        "_client_key",
        "_client_nonce",
        "_gs2_header",
        "_max_iterations",
        "_password",
        "_server_key",
        "_state",
        "_stored_key",
        "_verify_key",
        "iterations",
        "mechanism",
        "notes",
    )

    def __init__(
        self,
        *,
        mechanism: str,
        password: str | None,
        nonce_bytes: bytes,
        channel_binding: str,
        cb_data: bytes | None = None,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
        max_iterations: int = MAX_ITERATIONS_DEFAULT,
        cache: SaltedPasswordCache | None = DEFAULT_CACHE,
    ) -> None:
        if mechanism not in (SCRAM_SHA_256, SCRAM_SHA_256_PLUS):
            raise LocalProtocolError(f'SASL mechanism "{mechanism}" is not supported')
        if channel_binding == "p":
            if mechanism != SCRAM_SHA_256_PLUS:
                raise LocalProtocolError('channel binding flag "p" needs SCRAM-SHA-256-PLUS')
            if cb_data is None:
                raise LocalProtocolError("SCRAM-SHA-256-PLUS needs channel binding data")
            self._gs2_header = _GS2_PLUS
            self._cbind_attr = b"c=" + _b64encode(_GS2_PLUS + cb_data)
        elif channel_binding in ("n", "y"):
            if mechanism != SCRAM_SHA_256:
                raise LocalProtocolError('SCRAM-SHA-256-PLUS needs channel binding flag "p"')
            if cb_data is not None:
                raise LocalProtocolError("channel binding data given without channel binding")
            self._gs2_header = _GS2_YES if channel_binding == "y" else _GS2_NO
            self._cbind_attr = b"c=eSws" if channel_binding == "y" else b"c=biws"
        else:
            raise LocalProtocolError(f'invalid channel binding flag "{channel_binding}"')
        if len(nonce_bytes) != NONCE_LENGTH:
            raise LocalProtocolError(f"the SCRAM nonce must be {NONCE_LENGTH} random bytes")
        for name, key in (("client", client_key), ("server", server_key)):
            if key is not None and len(key) != KEY_LENGTH:
                raise LocalProtocolError(f"invalid SCRAM {name} key length: {len(key)}")
        if client_key is None and password is None:
            raise LocalProtocolError("SCRAM needs a password or a client key")
        if max_iterations < 1:
            raise LocalProtocolError("max_iterations must be at least 1")

        self.mechanism = mechanism
        self.iterations: int | None = None
        self.notes: list[str] = []
        self._state = _INIT
        self._max_iterations = max_iterations
        self._cache = cache
        # libpq ignores the password when it has a client key; so do we.
        self._password = saslprep(password) if client_key is None and password is not None else b""
        self._client_key = None if client_key is None else int.from_bytes(client_key, "big")
        self._stored_key = None if client_key is None else hashlib.sha256(client_key).digest()
        self._server_key = server_key
        self._client_nonce = _b64encode(nonce_bytes)
        self._client_first_bare = b"n=,r=" + self._client_nonce
        self._auth_message = b""
        self._verify_key = b""

    def __repr__(self) -> str:
        return (
            f"<ScramClient {self.mechanism} flag={self._gs2_header[:1].decode()} "
            f"state={_STATE_NAMES[self._state]} iterations={self.iterations}>"
        )

    @property
    def finished(self) -> bool:
        """True once the server's signature has been verified."""
        return self._state == _FINISHED

    @property
    def awaiting_challenge(self) -> bool:
        """The client-first message is out; the server's challenge comes next."""
        return self._state == _NONCE_SENT

    @property
    def channel_bound(self) -> bool:
        """True once the exchange has finished with SCRAM-SHA-256-PLUS."""
        return self._state == _FINISHED and self.mechanism == SCRAM_SHA_256_PLUS

    def initial_response(self) -> bytes:
        """The client-first-message (data of SASLInitialResponse)."""
        if self._state != _INIT:
            self._fail()
            raise _state_error()
        self._state = _NONCE_SENT
        return self._gs2_header + self._client_first_bare

    def handle_challenge(self, data: bytes) -> bytes:
        """Take the server-first-message (SASLContinue); return the client-final-message."""
        data = bytes(data)
        self._check_message(data, _NONCE_SENT)
        try:
            result = self._server_first(data)
        except BaseException:
            self._fail()
            raise
        self._state = _PROOF_SENT
        return result

    def handle_final(self, data: bytes) -> None:
        """Take the server-final-message (SASLFinal) and verify the server's signature."""
        data = bytes(data)
        self._check_message(data, _PROOF_SENT)
        try:
            self._server_final(data)
        except BaseException:
            self._fail()
            raise
        self._state = _FINISHED
        self._auth_message = self._verify_key = b""

    # -- internals ---------------------------------------------------------

    def _fail(self) -> None:
        if self._state != _FINISHED:
            self._state = _FAILED
        self._password = self._auth_message = self._verify_key = b""

    def _check_message(self, data: bytes, expected: int) -> None:
        # libpq looks at the message before the state (for any state but INIT).
        state = self._state
        if state != _INIT:
            if not data:
                self._fail()
                raise RemoteProtocolError("malformed SCRAM message (empty message)")
            if b"\x00" in data:
                self._fail()
                raise RemoteProtocolError("malformed SCRAM message (length mismatch)")
        if state != expected:
            self._fail()
            raise _state_error()

    def _server_first(self, data: bytes) -> bytes:
        # r, s and i, each up to a comma, then whatever is left over.
        parts = data.split(b",", 3)
        parts += [b""] * (4 - len(parts))
        nonce = _attr_value(parts[0], b"r")
        client_nonce = self._client_nonce
        if len(nonce) < len(client_nonce) or not hmac.compare_digest(
            nonce[: len(client_nonce)], client_nonce
        ):
            raise RemoteProtocolError("invalid SCRAM response (nonce mismatch)")
        encoded_salt = _attr_value(parts[1], b"s")
        salt = pg_b64decode(encoded_salt)
        if salt is None:
            raise RemoteProtocolError("malformed SCRAM message (invalid salt)")
        encoded_iterations = _attr_value(parts[2], b"i")
        iterations = _strtol(encoded_iterations)
        if iterations is None or not 1 <= iterations <= _INT_MAX:
            raise RemoteProtocolError("malformed SCRAM message (invalid iteration count)")
        if parts[3]:
            self.notes.append(_GARBAGE_FIRST)
        self.iterations = iterations
        if iterations > self._max_iterations:
            raise AuthenticationError(
                f"server requested SCRAM iteration count {iterations}, "
                f"above the limit of {self._max_iterations}"
            )

        if self._client_key is not None:
            assert self._stored_key is not None
            client_key, stored_key = self._client_key, self._stored_key
            server_key = _ZERO_SERVER_KEY
        else:
            cache = self._cache
            if cache is None:
                keys = _derive_keys(self._password, salt, iterations)
            else:
                keys = cache.derived_keys(self._password, salt, iterations)
            self._password = b""
            client_key, stored_key, server_key = keys[1:]
        if self._server_key is not None:
            server_key = self._server_key

        without_proof = self._cbind_attr + b",r=" + nonce
        auth_message = b",".join((self._client_first_bare, data, without_proof))
        signature = int.from_bytes(_hmac_sha256(stored_key, auth_message), "big")
        proof = (client_key ^ signature).to_bytes(KEY_LENGTH, "big")
        self._auth_message = auth_message
        self._verify_key = server_key
        return without_proof + b",p=" + _b64encode(proof)

    def _server_final(self, data: bytes) -> None:
        if data[0] == 0x65:  # "e"
            error = _attr_value(data.partition(b",")[0], b"e")
            raise AuthenticationError(
                "error received from server in SCRAM exchange: " + error.decode("utf-8", "replace")
            )
        encoded, _, rest = data.partition(b",")
        encoded = _attr_value(encoded, b"v")
        if rest:
            self.notes.append(_GARBAGE_FINAL)
        signature = pg_b64decode(encoded)
        if signature is None or len(signature) != KEY_LENGTH:
            raise RemoteProtocolError("malformed SCRAM message (invalid server signature)")
        expected = _hmac_sha256(self._verify_key, self._auth_message)
        if not hmac.compare_digest(expected, signature):
            raise AuthenticationError("incorrect server signature")
