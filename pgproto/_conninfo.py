"""Connection strings: keyword/value strings and URIs, parsed as libpq parses them.

This is the equivalent of ``PQconninfoParse``: it reports what a string sets
and nothing else -- no defaults, no validation of values.  The grammar and the
order in which faults are detected follow libpq 18 (``conninfo_parse``,
``conninfo_uri_parse_options``, ``conninfo_uri_parse_params``,
``conninfo_uri_decode``, ``conninfo_storeval`` in fe-connect.c), so that the same
strings are accepted, with the same values, and the same strings are rejected,
with the gist of the same message.

libpq works on bytes.  A Python string is treated as its UTF-8 encoding; the
delimiters of both grammars are ASCII, so walking the characters of the string
is the same as walking the bytes.  Percent-decoding can produce bytes that are
not UTF-8: those come back decoded with ``surrogateescape``, so encoding the
value the same way gives libpq's bytes exactly.

Deliberate differences from libpq, all about not echoing secrets:

* an error about a URI's password, or about the value of a secret query
  parameter, says which component is at fault but does not quote it;
* a URI quoted back in an error message has its password masked;
* in a keyword/value string, text that follows an unquoted secret value (the
  typical ``password=two words`` mistake) is not quoted back.
"""

from __future__ import annotations

import re
from typing import Final, NoReturn

from ._errors import ConninfoError
from ._options import OPTION_BY_KEYWORD, SECRET_KEYWORDS

__all__ = ["is_conninfo_string", "parse_conninfo", "uri_prefix_length"]

_MASK: Final = "********"

# The six characters C's isspace() accepts in the "C" locale.
_WS: Final = " \t\n\x0b\x0c\r"

# One keyword/value setting, leading whitespace included.  Group 1 is the
# keyword, group 2 a quoted value (escapes still in), group 3 an unquoted value
# (escapes still in; absent when the value is empty, which can only happen at
# the end: whitespace after "=" is skipped possessively, never given back to an
# empty value).  A value that starts with a quote must be a complete quoted
# value; a quote later in an
# unquoted value is an ordinary character.  A backslash escapes any following
# character; a backslash at the very end of the string is dropped.
_KV_SETTING: Final = re.compile(
    rf"[{_WS}]*([^={_WS}]*)[{_WS}]*=[{_WS}]*+"
    rf"(?:'((?:[^'\\]|\\.)*)'"
    rf"|((?:[^'{_WS}\\]|\\.|\\\Z)(?:[^{_WS}\\]|\\.|\\\Z)*)"
    rf"|\Z)",
    re.DOTALL,
)
_KV_SKIP_WS: Final = re.compile(rf"[{_WS}]*")
_KV_KEYWORD: Final = re.compile(rf"[^={_WS}]*")
_UNESCAPE: Final = re.compile(r"\\(.|\Z)", re.DOTALL)

_URI_PREFIXES: Final = ("postgresql://", "postgres://")
_HOST_END: Final = re.compile(r"[^:/?,]*")
_PORT_END: Final = re.compile(r"[^/?,]*")
_HEXDIGITS: Final = frozenset(b"0123456789abcdefABCDEF")


def uri_prefix_length(conninfo: str) -> int:
    """Length of the URI scheme prefix, or 0 if *conninfo* is not a URI."""
    for prefix in _URI_PREFIXES:
        if conninfo.startswith(prefix):
            return len(prefix)
    return 0


def is_conninfo_string(value: str) -> bool:
    """Whether libpq would take *value* (of ``dbname``) for a connection string.

    That is the case when it starts with a URI prefix or contains ``=``
    anywhere (libpq's ``recognized_connection_string``).
    """
    return "=" in value or uri_prefix_length(value) > 0


def parse_conninfo(conninfo: str) -> dict[str, str]:
    """Parse a connection string, as libpq's ``PQconninfoParse`` does.

    *conninfo* is a keyword/value string (``host=db port=5432``) or a URI
    (``postgresql://user@db:5432/app?sslmode=require``).  The result holds only
    the options the string sets, keyword to value, aliases translated
    (``requiressl``, and ``ssl=true`` in URIs).  Values are not validated.

    Raises :class:`~pgproto.ConninfoError` for any string libpq rejects.
    """
    if "\x00" in conninfo:
        raise ConninfoError("connection string contains a NUL character")
    try:
        conninfo.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ConninfoError(
            f"connection string contains a character that cannot be encoded at position "
            f"{exc.start + 1}"
        ) from None
    options: dict[str, str] = {}
    prefix_len = uri_prefix_length(conninfo)
    if prefix_len:
        _parse_uri(conninfo, prefix_len, options)
    else:
        _parse_keyword_value(conninfo, options)
    return options


# --------------------------------------------------------------------------
# keyword/value strings


