"""Resolving connection parameters exactly as libpq does, with provenance.

:func:`resolve_params` is the pure, IO-free (apart from reading the service
and password files) equivalent of what ``PQconnectStartParams`` does before it
touches the network:

1. ``conninfo_array_parse``: the positional connection string and the keyword
   arguments, in order, with ``expand_dbname``;
2. ``conninfo_add_defaults``: the service file, then environment variables,
   then compiled-in defaults, then the OS user name;
3. ``pqConnectOptions2``: the host list, the derived defaults, the password
   file, and the validation of every option, in libpq's order, so that the
   first fault reported is the one libpq would report.

Every value remembers where it came from (:class:`Source`).  The result,
:class:`ConnParams`, is immutable; its repr and every error hide secrets.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from ._conninfo import is_conninfo_string, parse_conninfo
from ._environment import Environment
from ._errors import ConninfoError
from ._files import (
    FileSignature,
    ServiceSetting,
    file_signature,
    password_file_refusal,
    password_from_file,
    read_service,
)
from ._options import OPTION_BY_KEYWORD, OPTIONS, SECRET_KEYWORDS, ConninfoOption
from ._scram import KEY_LENGTH, pg_b64decode

__all__ = [
    "AuthRequirement",
    "ConnParams",
    "HostParams",
    "HostType",
    "Source",
    "SourceKind",
    "conninfo_defaults",
    "resolve_params",
]

DEFAULT_PORT: Final = 5432
_MASK: Final = "********"


class SourceKind(enum.Enum):
    """Where a resolved value came from."""

    CONNINFO = "connection string"
    KEYWORD = "keyword argument"
    SERVICE_FILE = "service file"
    ENVIRONMENT = "environment variable"
    PASSWORD_FILE = "password file"  # noqa: S105 (a label, not a password)
    DEFAULT = "compiled-in default"
    DERIVED = "derived"


@dataclass(frozen=True, slots=True)
class Source:
    """The provenance of one value.

    ``name`` is the environment variable or keyword argument; ``path``,
    ``section`` and ``line`` locate a file entry; ``detail`` explains a derived
    value.
    """

    kind: SourceKind
    name: str | None = None
    path: str | None = None
    section: str | None = None
    line: int | None = None
    detail: str | None = None

    def __str__(self) -> str:
        kind = self.kind
        if kind is SourceKind.ENVIRONMENT or kind is SourceKind.KEYWORD:
            return f"{kind.value} {self.name}"
        if kind is SourceKind.SERVICE_FILE:
            return f'service "{self.section}" in {self.path}, line {self.line}'
        if kind is SourceKind.PASSWORD_FILE:
            return f"password file {self.path}, line {self.line}"
        if kind is SourceKind.DERIVED and self.detail:
            return f"derived: {self.detail}"
        return str(kind.value)


_CONNINFO_SOURCE: Final = Source(SourceKind.CONNINFO)
_DEFAULT_SOURCE: Final = Source(SourceKind.DEFAULT)


class HostType(enum.Enum):
    """How a host entry is reached (libpq's ``pg_conn_host_type``)."""

    NAME = "host name"
    ADDRESS = "numeric address"
    UNIX_SOCKET = "Unix-domain socket"


@dataclass(frozen=True, slots=True)
class HostParams:
    """One entry of the host list.

    * ``host``: the host name, socket directory or ``@abstract`` name; None
      when only ``hostaddr`` was given for this entry.  It is what TLS
      verification and the password file use.
    * ``hostaddr``: the numeric address to dial, or None.
    * ``port``: the port number (5432 when not given).
    * ``password``: the password that would be sent to this host (the password
      file entry, else the ``password`` option), or None.
    * ``error``: why this entry cannot be tried (libpq moves on to the next
      host), e.g. a port out of range; else None.
    """

    type: HostType
    host: str | None
    hostaddr: str | None
    port: int
    password: str | None
    password_source: Source | None
    host_source: Source
    port_source: Source
    error: str | None = None

    def __repr__(self) -> str:
        password = None if self.password is None else _MASK
        return (
            f"HostParams(type={self.type.name}, host={self.host!r}, "
            f"hostaddr={self.hostaddr!r}, port={self.port!r}, password={password!r}, "
            f"password_source={self.password_source!s}"
            + (f", error={self.error!r}" if self.error else "")
            + ")"
        )

    @property
    def name(self) -> str:
        """The host as libpq names it in messages: hostaddr if given, else host."""
        if self.hostaddr:
            return self.hostaddr
        return self.host or ""


@dataclass(frozen=True, slots=True)
class AuthRequirement:
    """The parsed ``require_auth`` option.

    ``requests`` holds the authentication request codes the server may send
    (3 cleartext, 5 MD5, 7/8 GSS, 9 SSPI, 10/11/12 SASL); ``sasl_mechanisms``
    the SASL mechanisms it may pick; ``auth_required`` is False when the server
    may skip authentication altogether (``none``, or a negative list).
    """

    requests: frozenset[int]
    sasl_mechanisms: frozenset[str]
    auth_required: bool


class ConnParams:
    """Resolved connection parameters, with the provenance of every value.

    Built by :func:`resolve_params`.  ``params["sslmode"]`` gives an option's
    effective value (None when unset), :meth:`as_dict` all of them (the
    ``PQconninfo`` view), :meth:`source` where one came from, :attr:`hosts` one
    entry per host.  Typed views of the validated options are attributes
    (:attr:`connect_timeout`, :attr:`require_auth`, ...).
    """

    __slots__ = (
        "_memo",
        "_sources",
        "_values",
        "connect_timeout",
        "env",
        "hosts",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "max_protocol_version",
        "min_protocol_version",
        "require_auth",
        "scram_client_key",
        "scram_server_key",
        "tcp_user_timeout",
    )

    _values: dict[str, str | None]
    _sources: dict[str, Source]
    hosts: tuple[HostParams, ...]
    #: The process state the parameters were resolved with (the connection
    #: reads PGDATESTYLE/PGTZ/PGGEQO and the home directory from it).
    env: Environment
    #: Seconds per address (the seed's rule: 1 means 2), or None to wait forever.
    connect_timeout: int | None
    keepalives: bool
    keepalives_idle: int | None
    keepalives_interval: int | None
    keepalives_count: int | None
    tcp_user_timeout: int | None
    require_auth: AuthRequirement | None
    #: Protocol versions as (major, minor).
    min_protocol_version: tuple[int, int]
    max_protocol_version: tuple[int, int]
    scram_client_key: bytes | None
    scram_server_key: bytes | None
    #: What the connection machine derives from these parameters alone (the
    #: StartupMessage, the OpenConnection commands), kept for the next
    #: connection made with them (resolve_params caches ConnParams).
    _memo: dict[tuple[object, ...], Any]

    def __getitem__(self, keyword: str) -> str | None:
        if keyword not in OPTION_BY_KEYWORD:
            raise KeyError(keyword)
        return self._values.get(keyword)

    def get(self, keyword: str, default: str | None = None) -> str | None:
        """The option's value, or *default* when it is unset."""
        value = self._values.get(keyword)
        return default if value is None else value

    def as_dict(self) -> dict[str, str | None]:
        """Every option in table order, with its effective value or None.

        This is the ``PQconninfo`` view: derived defaults filled in (user,
        dbname, passfile, ``client_encoding=auto`` resolved), ``host``,
        ``hostaddr`` and ``port`` as given (see :attr:`hosts` for the split
        list), ``password`` only if given explicitly (never the password-file
        value).
        """
        return {o.keyword: self._values.get(o.keyword) for o in OPTIONS}

    def source(self, keyword: str) -> Source | None:
        """Where the option's value came from, or None when it is unset."""
        if keyword not in OPTION_BY_KEYWORD:
            raise KeyError(keyword)
        return self._sources.get(keyword)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{k}={_MASK if k in SECRET_KEYWORDS else v!r}"
            for k, v in self._values.items()
            if v is not None
        )
        return f"ConnParams({shown})"


