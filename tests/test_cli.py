"""The ``pgproto conninfo`` command: per-host parameters with provenance, no secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pgproto_adapters._cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("PG"):
            monkeypatch.delenv(name)
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
