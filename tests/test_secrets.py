"""Secrets: the suite-wide watch can fail, the permission rules hold end to end,
and no public object shows the password it was built with.

The watch itself is ``tests/secret_watch.py`` (a plugin for the whole suite):
these tests plant a password where it must not be and check that the watch
reports it -- with a scanner of their own (:func:`secret_watch.watching`), so
the planted password never reaches the session's watch, and in an inner
pytest session (``pytester``) that must fail.

The unit rules are tested elsewhere (``test_resolve.py``
test_password_file_permissions, ``test_tls.py`` test_key_permission_rule);
here they are checked through ``connect()`` against a real server.  No
assertion here compares a password with a text directly: a failing
``assert pw not in text`` would print the password.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import pwd
import shutil
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import anyio
import pytest
import secret_watch
import trio
from fake_server import ENV
from pgproto_adapters import anyio as anyio_adapter
from pgproto_adapters import asyncio as asyncio_adapter
from pgproto_adapters import blocking
from pgproto_adapters import trio as trio_adapter
from pgproto_adapters._cluster import Cluster
from pgproto_adapters._trace import Tracer
from secret_watch import Scanner, watching
from servers import ROLES, TLSMaterial, connect_params

import pgproto
from pgproto import (
    Attempt,
    AuthenticationError,
    CancelStateMachine,
    ConnectError,
    ConnectionStateMachine,
    PasswordFileWarning,
    PgprotoWarning,
    TLSError,
)

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.usefixtures("no_pg_environment")

# Planted passwords: known only to the scanners these tests make (their names
# do not say PASSWORD or SECRET, so the session's watch does not collect them).
PLANTED: Final = "Pl4nted-9b2e-only-for-the-inner-watch"
SCRAM_PW: Final = ROLES["scram_user"].password or ""
#: Distinctive passwords the session's watch collects (and greps for).
REPR_PASSWORD: Final = "Repr-Pw-5e1d-NEVER-SHOW"
REPR_SSLPASSWORD: Final = "Repr-SslPw-0c7a-NEVER-SHOW"
WRONG_PASSWORD: Final = "Wr0ng-Pw-71f4-NEVER-SHOW"

ADAPTERS: Final = ("blocking", "asyncio")


def shows(secret: str, text: str) -> bool:
    """Whether *text* contains *secret* (asserted on as a bool, never printed)."""
    return secret in text


def connect(adapter: str, **kwargs: Any) -> tuple[bool, str]:
    """Connect with *adapter*, run one query, close: (ssl_in_use, auth_method)."""
    if adapter == "blocking":
        with blocking.connect(**kwargs) as conn:
            conn.simple_query("SELECT 1")
            return conn.ssl_in_use, conn.auth_method or "none"

    async def run() -> tuple[bool, str]:
        conn = await asyncio_adapter.connect(**kwargs)
        try:
            await conn.simple_query("SELECT 1")
            return conn.ssl_in_use, conn.auth_method or "none"
        finally:
            await conn.close()

    return asyncio.run(run())


def connect_error(adapter: str, **kwargs: Any) -> ConnectError:
    with pytest.raises(ConnectError) as failure:
        connect(adapter, **kwargs)
    return failure.value


# --------------------------------------------------------------------------
# the scanner


def test_the_session_is_watched() -> None:
    scanner = secret_watch._current()
    assert scanner is not None, "secret_watch is not loaded (tests/conftest.py)"
    before = scanner.counts["exception"], scanner.counts["repr"]
    repr(pgproto.Error("watched"))
    repr(pgproto.resolve_params("host=db.example", env=ENV))
    assert (scanner.counts["exception"], scanner.counts["repr"]) == (before[0] + 1, before[1] + 1)
    assert REPR_PASSWORD in scanner.passwords  # a module constant, collected


def test_scanner_reports_each_kind_without_showing_the_password() -> None:
    scanner = Scanner()
    scanner.start_test("t.py::test_x")
    assert scanner.add_password(PLANTED, "planted")
    for kind in secret_watch.KINDS:
        scanner.record(kind, "somewhere", f"text with {PLANTED} inside")
    scanner.record("repr", "somewhere", "a clean text")
    assert [(h.nodeid, h.kind) for h in scanner.hits] == [
        ("t.py::test_x", kind) for kind in secret_watch.KINDS
    ]
    assert scanner.problems() == [f"{len(secret_watch.KINDS)} password hit(s)"]
    report = "\n".join(scanner.report())
    assert not shows(PLANTED, report)
    assert "LEAK in t.py::test_x: repr from somewhere" in report
    assert "text with <password #1> inside" in report
    assert "test_secrets.py" in scanner.hits[0].stack  # where the text was made


def test_scanner_ignores_short_and_common_values() -> None:
    scanner = Scanner()
    for value in ("", "wrong", "pw-md", "password", "Postgres", "system", "aaaaaaaa", None, 42):
        assert not scanner.add_password(value, "test"), value
    assert scanner.add_password("pw-md5", "six characters")
    assert scanner.add_password("x" * 1100, "long enough to be distinctive")
    assert scanner.add_password(b"bytes-secret", "bytes")
    scanner.record("exception", "e", "authentication failed: wrong password for postgres")
    assert not scanner.hits


def test_scanner_looks_back_when_a_password_arrives_late() -> None:
    scanner = Scanner()
    scanner.start_test("t.py::test_late")
    scanner.record("log record", "logger", f"early {PLANTED}")
    scanner.add_password(PLANTED, "late")
    assert [h.where for h in scanner.hits] == ["logger (found when the password was registered)"]
    scanner.start_test("t.py::test_next")  # a new test forgets the texts
    scanner.add_password(PLANTED + "-2", "later")
    assert len(scanner.hits) == 1


def test_a_watch_that_saw_nothing_fails() -> None:
    scanner = Scanner()
    scanner.tests_run = secret_watch.PLAUSIBLE_TESTS
    scanner.test_files = {f"test_{i}.py" for i in range(secret_watch.PLAUSIBLE_FILES)}
    assert scanner.problems() == [
        f"no exception recorded in {scanner.tests_run} tests: the watch is broken",
        f"no repr recorded in {scanner.tests_run} tests: the watch is broken",
        "no password registered: the watch is broken",
    ]
    scanner.tests_run -= 1  # a short run is not judged
    assert scanner.problems() == []
    scanner.tests_run += 1
    scanner.test_files.pop()  # nor is one big module (test_attacks.py: 446 tests, no repr)
    assert scanner.problems() == []


# --------------------------------------------------------------------------
# the hooks: a planted password in each kind of text is caught


def test_every_hook_catches_a_planted_password(caplog: pytest.LogCaptureFixture) -> None:
    with watching() as scanner:
        params = pgproto.resolve_params("host=db.example", password=PLANTED, env=ENV)
        assert PLANTED in scanner.passwords  # registered from resolve_params
        assert not scanner.hits  # the ConnParams repr etc. are clean
        pgproto.TLSError(f"message {PLANTED}")
        cause = OSError(f"cause {PLANTED}")
        error = pgproto.TransportError("refused")
        error.__cause__ = cause
        attempt = Attempt(
            host="db.example",
            address="192.0.2.1",
            port=5432,
            step="s",
            encryption="none",
            error=error,
        )
        pgproto.ConnectError([attempt], "no connection")
        with pytest.warns(PgprotoWarning):
            warnings.warn(f"warning {PLANTED}", PgprotoWarning, stacklevel=1)
        logging.getLogger("pgproto").debug("log %s", PLANTED)  # below every level
        repr(pgproto.ParameterStatus(name="application_name", value=PLANTED))
        Tracer(io.StringIO()).line(f"trace {PLANTED}")
        with pytest.raises(ValueError, match="caught"):
            raise ValueError(f"caught {PLANTED}")
        repr(params)
    where = {(hit.kind, hit.where) for hit in scanner.hits}
    assert where == {
        ("exception", "TLSError"),
        ("exception cause", "OSError in a ConnectError attempt"),
        ("warning", "PgprotoWarning"),
        ("log record", "logger 'pgproto' DEBUG"),
        ("repr", "repr of ParameterStatus"),
        ("trace", "Tracer.line"),
        ("exception cause", "ValueError caught by pytest.raises"),
    }
    # The DEBUG record was scanned, but caplog (at the root's level) saw nothing.
    assert [r.getMessage() for r in caplog.records] == []


def test_caplog_sees_what_it_saw_before(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("pgproto")
    scanner = secret_watch._current()
    assert scanner is not None
    before = scanner.counts["log record"]
    log.info("not shown")
    with caplog.at_level(logging.INFO, logger="pgproto"):
        log.info("shown")
        log.debug("not shown either")
    log.warning("warned")
    assert [r.getMessage() for r in caplog.records] == ["shown", "warned"]
    assert scanner.counts["log record"] == before + 4


_LEAKY: Final = f'''
import logging
import pgproto
import pytest

def test_clean():
    repr(pgproto.resolve_params("host=db.example", password="{PLANTED}",
                                env=pgproto.Environment(user="u")))

def test_leak():
    with pytest.raises(pgproto.TLSError):
        raise pgproto.TLSError("could not load key with passphrase " + "{PLANTED}")
'''


def test_a_leaking_session_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=_LEAKY)
    result = pytester.runpytest_inprocess("-p", "secret_watch", "-p", "no:cacheprovider")
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=2)
    lines = [line for line in out.splitlines() if line.startswith(("LEAK", "FAILED"))]
    assert lines == [
        "LEAK in test_inner.py::test_leak: exception from TLSError",
        "LEAK in test_inner.py::test_leak: exception cause from TLSError caught by pytest.raises",
        "FAILED: 2 password hit(s)",
    ]
    result.stdout.fnmatch_lines(["*'could not load key with passphrase <password #*>'*"])
    assert not shows(PLANTED, out)
    assert secret_watch._current() is not None  # the session's watch is back


def test_a_clean_session_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=_LEAKY.split("def test_leak")[0])
    result = pytester.runpytest_inprocess("-p", "secret_watch", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        ["*= secret watch =*", "passwords watched: *", "texts scanned: exception 0, *repr 1*"]
    )


def test_a_leak_in_a_failure_report_fails(pytester: pytest.Pytester) -> None:
    """pytest's own report: an assertion that prints the password."""
    pytester.makepyfile(
        test_inner=f"""
import pgproto
def test_fails():
    pgproto.resolve_params("host=h", password="{PLANTED}", env=pgproto.Environment(user="u"))
    assert "{PLANTED}" == "other"
"""
    )
    result = pytester.runpytest_inprocess("-p", "secret_watch", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["LEAK in test_inner.py::test_fails: failure report from *"])


