"""pgproto: libpq's connection establishment as a sans-IO state machine.

The public surface is what this module exports; everything in ``pgproto._*``
is private.  pgproto imports no socket, selector, event loop or clock: the
adapters in ``pgproto_adapters`` do the IO.
"""

from ._cancel import CancelStateMachine
from ._conninfo import is_conninfo_string, parse_conninfo
from ._enums import ConnStatus, Ping, PollingStatus
from ._environment import Environment
from ._errors import (
    Attempt,
    AuthenticationError,
    ConnectError,
    ConnectionClosed,
    ConninfoError,
    Error,
    LocalProtocolError,
    PasswordFileWarning,
    PgprotoWarning,
    ProtocolError,
    RemoteProtocolError,
    ServerError,
    TLSError,
    TransportError,
    ping_outcome,
)
from ._events import (
    NEED_DATA,
    Address,
    AttemptFailed,
    AttemptStarted,
    AuthenticationCompleted,
    AuthenticationRequested,
    BackendKeyData,
    CloseConnection,
    CommandComplete,
    Connected,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    Event,
    NegotiateProtocolVersion,
    NoticeResponse,
    NotificationResponse,
    OpenConnection,
    ParameterStatus,
    ReadyForQuery,
    ResolveHost,
    RowDescription,
    StartTimer,
    StatusChanged,
    TLSEstablished,
)
from ._machine import ConnectionStateMachine
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
    "NEED_DATA",
    "Address",
    "Attempt",
    "AttemptFailed",
    "AttemptStarted",
    "AuthRequirement",
    "AuthenticationCompleted",
    "AuthenticationError",
    "AuthenticationRequested",
    "BackendKeyData",
    "CancelStateMachine",
    "CloseConnection",
    "CommandComplete",
    "ConnParams",
    "ConnStatus",
    "ConnectError",
    "Connected",
    "ConnectionClosed",
    "ConnectionStateMachine",
    "ConninfoError",
    "ConninfoOption",
    "DataRow",
    "EmptyQueryResponse",
    "Environment",
    "Error",
    "ErrorResponse",
    "Event",
    "HostParams",
    "HostType",
    "LocalProtocolError",
    "NegotiateProtocolVersion",
    "NoticeResponse",
    "NotificationResponse",
    "OpenConnection",
    "ParameterStatus",
    "PasswordFileWarning",
    "PgprotoWarning",
    "Ping",
    "PollingStatus",
    "ProtocolError",
    "ReadyForQuery",
    "RemoteProtocolError",
    "ResolveHost",
    "RowDescription",
    "ServerError",
    "Source",
    "SourceKind",
    "StartTimer",
    "StatusChanged",
    "TLSError",
    "TLSEstablished",
    "TransportError",
    "__version__",
    "conninfo_defaults",
    "is_conninfo_string",
    "parse_conninfo",
    "ping_outcome",
    "resolve_params",
]

# Present the public names as pgproto's own (as psycopg does for its enums).
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = "pgproto"
del _name, _obj
