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


#: The conninfo keywords zero is tested for, and the option each sets.
ZERO_SETTINGS = {"keepalives_idle": "TCP_KEEPIDLE", "keepalives_interval": "TCP_KEEPINTVL"}


def _options(fd: int) -> dict[str, int]:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return {
            name: sock.getsockopt(level, option) for name, (level, option) in TCP_OPTIONS.items()
        }


@contextmanager
def _both(conninfo: str) -> Iterator[tuple[int, int]]:
    """(libpq's socket, pgproto's socket), both connected with *conninfo*."""
    with psycopg.connect(conninfo) as theirs, blocking.connect(conninfo) as ours:
        yield theirs.pgconn.socket, ours.fileno()


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
    name = ZERO_SETTINGS[settings.split("=", maxsplit=1)[0]]
    with pytest.raises(psycopg.OperationalError, match=rf"setsockopt\({name}\) failed"):
        psycopg.connect(conninfo)
    with socket.socket() as default:
        expected = default.getsockopt(*TCP_OPTIONS[name])
    with blocking.connect(conninfo) as conn:
        assert _options(conn.fileno())[name] == expected


def test_socket_is_close_on_exec_and_non_blocking(pg18: Cluster) -> None:
    for host in ("127.0.0.1", str(pg18.socket_dir)):
        with blocking.connect(pg18.dsn(host=host, user="trust_user")) as conn:
            fd = conn.fileno()
            assert not os.get_inheritable(fd)
            assert not os.get_blocking(fd)
