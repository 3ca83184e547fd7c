"""Socket options on real connections, side by side with libpq: TCP_NODELAY,
keepalives and their parameters, tcp_user_timeout, close-on-exec and
non-blocking mode, read back with getsockopt from both clients' sockets."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from pgproto_adapters import blocking
from pgproto_adapters._cluster import Cluster

TCP_OPTIONS = {
    "TCP_NODELAY": (socket.IPPROTO_TCP, socket.TCP_NODELAY),
    "SO_KEEPALIVE": (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    "TCP_KEEPIDLE": (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
    "TCP_KEEPINTVL": (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
    "TCP_KEEPCNT": (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    "TCP_USER_TIMEOUT": (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
}


def _options(fd: int) -> dict[str, int]:
    sock = socket.socket(fileno=os.dup(fd))
    try:
        return {
            name: sock.getsockopt(level, option) for name, (level, option) in TCP_OPTIONS.items()
        }
    finally:
        sock.close()


@contextmanager
def _both(conninfo: str) -> Iterator[tuple[int, int]]:
    """(libpq's socket, pgproto's socket), both connected with *conninfo*."""
    theirs = psycopg.connect(conninfo)
    ours = blocking.connect(conninfo)
    try:
        yield theirs.pgconn.socket, ours.fileno()
    finally:
        theirs.close()
        ours.close()


@pytest.mark.parametrize(
    "settings",
    [
        "",
        "keepalives=1 keepalives_idle=7 keepalives_interval=3 keepalives_count=4",
        "tcp_user_timeout=4500",
        "keepalives=0 keepalives_idle=7 tcp_user_timeout=4500",
        "keepalives=0",
    ],
)
def test_tcp_options_match_libpq(pg18: Cluster, settings: str) -> None:
    conninfo = f"{pg18.dsn(host='127.0.0.1', user='trust_user')} sslmode=disable {settings}"
    with _both(conninfo) as (theirs, ours):
        expected = _options(theirs)
        assert _options(ours) == expected
    if "keepalives=0" in settings:
        assert expected["SO_KEEPALIVE"] == 0
    elif "keepalives_idle=7" in settings:
        assert (expected["TCP_KEEPIDLE"], expected["TCP_KEEPCNT"]) == (7, 4)
    assert expected["TCP_NODELAY"] == 1


@pytest.mark.parametrize("settings", ["keepalives_idle=0", "keepalives_interval=-5"])
def test_zero_means_the_system_default(pg18: Cluster, settings: str) -> None:
    # libpq's documentation says zero means the system default, but libpq
    # passes it to setsockopt, which Linux rejects, and the attempt fails.
    # pgproto does what the documentation says (README: Differences).
    conninfo = f"{pg18.dsn(host='127.0.0.1', user='trust_user')} sslmode=disable {settings}"
    name = settings.split("=", maxsplit=1)[0].replace("keepalives_idle", "TCP_KEEPIDLE")
    name = name.replace("keepalives_interval", "TCP_KEEPINTVL")
    with pytest.raises(psycopg.OperationalError, match=rf"setsockopt\({name}\) failed"):
        psycopg.connect(conninfo)
    default = socket.socket()
    try:
        level, option = TCP_OPTIONS[name]
        expected = default.getsockopt(level, option)
    finally:
        default.close()
    with blocking.connect(conninfo) as conn:
        assert _options(conn.fileno())[name] == expected


def test_socket_is_close_on_exec_and_non_blocking(pg18: Cluster) -> None:
    for host in ("127.0.0.1", str(pg18.socket_dir)):
        with blocking.connect(pg18.dsn(host=host, user="trust_user")) as conn:
            fd = conn.fileno()
            assert not os.get_inheritable(fd)
            assert not os.get_blocking(fd)