# --------------------------------------------------------------------------
# resolution


def _check_keyword_value(keyword: str, value: str) -> None:
    """Refuse what libpq could never be given as a keyword value.

    A C string ends at its first NUL, and a lone surrogate (other than the
    ``surrogateescape`` range that stands for a non-UTF-8 byte) has no
    encoding at all; either would otherwise surface later as a ``ValueError``
    or ``UnicodeEncodeError`` from a file-system call or the startup packet.
    The value itself is not quoted: it may be a secret.
    """
    if "\x00" in value:
        raise ConninfoError(
            f'value of option "{keyword}" contains a NUL character', keyword=keyword
        )
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ConninfoError(
            f'value of option "{keyword}" contains a character that cannot be encoded '
            f"at position {exc.start + 1}",
            keyword=keyword,
        ) from None


def resolve_params(
    conninfo: str = "",
    /,
    *,
    env: Environment | None = None,
    expand_dbname: bool = True,
    **kwargs: str | int | None,
) -> ConnParams:
    """Resolve a connection string and keyword arguments as libpq would.

    This behaves as ``PQconnectStartParams`` called with the keywords
    ``["dbname", *kwargs]`` and the values ``[conninfo, *kwargs.values()]``:
    *conninfo* may be a keyword/value string, a URI or a plain database name;
    keyword arguments given after it override it, values that are None or
    empty are skipped, and (with *expand_dbname*) the first ``dbname`` that
    looks like a connection string is expanded in its place.  Then the
    service file, environment variables, compiled-in and derived defaults and
    the password file are applied, and every option is validated.

    *env* is the process state to use (default: ``Environment.from_os()``).

    Raises :class:`~pgproto.ConninfoError` with libpq's message for anything
    libpq would reject before connecting.
    """
    if env is None:
        env = Environment.from_os()
    entries: list[tuple[str, str, Source]] = []
    if conninfo:
        entries.append(("dbname", conninfo, _CONNINFO_SOURCE))
    for keyword, value in kwargs.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise TypeError(
                f"connection option {keyword!r} must be a str or an int, not {type(value).__name__}"
            )
        entries.append((keyword, str(value), Source(SourceKind.KEYWORD, name=keyword)))

    key = (conninfo, expand_dbname, tuple(kwargs.items()), env.key())
    hit = _RESOLVED.get(key)
    if hit is not None:
        for path, signature in hit[1]:
            if file_signature(path) != signature:
                break
        else:  # every file it read is as it was
            return hit[0]
    files: list[tuple[str, FileSignature]] = []
    for keyword, text, source in entries:
        if source.kind is SourceKind.KEYWORD:  # (a cache hit has passed this)
            _check_keyword_value(keyword, text)

    values: dict[str, str | None] = {}
    sources: dict[str, Source] = {}
    _array_parse(entries, expand_dbname, values, sources)
    _add_defaults(values, sources, env, service_errors=True, files=files)
    params = _connect_options(values, sources, env, files)
    if all(sig is not _WARNED for _, sig in files):
        if len(_RESOLVED) >= _RESOLVED_SIZE:
            del _RESOLVED[next(iter(_RESOLVED))]
        _RESOLVED[key] = (params, tuple(files))
    return params


