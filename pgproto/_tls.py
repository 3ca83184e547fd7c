"""TLS for the connection machine: context setup, a sans-IO engine, libpq's checks.

General theory of operation
===========================

libpq hands OpenSSL a socket BIO; we cannot, because the core never touches a
socket.  Instead a :class:`TLSEngine` owns one :class:`ssl.SSLObject` wired to
two :class:`ssl.MemoryBIO` objects.  The *incoming* BIO holds ciphertext the
caller has read from the network and passed to :meth:`receive_ciphertext`; the
*outgoing* BIO collects whatever OpenSSL wants to put on the wire, and the
caller empties it with :meth:`ciphertext_to_send` after **every** other call,
because any of them may produce records (handshake messages, alerts, a
close_notify, a reply to a key update).

With memory BIOs only one kind of "would block" exists.  Writing never
blocks, since the outgoing BIO simply grows, so :class:`ssl.SSLWantWriteError`
cannot happen.  :class:`ssl.SSLWantReadError` means "the incoming BIO ran dry
before the operation could finish": the handshake answers False and the
caller reads more.  Nothing is lost when that happens; OpenSSL keeps its own
partial state and the call is simply repeated later.

Reading drains everything.  One network read may carry several TLS records,
and OpenSSL returns at most one record's worth of plaintext per read call.
If we stopped after the first one, the rest would sit decrypted inside the
SSLObject while the caller, seeing nothing left in its own buffers, waited for
the socket -- which may never become readable again (libpq had exactly this
deadlock with records larger than its 8 kB buffer).  :meth:`TLSEngine.receive`
therefore loops until OpenSSL asks for more ciphertext.

End of stream comes in two flavours and they must not be confused.  A
close_notify alert is an orderly end: :attr:`TLSEngine.eof` becomes true.  A
transport EOF without one may be an attacker cutting the stream, so
``OP_IGNORE_UNEXPECTED_EOF`` is cleared on every context and such an EOF is an
error, reported with libpq's wording.  Plaintext decrypted before an error
is still returned; the error is raised by the next call, the way libpq
processes what it has buffered before it notices a broken connection.

Context setup follows libpq's ``initialize_SSL`` (see the spec, section 6.5):
a fresh context per attempt; chain verification exactly when a root store
was loaded, in *every* sslmode; Python's ``check_hostname`` permanently off,
because libpq's host name rules (CN fallback, its wildcard rule, IP short
forms) are not OpenSSL's -- :func:`verify_host_name` reimplements them on the
DER certificate after the handshake.  ALPN "postgresql" is always offered and
only checked for ``sslnegotiation=direct``.

Two things need more than the public ``ssl`` API:

* ``sslcertmode=require`` must know whether the server sent a
  CertificateRequest.  OpenSSL's certificate callback is not exposed, but the
  (private, since 3.8) ``SSLContext._msg_callback`` sees every handshake
  message after decryption, in TLS 1.2 and 1.3 alike.  When it is missing,
  :attr:`TLSEngine.client_cert_requested` is None ("unknowable").
* Renegotiation is refused (``OP_NO_RENEGOTIATION``).  PostgreSQL servers have
  not renegotiated since 9.5, and a renegotiation would let a plain ``write``
  need input, which the machine has no way to express.

Known differences from libpq are listed where they arise: DER private keys
and OpenSSL engines are not supported, the key log file gets Python's header
line, and the SNI name goes through Python's IDNA encoding.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import os
import re
import ssl
import stat
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from pgproto._errors import LocalProtocolError, PgprotoWarning, TLSError
from pgproto._files import FileSignature, file_signature

if TYPE_CHECKING:
    from pgproto._params import ConnParams, HostParams

__all__ = [
    "TLSContextInfo",
    "TLSEngine",
    "TLSSettings",
    "channel_binding_hash",
    "create_context",
    "verify_host_name",
]

ALPN_PROTOCOL: Final = "postgresql"

_ROOT_HINT: Final = (
    "Either provide the file, use the system's trusted roots with sslrootcert=system, "
    "or change sslmode to disable server certificate verification."
)
_KEY_MODE_MESSAGE: Final = (
    'private key file "{}" has group or world access; file must have permissions '
    "u=rw (0600) or less if owned by the current user, or permissions u=rw,g=r (0640) "
    "or less if owned by root"
)
_EOF_MESSAGE: Final = "SSL error: unexpected eof while reading"

_TLS_VERSIONS: Final[dict[str, ssl.TLSVersion]] = {
    "tlsv1": ssl.TLSVersion.TLSv1,
    "tlsv1.1": ssl.TLSVersion.TLSv1_1,
    "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}
# What libpq prints for an unset bound in the protocol-version hint.
_LIBRARY_MIN_VERSION: Final = "TLSv1"
_LIBRARY_MAX_VERSION: Final = "TLSv1.3"
# OpenSSL reasons after which libpq adds the protocol-version hint.
_VERSION_REASONS: Final = frozenset(
    {
        "NO_PROTOCOLS_AVAILABLE",
        "UNSUPPORTED_PROTOCOL",
        "BAD_PROTOCOL_VERSION_NUMBER",
        "UNKNOWN_PROTOCOL",
        "UNKNOWN_SSL_VERSION",
        "UNSUPPORTED_SSL_VERSION",
        "WRONG_SSL_VERSION",
        "WRONG_VERSION_NUMBER",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "VERSION_TOO_HIGH",
        "VERSION_TOO_LOW",
    }
)
# libpq copies a passphrase into OpenSSL's 1024-byte buffer, NUL included.
_MAX_PASSPHRASE: Final = 1023
_WINDOWS: Final = os.name == "nt" or sys.platform == "cygwin"


# --------------------------------------------------------------------------
# settings


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSSettings:
    """The TLS-related options of one host entry, with libpq's defaults applied.

    ``host`` is the ``host`` parameter (never ``hostaddr``): it is the SNI name
    and the name ``verify-full`` checks.  ``home`` locates the
    ``~/.postgresql/`` defaults (None: unknown, so the defaults are absent).
    ``key_passphrase_hook`` plays ``PQsetSSLKeyPassHook_OpenSSL``: it gets the
    key file path and returns the passphrase; it wins over ``sslpassword``.
    """

    sslmode: str
    host: str | None
    sslrootcert: str | None
    sslcrl: str | None
    sslcrldir: str | None
    sslcert: str | None
    sslkey: str | None
    sslpassword: str | None
    sslcertmode: str
    ssl_min_protocol_version: str | None
    ssl_max_protocol_version: str | None
    sslsni: bool
    sslcompression: bool
    sslkeylogfile: str | None
    direct: bool
    home: str | None
    key_passphrase_hook: Callable[[str], str] | None = None

    def __repr__(self) -> str:
        shown = []
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "sslpassword" and value is not None:
                value = "********"
            shown.append(f"{field.name}={value!r}")
        return f"TLSSettings({', '.join(shown)})"

    @classmethod
    def from_params(
        cls,
        params: ConnParams,
        host: HostParams,
        *,
        home: str | None,
        key_passphrase_hook: Callable[[str], str] | None = None,
    ) -> TLSSettings:
        """Settings for one host entry of resolved parameters."""
        sslsni = params["sslsni"]
        compression = params["sslcompression"]
        return cls(
            sslmode=params["sslmode"] or "prefer",
            host=host.host,
            sslrootcert=params["sslrootcert"],
            sslcrl=params["sslcrl"],
            sslcrldir=params["sslcrldir"],
            sslcert=params["sslcert"],
            sslkey=params["sslkey"],
            sslpassword=params["sslpassword"],
            sslcertmode=params["sslcertmode"] or "allow",
            ssl_min_protocol_version=params["ssl_min_protocol_version"],
            ssl_max_protocol_version=params["ssl_max_protocol_version"],
            # libpq looks at the first character only, for both switches.
            sslsni=sslsni is not None and sslsni[:1] == "1",
            sslcompression=not (compression is not None and compression[:1] == "0"),
            sslkeylogfile=params["sslkeylogfile"],
            direct=params["sslnegotiation"] == "direct",
            home=home,
            key_passphrase_hook=key_passphrase_hook,
        )


@dataclass(frozen=True, slots=True)
class TLSContextInfo:
    """A context built by :func:`create_context`, and what went into it."""

    context: ssl.SSLContext
    root_loaded: bool
    root_source: str | None
    client_cert: str | None
    crl_loaded: bool


# --------------------------------------------------------------------------
# context setup (libpq's initialize_SSL)


def create_context(settings: TLSSettings) -> TLSContextInfo:
    """The client context for one connection attempt; TLSError on failure.

    Building a context costs more than the rest of a TLS connection's client
    work (the CA file is parsed each time), so the last few are kept and
    reused while every file they were built from has the stat() signature it
    had before it was read.  Not cached: contexts whose client key goes
    through a passphrase hook (libpq calls the hook on every connection), that
    log keys to a file (opened per connection), or that look CRLs up in a
    directory (OpenSSL reads it lazily, during verification).
    """
    files = _context_files(settings)
    if files is None:
        return _build_context(settings)
    key = (
        settings.sslmode,
        settings.sslrootcert,
        settings.sslcrl,
        settings.sslcert,
        settings.sslkey,
        settings.sslpassword,
        settings.sslcertmode,
        settings.ssl_min_protocol_version,
        settings.ssl_max_protocol_version,
        settings.sslcompression,
        settings.home,
    )
    hit = _CONTEXTS.get(key)
    if hit is not None and hit[1] == files:
        return hit[0]
    info = _build_context(settings)
    if len(_CONTEXTS) >= _CONTEXTS_SIZE:
        del _CONTEXTS[next(iter(_CONTEXTS))]
    _CONTEXTS[key] = (info, files)
    return info


_CONTEXTS: dict[tuple[object, ...], tuple[TLSContextInfo, tuple[FileSignature, ...]]] = {}
_CONTEXTS_SIZE: Final = 8


def _context_files(settings: TLSSettings) -> tuple[FileSignature, ...] | None:
    """The signatures of every file a context for *settings* is built from,
    or None when such a context must not be cached."""
    if settings.key_passphrase_hook is not None or settings.sslkeylogfile or settings.sslcrldir:
        return None
    root = settings.sslrootcert or _user_file(settings.home, "root.crt")
    root_files: tuple[FileSignature, ...]
    if root == "system":
        paths = ssl.get_default_verify_paths()
        root_files = (file_signature(paths.cafile), file_signature(paths.capath))
    else:
        root_files = (file_signature(root),)
    crl = settings.sslcrl or _user_file(settings.home, "root.crl")
    cert = settings.sslcert or _user_file(settings.home, "postgresql.crt")
    key = settings.sslkey or _user_file(settings.home, "postgresql.key")
    return (*root_files, file_signature(crl), file_signature(cert), file_signature(key))


def _build_context(settings: TLSSettings) -> TLSContextInfo:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # OpenSSL's defaults, as libpq gets them, rather than Python's narrower list.
    context.set_ciphers("DEFAULT")
    _set_protocol_versions(context, settings)
    root_source, crl_loaded = _load_root(context, settings)
    client_cert = (
        _load_client_certificate(context, settings) if settings.sslcertmode != "disable" else None
    )
    if root_source is not None:
        context.verify_mode = ssl.CERT_REQUIRED
    if settings.sslcompression:
        context.options &= ~ssl.OP_NO_COMPRESSION
    else:
        context.options |= ssl.OP_NO_COMPRESSION
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    context.set_alpn_protocols([ALPN_PROTOCOL])
    if settings.sslkeylogfile:
        _set_keylog(context, settings.sslkeylogfile)
    if settings.sslcertmode == "require" or client_cert is not None:
        # Whether the server asked for a certificate (and so got ours) is
        # known only through this hook, which costs a Python call per TLS
        # record: it is installed only where the answer can matter --
        # sslcertmode=require, or a client certificate to send.
        _install_message_observer(context)
    return TLSContextInfo(
        context=context,
        root_loaded=root_source is not None,
        root_source=root_source,
        client_cert=client_cert,
        crl_loaded=crl_loaded,
    )


def _set_protocol_versions(context: ssl.SSLContext, settings: TLSSettings) -> None:
    for bound, value in (
        ("minimum", settings.ssl_min_protocol_version),
        ("maximum", settings.ssl_max_protocol_version),
    ):
        if not value:
            continue
        version = _TLS_VERSIONS.get(value.lower())
        if version is None:
            raise TLSError(f'invalid value "{value}" for {bound} SSL protocol version')
        try:
            # Python deprecates naming TLS 1.0/1.1; libpq still accepts them.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                setattr(context, f"{bound}_version", version)
        except (ValueError, ssl.SSLError) as exc:
            raise TLSError(f"could not set {bound} SSL protocol version: {exc}") from exc


def _user_file(home: str | None, name: str) -> str | None:
    if not home:
        return None
    return os.path.join(home, "postgresql" if os.name == "nt" else ".postgresql", name)


def _load_root(context: ssl.SSLContext, settings: TLSSettings) -> tuple[str | None, bool]:
    """Load the trust anchors; return (root source or None, CRLs loaded)."""
    path = settings.sslrootcert or _user_file(settings.home, "root.crt")
    if path == "system":
        try:
            context.set_default_verify_paths()
        except ssl.SSLError as exc:
            detail = _reason_text(exc)
            raise TLSError(f"could not load system root certificate paths: {detail}") from exc
        return "system", False
    if path and _stat(path) is not None:
        try:
            context.load_verify_locations(cafile=path)
        except ssl.SSLError as exc:
            detail = _reason_text(exc)
            raise TLSError(f'could not read root certificate file "{path}": {detail}') from exc
        except OSError as exc:
            raise TLSError(
                f'could not read root certificate file "{path}": {exc.strerror}'
            ) from exc
        return path, _load_crls(context, settings)
    # No root file.  Only the verify modes insist; the others go on without
    # verification, even when sslrootcert named a file that is not there.
    if settings.sslmode.startswith("verify"):
        if path:
            raise TLSError(f'root certificate file "{path}" does not exist\n{_ROOT_HINT}')
        raise TLSError(
            f"could not get home directory to locate root certificate file\n{_ROOT_HINT}"
        )
    return None, False


def _load_crls(context: ssl.SSLContext, settings: TLSSettings) -> bool:
    crl_file = settings.sslcrl or None
    crl_dir = settings.sslcrldir or None
    if crl_file is None and crl_dir is None:
        crl_file = _user_file(settings.home, "root.crl")
        if crl_file is None:
            return False
    try:
        context.load_verify_locations(cafile=crl_file, capath=crl_dir)
    except (ssl.SSLError, OSError):
        return False  # CRLs are optional: libpq ignores any failure here
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    return True


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _load_client_certificate(context: ssl.SSLContext, settings: TLSSettings) -> str | None:
    """Load sslcert and its key; return the certificate path, or None if absent."""
    certfile = settings.sslcert or _user_file(settings.home, "postgresql.crt")
    if certfile is None:
        return None
    try:
        os.stat(certfile)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise TLSError(f'could not open certificate file "{certfile}": {exc.strerror}') from exc
    _check_certificate_file(certfile)
    keyfile = _key_file(settings)
    if keyfile is None:
        raise TLSError('certificate does not match private key file "": no private key assigned')
    _check_key_file(keyfile)

    used: list[bytes] = []  # the passphrase OpenSSL asked for, to explain a failure

    def passphrase() -> bytes:
        # Always a callable, so OpenSSL never prompts on the terminal.
        if settings.key_passphrase_hook is not None:
            secret = settings.key_passphrase_hook(keyfile).encode()
        else:
            secret = (settings.sslpassword or "").encode()
            if len(secret) > _MAX_PASSPHRASE:
                warnings.warn("sslpassword truncated", PgprotoWarning, stacklevel=2)
        used.append(secret[:_MAX_PASSPHRASE])
        return used[-1]

    try:
        context.load_cert_chain(certfile, keyfile, password=passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSError(
                f'certificate does not match private key file "{keyfile}": key values mismatch'
            ) from exc
        detail = _describe_key_failure(keyfile, used[-1] if used else b"")
        raise TLSError(f'could not load private key file "{keyfile}": {detail}') from exc
    except OSError as exc:
        raise TLSError(f'could not load private key file "{keyfile}": {exc.strerror}') from exc
    return certfile


def _check_certificate_file(certfile: str) -> None:
    # ssl loads certificate and key in one call; read the certificate first
    # so that its failure gets libpq's message, before any key rule applies.
    try:
        with open(certfile, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TLSError(f'could not read certificate file "{certfile}": {exc.strerror}') from exc
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        detail = "no start line" if b"-----BEGIN" not in data else "bad certificate data"
        raise TLSError(f'could not read certificate file "{certfile}": {detail}') from exc


def _key_file(settings: TLSSettings) -> str | None:
    key = settings.sslkey
    if key:
        # libpq reads "engine:keyid"; a drive letter is not an engine on Windows.
        if ":" in key and not (os.name == "nt" and key[1:2] == ":"):
            engine = key.split(":", 1)[0]
            raise TLSError(
                f'could not load SSL engine "{engine}": OpenSSL engines are not supported'
            )
        return key
    return _user_file(settings.home, "postgresql.key")


def _check_key_file(keyfile: str) -> None:
    try:
        st = os.stat(keyfile)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise TLSError(f'certificate present, but not private key file "{keyfile}"') from exc
        raise TLSError(f'could not stat private key file "{keyfile}": {exc.strerror}') from exc
    if not stat.S_ISREG(st.st_mode):
        raise TLSError(f'private key file "{keyfile}" is not a regular file')
    if not _WINDOWS and not key_permissions_ok(st.st_mode, st.st_uid):
        raise TLSError(_KEY_MODE_MESSAGE.format(keyfile))


def key_permissions_ok(mode: int, uid: int) -> bool:
    """libpq's rule: at most 0600, or at most 0640 for a file owned by root."""
    if uid == 0:
        return not mode & (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO)
    return not mode & (stat.S_IRWXG | stat.S_IRWXO)


