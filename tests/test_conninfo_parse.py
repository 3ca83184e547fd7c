"""Differential tests: :func:`pgproto.parse_conninfo` against libpq's ``PQconninfoParse``.

The oracle is the libpq that psycopg's binary wheel bundles, reached through
``psycopg.pq.Conninfo.parse``.  For every input both parsers must agree on:

* whether the string is accepted;
* the options it sets, compared as bytes (pgproto's values are encoded with
  ``surrogateescape``, as its contract says; libpq's options whose ``val`` is
  NULL are left out);
* the error message, compared after stripping (psycopg keeps libpq's trailing
  newline) -- except where libpq's message would quote a secret (a URI's
  password, the value of a ``password``/``sslpassword``/``oauth_client_secret``
  setting, or a URI echoed whole while it carries one).  pgproto masks those on
  purpose; there the test asserts that the secret is *not* in pgproto's message
  and that the message still names the same problem (the text around the
  masked quotation is libpq's).

Deliberate, documented differences that the tests allow:

* masking, as above.  pgproto also masks the values of ``scram_client_key`` and
  ``scram_server_key`` (they authenticate as a password does), and, in a
  keyword/value string, the word that follows an unquoted secret value
  (``password=two words``: libpq reports ``missing "=" after "words"``).
* A NUL character: libpq cannot be given one (it sees the string end there);
  pgproto rejects any string that contains one (see
  :func:`test_nul_character_is_rejected`).  Generated strings never contain NUL.

Messages libpq builds from raw bytes that are not UTF-8 (a ``%FF``-decoded
keyword, the one byte ``"%c"`` prints of a multi-byte character) reach Python
through psycopg decoded with ``errors="replace"``; pgproto's messages are
normalised the same way (encoded with ``surrogateescape``, decoded with
``replace``) before they are compared.

Environment note: libpq's keyword/value grammar uses C ``isspace()`` under the
process locale (Python sets ``LC_CTYPE`` from the environment).  pgproto uses
the six ASCII whitespace characters of the "C" locale; under a UTF-8 locale (the
test environment's ``C.UTF-8``) ``isspace()`` agrees for every byte a UTF-8
string can contain.  Under a single-byte locale such as ``en_US.ISO-8859-1``,
libpq could treat bytes 0x85/0xA0 (parts of U+0085, U+00A0 ...) as whitespace;
these tests assume a UTF-8 or "C" locale.
"""

from __future__ import annotations

import locale
import re
from dataclasses import dataclass
from typing import Final

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg.pq import Conninfo

import pgproto
from pgproto import ConninfoError, parse_conninfo

# --------------------------------------------------------------------------
# The two parsers, reduced to comparable outcomes


@dataclass(frozen=True)
class Accepted:
    options: dict[str, bytes]


@dataclass(frozen=True)
class Rejected:
    message: str


Outcome = Accepted | Rejected


def libpq_outcome(conninfo: str) -> Outcome:
    """What libpq's PQconninfoParse makes of the UTF-8 bytes of *conninfo*."""
    assert "\x00" not in conninfo, "libpq cannot be given a NUL character"
    try:
        opts = Conninfo.parse(conninfo.encode("utf-8"))
    except psycopg.OperationalError as exc:
        return Rejected(str(exc).strip())
    return Accepted({o.keyword.decode("ascii"): o.val for o in opts if o.val is not None})


_UNEXPECTED_CHARACTER: Final = re.compile(r'^unexpected character "(.)"', re.S)


def _first_byte_only(m: re.Match[str]) -> str:
    first = m.group(1).encode("utf-8")[:1].decode("utf-8", "replace")
    return f'unexpected character "{first}"'


def pgproto_outcome(conninfo: str) -> Outcome:
    """What pgproto makes of *conninfo* (any exception but ConninfoError propagates).

    One deliberate difference is normalised away (README, "Differences from
    libpq"): pgproto shows a non-ASCII "unexpected character" whole, where
    libpq's %c prints only its first byte.
    """
    try:
        result = parse_conninfo(conninfo)
    except ConninfoError as exc:
        message = str(exc).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        message = _UNEXPECTED_CHARACTER.sub(_first_byte_only, message)
        return Rejected(message.strip())
    assert type(result) is dict
    for key, value in result.items():
        assert isinstance(key, str), key
        assert isinstance(value, str), (key, value)
    return Accepted({k: v.encode("utf-8", "surrogateescape") for k, v in result.items()})


