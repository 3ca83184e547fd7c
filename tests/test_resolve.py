"""Parameter resolution: :func:`pgproto.resolve_params` against libpq.

The oracle is the libpq 18 bundled with psycopg's binary wheel, driven through
ctypes (:mod:`libpq_oracle`): ``PQconnectStartParams`` with the
keywords ``["dbname", *kwargs]`` and the values ``[conninfo or NULL,
*values]``, observed through ``PQstatus``, ``PQerrorMessage``,
``PQconninfo``, ``PQpass``, ``PQhost``, ``PQport``, ``PQuser`` and ``PQdb``.
Both sides read the same process environment: every test runs with the
``PG*`` variables cleared, ``HOME`` set to an empty temporary directory and
``PGSYSCONFDIR`` set to another, so that no real ``~/.pgpass`` or service
file can interfere.

Connections are always pointed at something that fails at once without DNS:
the default socket directory (``/var/run/postgresql``, absent here), Unix
sockets in missing directories, abstract socket names nobody listens on, or
``hostaddr=127.0.0.1`` (with ``port=1`` where the port does not matter).

Deliberate differences between pgproto and this libpq (asserted as such):

* the oracle is built with GSSAPI, pgproto behaves like a build without it:
  ``gssencmode=require`` is rejected at resolve time by pgproto only;
* pgproto validates at resolve time what libpq checks only later:
  ``connect_timeout``, ``keepalives*``, ``tcp_user_timeout`` (integer syntax),
  a port that is not an integer (libpq fails the attempt with the same
  message), and ``replication`` (checked by the server).
"""

from __future__ import annotations

import base64
import locale
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import libpq_oracle
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from libpq_oracle import CONNECTION_BAD, LibpqResult
from servers import drop_pg_environment

import pgproto
from pgproto import (
    ConninfoError,
    ConnParams,
    Environment,
    HostParams,
    HostType,
    PasswordFileWarning,
    Source,
    SourceKind,
    conninfo_defaults,
    resolve_params,
)

SECRET: Final = "s3cr3t-Pw"  # every password these tests use contains this
SOCKET_DIR: Final = "/var/run/postgresql"  # the oracle's and pgproto's default
A: Final = "/nonexistent/a"
B: Final = "/nonexistent/b"
C: Final = "/nonexistent/c"
OS_USER: Final = Environment.from_os().user

Value = str | int | None

_HYPOTHESIS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --------------------------------------------------------------------------
# the sandbox


@dataclass(frozen=True)
class Sandbox:
    home: Path
    sysconf: Path
    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    def setenv(self, name: str, value: str) -> None:
        self.monkeypatch.setenv(name, value)

    def service_file(self, text: str | bytes, path: Path | None = None) -> Path:
        """Write ~/.pg_service.conf (or *path*)."""
        path = self.home / ".pg_service.conf" if path is None else path
        data = text.encode() if isinstance(text, str) else text
        path.write_bytes(data)
        return path

    def pgpass(self, text: str | bytes, path: Path | None = None, mode: int = 0o600) -> Path:
        """Write ~/.pgpass (or *path*) with *mode*."""
        path = self.home / ".pgpass" if path is None else path
        data = text.encode() if isinstance(text, str) else text
        path.write_bytes(data)
        path.chmod(mode)
        return path


@pytest.fixture(autouse=True)
def sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Sandbox:
    drop_pg_environment(monkeypatch)
    home = tmp_path / "home"
    sysconf = tmp_path / "sysconf"
    home.mkdir()
    sysconf.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PGSYSCONFDIR", str(sysconf))
    return Sandbox(home, sysconf, tmp_path, monkeypatch)


# --------------------------------------------------------------------------
# the two sides


def _params(conninfo: str, kwargs: dict[str, Value]) -> list[tuple[str, str | None]]:
    return [
        ("dbname", conninfo or None),
        *((k, None if v is None else str(v)) for k, v in kwargs.items()),
    ]


def lib(conninfo: str = "", expand_dbname: bool = True, /, **kwargs: Value) -> LibpqResult:
    return libpq_oracle.connect_start(_params(conninfo, kwargs), expand_dbname=expand_dbname)


def _assert_no_secret(text: str) -> None:
    assert SECRET not in text, f"a password leaked: {text!r}"


def pg(conninfo: str = "", expand_dbname: bool = True, /, **kwargs: Value) -> ConnParams:
    params = resolve_params(
        conninfo, env=Environment.from_os(), expand_dbname=expand_dbname, **kwargs
    )
    _assert_no_secret(repr(params))
    for host in params.hosts:
        _assert_no_secret(repr(host))
    return params


def pg_error(conninfo: str = "", expand_dbname: bool = True, /, **kwargs: Value) -> str:
    with pytest.raises(ConninfoError) as info:
        resolve_params(conninfo, env=Environment.from_os(), expand_dbname=expand_dbname, **kwargs)
    message = str(info.value)
    _assert_no_secret(message)
    return message


def current_host(params: ConnParams, result: LibpqResult) -> int:
    """The host libpq's accessors describe after the first PQconnectPoll.

    Unix sockets fail at once and libpq moves on; when every host failed it
    stays on the last one.  A TCP attempt to 127.0.0.1 is still in progress.
    """
    if result.status == CONNECTION_BAD:
        return len(params.hosts) - 1
    for i, host in enumerate(params.hosts):
        if host.error is None and host.type is HostType.ADDRESS:
            return i
    raise AssertionError(f"cannot tell libpq's current host: {params.hosts} {result}")


def assert_agree(params: ConnParams, result: LibpqResult) -> None:
    """pgproto's accepted parameters say what libpq's PGconn says."""
    detail = f"\nlibpq:   {result}\npgproto: {params.as_dict()}\nhosts:   {params.hosts}"
    assert result.option_error is None, detail
    assert params.as_dict() == result.conninfo, detail
    i = current_host(params, result)
    host = params.hosts[i]
    assert result.password == (host.password if host.password is not None else ""), detail
    assert result.host == (host.host or host.hostaddr or ""), detail
    if host.error is None:
        assert result.port is not None
        assert int(result.port) == host.port, detail
    assert result.user == params["user"], detail
    assert result.dbname == params["dbname"], detail
    # Hosts skipped for a bad port: libpq says so, once per host it tried.
    lines = result.message.splitlines()
    tried = params.hosts[: i + 1]
    assert [h.error for h in tried if h.error] == [
        line for line in lines if line.startswith("invalid port number")
    ], detail


def check(conninfo: str = "", expand_dbname: bool = True, /, **kwargs: Value) -> ConnParams:
    """Both accept, with the same values; pgproto's result is returned."""
    result = lib(conninfo, expand_dbname, **kwargs)
    assert result.option_error is None, f"libpq rejects: {result.option_error}"
    params = pg(conninfo, expand_dbname, **kwargs)
    assert_agree(params, result)
    return params


def check_error(conninfo: str = "", expand_dbname: bool = True, /, **kwargs: Value) -> str:
    """Both reject, with the same message; the message is returned."""
    result = lib(conninfo, expand_dbname, **kwargs)
    assert result.option_error is not None, f"libpq accepts: {result}"
    message = pg_error(conninfo, expand_dbname, **kwargs)
    assert message == result.option_error
    return message


def check_same(conninfo: str = "", expand_dbname: bool = True, /, **kwargs: Value) -> None:
    """Whatever libpq does, pgproto does."""
    result = lib(conninfo, expand_dbname, **kwargs)
    if result.option_error is not None:
        message = pg_error(conninfo, expand_dbname, **kwargs)
        assert message == result.option_error, (conninfo, kwargs)
    else:
        assert_agree(pg(conninfo, expand_dbname, **kwargs), result)


# --------------------------------------------------------------------------
# the oracle itself


def test_oracle_sees_option_errors_and_values() -> None:
    bad = lib(sslmode="bogus")
    assert bad.status == CONNECTION_BAD
    assert bad.option_error == 'invalid sslmode value: "bogus"'
    good = lib(host=A, port="7")
    assert good.option_error is None
    assert good.message.startswith(f'connection to server on socket "{A}/.s.PGSQL.7" failed')
    assert good.conninfo["host"] == A
    assert good.port == "7"


# --------------------------------------------------------------------------
# keyword arrays: order, last wins, empty values, expand_dbname (P13, P14)


def test_defaults_only() -> None:
    params = check()
    assert params["host"] is None
    assert params["user"] == OS_USER
    assert params["dbname"] == OS_USER
    assert params["port"] == "5432"
    assert params["passfile"] == f"{os.environ['HOME']}/.pgpass"
    (host,) = params.hosts
    assert host == HostParams(
        type=HostType.UNIX_SOCKET,
        host=SOCKET_DIR,
        hostaddr=None,
        port=5432,
        password=None,
        password_source=None,
        host_source=Source(SourceKind.DERIVED, detail="default socket directory"),
        port_source=Source(SourceKind.DEFAULT),
    )


@pytest.mark.parametrize(
    ("conninfo", "kwargs", "expected"),
    [
        # keyword arguments after the string override it
        (f"host={A} port=1", {"port": "2"}, {"host": A, "port": "2"}),
        (f"postgresql://u@:1/db?host={A}", {"user": "v"}, {"host": A, "user": "v", "port": "1"}),
        # None and "" are skipped
        (f"host={A} port=1", {"port": None, "host": ""}, {"host": A, "port": "1"}),
        (f"host={A}", {"user": "", "dbname": None}, {"user": OS_USER, "dbname": OS_USER}),
        # an expanded dbname argument overrides the arguments before it ...
        ("", {"host": A, "port": "1", "dbname": f"host={B}"}, {"host": B, "port": "1"}),
        # ... and is overridden by those after it
        ("", {"dbname": f"host={B} port=3", "port": "4"}, {"host": B, "port": "4"}),
        ("", {"host": A, "dbname": "port=3 dbname=x", "user": "u"}, {"host": A, "dbname": "x"}),
        # an explicit empty value in the expanded string blanks an earlier one
        ("", {"host": A, "dbname": "host='' port=3"}, {"host": "", "port": "3"}),
        ("", {"user": "u", "dbname": "user='' port=3"}, {"user": OS_USER}),
        # the expanded string sets no dbname: the database stays unset
        ("", {"host": A, "dbname": "port=3"}, {"dbname": OS_USER}),
        # only the first dbname is expanded, later ones are plain names
        (f"host={A}", {"dbname": f"host={B}"}, {"host": A, "dbname": f"host={B}"}),
        (f"host={A}", {"dbname": "postgresql://x/y"}, {"dbname": "postgresql://x/y"}),
        # a first dbname that is not a connection string stops the search
        ("mydb", {"dbname": f"host={B}", "host": A}, {"host": A, "dbname": f"host={B}"}),
        ("mydb", {"host": A}, {"host": A, "dbname": "mydb"}),
        # the dbname inside an expanded string is never expanded again
        ("", {"dbname": f"dbname='host={B}' host={A}"}, {"host": A, "dbname": f"host={B}"}),
        (f"dbname='port=5' host={A}", {}, {"port": "5432", "dbname": "port=5"}),
        # aliases in the expanded string
        (f"host={A} requiressl=1", {}, {"sslmode": "require"}),
        (f"postgresql:///d?host={A}&ssl=true", {"sslmode": "disable"}, {"sslmode": "disable"}),
        # URIs are connection strings too
        (f"postgres:///db?host={A}", {}, {"host": A, "dbname": "db"}),
        ("postgresql://%2Fnonexistent%2Fa:9/d", {}, {"host": A, "port": "9", "dbname": "d"}),
        (
            "postgresql://%2Fnonexistent%2Fa:1,%2Fnonexistent%2Fb:2,:3/d",
            {},
            {"host": f"{A},{B},", "port": "1,2,3"},
        ),
        # a string with "=" anywhere is a connection string
        (f"  host = {A}  ", {}, {"host": A}),
    ],
)
def test_array_semantics(conninfo: str, kwargs: dict[str, Value], expected: dict[str, str]) -> None:
    params = check(conninfo, **kwargs)
    values = params.as_dict()
    for keyword, value in expected.items():
        assert values[keyword] == value, keyword


def test_expand_dbname_false() -> None:
    params = check(f"host={B}", False, host=A)
    assert params["dbname"] == f"host={B}"
    assert params["host"] == A
    assert params.source("dbname") == Source(SourceKind.CONNINFO)
    params = check("", False, host=A, dbname="postgresql:///x")
    assert params["dbname"] == "postgresql:///x"


