"""A pytest plugin that watches every text pgproto produces for the suite's passwords.

Loaded for the whole suite from ``tests/conftest.py``.  It collects:

* **passwords**: every ``password`` / ``sslpassword`` (and the other secret
  options: ``scram_client_key``, ``scram_server_key``, ``oauth_client_secret``)
  that flows through :func:`pgproto.resolve_params` -- keyword arguments, the
  connection string, ``PGPASSWORD`` in the :class:`~pgproto.Environment`, and
  the resolved per-host passwords (password-file entries included) -- or
  reaches a :class:`~pgproto.ConnectionStateMachine`; plus the test modules'
  string constants whose name says PASSWORD, SECRET or PASSPHRASE and the
  passwords of ``servers.ROLES``.  Values shorter than :data:`MIN_LENGTH`
  characters, or in :data:`COMMON` ("password", "postgres", ...), are too
  common to grep meaningfully and are ignored.
* **texts**: the message of every :class:`pgproto.Error` created (a
  :class:`~pgproto.ConnectError` also gives every attempt's line and the
  ``__cause__``/``__context__`` chain and notes of each attempt's error); the
  message of every :class:`pgproto.PgprotoWarning` created and every warning
  pytest records; every log record (a root handler, and the ``pgproto``
  loggers see DEBUG and INFO records too -- records below a logger's level are
  scanned and then dropped, so ``caplog`` sees what it saw before); every
  ``repr``/``str`` of the classes in ``pgproto`` and ``pgproto_adapters``;
  every trace line (``Tracer.line``); what tests read with ``capsys`` /
  ``capfd`` and the captured output left in test reports (the CLI's output);
  the exception chain caught by ``pytest.raises``; pytest's failure reports.

Each text is scanned as it is recorded and then dropped; only counters and
hits are kept (the current test's texts are kept, bounded, so a password
registered later in the same test is looked for in them too -- except while
:mod:`tracemalloc` traces, so that the memory checks of the load tests do not
see them).  A hit fails the
run and is listed, with the test id and where the text came from, in the
terminal summary -- with every password masked.  The summary also prints the
counts per kind; when a real run (:data:`PLAUSIBLE_TESTS` tests or more, from
:data:`PLAUSIBLE_FILES` test files or more) recorded no exception message or no
repr, or registered no password, the watch itself is broken and the run fails.

Tests use :func:`watching` to divert the recording to a scanner of their own
(to show that a planted password is caught without failing the session).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import logging
import re
import sys
import threading
import traceback
import tracemalloc
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest

#: Shorter passwords are not looked for (they would match ordinary text).
MIN_LENGTH: Final = 6
#: Passwords too common to grep for (they are words in messages).
COMMON: Final = frozenset(
    {"password", "postgres", "secret", "system", "sslpassword", "localhost", "wrong-password"}
)
#: The kinds of text recorded, in the order the summary lists them.
KINDS: Final = (
    "exception",
    "exception cause",
    "warning",
    "log record",
    "repr",
    "trace",
    "captured output",
    "failure report",
)
#: A run of at least this many tests from at least this many test files (the
#: suite, not one big module: test_attacks.py alone runs 446 tests and makes no
#: repr) must have recorded exceptions and reprs.
PLAUSIBLE_TESTS: Final = 200
PLAUSIBLE_FILES: Final = 5
#: Options whose values are secrets (besides those the module constants give).
SECRET_OPTIONS: Final = (
    "password",
    "sslpassword",
    "scram_client_key",
    "scram_server_key",
    "oauth_client_secret",
)
_CONSTANT_NAME: Final = re.compile(r"PASSWORD|SECRET|PASSPHRASE", re.IGNORECASE)
_CONNINFO_SECRET: Final = re.compile(
    r"(?:^|\s)(?:ssl)?password\s*=\s*(?:'((?:[^'\\]|\\.)*)'|(\S+))"
    r"|://[^:/@\s]*:([^@/\s]+)@"
    r"|[?&](?:ssl)?password=([^&#\s]+)"
)
#: Texts of the current test kept for a later registered password.
_RECENT_TEXTS: Final = 1000
_RECENT_CHARS: Final = 1_000_000
_EXCERPT: Final = 50


@dataclass(frozen=True)
class Hit:
    """A password found in a text; nothing in it shows the password."""

    nodeid: str
    kind: str
    where: str
    password: str  # a label: "#n (len chars, from origin)"
    excerpt: str  # the text around the hit, every password masked
    stack: str  # where the text was made (frames of pgproto and the tests)


@dataclass(eq=False)
class Scanner:
    """The password set, the counters and the hits of one watch."""

    passwords: dict[str, str] = field(default_factory=dict)  # password -> label
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    hits: list[Hit] = field(default_factory=list)
    nodeid: str = "(session)"
    tests_run: int = 0
    test_files: set[str] = field(default_factory=set)
    _pattern: re.Pattern[str] | None = None
    _recent: collections.deque[tuple[str, str, str]] = field(
        default_factory=lambda: collections.deque(maxlen=_RECENT_TEXTS)
    )
    _recent_chars: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- passwords

    def add_password(self, value: object, origin: str) -> bool:
        """Look for *value* from now on; False if it is too short or common."""
        if isinstance(value, bytes):
            value = value.decode("utf-8", "surrogateescape")
        if not isinstance(value, str) or not usable_password(value):
            return False
        with self._lock:
            if value in self.passwords:
                return True
            self.passwords[value] = f"#{len(self.passwords) + 1} ({len(value)} chars, {origin})"
            self._pattern = None
            recent = list(self._recent)
        for kind, where, text in recent:
            if value in text:
                self._hit(kind, where + " (found when the password was registered)", text, "")
        return True

    def pattern(self) -> re.Pattern[str] | None:
        pattern = self._pattern
        if pattern is None and self.passwords:
            with self._lock:
                ordered = sorted(self.passwords, key=len, reverse=True)
                pattern = self._pattern = re.compile("|".join(map(re.escape, ordered)))
        return pattern

    def mask(self, text: str) -> str:
        """*text* with every known password replaced by its label."""
        pattern = self.pattern()
        if pattern is None:
            return text
        return pattern.sub(lambda m: f"<password {self.passwords[m.group()].split()[0]}>", text)

    # -- texts

    def record(self, kind: str, where: str, text: object) -> None:
        """Count *text* and scan it for every password."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if not isinstance(text, str):
            text = str(text)
        self.counts[kind] += 1
        if not text:
            return
        if self._recent_chars < _RECENT_CHARS and not tracemalloc.is_tracing():
            self._recent.append((kind, where, text))
            self._recent_chars += len(text)
        pattern = self.pattern()
        if pattern is not None and pattern.search(text):
            self._hit(kind, where, text, _stack())

    def _hit(self, kind: str, where: str, text: str, stack: str) -> None:
        found = [label for password, label in list(self.passwords.items()) if password in text]
        masked = self.mask(text)
        at = masked.find("<password #")
        start = max(0, at - _EXCERPT)
        excerpt = masked[start : at + 2 * _EXCERPT]
        for label in found:
            self.hits.append(Hit(self.nodeid, kind, where, label, excerpt, stack))

    def start_test(self, nodeid: str) -> None:
        self.nodeid = nodeid
        self._recent.clear()
        self._recent_chars = 0

    # -- verdict

    def problems(self) -> list[str]:
        """Why the run must fail: hits, or a watch that saw nothing."""
        problems = [f"{len(self.hits)} password hit(s)"] if self.hits else []
        if self.tests_run >= PLAUSIBLE_TESTS and len(self.test_files) >= PLAUSIBLE_FILES:
            for kind in ("exception", "repr"):
                if not self.counts[kind]:
                    problems.append(
                        f"no {kind} recorded in {self.tests_run} tests: the watch is broken"
                    )
            if not self.passwords:
                problems.append("no password registered: the watch is broken")
        return problems

    def report(self) -> list[str]:
        """The summary lines (no password in them)."""
        counts = ", ".join(f"{kind} {self.counts[kind]}" for kind in KINDS)
        lines = [
            f"passwords watched: {len(self.passwords)} (shorter than {MIN_LENGTH} characters "
            "or too common: ignored)",
            f"texts scanned: {counts}",
        ]
        for hit in self.hits:
            lines.append(f"LEAK in {hit.nodeid}: {hit.kind} from {hit.where}")
            lines.append(f"    password {hit.password}")
            lines.append(f"    text: ...{hit.excerpt!r}...")
            if hit.stack:
                lines.extend("    " + line for line in hit.stack.splitlines())
        lines.extend(f"FAILED: {problem}" for problem in self.problems())
        return lines