# Resolution repeats itself: an application connects with the same string
# again and again.  The last few results are kept, keyed by the arguments and
# the environment, and reused only while every file resolution read (service
# files, password file) has the same stat() signature as when it was read --
# taken before reading, so a change while reading also invalidates the entry.
# A password file that would draw a warning is never cached, so the warning
# repeats as it does in libpq.  ConnParams is immutable, so sharing is safe.
_WARNED: Final[FileSignature] = (-1,)
_RESOLVED: dict[Hashable, tuple[ConnParams, tuple[tuple[str, FileSignature], ...]]] = {}
_RESOLVED_SIZE: Final = 32


def conninfo_defaults(*, env: Environment | None = None) -> list[ConninfoOption]:
    """Every option with its default value, as ``PQconndefaults`` reports them.

    Defaults come from the service file named by ``PGSERVICE`` (errors in it
    are ignored, as libpq does), environment variables, compiled-in defaults
    and, for ``user``, the OS user name.
    """
    if env is None:
        env = Environment.from_os()
    values: dict[str, str | None] = {}
    sources: dict[str, Source] = {}
    _add_defaults(values, sources, env, service_errors=False)
    return [
        ConninfoOption(
            o.keyword, o.envvar, o.compiled, values.get(o.keyword), o.label, o.dispchar, o.dispsize
        )
        for o in OPTIONS
    ]