# The parse-time part of libpq's error catalogue (fe-connect.c, libpq 18):
# every message PQconninfoParse can produce, bar "out of memory" and the
# unreachable "invalid URI propagated to internal parser routine".  The key is
# the text that precedes the first quoted echo: it names the problem.
CATALOGUE: Final[dict[str, re.Pattern[str]]] = {
    'missing "=" after ': re.compile(r'missing "=" after ".*" in connection info string', re.S),
    "unterminated quoted string": re.compile(
        r"unterminated quoted string in connection info string"
    ),
    "invalid connection option ": re.compile(r'invalid connection option ".*"', re.S),
    "end of string reached": re.compile(
        r'end of string reached when looking for matching "\]" in IPv6 host address'
        r' in URI: ".*"',
        re.S,
    ),
    "IPv6 host address may not be empty": re.compile(
        r'IPv6 host address may not be empty in URI: ".*"', re.S
    ),
    "unexpected character ": re.compile(
        r'unexpected character ".*" at position \d+ in URI \(expected ":" or "/"\): ".*"', re.S
    ),
    'extra key/value separator "="': re.compile(
        r'extra key/value separator "=" in URI query parameter: ".*"', re.S
    ),
    'missing key/value separator "="': re.compile(
        r'missing key/value separator "=" in URI query parameter: ".*"', re.S
    ),
    "invalid URI query parameter: ": re.compile(r'invalid URI query parameter: ".*"', re.S),
    "invalid percent-encoded token: ": re.compile(r'invalid percent-encoded token: ".*"', re.S),
    "forbidden value %00": re.compile(r'forbidden value %00 in percent-encoded value: ".*"', re.S),
    "unexpected spaces found in ": re.compile(
        r'unexpected spaces found in ".*", use percent-encoded spaces \(%20\) instead', re.S
    ),
}


def problem_kind(message: str) -> str | None:
    """The catalogue entry *message* belongs to, judged by its leading words."""
    for kind in CATALOGUE:
        if message.startswith(kind):
            return kind
    return None


_POSITION: Final = re.compile(r" at position (\d+) ")


def describe(conninfo: str, expected: Outcome, actual: Outcome) -> str:
    return f"\ninput:   {conninfo!r}\nlibpq:   {expected!r}\npgproto: {actual!r}"


def assert_masked(message: str, libpq_message: str, secret: str) -> None:
    """pgproto's *message* hides *secret* but otherwise says what libpq says.

    The quotation in libpq's message that contains the secret is the only part
    pgproto may replace: the text before it must start pgproto's message and the
    text after it must appear in pgproto's message.
    """
    assert secret not in message, f"secret {secret!r} echoed: {message!r}"
    at = libpq_message.index(secret)
    open_quote = libpq_message.rindex('"', 0, at)
    close_quote = libpq_message.index('"', at + len(secret))
    before = libpq_message[:open_quote]
    after = libpq_message[close_quote + 1 :]
    assert message.startswith(before), (message, libpq_message)
    assert after in message[len(before) :], (message, libpq_message)


def assert_same(conninfo: str, *, secret: str | None = None, may_mask: str | None = None) -> None:
    """Differential check of one input.

    *secret*: text libpq echoes in its message that pgproto must not.
    *may_mask*: text pgproto may mask or echo (either is accepted).
    """
    expected = libpq_outcome(conninfo)
    actual = pgproto_outcome(conninfo)
    detail = describe(conninfo, expected, actual)
    if isinstance(expected, Accepted):
        assert isinstance(actual, Accepted), "pgproto rejects what libpq accepts" + detail
        assert actual.options == expected.options, "values differ" + detail
        return
    assert isinstance(actual, Rejected), "pgproto accepts what libpq rejects" + detail
    if secret is not None and secret in expected.message:
        assert_masked(actual.message, expected.message, secret)
        return
    if may_mask is not None and may_mask in expected.message and actual.message != expected.message:
        assert_masked(actual.message, expected.message, may_mask)
        return
    assert actual.message == expected.message, "messages differ" + detail


# --------------------------------------------------------------------------
# The hand-written table


@dataclass(frozen=True)
class Case:
    conninfo: str
    accepted: bool  # what libpq does; checked, so the table documents libpq
    secret: str | None = None
    may_mask: str | None = None


def ok(conninfo: str) -> Case:
    return Case(conninfo, True)


def err(conninfo: str, *, secret: str | None = None, may_mask: str | None = None) -> Case:
    return Case(conninfo, False, secret, may_mask)


S: Final = "s3cr3t"  # a password distinctive enough to search messages for