def _parse_keyword_value(conninfo: str, options: dict[str, str]) -> None:
    pos = 0
    end = len(conninfo)
    # The secret keyword whose unquoted value was stored last: text that
    # follows it may be the rest of a password with a space in it.
    follows_secret: str | None = None
    match_setting = _KV_SETTING.match
    while True:
        pos = _KV_SKIP_WS.match(conninfo, pos).end()  # type: ignore[union-attr]
        if pos == end:
            return
        m = match_setting(conninfo, pos)
        if m is None:
            _raise_keyword_value_error(conninfo, pos, follows_secret)
        keyword, quoted, unquoted = m.groups()
        if quoted is not None:
            value = _UNESCAPE.sub(r"\1", quoted) if "\\" in quoted else quoted
        else:
            value = unquoted or ""
            if "\\" in value:
                value = _UNESCAPE.sub(r"\1", value)
        if keyword not in OPTION_BY_KEYWORD:
            if keyword == "requiressl":
                keyword, value = "sslmode", ("require" if value[:1] == "1" else "prefer")
            elif follows_secret is not None:
                raise ConninfoError(
                    f'invalid connection option "{_MASK}" (the text follows the unquoted '
                    f'value of "{follows_secret}"; quote values that contain spaces)'
                )
            else:
                raise ConninfoError(f'invalid connection option "{keyword}"', keyword=keyword)
        options[keyword] = value
        follows_secret = keyword if quoted is None and keyword in SECRET_KEYWORDS else None
        pos = m.end()


def _raise_keyword_value_error(conninfo: str, pos: int, follows_secret: str | None) -> NoReturn:
    """Report why the setting at *pos* did not parse (never returns)."""
    kw_end = _KV_KEYWORD.match(conninfo, pos).end()  # type: ignore[union-attr]
    keyword = conninfo[pos:kw_end]
    after = _KV_SKIP_WS.match(conninfo, kw_end).end()  # type: ignore[union-attr]
    if after == len(conninfo) or conninfo[after] != "=":
        if follows_secret is not None:
            raise ConninfoError(
                f'missing "=" after "{_MASK}" in connection info string (the text '
                f'follows the unquoted value of "{follows_secret}"; quote values that '
                "contain spaces)"
            )
        raise ConninfoError(f'missing "=" after "{keyword}" in connection info string')
    raise ConninfoError("unterminated quoted string in connection info string", keyword=keyword)


# --------------------------------------------------------------------------
# URIs


def _userinfo_end(uri: str, start: int) -> int:
    """The index of the "@" that ends the user information, or -1.

    libpq looks ahead for an "@" before the first "/"; "?" and "," do not stop
    the look-ahead.
    """
    for p in range(start, len(uri)):
        if uri[p] == "@":
            return p
        if uri[p] == "/":
            break
    return -1


def _parse_uri(uri: str, prefix_len: int, options: dict[str, str]) -> None:
    end = len(uri)
    start = prefix_len
    p = _userinfo_end(uri, start)
    if p >= 0:
        userinfo = uri[start:p]
        colon = userinfo.find(":")
        user = userinfo if colon < 0 else userinfo[:colon]
        if user:
            options["user"] = _uri_decode(user, None)
        if colon >= 0:
            password = userinfo[colon + 1 :]
            if password:
                options["password"] = _uri_decode(password, "password")
        p += 1
    else:
        p = start

    # One or more host[:port] specifications separated by commas.  Hosts and
    # ports are collected raw into parallel lists and decoded as whole strings.
    hosts: list[str] = []
    ports: list[str] = []
    while True:
        if p < end and uri[p] == "[":
            close = uri.find("]", p + 1)
            if close < 0:
                raise ConninfoError(
                    'end of string reached when looking for matching "]" in IPv6 host '
                    f'address in URI: "{_mask_uri(uri)}"'
                )
            if close == p + 1:
                raise ConninfoError(
                    f'IPv6 host address may not be empty in URI: "{_mask_uri(uri)}"'
                )
            hosts.append(uri[p + 1 : close])
            p = close + 1
            if p < end and uri[p] not in ":/?,":
                position = _byte_length(uri[:p]) + 1
                raise ConninfoError(
                    f'unexpected character "{uri[p]}" at position {position} in URI '
                    f'(expected ":" or "/"): "{_mask_uri(uri)}"'
                )
        else:
            host_end = _HOST_END.match(uri, p).end()  # type: ignore[union-attr]
            hosts.append(uri[p:host_end])
            p = host_end
        terminator = uri[p] if p < end else ""
        if terminator == ":":
            port_end = _PORT_END.match(uri, p + 1).end()  # type: ignore[union-attr]
            ports.append(uri[p + 1 : port_end])
            p = port_end
            terminator = uri[p] if p < end else ""
        if terminator != ",":
            break
        p += 1
        hosts.append(",")
        ports.append(",")

    host = "".join(hosts)
    if host:
        options["host"] = _uri_decode(host, None)
    port = "".join(ports)
    if port:
        options["port"] = _uri_decode(port, None)

    if terminator == "/":
        query = uri.find("?", p + 1)
        dbname = uri[p + 1 :] if query < 0 else uri[p + 1 : query]
        if dbname:
            options["dbname"] = _uri_decode(dbname, None)
        if query < 0:
            return
        p = query
    elif terminator != "?":
        return
    _parse_uri_query(uri[p + 1 :], options)