def test_expanded_string_errors_abort() -> None:
    assert check_error("host='unterminated") == (
        "unterminated quoted string in connection info string"
    )
    assert check_error("postgresql://[::1").startswith("end of string reached")
    # the expansion is parsed before any argument is looked at
    assert check_error("", bogus="x", dbname="host='u") == (
        "unterminated quoted string in connection info string"
    )
    # even when a later argument would have replaced the bad value
    assert (
        check_error("", host=A, dbname="bogus=1", port="1") == 'invalid connection option "bogus"'
    )
    # a string given as a later dbname is never parsed, so never an error
    check(f"host={A}", dbname="host='unterminated")


def test_requiressl_is_not_a_keyword_argument() -> None:
    assert check_error(host=A, requiressl="1") == 'invalid connection option "requiressl"'
    # in a string it is the alias of sslmode
    assert check(f"host={A} requiressl=1")["sslmode"] == "require"
    assert check(f"host={A} requiressl=0")["sslmode"] == "prefer"


@pytest.mark.parametrize("value", ["x", "1", "  "])
def test_unknown_keyword_argument(value: str) -> None:
    assert check_error(host=A, bogus=value) == 'invalid connection option "bogus"'


@pytest.mark.parametrize("value", ["", None])
def test_unknown_keyword_argument_without_value_is_ignored(value: str | None) -> None:
    check(host=A, bogus=value)


def test_int_values_and_type_errors() -> None:
    params = pg(host=A, port=5433, connect_timeout=10)
    assert params["port"] == "5433"
    assert params.hosts[0].port == 5433
    assert params.connect_timeout == 10
    bad_values: list[object] = [True, 1.5, b"x", ["x"]]
    for bad in bad_values:
        with pytest.raises(TypeError):
            resolve_params(host=A, port=bad)  # type: ignore[arg-type]


def test_unknown_keyword_in_string_and_argument_order() -> None:
    # the expanded string is parsed first: its error wins over a bad argument
    assert check_error("foo=1", bar="x") == 'invalid connection option "foo"'
    # arguments are checked in order
    assert check_error(host=A, foo="1", bar="2") == 'invalid connection option "foo"'


# --------------------------------------------------------------------------
# service files (D5, D6)


SERVICE: Final = f"""\
# a comment before any group
garbage before the first group is ignored
[other]
host={C}
this line is not checked either
[svc]
host={A}
port=7
application_name=from service
"""


def test_service_keyword_uses_user_file(sandbox: Sandbox) -> None:
    path = sandbox.service_file(SERVICE)
    params = check(service="svc")
    assert params["host"] == A
    assert params["port"] == "7"
    assert params["service"] == "svc"
    assert params.source("host") == Source(
        SourceKind.SERVICE_FILE, path=str(path), section="svc", line=7
    )
    assert params.source("port") == Source(
        SourceKind.SERVICE_FILE, path=str(path), section="svc", line=8
    )
    assert str(params.source("port")) == f'service "svc" in {path}, line 8'
    assert params.source("service") == Source(SourceKind.KEYWORD, name="service")


def test_pgservice(sandbox: Sandbox) -> None:
    sandbox.service_file(SERVICE)
    sandbox.setenv("PGSERVICE", "svc")
    params = check()
    assert params["host"] == A
    assert params.source("service") == Source(SourceKind.ENVIRONMENT, name="PGSERVICE")
    # the service keyword beats PGSERVICE
    sandbox.service_file(SERVICE + f"[mine]\nhost={B}\n")
    assert check("service=mine")["host"] == B


def test_pgservicefile(sandbox: Sandbox) -> None:
    sandbox.service_file(f"[svc]\nhost={C}\n")  # ignored: PGSERVICEFILE wins
    path = sandbox.tmp / "services"
    sandbox.service_file(SERVICE, path)
    sandbox.setenv("PGSERVICEFILE", str(path))
    params = check(service="svc")
    assert params["host"] == A
    source = params.source("host")
    assert source is not None
    assert source.path == str(path)


def test_pgservicefile_missing(sandbox: Sandbox) -> None:
    missing = sandbox.tmp / "missing.conf"
    sandbox.setenv("PGSERVICEFILE", str(missing))
    sandbox.service_file(SERVICE, sandbox.sysconf / "pg_service.conf")
    assert check_error(service="svc") == f'service file "{missing}" not found'
    # no service, no error
    check(host=A)


def test_service_system_file_fallback(sandbox: Sandbox) -> None:
    system = sandbox.service_file(SERVICE, sandbox.sysconf / "pg_service.conf")
    # no user file at all
    params = check(service="svc")
    assert params["host"] == A
    source = params.source("host")
    assert source is not None
    assert source.path == str(system)
    # a user file without the group
    sandbox.service_file(f"[unrelated]\nhost={C}\n")
    assert check(service="svc")["host"] == A
    # a PGSERVICEFILE without the group
    path = sandbox.service_file(f"[unrelated]\nhost={C}\n", sandbox.tmp / "s.conf")
    sandbox.setenv("PGSERVICEFILE", str(path))
    assert check(service="svc")["host"] == A


def test_service_user_file_wins_over_system_file(sandbox: Sandbox) -> None:
    sandbox.service_file(
        "[svc]\nport=9\napplication_name=system\n", sandbox.sysconf / "pg_service.conf"
    )
    sandbox.service_file(f"[svc]\nhost={A}\n")
    params = check(service="svc")
    assert params["host"] == A
    assert params["port"] == "5432"  # the system file is not merged in
    assert params["application_name"] is None


@pytest.mark.parametrize("where", ["nowhere", "user", "system"])
def test_service_not_found(sandbox: Sandbox, where: str) -> None:
    if where == "user":
        sandbox.service_file(SERVICE)
    elif where == "system":
        sandbox.service_file(SERVICE, sandbox.sysconf / "pg_service.conf")
    assert check_error(service="nope") == 'definition of service "nope" not found'
    # group names are case-sensitive
    assert check_error(service="SVC") == 'definition of service "SVC" not found'


def test_service_empty_name(sandbox: Sandbox) -> None:
    sandbox.service_file(SERVICE)
    # set but empty: a service named "" is looked for
    sandbox.setenv("PGSERVICE", "")
    assert check_error() == 'definition of service "" not found'
    assert check_error("service=''") == 'definition of service "" not found'
    # an empty keyword argument is skipped, so PGSERVICE applies
    assert check_error(service="") == 'definition of service "" not found'
    sandbox.setenv("PGSERVICE", "svc")
    assert check(service="")["host"] == A


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("hostname", "syntax error"),
        (f"host = {A}", "syntax error"),
        (f"host ={A}", "syntax error"),
        ("bogus=1", "syntax error"),
        ("requiressl=1", "syntax error"),
        ("Host=x", "syntax error"),
        ("=x", "syntax error"),
        ("service=other", "nested service specifications not supported"),
    ],
)
def test_service_syntax_errors(sandbox: Sandbox, line: str, problem: str) -> None:
    path = sandbox.service_file(f"[svc]\nport=5\n\n{line}\nport=6\n")
    message = check_error(service="svc")
    if problem == "syntax error":
        assert message == f'syntax error in service file "{path}", line 4'
    else:
        assert message == f'{problem} in service file "{path}", line 4'


def test_service_syntax_error_in_system_file(sandbox: Sandbox) -> None:
    path = sandbox.service_file("[svc]\nnonsense\n", sandbox.sysconf / "pg_service.conf")
    assert check_error(service="svc") == f'syntax error in service file "{path}", line 2'


def test_service_syntax_not_checked_outside_group(sandbox: Sandbox) -> None:
    sandbox.service_file(f"nonsense\n[a]\nnonsense\n[svc]\nhost={A}\n[b]\nnonsense\nbogus=1\n")
    assert check(service="svc")["host"] == A


@pytest.mark.parametrize("length", [1021, 1022, 1023, 1024, 2000])
@pytest.mark.parametrize("newline", [True, False])
@pytest.mark.parametrize("in_group", [True, False])
def test_service_long_lines(sandbox: Sandbox, length: int, newline: bool, in_group: bool) -> None:
    """A line of 1023 bytes or more (newline included) is too long."""
    prefix = "application_name="
    line = prefix + "x" * (length - len(prefix) - int(newline)) + ("\n" if newline else "")
    assert len(line) == length
    if in_group:
        text = f"[svc]\nhost={A}\n{line}"
    else:
        text = f"[other]\n{line}{'' if newline else chr(10)}[svc]\nhost={A}\n"
    sandbox.service_file(text)
    check_same(service="svc")
    if length >= 1023:
        assert "too long" in pg_error(service="svc")


def test_service_whitespace_comments_and_values(sandbox: Sandbox) -> None:
    sandbox.service_file(
        "  [svc]  trailing text after the bracket\r\n"
        "   # an indented comment\n"
        "\t\n"
        f"   host={A}   \r\n"
        "application_name= spaced value \n"
        "options=-c a=b # not a comment\n"
        "port=7\n"
        "port=8\n"
        "[svc]\n"
        "port=9\n"
    )
    params = check(service="svc")
    assert params["host"] == A
    assert params["application_name"] == " spaced value"
    assert params["options"] == "-c a=b # not a comment"
    assert params["port"] == "7"  # first occurrence wins
    source = params.source("port")
    assert source is not None
    assert source.line == 7


def test_service_group_header_prefix(sandbox: Sandbox) -> None:
    sandbox.service_file(f"[svcx]\nhost={B}\n[svc]extra\nhost={A}\n")
    assert check(service="svc")["host"] == A
    sandbox.service_file(f"[svc\nhost={B}\n")
    check_error(service="svc")


def test_service_other_control_characters(sandbox: Sandbox) -> None:
    # vertical tab and form feed are whitespace only at the ends of a line
    sandbox.service_file(f"[svc]\x0b\napplication_name=a\x0bb\x0cc\x0c\nhost={A}\n")
    assert check(service="svc")["application_name"] == "a\x0bb\x0cc"


# libpq reads service files with fgets(): only \n ends a line.


def test_service_lone_cr_is_not_a_line_end(sandbox: Sandbox) -> None:
    # libpq sees one line "[svc]\rhost=...": the group, with no settings
    sandbox.service_file(f"[svc]\rhost={A}\r")
    params = check(service="svc")
    assert params["host"] is None


def test_service_cr_inside_value(sandbox: Sandbox) -> None:
    # libpq: application_name is "a\rb"; pgproto: syntax error, line 3
    sandbox.service_file(f"[svc]\napplication_name=a\rb\nhost={A}\n")
    assert check(service="svc")["application_name"] == "a\rb"


# libpq fopen()s a directory successfully, reads no group from it and goes on
# to the system file.


def test_service_user_file_is_a_directory(sandbox: Sandbox) -> None:
    (sandbox.home / ".pg_service.conf").mkdir()
    sandbox.service_file(f"[svc]\nhost={A}\n", sandbox.sysconf / "pg_service.conf")
    assert check(service="svc")["host"] == A


def test_pgservicefile_is_a_directory(sandbox: Sandbox) -> None:
    sandbox.setenv("PGSERVICEFILE", str(sandbox.tmp))
    sandbox.service_file(f"[svc]\nhost={A}\n", sandbox.sysconf / "pg_service.conf")
    assert check(service="svc")["host"] == A


def test_pgservicefile_and_pgsysconfdir_empty(sandbox: Sandbox) -> None:
    sandbox.setenv("PGSYSCONFDIR", "")
    assert check_error(service="svc") == 'definition of service "svc" not found'
    sandbox.setenv("PGSERVICEFILE", "")
    assert check_error(service="svc") == 'service file "" not found'


def test_service_nul_byte(sandbox: Sandbox) -> None:
    sandbox.service_file(f"[svc]\napplication_name=a\x00b\nhost={A}\n")
    assert check(service="svc")["application_name"] == "a"


def test_service_empty_value_blocks_environment(sandbox: Sandbox) -> None:
    sandbox.service_file("[svc]\napplication_name=\n")
    sandbox.setenv("PGAPPNAME", "from env")
    params = check(service="svc")
    assert params["application_name"] == ""


