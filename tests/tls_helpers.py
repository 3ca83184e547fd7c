"""Certificates and an in-memory TLS server for the tests of ``pgproto._tls``.

trustme makes the CA and ordinary leaf certificates; what it cannot make
(certificates without SANs, other signature hashes, revocation lists) is
built here with ``cryptography``, signed by the trustme CA's key.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable, Iterable, Sequence
from typing import cast

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from pgproto._tls import TLSEngine

_DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def ca_key(ca: trustme.CA) -> CertificateIssuerPrivateKeyTypes:
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def ca_name(ca: trustme.CA) -> x509.Name:
    return x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject


def build_cert(
    *,
    sans: Sequence[x509.GeneralName] = (),
    cn: str | None = None,
    signer: CertificateIssuerPrivateKeyTypes | None = None,
    issuer: x509.Name | None = None,
    subject_key: ec.EllipticCurvePrivateKey | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
    sign_kwargs: dict[str, object] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate; self-signed unless *signer* and *issuer* are given."""
    key = subject_key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _DAY)
        .not_valid_after(_now() + _DAY)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    # sign() accepts only the hashes cryptography still signs with; the
    # callers pass those, or None for Ed25519.
    sign = cast(Callable[..., x509.Certificate], builder.sign)
    cert = sign(signer if signer is not None else key, algorithm, **(sign_kwargs or {}))
    return cert, key


def issue(
    ca: trustme.CA,
    *,
    sans: Sequence[x509.GeneralName] = (),
    cn: str | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for a leaf signed by the trustme CA."""
    cert, key = build_cert(
        sans=sans,
        cn=cn,
        signer=ca_key(ca),
        issuer=ca_name(ca),
        algorithm=algorithm or hashes.SHA256(),
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def make_crl(ca: trustme.CA, revoked_serials: Iterable[int]) -> bytes:
    """A PEM CRL signed by *ca* that revokes the given serial numbers."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_name(ca))
        .last_update(_now() - _DAY)
        .next_update(_now() + _DAY)
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(_now() - _DAY)
            .build()
        )
    crl = builder.sign(ca_key(ca), hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def serial_of(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


class FakeServer:
    """The server end: an SSLObject over memory BIOs, fed by :func:`handshake`."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.sni: list[str | None] = []
        context.sni_callback = self._record_sni
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.done = False
        self.error: ssl.SSLError | None = None

    def _record_sni(self, obj: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        self.sni.append(name)

    def step(self, data: bytes) -> bytes:
        """Take the client's bytes, advance, and return the server's reply."""
        if data:
            self.incoming.write(data)
        if not self.done and self.error is None:
            try:
                self.obj.do_handshake()
                self.done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                self.error = exc
        return self.outgoing.read()

    def send(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.outgoing.read()


def server_context(
    leaf: trustme.LeafCert | tuple[bytes, bytes],
    *,
    alpn: bool = True,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    client_ca: trustme.CA | None = None,
    verify_mode: ssl.VerifyMode = ssl.CERT_NONE,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if isinstance(leaf, trustme.LeafCert):
        leaf.configure_cert(context)
    else:
        with trustme.Blob(leaf[0]).tempfile() as cert, trustme.Blob(leaf[1]).tempfile() as key:
            context.load_cert_chain(cert, key)
    if alpn:
        context.set_alpn_protocols(["postgresql"])
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    if client_ca is not None:
        client_ca.configure_trust(context)
    context.verify_mode = verify_mode
    return context


def handshake(engine: TLSEngine, server: FakeServer, rounds: int = 10) -> None:
    """Pump bytes both ways until both ends finished (or the client raised)."""
    for _ in range(rounds):
        done = engine.do_handshake()
        reply = server.step(engine.ciphertext_to_send())
        if reply:
            engine.receive_ciphertext(reply)
        if done and (server.done or server.error is not None):
            return
    raise AssertionError("handshake did not finish")