KEYWORD_VALUE_CASES: Final[list[Case]] = [
    # empty and blank strings
    ok(""),
    ok(" "),
    ok(" \t\n\x0b\x0c\r"),
    # plain settings
    ok("host=localhost"),
    ok("host=localhost port=5432 dbname=mydb user=me connect_timeout=10"),
    ok("host=a,b,c port=1,2,3 target_session_attrs=read-write"),
    ok("hostaddr=127.0.0.1 host=db.example.com"),
    ok("service=foo"),
    ok("options='-c geqo=off -c statement_timeout=5min'"),
    # whitespace: all six C isspace() characters, around and between settings
    ok(" \t\n\x0b\x0c\rhost=a\t\n\x0b\x0c\rport=1\r\n"),
    ok("host\t=\ta"),
    ok("host\n=\na"),
    ok("host = a"),
    ok("host=a\x0bport=1"),
    ok("host=a\x0cport=1"),
    ok("host=a\rport=1"),
    ok("host=a\u00a0b"),  # NO-BREAK SPACE is not whitespace to libpq (UTF-8 locale)
    ok("host=a\u2003b"),  # nor is EM SPACE
    ok("host=a\u0085b"),  # nor NEL
    err("host = h1 , port=1"),
    # empty values
    ok("host="),
    ok("host=''"),
    ok("host= "),
    ok("host=\t"),
    ok("host= port=5"),  # the value is "port=5": blanks after "=" are skipped
    ok("host='' port=''"),
    # quoting
    ok("host='a b'"),
    ok("host='a b' port=5"),
    ok("host='a'port=5"),  # a quoted value may be followed directly by a keyword
    ok("host='a'port='5'dbname=x"),
    ok("host= 'a b'"),
    ok("host=\t'a b'"),
    ok("host='it\\'s'"),
    ok("host='a\\\\b'"),
    ok("host='\\a\\b'"),
    ok("host='a\nb'"),
    ok("host='='"),
    ok("host=a'b'"),  # a quote inside an unquoted value is an ordinary character
    ok("host=a'"),
    ok("password='s e c r e t'"),
    ok("dbname='host=a port=1'"),
    err("host=''''"),
    err("host='a''b'"),
    err("host='a'\\"),
    err("'host'=a"),
    # backslash escapes
    ok("host=a\\ b"),
    ok("host=a\\'b"),
    ok("host=\\'a"),
    ok("host=a\\\\"),
    ok("host=a\\\tb"),
    ok("host=\\"),  # a backslash at the end of the string is dropped
    ok("host=a\\"),
    ok("host=a\\b"),
    # unterminated quoted strings
    err("host='abc"),
    err("host='"),
    err("host='a\\"),
    err("host='\\'"),
    err("host='a\\'"),
    err("host= 'abc"),
    err("host = 'abc"),
    err("host=\t'abc"),
    err("host= 'a\\"),
    err("port=1 host= '"),
    err("sslpassword='x"),
    # missing "="
    err("host"),
    err("host=a port"),
    err("host=a port "),
    err("host port=1"),
    err("host=a b"),
    err("postgresql"),
    err("postgresql:"),
    err("a b=c"),
    # empty and unknown keywords
    err("=x"),
    err(" = x"),
    err("="),
    err("foo=bar"),
    err("Host=a"),
    err("host=a foo=b"),
    err("foo=bar host="),
    err("foo=bar host"),
    err("ssl=true"),  # the ssl alias exists only in URIs
    err("hostx=a"),
    err("é=1"),
    # duplicate keys: last wins
    ok("host=a host=b"),
    ok("host=a\thost=b port=1 host=c"),
    ok("host=a host="),
    # requiressl
    ok("requiressl=1"),
    ok("requiressl=0"),
    ok("requiressl=10"),
    ok("requiressl=yes"),
    ok("requiressl="),
    ok("requiressl='1x'"),
    ok("sslmode=disable requiressl=1"),
    ok("requiressl=1 sslmode=disable"),
    # values are never validated
    ok("sslmode=bogus port=notanumber connect_timeout=-5 keepalives=x"),
    ok("dbname=postgresql://h"),  # PQconninfoParse does not expand dbname
    # passwords
    ok(f"password={S}"),
    ok(f"password={S} host=h"),
    ok(f"sslpassword='{S} x' oauth_client_secret={S}"),
    err(f"password={S} words", may_mask="words"),
    err(f"password={S} words=1", may_mask="words"),
    err(f"password='{S}"),
    # non-ASCII
    ok("host=é application_name=日本語"),
    ok("application_name='😀 x'"),
    ok("application_name=\u00e9\\ \u00e9"),
]

