"""The connection service file and the password file, read as libpq reads them.

Service files (``parseServiceInfo`` / ``parseServiceFile`` in fe-connect.c) are
INI-like: ``[name]`` groups of ``keyword=value`` lines, with no trimming around
the ``=``.  Password files (``passwordFromFile`` / ``pwdfMatchesString``) hold
``hostname:port:database:username:password`` lines with ``*`` wildcards and
backslash escapes.  Both are byte files; their text is decoded from UTF-8 with
``surrogateescape`` so that any byte survives.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from ._errors import ConninfoError, PasswordFileWarning
from ._options import OPTION_BY_KEYWORD

__all__ = [
    "FileSignature",
    "PasswordMatch",
    "ServiceSetting",
    "file_signature",
    "password_file_refusal",
    "password_from_file",
    "read_service",
]

#: What identifies a file's version (mode, inode, device, size, modification
#: and change times); None when it cannot be read.  Caches compare them.
FileSignature = tuple[int, ...] | None


def file_signature(path: str | None) -> FileSignature:
    """The :data:`FileSignature` of *path* (None for no path)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_mode, st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# fgets() in libpq reads service lines into a 1024-byte buffer; a line that
# fills it (1023 bytes or more, newline included) is "too long".
_SERVICE_LINE_MAX: Final = 1023
_C_SPACE: Final = b" \t\n\x0b\x0c\r"


@dataclass(frozen=True, slots=True)
class ServiceSetting:
    """One ``keyword=value`` line of the selected service group."""

    keyword: str
    value: str
    path: str
    line: int


def read_service(
    service: str,
    apply: Callable[[ServiceSetting], None],
    *,
    user_file: str | None,
    user_file_required: bool,
    system_file: str,
) -> None:
    """Pass the settings of *service* to *apply*, searched as libpq searches.

    *user_file* is ``PGSERVICEFILE`` (then *user_file_required*: it must open)
    or ``~/.pg_service.conf`` (skipped when missing).  If the group is not found
    there, *system_file* is read when it exists.  Settings are passed on as
    they are read, so that those before a syntax error have been applied when
    the error is raised (``PQconndefaults`` ignores the error and shows them);
    *apply* keeps the first value of a keyword and only for keywords still
    unset.

    Raises :class:`ConninfoError` for a missing ``PGSERVICEFILE``, a syntax
    error, or a service found in neither file.
    """
    if (
        user_file is not None
        and (user_file_required or os.path.exists(user_file))
        and _parse_service_file(user_file, service, apply)
    ):
        return
    if os.path.exists(system_file) and _parse_service_file(system_file, service, apply):
        return
    raise ConninfoError(f'definition of service "{service}" not found', keyword="service")


