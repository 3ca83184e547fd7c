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

from _harness import main, test_fuzz  # first: it instruments pgproto


def test_one_input(data: bytes) -> None:
    state, ops = test_fuzz.decode_ops(data)
    test_fuzz.fuzz_run(state, ops)


if __name__ == "__main__":
    main(test_one_input, test_fuzz.seed_corpus_machine)