# --------------------------------------------------------------------------
# the password file rule, end to end


def _home_with_pgpass(home: Path, mode: int) -> tuple[pgproto.Environment, Path]:
    passfile = home / ".pgpass"
    passfile.write_text(f"*:*:*:scram_user:{SCRAM_PW}\n")
    passfile.chmod(mode)
    return pgproto.Environment(environ={}, home=str(home), user="root", uid=0), passfile


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660], ids=oct)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_password_file_with_group_or_world_access_is_ignored(
    pg18: Cluster, tls_material: TLSMaterial, tmp_path: Path, adapter: str, mode: int
) -> None:
    env, passfile = _home_with_pgpass(tmp_path, mode)
    params = connect_params(pg18, "tcp", tls_material, user="scram_user")
    with pytest.warns(PasswordFileWarning) as record:
        error = connect_error(adapter, env=env, **params)
    assert [str(w.message) for w in record] == [
        f'password file "{passfile}" has group or world access; permissions should be '
        "u=rw (0600) or less"
    ]
    assert error.attempts
    for attempt in error.attempts:  # the server asked; pgproto had no password to give
        assert isinstance(attempt.error, AuthenticationError)
        assert str(attempt.error) == "fe_sendauth: no password supplied"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_private_password_file_is_used(
    pg18: Cluster, tls_material: TLSMaterial, tmp_path: Path, adapter: str
) -> None:
    env, _ = _home_with_pgpass(tmp_path, 0o600)
    params = connect_params(pg18, "tcp", tls_material, user="scram_user")
    assert connect(adapter, env=env, **params) == (False, "SCRAM-SHA-256")