def _describe_key_failure(keyfile: str, secret: bytes) -> str:
    """A short OpenSSL-like reason; ssl only ever says "PEM lib"."""
    try:
        with open(keyfile, "rb") as f:
            data = f.read()
    except OSError as exc:
        return exc.strerror or "could not read file"
    if b"-----BEGIN" not in data:
        if data[:1] == b"\x30":  # an ASN.1 SEQUENCE: a DER key
            return "DER-encoded private keys are not supported; convert the key to PEM"
        return "no start line"
    try:
        serialization.load_pem_private_key(data, secret or None)
    except TypeError:
        return "bad decrypt"  # encrypted, and no passphrase
    except ValueError as exc:
        text = str(exc).lower()
        if "password" in text or "decrypt" in text:
            return "bad decrypt"
        # About one wrong passphrase in 200 passes the cipher's padding check
        # and fails later, in the key's ASN.1: still a wrong passphrase.
        return "bad decrypt" if b"ENCRYPTED" in data else "PEM lib"
    except UnsupportedAlgorithm:
        return "unsupported"
    return "PEM lib"


def _set_keylog(context: ssl.SSLContext, path: str) -> None:
    # libpq appends to the file with mode 0600; Python opens it itself and
    # would use the umask, so create it first with the right mode.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.close(fd)
        context.keylog_filename = path
    except OSError as exc:
        warnings.warn(
            f'could not open SSL key logging file "{path}": {exc.strerror}',
            PgprotoWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------
# watching for a CertificateRequest


_HANDSHAKE: Final = 22
_CERTIFICATE_REQUEST: Final = 13


class _Observer:
    __slots__ = ("cert_requested",)

    def __init__(self) -> None:
        self.cert_requested = False


_observers: weakref.WeakKeyDictionary[ssl.SSLObject, _Observer] = weakref.WeakKeyDictionary()
_CAN_OBSERVE: Final = hasattr(ssl.SSLContext, "_msg_callback")


def _on_tls_message(
    conn: object, direction: str, version: object, content_type: int, msg_type: int, data: bytes
) -> None:
    if (
        direction == "read"
        and content_type == _HANDSHAKE
        and msg_type == _CERTIFICATE_REQUEST
        and isinstance(conn, ssl.SSLObject)
    ):
        observer = _observers.get(conn)
        if observer is not None:
            observer.cert_requested = True


def _install_message_observer(context: ssl.SSLContext) -> None:
    # Must happen before wrap_bio: OpenSSL copies the callback into each SSL.
    if _CAN_OBSERVE and getattr(context, "_msg_callback", None) is None:
        setattr(context, "_msg_callback", _on_tls_message)  # noqa: B010 -- private, untyped


# --------------------------------------------------------------------------
# the engine


def sni_name(settings: TLSSettings) -> str | None:
    """The name to send as SNI, or None (libpq's IP-literal heuristic)."""
    host = settings.host
    if not settings.sslsni or not host:
        return None
    if ":" in host or not host.strip("0123456789."):
        return None
    return host


class TLSEngine:
    """TLS over two MemoryBIOs, for one transport connection attempt; no IO.

    Feed ciphertext with :meth:`receive_ciphertext` (``b""`` for EOF), call
    :meth:`do_handshake` until it returns True, then :meth:`send` and
    :meth:`receive`.  After every call, send :meth:`ciphertext_to_send`.
    Failures raise :class:`~pgproto.TLSError` with libpq's wording.
    """

    eof: bool

    def __init__(self, info: TLSContextInfo, settings: TLSSettings) -> None:
        self._info = info
        self._settings = settings
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._observing = getattr(info.context, "_msg_callback", None) is _on_tls_message
        try:
            self._ssl = info.context.wrap_bio(
                self._incoming, self._outgoing, server_hostname=sni_name(settings)
            )
        except (ValueError, UnicodeError) as exc:
            raise TLSError(f"could not set SSL Server Name Indication (SNI): {exc}") from exc
        self._observer = _Observer()
        _observers[self._ssl] = self._observer
        self._peer_eof = False
        self._handshake_done = False
        self._failure: TLSError | None = None
        self._deferred: TLSError | None = None
        self._closed = False
        self.eof = False
        self.host_verified = False

    def receive_ciphertext(self, data: bytes) -> None:
        """Bytes read from the transport; ``b""`` means the peer closed it."""
        if self._peer_eof:
            return
        if data:
            self._incoming.write(data)
        else:
            self._peer_eof = True
            self._incoming.write_eof()

    def ciphertext_to_send(self) -> bytes:
        """Everything OpenSSL queued for the wire since the last call."""
        return self._outgoing.read()

    def do_handshake(self) -> bool:
        """Advance the handshake: True when done and checked, False for more input."""
        if self._handshake_done:
            return True
        if self._failure is not None:
            raise self._failure
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            self._failure = _translate(exc, self._settings, handshake=True)
            raise self._failure from exc
        try:
            self._check_established()
        except TLSError as exc:
            self._failure = exc
            self.close()
            raise
        self._handshake_done = True
        return True

    def _check_established(self) -> None:
        # The order of libpq's open_client_SSL: ALPN, certificate, host name.
        if self._settings.direct:
            selected = self._ssl.selected_alpn_protocol()
            if selected is None:
                raise TLSError(
                    "direct SSL connection was established without ALPN protocol "
                    "negotiation extension"
                )
            if selected != ALPN_PROTOCOL:
                raise TLSError("SSL connection was established with unexpected ALPN protocol")
        der = self._ssl.getpeercert(binary_form=True)
        if der is None:
            raise TLSError("certificate could not be obtained: no SSL error reported")
        if self._settings.sslmode == "verify-full":
            verify_host_name(der, self._settings.host)
            self.host_verified = True

    def _require_handshake(self) -> None:
        # SSLObject would run the handshake implicitly, skipping our checks.
        if not self._handshake_done:
            raise LocalProtocolError("the TLS handshake has not completed")

    def send(self, plaintext: bytes) -> None:
        """Encrypt *plaintext*; the records land in the outgoing BIO."""
        self._require_handshake()
        view = memoryview(plaintext)
        while view:
            try:
                view = view[self._ssl.write(view) :]
            except ssl.SSLZeroReturnError as exc:
                raise TLSError("SSL connection has been closed unexpectedly") from exc
            except ssl.SSLError as exc:
                raise _translate(exc, self._settings, handshake=False) from exc

    def receive(self) -> bytes:
        """All plaintext that can be decrypted now (``b""`` if none).

        A close_notify sets :attr:`eof`.  An error raises TLSError -- unless
        some plaintext came first: then that is returned and the next call
        raises.
        """
        self._require_handshake()
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        chunks: list[bytes] = []
        while not self.eof:
            try:
                chunk = self._ssl.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # seldom: ssl usually returns b"" instead
                self.eof = True
                break
            except ssl.SSLError as exc:
                error = _translate(exc, self._settings, handshake=False)
                error.__cause__ = exc
                if not chunks:
                    raise error from exc
                self._deferred = error
                break
            if not chunk:  # the close_notify arrived
                self.eof = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        """Queue a close_notify (best effort; the peer's reply is not awaited)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: no reply yet
            self._ssl.unwrap()

    # ---- what the handshake established

    @property
    def version(self) -> str | None:
        return self._ssl.version()

    @property
    def cipher(self) -> str | None:
        info = self._ssl.cipher()
        return info[0] if info else None

    @property
    def alpn(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    @property
    def peer_certificate_der(self) -> bytes | None:
        if not self._handshake_done:
            return None
        return self._ssl.getpeercert(binary_form=True)

    @property
    def verified_chain(self) -> bool:
        return self._handshake_done and self._info.root_loaded

    @property
    def client_cert_requested(self) -> bool | None:
        return self._observer.cert_requested if self._observing else None

    @property
    def client_cert_sent(self) -> bool:
        return self._observer.cert_requested and self._info.client_cert is not None

    def channel_binding_data(self) -> bytes:
        """tls-server-end-point data for SCRAM-SHA-256-PLUS (RFC 5929)."""
        der = self.peer_certificate_der
        if der is None:
            raise TLSError("could not generate peer certificate hash")
        return channel_binding_hash(der)


_SSL_MESSAGE: Final = re.compile(r"^\[[^\]]*\]\s*(.*?)\s*(?:\(_ssl\.c:\d+\))?$", re.DOTALL)


def _reason_text(exc: ssl.SSLError) -> str:
    """OpenSSL's reason string, as libpq prints it."""
    reason = exc.reason or ""
    if reason.endswith("NO_APPLICATION_PROTOCOL"):
        return "no application protocol"
    message = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
    match = _SSL_MESSAGE.match(message)
    text = match.group(1) if match else message
    if (not text or text == "unknown error") and reason:
        text = reason.lower().replace("_", " ")
    return text or "no SSL error reported"


def _translate(exc: ssl.SSLError, settings: TLSSettings, *, handshake: bool) -> TLSError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = f": {exc.verify_message}" if exc.verify_message else ""
        return TLSError(f"SSL error: certificate verify failed{detail}")
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLSyscallError):
        return TLSError(_EOF_MESSAGE)
    if isinstance(exc, ssl.SSLZeroReturnError):
        return TLSError("unrecognized SSL error code: 6")  # SSL_ERROR_ZERO_RETURN
    message = f"SSL error: {_reason_text(exc)}"
    if handshake and exc.reason in _VERSION_REASONS:
        low = settings.ssl_min_protocol_version
        high = settings.ssl_max_protocol_version
        message += (
            "\nThis may indicate that the server does not support any SSL protocol version "
            f"between {_LIBRARY_MIN_VERSION if low is None else low} and "
            f"{_LIBRARY_MAX_VERSION if high is None else high}."
        )
    return TLSError(message)