URI_CASES: Final[list[Case]] = [
    # the prefix: exact, case-sensitive, at offset 0
    ok("postgresql://"),
    ok("postgres://"),
    ok("postgresql://localhost"),
    ok("postgres://localhost"),
    err("PostgreSQL://h"),
    err("POSTGRES://h"),
    err(" postgresql://h"),
    err("\tpostgres://h"),
    err("postgre://h"),
    err("postgresql:/h"),
    err("postgresql:h"),
    err("xpostgresql://h"),
    err("postgresql//h"),
    # authority
    ok("postgresql://localhost:5433"),
    ok("postgresql://localhost/mydb"),
    ok("postgresql://h:"),
    ok("postgresql://h:/db"),
    ok("postgresql://h:5432:1"),
    ok("postgresql://h:port"),
    ok("postgresql://:1"),
    ok("postgresql:///db"),
    ok("postgresql:///db?host=/tmp"),
    ok("postgresql://%2Fvar%2Frun%2Fpostgresql/db"),
    ok("postgresql://h#frag"),
    ok("postgresql://h[::1]"),
    # user and password
    ok("postgresql://user@localhost"),
    ok(f"postgresql://user:{S}@localhost"),
    ok(f"postgresql://user:{S}:more@localhost"),
    ok(f"postgresql://:{S}@h"),
    ok("postgresql://user:@h"),
    ok("postgresql://@h"),
    ok("postgresql://:@h"),
    ok(f"postgresql://u:{S}@"),
    ok("postgresql://u@h@g"),
    ok("postgresql://u%40x:p%3Aq@h"),
    ok("postgresql://h/db@x"),  # the "@" look-ahead stops at "/"
    ok("postgresql://h?x=a@b"),  # ... but not at "?": user is "h?x=a"
    ok("postgresql://h?host=a@b"),
    ok("postgresql://[::1]@h"),
    ok("postgresql://h,i@j"),
    # several hosts
    ok("postgresql://host1:123,host2:456/somedb?target_session_attrs=any&application_name=x"),
    ok("postgresql://a,b"),
    ok("postgresql://a:1,b"),
    ok("postgresql://a,b:2"),
    ok("postgresql://,,"),
    ok("postgresql://a,,b:2"),
    ok("postgresql://:1,:2"),
    ok("postgresql://h:,b:2"),
    ok("postgresql://,"),
    ok("postgresql://host%2Cother"),
    ok("postgresql://h/,x"),
    # IPv6
    ok("postgresql://[::1]"),
    ok("postgresql://[::1]:5432/db"),
    ok("postgresql://[fe80::1%25eth0]"),
    ok("postgresql://[::1],[::2]:3"),
    ok("postgresql://[::1],h"),
    ok("postgresql://[::1]?host=x"),
    ok("postgresql://[::1]/"),
    err("postgresql://[a b]"),  # the space rule applies to bracketed hosts too
    ok("postgresql://[::1]:"),
    err("postgresql://["),
    err("postgresql://[::1"),
    err("postgresql://h,[::1"),
    err("postgresql://[::1:5432/db"),
    err(f"postgresql://u:{S}@[::1", secret=S),
    err(f"postgresql://[::1?password={S}", secret=S),
    err("postgresql://[]"),
    err("postgresql://[]:5"),
    err("postgresql://h,[]"),
    err(f"postgresql://u:{S}@[]", secret=S),
    err("postgresql://[::1]x"),
    err("postgres://[::1]x"),
    err("postgresql://h,[::1]x"),
    err("postgresql://u@[::1]x"),
    err(f"postgresql://u:{S}@[::1]x", secret=S),
    err(f"postgresql://u:{S}@h,[::1]]/db", secret=S),
    err("postgresql://[::1]]"),
    err("postgresql://[[::1]]"),
    err("postgresql://[::1]%"),
    err("postgresql://[::1] "),
    ok("postgresql://[::1]@"),  # user "[", password ":1]"
    err("postgresql://é[::1],[::1]é"),
    err("postgresql://[::1]é"),  # "%c" prints the first byte of "é" only
    # dbname
    ok("postgresql://h/"),
    ok("postgresql://h/db"),
    ok("postgresql://h/db/with/slashes"),
    ok("postgresql://h/db%2Fx"),
    ok("postgresql://h/%2F"),
    ok("postgresql://h//"),
    ok("postgresql://h/db?"),
    ok("postgresql://h/?dbname=x"),
    ok("postgresql://h/a:b,c"),
    ok("postgresql://h/é"),
    ok("postgresql://h/%C3%A9"),
    # query parameters
    ok("postgresql://h?"),
    ok("postgresql://h?port=1&"),
    ok("postgresql://h?port=1&port="),
    ok("postgresql://h?host=a&host=b"),
    ok("postgresql://h?host="),
    ok("postgresql://h?host=%2C"),
    ok("postgresql://h?host=["),
    ok("postgresql://h?dbname=host%3Dx"),
    ok("postgresql://h?dbname=postgresql://x"),
    ok("postgresql://h?options=-c%20geqo%3Doff"),
    ok("postgresql://h?application_name=a+b"),  # "+" is not a space
    ok("postgresql://h?application_name=a/b?c"),
    ok("postgresql://h?ho%73t=x"),  # keywords are decoded too
    ok(f"postgresql://h?pass%77ord={S}"),
    ok("postgresql://h?sslmode=bogus"),
    err("postgresql://h?&"),
    err("postgresql://h?&port=1"),
    err("postgresql://h?port=1&&port=2"),
    err("postgresql://h?port"),
    err("postgresql://h?port=1&x"),
    err("postgresql://a/b/c?x"),
    err("postgresql://h?port=1=2"),
    err("postgresql://h?port=="),
    err("postgresql://h?port=1&b=2=3"),
    err(f"postgresql://h?password={S}=x"),
    err("postgresql://h?=1"),
    err("postgresql://h? =1"),
    err("postgresql://h?foo=1"),
    err("postgresql://h?Host=1"),
    err(f"postgresql://u:{S}@h?foo=1", secret=S),
    err(f"postgresql://h?password={S}&foo=1", secret=S),
    err("postgresql://h?%FF=1"),  # the decoded keyword is not UTF-8
    # query parameters override the authority
    ok("postgresql://u@h:1/db?user=v&port=2&dbname=e&host=i"),
    ok(f"postgresql://u:{S}@h?password="),
    # ssl and requiressl
    ok("postgresql://h?ssl=true"),
    ok("postgresql://h?sslmode=disable&ssl=true"),
    ok("postgresql://h?ssl=true&sslmode=disable"),
    ok("postgresql://h?ss%6C=tru%65"),
    ok("postgresql://h?ssl= true "),
    err("postgresql://h?ssl=%20true%20"),  # encoded spaces are kept
    ok("postgresql://h?requiressl=1"),
    ok("postgresql://h?requiressl=0"),
    ok("postgresql://h?requiressl="),
    ok("postgresql://h?requiress%6C=1"),
    err("postgresql://h?ssl=false"),
    err("postgresql://h?ssl=1"),
    err("postgresql://h?ssl=TRUE"),
    err("postgresql://h?ssl="),
    # percent-decoding
    ok("postgresql://%FF"),
    ok("postgresql://h/%C3"),
    ok("postgresql://h?application_name=%FF%FE"),
    ok("postgresql://%41%62%2c%2C"),
    ok("postgresql://%25"),
    err("postgresql://h%"),
    err("postgresql://h%1"),
    err("postgresql://h%zz"),
    err("postgresql://h%g0"),
    err("postgresql://h%00"),
    err("postgresql://h:%"),
    err("postgresql://h/db%"),
    err("postgresql://h/%0"),
    err("postgresql://u%zz@h"),
    err("postgresql://u%00@h"),
    err("postgresql://h?%zz=1"),
    err("postgresql://h?%00=1"),
    err("postgresql://h?port=%0"),
    err("postgresql://h?port=%00"),
    err("postgresql://h?foo=%zz"),  # the value is decoded before the keyword is checked
    err("postgresql://a%,b%zz"),
    # percent-decoding errors that would quote a secret
    err(f"postgresql://u:{S}%zz@h", secret=S),
    err(f"postgresql://u:{S}%@h", secret=S),
    err(f"postgresql://u:{S}%00@h", secret=S),
    err(f"postgresql://h?password={S}%zz", secret=S),
    err(f"postgresql://h?sslpassword={S}%00", secret=S),
    err(f"postgresql://h?oauth_client_secret={S}%4", secret=S),
    err(f"postgresql://h?pass%77ord={S}%zz", secret=S),
    err(f"postgresql://h?scram_client_key={S}%zz", may_mask=S),
    # PostgreSQL 18: leading/trailing raw spaces are trimmed, inner ones rejected
    ok("postgresql:// h "),
    ok("postgresql://h /db"),
    ok("postgresql:// @h"),
    ok("postgresql:// u : p @h"),
    ok("postgresql://h/ "),
    ok("postgresql://h/ db "),
    ok("postgresql://h? host = a "),
    ok("postgresql://h?host=%20a%20"),
    ok("postgresql://%20h%20"),
    ok("postgresql://h?application_name=a%20b"),
    ok("postgresql://h?application_name=a\tb"),  # only " " counts
    ok("postgresql://h?application_name=\t"),
    ok("postgresql://  :  ,  "),
    err("postgresql://a b"),
    err("postgresql://a ,b"),
    err("postgresql://a, b"),
    err("postgresql://h/my db"),
    err("postgresql://h?host=a b"),
    err("postgresql://h?a b=1"),
    err("postgresql://u x@h"),
    err("postgresql://a b%zz"),
    err("postgresql://a%zz b"),
    err(f"postgresql://u:{S} x@h", secret=S),
    err(f"postgresql://u: {S} x@h", secret=S),
    err(f"postgresql://h?password={S} x", secret=S),
    err(f"postgresql://h?sslpassword=a {S}", secret=S),
    err(f"postgresql://h?oauth_client_secret={S} %zz", secret=S),
    # realistic
    ok(
        "postgres://user:pass@host:5432/db?sslmode=verify-full&sslrootcert=/path/ca.pem"
        "&application_name=app&connect_timeout=10"
    ),
    ok("postgresql://other@localhost/otherdb?connect_timeout=10&application_name=myapp"),
]

