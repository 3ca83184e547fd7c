"""The exceptions and warnings pgproto raises.

Every exception derives from :class:`Error`.  They are split by whose fault
the problem is, in the manner of h11:

* :class:`ConninfoError` -- what the user wrote (a connection string, a keyword
  argument, an environment variable, a service file) is not acceptable.  It is
  raised before any network activity, as libpq's option errors are.
* :class:`LocalProtocolError` -- the caller used the protocol machinery
  wrongly (a method called in the wrong state, a value the protocol cannot
  carry).
* :class:`RemoteProtocolError` -- the server sent something malformed, out of
  order, or forbidden at that point.

Messages never contain a password: the parsers mask secrets before they build
a message, and :class:`Error` itself offers no way to attach raw input.
"""

from __future__ import annotations

__all__ = [
    "ConninfoError",
    "Error",
    "LocalProtocolError",
    "PasswordFileWarning",
    "PgprotoWarning",
    "ProtocolError",
    "RemoteProtocolError",
]


class Error(Exception):
    """Base class of every exception raised by pgproto."""


class ConninfoError(Error, ValueError):
    """A connection string, keyword argument or option value is invalid.

    ``str(exc)`` is libpq's message for the same fault (its gist, with secrets
    masked).  When the fault is tied to one option, :attr:`keyword` names it;
    :attr:`source` says where the offending value came from, when known.
    """

    def __init__(
        self, message: str, *, keyword: str | None = None, source: object | None = None
    ) -> None:
        super().__init__(message)
        self.keyword = keyword
        self.source = source

    @property
    def message(self) -> str:
        return str(self.args[0])


class ProtocolError(Error):
    """Base class of protocol faults, local or remote."""


class LocalProtocolError(ProtocolError):
    """The caller misused the protocol machinery."""


class RemoteProtocolError(ProtocolError):
    """The server broke the protocol."""


class PgprotoWarning(UserWarning):
    """Base class of the warnings pgproto issues through :mod:`warnings`."""


class PasswordFileWarning(PgprotoWarning):
    """The password file was ignored (not a plain file, or readable by others)."""