def test_service_precedence(sandbox: Sandbox) -> None:
    sandbox.service_file(f"[svc]\nhost={A}\nport=7\napplication_name=svc\n")
    sandbox.setenv("PGHOST", B)
    sandbox.setenv("PGPORT", "8")
    sandbox.setenv("PGUSER", "envuser")
    # service beats the environment
    params = check(service="svc")
    assert (params["host"], params["port"], params["user"]) == (A, "7", "envuser")
    assert params.source("user") == Source(SourceKind.ENVIRONMENT, name="PGUSER")
    # the string and the arguments beat the service
    params = check(f"service=svc host={C}", port="9")
    assert (params["host"], params["port"], params["application_name"]) == (C, "9", "svc")
    assert params.source("host") == Source(SourceKind.CONNINFO)
    assert params.source("port") == Source(SourceKind.KEYWORD, name="port")


def test_service_from_expanded_dbname(sandbox: Sandbox) -> None:
    sandbox.service_file(SERVICE)
    assert check("", dbname="service=svc")["host"] == A
    assert check("postgresql:///db?service=svc")["port"] == "7"


# --------------------------------------------------------------------------
# environment variables (D1, D2, D3, D4)


ENV_VALUES: Final[dict[str, str]] = {
    "PGUSER": "envuser",
    "PGPASSWORD": SECRET,
    "PGPASSFILE": "/nonexistent/pgpass",
    "PGCHANNELBINDING": "require",
    "PGCONNECT_TIMEOUT": "10",
    "PGDATABASE": "envdb",
    "PGHOST": A,
    "PGHOSTADDR": "127.0.0.1",
    "PGPORT": "1",
    "PGCLIENTENCODING": "LATIN1",
    "PGOPTIONS": "-c geqo=off",
    "PGAPPNAME": "envapp",
    "PGSSLMODE": "verify-ca",
    "PGSSLNEGOTIATION": "postgres",
    "PGSSLCOMPRESSION": "1",
    "PGSSLCERT": "/nonexistent/cert",
    "PGSSLKEY": "/nonexistent/key",
    "PGSSLCERTMODE": "disable",
    "PGSSLROOTCERT": "/nonexistent/root",
    "PGSSLCRL": "/nonexistent/crl",
    "PGSSLCRLDIR": "/nonexistent/crldir",
    "PGSSLSNI": "0",
    "PGREQUIREPEER": "postgres",
    "PGREQUIREAUTH": "scram-sha-256",
    "PGMINPROTOCOLVERSION": "3.2",
    "PGMAXPROTOCOLVERSION": "latest",
    "PGSSLMINPROTOCOLVERSION": "TLSv1.3",
    "PGSSLMAXPROTOCOLVERSION": "TLSv1.3",
    "PGGSSENCMODE": "prefer",
    "PGKRBSRVNAME": "kerberos",
    "PGGSSLIB": "gssapi",
    "PGGSSDELEGATION": "1",
    "PGTARGETSESSIONATTRS": "read-write",
    "PGLOADBALANCEHOSTS": "random",
}


def _envvars() -> list[tuple[str, str]]:
    return [(o.envvar, o.keyword) for o in conninfo_defaults() if o.envvar is not None]


def test_every_environment_variable_is_listed() -> None:
    assert {e for e, _ in _envvars()} == set(ENV_VALUES) | {"PGSERVICE"}


@pytest.mark.parametrize(("envvar", "keyword"), [e for e in _envvars() if e[0] != "PGSERVICE"])
def test_environment_variable(sandbox: Sandbox, envvar: str, keyword: str) -> None:
    sandbox.setenv(envvar, ENV_VALUES[envvar])
    params = check()
    assert params[keyword] == ENV_VALUES[envvar]
    assert params.source(keyword) == Source(SourceKind.ENVIRONMENT, name=envvar)
    assert str(params.source(keyword)) == f"environment variable {envvar}"
    # an explicit value, even an empty one in a string, hides the variable
    if keyword != "connect_timeout":  # "" is checked by pgproto only
        check_same(f"{keyword}=''")
        try:
            params = pg(f"{keyword}=''")
        except ConninfoError:
            return
        source = params.source(keyword)
        assert source is not None
        assert source.kind is not SourceKind.ENVIRONMENT


@pytest.mark.parametrize(("envvar", "keyword"), [e for e in _envvars() if e[0] != "PGSERVICE"])
def test_environment_variable_set_but_empty(sandbox: Sandbox, envvar: str, keyword: str) -> None:
    """An empty variable counts as set: it supplies the empty string."""
    sandbox.setenv(envvar, "")
    result = lib()
    if envvar == "PGCONNECT_TIMEOUT":
        # libpq checks connect_timeout only in its blocking path; pgproto now
        assert result.option_error is None
        assert pg_error() == 'invalid integer value "" for connection option "connect_timeout"'
        return
    check_same()
    if result.option_error is None:
        assert result.conninfo[keyword] in ("", OS_USER, f"{os.environ['HOME']}/.pgpass")


@pytest.mark.parametrize(
    ("envvar", "message"),
    [
        ("PGSSLMODE", 'invalid sslmode value: ""'),
        ("PGCHANNELBINDING", 'invalid channel_binding value: ""'),
        ("PGSSLCERTMODE", 'invalid sslcertmode value: ""'),
        ("PGGSSENCMODE", 'invalid gssencmode value: ""'),
        ("PGTARGETSESSIONATTRS", 'invalid target_session_attrs value: ""'),
        ("PGLOADBALANCEHOSTS", 'invalid load_balance_hosts value: ""'),
        ("PGSSLNEGOTIATION", 'invalid sslnegotiation value: ""'),
        ("PGMINPROTOCOLVERSION", 'invalid min_protocol_version value: ""'),
        ("PGMAXPROTOCOLVERSION", 'invalid max_protocol_version value: ""'),
    ],
)
def test_empty_environment_enum_is_invalid(sandbox: Sandbox, envvar: str, message: str) -> None:
    sandbox.setenv(envvar, "")
    assert check_error() == message


def test_empty_environment_defaults(sandbox: Sandbox) -> None:
    for name in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSFILE", "PGHOSTADDR"):
        sandbox.setenv(name, "")
    params = check()
    assert params["host"] == ""
    assert params.hosts[0].host == SOCKET_DIR
    assert params.hosts[0].port == 5432
    assert params["user"] == OS_USER
    assert params["dbname"] == OS_USER
    assert params["passfile"] == f"{sandbox.home}/.pgpass"
    sandbox.setenv("PGSSLMINPROTOCOLVERSION", "")
    assert check()["ssl_min_protocol_version"] == ""


@pytest.mark.parametrize(
    ("requiressl", "sslmode", "expected"),
    [
        ("1", None, "require"),
        ("1xyz", None, "require"),
        ("0", None, "prefer"),
        ("", None, "prefer"),
        ("yes", None, "prefer"),
        ("1", "disable", "disable"),
        ("0", "verify-full", "verify-full"),
    ],
)
def test_pgrequiressl(
    sandbox: Sandbox, requiressl: str, sslmode: str | None, expected: str
) -> None:
    sandbox.setenv("PGREQUIRESSL", requiressl)
    if sslmode is not None:
        sandbox.setenv("PGSSLMODE", sslmode)
    params = check()
    assert params["sslmode"] == expected
    source = params.source("sslmode")
    assert source is not None
    if sslmode is not None:
        assert source == Source(SourceKind.ENVIRONMENT, name="PGSSLMODE")
    elif expected == "require":
        assert source == Source(SourceKind.ENVIRONMENT, name="PGREQUIRESSL")
    else:
        assert source == Source(SourceKind.DEFAULT)
    # an explicit sslmode beats both
    assert check(sslmode="allow")["sslmode"] == "allow"


def test_sslrootcert_system_raises_default_sslmode(sandbox: Sandbox) -> None:
    params = check(sslrootcert="system")
    assert params["sslmode"] == "verify-full"
    assert params.source("sslmode") == Source(SourceKind.DERIVED, detail="sslrootcert=system")
    sandbox.setenv("PGSSLROOTCERT", "system")
    assert check()["sslmode"] == "verify-full"
    assert check(sslmode="verify-full")["sslmode"] == "verify-full"
    # only the exact lower-case word
    assert check(sslrootcert="System")["sslmode"] == "prefer"


@pytest.mark.parametrize("sslmode", ["disable", "allow", "prefer", "require", "verify-ca"])
def test_sslrootcert_system_rejects_weaker_modes(sandbox: Sandbox, sslmode: str) -> None:
    expected = (
        f'weak sslmode "{sslmode}" may not be used with sslrootcert=system (use "verify-full")'
    )
    assert check_error(sslrootcert="system", sslmode=sslmode) == expected
    sandbox.setenv("PGSSLMODE", sslmode)
    assert check_error(sslrootcert="system") == expected


def test_sslrootcert_system_with_pgrequiressl(sandbox: Sandbox) -> None:
    # PGREQUIRESSL is not the compiled default: the mode is not raised
    sandbox.setenv("PGREQUIRESSL", "1")
    assert check_error(sslrootcert="system") == (
        'weak sslmode "require" may not be used with sslrootcert=system (use "verify-full")'
    )


def test_sslrootcert_system_from_service(sandbox: Sandbox) -> None:
    sandbox.service_file("[svc]\nsslrootcert=system\n")
    assert check(service="svc")["sslmode"] == "verify-full"
    sandbox.service_file("[svc]\nsslrootcert=system\nsslmode=require\n")
    check_error(service="svc")


# --------------------------------------------------------------------------
# derived defaults (D8-D12)


def test_derived_user_and_dbname(sandbox: Sandbox) -> None:
    params = check(host=A)
    assert params["user"] == OS_USER
    assert params.source("user") == Source(SourceKind.DERIVED, detail="operating-system user")
    assert params.source("dbname") == Source(SourceKind.DERIVED, detail="same as user")
    sandbox.setenv("PGUSER", "alice")
    params = check(host=A)
    assert params["dbname"] == "alice"
    params = check(host=A, user="bob")
    assert params["dbname"] == "bob"
    # $USER and $LOGNAME do not matter
    sandbox.setenv("USER", "mallory")
    sandbox.setenv("LOGNAME", "mallory")
    sandbox.monkeypatch.delenv("PGUSER")
    assert check(host=A)["user"] == OS_USER


def test_unknown_os_user() -> None:
    env = Environment(environ={}, home="/nonexistent/home", user=None, uid=12345)
    with pytest.raises(ConninfoError) as info:
        resolve_params(env=env)
    assert str(info.value) == "local user with ID 12345 does not exist"
    # an explicit user needs no lookup
    params = resolve_params(env=env, user="u")
    assert params["dbname"] == "u"
    # PQconndefaults leaves the user unset
    defaults = {o.keyword: o.val for o in conninfo_defaults(env=env)}
    assert defaults["user"] is None


def test_default_port_and_host(sandbox: Sandbox) -> None:
    params = check()
    assert params.source("port") == Source(SourceKind.DEFAULT)
    assert params.hosts[0].port_source == Source(SourceKind.DEFAULT)
    # the compiled socket directory is the injected one
    env = Environment(environ={}, home=None, user="u", socket_dir="/tmp")
    params = resolve_params(env=env)
    assert params.hosts[0].host == "/tmp"
    assert params.hosts[0].type is HostType.UNIX_SOCKET


def test_passfile_default_and_home(sandbox: Sandbox) -> None:
    params = check()
    assert params["passfile"] == f"{sandbox.home}/.pgpass"
    assert params.source("passfile") == Source(SourceKind.DERIVED, detail="~/.pgpass")
    # $HOME empty or unset: the password database's home directory
    sandbox.setenv("HOME", "")
    check()
    sandbox.monkeypatch.delenv("HOME")
    check()
    # no home at all: no password file
    params = resolve_params(env=Environment(environ={}, home=None, user="u"))
    assert params["passfile"] is None


def test_home_is_used_for_service_file() -> None:
    env = Environment(environ={"PGSERVICE": "svc"}, home=None, user="u", sysconfdir="/nonexistent")
    with pytest.raises(ConninfoError, match='definition of service "svc" not found'):
        resolve_params(env=env)


