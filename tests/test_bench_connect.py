"""Smoke tests of the benchmarks, so that they cannot rot.

``bench_connect`` runs whole in-process, with two connections per client, against
the session's PostgreSQL 18 (``--*-dsn`` options, so no server of its own):
every client connects in every scenario, the checks pass and the tables, the
verdicts and the profile are printed.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pgproto_adapters._cluster import Cluster
from psycopg.conninfo import make_conninfo
from servers import TLSMaterial, connect_params

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_connect.py"


def _load(monkeypatch: pytest.MonkeyPatch, path: Path = BENCH) -> ModuleType:
    """The benchmark script at *path*, imported as a module of its own name."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_connect_quick(
    pg18: Cluster,
    tls_material: TLSMaterial,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = _load(monkeypatch)
    scram = {"user": "scram_user", "password": "pw-scram"}
    unix = connect_params(pg18, "unix", tls_material, user="trust_user")
    tcp = connect_params(pg18, "tcp", tls_material, **scram)
    tls = connect_params(pg18, "tls", tls_material, **scram, host="127.0.0.1")
    argv = [
        "--quick",
        "--connections=2",
        "--warmup=1",
        "--rounds=2",
        "--profile=2",
        f"--unix-dsn={make_conninfo('', **unix)}",
        f"--tcp-dsn={make_conninfo('', **tcp)}",
        f"--tls-dsn={make_conninfo('', **tls)}",
    ]
    status = bench.main(argv)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "warning" not in out
    for title in bench._TITLES.values():
        assert f"== {title}: N=2 per client" in out
    # pgproto blocking, asyncio and trio everywhere, plus "no cache" in both SCRAM scenarios
    assert out.count("verdict: pgproto") == 3 + 4 + 4
    # The async adapters' verdicts also give libpq's own async path, for reference.
    verdicts = [line for line in out.splitlines() if line.startswith("verdict: pgproto")]
    for line in verdicts:
        assert line.endswith("× psycopg async)") == ("asyncio" in line or "trio" in line), line
    assert "TLS as the server saw it: pgproto TLSv1.3" in out
    assert out.count("== cProfile, pgproto blocking") == 3 + 2


def test_ratio_error_pairs_the_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load(monkeypatch)

    def result(per_round: list[float]) -> Any:
        return bench.Result(
            "c", "f", walls=[0.0] * len(per_round), per_round=per_round, cpu=sum(per_round)
        )

    # The machine slows down round after round: both clients move together,
    # and their ratio (0.8) does not move at all.
    drift = [100.0, 150.0, 90.0, 200.0, 120.0]
    base = result(drift)
    assert bench.ratio_rse(result([0.8 * v for v in drift]), base) == pytest.approx(0.0, abs=1e-12)
    # The same spread, not shared by the baseline: the ratio is that uncertain.
    steady = result([100.0] * 5)
    scattered = result([0.8 * v for v in drift])
    expected = (
        statistics.stdev(scattered.per_round) / math.sqrt(5) / statistics.fmean(scattered.per_round)
    )
    assert bench.ratio_rse(scattered, steady) == pytest.approx(expected)
    assert math.isnan(bench.ratio_rse(result([1.0]), result([1.0])))


CONNINFO_BENCH = BENCH.with_name("bench_conninfo.py")


def test_bench_conninfo_quick(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``benchmarks/bench_conninfo.py`` runs, pgproto and libpq agree on every
    string (else the exit status is 1), and both resolve columns are filled."""
    bench = _load(monkeypatch, CONNINFO_BENCH)
    assert bench.main(["--repeat", "1", "--min-time", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out
    assert "resolve µs" in out
    assert "cached µs" in out
    assert "n/a" not in out


OPCODES_BENCH = BENCH.with_name("bench_opcodes.py")


def test_bench_opcodes_counts_every_client(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``benchmarks/bench_opcodes.py`` connects every client to its fake
    server and counts bytecodes: pgproto's clients run the machine, psycopg's
    do not, and every count is positive."""
    bench = _load(monkeypatch, OPCODES_BENCH)
    assert bench.main(["-n", "2", "--top", "40"]) == 0
    out = capsys.readouterr().out
    blocks = [b for b in out.split("\n\n")[1:] if b.strip()]
    assert [" ".join(b.split()[:2]) for b in blocks] == [
        "psycopg sync",
        "psycopg async",
        "pgproto blocking",
        "pgproto asyncio",
        "pgproto trio",
        "pgproto anyio",
    ]
    for block in blocks:
        total = int(block.splitlines()[0].split()[-1])
        assert total > 500, block
        assert ("pgproto/_machine.py" in block) == block.startswith("pgproto"), block