def _array_parse(
    entries: list[tuple[str, str, Source]],
    expand_dbname: bool,
    values: dict[str, str | None],
    sources: dict[str, Source],
) -> None:
    """``conninfo_array_parse``: positional override semantics."""
    expansion: dict[str, str] | None = None
    if expand_dbname:
        for keyword, value, _ in entries:
            if keyword == "dbname":
                if is_conninfo_string(value):
                    expansion = parse_conninfo(value)
                break
    for keyword, value, source in entries:
        if not value:
            continue
        if keyword not in OPTION_BY_KEYWORD:
            raise ConninfoError(f'invalid connection option "{keyword}"', keyword=keyword)
        if keyword == "dbname" and expansion is not None:
            for k, v in expansion.items():
                values[k] = v
                sources[k] = _CONNINFO_SOURCE
            expansion = None
            continue
        values[keyword] = value
        sources[keyword] = source


def _add_defaults(
    values: dict[str, str | None],
    sources: dict[str, Source],
    env: Environment,
    *,
    service_errors: bool,
    files: list[tuple[str, FileSignature]] | None = None,
) -> None:
    """``conninfo_add_defaults``: service file, environment, compiled defaults."""
    environ = env.environ
    service = values.get("service")
    if service is None:
        service = environ.get("PGSERVICE")
    if service is not None:
        try:
            _apply_service(service, values, sources, env, files)
        except ConninfoError:
            if service_errors:
                raise

    sslmode_defaulted = False
    for option in OPTIONS:
        keyword = option.keyword
        if values.get(keyword) is not None:
            continue
        if option.envvar is not None:
            value = environ.get(option.envvar)
            if value is not None:
                values[keyword] = value
                sources[keyword] = Source(SourceKind.ENVIRONMENT, name=option.envvar)
                continue
        if keyword == "sslmode":
            requiressl = environ.get("PGREQUIRESSL")
            if requiressl is not None and requiressl[:1] == "1":
                values[keyword] = "require"
                sources[keyword] = Source(SourceKind.ENVIRONMENT, name="PGREQUIRESSL")
                continue
        if option.compiled is not None:
            values[keyword] = option.compiled
            sources[keyword] = _DEFAULT_SOURCE
            sslmode_defaulted = sslmode_defaulted or keyword == "sslmode"
            continue
        if keyword == "user" and env.user is not None:
            values[keyword] = env.user
            sources[keyword] = Source(SourceKind.DERIVED, detail="operating-system user")

    if sslmode_defaulted and values.get("sslrootcert") == "system":
        values["sslmode"] = "verify-full"
        sources["sslmode"] = Source(SourceKind.DERIVED, detail="sslrootcert=system")


def _apply_service(
    service: str,
    values: dict[str, str | None],
    sources: dict[str, Source],
    env: Environment,
    files: list[tuple[str, FileSignature]] | None,
) -> None:
    environ = env.environ
    user_file = environ.get("PGSERVICEFILE")
    required = user_file is not None
    if user_file is None and env.home is not None:
        user_file = f"{env.home}/.pg_service.conf"
    sysconfdir = environ.get("PGSYSCONFDIR", env.sysconfdir)

    def apply(s: ServiceSetting) -> None:
        if values.get(s.keyword) is None:
            values[s.keyword] = s.value
            sources[s.keyword] = Source(
                SourceKind.SERVICE_FILE, path=s.path, section=service, line=s.line
            )

    system_file = f"{sysconfdir}/pg_service.conf"
    if files is not None:
        files.extend((path, file_signature(path)) for path in (user_file, system_file) if path)
    read_service(
        service,
        apply,
        user_file=user_file,
        user_file_required=required,
        system_file=system_file,
    )


# --------------------------------------------------------------------------
# pqConnectOptions2