def test_compiled_sysconfdir(tmp_path: Path) -> None:
    (tmp_path / "pg_service.conf").write_text(f"[svc]\nhost={A}\n")
    env = Environment(environ={"PGSERVICE": "svc"}, home=None, user="u", sysconfdir=str(tmp_path))
    assert resolve_params(env=env)["host"] == A
    env = Environment(
        environ={"PGSERVICE": "svc", "PGSYSCONFDIR": "/nonexistent"},
        home=None,
        user="u",
        sysconfdir=str(tmp_path),
    )
    with pytest.raises(ConninfoError, match="not found"):
        resolve_params(env=env)


def test_client_encoding_auto(sandbox: Sandbox) -> None:
    params = check(client_encoding="auto")
    assert params["client_encoding"] == Environment.from_os().client_encoding
    assert params.source("client_encoding") == Source(
        SourceKind.DERIVED, detail="client_encoding=auto"
    )
    # only the exact lower-case word
    assert check(client_encoding="AUTO")["client_encoding"] == "AUTO"
    env = Environment(environ={}, home=None, user="u", client_encoding="LATIN9")
    assert resolve_params(env=env, client_encoding="auto")["client_encoding"] == "LATIN9"


def test_sslcertmode_default() -> None:
    params = check()
    assert params["sslcertmode"] == "allow"
    assert params.source("sslcertmode") == Source(SourceKind.DERIVED, detail="libpq default")


# --------------------------------------------------------------------------
# enumerations (D13, D14)


ENUMS: Final[dict[str, tuple[str, ...]]] = {
    "channel_binding": ("disable", "prefer", "require"),
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "sslnegotiation": ("postgres", "direct"),
    "sslcertmode": ("disable", "allow", "require"),
    "gssencmode": ("disable", "prefer", "require"),
    "target_session_attrs": (
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ),
    "load_balance_hosts": ("disable", "random"),
    "min_protocol_version": ("3.0", "3.2", "latest"),
    "max_protocol_version": ("3.0", "3.2", "latest"),
}


@pytest.mark.parametrize(
    ("keyword", "value"), [(k, v) for k, values in ENUMS.items() for v in values]
)
def test_enum_valid(keyword: str, value: str) -> None:
    extra: dict[str, Value] = {}
    if keyword == "sslnegotiation" and value == "direct":
        extra["sslmode"] = "require"
    if keyword == "gssencmode" and value == "require":
        # deliberate: the oracle has GSSAPI, pgproto behaves as a build without
        assert lib(host=A, gssencmode="require").option_error is None
        assert pg_error(host=A, gssencmode="require") == (
            'gssencmode value "require" invalid when GSSAPI support is not compiled in'
        )
        return
    if keyword == "min_protocol_version" and value != "3.0":
        extra["max_protocol_version"] = "latest"
    params = check(host=A, **{keyword: value}, **extra)
    assert params[keyword] == value


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        (k, v)
        for k, values in ENUMS.items()
        for v in ("bogus", values[-1].upper(), f" {values[0]}", f"{values[0]} ", "'x'")
    ]
    + [
        ("min_protocol_version", "3.1"),
        ("max_protocol_version", "3.1"),
        ("min_protocol_version", "3"),
        ("max_protocol_version", "4.0"),
        ("min_protocol_version", "3.00"),
    ],
)
def test_enum_invalid(keyword: str, value: str) -> None:
    message = check_error(host=A, **{keyword: value})
    assert message == f'invalid {keyword} value: "{value}"'
    # an explicitly empty value in a string is invalid too
    assert check_error(f"{keyword}=''") == f'invalid {keyword} value: ""'


@pytest.mark.parametrize("sslmode", ["disable", "allow", "prefer"])
def test_sslnegotiation_direct_needs_strong_sslmode(sslmode: str) -> None:
    assert check_error(sslnegotiation="direct", sslmode=sslmode) == (
        f'weak sslmode "{sslmode}" may not be used with sslnegotiation=direct '
        '(use "require", "verify-ca", or "verify-full")'
    )
    check_error(sslnegotiation="direct")


@pytest.mark.parametrize(
    "settings_",
    [
        "sslmode=bad channel_binding=bad",
        "sslnegotiation=bad sslmode=bad",
        "sslcertmode=bad ssl_min_protocol_version=bad",
        "gssencmode=bad sslcertmode=bad",
        "target_session_attrs=bad gssencmode=bad",
        "scram_client_key=bad target_session_attrs=bad",
        "load_balance_hosts=bad scram_server_key=bad",
        "min_protocol_version=bad load_balance_hosts=bad",
        "require_auth=bad channel_binding=bad",
        "require_auth=bad port=1,2,3 host=a,b",
        "sslrootcert=system sslmode=allow ssl_max_protocol_version=bad",
        "sslnegotiation=direct sslrootcert=system",
        "ssl_min_protocol_version=bad ssl_max_protocol_version=bad",
        "min_protocol_version=bad max_protocol_version=bad",
        "scram_server_key=bad scram_client_key=bad",
        "sslmode=bad service=nope",
    ],
)
def test_first_fault_wins(settings_: str) -> None:
    check_same(settings_)


# --------------------------------------------------------------------------
# require_auth


@pytest.mark.parametrize(
    "value",
    [
        "password",
        "md5",
        "gss",
        "sspi",
        "scram-sha-256",
        "oauth",
        "none",
        "!none",
        "password,md5",
        "md5,scram-sha-256,none",
        "!password,!md5",
        "!gss,!sspi",
        "!scram-sha-256",
        "!oauth",
        "!scram-sha-256,!oauth",
        "gss,sspi",
        "sspi,gss",
        "scram-sha-256,oauth",
        "none,password",
        "!none,!password",
        # errors
        "password,!md5",
        "!password,md5",
        "none,!none",
        "!none,none",
        "password,password",
        "!password,!password",
        "none,none",
        "!none,!none",
        "gss,gss",
        "!sspi,!sspi",
        "scram-sha-256,scram-sha-256",
        "!scram-sha-256,!scram-sha-256",
        "oauth,oauth",
        "!oauth,!oauth",
        "bogus",
        "password,bogus",
        "!password,!bogus",
        "password,,md5",
        "password,",
        ",password",
        ",",
        "PASSWORD",
        " password",
        "password ",
        "!",
        "!!password",
        "scram-sha-256-plus",
        "SCRAM-SHA-256",
        "oauthbearer",
        "!gss,!gss",
        "gss,!gss",
    ],
)
def test_require_auth(value: str) -> None:
    check_same(host=A, require_auth=value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "password,!md5",
            'negative require_auth method "!md5" cannot be mixed with non-negative methods',
        ),
        ("!password,md5", 'require_auth method "md5" cannot be mixed with negative methods'),
        ("md5,md5", 'require_auth method "md5" is specified more than once'),
        ("!md5,!md5", 'require_auth method "!md5" is specified more than once'),
        ("none,none", 'require_auth method "none" is specified more than once'),
        ("password,,md5", 'invalid require_auth value: ""'),
        ("bogus", 'invalid require_auth value: "bogus"'),
    ],
)
def test_require_auth_messages(value: str, message: str) -> None:
    assert check_error(host=A, require_auth=value) == message


def test_require_auth_parsed() -> None:
    assert pg(require_auth="").require_auth is None
    assert pg().require_auth is None
    ra = pg(require_auth="password,scram-sha-256").require_auth
    assert ra is not None
    assert ra.requests == {3, 10, 11, 12}
    assert ra.sasl_mechanisms == {"SCRAM-SHA-256"}
    assert ra.auth_required
    ra = pg(require_auth="none,md5").require_auth
    assert ra is not None
    assert ra.requests == {5}
    assert not ra.auth_required
    ra = pg(require_auth="!gss,!scram-sha-256").require_auth
    assert ra is not None
    assert ra.requests == {3, 5, 9, 10, 11, 12}  # OAUTHBEARER keeps SASL allowed
    assert ra.sasl_mechanisms == {"OAUTHBEARER"}
    assert not ra.auth_required
    ra = pg(require_auth="!scram-sha-256,!oauth,!none").require_auth
    assert ra is not None
    assert ra.requests == {3, 5, 7, 8, 9}
    assert ra.sasl_mechanisms == frozenset()
    assert ra.auth_required
    ra = pg(require_auth="gss,sspi").require_auth
    assert ra is not None
    assert ra.requests == {7, 8, 9}


_METHODS: Final = ("password", "md5", "gss", "sspi", "scram-sha-256", "oauth", "none", "", "x")


@_HYPOTHESIS
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(_METHODS)), min_size=1, max_size=5))
def test_require_auth_random(parts: list[tuple[bool, str]]) -> None:
    value = ",".join(("!" if negated else "") + method for negated, method in parts)
    if value:
        check_same(host=A, require_auth=value)


# --------------------------------------------------------------------------
# TLS protocol versions (D15)


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("TLSv1", None),
        ("tlsv1.1", None),
        ("TLSV1.2", None),
        ("TlSv1.3", None),
        (None, "tlsv1"),
        (None, "TLSv1.3"),
        ("TLSv1.3", "TLSv1.2"),
        ("tlsv1.2", "TLSV1.2"),
        ("TLSv1", "TLSv1"),
        ("TLSv1", "TLSv1.3"),
        ("TLSv1.1", "TLSv1"),
        ("TLSv1.3", "tlsv1"),
        ("TLSv1.2", "TLSv1.3"),
        ("TLSv1.4", None),
        (None, "TLSv1.4"),
        ("SSLv3", None),
        ("TLSv1.2 ", None),
        ("", "TLSv1"),
        ("", ""),
        ("TLSv1.3", ""),
        ("bogus", "bogus"),
        ("TLSv1.3", "bogus"),
    ],
)
def test_ssl_protocol_versions(low: str | None, high: str | None) -> None:
    parts = [f"host={A}"]
    if low is not None:
        parts.append(f"ssl_min_protocol_version='{low}'")
    if high is not None:
        parts.append(f"ssl_max_protocol_version='{high}'")
    check_same(" ".join(parts))


def test_ssl_protocol_version_messages() -> None:
    assert check_error(ssl_min_protocol_version="TLSv1.4") == (
        'invalid "ssl_min_protocol_version" value: "TLSv1.4"'
    )
    assert check_error(ssl_max_protocol_version="x") == (
        'invalid "ssl_max_protocol_version" value: "x"'
    )
    assert check_error(ssl_min_protocol_version="TLSv1.3", ssl_max_protocol_version="TLSv1.2") == (
        "invalid SSL protocol version range"
    )
    # the TLSv1.2 default minimum applies to the range check too
    assert check_error(ssl_max_protocol_version="TLSv1.1") == "invalid SSL protocol version range"
    assert (
        check("ssl_min_protocol_version='' ssl_max_protocol_version=TLSv1.1")[
            "ssl_min_protocol_version"
        ]
        == ""
    )


# --------------------------------------------------------------------------
# wire protocol versions


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (None, None, ((3, 0), (3, 0))),
        ("3.0", None, ((3, 0), (3, 0))),
        ("3.2", None, ((3, 2), (3, 2))),
        ("latest", None, ((3, 2), (3, 2))),
        (None, "3.2", ((3, 0), (3, 2))),
        (None, "latest", ((3, 0), (3, 2))),
        ("3.0", "latest", ((3, 0), (3, 2))),
        ("latest", "3.2", ((3, 2), (3, 2))),
        ("3.2", "3.0", None),
        ("latest", "3.0", None),
        (None, "3.1", None),
        ("3.1", None, None),
    ],
)
def test_protocol_versions(
    low: str | None, high: str | None, expected: tuple[tuple[int, int], tuple[int, int]] | None
) -> None:
    kwargs: dict[str, Value] = {
        "host": A,
        "min_protocol_version": low,
        "max_protocol_version": high,
    }
    if expected is None:
        message = check_error(**kwargs)
        if low is not None and high is not None:
            assert message == '"min_protocol_version" is greater than "max_protocol_version"'
        return
    params = check(**kwargs)
    assert (params.min_protocol_version, params.max_protocol_version) == expected


# --------------------------------------------------------------------------
# SCRAM keys


KEY: Final = bytes(range(32))
_KEY64: Final = base64.b64encode(KEY).decode()


