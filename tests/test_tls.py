"""``pgproto._tls`` against an in-memory OpenSSL server, without sockets.

Every handshake runs between a :class:`TLSEngine` and a server-side
``SSLObject`` (``tls_helpers.FakeServer``), pumping bytes through memory BIOs.
Error texts are libpq's (spec sections 6.5-6.7).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import ssl
import stat
from dataclasses import FrozenInstanceError, replace
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from tls_helpers import (
    FakeServer,
    build_cert,
    handshake,
    issue,
    make_crl,
    serial_of,
    server_context,
)

from pgproto import Environment, resolve_params
from pgproto._errors import LocalProtocolError, PgprotoWarning, TLSError
from pgproto._tls import (
    TLSContextInfo,
    TLSEngine,
    TLSSettings,
    _reason_text,
    channel_binding_hash,
    create_context,
    inet_aton,
    key_permissions_ok,
    sni_name,
    verify_host_name,
)

ROOT_HINT = (
    "Either provide the file, use the system's trusted roots with sslrootcert=system, "
    "or change sslmode to disable server certificate verification."
)
SECRET = "pass-s3cr3t-phrase"


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def leaf(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("localhost", "127.0.0.1", "::1")


@pytest.fixture
def root_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "root.crt"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def make_settings(**overrides: Any) -> TLSSettings:
    values: dict[str, Any] = {
        "sslmode": "prefer",
        "host": "localhost",
        "sslrootcert": None,
        "sslcrl": None,
        "sslcrldir": None,
        "sslcert": None,
        "sslkey": None,
        "sslpassword": None,
        "sslcertmode": "allow",
        "ssl_min_protocol_version": "TLSv1.2",
        "ssl_max_protocol_version": None,
        "sslsni": True,
        "sslcompression": False,
        "sslkeylogfile": None,
        "direct": False,
        "home": None,
    }
    values.update(overrides)
    return TLSSettings(**values)


def connect(
    context: ssl.SSLContext, **overrides: Any
) -> tuple[TLSEngine, FakeServer, TLSContextInfo]:
    """Handshake with a server using *context*; raises what the engine raises."""
    settings = make_settings(**overrides)
    info = create_context(settings)
    engine = TLSEngine(info, settings)
    server = FakeServer(context)
    handshake(engine, server)
    return engine, server, info


def private(path: Path) -> str:
    path.chmod(0o600)
    return str(path)


# --------------------------------------------------------------------------
# settings


def test_from_params_applies_libpq_prefix_rules() -> None:
    env = Environment(environ={}, home=None, user="u")
    params = resolve_params(
        "host=db.example sslmode=require sslsni=0 sslcompression=1 sslnegotiation=direct",
        env=env,
    )
    settings = TLSSettings.from_params(params, params.hosts[0], home="/h")
    assert settings.sslmode == "require"
    assert settings.host == "db.example"
    assert settings.sslsni is False
    assert settings.sslcompression is True
    assert settings.direct is True
    assert settings.home == "/h"
    assert settings.sslcertmode == "allow"
    assert settings.ssl_min_protocol_version == "TLSv1.2"


def test_from_params_defaults_and_hostaddr_only() -> None:
    env = Environment(environ={}, home=None, user="u")
    params = resolve_params("hostaddr=127.0.0.1", env=env)
    settings = TLSSettings.from_params(params, params.hosts[0], home=None)
    assert settings.host is None  # never the hostaddr
    assert settings.sslmode == "prefer"
    assert settings.sslsni is True
    assert settings.sslcompression is False
    assert settings.direct is False


def test_repr_hides_password() -> None:
    assert SECRET not in repr(make_settings(sslpassword=SECRET))


def test_context_basics() -> None:
    info = create_context(make_settings())
    context = info.context
    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_NONE
    assert not context.options & getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert (
        create_context(make_settings(sslcompression=True)).context.options & (ssl.OP_NO_COMPRESSION)
        == 0
    )
    assert create_context(make_settings(sslcompression=True)).context is not context


# --------------------------------------------------------------------------
# root certificates


@pytest.mark.parametrize("sslmode", ["verify-ca", "verify-full"])
def test_verify_modes_need_a_root(sslmode: str, tmp_path: Path) -> None:
    with pytest.raises(TLSError) as info:
        create_context(make_settings(sslmode=sslmode, home=str(tmp_path)))
    path = tmp_path / ".postgresql" / "root.crt"
    assert str(info.value) == f'root certificate file "{path}" does not exist\n{ROOT_HINT}'


def test_verify_mode_without_home() -> None:
    with pytest.raises(TLSError) as info:
        create_context(make_settings(sslmode="verify-ca"))
    assert str(info.value) == (
        f"could not get home directory to locate root certificate file\n{ROOT_HINT}"
    )


def test_explicit_missing_root_in_verify_mode(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.crt")
    with pytest.raises(TLSError, match=r'^root certificate file ".*nope.crt" does not exist\n'):
        create_context(make_settings(sslmode="verify-full", sslrootcert=missing))


@pytest.mark.parametrize("sslmode", ["allow", "prefer", "require"])
def test_weak_modes_without_root_do_not_verify(
    sslmode: str, other_ca: trustme.CA, tmp_path: Path
) -> None:
    # The server's certificate comes from a CA nobody trusts: no verification.
    untrusted = other_ca.issue_cert("localhost")
    missing = str(tmp_path / "missing.crt")
    engine, _, info = connect(server_context(untrusted), sslmode=sslmode, sslrootcert=missing)
    assert info.root_loaded is False
    assert info.context.verify_mode == ssl.CERT_NONE
    assert engine.verified_chain is False
    assert engine.peer_certificate_der is not None


def test_default_root_under_home_verifies_in_prefer(
    ca: trustme.CA, other_ca: trustme.CA, leaf: trustme.LeafCert, tmp_path: Path
) -> None:
    (tmp_path / ".postgresql").mkdir()
    ca.cert_pem.write_to_path(str(tmp_path / ".postgresql" / "root.crt"))
    engine, _, info = connect(server_context(leaf), home=str(tmp_path))
    assert info.root_source == str(tmp_path / ".postgresql" / "root.crt")
    assert info.crl_loaded is False
    assert engine.verified_chain is True
    # ... and the chain is checked even in prefer mode.
    with pytest.raises(TLSError) as failure:
        connect(server_context(other_ca.issue_cert("localhost")), home=str(tmp_path))
    assert str(failure.value).startswith("SSL error: certificate verify failed: ")
    assert isinstance(failure.value.__cause__, ssl.SSLCertVerificationError)


def test_verify_ca_chain_failure(other_ca: trustme.CA, root_file: str) -> None:
    with pytest.raises(TLSError) as info:
        connect(
            server_context(other_ca.issue_cert("localhost")),
            sslmode="verify-ca",
            sslrootcert=root_file,
        )
    assert str(info.value) == (
        "SSL error: certificate verify failed: unable to get local issuer certificate"
    )


def test_verify_ca_ignores_host_name(ca: trustme.CA, root_file: str) -> None:
    engine, _, _ = connect(
        server_context(ca.issue_cert("elsewhere.example")),
        sslmode="verify-ca",
        sslrootcert=root_file,
    )
    assert engine.verified_chain is True
    assert engine.host_verified is False


def test_unreadable_root_file(tmp_path: Path) -> None:
    bad = tmp_path / "root.crt"
    bad.write_text("not a certificate\n")
    with pytest.raises(TLSError) as info:
        create_context(make_settings(sslrootcert=str(bad)))
    assert str(info.value) == f'could not read root certificate file "{bad}": ' + (
        "no certificate or crl found"
    )


def test_system_roots(leaf: trustme.LeafCert) -> None:
    # The trustme CA is in no system store.
    settings = make_settings(sslmode="verify-full", sslrootcert="system")
    info = create_context(settings)
    assert info.root_source == "system"
    assert info.context.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(TLSError, match=r"^SSL error: certificate verify failed: "):
        connect(server_context(leaf), sslmode="verify-full", sslrootcert="system")


# --------------------------------------------------------------------------
# CRLs


def test_crl_revoking_server_certificate(
    ca: trustme.CA, leaf: trustme.LeafCert, root_file: str, tmp_path: Path
) -> None:
    crl = tmp_path / "root.crl"
    crl.write_bytes(make_crl(ca, [serial_of(leaf)]))
    settings = {"sslmode": "verify-ca", "sslrootcert": root_file, "sslcrl": str(crl)}
    assert create_context(make_settings(**settings)).crl_loaded
    with pytest.raises(TLSError) as info:
        connect(server_context(leaf), **settings)
    assert str(info.value) == "SSL error: certificate verify failed: certificate revoked"


def test_default_crl_under_home(ca: trustme.CA, leaf: trustme.LeafCert, tmp_path: Path) -> None:
    directory = tmp_path / ".postgresql"
    directory.mkdir()
    ca.cert_pem.write_to_path(str(directory / "root.crt"))
    (directory / "root.crl").write_bytes(make_crl(ca, [12345]))
    engine, _, info = connect(server_context(leaf), sslmode="verify-ca", home=str(tmp_path))
    assert info.crl_loaded is True
    assert engine.verified_chain is True
    (directory / "root.crl").write_bytes(make_crl(ca, [serial_of(leaf)]))
    with pytest.raises(TLSError, match=r"certificate revoked"):
        connect(server_context(leaf), sslmode="verify-ca", home=str(tmp_path))


def test_crl_failures_are_ignored(leaf: trustme.LeafCert, root_file: str, tmp_path: Path) -> None:
    garbage = tmp_path / "bad.crl"
    garbage.write_text("junk\n")
    for crl in (str(garbage), str(tmp_path / "missing.crl")):
        engine, _, info = connect(server_context(leaf), sslrootcert=root_file, sslcrl=crl)
        assert info.crl_loaded is False
        assert engine.verified_chain is True


def test_crl_directory_without_matching_crl(
    leaf: trustme.LeafCert, root_file: str, tmp_path: Path
) -> None:
    # Like libpq: checking is on, and a CA without a CRL fails verification.
    empty = tmp_path / "crls"
    empty.mkdir()
    settings = {"sslrootcert": root_file, "sslcrldir": str(empty)}
    assert create_context(make_settings(**settings)).crl_loaded is True
    with pytest.raises(TLSError, match=r"unable to get certificate CRL"):
        connect(server_context(leaf), **settings)


def test_no_crl_with_system_roots() -> None:
    info = create_context(make_settings(sslmode="verify-full", sslrootcert="system", sslcrl="/x"))
    assert info.crl_loaded is False


# --------------------------------------------------------------------------
# verify-full


def test_verify_full_good_name(leaf: trustme.LeafCert, root_file: str) -> None:
    engine, _, _ = connect(server_context(leaf), sslmode="verify-full", sslrootcert=root_file)
    assert engine.host_verified is True
    assert engine.verified_chain is True


def test_verify_full_wrong_name(ca: trustme.CA, root_file: str) -> None:
    context = server_context(ca.issue_cert("wrong.example"))
    with pytest.raises(TLSError) as info:
        connect(context, sslmode="verify-full", sslrootcert=root_file)
    assert str(info.value) == (
        'server certificate for "wrong.example" does not match host name "localhost"'
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "::1", "0:0::1"])
def test_verify_full_ip_hosts(leaf: trustme.LeafCert, root_file: str, host: str) -> None:
    engine, server, _ = connect(
        server_context(leaf), sslmode="verify-full", sslrootcert=root_file, host=host
    )
    assert engine.host_verified is True
    assert server.sni == [None]


def test_verify_full_needs_host_name(leaf: trustme.LeafCert, root_file: str) -> None:
    with pytest.raises(TLSError) as info:
        connect(server_context(leaf), sslmode="verify-full", sslrootcert=root_file, host=None)
    assert str(info.value) == "host name must be specified for a verified SSL connection"


def test_verify_full_with_cn_only_certificate(ca: trustme.CA, root_file: str) -> None:
    context = server_context(issue(ca, cn="localhost"))
    engine, _, _ = connect(context, sslmode="verify-full", sslrootcert=root_file)
    assert engine.host_verified is True


def der(sans: list[x509.GeneralName] | None = None, cn: str | None = None) -> bytes:
    cert, _ = build_cert(sans=sans or [], cn=cn, algorithm=hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER)


def dns(*names: str) -> list[x509.GeneralName]:
    return [x509.DNSName(n) for n in names]


def ip(*addresses: str) -> list[x509.GeneralName]:
    return [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]


@pytest.mark.parametrize(
    ("pattern", "host", "ok"),
    [
        ("*.example.com", "db.example.com", True),
        ("*.example.com", "DB.Example.COM", True),
        ("*.EXAMPLE.com", "x.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("f*.example.com", "foo.example.com", False),  # only a leading "*." counts
        ("*.*.example.com", "a.b.example.com", False),
        ("*", "localhost", False),
        ("*.", "a.", False),
        ("db.example.com", "DB.EXAMPLE.COM", True),
    ],
)
def test_wildcards(pattern: str, host: str, ok: bool) -> None:
    certificate = der(dns(pattern))
    if ok:
        verify_host_name(certificate, host)
    else:
        with pytest.raises(TLSError, match=r"does not match host name"):
            verify_host_name(certificate, host)


def test_cn_fallback_rules() -> None:
    # A DNS host uses the CN only when there is no dNSName SAN.
    verify_host_name(der(ip("10.0.0.1"), cn="db.example"), "db.example")
    with pytest.raises(TLSError) as info:
        verify_host_name(der(dns("other.example"), cn="db.example"), "db.example")
    assert str(info.value) == (
        'server certificate for "other.example" does not match host name "db.example"'
    )
    # An IP host uses the CN when there is no iPAddress SAN, even beside dNSNames.
    verify_host_name(der(dns("other.example"), cn="10.1.2.3"), "10.1.2.3")
    # ... but not when there is one.
    with pytest.raises(TLSError, match=r'^server certificate for "10\.0\.0\.9" does not match'):
        verify_host_name(der(ip("10.0.0.9"), cn="10.1.2.3"), "10.1.2.3")
    # Only the first CN is looked at.
    cert, _ = build_cert(algorithm=hashes.SHA256())
    two_cns = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(x509.NameOID.COMMON_NAME, "first.example"),
                    x509.NameAttribute(x509.NameOID.COMMON_NAME, "second.example"),
                ]
            )
        )
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(1)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    key = ec.generate_private_key(ec.SECP256R1())
    two = two_cns.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    verify_host_name(two, "first.example")
    with pytest.raises(TLSError, match=r'^server certificate for "first.example" does not'):
        verify_host_name(two, "second.example")


def test_ip_host_matches_dns_san_text() -> None:
    verify_host_name(der(dns("192.168.0.1")), "192.168.0.1")


def test_dns_host_against_ip_sans() -> None:
    verify_host_name(der(ip("192.168.0.1")), "0xc0.168.0.1")  # inet_aton form
    with pytest.raises(TLSError, match=r'^server certificate for "192\.168\.0\.1" does not'):
        verify_host_name(der(ip("192.168.0.1")), "db.example")


def test_ipv6_san() -> None:
    verify_host_name(der(ip("2001:db8::1")), "2001:DB8:0::1")
    with pytest.raises(TLSError, match=r'"2001:db8::1" does not match host name "2001:db8::2"'):
        verify_host_name(der(ip("2001:db8::1")), "2001:db8::2")


def test_failure_message_counts_names() -> None:
    with pytest.raises(TLSError) as info:
        verify_host_name(der(dns("a.example", "b.example") + ip("10.0.0.1")), "c.example")
    assert str(info.value) == (
        'server certificate for "a.example" (and 2 other names) does not match host name '
        '"c.example"'
    )
    with pytest.raises(TLSError) as info:
        verify_host_name(der([x509.UniformResourceIdentifier("https://x.example/")]), "x.example")
    assert str(info.value) == "could not get server's host name from server certificate"


def test_embedded_nul_is_an_error() -> None:
    with pytest.raises(TLSError, match=r"^SSL certificate's name contains embedded null$"):
        verify_host_name(der(dns("evil.example\x00.good.example")), "evil.example")
    with pytest.raises(TLSError, match=r"embedded null"):
        verify_host_name(der(cn="evil.example\x00x"), "evil.example")
    # A match before the bad name ends the walk first.
    verify_host_name(der(dns("ok.example", "bad\x00")), "ok.example")


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1.2", "10.1.0.2"),
        ("0x7f.1", "127.0.0.1"),
        ("017.0.0.1", "15.0.0.1"),
        ("4294967295", "255.255.255.255"),
        ("1.16777215", "1.255.255.255"),
        ("0x", "0.0.0.0"),  # noqa: S104 -- an address, not a bind
        ("1.2.3.4 trailing", "1.2.3.4"),
        ("1.2.3.256", None),
        ("4294967296", None),
        ("1.16777216", None),
        ("08", None),
        ("1.2.3.4.5", None),
        ("1.", None),
        ("", None),
        (".1", None),
        ("localhost", None),
        ("1.2.3.4x", None),
        ("::1", None),
    ],
)
def test_inet_aton(text: str, address: str | None) -> None:
    expected = None if address is None else ipaddress.IPv4Address(address).packed
    assert inet_aton(text) == expected


# --------------------------------------------------------------------------
# SNI and ALPN


@pytest.mark.parametrize(
    ("host", "sslsni", "expected"),
    [
        ("localhost", True, "localhost"),
        ("db.example", True, "db.example"),
        ("localhost", False, None),
        ("127.0.0.1", True, None),
        ("127.1", True, None),
        ("::1", True, None),
        ("fe80::1%eth0", True, None),
        (None, True, None),
        ("", True, None),
    ],
)
def test_sni(leaf: trustme.LeafCert, host: str | None, sslsni: bool, expected: str | None) -> None:
    assert sni_name(make_settings(host=host, sslsni=sslsni)) == expected
    _, server, _ = connect(server_context(leaf), host=host, sslsni=sslsni)
    assert server.sni == [expected]


def test_sni_name_python_cannot_encode() -> None:
    # libpq would send these bytes as they are; Python's IDNA step refuses.
    settings = make_settings(host="a..b")
    with pytest.raises(TLSError, match=r"^could not set SSL Server Name Indication \(SNI\): "):
        TLSEngine(create_context(settings), settings)


def test_alpn_always_offered(leaf: trustme.LeafCert) -> None:
    engine, server, _ = connect(server_context(leaf))
    assert engine.alpn == "postgresql"
    assert server.obj.selected_alpn_protocol() == "postgresql"


def test_alpn_not_required_without_direct(leaf: trustme.LeafCert) -> None:
    engine, _, _ = connect(server_context(leaf, alpn=False), sslmode="require")
    assert engine.alpn is None


def test_direct_requires_alpn(leaf: trustme.LeafCert) -> None:
    with pytest.raises(TLSError) as info:
        connect(server_context(leaf, alpn=False), sslmode="require", direct=True)
    assert str(info.value) == (
        "direct SSL connection was established without ALPN protocol negotiation extension"
    )
    engine, _, _ = connect(server_context(leaf), sslmode="require", direct=True)
    assert engine.alpn == "postgresql"


def test_direct_rejects_other_alpn(leaf: trustme.LeafCert, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(sslmode="require", direct=True)
    engine = TLSEngine(create_context(settings), settings)
    monkeypatch.setattr(engine._ssl, "selected_alpn_protocol", lambda: "h2")
    with pytest.raises(TLSError, match=r"^SSL connection was established with unexpected ALPN"):
        handshake(engine, FakeServer(server_context(leaf)))


def test_server_certificate_is_mandatory(
    leaf: trustme.LeafCert, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(sslmode="require")
    engine = TLSEngine(create_context(settings), settings)
    monkeypatch.setattr(engine._ssl, "getpeercert", lambda binary_form=False: None)
    with pytest.raises(TLSError, match=r"^certificate could not be obtained: "):
        handshake(engine, FakeServer(server_context(leaf)))
    with pytest.raises(TLSError):  # the failure sticks
        engine.do_handshake()


# --------------------------------------------------------------------------
# protocol versions


def test_min_version_above_server(leaf: trustme.LeafCert) -> None:
    context = server_context(leaf, maximum=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(TLSError) as info:
        connect(context, ssl_min_protocol_version="TLSv1.3")
    assert str(info.value) == (
        "SSL error: tlsv1 alert protocol version\n"
        "This may indicate that the server does not support any SSL protocol version "
        "between TLSv1.3 and TLSv1.3."
    )


def test_max_version(leaf: trustme.LeafCert) -> None:
    engine, _, _ = connect(server_context(leaf), ssl_max_protocol_version="tlsv1.2")
    assert engine.version == "TLSv1.2"
    assert engine.cipher
    with pytest.raises(TLSError, match=r"between TLSv1\.2 and TLSv1\.2\.$"):
        connect(
            server_context(leaf, minimum=ssl.TLSVersion.TLSv1_3),
            ssl_max_protocol_version="TLSv1.2",
        )


def test_invalid_protocol_version() -> None:
    with pytest.raises(TLSError) as info:
        create_context(make_settings(ssl_min_protocol_version="TLSv9"))
    assert str(info.value) == 'invalid value "TLSv9" for minimum SSL protocol version'
    with pytest.raises(TLSError, match=r"for maximum SSL protocol version$"):
        create_context(make_settings(ssl_max_protocol_version="SSLv3"))


def test_old_minimum_accepted_without_warning() -> None:
    info = create_context(make_settings(ssl_min_protocol_version="TLSv1"))
    assert info.context.minimum_version == ssl.TLSVersion.TLSv1


def test_garbage_from_server_gets_the_hint() -> None:
    settings = make_settings(ssl_max_protocol_version=None)
    engine = TLSEngine(create_context(settings), settings)
    assert engine.do_handshake() is False
    engine.receive_ciphertext(b"E\x00\x00\x00\x10SFATAL\x00\x00\x00\x00\x00\x00\x00")
    with pytest.raises(TLSError) as info:
        engine.do_handshake()
    assert str(info.value).startswith("SSL error: ")
    assert str(info.value).endswith("between TLSv1.2 and TLSv1.3.")


def test_reason_text_for_no_application_protocol() -> None:
    exc = ssl.SSLError(1, "[SSL: TLSV1_ALERT_NO_APPLICATION_PROTOCOL] unknown error (_ssl.c:1)")
    exc.reason = "TLSV1_ALERT_NO_APPLICATION_PROTOCOL"
    assert _reason_text(exc) == "no application protocol"
    other = ssl.SSLError(1, "[SSL: SOME_REASON] unknown error (_ssl.c:1)")
    other.reason = "SOME_REASON"
    assert _reason_text(other) == "some reason"


# --------------------------------------------------------------------------
# channel binding


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_sha256_der(rsa_key: rsa.RSAPrivateKey) -> bytes:
    cert, _ = build_cert(cn="x", signer=rsa_key, algorithm=hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER)


def test_channel_binding_from_handshake(leaf: trustme.LeafCert) -> None:
    engine, _, _ = connect(server_context(leaf))
    certificate = engine.peer_certificate_der
    assert certificate is not None
    assert engine.channel_binding_data() == hashlib.sha256(certificate).digest()


def test_channel_binding_sha384(ca: trustme.CA, root_file: str) -> None:
    pem, key = issue(ca, sans=dns("localhost"), algorithm=hashes.SHA384())
    engine, _, _ = connect(server_context((pem, key)), sslmode="verify-full", sslrootcert=root_file)
    certificate = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    assert engine.peer_certificate_der == certificate
    assert engine.channel_binding_data() == hashlib.sha384(certificate).digest()


# sha256WithRSAEncryption is 1.2.840.113549.1.1.11; SHA-1 and MD5 differ only
# in the last arc.  cryptography refuses to sign with them, but the digest
# choice depends on the OID alone, so rewriting it is enough.
_RSA_SHA256_OID = bytes.fromhex("06092a864886f70d01010b")


@pytest.mark.parametrize("last_arc", [5, 4], ids=["sha1", "md5"])
def test_channel_binding_weak_hashes_use_sha256(rsa_sha256_der: bytes, last_arc: int) -> None:
    assert rsa_sha256_der.count(_RSA_SHA256_OID) == 2
    weak = rsa_sha256_der.replace(_RSA_SHA256_OID, _RSA_SHA256_OID[:-1] + bytes([last_arc]))
    cert = x509.load_der_x509_certificate(weak)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA1 | hashes.MD5)
    assert channel_binding_hash(weak) == hashlib.sha256(weak).digest()


def test_channel_binding_rsa_pss(rsa_key: rsa.RSAPrivateKey) -> None:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=32)
    cert, _ = build_cert(
        cn="x", signer=rsa_key, algorithm=hashes.SHA512(), sign_kwargs={"rsa_padding": pss}
    )
    certificate = cert.public_bytes(serialization.Encoding.DER)
    assert channel_binding_hash(certificate) == hashlib.sha512(certificate).digest()


def test_channel_binding_without_digest() -> None:
    cert, _ = build_cert(cn="x", signer=ed25519.Ed25519PrivateKey.generate(), algorithm=None)
    with pytest.raises(TLSError, match=r"^could not find digest for NID UNDEF$"):
        channel_binding_hash(cert.public_bytes(serialization.Encoding.DER))


# --------------------------------------------------------------------------
# client certificates


@pytest.fixture
def client_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    client = ca.issue_cert("client@example", common_name="alice")
    cert = tmp_path / "client.crt"
    key = tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    return str(cert), private(key)


def encrypted_key(source: str, target: Path, passphrase: str) -> str:
    with open(source, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    target.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase.encode()),
        )
    )
    return private(target)


def test_client_certificate_sent(
    ca: trustme.CA, leaf: trustme.LeafCert, client_files: tuple[str, str]
) -> None:
    cert, key = client_files
    context = server_context(leaf, client_ca=ca, verify_mode=ssl.CERT_REQUIRED)
    engine, server, info = connect(context, sslcert=cert, sslkey=key)
    assert info.client_cert == cert
    assert engine.client_cert_requested is True
    assert engine.client_cert_sent is True
    peer = server.obj.getpeercert()
    assert peer is not None
    assert (("commonName", "alice"),) in peer["subject"]


def test_client_certificate_from_home(
    ca: trustme.CA, leaf: trustme.LeafCert, client_files: tuple[str, str], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    (home / ".postgresql").mkdir(parents=True)
    os.rename(client_files[0], home / ".postgresql" / "postgresql.crt")
    os.rename(client_files[1], home / ".postgresql" / "postgresql.key")
    context = server_context(leaf, client_ca=ca, verify_mode=ssl.CERT_REQUIRED)
    engine, _, info = connect(context, home=str(home))
    assert info.client_cert == str(home / ".postgresql" / "postgresql.crt")
    assert engine.client_cert_sent is True


def test_missing_client_certificate_is_fine(tmp_path: Path) -> None:
    info = create_context(make_settings(sslcert=str(tmp_path / "none.crt"), home=str(tmp_path)))
    assert info.client_cert is None
    info = create_context(make_settings(sslcert=str(tmp_path / "file.txt" / "x.crt")))
    assert info.client_cert is None


def test_sslcertmode_disable_never_loads(client_files: tuple[str, str]) -> None:
    cert, key = client_files
    info = create_context(make_settings(sslcert=cert, sslkey=key, sslcertmode="disable"))
    assert info.client_cert is None


def test_key_with_group_access(client_files: tuple[str, str]) -> None:
    cert, key = client_files
    os.chmod(key, 0o644)
    with pytest.raises(TLSError) as info:
        create_context(make_settings(sslcert=cert, sslkey=key))
    assert str(info.value) == (
        f'private key file "{key}" has group or world access; file must have permissions '
        "u=rw (0600) or less if owned by the current user, or permissions u=rw,g=r (0640) "
        "or less if owned by root"
    )


@pytest.mark.parametrize(
    ("mode", "uid", "ok"),
    [
        (0o600, 1000, True),
        (0o400, 1000, True),
        (0o700, 1000, True),
        (0o640, 1000, False),
        (0o604, 1000, False),
        (0o640, 0, True),
        (0o600, 0, True),
        (0o660, 0, False),
        (0o650, 0, False),
        (0o644, 0, False),
    ],
)
def test_key_permission_rule(mode: int, uid: int, ok: bool) -> None:
    assert key_permissions_ok(stat.S_IFREG | mode, uid) is ok


def test_key_file_problems(client_files: tuple[str, str], tmp_path: Path) -> None:
    cert, _ = client_files
    missing = str(tmp_path / "missing.key")
    with pytest.raises(TLSError) as info:
        create_context(make_settings(sslcert=cert, sslkey=missing))
    assert str(info.value) == f'certificate present, but not private key file "{missing}"'
    with pytest.raises(TLSError) as info:
        create_context(make_settings(sslcert=cert, sslkey=str(tmp_path)))
    assert str(info.value) == f'private key file "{tmp_path}" is not a regular file'
    with pytest.raises(TLSError, match=r'^could not load SSL engine "pkcs11": '):
        create_context(make_settings(sslcert=cert, sslkey="pkcs11:token=x"))
    with pytest.raises(TLSError, match=r'^certificate does not match private key file "": '):
        create_context(make_settings(sslcert=cert))  # no sslkey, no home


def test_bad_certificate_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.crt"
    bad.write_text("hello\n")
    with pytest.raises(TLSError) as info:
        create_context(make_settings(sslcert=str(bad), sslkey=str(tmp_path / "no.key")))
    assert str(info.value) == f'could not read certificate file "{bad}": no start line'


def test_key_does_not_match(ca: trustme.CA, client_files: tuple[str, str], tmp_path: Path) -> None:
    cert, _ = client_files
    other = tmp_path / "other.key"
    ca.issue_cert("other").private_key_pem.write_to_path(str(other))
    with pytest.raises(TLSError) as info:
        create_context(make_settings(sslcert=cert, sslkey=private(other)))
    assert str(info.value) == (
        f'certificate does not match private key file "{other}": key values mismatch'
    )


def test_der_key_is_refused(client_files: tuple[str, str], tmp_path: Path) -> None:
    cert, key = client_files
    with open(key, "rb") as f:
        loaded = serialization.load_pem_private_key(f.read(), password=None)
    der_key = tmp_path / "client.der"
    der_key.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(TLSError) as info:
        create_context(make_settings(sslcert=cert, sslkey=private(der_key)))
    assert str(info.value) == (
        f'could not load private key file "{der_key}": '
        "DER-encoded private keys are not supported; convert the key to PEM"
    )


def test_encrypted_key_with_sslpassword(client_files: tuple[str, str], tmp_path: Path) -> None:
    cert, key = client_files
    locked = encrypted_key(key, tmp_path / "locked.key", SECRET)
    info = create_context(make_settings(sslcert=cert, sslkey=locked, sslpassword=SECRET))
    assert info.client_cert == cert
    for wrong in ("wrong-" + SECRET, None):
        with pytest.raises(TLSError) as failure:
            create_context(make_settings(sslcert=cert, sslkey=locked, sslpassword=wrong))
        assert str(failure.value) == f'could not load private key file "{locked}": bad decrypt'
        assert SECRET not in str(failure.value)
        assert SECRET not in repr(failure.value.__cause__)


def test_encrypted_key_with_hook(client_files: tuple[str, str], tmp_path: Path) -> None:
    cert, key = client_files
    locked = encrypted_key(key, tmp_path / "locked.key", SECRET)
    calls: list[str] = []

    def hook(path: str) -> str:
        calls.append(path)
        return SECRET

    settings = make_settings(sslcert=cert, sslkey=locked, sslpassword="ignored")
    assert create_context(replace(settings, key_passphrase_hook=hook)).client_cert == cert
    assert calls == [locked]
    # The hook wins over sslpassword, and is not called for a plain key.
    with pytest.raises(TLSError, match=r"bad decrypt"):
        create_context(replace(settings, sslpassword=SECRET, key_passphrase_hook=lambda p: "x"))
    calls.clear()
    create_context(replace(settings, sslkey=key, key_passphrase_hook=hook))
    assert calls == []


def test_long_sslpassword_is_truncated(client_files: tuple[str, str], tmp_path: Path) -> None:
    cert, key = client_files
    locked = encrypted_key(key, tmp_path / "locked.key", "x" * 1023)
    settings = make_settings(sslcert=cert, sslkey=locked, sslpassword="x" * 1100)
    with pytest.warns(PgprotoWarning, match=r"sslpassword truncated"):
        assert create_context(settings).client_cert == cert


def test_message_hook_only_where_it_can_matter(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    """The TLS message hook costs a Python call per TLS record: without
    sslcertmode=require and without a client certificate to send, it is not
    installed (on the context, nor by the engine)."""
    context = server_context(leaf, client_ca=ca, verify_mode=ssl.CERT_OPTIONAL)
    engine, _, info = connect(context, sslcertmode="allow")
    assert info.client_cert is None
    assert getattr(info.context, "_msg_callback", None) is None
    assert engine.client_cert_requested is None
    assert engine.client_cert_sent is False


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("verify_mode", [ssl.CERT_NONE, ssl.CERT_OPTIONAL])
def test_certificate_request_detection(
    ca: trustme.CA,
    leaf: trustme.LeafCert,
    version: ssl.TLSVersion,
    verify_mode: ssl.VerifyMode,
) -> None:
    context = server_context(leaf, maximum=version, client_ca=ca, verify_mode=verify_mode)
    engine, _, _ = connect(context, sslcertmode="require")
    assert engine.client_cert_requested is not None  # the hook works on this Python
    assert engine.version == version.name.replace("_", ".")
    assert engine.client_cert_requested == (verify_mode == ssl.CERT_OPTIONAL)
    assert engine.client_cert_sent is False


# --------------------------------------------------------------------------
# data after the handshake


@pytest.fixture
def session(leaf: trustme.LeafCert) -> tuple[TLSEngine, FakeServer]:
    engine, server, _ = connect(server_context(leaf))
    return engine, server


def test_round_trip(session: tuple[TLSEngine, FakeServer]) -> None:
    engine, server = session
    engine.send(b"hello " * 5000)
    server.incoming.write(engine.ciphertext_to_send())
    received = b""
    while len(received) < 30000:
        received += server.obj.read(65536)
    assert received == b"hello " * 5000
    engine.receive_ciphertext(server.send(b"world"))
    assert engine.receive() == b"world"
    assert engine.receive() == b""


def test_two_records_in_one_chunk(session: tuple[TLSEngine, FakeServer]) -> None:
    engine, server = session
    first = server.send(b"A" * 20000)  # more than one record on its own
    second = server.send(b"B" * 10)
    engine.receive_ciphertext(first + second)
    assert engine.receive() == b"A" * 20000 + b"B" * 10
    assert engine.receive() == b""


def test_partial_record_waits(session: tuple[TLSEngine, FakeServer]) -> None:
    engine, server = session
    data = server.send(b"split")
    engine.receive_ciphertext(data[:3])
    assert engine.receive() == b""
    engine.receive_ciphertext(data[3:])
    assert engine.receive() == b"split"


def test_close_notify_sets_eof(session: tuple[TLSEngine, FakeServer]) -> None:
    engine, server = session
    data = server.send(b"bye")
    with pytest.raises(ssl.SSLWantReadError):
        server.obj.unwrap()
    engine.receive_ciphertext(data + server.outgoing.read())
    assert engine.receive() == b"bye"
    assert engine.eof is True
    assert engine.receive() == b""


def test_truncation_is_an_error(session: tuple[TLSEngine, FakeServer]) -> None:
    engine, server = session
    engine.receive_ciphertext(server.send(b"last words"))
    engine.receive_ciphertext(b"")
    assert engine.receive() == b"last words"  # what arrived intact comes first
    assert engine.eof is False
    with pytest.raises(TLSError) as info:
        engine.receive()
    assert str(info.value) == "SSL error: unexpected eof while reading"
    assert isinstance(info.value.__cause__, ssl.SSLEOFError)


def test_truncation_without_data(session: tuple[TLSEngine, FakeServer]) -> None:
    engine, _ = session
    engine.receive_ciphertext(b"")
    engine.receive_ciphertext(b"ignored after EOF")
    with pytest.raises(TLSError, match=r"^SSL error: unexpected eof while reading$"):
        engine.receive()


def test_client_close_sends_close_notify(session: tuple[TLSEngine, FakeServer]) -> None:
    engine, server = session
    engine.close()
    engine.close()
    server.incoming.write(engine.ciphertext_to_send())
    assert server.obj.read(10) == b""  # how ssl reports a close_notify


def test_eof_during_handshake() -> None:
    settings = make_settings()
    engine = TLSEngine(create_context(settings), settings)
    with pytest.raises(LocalProtocolError):
        engine.receive()  # would otherwise run the handshake behind our back
    with pytest.raises(LocalProtocolError):
        engine.send(b"x")
    assert engine.do_handshake() is False
    assert engine.ciphertext_to_send()[:1] == b"\x16"  # a ClientHello record
    assert engine.version is None
    assert engine.peer_certificate_der is None
    engine.receive_ciphertext(b"")
    with pytest.raises(TLSError) as info:
        engine.do_handshake()
    assert str(info.value) == "SSL error: unexpected eof while reading"


# --------------------------------------------------------------------------
# key log


def test_keylog_file(leaf: trustme.LeafCert, tmp_path: Path) -> None:
    log = tmp_path / "keys.log"
    connect(server_context(leaf), sslkeylogfile=str(log))
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert "CLIENT_HANDSHAKE_TRAFFIC_SECRET" in log.read_text()


def test_keylog_file_failure_warns(leaf: trustme.LeafCert, tmp_path: Path) -> None:
    path = str(tmp_path / "no" / "such" / "dir" / "keys.log")
    with pytest.warns(PgprotoWarning, match=r'^could not open SSL key logging file ".*keys.log": '):
        engine, _, _ = connect(server_context(leaf), sslkeylogfile=path)
    assert engine.version is not None


def test_settings_are_frozen() -> None:
    settings = make_settings()
    with pytest.raises(FrozenInstanceError):
        settings.host = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------
# the context cache: reuse only while the files are unchanged


def test_context_cache_reuses_identical_settings(root_file: str) -> None:
    settings = make_settings(sslmode="verify-full", sslrootcert=root_file)
    info = create_context(settings)
    # The host is not part of the context: another host reuses it.
    assert create_context(replace(settings, host="other.example")) is info
    assert create_context(replace(settings, sslmode="verify-ca")) is not info


def test_context_cache_sees_a_new_root_file(
    ca: trustme.CA, other_ca: trustme.CA, leaf: trustme.LeafCert, root_file: str
) -> None:
    connect(server_context(leaf), sslmode="verify-full", sslrootcert=root_file)
    other_ca.cert_pem.write_to_path(root_file)  # the server's CA is no longer trusted
    with pytest.raises(TLSError, match="certificate verify failed"):
        connect(server_context(leaf), sslmode="verify-full", sslrootcert=root_file)
    ca.cert_pem.write_to_path(root_file)
    connect(server_context(leaf), sslmode="verify-full", sslrootcert=root_file)
    os.unlink(root_file)
    with pytest.raises(TLSError, match="does not exist"):
        create_context(make_settings(sslmode="verify-full", sslrootcert=root_file))


def test_context_cache_sees_a_changed_client_key(client_files: tuple[str, str]) -> None:
    cert, key = client_files
    settings = make_settings(sslcert=cert, sslkey=key)
    info = create_context(settings)
    assert create_context(settings) is info
    os.chmod(key, 0o644)
    with pytest.raises(TLSError, match="group or world access"):
        create_context(settings)


def test_context_cache_skips_hooks_and_key_logs(
    client_files: tuple[str, str], tmp_path: Path
) -> None:
    cert, key = client_files
    locked = encrypted_key(key, tmp_path / "locked.key", SECRET)
    calls: list[str] = []

    def hook(path: str) -> str:
        calls.append(path)
        return SECRET

    settings = make_settings(sslcert=cert, sslkey=locked, key_passphrase_hook=hook)
    assert create_context(settings) is not create_context(settings)
    assert calls == [locked, locked]  # libpq asks the hook on every connection
    logged = make_settings(sslkeylogfile=str(tmp_path / "keys.log"))
    assert create_context(logged) is not create_context(logged)


def test_wrong_passphrase_that_passes_the_padding_check(
    client_files: tuple[str, str], tmp_path: Path
) -> None:
    """A wrong passphrase decrypts to garbage with valid padding about once in
    200 tries: the failure is then in the key's ASN.1, and still "bad decrypt"
    (this test once failed the suite with "PEM lib", one run in many)."""
    cert, key = client_files
    for attempt in range(2000):
        locked = encrypted_key(key, tmp_path / f"locked-{attempt}.key", SECRET)
        try:
            serialization.load_pem_private_key(Path(locked).read_bytes(), b"wrong")
        except ValueError as exc:
            if "password" in str(exc).lower():
                continue  # the common case: the padding check caught it
        break  # the padding check passed: the key's ASN.1 fails, or nothing does
    else:
        pytest.fail("no wrong passphrase passed the padding check in 2,000 keys")
    with pytest.raises(TLSError) as failure:
        create_context(make_settings(sslcert=cert, sslkey=locked, sslpassword="wrong"))
    assert str(failure.value) == f'could not load private key file "{locked}": bad decrypt'
