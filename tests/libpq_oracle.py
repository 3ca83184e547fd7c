"""A libpq oracle for parameter resolution, through ctypes.

The library is the libpq that psycopg's binary wheel bundles (libpq 18, built
with OpenSSL and GSSAPI, default socket directory ``/var/run/postgresql``).
:func:`connect_start` calls ``PQconnectStartParams`` with keyword/value arrays
and reports what the resulting ``PGconn`` holds: its status, its error
message, ``PQconninfo``, ``PQpass``, ``PQhost``, ``PQport``, ``PQuser`` and
``PQdb``.  :func:`conndefaults` reports ``PQconndefaults``.

libpq reads the real process: environment variables (``os.environ`` updates
the C environment), ``$HOME`` and files.  Callers control those (pytest's
``monkeypatch`` and ``tmp_path``).  ``PQconnectStartParams`` starts a
connection attempt when the options are valid, so callers point it at
something that fails at once without DNS (a Unix socket in a missing
directory, or ``hostaddr=127.0.0.1 port=1``).

libpq reports option errors (``options_valid`` false) before any connection
attempt, in a message of its own; a failed attempt leaves messages that begin
``connection to server``, or -- for a port libpq only checks when it tries the
host -- ``invalid port number`` / ``invalid integer value ... "port"``.
:attr:`LibpqResult.option_error` tells the two apart.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

__all__ = ["LIBPQ_PATH", "LibpqResult", "conndefaults", "connect_start"]


def _find_libpq() -> str:
    spec = importlib.util.find_spec("psycopg_binary")
    if spec is None or spec.origin is None:  # pragma: no cover
        raise RuntimeError("psycopg_binary is not installed")
    package_dir = os.path.dirname(spec.origin)
    site = os.path.dirname(package_dir)
    candidates = sorted(
        glob.glob(os.path.join(site, "psycopg_binary.libs", "libpq*.so*"))
        + glob.glob(os.path.join(package_dir, "**", "libpq*.so*"), recursive=True)
    )
    if not candidates:  # pragma: no cover - depends on the wheel layout
        raise RuntimeError("libpq bundled with psycopg_binary not found")
    return candidates[0]


LIBPQ_PATH: Final = _find_libpq()


class _ConninfoOption(ctypes.Structure):
    _fields_ = (
        ("keyword", ctypes.c_char_p),
        ("envvar", ctypes.c_char_p),
        ("compiled", ctypes.c_char_p),
        ("val", ctypes.c_char_p),
        ("label", ctypes.c_char_p),
        ("dispchar", ctypes.c_char_p),
        ("dispsize", ctypes.c_int),
    )


_lib = ctypes.CDLL(LIBPQ_PATH)
_CharPP = ctypes.POINTER(ctypes.c_char_p)
_OptionP = ctypes.POINTER(_ConninfoOption)

_lib.PQconnectStartParams.argtypes = (_CharPP, _CharPP, ctypes.c_int)
_lib.PQconnectStartParams.restype = ctypes.c_void_p
_lib.PQstatus.argtypes = (ctypes.c_void_p,)
_lib.PQstatus.restype = ctypes.c_int
_lib.PQconninfo.argtypes = (ctypes.c_void_p,)
_lib.PQconninfo.restype = _OptionP
_lib.PQconndefaults.argtypes = ()
_lib.PQconndefaults.restype = _OptionP
_lib.PQconninfoFree.argtypes = (_OptionP,)
_lib.PQconninfoFree.restype = None
_lib.PQfinish.argtypes = (ctypes.c_void_p,)
_lib.PQfinish.restype = None
for _name in ("PQerrorMessage", "PQpass", "PQhost", "PQport", "PQuser", "PQdb"):
    _function = getattr(_lib, _name)
    _function.argtypes = (ctypes.c_void_p,)
    _function.restype = ctypes.c_char_p

CONNECTION_BAD: Final = 1

_CONNECT_FAILURE: Final = re.compile(
    r'connection to server |invalid port number: |invalid integer value ".*" for connection '
    r'option "port"|GSSAPI encryption required |could not translate host name '
)


def _decode(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "surrogateescape")


def _encode(value: str | None) -> bytes | None:
    return None if value is None else value.encode("utf-8", "surrogateescape")


def _walk(options: ctypes._Pointer[_ConninfoOption]) -> dict[str, str | None]:
    result: dict[str, str | None] = {}
    i = 0
    while True:
        option = options[i]
        if option.keyword is None:
            return result
        result[option.keyword.decode("ascii")] = _decode(option.val)
        i += 1


@dataclass(frozen=True)
class LibpqResult:
    """What one ``PQconnectStartParams`` call left in its ``PGconn``."""

    status: int
    message: str
    conninfo: dict[str, str | None]
    password: str | None
    host: str | None
    port: str | None
    user: str | None
    dbname: str | None

    @property
    def option_error(self) -> str | None:
        """libpq's message if it rejected the options (None if it accepted them).

        Only the first line, stripped: libpq ends messages with a newline.
        """
        if self.status != CONNECTION_BAD:
            return None
        first = self.message.strip().split("\n", 1)[0].strip()
        if _CONNECT_FAILURE.match(first):
            return None
        return first


@contextmanager
def _arrays(
    params: Sequence[tuple[str, str | None]],
) -> Iterator[tuple[ctypes.Array[ctypes.c_char_p], ctypes.Array[ctypes.c_char_p]]]:
    n = len(params)
    keywords = (ctypes.c_char_p * (n + 1))(*[k.encode("ascii") for k, _ in params], None)
    values = (ctypes.c_char_p * (n + 1))(*[_encode(v) for _, v in params], None)
    yield keywords, values


def connect_start(
    params: Sequence[tuple[str, str | None]], *, expand_dbname: bool = True
) -> LibpqResult:
    """``PQconnectStartParams(keywords, values, expand_dbname)``, observed and finished."""
    with _arrays(params) as (keywords, values):
        conn = _lib.PQconnectStartParams(
            ctypes.cast(keywords, _CharPP), ctypes.cast(values, _CharPP), int(expand_dbname)
        )
    if not conn:  # pragma: no cover - out of memory
        raise MemoryError("PQconnectStartParams returned NULL")
    try:
        options = _lib.PQconninfo(conn)
        try:
            conninfo = _walk(options) if options else {}
        finally:
            if options:
                _lib.PQconninfoFree(options)
        return LibpqResult(
            status=_lib.PQstatus(conn),
            message=_decode(_lib.PQerrorMessage(conn)) or "",
            conninfo=conninfo,
            password=_decode(_lib.PQpass(conn)),
            host=_decode(_lib.PQhost(conn)),
            port=_decode(_lib.PQport(conn)),
            user=_decode(_lib.PQuser(conn)),
            dbname=_decode(_lib.PQdb(conn)),
        )
    finally:
        _lib.PQfinish(conn)


@dataclass(frozen=True)
class DefaultOption:
    """One row of ``PQconndefaults``."""

    keyword: str
    envvar: str | None
    compiled: str | None
    val: str | None
    label: str | None
    dispchar: str | None
    dispsize: int


def conndefaults() -> list[DefaultOption]:
    """``PQconndefaults()``, every row."""
    options = _lib.PQconndefaults()
    if not options:  # pragma: no cover - out of memory
        raise MemoryError("PQconndefaults returned NULL")
    try:
        rows = []
        i = 0
        while options[i].keyword is not None:
            o = options[i]
            rows.append(
                DefaultOption(
                    keyword=o.keyword.decode("ascii"),
                    envvar=_decode(o.envvar),
                    compiled=_decode(o.compiled),
                    val=_decode(o.val),
                    label=_decode(o.label),
                    dispchar=_decode(o.dispchar),
                    dispsize=o.dispsize,
                )
            )
            i += 1
        return rows
    finally:
        _lib.PQconninfoFree(options)


_lib.PQping.argtypes = (ctypes.c_char_p,)
_lib.PQping.restype = ctypes.c_int


def ping(conninfo: str) -> int:
    """``PQping(conninfo)``: the ``PGPing`` value (0 OK, 1 REJECT, 2 NO_RESPONSE,
    3 NO_ATTEMPT).  Blocks as libpq does, up to ``connect_timeout`` per address."""
    return int(_lib.PQping(_encode(conninfo)))
