"""What resolution reads from the process: environment, home, OS user, locale.

Everything libpq takes from its process at connect time is gathered in one
:class:`Environment` value, so that tests (and applications that want to
resolve parameters for someone else) can inject it.  Files -- the service
file, the password file -- are still read from the file system, at the paths
the environment leads to.
"""

from __future__ import annotations

import functools
import locale
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

__all__ = ["DEFAULT_SOCKET_DIR", "DEFAULT_SYSCONFDIR", "Environment"]

#: The default Unix-socket directory.  libpq compiles one in; upstream uses
#: ``/tmp``, Debian and the libpq bundled with psycopg use this one.
DEFAULT_SOCKET_DIR: Final = "/var/run/postgresql"

#: The directory of the system-wide ``pg_service.conf`` when ``PGSYSCONFDIR``
#: is unset (Debian's libpq uses this one).
DEFAULT_SYSCONFDIR: Final = "/etc/postgresql-common"


#: Environment variables whose value is a secret: masked in the repr.
_SECRET_VARIABLES: Final = frozenset({"PGPASSWORD"})


@dataclass(frozen=True, slots=True, repr=False)
class Environment:
    """The process state that parameter resolution depends on.

    ``Environment.from_os()`` reads the real process; tests build one directly.

    * ``environ``: environment variables (``PGHOST``, ``PGSERVICEFILE``, ...).
      A variable set to the empty string counts as set, as in libpq.
    * ``home``: the home directory, or None if it cannot be determined (then
      ``~/.pgpass``, ``~/.pg_service.conf`` and friends are treated as absent).
    * ``user``: the operating-system user name (the default ``user``), or None
      when it cannot be determined (resolution then fails, as libpq does).
    * ``uid``: the effective user id, for error messages.
    * ``client_encoding``: what ``client_encoding=auto`` resolves to, from the
      locale's character set.
    * ``socket_dir``, ``sysconfdir``: libpq's compiled-in directories.
    """

    environ: Mapping[str, str] = field(default_factory=dict)
    home: str | None = None
    user: str | None = None
    uid: int | None = None
    client_encoding: str = "UTF8"
    socket_dir: str = DEFAULT_SOCKET_DIR
    sysconfdir: str = DEFAULT_SYSCONFDIR
    #: key(), kept by the snapshots from_os() takes (their mapping is private).
    _key: tuple[object, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        environ = {
            name: "********" if name in _SECRET_VARIABLES else value
            for name, value in self.environ.items()
        }
        return (
            f"Environment(environ={environ!r}, home={self.home!r}, user={self.user!r}, "
            f"uid={self.uid!r}, client_encoding={self.client_encoding!r}, "
            f"socket_dir={self.socket_dir!r}, sysconfdir={self.sysconfdir!r})"
        )

    def key(self) -> tuple[object, ...]:
        """A hashable value equal for equal environments (for caches)."""
        if self._key is not None:
            return self._key
        return (
            tuple(sorted(self.environ.items())),
            self.home,
            self.user,
            self.uid,
            self.client_encoding,
            self.socket_dir,
            self.sysconfdir,
        )

    @classmethod
    def from_os(cls, environ: Mapping[str, str] | None = None) -> Environment:
        """The environment of this process (``environ`` overrides ``os.environ``).

        Only the ``PG*`` variables are kept (the only ones libpq reads besides
        ``HOME``); the snapshot is taken now, as libpq reads the environment
        when it starts connecting.
        """
        fingerprint = None
        if environ is None and cls is Environment:
            # A process connecting often reads the same state every time:
            # while what from_os() reads is unchanged (compared raw, before
            # any decoding), the last snapshot is handed out again -- it is
            # immutable, and keeps its cache key (resolve_params).
            fingerprint = _os_fingerprint()
            last = _last_from_os[0]
            if fingerprint is not None and last is not None and last[0] == fingerprint:
                return last[1]
        env = _pg_variables() if environ is None else dict(environ)
        uid = os.geteuid()
        entry = _password_entry(uid)
        # libpq: $HOME when set and non-empty, else the password database.
        home_variable = _home_variable() if environ is None else environ.get("HOME")
        home = home_variable or (entry[1] if entry is not None else None)
        user = entry[0] if entry is not None else None
        snapshot = cls(
            environ=env, home=home, user=user, uid=uid, client_encoding=encoding_from_locale()
        )
        if fingerprint is not None:
            object.__setattr__(snapshot, "_key", snapshot.key())
            _last_from_os[0] = (fingerprint, snapshot)
        return snapshot


def _os_fingerprint() -> tuple[object, ...] | None:
    """Everything from_os() reads from the process, undecoded: the PG*
    variables and HOME as os.environ stores them, the effective uid, the
    LC_CTYPE locale.  None where os.environ keeps no encoded storage."""
    data = _encoded_environ()
    if data is None:
        return None  # pragma: no cover - Windows
    pg_names = _scan_pg_names(data)
    return (
        pg_names,
        tuple(map(data.get, pg_names)),
        data.get(b"HOME"),
        os.geteuid(),
        _current_locale(locale.LC_CTYPE),
    )


try:  # the C function behind locale.setlocale, without its Python wrapper
    from _locale import setlocale as _current_locale
except ImportError:  # pragma: no cover - a Python without _locale
    from locale import setlocale as _current_locale


def _scan_pg_names(data: dict[bytes, bytes]) -> tuple[bytes, ...]:
    """The names in *data* that start with "PG".  They depend only on the
    set of names: while that is unchanged (one comparison, in C), the last
    scan stands."""
    names, pg_names = _pg_names[0]
    if data.keys() != names:
        names = frozenset(data)
        pg_names = tuple(key for key in names if key[:2] == b"PG")
        _pg_names[0] = (names, pg_names)
    return pg_names


#: The last snapshot from_os() took of the process, with its fingerprint.
_last_from_os: list[tuple[tuple[object, ...], Environment] | None] = [None]


def _encoded_environ() -> dict[bytes, bytes] | None:
    """os.environ's own storage of the encoded pairs, where CPython keeps one
    (``_data``): reading it avoids a Python-level ``__getitem__`` and a
    decoding per variable.  None elsewhere (Windows)."""
    data = getattr(os.environ, "_data", None)
    return data if os.supports_bytes_environ and isinstance(data, dict) else None


def _home_variable() -> str | None:
    """``$HOME`` of the process (from os.environ's encoded storage when it
    has one, as :func:`_pg_variables` does)."""
    data = _encoded_environ()
    if data is not None:
        value = data.get(b"HOME")
        return None if value is None else os.fsdecode(value)
    return os.environ.get("HOME")


def _pg_variables() -> dict[str, str]:
    """The process's ``PG*`` variables (decoding only those: connecting often
    should not pay for decoding a large environment)."""
    data = _encoded_environ()
    if data is not None:
        return {os.fsdecode(key): os.fsdecode(data[key]) for key in _scan_pg_names(data)}
    return {key: value for key, value in os.environ.items() if key.startswith("PG")}


#: The names in os.environ's storage when _pg_variables() last scanned it,
#: and those of them that start with "PG" (one tuple: replaced at once).
_pg_names: list[tuple[frozenset[bytes], tuple[bytes, ...]]] = [(frozenset(), ())]


@functools.lru_cache(maxsize=8)
def _password_entry(uid: int) -> tuple[str, str] | None:
    """(user name, home directory) of *uid* from the password database."""
    try:
        import pwd  # noqa: PLC0415  (not on every platform)

        entry = pwd.getpwuid(uid)
    except (ImportError, KeyError):
        return None
    return entry.pw_name, entry.pw_dir


# PostgreSQL encoding names for the character sets a locale may report
# (libpq's chklocale.c table, keyed by the normalised codeset name).
_CODESETS: Final[dict[str, str]] = {
    "utf8": "UTF8",
    "ansix341968": "SQL_ASCII",
    "ascii": "SQL_ASCII",
    "usascii": "SQL_ASCII",
    "iso88591": "LATIN1",
    "iso88592": "LATIN2",
    "iso88593": "LATIN3",
    "iso88594": "LATIN4",
    "iso88595": "ISO_8859_5",
    "iso88596": "ISO_8859_6",
    "iso88597": "ISO_8859_7",
    "iso88598": "ISO_8859_8",
    "iso88599": "LATIN5",
    "iso885910": "LATIN6",
    "iso885913": "LATIN7",
    "iso885914": "LATIN8",
    "iso885915": "LATIN9",
    "iso885916": "LATIN10",
    "koi8r": "KOI8R",
    "koi8u": "KOI8U",
    "cp1250": "WIN1250",
    "cp1251": "WIN1251",
    "cp1252": "WIN1252",
    "cp1253": "WIN1253",
    "cp1254": "WIN1254",
    "cp1255": "WIN1255",
    "cp1256": "WIN1256",
    "cp1257": "WIN1257",
    "cp1258": "WIN1258",
    "cp866": "WIN866",
    "cp874": "WIN874",
    "cp932": "SJIS",
    "cp936": "GBK",
    "cp949": "UHC",
    "cp950": "BIG5",
    "eucjp": "EUC_JP",
    "euckr": "EUC_KR",
    "euctw": "EUC_TW",
    "euccn": "EUC_CN",
    "gb2312": "EUC_CN",
    "gbk": "GBK",
    "gb18030": "GB18030",
    "big5": "BIG5",
    "big5hkscs": "BIG5",
    "sjis": "SJIS",
    "shiftjis": "SJIS",
    "tcvn57121": "WIN1258",
}


def encoding_from_locale() -> str:
    """The PostgreSQL encoding of this process's ``LC_CTYPE`` locale.

    As libpq does (it never calls setlocale itself): the C and POSIX locales
    mean SQL_ASCII; otherwise the locale's codeset is looked up in a table.
    An unknown codeset gives the empty string, and then no client_encoding
    is sent.
    """
    try:
        name = locale.setlocale(locale.LC_CTYPE)
    except locale.Error:  # pragma: no cover - setlocale query does not fail
        name = "C"
    if name in ("C", "POSIX"):
        return "SQL_ASCII"
    try:
        codeset = locale.nl_langinfo(locale.CODESET)
    except (AttributeError, locale.Error):  # pragma: no cover - non-POSIX
        return ""
    return _encoding_of_codeset(codeset)


@functools.lru_cache(maxsize=16)
def _encoding_of_codeset(codeset: str) -> str:
    key = "".join(ch for ch in codeset.lower() if ch.isalnum())
    return _CODESETS.get(key, "")
