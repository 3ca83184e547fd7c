"""libpq's status enumerations, with libpq's numeric values (libpq-fe.h)."""

from __future__ import annotations

import enum

__all__ = ["ConnStatus", "Ping", "PollingStatus"]


class ConnStatus(enum.IntEnum):
    """``ConnStatusType``: which ``CONNECTION_*`` step a connection is in."""

    OK = 0
    BAD = 1
    STARTED = 2
    MADE = 3
    AWAITING_RESPONSE = 4
    AUTH_OK = 5
    SETENV = 6  # unused since PostgreSQL 14, kept for its number
    SSL_STARTUP = 7
    NEEDED = 8
    CHECK_WRITABLE = 9
    CONSUME = 10
    GSS_STARTUP = 11
    CHECK_TARGET = 12
    CHECK_STANDBY = 13
    ALLOCATED = 14
    AUTHENTICATING = 15


class PollingStatus(enum.IntEnum):
    """``PostgresPollingStatusType``: what a poll call asks of its caller."""

    FAILED = 0
    READING = 1
    WRITING = 2
    OK = 3
    ACTIVE = 4  # unused by libpq, kept for its number


class Ping(enum.IntEnum):
    """``PGPing``: the answer of a ping (the order is fixed by pg_isready)."""

    OK = 0
    REJECT = 1
    NO_RESPONSE = 2
    NO_ATTEMPT = 3