@pytest.mark.parametrize(
    "value",
    [
        _KEY64,
        base64.b64encode(KEY[:31]).decode(),
        base64.b64encode(KEY[:30]).decode(),
        base64.b64encode(KEY + b"x").decode(),
        _KEY64.rstrip("="),
        _KEY64 + "=",
        _KEY64 + "====",
        _KEY64 + "AAAA",
        "not base64!",
        "@" * 44,
        "AAAA=AAA",
        "AA==AA==",
        base64.urlsafe_b64encode(bytes([0xFB] * 32)).decode(),
        "A",
        "AB=C",
        "ABC=",
        "AB==",
        "=",
        "AAAA",
        " " + _KEY64,
        _KEY64 + "\n",
        _KEY64[:20] + " \t " + _KEY64[20:],
        " ",
        "\r",
    ],
)
@pytest.mark.parametrize("which", ["client", "server"])
def test_scram_keys(value: str, which: str) -> None:
    keyword = f"scram_{which}_key"
    result = lib(host=A, **{keyword: value})
    if result.option_error is None:
        params = pg(host=A, **{keyword: value})
        assert_agree(params, result)
        key = getattr(params, keyword)
        assert isinstance(key, bytes)
        assert len(key) == 32
        if value == _KEY64:
            assert key == KEY
    else:
        message = pg_error(host=A, **{keyword: value})
        assert message == result.option_error
        assert message.startswith(f"invalid SCRAM {which} key")


def test_scram_key_lengths() -> None:
    assert check_error(scram_client_key=base64.b64encode(b"abc").decode()) == (
        "invalid SCRAM client key length: 3"
    )
    assert check_error(scram_server_key="not-base64") == "invalid SCRAM server key"
    assert pg().scram_client_key is None


@_HYPOTHESIS
@given(st.binary(max_size=40), st.sampled_from(["", "=", "==", "A", "!"]), st.integers(0, 8))
def test_scram_key_random(data: bytes, suffix: str, cut: int) -> None:
    text = base64.b64encode(data).decode()
    text = text[: len(text) - cut] + suffix if cut else text + suffix
    check_same(host=A, scram_client_key=text)


# --------------------------------------------------------------------------
# integers (D16) and the options libpq checks later


INTEGERS: Final = [
    ("5432", 5432),
    (" 5432", 5432),
    ("5432 ", 5432),
    ("\t5432\n", 5432),
    ("+5432", 5432),
    ("-1", -1),
    ("0", 0),
    ("007", 7),
    ("2147483647", 2147483647),
    ("-2147483648", -2147483648),
    ("2147483648", None),
    ("-2147483649", None),
    ("99999999999999999999", None),
    ("5432x", None),
    ("5 432", None),
    ("0x10", None),
    ("1e3", None),
    ("+ 5", None),
    ("+-5", None),
    ("x", None),
    (" ", None),
    ("٣", None),
]


@pytest.mark.parametrize(("text", "number"), INTEGERS)
@pytest.mark.parametrize(
    "keyword",
    [
        "connect_timeout",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
    ],
)
def test_integer_options(keyword: str, text: str, number: int | None) -> None:
    # libpq checks these only when it uses them: it accepts anything here
    assert lib(host=A, **{keyword: text}).option_error is None
    if number is None:
        assert pg_error(host=A, **{keyword: text}) == (
            f'invalid integer value "{text}" for connection option "{keyword}"'
        )
        return
    params = pg(host=A, **{keyword: text})
    assert params[keyword] == text
    value = getattr(params, keyword)
    if keyword == "keepalives":
        assert value is (number != 0)
    elif keyword == "connect_timeout":
        assert value == (None if number <= 0 else max(number, 2))
    else:
        assert value == max(number, 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("0", None),
        ("-5", None),
        ("1", 2),
        ("2", 2),
        ("10", 10),
        (" 10 ", 10),
    ],
)
def test_connect_timeout(text: str | None, expected: int | None) -> None:
    assert pg(connect_timeout=text).connect_timeout == expected


def test_keepalive_defaults() -> None:
    params = pg()
    assert params.keepalives is True
    assert params.keepalives_idle is None
    assert params.keepalives_interval is None
    assert params.keepalives_count is None
    assert params.tcp_user_timeout is None
    assert params.connect_timeout is None


@pytest.mark.parametrize(("text", "number"), INTEGERS)
def test_port_integers(text: str, number: int | None) -> None:
    """A port is checked when the host is tried: libpq fails the attempt
    with the message pgproto raises at once; an int out of range skips the host."""
    result = lib(host=A, port=text)
    first = result.message.splitlines()[0]
    if number is None:
        assert result.option_error is None
        assert pg_error(host=A, port=text) == first
        return
    params = pg(host=A, port=text)
    assert_agree(params, result)
    assert params.hosts[0].port == number
    if 1 <= number <= 65535:
        assert params.hosts[0].error is None
        assert first.startswith(f'connection to server on socket "{A}/.s.PGSQL.{number}"')
    else:
        assert params.hosts[0].error == f'invalid port number: "{text}"'
        assert first == params.hosts[0].error


@_HYPOTHESIS
@given(st.text(alphabet=" \t+-0123456789x", max_size=8))
def test_port_random(text: str) -> None:
    if not text:
        return
    result = lib(host=A, port=text)
    first = result.message.splitlines()[0]
    if first.startswith("invalid integer value"):
        assert pg_error(host=A, port=text) == first
    else:
        assert_agree(pg(host=A, port=text), result)


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("database", True),
        ("true", True),
        ("t", True),
        ("TRUE", True),
        ("yes", True),
        ("y", True),
        ("on", True),
        ("of", True),
        ("off", True),
        ("false", True),
        ("n", True),
        ("1", True),
        ("0", True),
        ("o", False),
        ("Database", False),
        ("database ", False),
        ("2", False),
        ("bogus", False),
        ("truee", False),
        ("onn", False),
    ],
)
def test_replication(value: str, valid: bool) -> None:
    # libpq leaves the value to the server; pgproto checks it up front
    assert lib(host=A, replication=value).option_error is None
    if valid:
        assert pg(host=A, replication=value)["replication"] == value
    else:
        assert pg_error(host=A, replication=value) == f'invalid replication value: "{value}"'


# --------------------------------------------------------------------------
# host lists (section 4.1)


def test_host_list_ports() -> None:
    params = check(host=f"{A},{B}", port="1,2")
    assert [(h.host, h.port, h.type) for h in params.hosts] == [
        (A, 1, HostType.UNIX_SOCKET),
        (B, 2, HostType.UNIX_SOCKET),
    ]
    # one port for every host
    params = check(host=f"{A},{B},{C}", port="9")
    assert [h.port for h in params.hosts] == [9, 9, 9]
    # empty elements: the defaults
    params = check(host=f"{A},,{B}", port="1,,3")
    assert [(h.host, h.port) for h in params.hosts] == [(A, 1), (SOCKET_DIR, 5432), (B, 3)]
    assert params.hosts[1].host_source == Source(
        SourceKind.DERIVED, detail="default socket directory"
    )
    assert params.hosts[0].host_source == Source(SourceKind.KEYWORD, name="host")
    assert params.hosts[0].port_source == Source(SourceKind.KEYWORD, name="port")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host": f"{A},{B},{C}", "port": "1,2"}, "could not match 2 port numbers to 3 hosts"),
        ({"host": A, "port": "1,2"}, "could not match 2 port numbers to 1 hosts"),
        ({"port": "1,2"}, "could not match 2 port numbers to 1 hosts"),
        ({"host": f"{A},", "port": "1,2,3"}, "could not match 3 port numbers to 2 hosts"),
        (
            {"host": A, "hostaddr": "127.0.0.1,127.0.0.1", "port": "1"},
            "could not match 1 host names to 2 hostaddr values",
        ),
        (
            {"host": f"{A},{B},{C}", "hostaddr": "127.0.0.1,127.0.0.1", "port": "1"},
            "could not match 3 host names to 2 hostaddr values",
        ),
        (
            {"host": f"{A},{B}", "hostaddr": "127.0.0.1,127.0.0.1", "port": "1,2,3"},
            "could not match 3 port numbers to 2 hosts",
        ),
        (
            {"host": f"{A},{B},{C}", "hostaddr": "127.0.0.1,127.0.0.1", "port": "1,2,3"},
            "could not match 3 host names to 2 hostaddr values",
        ),
    ],
)
def test_host_list_count_errors(kwargs: dict[str, Value], message: str) -> None:
    assert check_error(**kwargs) == message


def test_hostaddr_entries() -> None:
    params = check(hostaddr="127.0.0.1", port="1")
    (host,) = params.hosts
    assert (host.type, host.host, host.hostaddr, host.port) == (
        HostType.ADDRESS,
        None,
        "127.0.0.1",
        1,
    )
    assert host.name == "127.0.0.1"
    params = check(host=f",{A}", hostaddr="127.0.0.1,", port="1")
    assert [(h.type, h.host, h.hostaddr) for h in params.hosts] == [
        (HostType.ADDRESS, None, "127.0.0.1"),
        (HostType.UNIX_SOCKET, A, None),
    ]
    params = check(host="db.invalid", hostaddr="127.0.0.1", port="1")
    assert params.hosts[0].type is HostType.ADDRESS
    assert params.hosts[0].host == "db.invalid"
    assert params.hosts[0].name == "127.0.0.1"


def test_abstract_and_unusual_hosts() -> None:
    params = check(host="@abstract,@other", port="1")
    assert [h.type for h in params.hosts] == [HostType.UNIX_SOCKET] * 2
    # no trimming: " /b" is a host name (not resolved here)
    params = pg(host=f"{A}, {B}")
    assert params.hosts[1].host == f" {B}"
    assert params.hosts[1].type is HostType.NAME
    params = pg(host="db.example.com,localhost")
    assert [h.type for h in params.hosts] == [HostType.NAME] * 2


def test_port_out_of_range_skips_one_host() -> None:
    params = check(host=f"{A},{B},{C}", port="70000,5,0")
    assert [h.error for h in params.hosts] == [
        'invalid port number: "70000"',
        None,
        'invalid port number: "0"',
    ]
    assert params.hosts[0].port == 70000
    params = check(host=f"{A},{B}", port="5,-3")
    assert params.hosts[1].error == 'invalid port number: "-3"'
    assert "error=" in repr(params.hosts[1])


def test_non_integer_port_in_list() -> None:
    # libpq fails the whole attempt when it reaches the bad port
    result = lib(host=f"{A},{B}", port="1,abc")
    assert result.option_error is None
    assert pg_error(host=f"{A},{B}", port="1,abc") == (
        'invalid integer value "abc" for connection option "port"'
    )
    assert result.message.splitlines()[-1] == (
        'invalid integer value "abc" for connection option "port"'
    )


_HOSTS: Final = ("", A, B, "@abs")
_ADDRS: Final = ("", "127.0.0.1")
_PORTS: Final = ("", "1", "5", "70000", "0")


@st.composite
def host_lists(draw: st.DrawFn) -> dict[str, Value]:
    n = draw(st.integers(1, 4))
    kwargs: dict[str, Value] = {}
    mode = draw(st.sampled_from(["host", "hostaddr", "both"]))
    hosts = [draw(st.sampled_from(_HOSTS)) for _ in range(n)]
    addrs = [draw(st.sampled_from(_ADDRS)) for _ in range(n)]
    if mode in ("hostaddr", "both"):
        kwargs["hostaddr"] = ",".join(addrs)
        if draw(st.booleans()):
            # a mismatch, sometimes
            hosts = hosts[: draw(st.integers(1, n))]
    if mode in ("host", "both"):
        kwargs["host"] = ",".join(hosts)
    ports = [draw(st.sampled_from(_PORTS)) for _ in range(draw(st.integers(0, n + 1)))]
    if ports:
        kwargs["port"] = ",".join(ports)
    return kwargs


@_HYPOTHESIS
@given(host_lists())
def test_host_lists_random(kwargs: dict[str, Value]) -> None:
    # TCP attempts to 127.0.0.1 only ever use port 1 (nothing listens there)
    result = lib(**kwargs)
    if result.option_error is not None:
        assert pg_error(**kwargs) == result.option_error
        return
    params = pg(**kwargs)
    try:
        current_host(params, result)
    except AssertionError:
        # a TCP entry with a good port was reached: nothing to predict
        return
    assert_agree(params, result)
    assert len(params.hosts) == max(
        len(str(kwargs.get("hostaddr") or kwargs.get("host") or "").split(",")), 1
    )


# --------------------------------------------------------------------------
# the password file (section 7.11)


