"""The table of connection options, as libpq 18 has it (``PQconninfoOptions``).

Order matters: :func:`pgproto.conninfo_defaults` and
:meth:`pgproto.ConnParams.as_dict` list options in exactly this order, as
``PQconndefaults`` and ``PQconninfo`` do.

pgproto behaves like libpq built with TLS and without GSSAPI, SSPI, LDAP or
libcurl, so the compiled defaults below are those of such a build (the same
build as the libpq that psycopg's binary wheel ships).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "OPTIONS",
    "OPTION_BY_KEYWORD",
    "SECRET_KEYWORDS",
    "ConninfoOption",
    "OptionSpec",
]


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One row of the option table."""

    keyword: str
    envvar: str | None
    compiled: str | None
    label: str
    dispchar: str
    dispsize: int


@dataclass(frozen=True, slots=True)
class ConninfoOption:
    """One option as ``PQconndefaults`` reports it: the table row plus a value."""

    keyword: str
    envvar: str | None
    compiled: str | None
    val: str | None
    label: str
    dispchar: str
    dispsize: int

    def __repr__(self) -> str:
        val = self.val
        if val is not None and self.keyword in SECRET_KEYWORDS:
            val = "********"
        return (
            f"ConninfoOption(keyword={self.keyword!r}, envvar={self.envvar!r}, "
            f"compiled={self.compiled!r}, val={val!r}, label={self.label!r}, "
            f"dispchar={self.dispchar!r}, dispsize={self.dispsize!r})"
        )


def _o(
    keyword: str, envvar: str | None, compiled: str | None, label: str, disp: str, size: int
) -> OptionSpec:
    return OptionSpec(keyword, envvar, compiled, label, disp, size)


OPTIONS: Final[tuple[OptionSpec, ...]] = (
    _o("service", "PGSERVICE", None, "Database-Service", "", 20),
    _o("user", "PGUSER", None, "Database-User", "", 20),
    _o("password", "PGPASSWORD", None, "Database-Password", "*", 20),
    _o("passfile", "PGPASSFILE", None, "Database-Password-File", "", 64),
    _o("channel_binding", "PGCHANNELBINDING", "prefer", "Channel-Binding", "", 8),
    _o("connect_timeout", "PGCONNECT_TIMEOUT", None, "Connect-timeout", "", 10),
    _o("dbname", "PGDATABASE", None, "Database-Name", "", 20),
    _o("host", "PGHOST", None, "Database-Host", "", 40),
    _o("hostaddr", "PGHOSTADDR", None, "Database-Host-IP-Address", "", 45),
    _o("port", "PGPORT", "5432", "Database-Port", "", 6),
    _o("client_encoding", "PGCLIENTENCODING", None, "Client-Encoding", "", 10),
    _o("options", "PGOPTIONS", "", "Backend-Options", "", 40),
    _o("application_name", "PGAPPNAME", None, "Application-Name", "", 64),
    _o("fallback_application_name", None, None, "Fallback-Application-Name", "", 64),
    _o("keepalives", None, None, "TCP-Keepalives", "", 1),
    _o("keepalives_idle", None, None, "TCP-Keepalives-Idle", "", 10),
    _o("keepalives_interval", None, None, "TCP-Keepalives-Interval", "", 10),
    _o("keepalives_count", None, None, "TCP-Keepalives-Count", "", 10),
    _o("tcp_user_timeout", None, None, "TCP-User-Timeout", "", 10),
    _o("sslmode", "PGSSLMODE", "prefer", "SSL-Mode", "", 12),
    _o("sslnegotiation", "PGSSLNEGOTIATION", "postgres", "SSL-Negotiation", "", 9),
    _o("sslcompression", "PGSSLCOMPRESSION", "0", "SSL-Compression", "", 1),
    _o("sslcert", "PGSSLCERT", None, "SSL-Client-Cert", "", 64),
    _o("sslkey", "PGSSLKEY", None, "SSL-Client-Key", "", 64),
    _o("sslcertmode", "PGSSLCERTMODE", None, "SSL-Client-Cert-Mode", "", 8),
    _o("sslpassword", None, None, "SSL-Client-Key-Password", "*", 20),
    _o("sslrootcert", "PGSSLROOTCERT", None, "SSL-Root-Certificate", "", 64),
    _o("sslcrl", "PGSSLCRL", None, "SSL-Revocation-List", "", 64),
    _o("sslcrldir", "PGSSLCRLDIR", None, "SSL-Revocation-List-Dir", "", 64),
    _o("sslsni", "PGSSLSNI", "1", "SSL-SNI", "", 1),
    _o("requirepeer", "PGREQUIREPEER", None, "Require-Peer", "", 10),
    _o("require_auth", "PGREQUIREAUTH", None, "Require-Auth", "", 14),
    _o("min_protocol_version", "PGMINPROTOCOLVERSION", None, "Min-Protocol-Version", "", 6),
    _o("max_protocol_version", "PGMAXPROTOCOLVERSION", None, "Max-Protocol-Version", "", 6),
    _o(
        "ssl_min_protocol_version",
        "PGSSLMINPROTOCOLVERSION",
        "TLSv1.2",
        "SSL-Minimum-Protocol-Version",
        "",
        8,
    ),
    _o(
        "ssl_max_protocol_version",
        "PGSSLMAXPROTOCOLVERSION",
        None,
        "SSL-Maximum-Protocol-Version",
        "",
        8,
    ),
    _o("gssencmode", "PGGSSENCMODE", "disable", "GSSENC-Mode", "", 8),
    _o("krbsrvname", "PGKRBSRVNAME", "postgres", "Kerberos-service-name", "", 20),
    _o("gsslib", "PGGSSLIB", None, "GSS-library", "", 7),
    _o("gssdelegation", "PGGSSDELEGATION", "0", "GSS-delegation", "", 1),
    _o("replication", None, None, "Replication", "D", 5),
    _o("target_session_attrs", "PGTARGETSESSIONATTRS", "any", "Target-Session-Attrs", "", 15),
    _o("load_balance_hosts", "PGLOADBALANCEHOSTS", "disable", "Load-Balance-Hosts", "", 8),
    _o("scram_client_key", None, None, "SCRAM-Client-Key", "D", 64),
    _o("scram_server_key", None, None, "SCRAM-Server-Key", "D", 64),
    _o("oauth_issuer", None, None, "OAuth-Issuer", "", 40),
    _o("oauth_client_id", None, None, "OAuth-Client-ID", "", 40),
    _o("oauth_client_secret", None, None, "OAuth-Client-Secret", "*", 40),
    _o("oauth_scope", None, None, "OAuth-Scope", "", 15),
    _o("sslkeylogfile", None, None, "SSL-Key-Log-File", "D", 64),
)

OPTION_BY_KEYWORD: Final[dict[str, OptionSpec]] = {o.keyword: o for o in OPTIONS}

#: Options whose values are never shown: the "*" options of the table, plus the
#: SCRAM keys, which authenticate as well as a password does.
SECRET_KEYWORDS: Final[frozenset[str]] = frozenset(
    {o.keyword for o in OPTIONS if o.dispchar == "*"} | {"scram_client_key", "scram_server_key"}
)
