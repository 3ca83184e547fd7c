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

from _harness import main, test_fuzz  # first: it instruments pgproto


def test_one_input(data: bytes) -> None:
    test_fuzz.check_conninfo_bytes(data)


if __name__ == "__main__":
    main(test_one_input, test_fuzz.seed_corpus_conninfo)