def _pg_host_password(**kwargs: Value) -> str | None:
    return pg(**kwargs).hosts[0].password


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([f"*:*:*:*:{SECRET}"], SECRET),
        ([f"{A}:5432:{OS_USER}:{OS_USER}:{SECRET}"], SECRET),
        ([f"{A}:5433:*:*:{SECRET}"], None),
        ([f"{A}:*:otherdb:*:{SECRET}"], None),
        ([f"{A}:*:*:otheruser:{SECRET}"], None),
        ([f"{A.upper()}:*:*:*:{SECRET}"], None),  # case-sensitive
        ([f"*:*:*:*:{SECRET}:extra:fields"], SECRET),
        ([f"*:*:*:*:{SECRET}\\:x"], f"{SECRET}:x"),
        ([f"*:*:*:*:{SECRET}\\\\x"], f"{SECRET}\\x"),
        ([f"*:*:*:*:\\{SECRET}"], SECRET),
        ([f"*:*:*:*:{SECRET}\\"], f"{SECRET}\\"),
        (["*:*:*:*:"], ""),
        (["*:*:*:*"], None),
        (["*:*:*"], None),
        ([f"*:*:*:*:{SECRET}", "*:*:*:*:second"], SECRET),
        ([f"{B}:*:*:*:other", f"*:*:*:*:{SECRET}"], SECRET),
        (["#*:*:*:*:commented", f"*:*:*:*:{SECRET}"], SECRET),
        ([" #*:*:*:*:x", f"*:*:*:*:{SECRET}"], SECRET),
        (["", "", f"*:*:*:*:{SECRET}"], SECRET),
        ([f"*:*:*:*:{SECRET}\r"], SECRET),
        ([f"*:*:*:*:{SECRET}\r\r"], SECRET),
        (["**:*:*:*:x", f"*:*:*:*:{SECRET}"], SECRET),
        (["*x:*:*:*:x", f"*:*:*:*:{SECRET}"], SECRET),
        (["/nonexistent/*:*:*:*:x"], None),
        ([f"\\/nonexistent\\/a:*:*:*:{SECRET}"], SECRET),
        ([f"{A}\\:*:*:*:x"], None),
        ([f"{A}:5432\\:*:*:x"], None),
        ([f"{A}:\\5\\4\\3\\2:*:*:{SECRET}"], SECRET),
        (["\\*:*:*:*:x"], None),
        ([f"*:*:*:*:{SECRET}:", "*:*:*:*:no"], SECRET),
        ([f"*:*:*:*:a b {SECRET} "], f"a b {SECRET} "),
        ([f" *:*:*:*:{SECRET}"], None),
    ],
)
def test_password_file_lines(sandbox: Sandbox, lines: list[str], expected: str | None) -> None:
    sandbox.pgpass("\n".join(lines) + "\n")
    params = check(host=A)
    host = params.hosts[0]
    assert host.password == expected
    if expected is None:
        assert host.password_source is None
    else:
        assert host.password_source is not None
        assert host.password_source.kind is SourceKind.PASSWORD_FILE
        assert host.password_source.path == str(sandbox.home / ".pgpass")
    assert params["password"] is None  # PQconninfo never shows the file's password


def test_password_file_source_line(sandbox: Sandbox) -> None:
    path = sandbox.pgpass(f"# comment\n\n{B}:*:*:*:x\r\n*:*:*:*:{SECRET}\n")
    params = check(host=A)
    source = params.hosts[0].password_source
    assert source == Source(SourceKind.PASSWORD_FILE, path=str(path), line=4)
    assert str(source) == f"password file {path}, line 4"


def test_password_file_without_trailing_newline(sandbox: Sandbox) -> None:
    sandbox.pgpass(f"*:*:*:*:{SECRET}")
    assert check(host=A).hosts[0].password == SECRET


@pytest.mark.parametrize(
    ("kwargs", "line_host", "matches"),
    [
        ({}, "localhost", True),
        ({}, SOCKET_DIR, False),
        ({"host": SOCKET_DIR}, "localhost", True),
        ({"host": SOCKET_DIR + "/"}, "localhost", False),
        ({"host": SOCKET_DIR, "hostaddr": "127.0.0.1", "port": "1"}, "localhost", True),
        ({"host": "/tmp", "hostaddr": "127.0.0.1", "port": "1"}, "/tmp", True),
        ({"host": SOCKET_DIR + "/"}, SOCKET_DIR + "/", True),
        ({"host": A}, "localhost", False),
        ({"host": A}, A, True),
        ({"host": "@abs"}, "@abs", True),
        ({"host": "@a:b"}, "@a\\:b", True),
        ({"host": "@a\\b"}, "@a\\\\b", True),
        ({"host": "@a\\b"}, "@a\\b", False),
        ({"hostaddr": "127.0.0.1", "port": "1"}, "127.0.0.1", True),
        ({"hostaddr": "127.0.0.1", "port": "1"}, "localhost", False),
        ({"host": "db.invalid", "hostaddr": "127.0.0.1", "port": "1"}, "db.invalid", True),
        ({"host": "db.invalid", "hostaddr": "127.0.0.1", "port": "1"}, "127.0.0.1", False),
        ({"host": "localhost", "hostaddr": "127.0.0.1", "port": "1"}, "localhost", True),
        ({"host": ""}, "localhost", True),
        ({"host": f",{A}", "hostaddr": "127.0.0.1,", "port": "1"}, "127.0.0.1", True),
    ],
)
def test_password_file_host_key(
    sandbox: Sandbox, kwargs: dict[str, Value], line_host: str, matches: bool
) -> None:
    sandbox.pgpass(f"{line_host}:*:*:*:{SECRET}\n")
    params = check(**kwargs)
    assert (params.hosts[0].password == SECRET) is matches


@pytest.mark.parametrize(
    ("port", "line_port", "matches"),
    [
        (None, "5432", True),
        ("", "5432", True),
        ("5432", "5432", True),
        (" 5432", "5432", False),
        (" 5432", " 5432", True),
        ("+5432", "5432", False),
        ("05432", "05432", True),
        ("1", "5432", False),
    ],
)
def test_password_file_port_key(
    sandbox: Sandbox, port: str | None, line_port: str, matches: bool
) -> None:
    sandbox.pgpass(f"{A}:{line_port}:*:*:{SECRET}\n")
    params = check(host=A, port=port)
    assert (params.hosts[0].password == SECRET) is matches


def test_password_file_user_and_dbname_keys(sandbox: Sandbox) -> None:
    sandbox.pgpass(f"*:*:mydb:me:{SECRET}\n*:*:me:me:other\n")
    assert check(host=A, user="me", dbname="mydb").hosts[0].password == SECRET
    # dbname defaults to the user before the lookup
    assert check(host=A, user="me").hosts[0].password == "other"
    sandbox.setenv("PGDATABASE", "mydb")
    sandbox.setenv("PGUSER", "me")
    assert check(host=A).hosts[0].password == SECRET


def test_password_file_per_host(sandbox: Sandbox) -> None:
    sandbox.pgpass(f"{A}:*:*:*:pa-{SECRET}\n{B}:2:*:*:pb-{SECRET}\nlocalhost:*:*:*:pl-{SECRET}\n")
    hosts = f"{A},{B},,{C}"
    params = check(host=hosts, port="1,2,3,4")
    assert [h.password for h in params.hosts] == [
        f"pa-{SECRET}",
        f"pb-{SECRET}",
        f"pl-{SECRET}",
        None,
    ]
    # libpq reports the last host's password after failing them all: rotate
    for order in ([B, A], [A, B], [C, A, "", B], [C, ""]):
        check(host=",".join(order), port="2")
    # the same through hostaddr entries
    params = check(host=f"{A},{B}", hostaddr="127.0.0.1,127.0.0.1", port="1,2")
    assert [h.password for h in params.hosts] == [f"pa-{SECRET}", f"pb-{SECRET}"]


def test_explicit_password_beats_file(sandbox: Sandbox) -> None:
    sandbox.pgpass(f"*:*:*:*:file-{SECRET}\n")
    params = check(host=f"{A},{B}", password=f"explicit-{SECRET}")
    assert [h.password for h in params.hosts] == [f"explicit-{SECRET}"] * 2
    assert params.hosts[0].password_source == Source(SourceKind.KEYWORD, name="password")
    assert params["passfile"] is None  # not even looked for
    sandbox.setenv("PGPASSWORD", f"env-{SECRET}")
    params = check(host=A)
    assert params.hosts[0].password == f"env-{SECRET}"
    assert params.hosts[0].password_source == Source(SourceKind.ENVIRONMENT, name="PGPASSWORD")
    # an empty password is no password: the file is read
    params = check(f"host={A} password=''")
    assert params.hosts[0].password == f"file-{SECRET}"
    assert params["password"] == ""
    sandbox.setenv("PGPASSWORD", "")
    assert check(host=A).hosts[0].password == f"file-{SECRET}"


def test_password_from_conninfo_and_service(sandbox: Sandbox) -> None:
    params = check(f"host={A} password={SECRET}")
    assert params.hosts[0].password_source == Source(SourceKind.CONNINFO)
    sandbox.service_file(f"[svc]\npassword={SECRET}\n")
    params = check(host=A, service="svc")
    source = params.hosts[0].password_source
    assert source is not None
    assert source.kind is SourceKind.SERVICE_FILE


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o601, 0o610, 0o700 | 0o020])
def test_password_file_permissions(sandbox: Sandbox, mode: int) -> None:
    path = sandbox.pgpass(f"*:*:*:*:{SECRET}\n", mode=mode)
    assert lib(host=A).password == ""
    with pytest.warns(PasswordFileWarning) as record:
        params = pg(host=A)
    assert params.hosts[0].password is None
    assert str(record[0].message) == (
        f'password file "{path}" has group or world access; permissions should be '
        "u=rw (0600) or less"
    )
    _assert_no_secret(str(record[0].message))


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o200, 0o000])
def test_password_file_private_modes(sandbox: Sandbox, mode: int) -> None:
    sandbox.pgpass(f"*:*:*:*:{SECRET}\n", mode=mode)
    result = lib(host=A)
    params = pg(host=A)
    assert_agree(params, result)  # (root reads even a 0000 file)


def test_password_file_directory(sandbox: Sandbox) -> None:
    directory = sandbox.tmp / "dir.pgpass"
    directory.mkdir(mode=0o700)
    sandbox.setenv("PGPASSFILE", str(directory))
    assert lib(host=A).password == ""
    with pytest.warns(PasswordFileWarning, match="is not a plain file"):
        params = pg(host=A)
    assert params.hosts[0].password is None


def test_password_file_not_a_plain_file(sandbox: Sandbox) -> None:
    sandbox.setenv("PGPASSFILE", os.devnull)
    assert lib(host=A).password == ""
    with pytest.warns(PasswordFileWarning, match="is not a plain file"):
        params = pg(host=A)
    assert params.hosts[0].password is None
    assert params["passfile"] == os.devnull


# libpq reads password-file lines as C strings: a NUL byte truncates the line
# and the next line is appended to it (password 'pwsecond'); a last line with a
# NUL is never used.
@pytest.mark.parametrize(
    "data",
    [b"*:*:*:*:pw\x00junk\nsecond:line\n", b"*:*:*:*:pw\x00junk\n"],
)
def test_password_file_nul_byte(sandbox: Sandbox, data: bytes) -> None:
    sandbox.pgpass(data)
    check(host=A)


def test_password_file_missing_is_silent(sandbox: Sandbox) -> None:
    sandbox.setenv("PGPASSFILE", str(sandbox.tmp / "missing"))
    params = check(host=A)
    assert params.hosts[0].password is None
    assert params["passfile"] == str(sandbox.tmp / "missing")