def _parse_service_file(path: str, service: str, apply: Callable[[ServiceSetting], None]) -> bool:
    """Apply the settings of *service* in *path*; False if the group is absent."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        data = b""  # fopen() succeeds on a directory; reading it yields nothing
    except OSError:
        raise ConninfoError(f'service file "{path}" not found', keyword="service") from None
    header = b"[" + service.encode("utf-8", "surrogateescape") + b"]"
    in_group = False
    for number, raw in _fgets_lines(data, _SERVICE_LINE_MAX):
        if len(raw) >= _SERVICE_LINE_MAX:
            raise ConninfoError(f'line {number} too long in service file "{path}"')
        line = raw.strip(_C_SPACE)
        if not line or line.startswith(b"#"):
            continue
        if line.startswith(b"["):
            if in_group:
                break
            in_group = line.startswith(header)
            continue
        if not in_group:
            continue
        key, eq, value = line.partition(b"=")
        keyword = key.decode("utf-8", "surrogateescape")
        if not eq:
            raise ConninfoError(f'syntax error in service file "{path}", line {number}')
        if keyword == "service":
            raise ConninfoError(
                f'nested service specifications not supported in service file "{path}", '
                f"line {number}"
            )
        if keyword not in OPTION_BY_KEYWORD:
            raise ConninfoError(f'syntax error in service file "{path}", line {number}')
        apply(ServiceSetting(keyword, value.decode("utf-8", "surrogateescape"), path, number))
    return in_group


def _fgets_lines(data: bytes, room: int) -> Iterator[tuple[int, bytes]]:
    """The lines C's fgets() returns with *room* bytes of space, as strlen()
    sees them: only newline ends a line, a longer line comes in pieces, and a
    NUL byte hides the rest of its piece."""
    pos = 0
    number = 0
    while pos < len(data):
        window = data[pos : pos + room]
        newline = window.find(b"\n")
        chunk = window if newline < 0 else window[: newline + 1]
        pos += len(chunk)
        number += 1
        yield number, chunk.split(b"\x00", 1)[0]


@dataclass(frozen=True, slots=True)
class PasswordMatch:
    """The password found for one host, and where."""

    password: str
    path: str
    line: int

    def __repr__(self) -> str:
        return f"PasswordMatch(password='********', path={self.path!r}, line={self.line})"


def password_file_refusal(path: str, mode: int) -> str | None:
    """Why a password file of this *mode* is ignored (libpq's warning), or
    None when it may be read: it must be a plain file with no access at all
    for group or others."""
    if not stat.S_ISREG(mode):
        return f'password file "{path}" is not a plain file'
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (
            f'password file "{path}" has group or world access; permissions should '
            "be u=rw (0600) or less"
        )
    return None


def password_from_file(
    path: str,
    *,
    hostname: str,
    port: str,
    dbname: str,
    user: str,
) -> PasswordMatch | None:
    """The first line of the password file *path* that matches, or None.

    The caller has already applied libpq's rules for the lookup key (the
    ``localhost`` substitution, the default port).  A file that cannot be
    opened is ignored silently; one that is not a plain file, or that grants
    any access to group or others, is ignored with a warning.
    """
    if not dbname or not user:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        refusal = password_file_refusal(path, os.fstat(fd).st_mode)
        if refusal is not None:
            _warn(refusal)
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    except OSError:
        return None
    finally:
        os.close(fd)
    keys = [k.encode("utf-8", "surrogateescape") for k in (hostname, port, dbname, user)]
    for number, line in _password_lines(data):
        rest: bytes | None = line
        for key in keys:
            rest = _match_field(rest, key)
            if rest is None:
                break
        if rest is not None:
            return PasswordMatch(
                _unescape_password(rest).decode("utf-8", "surrogateescape"), path, number
            )
    return None


def _warn(message: str) -> None:
    # Five frames up is the call inside resolve_params (via _passwords, _connect_options).
    warnings.warn(PasswordFileWarning(message), stacklevel=5)


def _password_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The lines of a password file, as ``passwordFromFile`` assembles them.

    libpq appends fgets() pieces to a growing buffer (256 bytes, then doubled
    whenever fewer than 129 are free) and measures each piece with strlen():
    a NUL byte drops the rest of its piece, newline included, so the next line
    is joined to what came before the NUL.  A last line without a newline that
    exactly fills the buffer is never seen.  Comment lines (``#``) and empty
    lines are skipped; trailing CR/LF are stripped.  Yields the number of the
    physical line where each logical line starts.
    """
    buf = bytearray()
    maxlen = 256
    pos = 0
    start = 0
    while pos < len(data):
        while maxlen < len(buf) + 129:
            maxlen *= 2
        room = maxlen - len(buf) - 1
        window = data[pos : pos + room]
        newline = window.find(b"\n")
        chunk = window if newline < 0 else window[: newline + 1]
        at_eof = newline < 0 and len(window) < room
        if not buf:
            start = pos
        pos += len(chunk)
        buf += chunk.split(b"\x00", 1)[0]
        if not buf.endswith(b"\n") and not at_eof:
            continue
        if not buf.startswith(b"#"):
            line = bytes(buf).rstrip(b"\r\n")
            if line:
                yield data.count(b"\n", 0, start) + 1, line
        buf.clear()


def _match_field(buf: bytes | None, token: bytes) -> bytes | None:
    """What follows the field at the start of *buf* if it matches *token*.

    ``*`` alone matches anything; otherwise the field must equal the token
    byte for byte, a backslash making the next byte literal.
    """
    if buf is None:
        return None
    if buf.startswith(b"*:"):
        return buf[2:]
    i = 0
    t = 0
    end = len(buf)
    while i < end:
        escaped = False
        if buf[i] == 0x5C:  # backslash
            i += 1
            escaped = True
            if i == end:
                return None
        if buf[i] == 0x3A and t == len(token) and not escaped:  # ":"
            return buf[i + 1 :]
        if t == len(token) or buf[i] != token[t]:
            return None
        i += 1
        t += 1
    return None


def _unescape_password(rest: bytes) -> bytes:
    """The password field: up to the first unescaped ``:``, escapes removed."""
    out = bytearray()
    i = 0
    end = len(rest)
    while i < end and rest[i] != 0x3A:
        if rest[i] == 0x5C and i + 1 < end:
            i += 1
        out.append(rest[i])
        i += 1
    return bytes(out)