# --------------------------------------------------------------------------
# verify-full (libpq's fe-secure-common.c rules, spec section 6.7)


def verify_host_name(cert_der: bytes, host: str | None) -> None:
    """Check *host* against the certificate as libpq's verify-full does."""
    if not host:
        raise TLSError("host name must be specified for a verified SSL connection")
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        try:
            sans = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            sans = []
        common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:
        raise TLSError(f"could not parse server certificate: {exc}") from exc

    host_is_ip = inet_aton(host) is not None or _inet_pton6(host) is not None
    examined: list[str] = []
    check_cn = True
    for san in sans:
        if isinstance(san, x509.DNSName):
            check_cn = check_cn and host_is_ip
            name = san.value
            matched = _name_matches(name, host)
        elif isinstance(san, x509.IPAddress):
            check_cn = check_cn and not host_is_ip
            address = san.value
            if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
                # An address with a mask: 8 or 32 bytes on the wire.
                length = 2 * len(address.network_address.packed)
                raise TLSError(f"certificate contains IP address with invalid length {length}")
            name = str(address)
            mine = inet_aton(host) if address.version == 4 else _inet_pton6(host)
            matched = mine == address.packed
        else:
            continue
        examined.append(name)
        if matched:
            return
    # An IP host falls back to the CN even when dNSName SANs exist (libpq's
    # deliberate departure from RFC 6125); a DNS host only without them.
    if check_cn and common_names:
        value = common_names[0].value
        name = value if isinstance(value, str) else value.decode("utf-8", "replace")
        examined.append(name)
        if _name_matches(name, host):
            return
    if len(examined) > 1:
        others = len(examined) - 1
        raise TLSError(
            f'server certificate for "{examined[0]}" (and {others} other '
            f'name{"" if others == 1 else "s"}) does not match host name "{host}"'
        )
    if examined:
        raise TLSError(f'server certificate for "{examined[0]}" does not match host name "{host}"')
    raise TLSError("could not get server's host name from server certificate")