def _connect_options(
    values: dict[str, str | None],
    sources: dict[str, Source],
    env: Environment,
    files: list[tuple[str, FileSignature]],
) -> ConnParams:
    """Derived defaults and validation, in libpq's order."""
    drafts = _host_list(values, sources, env)

    user = values.get("user")
    if not user:
        if env.user is None:
            raise ConninfoError(f"local user with ID {env.uid} does not exist", keyword="user")
        user = values["user"] = env.user
        sources["user"] = Source(SourceKind.DERIVED, detail="operating-system user")
    if not values.get("dbname"):
        values["dbname"] = user
        sources["dbname"] = Source(SourceKind.DERIVED, detail="same as user")

    hosts = _passwords(drafts, values, sources, env, files)
    require_auth = _parse_require_auth(values.get("require_auth"))

    _check_enum(values, "channel_binding", ("disable", "prefer", "require"))
    _check_enum(values, "sslmode", _SSLMODES)
    sslmode = values["sslmode"] or "prefer"
    negotiation = _check_enum(values, "sslnegotiation", ("postgres", "direct"))
    if negotiation == "direct" and sslmode not in ("require", "verify-ca", "verify-full"):
        raise ConninfoError(
            f'weak sslmode "{sslmode}" may not be used with sslnegotiation=direct '
            '(use "require", "verify-ca", or "verify-full")',
            keyword="sslnegotiation",
        )
    if values.get("sslrootcert") == "system" and sslmode != "verify-full":
        raise ConninfoError(
            f'weak sslmode "{sslmode}" may not be used with sslrootcert=system (use "verify-full")',
            keyword="sslmode",
        )
    _check_tls_versions(values)
    if values.get("sslcertmode") is None:
        values["sslcertmode"] = "allow"
        sources["sslcertmode"] = Source(SourceKind.DERIVED, detail="libpq default")
    _check_enum(values, "sslcertmode", ("disable", "allow", "require"))
    gssencmode = _check_enum(values, "gssencmode", ("disable", "prefer", "require"))
    if gssencmode == "require":
        raise ConninfoError(
            'gssencmode value "require" invalid when GSSAPI support is not compiled in',
            keyword="gssencmode",
        )
    _check_enum(values, "target_session_attrs", _SESSION_ATTRS)
    scram_client_key = _scram_key(values, "client")
    scram_server_key = _scram_key(values, "server")
    _check_enum(values, "load_balance_hosts", ("disable", "random"))
    min_pversion, max_pversion = _protocol_versions(values)
    if values.get("client_encoding") == "auto":
        values["client_encoding"] = env.client_encoding
        sources["client_encoding"] = Source(SourceKind.DERIVED, detail="client_encoding=auto")

    # Options libpq checks only later (at socket setup, or by the server);
    # pgproto checks them here so that a typo fails before any connection.
    replication = values.get("replication")
    if replication is not None and not _valid_replication(replication):
        raise ConninfoError(f'invalid replication value: "{replication}"', keyword="replication")

    params = ConnParams.__new__(ConnParams)
    params._values = values
    params._sources = sources
    params.hosts = hosts
    params.env = env
    params.connect_timeout = _connect_timeout(values)
    keepalives = _int_option(values, "keepalives")
    params.keepalives = keepalives is None or keepalives != 0
    params.keepalives_idle = _non_negative(_int_option(values, "keepalives_idle"))
    params.keepalives_interval = _non_negative(_int_option(values, "keepalives_interval"))
    params.keepalives_count = _non_negative(_int_option(values, "keepalives_count"))
    params.tcp_user_timeout = _non_negative(_int_option(values, "tcp_user_timeout"))
    params.require_auth = require_auth
    params.min_protocol_version = min_pversion
    params.max_protocol_version = max_pversion
    params.scram_client_key = scram_client_key
    params.scram_server_key = scram_server_key
    params._memo = {}
    return params


_SSLMODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SESSION_ATTRS: Final = (
    "any",
    "read-write",
    "read-only",
    "primary",
    "standby",
    "prefer-standby",
)


def _check_enum(values: Mapping[str, str | None], keyword: str, allowed: tuple[str, ...]) -> str:
    value = values.get(keyword)
    if value is None:
        default = OPTION_BY_KEYWORD[keyword].compiled
        assert default is not None
        return default
    if value not in allowed:
        raise ConninfoError(f'invalid {keyword} value: "{value}"', keyword=keyword)
    return value