def usable_password(value: str) -> bool:
    """Whether *value* is distinctive enough to grep for."""
    return (
        (len(value) >= MIN_LENGTH and value.lower() not in COMMON and len(set(value)) > 1)
        or len(value) >= 64  # "x" * 1100 is distinctive enough
    )


_LIBRARY_PATHS: Final = ("/site-packages/", "/lib/python3", "/_pytest/", "/pluggy/")


def _stack() -> str:
    """The frames of pgproto, its adapters and the tests that made a text."""
    keep = [
        f"{Path(f.filename).name}:{f.lineno} in {f.name}"
        for f in traceback.extract_stack()
        if not any(part in f.filename for part in _LIBRARY_PATHS)
        and not f.filename.endswith(("secret_watch.py", ">"))
    ]
    return "made at: " + " <- ".join(reversed(keep[-6:])) if keep else ""


# --------------------------------------------------------------------------
# where the texts come from


_STACK: list[Scanner] = []
_LOCAL = threading.local()


def _current() -> Scanner | None:
    return _STACK[-1] if _STACK else None


def _record(kind: str, where: str, text: object) -> None:
    scanner = _current()
    if scanner is not None:
        scanner.record(kind, where, text)


def _register(value: object, origin: str) -> None:
    scanner = _current()
    if scanner is not None:
        scanner.add_password(value, origin)


