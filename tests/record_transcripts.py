"""Re-record the byte transcripts in tests/data/transcripts/ from real servers.

Run from the repository root::

    .venv/bin/python tests/record_transcripts.py [--only NAME ...] [--list]

It starts throwaway PostgreSQL 15 and 18 clusters with the test bed's role
matrix and pg_hba rules (``servers.ROLES``, ``servers.hba_lines()``) but
without TLS -- the transcripts are plaintext, since TLS ciphertext cannot be
replayed, and a server with ``ssl = off`` is also what answers ``N`` to
SSLRequest.  Each scenario drives a :class:`pgproto.ConnectionStateMachine`
over a real socket (the loop of ``pgproto_adapters.blocking``, blocking
sockets with a timeout instead of selectors) and records every chunk that
crossed the socket.  The SCRAM nonce is the fixed ``transcripts.NONCE``, so
replay reproduces the client bytes exactly.

Passwords are the test bed's throwaway constants; they are stored in the
transcripts (replay needs them) but never printed.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers
import transcripts
from pgproto_adapters._cluster import Cluster, find_binaries
from transcripts import Replay, Transcript

import pgproto
from pgproto import (
    NEED_DATA,
    Address,
    CloseConnection,
    OpenConnection,
    PollingStatus,
    ResolveHost,
)

TIMEOUT = 10.0
RECV_SIZE = 65536


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    major: int
    transport: str  # "unix" or "tcp"
    user: str
    password: str | None = None  # default: the role's password from servers.ROLES
    query: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def params(self, cluster: Cluster) -> dict[str, str]:
        params = {
            "host": str(cluster.socket_dir) if self.transport == "unix" else "127.0.0.1",
            "port": str(cluster.port),
            "dbname": "postgres",
            "user": self.user,
            "sslmode": "disable",
            "application_name": "pgproto-transcript",
        }
        password = self.password if self.password is not None else servers.ROLES[self.user].password
        if password is not None:
            params["password"] = password
        params.update(self.extra)
        return params


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "trust_unix_pg18",
        "trust over the Unix socket, then 'select 1, null' and Terminate",
        18,
        "unix",
        "trust_user",
        query="select 1, null",
    ),
    Scenario("password_pg18", "cleartext password over TCP", 18, "tcp", "password_user"),
    Scenario("md5_pg18", "MD5 password over TCP", 18, "tcp", "md5_user"),
    Scenario("md5_pg15", "MD5 password over TCP", 15, "tcp", "md5_user"),
    Scenario("scram_pg15", "SCRAM-SHA-256 over TCP", 15, "tcp", "scram_user"),
    Scenario(
        "scram_pg18",
        "SCRAM-SHA-256 over TCP, then 'select 1, null' and Terminate",
        18,
        "tcp",
        "scram_user",
        query="select 1, null",
    ),
    Scenario(
        "scram_saslprep_pg18",
        "SCRAM-SHA-256 with a password that SASLprep changes (no-break space, ligature)",
        18,
        "tcp",
        "scram_utf8_user",
    ),
    Scenario(
        "wrong_password_pg18",
        "SCRAM-SHA-256 with a wrong password: ErrorResponse 28P01",
        18,
        "tcp",
        "scram_user",
        password="not-the-password",
    ),
    Scenario(
        "no_hba_entry_pg18",
        "a role with no pg_hba line for the Unix socket: ErrorResponse 28000",
        18,
        "unix",
        "nossl_user",
    ),
    Scenario(
        "ssl_refused_prefer_pg18",
        "sslmode=prefer against ssl=off: SSLRequest, 'N', StartupMessage on the same socket, SCRAM",
        18,
        "tcp",
        "scram_user",
        extra={"sslmode": "prefer"},
    ),
    Scenario(
        "negotiate_pg15",
        "max_protocol_version=3.2 against PostgreSQL 15: NegotiateProtocolVersion, then 3.0",
        15,
        "tcp",
        "trust_user",
        extra={"max_protocol_version": "3.2"},
    ),
    Scenario(
        "protocol_3_2_pg18",
        "max_protocol_version=3.2 against PostgreSQL 18: a 32-byte cancel key",
        18,
        "tcp",
        "trust_user",
        extra={"max_protocol_version": "3.2"},
    ),
)


def _sockaddr(address: Address) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    if address.kind == "unix":
        return socket.AF_UNIX, address.address
    version = ipaddress.ip_address(address.address).version
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    return family, (address.address, address.port)


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


def record(scenario: Scenario, cluster: Cluster) -> Transcript:
    """Connect once over a real socket and write down every chunk."""
    params = scenario.params(cluster)
    machine = transcripts.make_machine(params, transcripts.NONCE)
    result = Replay(machine=machine)
    resolved: dict[str, list[str]] = {}
    opened: list[Address] = []
    sock: socket.socket | None = None

    def pump() -> PollingStatus:
        nonlocal sock
        while True:
            event = machine.next_event()
            if event is NEED_DATA:
                status = machine.poll()
                if status is PollingStatus.WRITING:
                    data = machine.data_to_send()
                    assert sock is not None
                    sock.sendall(data)
                    result.steps.append(("client", data))
                    continue
                if status is not PollingStatus.READING:
                    return status
                assert sock is not None
                data = sock.recv(RECV_SIZE)
                result.steps.append(("server", data))
                machine.receive_data(data)
                continue
            result.events.append(event)
            if isinstance(event, ResolveHost):
                addresses = _resolve(event.host, event.port)
                resolved[event.host] = addresses
                machine.addresses_resolved(addresses)
            elif isinstance(event, OpenConnection):
                family, where = _sockaddr(event.address)
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.settimeout(TIMEOUT)
                sock.connect(where)
                opened.append(event.address)
                machine.connection_made()
            elif isinstance(event, CloseConnection):
                if sock is not None:
                    if event.data:
                        sock.sendall(event.data)
                    sock.close()
                    sock = None
                result.steps.append(("close", event.data))

    try:
        if pump() is PollingStatus.OK:
            if scenario.query is not None:
                machine.send_query(scenario.query)
                pump()
            machine.close()
            pump()
    except pgproto.Error as exc:
        result.error = exc
    finally:
        if sock is not None:
            sock.close()
    if len(set(opened)) != 1:
        raise RuntimeError(f"{scenario.name}: expected one address, got {opened}")
    return Transcript(
        name=scenario.name,
        description=scenario.description,
        server_major=cluster.major,
        server_version=cluster.version_string,
        params=params,
        nonce=transcripts.NONCE,
        resolved=resolved,
        address=opened[0],
        query=scenario.query,
        steps=tuple(result.steps),
        expected=transcripts.outcome(result),
    )


def _start(major: int) -> Cluster:
    cluster = Cluster(find_binaries(major, fetch=True), hba=servers.hba_lines())
    try:
        cluster.start()
        for role in servers.ROLES.values():
            cluster.create_role(role.name, role.password, password_encryption=role.stored)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="scenario names to record")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--out", type=Path, default=transcripts.TRANSCRIPT_DIR)
    args = parser.parse_args(argv)
    if args.list:
        for scenario in SCENARIOS:
            print(f"{scenario.name:28} {scenario.description}")
        return 0
    chosen = [s for s in SCENARIOS if args.only is None or s.name in args.only]
    unknown = set(args.only or ()) - {s.name for s in SCENARIOS}
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    clusters: dict[int, Cluster] = {}
    try:
        for scenario in chosen:
            if scenario.major not in clusters:
                clusters[scenario.major] = _start(scenario.major)
            transcript = record(scenario, clusters[scenario.major])
            path = args.out / f"{scenario.name}.json"
            path.write_text(transcript.to_json(), encoding="utf-8")
            expected = transcript.expected
            summary = expected["status"]
            if summary == "ok":
                summary += f" auth={expected['auth_method']} version={expected['server_version']}"
            else:
                summary += f" {expected.get('attempt_error_type')} {expected.get('sqlstate')}"
            print(f"{scenario.name:28} {summary:40} -> {path}")
    finally:
        for cluster in clusters.values():
            cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