def _split(value: str) -> list[str]:
    """libpq's comma-separated lists: split on every comma, no trimming."""
    return value.split(",")


def _is_unix_socket_path(host: str) -> bool:
    return host.startswith("/") or host.startswith("@")


def _host_list(
    values: dict[str, str | None], sources: dict[str, Source], env: Environment
) -> list[_HostDraft]:
    """Build the host list (without passwords) from host, hostaddr and port."""
    host_value = values.get("host") or ""
    hostaddr_value = values.get("hostaddr") or ""
    port_value = values.get("port") or ""
    if hostaddr_value:
        hostaddrs: list[str] = _split(hostaddr_value)
    elif host_value:
        hostaddrs = [""] * len(_split(host_value))
    else:
        hostaddrs = [""]
    count = len(hostaddrs)
    hosts = _split(host_value) if host_value else [""] * count
    if len(hosts) != count:
        raise ConninfoError(
            f"could not match {len(hosts)} host names to {count} hostaddr values", keyword="host"
        )
    if port_value:
        ports = _split(port_value)
        if len(ports) == 1:
            ports = ports * count
        elif len(ports) != count:
            raise ConninfoError(
                f"could not match {len(ports)} port numbers to {count} hosts", keyword="port"
            )
    else:
        ports = [""] * count

    host_source = sources.get("host") or Source(SourceKind.DERIVED, detail="default host")
    port_source = sources.get("port", _DEFAULT_SOURCE)
    drafts: list[_HostDraft] = []
    for given_host, hostaddr, port in zip(hosts, hostaddrs, ports, strict=True):
        host, this_host_source = given_host, host_source
        if hostaddr:
            kind = HostType.ADDRESS
        elif host:
            kind = HostType.UNIX_SOCKET if _is_unix_socket_path(host) else HostType.NAME
        else:
            host = env.socket_dir
            kind = HostType.UNIX_SOCKET
            this_host_source = Source(SourceKind.DERIVED, detail="default socket directory")
        this_port_source = port_source if port else _DEFAULT_SOURCE
        drafts.append(
            _HostDraft(
                kind, host or None, hostaddr or None, port, this_host_source, this_port_source
            )
        )
    return drafts


@dataclass(slots=True)
class _HostDraft:
    type: HostType
    host: str | None
    hostaddr: str | None
    port: str
    host_source: Source
    port_source: Source


def _passwords(
    drafts: list[_HostDraft],
    values: dict[str, str | None],
    sources: dict[str, Source],
    env: Environment,
    files: list[tuple[str, FileSignature]],
) -> tuple[HostParams, ...]:
    """Attach to each host the password it would get, and finish its entry."""
    password = values.get("password") or None
    password_source = sources.get("password") if password is not None else None
    passfile: str | None = None
    if password is None:
        passfile = values.get("passfile") or None
        if passfile is None and env.home is not None:
            passfile = values["passfile"] = f"{env.home}/.pgpass"
            sources["passfile"] = Source(SourceKind.DERIVED, detail="~/.pgpass")
        if passfile is not None:
            sig = file_signature(passfile)
            if sig is not None and password_file_refusal(passfile, sig[0]) is not None:
                sig = _WARNED  # password_from_file warns about it: not cached
            files.append((passfile, sig))
    dbname = values.get("dbname") or ""
    user = values.get("user") or ""
    result = []
    for d in drafts:
        host_password, host_password_source = password, password_source
        if passfile is not None:
            lookup_host = d.host or d.hostaddr or ""
            if not lookup_host or lookup_host == env.socket_dir:
                lookup_host = "localhost"
            found = password_from_file(
                passfile,
                hostname=lookup_host,
                port=d.port or str(DEFAULT_PORT),
                dbname=dbname,
                user=user,
            )
            if found is not None:
                host_password = found.password
                host_password_source = Source(
                    SourceKind.PASSWORD_FILE, path=found.path, line=found.line
                )
        port, error = _parse_port(d.port)
        result.append(
            HostParams(
                type=d.type,
                host=d.host,
                hostaddr=d.hostaddr,
                port=port,
                password=host_password,
                password_source=host_password_source,
                host_source=d.host_source,
                port_source=d.port_source,
                error=error,
            )
        )
    return tuple(result)


