"""What the two atheris harnesses share: import paths, pgproto instrumented, the command line.

Imported first by ``fuzz_machine.py`` and ``fuzz_conninfo.py``: it puts
``tests/``, the repository root and ``adapters/`` on ``sys.path``, imports
pgproto under atheris's instrumentation (so coverage guides the fuzzer
through it), then ``test_fuzz``, which holds the properties.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TESTS), str(TESTS.parent), str(TESTS.parent / "adapters")]

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: E402

with atheris.instrument_imports(include=["pgproto"]):
    import pgproto  # noqa: F401

import test_fuzz  # noqa: E402

__all__ = ["main", "test_fuzz"]


def main(test_one_input: Callable[[bytes], None], seeds: Callable[[], list[bytes]]) -> None:
    """``--write-corpus DIR`` writes *seeds* into DIR; anything else goes to libFuzzer."""
    if len(sys.argv) == 3 and sys.argv[1] == "--write-corpus":
        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds()):
            (out / f"seed-{i:03d}").write_bytes(seed)
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