def test_password_file_location(sandbox: Sandbox) -> None:
    home_file = sandbox.pgpass(f"*:*:*:*:home-{SECRET}\n")
    env_file = sandbox.pgpass(f"*:*:*:*:env-{SECRET}\n", sandbox.tmp / "env.pgpass")
    kw_file = sandbox.pgpass(f"*:*:*:*:kw-{SECRET}\n", sandbox.tmp / "kw.pgpass")
    params = check(host=A)
    assert params.hosts[0].password == f"home-{SECRET}"
    assert params["passfile"] == str(home_file)
    sandbox.setenv("PGPASSFILE", str(env_file))
    params = check(host=A)
    assert params.hosts[0].password == f"env-{SECRET}"
    assert params.source("passfile") == Source(SourceKind.ENVIRONMENT, name="PGPASSFILE")
    params = check(host=A, passfile=str(kw_file))
    assert params.hosts[0].password == f"kw-{SECRET}"
    assert params.source("passfile") == Source(SourceKind.KEYWORD, name="passfile")
    # an empty passfile argument is skipped
    assert check(host=A, passfile="").hosts[0].password == f"env-{SECRET}"
    # an empty passfile in a string means the default file
    params = check(f"host={A} passfile=''")
    assert params.hosts[0].password == f"home-{SECRET}"
    assert params["passfile"] == str(home_file)


def test_password_file_bytes(sandbox: Sandbox) -> None:
    sandbox.pgpass(b"*:*:*:*:caf\xc3\xa9-" + SECRET.encode() + b"\n")
    assert check(host=A).hosts[0].password == f"café-{SECRET}"
    sandbox.pgpass(b"*:*:*:*:\xff\xfe-" + SECRET.encode() + b"\n")
    params = check(host=A)
    password = params.hosts[0].password
    assert password is not None
    assert password.encode("utf-8", "surrogateescape") == b"\xff\xfe-" + SECRET.encode()


_PGPASS_ALPHABET: Final = st.sampled_from(["a", "b", ":", "\\", "*", "#", " "])
_KEY_ALPHABET: Final = st.sampled_from(["a", "b", ":", "\\", "*"])


@_HYPOTHESIS
@given(
    host=st.text(_KEY_ALPHABET, min_size=1, max_size=3),
    user=st.text(_KEY_ALPHABET, min_size=1, max_size=2),
    dbname=st.text(_KEY_ALPHABET, min_size=0, max_size=2),
    lines=st.lists(st.text(_PGPASS_ALPHABET, max_size=14), min_size=1, max_size=4),
    endings=st.sampled_from(["\n", "\r\n", "\r"]),
)
@example(host="a:b", user="a", dbname="a", lines=["a\\:b:1:a:a:p\\:w:x"], endings="\n")
@example(host="*", user="\\", dbname="", lines=["\\*:*:*:\\\\:pw\\"], endings="\r\n")
def test_password_file_random(
    sandbox: Sandbox, host: str, user: str, dbname: str, lines: list[str], endings: str
) -> None:
    sandbox.pgpass(endings.join(lines) + endings)
    kwargs: dict[str, Value] = {
        "host": host,
        "hostaddr": "127.0.0.1",
        "port": "1",
        "user": user,
        "dbname": dbname,
    }
    result = lib(**kwargs)
    params = pg(**kwargs)
    assert_agree(params, result)


@st.composite
def pgpass_field(draw: st.DrawFn, key: str) -> str:
    """A password-file field for *key*: ``*``, *key* escaped in some way
    (so that it matches), or something near it."""
    choice = draw(st.sampled_from(["star", "exact", "exact", "mutated", "random"]))
    if choice == "star":
        return "*"
    if choice == "random":
        return draw(st.text(_KEY_ALPHABET, max_size=3))
    out = []
    for ch in key:
        if ch in ":\\" or draw(st.booleans()):
            out.append("\\" + ch)
        else:
            out.append(ch)
    field = "".join(out)
    if choice == "mutated":
        i = draw(st.integers(0, len(field)))
        field = field[:i] + draw(st.sampled_from(["", "\\", ":", "a", "*"])) + field[i + 1 :]
    return field


_NEAR_KEY: Final = {"host": "a:b", "port": "1", "dbname": "a\\", "user": "*b"}