CASES: Final = KEYWORD_VALUE_CASES + URI_CASES


def _case_id(case: Case) -> str:
    return repr(case.conninfo)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_table(case: Case) -> None:
    expected = libpq_outcome(case.conninfo)
    assert isinstance(expected, Accepted) == case.accepted, (
        f"the table is wrong about libpq: {expected!r}"
    )
    assert_same(case.conninfo, secret=case.secret, may_mask=case.may_mask)


def test_table_has_no_duplicates() -> None:
    seen = [case.conninfo for case in CASES]
    assert len(seen) == len(set(seen))
    assert len(CASES) >= 120


def test_table_covers_the_error_catalogue() -> None:
    """Every parse-time message libpq has is produced by some case of the table."""
    hit = dict.fromkeys(CATALOGUE, False)
    for case in CASES:
        outcome = libpq_outcome(case.conninfo)
        if isinstance(outcome, Rejected):
            kind = problem_kind(outcome.message)
            assert kind is not None, f"message not in the catalogue: {outcome.message!r}"
            assert CATALOGUE[kind].fullmatch(outcome.message), outcome.message
            hit[kind] = True
    assert all(hit.values()), [kind for kind, seen in hit.items() if not seen]


# Every option keyword, in both syntaxes.
LIBPQ_KEYWORDS: Final[list[str]] = [o.keyword.decode("ascii") for o in Conninfo.get_defaults()]


@pytest.mark.parametrize("keyword", LIBPQ_KEYWORDS)
def test_every_keyword(keyword: str) -> None:
    assert_same(f"{keyword}=v")
    assert_same(f"{keyword}='a b' {keyword}=c")
    assert_same(f"postgresql://h?{keyword}=v%20w")
    assert_same(f"{keyword.upper()}=v")
    assert_same(f"postgresql://h?{keyword}x=v")


def test_error_types() -> None:
    with pytest.raises(ConninfoError) as info:
        parse_conninfo("foo=bar")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, pgproto.Error)
    assert str(info.value) == 'invalid connection option "foo"'