# --------------------------------------------------------------------------
# the client key rule, end to end


_POSTGRES_UID: Final = pwd.getpwnam("postgres").pw_uid
_KEY_CASES: Final = [
    # owner, mode, accepted (libpq: at most 0600; at most 0640 when owned by root)
    ("root", 0o600, True),
    ("root", 0o640, True),
    ("root", 0o644, False),
    ("root", 0o660, False),
    ("root", 0o641, False),
    ("postgres", 0o600, True),
    ("postgres", 0o640, False),
]


@pytest.mark.parametrize(
    ("owner", "mode", "accepted"), _KEY_CASES, ids=[f"{o}-{m:o}" for o, m, _ in _KEY_CASES]
)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_client_key_permission_rule(
    pg18: Cluster,
    tls_material: TLSMaterial,
    tmp_path: Path,
    adapter: str,
    owner: str,
    mode: int,
    accepted: bool,
) -> None:
    assert os.geteuid() == 0  # the test bed runs as root: the files below are root's
    key = tmp_path / "certuser.key"
    shutil.copyfile(tls_material.client_key, key)
    key.chmod(mode)
    if owner == "postgres":
        os.chown(key, _POSTGRES_UID, -1)
    params = connect_params(pg18, "tls", tls_material, user="certuser", sslkey=str(key))
    if accepted:
        assert connect(adapter, env=ENV, **params) == (True, "none")
        return
    error = connect_error(adapter, env=ENV, **params)
    assert error.attempts
    for attempt in error.attempts:
        assert isinstance(attempt.error, TLSError)
        assert str(attempt.error) == (
            f'private key file "{key}" has group or world access; file must have permissions '
            "u=rw (0600) or less if owned by the current user, or permissions u=rw,g=r (0640) "
            "or less if owned by root"
        )


