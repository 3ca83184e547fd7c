"""pgproto's enumerations carry libpq's numbers (compared with psycopg's pq)."""

from __future__ import annotations

import enum

import pytest
from psycopg import pq

import pgproto


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (pgproto.ConnStatus, pq.ConnStatus),
        (pgproto.PollingStatus, pq.PollingStatus),
        (pgproto.Ping, pq.Ping),
    ],
)
def test_same_names_and_values_as_libpq(
    ours: type[enum.IntEnum], theirs: type[enum.IntEnum]
) -> None:
    assert {m.name: m.value for m in ours} == {m.name: m.value for m in theirs}