def test_nul_character_is_rejected() -> None:
    """libpq would stop at a NUL; pgproto refuses the string instead."""
    for conninfo in ("host=a\x00", "\x00", "host=a\x00port=1", "postgresql://h\x00/db"):
        with pytest.raises(ConninfoError):
            parse_conninfo(conninfo)


def test_result_is_a_fresh_dict() -> None:
    first = parse_conninfo("host=a")
    first["host"] = "changed"
    assert parse_conninfo("host=a") == {"host": "a"}


def test_undecodable_bytes_round_trip() -> None:
    result = parse_conninfo("postgresql://%FF%C3/%C3%A9%E2%82")
    assert result["host"].encode("utf-8", "surrogateescape") == b"\xff\xc3"
    assert result["dbname"].encode("utf-8", "surrogateescape") == b"\xc3\xa9\xe2\x82"
    assert result["dbname"].startswith("é")


# --------------------------------------------------------------------------
# Property tests


SECRET_KEYWORDS: Final = ("password", "oauth_client_secret", "scram_client_key", "scram_server_key")
_PCT: Final = re.compile(rb"%([0-9A-Fa-f]{2})")


def _lenient_decode(text: str) -> str:
    raw = _PCT.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))
    return raw.decode("utf-8", "replace")


def may_echo_secret(conninfo: str) -> bool:
    """Whether libpq's message for *conninfo* might quote a secret.

    Over-approximates: any mention of a secret keyword (also percent-encoded),
    or a URI with a ":" in its user information.
    """
    decoded = _lenient_decode(conninfo)
    if any(k in decoded for k in SECRET_KEYWORDS):
        return True
    for prefix in ("postgresql://", "postgres://"):
        if conninfo.startswith(prefix):
            rest = conninfo[len(prefix) :]
            cut = min((i for i in (rest.find("@"), rest.find("/")) if i >= 0), default=-1)
            return cut >= 0 and rest[cut] == "@" and ":" in rest[:cut]
    return False


def assert_same_property(conninfo: str) -> None:
    """Differential check of a generated input: exact unless a secret may be quoted."""
    expected = libpq_outcome(conninfo)
    actual = pgproto_outcome(conninfo)
    detail = describe(conninfo, expected, actual)
    if isinstance(expected, Accepted):
        assert isinstance(actual, Accepted), "pgproto rejects what libpq accepts" + detail
        assert actual.options == expected.options, "values differ" + detail
        return
    assert isinstance(actual, Rejected), "pgproto accepts what libpq rejects" + detail
    if actual.message == expected.message:
        return
    assert may_echo_secret(conninfo), "messages differ" + detail
    kind = problem_kind(expected.message)
    assert kind is not None, detail
    assert problem_kind(actual.message) == kind, "the problem is named differently" + detail
    assert _POSITION.findall(actual.message) == _POSITION.findall(expected.message), detail


WS: Final = " \t\n\r\x0b\x0c"
COMMON_KEYWORDS: Final = ["host", "port", "dbname", "user", "password", "sslmode", "options"]
ODD_KEYWORDS: Final = ["requiressl", "foo", "Host", "ssl", "", "hostx", "'host'", "h\\ost", "é"]
# Unicode characters other than NUL and lone surrogates (libpq gets UTF-8).
ANY_CHAR: Final = st.characters(codec="utf-8", exclude_characters="\x00")


def _weighted(*groups: tuple[int, list[str]]) -> st.SearchStrategy[str]:
    pool: list[str] = []
    for weight, items in groups:
        pool.extend(items * weight)
    return st.sampled_from(pool)


def _joined(tokens: st.SearchStrategy[str], max_size: int = 6) -> st.SearchStrategy[str]:
    return st.lists(tokens, max_size=max_size).map("".join)


# keyword/value grammar

KV_PLAIN: Final = [*"ab1/.:,-_", "x", "é", "日", "😀", "%", "@", "?", "&", "#"]
KV_RISKY: Final = ["\\", "\\'", "\\\\", "\\ ", "'", "=", " ", "\t", "\n", "\x0b", "\x0c", "\r"]
# st.one_of picks its branches with equal probability: repeat one to weight it.
_kv_common_token: Final = _weighted((8, KV_PLAIN), (1, KV_RISKY))
kv_token: Final = st.one_of(_kv_common_token, _kv_common_token, _kv_common_token, ANY_CHAR)
_kv_known_keyword: Final = _weighted((20, COMMON_KEYWORDS), (2, LIBPQ_KEYWORDS), (1, ODD_KEYWORDS))
kv_keyword: Final = st.one_of(
    *[_kv_known_keyword] * 19,
    st.lists(st.one_of(st.sampled_from(list("hostab=' \\")), ANY_CHAR), min_size=1, max_size=4).map(
        "".join
    ),
)
kv_ws: Final = st.text(alphabet=WS, max_size=2)


