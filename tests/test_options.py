"""The option table is libpq 18's, row for row (compared with the bundled libpq)."""

from __future__ import annotations

from psycopg import pq

import pgproto
from pgproto._options import OPTIONS, SECRET_KEYWORDS


def _libpq_table() -> list[tuple[str, str | None, str | None, str, str, int]]:
    conn = pq.PGconn.connect_start(b"host=/nonexistent/pgproto-test")
    try:
        return [
            (
                o.keyword.decode(),
                None if o.envvar is None else o.envvar.decode(),
                None if o.compiled is None else o.compiled.decode(),
                o.label.decode(),
                o.dispchar.decode(),
                o.dispsize,
            )
            for o in conn.info
        ]
    finally:
        conn.finish()


def test_table_matches_libpq_row_for_row() -> None:
    ours = [(o.keyword, o.envvar, o.compiled, o.label, o.dispchar, o.dispsize) for o in OPTIONS]
    assert ours == _libpq_table()


def test_table_has_the_pg18_keywords() -> None:
    keywords = {o.keyword for o in OPTIONS}
    for keyword in (
        "require_auth",
        "load_balance_hosts",
        "sslcertmode",
        "sslnegotiation",
        "sslkeylogfile",
        "min_protocol_version",
        "max_protocol_version",
        "scram_client_key",
        "scram_server_key",
        "oauth_issuer",
        "oauth_client_id",
        "oauth_client_secret",
        "oauth_scope",
    ):
        assert keyword in keywords


def test_secret_keywords() -> None:
    assert {
        "password",
        "sslpassword",
        "oauth_client_secret",
        "scram_client_key",
        "scram_server_key",
    } == SECRET_KEYWORDS


def test_conninfo_defaults_shape_and_masked_repr() -> None:
    env = pgproto.Environment(environ={"PGPASSWORD": "hunter2-secret"}, user="alice")
    options = pgproto.conninfo_defaults(env=env)
    assert [o.keyword for o in options] == [o.keyword for o in OPTIONS]
    by_keyword = {o.keyword: o for o in options}
    assert by_keyword["user"].val == "alice"
    assert by_keyword["password"].val == "hunter2-secret"
    assert "hunter2-secret" not in repr(options)
    assert by_keyword["port"].val == "5432"
    assert by_keyword["dbname"].val is None
    assert by_keyword["sslcertmode"].val is None


def test_public_names_belong_to_pgproto() -> None:
    for name in pgproto.__all__:
        obj = getattr(pgproto, name)
        if isinstance(obj, type):
            assert obj.__module__ == "pgproto", name
    assert issubclass(pgproto.ConninfoError, pgproto.Error)
    assert issubclass(pgproto.ConninfoError, ValueError)
