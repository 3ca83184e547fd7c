"""atheris harness: connection strings into parse_conninfo and resolve_params.

The input (after byte 0) is decoded as UTF-8 with ``surrogateescape`` and
given as a keyword/value string or URI; byte 0 chooses whether a marker
password is planted in it (``password='...'``, a URI's user information, a
URI's ``?password=``).  The property is ``test_fuzz.check_conninfo``'s:
``parse_conninfo`` and ``resolve_params`` (isolated environment, with and
without dbname expansion) raise nothing but ``ConninfoError``, and no error
message or warning quotes the planted password.

Run from the repository root (see tests/fuzz/README.md)::

    .venv/bin/python tests/fuzz/fuzz_conninfo.py -max_total_time=600 CORPUS_DIR
    .venv/bin/python tests/fuzz/fuzz_conninfo.py --write-corpus CORPUS_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TESTS), str(TESTS.parent), str(TESTS.parent / "adapters")]

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: E402

with atheris.instrument_imports(include=["pgproto"]):
    import pgproto  # noqa: F401

import test_fuzz  # noqa: E402


def test_one_input(data: bytes) -> None:
    test_fuzz.check_conninfo_bytes(data)


def write_corpus(directory: str) -> None:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(test_fuzz.seed_corpus_conninfo()):
        (out / f"seed-{i:03d}").write_bytes(seed)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-corpus":
        write_corpus(sys.argv[2])
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