@st.composite
def kv_value(draw: st.DrawFn) -> str:
    form = draw(st.sampled_from([*["plain"] * 4, *["quoted"] * 4, "empty", "raw"]))
    body = draw(_joined(kv_token))
    if form == "plain":
        # One unquoted token: whitespace escaped (or dropped), no leading quote.
        escape = draw(st.booleans())
        body = "".join(("\\" + c if escape else "") if c in WS else c for c in body)
        return body.lstrip("'")
    if form == "quoted":
        inner = body.replace("'", "\\'") if draw(st.booleans()) else body
        close = "'" if draw(st.integers(0, 9)) else ""
        return f"'{inner}{close}"
    if form == "empty":
        # A bare empty value swallows the next setting (blanks after "=" are
        # skipped), so mostly use the quoted form.
        return "" if draw(st.integers(0, 3)) == 0 else "''"
    return body


@st.composite
def kv_setting(draw: st.DrawFn) -> str:
    keyword = draw(kv_keyword)
    eq = "=" if draw(st.integers(0, 19)) else draw(st.sampled_from(["", "==", " "]))
    return f"{keyword}{draw(kv_ws)}{eq}{draw(kv_ws)}{draw(kv_value())}"


@st.composite
def kv_strings(draw: st.DrawFn) -> str:
    settings_ = draw(st.lists(kv_setting(), max_size=4))
    out = draw(kv_ws)
    for i, setting in enumerate(settings_):
        if i:
            gap = draw(st.text(alphabet=WS, min_size=1, max_size=2))
            out += gap if draw(st.integers(0, 5)) else ""
        out += setting
    return out + draw(kv_ws)


# URI grammar

URI_PLAIN: Final = [*"abhz019.-_~", "%41", "%2C", "%2c", "%2F", "%20", "%25", "%C3%A9"]
URI_ODD: Final = ["%FF", "%C3", "%00", "%", "%1", "%zz", "%G0", "%4", " ", "  ", "\t", "+"]
URI_DELIMS: Final = ["@", ":", "/", "?", "[", "]", ",", "&", "=", "#", "é", "'", "\\", '"']
_uri_common_token: Final = _weighted((30, URI_PLAIN), (2, URI_ODD), (1, URI_DELIMS))
uri_token: Final = st.one_of(_uri_common_token, _uri_common_token, _uri_common_token, ANY_CHAR)
uri_piece: Final = _joined(uri_token, 5)
uri_scheme: Final = _weighted(
    (24, ["postgresql://"]),
    (12, ["postgres://"]),
    (1, ["PostgreSQL://", "postgresql:/", " postgresql://", "postgres:", "postgre://", ""]),
)


@st.composite
def uri_host(draw: st.DrawFn) -> str:
    form = draw(st.sampled_from(["name", "name", "name", "ipv6", "empty", "bracket"]))
    if form == "name":
        host = draw(uri_piece)
    elif form == "ipv6":
        inside = draw(_joined(_weighted((5, list("0123456789abcdef:")), (1, ["%25", " ", "e"]))))
        host = f"[{inside}]"
    elif form == "empty":
        host = ""
    else:
        host = "[" + draw(uri_piece) + draw(st.sampled_from(["", "]", "]x", "]]"]))
    if draw(st.integers(0, 2)) == 0:
        host += ":" + draw(_joined(_weighted((8, list("0123456789")), (1, URI_ODD)), 5))
    return host


@st.composite
def uri_param(draw: st.DrawFn) -> str:
    keyword = draw(
        st.one_of(
            _weighted(
                (4, ["host", "port", "dbname", "user", "sslmode", "application_name"]),
                (1, LIBPQ_KEYWORDS),
                (2, ["ssl", "requiressl", "foo", "", "ho%73t", "ss%6C", "%FF"]),
            ),
            uri_piece,
        )
    )
    value = draw(st.one_of(_weighted((1, ["true", "1", "0", "false", "tru%65"])), uri_piece))
    form = draw(st.integers(0, 19))
    if form == 0:
        return keyword
    if form == 1:
        return f"{keyword}={value}={value}"
    return f"{keyword}={value}"


@st.composite
def uri_strings(draw: st.DrawFn) -> str:
    out = draw(uri_scheme)
    if draw(st.integers(0, 3)) == 0:
        out += draw(uri_piece)
        if draw(st.booleans()):
            out += ":" + draw(uri_piece)
        out += "@"
    out += ",".join(draw(st.lists(uri_host(), max_size=3)))
    if draw(st.booleans()):
        out += "/" + draw(uri_piece)
    if draw(st.booleans()):
        params = draw(st.lists(uri_param(), max_size=3))
        lead = "&" if draw(st.integers(0, 9)) == 0 else ""
        trail = "&" if draw(st.integers(0, 5)) == 0 else ""
        out += "?" + lead + "&".join(params) + trail
    return out


# raw text and mutations

RAW_ALPHABET: Final = st.one_of(
    st.sampled_from([*"=' \\\t\n\x0b\x0c\r@:/?[],&%+#hostpr1aFfz0", "é"]),
    ANY_CHAR,
)
raw_text: Final = st.text(alphabet=RAW_ALPHABET, max_size=30)

