"""``pgproto connect`` and ``pgproto demo``."""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import ipaddress
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import pgproto

from ._common import ConnectionBase, QueryResult
from ._trace import Tracer

__all__ = ["run_connect", "run_demo"]


def _connect_and_query(
    adapter: str, conninfo: str, sql: str | None, tracer: Tracer | None, kwargs: dict[str, Any]
) -> tuple[ConnectionBase, list[QueryResult]]:
    """Connect with *adapter*, run *sql*, close; returns the (closed) connection."""
    if adapter == "blocking":
        from . import blocking

        with blocking.connect(conninfo, trace=tracer, **kwargs) as conn:
            results = conn.simple_query(sql) if sql else []
        return conn, results
    if adapter == "asyncio":
        from . import asyncio as pg_asyncio

        async def main_asyncio() -> tuple[ConnectionBase, list[QueryResult]]:
            async with await pg_asyncio.connect(conninfo, trace=tracer, **kwargs) as conn:
                results = await conn.simple_query(sql) if sql else []
            return conn, results

        return asyncio.run(main_asyncio())
    if adapter == "trio":
        import trio

        from . import trio as pg_trio

        async def main_trio() -> tuple[ConnectionBase, list[QueryResult]]:
            async with await pg_trio.connect(conninfo, trace=tracer, **kwargs) as conn:
                results = await conn.simple_query(sql) if sql else []
            return conn, results

        return trio.run(main_trio)
    # anyio (on its asyncio backend) or anyio-trio
    import anyio

    from . import anyio as pg_anyio

    async def main_anyio() -> tuple[ConnectionBase, list[QueryResult]]:
        async with await pg_anyio.connect(conninfo, trace=tracer, **kwargs) as conn:
            results = await conn.simple_query(sql) if sql else []
        return conn, results

    return anyio.run(main_anyio, backend="trio" if adapter == "anyio-trio" else "asyncio")


def _report(
    conn: ConnectionBase, results: list[QueryResult], elapsed_ms: float, out: TextIO
) -> None:
    where = conn.hostaddr or "?"
    if conn.host and conn.host != where:
        where = f"{conn.host} ({where})"
    version = ".".join(map(str, conn.protocol_version))
    server = conn.server_parameters.get("server_version", "?")
    out.write(
        f"connected to {where} port {conn.port}: server {server}, "
        f"protocol {version}, backend pid {conn.backend_pid}\n"
        f"  TLS: {'yes' if conn.ssl_in_use else 'no'}; authentication: {conn.auth_method}"
        + (", channel binding used" if conn.channel_binding_used else "")
        + f"; {elapsed_ms:.1f} ms including the query\n"
    )
    for result in results:
        if result.columns:
            out.write("  " + " | ".join(result.columns) + "\n")
        for row in result.rows:
            out.write("  " + " | ".join("NULL" if v is None else v for v in row) + "\n")
        if result.tag is not None:
            out.write(f"  ({result.tag})\n")


def run_connect(
    conninfo: str, *, trace: bool, sql: str | None, adapter: str, out: TextIO, **kwargs: Any
) -> int:
    tracer = Tracer(out)
    try:
        conn, results = _connect_and_query(
            adapter, conninfo, sql, tracer if trace else None, kwargs
        )
    except pgproto.ConninfoError as exc:
        print(f"pgproto: invalid connection parameters: {exc}", file=sys.stderr)
        return 2
    except pgproto.ConnectError as exc:
        print(f"pgproto: {exc}", file=sys.stderr)
        return 1
    except pgproto.ServerError as exc:
        print(f"pgproto: query failed: {exc} (SQLSTATE {exc.sqlstate})", file=sys.stderr)
        return 1
    _report(conn, results, tracer.elapsed_ms(), out)
    return 0


# --------------------------------------------------------------------------
# demo


def _demo_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgproto demo CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (
        directory / "ca.crt",
        directory / "server.crt",
        directory / "server.key",
    )
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def run_demo(*, major: int | None, out: TextIO) -> int:
    from ._cluster import Cluster, ClusterError, TLSFiles, find_binaries

    bindir = None
    for candidate in (major,) if major else (18, 15):
        try:
            bindir = find_binaries(candidate, fetch=candidate == 18)
            break
        except ClusterError as exc:
            out.write(f"(PostgreSQL {candidate} not available: {exc})\n")
    if bindir is None:
        print(
            "pgproto demo: no PostgreSQL server binaries found; run .ci/install-servers",
            file=sys.stderr,
        )
        return 1
    password = "demo-secret"  # noqa: S105 - a throwaway server's throwaway role
    with tempfile.TemporaryDirectory(prefix="pgproto-demo-") as tmp:
        ca, cert, key = _demo_certificates(Path(tmp))
        Path(tmp).chmod(0o755)
        ca.chmod(0o644)
        hba = [
            "local all all trust",
            "hostssl all demo all scram-sha-256",
            "host all all all reject",
        ]
        out.write(f"starting a throwaway PostgreSQL from {bindir} ...\n")
        with Cluster(bindir, hba=hba, tls=TLSFiles(cert, key)) as cluster:
            cluster.create_role("demo", password)
            out.write(
                f"PostgreSQL {cluster.version_string} listening on 127.0.0.1:{cluster.port}\n"
            )
            scenarios = [
                (
                    "Unix socket, trust",
                    cluster.dsn(host=str(cluster.socket_dir), sslmode="disable"),
                    {},
                ),
                (
                    "TCP + TLS (verify-full) + SCRAM-SHA-256-PLUS",
                    cluster.dsn(
                        host="localhost",
                        user="demo",
                        sslmode="verify-full",
                        sslrootcert=str(ca),
                        channel_binding="require",
                    ),
                    {"password": password},
                ),
            ]
            adapters = ["blocking", "asyncio"]
            if importlib.util.find_spec("trio") is not None:
                adapters.append("trio")
            else:
                out.write("(trio is not installed: pip install 'pgproto[trio]' to see it too)\n")
            if importlib.util.find_spec("anyio") is not None:
                adapters.append("anyio")
                if "trio" in adapters:
                    adapters.append("anyio-trio")
            else:
                out.write("(anyio is not installed: pip install 'pgproto[anyio]' to see it too)\n")
            for adapter in adapters:
                for title, dsn, extra in scenarios:
                    shown = dsn if "password" not in extra else dsn + " password=********"
                    out.write(f"\n=== {adapter}: {title}\n    {shown}\n")
                    status = run_connect(
                        dsn,
                        trace=True,
                        sql="SELECT current_user, version()",
                        adapter=adapter,
                        out=out,
                        **extra,
                    )
                    if status:
                        return status
    out.write("\nserver stopped and removed.\n")
    return 0