def _parse_uri_query(query: str, options: dict[str, str]) -> None:
    pieces = query.split("&")
    if pieces[-1] == "":
        # A trailing "&" (or an empty query) ends the list harmlessly; an
        # empty piece anywhere else is an error, reported below.
        pieces.pop()
    for piece in pieces:
        eq = piece.find("=")
        if eq < 0:
            raise ConninfoError(
                f'missing key/value separator "=" in URI query parameter: "{piece}"'
            )
        raw_keyword = piece[:eq]
        raw_value = piece[eq + 1 :]
        if "=" in raw_value:
            raise ConninfoError(
                f'extra key/value separator "=" in URI query parameter: "{raw_keyword}"'
            )
        keyword = _uri_decode(raw_keyword, None)
        value = _uri_decode(raw_value, keyword if keyword in SECRET_KEYWORDS else None)
        if keyword == "ssl" and value == "true":
            keyword, value = "sslmode", "require"
        elif keyword == "requiressl":
            keyword, value = "sslmode", ("require" if value[:1] == "1" else "prefer")
        elif keyword not in OPTION_BY_KEYWORD:
            raise ConninfoError(f'invalid URI query parameter: "{keyword}"', keyword=keyword)
        options[keyword] = value


def _uri_decode(raw: str, secret: str | None) -> str:
    """Percent-decode one URI component, as ``conninfo_uri_decode`` does.

    Leading and trailing spaces are dropped; a space anywhere else is an error
    (PostgreSQL 18).  When *secret* names the component, errors do not quote it.
    """
    if "%" not in raw and " " not in raw:
        return raw
    shown = f"the {secret} (value not shown)" if secret else f'"{raw}"'
    body = raw.lstrip(" ")
    space = body.find(" ")
    rest = ""
    if space >= 0:
        body, rest = body[:space], body[space:]
    if "%" in body:
        encoded = body.encode("utf-8", "surrogateescape")
        chunks = encoded.split(b"%")
        out = bytearray(chunks[0])
        for chunk in chunks[1:]:
            if len(chunk) < 2 or chunk[0] not in _HEXDIGITS or chunk[1] not in _HEXDIGITS:
                raise ConninfoError(f"invalid percent-encoded token: {shown}", keyword=secret)
            byte = int(chunk[:2], 16)
            if byte == 0:
                raise ConninfoError(
                    f"forbidden value %00 in percent-encoded value: {shown}", keyword=secret
                )
            out.append(byte)
            out += chunk[2:]
        body = out.decode("utf-8", "surrogateescape")
    if rest.strip(" "):
        raise ConninfoError(
            f"unexpected spaces found in {shown}, use percent-encoded spaces (%20) instead",
            keyword=secret,
        )
    return body


#: Where a URI query parameter's value begins ("?name=" or "&name=").  A
#: ``?`` ends a name: where the host part holds an ``&`` before the query's
#: ``?`` (``postgresql://[::1&?password=...``), the parameter is still
#: ``password``.  Values are not part of the match, so that a non-secret
#: parameter whose value runs on (say, one in a malformed host) cannot hide
#: a secret one.
_URI_PARAM_START: Final = re.compile(r"[?&]([^=&?]*)=")


def _mask_uri(uri: str) -> str:
    """*uri* with its password and secret query parameter values masked."""
    prefix_len = uri_prefix_length(uri)
    at = _userinfo_end(uri, prefix_len)
    if at >= 0:
        colon = uri.find(":", prefix_len, at)
        if colon >= 0 and colon + 1 < at:
            uri = uri[: colon + 1] + _MASK + uri[at:]

    # A secret parameter's value is masked up to the next "&" (a "?" or "="
    # inside it included); parameters that start inside a masked value are
    # part of it.
    pieces: list[str] = []
    pos = 0
    for m in _URI_PARAM_START.finditer(uri):
        if m.start() < pos:
            continue
        try:
            keyword = _uri_decode(m.group(1), None)
        except ConninfoError:
            keyword = m.group(1)
        if keyword in SECRET_KEYWORDS:
            end = uri.find("&", m.end())
            pieces += (uri[pos : m.end()], _MASK)
            pos = len(uri) if end < 0 else end
    pieces.append(uri[pos:])
    return "".join(pieces)


def _byte_length(text: str) -> int:
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return len(text.encode("utf-8", "surrogatepass"))
