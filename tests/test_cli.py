"""The ``pgproto conninfo`` command: per-host parameters with provenance, no secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pgproto_adapters._cli import main
from pgproto_adapters._cluster import Cluster, free_port
from servers import ROLES, TLSMaterial, drop_pg_environment

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    drop_pg_environment(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_conninfo_shows_hosts_sources_and_masks_passwords(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    passfile = home / ".pgpass"
    passfile.write_text("db2:5433:*:alice:from-file-secret\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGSSLMODE", "require")
    assert main(["conninfo", "host=db1,db2 port=5433 user=alice connect_timeout=1"]) == 0
    out = capsys.readouterr().out
    assert "host 1 of 2: db1 port 5433 [host name]" in out
    assert "host 2 of 2: db2 port 5433 [host name]" in out
    assert f"password file {passfile}, line 1" in out
    assert "environment variable PGSSLMODE" in out
    assert "derived: same as user" in out
    assert "connect_timeout: 2 s per address" in out
    assert "from-file-secret" not in out


def test_conninfo_masks_explicit_password(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conninfo", "postgresql://bob:pa%3Ass@/app?host=/tmp"]) == 0
    out = capsys.readouterr().out
    assert "pa:ss" not in out
    assert "pa%3Ass" not in out
    assert "********" in out
    assert "/tmp" in out


def test_conninfo_reports_invalid_input(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conninfo", "sslmode=bogus"]) == 2
    err = capsys.readouterr().err
    assert 'invalid sslmode value: "bogus"' in err


def test_conninfo_invalid_uri_password_not_echoed(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["conninfo", "postgresql://u:top secret@h"]) == 2
    captured = capsys.readouterr()
    assert "unexpected spaces" in captured.err
    assert "top secret" not in captured.err + captured.out


def test_conninfo_warns_about_insecure_password_file(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passfile = home / ".pgpass"
    passfile.write_text("*:*:*:*:leaky-secret\n")
    passfile.chmod(0o644)
    assert main(["conninfo", "host=db user=alice"]) == 0
    captured = capsys.readouterr()
    assert "has group or world access" in captured.err
    assert "password  (none)" in captured.out
    assert "leaky-secret" not in captured.out + captured.err


def test_console_script_entry_point(home: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "adapters")])
    result = subprocess.run(
        [sys.executable, "-m", "pgproto_adapters", "conninfo", "host=example.org user=u", "--all"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "example.org port 5432 [host name]" in result.stdout
    assert "sslkeylogfile" in result.stdout  # --all lists unset options too


def test_empty_port_element_is_attributed_to_the_default(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["conninfo", "postgresql://alice@db1,db2:5433/app"]) == 0
    out = capsys.readouterr().out
    first, second = out.split("host 2 of 2")
    assert "port      5432    compiled-in default" in first
    assert "port      5433    connection string" in second


# --------------------------------------------------------------------------
# pgproto connect / pgproto demo


def test_connect_trace_over_tls_with_scram(
    home: Path,
    pg18: Cluster,
    tls_material: TLSMaterial,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    role = ROLES["scram_user"]
    assert role.password is not None
    dsn = pg18.dsn(
        host="localhost",
        user=role.name,
        sslmode="verify-full",
        sslrootcert=str(tls_material.ca_cert),
        channel_binding="require",
    )
    status = main(["connect", dsn, "--trace", "-c", "SELECT current_user, 1 + 1"])
    captured = capsys.readouterr()
    # No password given (and an empty HOME: no password file): libpq's message.
    assert status == 1
    assert "fe_sendauth: no password supplied" in captured.err

    monkeypatch.setenv("PGPASSWORD", role.password)
    status = main(["connect", dsn, "--trace", "-c", "SELECT current_user, 1 + 1"])
    out = capsys.readouterr().out
    assert status == 0, out
    lines = [line.split("ms  ", 1)[-1] for line in out.splitlines()]
    expected_order = [
        'resolving host name "localhost"',
        "status CONNECTION_STARTED",
        "status CONNECTION_MADE",
        "status CONNECTION_SSL_STARTUP",
        "status CONNECTION_AWAITING_RESPONSE",
        "status CONNECTION_AUTH_OK",
        "status CONNECTION_CHECK_TARGET",
        "status CONNECTION_OK",
    ]
    positions = [lines.index(step) for step in expected_order]
    assert positions == sorted(positions)
    assert any(
        line.startswith("TLS established: TLSv1.3") and "host name verified" in line
        for line in lines
    )
    assert any("using SCRAM-SHA-256-PLUS" in line for line in lines)
    assert (
        "authenticated: method SCRAM-SHA-256-PLUS, channel binding used, "
        "server signature verified" in lines
    )
    assert f"  {role.name} | 2" in out
    assert "authentication: SCRAM-SHA-256-PLUS, channel binding used" in out
    assert role.password not in out


@pytest.mark.parametrize("adapter", ["blocking", "asyncio", "trio", "anyio", "anyio-trio"])
def test_connect_each_adapter_over_unix_socket(
    home: Path, pg15: Cluster, adapter: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = pg15.dsn(host=str(pg15.socket_dir), user="trust_user")
    assert main(["connect", dsn, "--adapter", adapter, "-c", "SELECT 'x', NULL"]) == 0
    out = capsys.readouterr().out
    assert "TLS: no; authentication: none" in out
    assert "  x | NULL" in out
    assert "server 15." in out


def test_connect_failure_names_host_address_and_step(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there
    assert main(["connect", f"host=127.0.0.1 port={port} sslmode=disable"]) == 1
    err = capsys.readouterr().err
    assert f'connection to server at "127.0.0.1", port {port} failed' in err
    assert "opening the connection" in err
    assert "Connection refused" in err


def test_connect_query_error_exit_status(
    home: Path, pg18: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = pg18.dsn(host=str(pg18.socket_dir))
    assert main(["connect", dsn, "-c", "SELECT 1/0"]) == 1
    assert "division by zero (SQLSTATE 22012)" in capsys.readouterr().err


def test_demo_runs_every_adapter(home: Path) -> None:
    """README's main command: a throwaway server, every adapter (anyio on
    both of its backends), traced."""
    result = subprocess.run(
        [sys.executable, "-m", "pgproto_adapters", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "adapters") + os.pathsep + str(ROOT)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    adapters = ("blocking", "asyncio", "trio", "anyio", "anyio-trio")
    for adapter in adapters:
        assert f"=== {adapter}: Unix socket, trust" in out
        assert f"=== {adapter}: TCP + TLS (verify-full) + SCRAM-SHA-256-PLUS" in out
    assert out.count("authenticated: method SCRAM-SHA-256-PLUS, channel binding used") == len(
        adapters
    )
    assert out.count("status CONNECTION_OK") == 2 * len(adapters)
    assert "demo-secret" not in out
    assert "server stopped and removed." in out


def test_ping_exit_status_like_pg_isready(
    home: Path, pg18: Cluster, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # scram_user without a password: the server asks for one, so it is up.
    up = pg18.dsn(host="127.0.0.1", user="scram_user")
    assert main(["ping", up]) == 0
    assert capsys.readouterr().out == "accepting connections\n"
    assert main(["ping", f"host=127.0.0.1 port={closed_port}", "--timeout", "5"]) == 2
    assert capsys.readouterr().out == "no response\n"
    assert main(["ping", "sslmode=bogus"]) == 3
    assert capsys.readouterr().out == "no attempt (invalid connection parameters)\n"
    assert main(["ping", up, "--timeout", "-1"]) == 3
    assert "timeout must be a positive" in capsys.readouterr().err
