"""pgproto: libpq's connection establishment as a sans-IO state machine.

The public surface is what this module exports; everything in ``pgproto._*``
is private.  pgproto imports no socket, selector, event loop or clock: the
adapters in ``pgproto_adapters`` do the IO.
"""

from ._conninfo import is_conninfo_string, parse_conninfo
from ._enums import ConnStatus, Ping, PollingStatus
from ._environment import Environment
from ._errors import (
    ConninfoError,
    Error,
    LocalProtocolError,
    PasswordFileWarning,
    PgprotoWarning,
    ProtocolError,
    RemoteProtocolError,
)
from ._options import ConninfoOption
from ._params import (
    AuthRequirement,
    ConnParams,
    HostParams,
    HostType,
    Source,
    SourceKind,
    conninfo_defaults,
    resolve_params,
)
from ._version import __version__

__all__ = [
    "AuthRequirement",
    "ConnParams",
    "ConnStatus",
    "ConninfoError",
    "ConninfoOption",
    "Environment",
    "Error",
    "HostParams",
    "HostType",
    "LocalProtocolError",
    "PasswordFileWarning",
    "PgprotoWarning",
    "Ping",
    "PollingStatus",
    "ProtocolError",
    "RemoteProtocolError",
    "Source",
    "SourceKind",
    "__version__",
    "conninfo_defaults",
    "is_conninfo_string",
    "parse_conninfo",
    "resolve_params",
]

# Present the public names as pgproto's own (as psycopg does for its enums).
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = "pgproto"
del _name, _obj