# --------------------------------------------------------------------------
# reprs


def test_parameters_machine_and_errors_do_not_show_the_password(
    pg18: Cluster, tls_material: TLSMaterial
) -> None:
    params = pgproto.resolve_params(
        "host=db.example,db2.example",
        password=REPR_PASSWORD,
        sslpassword=REPR_SSLPASSWORD,
        env=ENV,
    )
    machine = ConnectionStateMachine(params)
    texts = {
        "ConnParams": repr(params),
        "str(ConnParams)": str(params),
        "HostParams": repr(params.hosts),
        "machine": repr(machine),
    }
    wrong = connect_params(pg18, "tls", tls_material, user="scram_user", password=WRONG_PASSWORD)
    error = connect_error("blocking", env=ENV, **wrong)
    texts |= {
        "ConnectError": repr(error),
        "str(ConnectError)": str(error),
        "Attempt": repr(error.attempts),
        "Attempt.describe": "\n".join(a.describe() for a in error.attempts),
    }
    assert error.sqlstate == "28P01"  # the server checked the (wrong) password
    for secret in (REPR_PASSWORD, REPR_SSLPASSWORD, WRONG_PASSWORD):
        assert [name for name, text in texts.items() if shows(secret, text)] == []


def _blocking_objects(params: dict[str, Any]) -> list[object]:
    with blocking.connect(env=ENV, **params) as conn:
        objects: list[object] = [conn, conn.machine, CancelStateMachine(conn.machine)]
        with conn.cancel_request() as request:
            objects.append(request)
            return [*objects, repr(objects)]


async def _async_objects(
    connect: Callable[..., Awaitable[Any]], params: dict[str, Any]
) -> list[object]:
    conn = await connect(env=ENV, **params)
    try:
        objects: list[object] = [conn, conn.machine, CancelStateMachine(conn.machine)]
        return [*objects, repr(objects)]
    finally:
        await conn.close()


FLAVOURS: Final[dict[str, Callable[[dict[str, str]], list[object]]]] = {
    "blocking": _blocking_objects,
    "asyncio": lambda p: asyncio.run(_async_objects(asyncio_adapter.connect, p)),
    "trio": lambda p: trio.run(_async_objects, trio_adapter.connect, p),
    "anyio-asyncio": lambda p: anyio.run(_async_objects, anyio_adapter.connect, p),
    "anyio-trio": lambda p: anyio.run(_async_objects, anyio_adapter.connect, p, backend="trio"),
}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_connection_objects_do_not_show_the_password(
    pg18: Cluster, tls_material: TLSMaterial, flavour: str
) -> None:
    params = connect_params(pg18, "tls", tls_material, user="scram_user", password=SCRAM_PW)
    objects = FLAVOURS[flavour](params)
    # Labels only (pytest shows the operands): a failure must not print the password.
    texts = {
        f"{show.__name__}({type(o).__name__} #{i})": show(o)
        for show in (repr, str)
        for i, o in enumerate(objects)
    }
    assert len(texts) >= 8
    assert [label for label, text in texts.items() if shows(SCRAM_PW, text)] == []


def test_environment_repr_does_not_show_pgpassword() -> None:
    env = pgproto.Environment(environ={"PGPASSWORD": PLANTED, "PGHOST": "db"}, user="u")
    assert not shows(PLANTED, repr(env))
    assert "'PGHOST': 'db'" in repr(env)
    params = pgproto.resolve_params("host=db.example", env=env)
    assert not shows(PLANTED, repr(params.env))