def _parse_port(port: str) -> tuple[int, str | None]:
    if not port:
        return DEFAULT_PORT, None
    number = _parse_int(port, "port")
    if not 1 <= number <= 65535:
        return number, f'invalid port number: "{port}"'
    return number, None


_INT_RE: Final = re.compile(r"[ \t\n\x0b\x0c\r]*([+-]?[0-9]+)[ \t\n\x0b\x0c\r]*")
_INT_MIN: Final = -(2**31)
_INT_MAX: Final = 2**31 - 1


def _parse_int(value: str, keyword: str) -> int:
    """libpq's ``pqParseIntParam``: a C int, surrounding whitespace allowed."""
    m = _INT_RE.fullmatch(value)
    if m is not None:
        number = int(m.group(1))
        if _INT_MIN <= number <= _INT_MAX:
            return number
    raise ConninfoError(
        f'invalid integer value "{value}" for connection option "{keyword}"', keyword=keyword
    )


def _int_option(values: Mapping[str, str | None], keyword: str) -> int | None:
    value = values.get(keyword)
    return None if value is None else _parse_int(value, keyword)


def _non_negative(value: int | None) -> int | None:
    return None if value is None else max(value, 0)


def _connect_timeout(values: Mapping[str, str | None]) -> int | None:
    """Seconds to allow each address; None means no limit.

    The seed document's rule: zero, negative or unset means wait forever, and
    the minimum is 2 seconds, so 1 is treated as 2.
    """
    timeout = _int_option(values, "connect_timeout")
    if timeout is None or timeout <= 0:
        return None
    return max(timeout, 2)


# require_auth: the request codes each method toggles (fe-connect.c).
_AUTH_REQ_PASSWORD: Final = 3
_AUTH_REQ_MD5: Final = 5
_AUTH_REQ_GSS: Final = 7
_AUTH_REQ_GSS_CONT: Final = 8
_AUTH_REQ_SSPI: Final = 9
_AUTH_REQ_SASL_CODES: Final = frozenset({10, 11, 12})
_AUTH_METHOD_BITS: Final[dict[str, frozenset[int]]] = {
    "password": frozenset({_AUTH_REQ_PASSWORD}),
    "md5": frozenset({_AUTH_REQ_MD5}),
    "gss": frozenset({_AUTH_REQ_GSS, _AUTH_REQ_GSS_CONT}),
    "sspi": frozenset({_AUTH_REQ_SSPI, _AUTH_REQ_GSS_CONT}),
}
_AUTH_SASL_METHODS: Final[dict[str, str]] = {
    "scram-sha-256": "SCRAM-SHA-256",
    "oauth": "OAUTHBEARER",
}
_ALL_REQUESTS: Final = frozenset(
    {_AUTH_REQ_PASSWORD, _AUTH_REQ_MD5, _AUTH_REQ_GSS, _AUTH_REQ_GSS_CONT, _AUTH_REQ_SSPI}
)