@_HYPOTHESIS
@given(
    lines=st.lists(
        st.tuples(
            pgpass_field(_NEAR_KEY["host"]),
            pgpass_field(_NEAR_KEY["port"]),
            pgpass_field(_NEAR_KEY["dbname"]),
            pgpass_field(_NEAR_KEY["user"]),
            st.text(_PGPASS_ALPHABET, max_size=6),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_password_file_random_near_matches(
    sandbox: Sandbox, lines: list[tuple[str, str, str, str, str]]
) -> None:
    """Lines built from the lookup key itself, escaped or not, so that they
    often match."""
    sandbox.pgpass("".join(":".join(line) + "\n" for line in lines))
    kwargs: dict[str, Value] = {"hostaddr": "127.0.0.1", **_NEAR_KEY}
    assert_agree(pg(**kwargs), lib(**kwargs))


# --------------------------------------------------------------------------
# provenance


def test_sources(sandbox: Sandbox) -> None:
    path = sandbox.service_file("[svc]\nsslmode=require\n")
    sandbox.setenv("PGAPPNAME", "app")
    params = check(f"host={A} service=svc", port="7")
    expected = {
        "host": Source(SourceKind.CONNINFO),
        "service": Source(SourceKind.CONNINFO),
        "port": Source(SourceKind.KEYWORD, name="port"),
        "sslmode": Source(SourceKind.SERVICE_FILE, path=str(path), section="svc", line=2),
        "application_name": Source(SourceKind.ENVIRONMENT, name="PGAPPNAME"),
        "target_session_attrs": Source(SourceKind.DEFAULT),
        "user": Source(SourceKind.DERIVED, detail="operating-system user"),
        "dbname": Source(SourceKind.DERIVED, detail="same as user"),
        "passfile": Source(SourceKind.DERIVED, detail="~/.pgpass"),
        "sslcertmode": Source(SourceKind.DERIVED, detail="libpq default"),
        "hostaddr": None,
        "password": None,
    }
    for keyword, source in expected.items():
        assert params.source(keyword) == source, keyword
    # every value has a source, every unset option none
    for keyword, value in params.as_dict().items():
        assert (params.source(keyword) is None) is (value is None), keyword
    with pytest.raises(KeyError):
        params.source("bogus")
    with pytest.raises(KeyError):
        params["bogus"]
    assert params.get("hostaddr", "x") == "x"
    assert params.get("host") == A


def test_source_str() -> None:
    assert str(Source(SourceKind.CONNINFO)) == "connection string"
    assert str(Source(SourceKind.KEYWORD, name="host")) == "keyword argument host"
    assert str(Source(SourceKind.DEFAULT)) == "compiled-in default"
    assert str(Source(SourceKind.DERIVED, detail="x")) == "derived: x"
    assert str(Source(SourceKind.DERIVED)) == "derived"


def test_expanded_dbname_sources() -> None:
    params = check("", host=A, dbname="port=7", user="u")
    assert params.source("port") == Source(SourceKind.CONNINFO)
    assert params.source("host") == Source(SourceKind.KEYWORD, name="host")
    assert params.source("user") == Source(SourceKind.KEYWORD, name="user")
    params = check("mydb", host=A)
    assert params.source("dbname") == Source(SourceKind.CONNINFO)


# --------------------------------------------------------------------------
# secrets


SECRET_B64: Final = base64.b64encode(SECRET.encode().ljust(32, b"!")).decode()


def test_secrets_not_shown(sandbox: Sandbox) -> None:
    sandbox.pgpass(f"{B}:*:*:*:file-{SECRET}\n")
    params = pg(
        f"host={A},{B} password={SECRET}x",
        sslpassword=f"ssl-{SECRET}",
        oauth_client_secret=f"oauth-{SECRET}",
        scram_client_key=SECRET_B64,
        scram_server_key=SECRET_B64,
    )
    for text in (repr(params), str(params), *map(repr, params.hosts), *map(str, params.hosts)):
        _assert_no_secret(text)
        assert SECRET_B64 not in text
    params = pg(host=f"{A},{B}")
    assert params.hosts[1].password == f"file-{SECRET}"
    _assert_no_secret(repr(params))
    _assert_no_secret(repr(params.hosts[1]))
    assert "********" in repr(params.hosts[1])
    defaults = conninfo_defaults()
    sandbox.setenv("PGPASSWORD", SECRET)
    defaults = conninfo_defaults()
    assert any(o.val == SECRET for o in defaults)
    for option in defaults:
        _assert_no_secret(repr(option))


@pytest.mark.parametrize(
    ("conninfo", "kwargs"),
    [
        (f"password={SECRET} sslmode=bogus", {}),
        (f"postgresql://u:{SECRET}@/db?sslmode=bogus", {}),
        (f"password={SECRET}", {"require_auth": "bogus"}),
        ("", {"password": SECRET, "port": "1,2", "host": "a,b,c"}),
        ("", {"sslpassword": SECRET, "channel_binding": "x"}),
        ("", {"password": SECRET, "connect_timeout": "x"}),
        ("", {"password": SECRET, "bogus": "x"}),
        (f"password={SECRET} bogus=x", {}),
        (f"password='{SECRET}' nonsense", {}),
        (f"password={SECRET} nonsense", {}),
        (f"postgresql://u:{SECRET}@[::1", {}),
        (f"postgresql://u:{SECRET}@h/db?bogus=1", {}),
        (f"postgresql://u:{SECRET}%zz@h/db", {}),
        ("", {"scram_client_key": SECRET}),
    ],
)
def test_errors_do_not_show_secrets(conninfo: str, kwargs: dict[str, Value]) -> None:
    message = pg_error(conninfo, **kwargs)  # pg_error asserts the secret is absent
    assert message


def test_service_errors_do_not_show_secrets(sandbox: Sandbox) -> None:
    sandbox.service_file(f"[svc]\npassword={SECRET}\nbogus={SECRET}\n")
    pg_error(service="svc")
    sandbox.service_file(f"[svc]\npassword {SECRET}\n")
    pg_error(service="svc")


# --------------------------------------------------------------------------
# PQconndefaults (D17)


def _pg_defaults() -> list[tuple[object, ...]]:
    return [
        (o.keyword, o.envvar, o.compiled, o.val, o.label, o.dispchar, o.dispsize)
        for o in conninfo_defaults(env=Environment.from_os())
    ]


def _libpq_defaults() -> list[tuple[object, ...]]:
    return [
        (o.keyword, o.envvar, o.compiled, o.val, o.label, o.dispchar, o.dispsize)
        for o in libpq_oracle.conndefaults()
    ]


def test_conndefaults_plain() -> None:
    assert _pg_defaults() == _libpq_defaults()
    values = {o.keyword: o.val for o in conninfo_defaults()}
    assert values["user"] == OS_USER
    assert values["dbname"] is None  # not derived here
    assert values["passfile"] is None
    assert values["sslcertmode"] is None


def test_conndefaults_environment(sandbox: Sandbox) -> None:
    for name, value in ENV_VALUES.items():
        sandbox.setenv(name, value)
    assert _pg_defaults() == _libpq_defaults()
    for name in ENV_VALUES:
        sandbox.setenv(name, "")
    assert _pg_defaults() == _libpq_defaults()


def test_conndefaults_requiressl_and_system_root(sandbox: Sandbox) -> None:
    sandbox.setenv("PGREQUIRESSL", "1")
    assert _pg_defaults() == _libpq_defaults()
    sandbox.monkeypatch.delenv("PGREQUIRESSL")
    sandbox.setenv("PGSSLROOTCERT", "system")
    assert _pg_defaults() == _libpq_defaults()


def test_conndefaults_service(sandbox: Sandbox) -> None:
    sandbox.service_file(f"[svc]\nhost={A}\nport=7\n")
    sandbox.setenv("PGSERVICE", "svc")
    sandbox.setenv("PGPORT", "8")
    assert _pg_defaults() == _libpq_defaults()
    values = {o.keyword: o.val for o in conninfo_defaults()}
    assert (values["host"], values["port"], values["service"]) == (A, "7", "svc")


@pytest.mark.parametrize(
    "setup",
    ["missing service", "missing PGSERVICEFILE", "nested", "too long"],
)
def test_conndefaults_ignores_service_errors(sandbox: Sandbox, setup: str) -> None:
    sandbox.setenv("PGSERVICE", "svc")
    sandbox.setenv("PGHOST", B)
    if setup == "missing PGSERVICEFILE":
        sandbox.setenv("PGSERVICEFILE", str(sandbox.tmp / "missing"))
    elif setup == "nested":
        sandbox.service_file("[svc]\nservice=x\n")
    elif setup == "too long":
        sandbox.service_file("[svc]\n" + "#" * 2000 + "\n")
    assert _pg_defaults() == _libpq_defaults()
    # resolve_params does not ignore them
    check_error()


@pytest.mark.parametrize("bad_line", ["bogus line", "bogus=1", "service=x", "x" * 1100, "host = x"])
def test_conndefaults_keeps_settings_before_service_error(sandbox: Sandbox, bad_line: str) -> None:
    """libpq stores service settings as it reads them: those before the
    faulty line stay (PQconndefaults ignores the error)."""
    sandbox.setenv("PGSERVICE", "svc")
    sandbox.setenv("PGPORT", "8")
    sandbox.service_file(f"[svc]\nhost={A}\n{bad_line}\nport=7\n")
    assert _pg_defaults() == _libpq_defaults()
    values = {o.keyword: o.val for o in conninfo_defaults()}
    assert (values["host"], values["port"]) == (A, "8")


_SERVICE_LINES: Final = (
    "[svc]",
    "[svc]",
    "[other]",
    "[svc] trailing",
    f"host={A}",
    f"host={B}",
    "host=",
    "port=7",
    "port=8",
    "port= 9",
    "application_name=x y",
    "application_name=",
    "sslmode=require",
    "sslmode=bogus",
    "  # comment",
    "#comment",
    "",
    "\t ",
    "nonsense",
    "bogus=1",
    "service=x",
    "host = x",
    "=",
    "requiressl=1",
    "x" * 1030,
)


@_HYPOTHESIS
@given(
    lines=st.lists(st.sampled_from(_SERVICE_LINES), max_size=8),
    crlf=st.booleans(),
    final_newline=st.booleans(),
    where=st.sampled_from(["user", "system", "PGSERVICEFILE"]),
    env=st.booleans(),
)
def test_service_file_random(
    sandbox: Sandbox,
    lines: list[str],
    crlf: bool,
    final_newline: bool,
    where: str,
    env: bool,
) -> None:
    eol = "\r\n" if crlf else "\n"
    text = eol.join(lines) + (eol if final_newline else "")
    for path in (sandbox.home / ".pg_service.conf", sandbox.sysconf / "pg_service.conf"):
        path.unlink(missing_ok=True)
    if where == "user":
        sandbox.service_file(text)
    elif where == "system":
        sandbox.service_file(text, sandbox.sysconf / "pg_service.conf")
    else:
        path = sandbox.service_file(text, sandbox.tmp / "services")
        os.environ["PGSERVICEFILE"] = str(path)
    if env:
        os.environ["PGPORT"] = "6"
        os.environ["PGSERVICE"] = "svc"
    try:
        check_same("" if env else "service=svc")
        assert _pg_defaults() == _libpq_defaults()
    finally:
        for name in ("PGSERVICEFILE", "PGPORT", "PGSERVICE"):
            os.environ.pop(name, None)


_ENV_CHOICES: Final = [*ENV_VALUES, "PGREQUIRESSL", "PGSERVICE"]


@_HYPOTHESIS
@given(
    st.dictionaries(
        st.sampled_from(_ENV_CHOICES),
        st.sampled_from(["good", "", "bogus", "system", "1"]),
        max_size=6,
    )
)
def test_environment_random(sandbox: Sandbox, choices: dict[str, str]) -> None:
    """Random combinations of variables, valid or not, against libpq: the
    same first fault, or the same values; and the same PQconndefaults."""
    sandbox.service_file("[svc]\nport=7\nsslmode=verify-full\n")
    environ = {}
    for name, choice in choices.items():
        value = ENV_VALUES.get(name, "1") if choice == "good" else choice
        if name in ("PGCONNECT_TIMEOUT",) and value not in ("", "10", "1"):
            continue  # checked by pgproto only (see test_integer_options)
        if name == "PGCONNECT_TIMEOUT" and value == "":
            continue
        if name == "PGSERVICE" and choice == "good":
            value = "svc"
        if name in ("PGHOST", "PGHOSTADDR", "PGPORT") and choice in ("bogus", "system", "1"):
            continue  # no DNS, no TCP to random ports
        environ[name] = value
    if "PGHOSTADDR" in environ:
        environ["PGPORT"] = "1"
    os.environ.update(environ)
    try:
        check_same()
        assert _pg_defaults() == _libpq_defaults()
    finally:
        for name in environ:
            del os.environ[name]


# --------------------------------------------------------------------------
# everything at once


def test_everything_at_once(sandbox: Sandbox) -> None:
    sandbox.pgpass(f"*:*:*:*:{SECRET}\n")
    conninfo = (
        f"host={A},{B} port=1,2 user=u dbname=d channel_binding=require "
        "connect_timeout=5 client_encoding=auto options='-c x=y' application_name=a "
        "fallback_application_name=f keepalives=1 keepalives_idle=2 keepalives_interval=3 "
        "keepalives_count=4 tcp_user_timeout=5 sslmode=verify-full sslnegotiation=direct "
        "sslcompression=1 sslcert=/c sslkey=/k sslcertmode=require sslrootcert=/r "
        "sslcrl=/l sslcrldir=/ld sslsni=0 requirepeer=p require_auth=scram-sha-256 "
        "min_protocol_version=3.0 max_protocol_version=3.2 ssl_min_protocol_version=TLSv1.3 "
        "ssl_max_protocol_version=TLSv1.3 gssencmode=disable krbsrvname=k gsslib=gssapi "
        "gssdelegation=1 replication=database target_session_attrs=primary "
        "load_balance_hosts=disable oauth_issuer=https://i oauth_client_id=c "
        "oauth_scope=s sslkeylogfile=/kl"
    )
    params = check(conninfo)
    assert params.connect_timeout == 5
    assert params.keepalives_idle == 2
    assert params.tcp_user_timeout == 5
    assert [h.password for h in params.hosts] == [SECRET, SECRET]


def test_results_are_independent() -> None:
    first = pg(host=A)
    second = pg(host=B)
    assert first["host"] == A
    assert second["host"] == B
    assert isinstance(first, pgproto.ConnParams)


# --------------------------------------------------------------------------
# odd corners that agree


def test_odd_corners(sandbox: Sandbox) -> None:
    # a service name with "]" or spaces in it
    sandbox.service_file(f"[a]b]\nhost={A}\n[s v]\nport=4\n")
    assert check(service="a]b")["host"] == A
    assert check(service="s v")["port"] == "4"
    # a byte-order mark hides the header
    sandbox.service_file(f"\ufeff[svc]\nhost={A}\n")
    assert check_error(service="svc") == 'definition of service "svc" not found'
    # dbname from the environment or a service file is never expanded
    sandbox.setenv("PGDATABASE", f"host={B} port=3")
    params = check(host=A)
    assert (params["host"], params["port"], params["dbname"]) == (A, "5432", f"host={B} port=3")
    sandbox.monkeypatch.delenv("PGDATABASE")
    sandbox.service_file(f"[svc]\ndbname=postgresql:///x?host={B}\n")
    assert check(host=A, service="svc")["dbname"] == f"postgresql:///x?host={B}"
    # password-file lines of any length; a BOM is part of the first field
    sandbox.pgpass(f"*:*:*:*:{SECRET}{'p' * 10000}\n")
    assert check(host=A).hosts[0].password == SECRET + "p" * 10000
    sandbox.pgpass(f"\ufeff*:*:*:*:x\n*:*:*:*:{SECRET}\n")
    assert check(host=A).hosts[0].password == SECRET
    # a dangling symbolic link is a missing file
    (sandbox.home / ".pgpass").unlink()
    (sandbox.home / ".pgpass").symlink_to("/nonexistent/pgpass")
    assert check(host=A).hosts[0].password is None


# --------------------------------------------------------------------------
# the resolution cache: reuse only while nothing it read has changed


def _resolve_again(conninfo: str, port: int | None = None) -> tuple[ConnParams, ConnParams]:
    first = resolve_params(conninfo, port=port)
    return first, resolve_params(conninfo, port=port)


def test_cache_reuses_an_identical_resolution(sandbox: Sandbox) -> None:
    first, second = _resolve_again("host=/nonexistent/a user=u", port=5433)
    assert second is first
    # Another keyword, another value, another environment: resolved afresh.
    assert resolve_params("host=/nonexistent/a user=u", port=5434) is not first
    sandbox.setenv("PGAPPNAME", "app")
    third = resolve_params("host=/nonexistent/a user=u", port=5433)
    assert third is not first
    assert third["application_name"] == "app"


def test_cache_sees_a_changed_password_file(sandbox: Sandbox) -> None:
    sandbox.pgpass(f"*:*:*:u:{SECRET}-one\n")
    first, second = _resolve_again("host=/nonexistent/a user=u")
    assert second is first
    assert first.hosts[0].password == f"{SECRET}-one"
    sandbox.pgpass(f"*:*:*:u:{SECRET}-second\n")
    assert resolve_params("host=/nonexistent/a user=u").hosts[0].password == f"{SECRET}-second"
    (sandbox.home / ".pgpass").unlink()
    assert resolve_params("host=/nonexistent/a user=u").hosts[0].password is None


def test_cache_sees_a_password_file_appear(sandbox: Sandbox) -> None:
    assert resolve_params("host=/nonexistent/a user=u").hosts[0].password is None
    sandbox.pgpass(f"*:*:*:u:{SECRET}\n")
    assert resolve_params("host=/nonexistent/a user=u").hosts[0].password == SECRET


def test_cache_sees_a_changed_service_file(sandbox: Sandbox) -> None:
    sandbox.service_file("[s]\nport=5433\n")
    first, second = _resolve_again("service=s host=/nonexistent/a")
    assert second is first
    assert first["port"] == "5433"
    sandbox.service_file("[s]\nport=15433\n")
    assert resolve_params("service=s host=/nonexistent/a")["port"] == "15433"
    system = sandbox.service_file("[s]\nport=25433\n", sandbox.sysconf / "pg_service.conf")
    (sandbox.home / ".pg_service.conf").unlink()
    assert resolve_params("service=s host=/nonexistent/a")["port"] == "25433"
    system.write_text("[s]\ndbname=other\n")
    resolved = resolve_params("service=s host=/nonexistent/a")
    assert (resolved["port"], resolved["dbname"]) == ("5432", "other")


def test_cache_keeps_warning_about_an_open_password_file(sandbox: Sandbox) -> None:
    sandbox.pgpass(f"*:*:*:u:{SECRET}\n", mode=0o644)
    for _ in range(2):
        with pytest.warns(PasswordFileWarning, match="group or world access"):
            assert resolve_params("host=/nonexistent/a user=u").hosts[0].password is None


def test_cache_never_hides_an_error(sandbox: Sandbox) -> None:
    for _ in range(2):
        with pytest.raises(ConninfoError, match="invalid sslmode value"):
            resolve_params("host=/nonexistent/a sslmode=bogus")
    with pytest.raises(TypeError):
        resolve_params("host=/nonexistent/a", port=True)
    resolve_params("host=/nonexistent/a", port=1)
    with pytest.raises(TypeError):  # True == 1, but the cache must not answer for it
        resolve_params("host=/nonexistent/a", port=True)


def test_from_os_snapshot_follows_every_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_os() hands out its last snapshot again only while everything it
    reads is unchanged: a PG* value (same names), a new or removed PG*
    variable, HOME, the LC_CTYPE locale."""
    monkeypatch.setenv("PGAPPNAME", "one")
    first = Environment.from_os()
    assert Environment.from_os() is first
    monkeypatch.setenv("PGAPPNAME", "two")
    second = Environment.from_os()
    assert second.environ["PGAPPNAME"] == "two"
    monkeypatch.setenv("PGOPTIONS", "-c x=1")
    assert Environment.from_os().environ == {**second.environ, "PGOPTIONS": "-c x=1"}
    monkeypatch.delenv("PGOPTIONS")
    assert Environment.from_os() == second
    monkeypatch.setenv("HOME", "/elsewhere")
    assert Environment.from_os().home == "/elsewhere"
    # An environment change under a name that is not PG* or HOME changes nothing.
    unchanged = Environment.from_os()
    monkeypatch.setenv("NOT_PG_BUT_PGPROTO_TEST", "1")
    monkeypatch.setenv("UNRELATED_TO_PG", "1")
    assert Environment.from_os() == unchanged
    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
        assert Environment.from_os().client_encoding == "SQL_ASCII"
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        assert Environment.from_os().client_encoding == "UTF8"
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)
