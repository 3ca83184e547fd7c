"""atheris harness: server bytes into the connection and cancel machines, in every state.

Byte 0 of an input picks the state (``test_fuzz.STATE_LIST``: waiting for a
name or a transport, SSLRequest's reply, mid-TLS-handshake against a real
in-memory OpenSSL server, authentication, SCRAM, after AuthenticationOk,
target_session_attrs checks, idle, in a query, closed, and the cancel
machine's states); the rest is a list of operations (``test_fuzz.decode_ops``:
raw server bytes, bytes sealed in TLS records by the fake server, the fake
server's own handshake answers, EOF, timer and deadline expiry, close,
send_query, reset).  The properties are ``test_fuzz.check_run``'s: only
``pgproto.Error`` escapes, every status change is in the table, no call
loops, the receive buffer stays within its limits, no password in an error.

Run from the repository root (see tests/fuzz/README.md)::

    .venv/bin/python tests/fuzz/fuzz_machine.py -max_total_time=600 CORPUS_DIR
    .venv/bin/python tests/fuzz/fuzz_machine.py --write-corpus CORPUS_DIR
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
    state, ops = test_fuzz.decode_ops(data)
    test_fuzz.fuzz_run(state, ops)


def write_corpus(directory: str) -> None:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(test_fuzz.seed_corpus_machine()):
        (out / f"seed-{i:03d}").write_bytes(seed)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-corpus":
        write_corpus(sys.argv[2])
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