def _parse_require_auth(value: str | None) -> AuthRequirement | None:
    """Parse ``require_auth`` with libpq's grammar and error messages."""
    if not value:
        return None
    requests: set[int] = set()
    mechanisms: set[str] = set()
    auth_required = True
    negated = False
    for index, part in enumerate(_split(value)):
        method = part
        if method.startswith("!"):
            if index == 0:
                # A negative list: start from everything allowed.
                auth_required = False
                requests = set(_ALL_REQUESTS)
                mechanisms = set(_AUTH_SASL_METHODS.values())
            elif not negated:
                raise ConninfoError(
                    f'negative require_auth method "{method}" cannot be mixed with '
                    "non-negative methods",
                    keyword="require_auth",
                )
            negated = True
            method = method[1:]
        elif negated:
            raise ConninfoError(
                f'require_auth method "{method}" cannot be mixed with negative methods',
                keyword="require_auth",
            )
        duplicate = False
        if method == "none":
            # "none" allows, "!none" forbids, a connection with no exchange.
            duplicate = auth_required is negated
            auth_required = negated
        elif method in _AUTH_SASL_METHODS:
            mechanism = _AUTH_SASL_METHODS[method]
            duplicate = (mechanism in mechanisms) is not negated
            if negated:
                mechanisms.discard(mechanism)
            else:
                mechanisms.add(mechanism)
        elif method in _AUTH_METHOD_BITS:
            bits = _AUTH_METHOD_BITS[method]
            if negated:
                duplicate = not (requests & bits)
                requests -= bits
            else:
                duplicate = bits <= requests
                requests |= bits
        else:
            raise ConninfoError(f'invalid require_auth value: "{method}"', keyword="require_auth")
        if duplicate:
            raise ConninfoError(
                f'require_auth method "{part}" is specified more than once',
                keyword="require_auth",
            )
    if mechanisms:
        requests |= _AUTH_REQ_SASL_CODES
    return AuthRequirement(frozenset(requests), frozenset(mechanisms), auth_required)


_TLS_VERSIONS: Final = ("tlsv1", "tlsv1.1", "tlsv1.2", "tlsv1.3")


def _check_tls_versions(values: Mapping[str, str | None]) -> None:
    for keyword in ("ssl_min_protocol_version", "ssl_max_protocol_version"):
        value = values.get(keyword)
        if value and value.lower() not in _TLS_VERSIONS:
            raise ConninfoError(f'invalid "{keyword}" value: "{value}"', keyword=keyword)
    low = (values.get("ssl_min_protocol_version") or "").lower()
    high = (values.get("ssl_max_protocol_version") or "").lower()
    if low and high and low != "tlsv1" and (high == "tlsv1" or low > high):
        raise ConninfoError(
            "invalid SSL protocol version range", keyword="ssl_min_protocol_version"
        )


_PROTOCOL_VERSIONS: Final[dict[str, tuple[int, int]]] = {
    "3.0": (3, 0),
    "3.2": (3, 2),
    "latest": (3, 2),
}


def _protocol_versions(values: Mapping[str, str | None]) -> tuple[tuple[int, int], tuple[int, int]]:
    low_value = values.get("min_protocol_version")
    high_value = values.get("max_protocol_version")
    low = (3, 0) if low_value is None else _protocol_version(low_value, "min_protocol_version")
    if high_value is None:
        high = (3, 0) if low <= (3, 0) else _PROTOCOL_VERSIONS["latest"]
    else:
        high = _protocol_version(high_value, "max_protocol_version")
    if low > high:
        raise ConninfoError(
            '"min_protocol_version" is greater than "max_protocol_version"',
            keyword="min_protocol_version",
        )
    return low, high


def _protocol_version(value: str, keyword: str) -> tuple[int, int]:
    version = _PROTOCOL_VERSIONS.get(value)
    if version is None:
        raise ConninfoError(f'invalid {keyword} value: "{value}"', keyword=keyword)
    return version


def _scram_key(values: Mapping[str, str | None], which: str) -> bytes | None:
    value = values.get(f"scram_{which}_key")
    if value is None:
        return None
    key = _pg_b64_decode(value)
    if key is None:
        raise ConninfoError(f"invalid SCRAM {which} key", keyword=f"scram_{which}_key")
    if len(key) != KEY_LENGTH:
        raise ConninfoError(
            f"invalid SCRAM {which} key length: {len(key)}", keyword=f"scram_{which}_key"
        )
    return key


def _pg_b64_decode(text: str) -> bytes | None:
    """PostgreSQL 18's base64 decoder (src/common/base64.c); None when invalid."""
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError:
        return None
    return pg_b64decode(data)


# The server accepts a boolean (any unique prefix of true/false/yes/no, on,
# off, 1, 0; case-insensitive) or "database" for the replication option.
def _valid_replication(value: str) -> bool:
    if value == "database":
        return True
    v = value.lower()
    if not v:
        return False
    if v in ("1", "0", "on"):
        return True
    if len(v) >= 2 and "off".startswith(v):
        return True
    return any(word.startswith(v) for word in ("true", "false", "yes", "no"))
