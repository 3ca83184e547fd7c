"""load_balance_hosts=random: the plan (host order, then each host's address
order) is shuffled once per connection, uniformly, from an injectable random
source.  Plans are observed without sockets: every address refuses, and the
fake adapter records the order of OpenConnection commands."""

from __future__ import annotations

import itertools
from collections import Counter
from random import Random

import pytest
from fake_server import ENV, Harness, connect_error

import pgproto
from pgproto import ConnectionStateMachine, OpenConnection

HOSTS = ("a.example", "b.example", "c.example")
ADDRESSES = {
    "a.example": ["192.0.2.1"],
    "b.example": ["192.0.2.2"],
    "c.example": ["192.0.2.3", "192.0.2.4", "192.0.2.5"],
}
REFUSE = {a for addresses in ADDRESSES.values() for a in addresses}

#: chi-square critical values for p = 1e-6 (a false alarm once in a million
#: runs), by degrees of freedom.
CHI2_CRITICAL = {2: 27.63, 5: 35.89}


def _plan(load_balance: str, rng: Random | None = None) -> list[str]:
    params = pgproto.resolve_params(
        host=",".join(HOSTS),
        user="u",
        sslmode="disable",
        load_balance_hosts=load_balance,
        env=ENV,
    )
    harness = Harness(ConnectionStateMachine(params, rng=rng), refuse=REFUSE, addresses=ADDRESSES)
    error = connect_error(harness)
    opened = [e.address.address for e in harness.of_type(OpenConnection)]
    assert [a.address for a in error.attempts] == opened
    return opened


def _host_of(address: str) -> str:
    return next(h for h, addresses in ADDRESSES.items() if address in addresses)


def _host_order(plan: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_host_of(a) for a in plan))


def _chi2(counts: Counter[tuple[str, ...]], categories: list[tuple[str, ...]]) -> float:
    expected = counts.total() / len(categories)
    return sum((counts[c] - expected) ** 2 / expected for c in categories)


def test_disabled_keeps_the_given_order() -> None:
    plan = _plan("disable")
    assert plan == ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.5"]


def test_a_thousand_plans_spread_evenly() -> None:
    n = 1000
    plans = [_plan("random") for _ in range(n)]  # the OS-seeded default source
    for plan in plans:
        assert sorted(plan) == sorted(REFUSE)  # every address once
        # A host's addresses are tried together, in some order.
        hosts = [_host_of(a) for a in plan]
        assert [h for h, _ in itertools.groupby(hosts)] == list(_host_order(plan))

    firsts: Counter[tuple[str, ...]] = Counter((_host_of(p[0]),) for p in plans)
    assert _chi2(firsts, [(h,) for h in HOSTS]) < CHI2_CRITICAL[2], firsts
    orders = Counter(_host_order(p) for p in plans)
    permutations = list(itertools.permutations(HOSTS))
    assert _chi2(orders, permutations) < CHI2_CRITICAL[5], orders
    # c.example's three addresses are shuffled too.
    c_orders = Counter(tuple(a for a in p if _host_of(a) == "c.example") for p in plans)
    c_perms = list(itertools.permutations(ADDRESSES["c.example"]))
    assert _chi2(c_orders, c_perms) < CHI2_CRITICAL[5], c_orders


def test_an_injected_source_makes_plans_reproducible() -> None:
    first = [_plan("random", Random(1234)) for _ in range(20)]
    again = [_plan("random", Random(1234)) for _ in range(20)]
    assert first == again
    assert len({tuple(p) for p in [_plan("random", Random(seed)) for seed in range(50)]}) > 1


@pytest.mark.parametrize("seed", range(5))
def test_one_source_across_connections(seed: int) -> None:
    # One Random shared by successive machines continues its sequence: plans differ.
    rng = Random(seed)
    plans = {tuple(_plan("random", rng)) for _ in range(30)}
    assert len(plans) > 1


def test_every_command_names_the_host_being_tried() -> None:
    """What a machine remembers per ConnParams (across connections) must
    not depend on the shuffled order: Unix-socket hosts with ports of their
    own, and two names for one address."""
    params = pgproto.resolve_params(
        host="/tmp/a,/tmp/b,same.example,alias.example",
        port="5001,5002,5003,5004",
        user="u",
        sslmode="disable",
        load_balance_hosts="random",
        env=ENV,
    )
    addresses = {"same.example": ["192.0.2.9"], "alias.example": ["192.0.2.9"]}
    refuse = {"/tmp/a/.s.PGSQL.5001", "/tmp/b/.s.PGSQL.5002", "192.0.2.9"}
    orders = set()
    for seed in range(40):
        machine = ConnectionStateMachine(params, rng=Random(seed))
        harness = Harness(machine, refuse=refuse, addresses=addresses)
        attempts = connect_error(harness).attempts
        commands = harness.of_type(OpenConnection)
        assert len(commands) == len(attempts) == 4
        for command, attempt in zip(commands, attempts, strict=True):
            assert (command.host, command.address.address) == (attempt.host, attempt.address)
            assert command.address.port == attempt.port
            if command.address.kind == "unix":
                assert attempt.address == f"{attempt.host}/.s.PGSQL.{attempt.port}"
        orders.add(tuple(a.host for a in attempts))
    assert len(orders) > 1  # the order did vary