_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _name_matches(name: str, host: str) -> bool:
    if "\x00" in name:
        raise TLSError("SSL certificate's name contains embedded null")
    pattern = name.translate(_ASCII_LOWER)
    target = host.translate(_ASCII_LOWER)
    if pattern == target:
        return True
    # "*." plus a suffix: the star stands for exactly one non-empty label.
    if len(pattern) < 3 or not pattern.startswith("*.") or len(pattern) > len(target):
        return False
    suffix = pattern[1:]
    return target.endswith(suffix) and "." not in target[: len(target) - len(suffix)]


_C_SPACE: Final = " \t\n\v\f\r"
_DIGITS: Final = "0123456789"
_HEX: Final = "0123456789abcdefABCDEF"


def inet_aton(text: str) -> bytes | None:
    """IPv4 parsing with glibc ``inet_aton`` semantics (127.1, 0x7f.1, 017.0.0.1)."""
    parts: list[int] = []
    i, end = 0, len(text)
    while True:
        if i >= end or text[i] not in _DIGITS:
            return None
        base = 10
        if text[i] == "0":
            i += 1
            base = 8
            if i < end and text[i] in "xX":
                base = 16
                i += 1
        value = 0
        while i < end:
            c = text[i]
            if c in _DIGITS and (base != 8 or c < "8"):
                value = value * base + int(c)
            elif c in _DIGITS:
                return None  # 8 or 9 in an octal part
            elif base == 16 and c in _HEX:
                value = value * 16 + int(c, 16)
            else:
                break
            if value > 0xFFFFFFFF:
                return None
            i += 1
        if i < end and text[i] == ".":
            if len(parts) == 3 or value > 0xFF:
                return None
            parts.append(value)
            i += 1
        else:
            break
    if i < end and text[i] not in _C_SPACE:  # glibc ignores anything after a space
        return None
    # The last part fills all remaining bytes: a, a.b (24 bits), a.b.c (16 bits).
    if value >= 1 << (8 * (4 - len(parts))):
        return None
    for index, part in enumerate(parts):
        value |= part << (24 - 8 * index)
    return value.to_bytes(4, "big")


def _inet_pton6(text: str) -> bytes | None:
    if "%" in text:  # a scope id: ipaddress takes it, inet_pton does not
        return None
    try:
        return ipaddress.IPv6Address(text).packed
    except ValueError:
        return None


# --------------------------------------------------------------------------
# channel binding


def channel_binding_hash(cert_der: bytes) -> bytes:
    """tls-server-end-point: the certificate hashed with its signature's digest.

    MD5 and SHA-1 are replaced by SHA-256 (RFC 5929 section 4.1); RSA-PSS uses
    its hash parameter; signatures without a digest (Ed25519, Ed448) fail as
    they do in libpq.
    """
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        algorithm = cert.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSError("could not determine server certificate signature algorithm") from exc
    if algorithm is None:
        raise TLSError("could not find digest for NID UNDEF")
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        return hashlib.sha256(cert_der).digest()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()