@contextlib.contextmanager
def watching(scanner: Scanner | None = None) -> Iterator[Scanner]:
    """Record into *scanner* (a new one by default) instead of the session's."""
    scanner = Scanner() if scanner is None else scanner
    _install()
    _STACK.append(scanner)
    try:
        yield scanner
    finally:
        _STACK.remove(scanner)
        _uninstall()


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """*exc*, its causes and contexts, and the members of exception groups."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)


def _exception_text(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception as failure:
        text = f"<str() failed: {type(failure).__name__}>"
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        text += "".join(f"\n{note}" for note in notes)
    return text


def _record_error(exc: BaseException) -> None:
    scanner = _current()
    if scanner is None:
        return
    name = type(exc).__name__
    scanner.record("exception", name, _exception_text(exc))
    attempts = getattr(exc, "attempts", None)
    if name == "ConnectError" and isinstance(attempts, tuple):
        for attempt in attempts:
            with contextlib.suppress(Exception):
                scanner.record("exception", "Attempt.describe", attempt.describe())
            error = getattr(attempt, "error", None)
            if isinstance(error, BaseException):
                for linked in _chain(error):
                    scanner.record(
                        "exception cause",
                        f"{type(linked).__name__} in a ConnectError attempt",
                        _exception_text(linked),
                    )


def _record_caught(exc: BaseException) -> None:
    scanner = _current()
    if scanner is None:
        return
    for linked in _chain(exc):
        scanner.record(
            "exception cause",
            f"{type(linked).__name__} caught by pytest.raises",
            _exception_text(linked),
        )


class _WatchedLogger(logging.Logger):
    """A ``pgproto`` logger: every record is scanned; handlers get the ones they got before."""

    def isEnabledFor(self, level: int) -> bool:
        return _current() is not None or super().isEnabledFor(level)

    def handle(self, record: logging.LogRecord) -> None:
        _record_log(record)
        if super().isEnabledFor(record.levelno):
            super().handle(record)


def _record_log(record: logging.LogRecord) -> None:
    if getattr(record, "_secret_watch_seen", False):
        return
    record._secret_watch_seen = True
    try:
        text = record.getMessage()
    except Exception:
        text = str(record.msg)
    if record.exc_info and record.exc_info[1] is not None:
        text += "\n" + "".join(traceback.format_exception(record.exc_info[1]))
    _record("log record", f"logger {record.name!r} {record.levelname}", text)


class _RootHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _record_log(record)


_ROOT_HANDLER: Final = _RootHandler(logging.NOTSET)


def _wrap_repr(original: Callable[[Any], str], kind: str) -> Callable[[Any], str]:
    @functools.wraps(original)
    def wrapper(self: Any) -> str:
        __tracebackhide__ = True
        depth = getattr(_LOCAL, "depth", 0)
        _LOCAL.depth = depth + 1
        try:
            text = original(self)
        finally:
            _LOCAL.depth = depth
        if depth == 0:
            _record("repr", f"{kind} of {type(self).__qualname__}", text)
        return text

    wrapper._secret_watch = True  # type: ignore[attr-defined]
    return wrapper


def _public_classes() -> Iterable[type]:
    seen: set[int] = set()
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in ("pgproto", "pgproto_adapters"):
            continue
        for obj in list(vars(module).values()):
            if (
                isinstance(obj, type)
                and id(obj) not in seen
                and obj.__module__.split(".")[0] in ("pgproto", "pgproto_adapters")
                and not issubclass(obj, BaseException | enum.Enum)
                and not getattr(obj, "_is_protocol", False)
            ):
                seen.add(id(obj))
                yield obj


class _Patches:
    """The monkeypatches, installed once while any scanner is active."""

    def __init__(self) -> None:
        self.depth = 0
        self.undo: list[Callable[[], None]] = []
        self.loggers: set[str] = set()
        self.resolve_original: Callable[..., Any] | None = None
        self.resolve_wrapper: Callable[..., Any] | None = None

    def set(self, owner: Any, name: str, value: Any) -> None:
        had = name in vars(owner)
        old = vars(owner).get(name)

        def undo() -> None:
            if had:
                setattr(owner, name, old)
            else:
                delattr(owner, name)

        setattr(owner, name, value)
        self.undo.append(undo)

    def install(self) -> None:
        from pgproto_adapters import _trace

        import pgproto

        self._exceptions(pgproto)
        self._resolve(pgproto)
        self.set(pgproto.ConnectionStateMachine, "__init__", _machine_init(pgproto))
        self.sweep()
        original_line = _trace.Tracer.line

        def line(self: _trace.Tracer, text: str) -> None:
            _record("trace", "Tracer.line", text)
            original_line(self, text)

        self.set(_trace.Tracer, "line", line)
        self._pytest()
        logging.getLogger().addHandler(_ROOT_HANDLER)
        self.undo.append(lambda: logging.getLogger().removeHandler(_ROOT_HANDLER))

    def _exceptions(self, pgproto: Any) -> None:
        error_init = pgproto.Error.__init__

        def init_error(self: BaseException, *args: Any, **kwargs: Any) -> None:
            __tracebackhide__ = True
            error_init(self, *args, **kwargs)
            _record_error(self)

        self.set(pgproto.Error, "__init__", init_error)
        warning_init = pgproto.PgprotoWarning.__init__

        def init_warning(self: Warning, *args: Any, **kwargs: Any) -> None:
            __tracebackhide__ = True
            warning_init(self, *args, **kwargs)
            _record("warning", type(self).__name__, _exception_text(self))

        self.set(pgproto.PgprotoWarning, "__init__", init_warning)

    def _resolve(self, pgproto: Any) -> None:
        original = self.resolve_original = pgproto.resolve_params

        @functools.wraps(original)
        def resolve_params(conninfo: str = "", /, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            _register_inputs(conninfo, kwargs)
            params = original(conninfo, **kwargs)
            _register_params(params, "resolved parameters")
            return params

        self.resolve_wrapper = resolve_params

    def sweep(self) -> None:
        """Late imports: module references to resolve_params, new loggers and classes."""
        original, wrapper = self.resolve_original, self.resolve_wrapper
        for module in list(sys.modules.values()):
            if module is not None and getattr(module, "resolve_params", None) is original:
                self.set(module, "resolve_params", wrapper)
        for cls in _public_classes():
            for name, kind in (("__repr__", "repr"), ("__str__", "str")):
                method = getattr(cls, name)
                if getattr(method, "_secret_watch", False):
                    continue  # already wrapped (maybe in a base class)
                if name == "__repr__" or name in vars(cls):
                    self.set(cls, name, _wrap_repr(method, kind))
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if (
                (name == "pgproto" or name.startswith("pgproto."))
                and type(logger) is logging.Logger
                and name not in self.loggers
            ):
                self.loggers.add(name)
                logger.__class__ = _WatchedLogger
                self.undo.append(functools.partial(_restore_logger, logger))

    def _pytest(self) -> None:
        from _pytest._code.code import ExceptionInfo
        from _pytest.capture import CaptureFixture

        readouterr = CaptureFixture.readouterr

        def read(self: CaptureFixture[Any]) -> Any:
            result = readouterr(self)
            _record("captured output", "capsys/capfd readouterr", result.out)
            _record("captured output", "capsys/capfd readouterr", result.err)
            return result

        self.set(CaptureFixture, "readouterr", read)
        fill_unfilled = ExceptionInfo.fill_unfilled

        def fill(self: ExceptionInfo[Any], exc_info: Any) -> None:
            fill_unfilled(self, exc_info)
            _record_caught(exc_info[1])

        self.set(ExceptionInfo, "fill_unfilled", fill)

    def remove(self) -> None:
        while self.undo:
            self.undo.pop()()
        self.loggers.clear()


def _restore_logger(logger: logging.Logger) -> None:
    logger.__class__ = logging.Logger
    logger.setLevel(logger.level)  # clears the isEnabledFor caches


def _machine_init(pgproto: Any) -> Callable[..., None]:
    original = pgproto.ConnectionStateMachine.__init__

    @functools.wraps(original)
    def init(self: Any, params: Any, *args: Any, **kwargs: Any) -> None:
        __tracebackhide__ = True
        _register_params(params, "machine parameters")
        original(self, params, *args, **kwargs)

    return init


def _register_inputs(conninfo: object, kwargs: Mapping[str, Any]) -> None:
    for keyword in SECRET_OPTIONS:
        _register(kwargs.get(keyword), f"resolve_params({keyword}=...)")
    if isinstance(conninfo, str):
        for match in _CONNINFO_SECRET.finditer(conninfo):
            for group in match.groups():
                if group:
                    _register(group, "a connection string")
    env = kwargs.get("env")
    environ = getattr(env, "environ", None)
    if isinstance(environ, Mapping):
        for name in ("PGPASSWORD", "PGSSLPASSWORD"):
            _register(environ.get(name), f"Environment {name}")


def _register_params(params: Any, origin: str) -> None:
    get = getattr(params, "get", None)
    if get is None:
        return
    for keyword in SECRET_OPTIONS:
        with contextlib.suppress(KeyError):
            _register(get(keyword), f"{origin}: {keyword}")
    for host in getattr(params, "hosts", ()):
        _register(getattr(host, "password", None), f"{origin}: host password")


_PATCHES: Final = _Patches()


def _install() -> None:
    if _PATCHES.depth == 0:
        _PATCHES.install()
    _PATCHES.depth += 1


def _uninstall() -> None:
    _PATCHES.depth -= 1
    if _PATCHES.depth == 0:
        _PATCHES.remove()


def register_constants(modules: Iterable[Any]) -> None:
    """The passwords the test modules name (``SECRET``, ``*_PASSWORD``, ``ROLES``)."""
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, str) and _CONSTANT_NAME.search(name):
                _register(value, f"{module.__name__}.{name}")
        roles = vars(module).get("ROLES")
        if isinstance(roles, Mapping):
            for role_name, role in roles.items():
                _register(
                    getattr(role, "password", None), f"{module.__name__}.ROLES[{role_name!r}]"
                )


# --------------------------------------------------------------------------
# the hooks

_KEY: Final = pytest.StashKey[Scanner]()


def pytest_configure(config: pytest.Config) -> None:
    scanner = Scanner()
    config.stash[_KEY] = scanner
    _install()
    _STACK.append(scanner)
    register_constants(m for n, m in list(sys.modules.items()) if n in ("servers", "fake_server"))


def pytest_unconfigure(config: pytest.Config) -> None:
    scanner = config.stash.get(_KEY, None)
    if scanner is not None and scanner in _STACK:
        _STACK.remove(scanner)
        _uninstall()


def pytest_collection_finish(session: pytest.Session) -> None:
    modules = {id(m): m for item in session.items if (m := getattr(item, "module", None))}
    names = ("servers", "fake_server", "tls_helpers", "transcripts")
    modules.update({id(m): m for n, m in list(sys.modules.items()) if n in names and m})
    register_constants(modules.values())
    _PATCHES.sweep()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    scanner = item.config.stash.get(_KEY, None)
    if scanner is not None:
        scanner.start_test(item.nodeid)
        scanner.tests_run += 1
        scanner.test_files.add(item.nodeid.split("::", 1)[0])
    try:
        return (yield)
    finally:
        if scanner is not None:
            scanner.start_test("(between tests)")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.longrepr is not None:
        _record("failure report", f"pytest report ({report.when})", report.longreprtext)
    for title, content in report.sections:
        _record("captured output", title, content)


def pytest_warning_recorded(warning_message: warnings.WarningMessage, nodeid: str) -> None:
    _record(
        "warning",
        f"pytest recorded {getattr(warning_message.category, '__name__', '?')} in {nodeid or '?'}",
        f"{warning_message.message}\n{warning_message.filename}:{warning_message.lineno}",
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    scanner = session.config.stash.get(_KEY, None)
    if scanner is not None and scanner.problems():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    scanner = config.stash.get(_KEY, None)
    if scanner is None:
        return
    bad = bool(scanner.problems())
    terminalreporter.section("secret watch", sep="=", red=bad, green=not bad, bold=bad)
    for line in scanner.report():
        terminalreporter.line(line, red=line.startswith(("LEAK", "FAILED")))