KV_SEEDS: Final = [case.conninfo for case in KEYWORD_VALUE_CASES if case.accepted]
URI_SEEDS: Final = [case.conninfo for case in URI_CASES if case.accepted]


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[str]) -> str:
    """A string from *base* with one to three random edits.

    Edits mostly spare a URI's scheme (Hypothesis favours position 0, and a
    broken scheme only makes another keyword/value string).
    """
    text = draw(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate", "truncate"]))
        lo = 0
        if text.startswith(("postgresql://", "postgres://")) and draw(st.integers(0, 9)):
            lo = text.index("//") + 2
        i = draw(st.integers(lo, len(text)))
        char = draw(RAW_ALPHABET)
        if op == "insert":
            text = text[:i] + char + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + 1 :]
        elif op == "replace":
            text = text[:i] + char + text[i + 1 :]
        elif op == "duplicate":
            j = draw(st.integers(i, len(text)))
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text[:i]
    return text


PROPERTY_SETTINGS: Final = settings(
    max_examples=2500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@PROPERTY_SETTINGS
@given(
    st.one_of(
        kv_strings(),
        kv_strings(),
        mutated(kv_strings()),
        mutated(st.sampled_from(KV_SEEDS)),
        raw_text,
    )
)
@example("host= 'abc")
@example(f"password={S} words")
def test_property_keyword_value(conninfo: str) -> None:
    assert_same_property(conninfo)


@PROPERTY_SETTINGS
@given(
    st.one_of(
        uri_strings(),
        uri_strings(),
        mutated(uri_strings()),
        mutated(st.sampled_from(URI_SEEDS)),
        st.tuples(uri_scheme, raw_text).map("".join),
    )
)
@example("postgresql://[::1]é")
@example("postgresql://h?x=a@b")
def test_property_uri(conninfo: str) -> None:
    assert_same_property(conninfo)


# Secrets: URIs whose password (in the user information or in a secret query
# parameter) carries a marker; whatever pgproto says about them must not quote
# it.  The other components are kept free of "/", "@", "?", "&" and "=", so
# that the component holding the marker is unambiguously the password.

MARK: Final = "Zq9xW"
_SECRETISH: Final = st.characters(codec="utf-8", exclude_characters="\x00/@?&=#")
_secret_token: Final = st.one_of(
    _weighted((6, list("abc1:,[]%")), (2, ["%zz", "%00", "%4", " ", "%20", "%2F", "%FF"])),
    _SECRETISH,
)
secret_piece: Final = _joined(_secret_token, 4)
_structure_token: Final = _weighted((30, URI_PLAIN), (3, URI_ODD), (1, [":", ",", "]"]))
structure_piece: Final = _joined(_structure_token, 4)


@st.composite
def uris_with_secret(draw: st.DrawFn) -> str:
    secret = draw(secret_piece) + MARK + draw(secret_piece)
    out = draw(st.sampled_from(["postgresql://", "postgres://"]))
    in_userinfo = draw(st.booleans())
    if in_userinfo:
        out += draw(secret_piece).replace(":", "") + ":" + secret + "@"
    forms = ["[::1]", "[]", "[::1]x", "", "h", "[::1]:5"]
    if in_userinfo:
        # An unclosed "[" would swallow a query into the host: only with the
        # password in the user information is the password still one.
        forms += ["[", "[::1"]
    hosts = st.one_of(structure_piece, structure_piece, st.sampled_from(forms))
    out += ",".join(draw(st.lists(hosts, max_size=3)))
    if draw(st.booleans()):
        out += "/" + draw(structure_piece)
    params = draw(
        st.lists(
            st.tuples(st.sampled_from(["host", "port", "dbname", "host", "foo"]), structure_piece),
            max_size=2,
        )
    )
    pairs = [f"{k}={v}" for k, v in params]
    if not in_userinfo:
        keyword = draw(
            st.sampled_from(
                ["password", "sslpassword", "oauth_client_secret", "pass%77ord", "%70assword"]
            )
        )
        pairs.insert(draw(st.integers(0, len(pairs))), f"{keyword}={secret}")
    if pairs:
        out += "?" + "&".join(pairs)
    return out


@settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(uris_with_secret())
def test_property_uri_secrets_are_not_echoed(conninfo: str) -> None:
    assert_same_property(conninfo)
    actual = pgproto_outcome(conninfo)
    if isinstance(actual, Rejected):
        assert MARK not in actual.message, f"secret echoed: {conninfo!r} -> {actual.message!r}"


def test_locale_is_one_the_tests_assume() -> None:
    """See the module docstring: libpq's isspace() follows LC_CTYPE."""
    ctype = locale.setlocale(locale.LC_CTYPE)
    codeset = (ctype.rsplit(".", 1)[-1] if "." in ctype else "").lower().replace("-", "")
    assert ctype in ("C", "POSIX") or codeset in ("utf8",), ctype


@pytest.mark.parametrize(
    "conninfo", ["host=\ud800", "postgresql://\ud800%41", "postgresql://[::1]\ud800"]
)
def test_unencodable_characters_are_rejected(conninfo: str) -> None:
    with pytest.raises(ConninfoError, match="cannot be encoded at position"):
        parse_conninfo(conninfo)


def test_non_ascii_unexpected_character_is_shown_whole() -> None:
    with pytest.raises(ConninfoError) as info:
        parse_conninfo("postgresql://[::1]é")
    assert str(info.value).startswith('unexpected character "é" at position 19 in URI')
